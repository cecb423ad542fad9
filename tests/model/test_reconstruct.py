"""Image reconstruction end to end on the tiny processor: tokenize (CLIP, quantiser) then the pixel decoder, the
processor directory round trip with the decoder, and the ``python -m libra_model.reconstruct`` command line."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from libra_model.config import LibraConfig
from libra_model.image_tokenizer import read_vision_tokenizer_checkpoint
from libra_model.processor import PROCESSOR_CONFIG_NAME, LibraProcessor
from libra_model.reconstruct import main
from libra_model.tiny import build_tiny_processor_dir


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    return build_tiny_processor_dir(tmp_path_factory.mktemp("proc"), LibraConfig.tiny())


@pytest.fixture(scope="module")
def processor(proc_dir):
    return LibraProcessor.from_pretrained(proc_dir)


def picture(seed, size=(40, 28)):
    rng = np.random.default_rng(seed)
    return Image.fromarray((rng.random((size[1], size[0], 3)) * 255).astype(np.uint8))


def test_reconstruct_is_tokenize_then_decode(processor):
    images = [picture(0), picture(1, (30, 30))]
    got = processor.reconstruct(images)
    assert [im.size for im in got] == [(42, 42), (42, 42)]
    codes = processor.image_tokenizer.tokenize(images).codes
    decoder = processor.pixel_decoder
    want = decoder.to_images(decoder.decode(codes))
    assert [np.asarray(a).tolist() for a in got] == [np.asarray(b).tolist() for b in want]
    # the decoder and the tokenizer share project_out / post_quant_conv from one checkpoint
    assert torch.equal(decoder.quantize.project_out.weight, processor.image_tokenizer.quantize.project_out.weight)
    # different images give different reconstructions (the codes reach the pixels)
    assert np.asarray(got[0]).tolist() != np.asarray(got[1]).tolist()
    assert len(processor.reconstruct(picture(2))) == 1


def test_tiny_checkpoint_holds_the_whole_decoder(proc_dir, processor):
    state = read_vision_tokenizer_checkpoint(os.path.join(proc_dir, "vision_tokenizer.ckpt"))
    own = processor.pixel_decoder.state_dict()
    assert set(own) <= set(state)
    assert sorted(k for k in state if k.startswith("decoder.")) == sorted(k for k in own if k.startswith("decoder."))
    assert os.path.isfile(os.path.join(proc_dir, "vision_tokenizer_config.yaml"))


def test_save_and_load_keeps_the_decoder(tmp_path, processor):
    saved = processor.save_pretrained(tmp_path / "copy")
    again = LibraProcessor.from_pretrained(saved)
    assert again.pixel_decoder is not None and again.pixel_decoder.config == processor.pixel_decoder.config
    for key, value in processor.pixel_decoder.state_dict().items():
        assert torch.equal(again.pixel_decoder.state_dict()[key], value), key
    image = picture(3)
    assert np.asarray(again.reconstruct(image)[0]).tolist() == np.asarray(processor.reconstruct(image)[0]).tolist()
    assert again.host_copy().pixel_decoder is None


def test_no_decoder_is_a_clear_error(tmp_path, proc_dir):
    without = LibraProcessor.from_pretrained(proc_dir, pixel_decoder_config=None)
    assert without.pixel_decoder is None
    with pytest.raises(ValueError, match="no pixel decoder"):
        without.reconstruct(picture(0))
    # a YAML named in processor_config.json must exist
    settings = json.loads(open(os.path.join(proc_dir, PROCESSOR_CONFIG_NAME)).read())
    assert settings["pixel_decoder_config"] == "vision_tokenizer_config.yaml"
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        LibraProcessor.from_pretrained(proc_dir, pixel_decoder_config="missing.yaml")


def test_cli_writes_input_and_reconstruction_side_by_side(tmp_path, proc_dir, processor, capsys):
    image_path = tmp_path / "photo.jpg"
    picture(4, (50, 36)).save(image_path)
    assert main(["--processor", str(proc_dir), "--image", str(image_path), "--device", "cpu"]) == 0
    output = tmp_path / "photo_reconstruction.png"
    assert capsys.readouterr().out.strip() == str(output)
    written = Image.open(output).convert("RGB")
    assert written.size == (84, 42)
    expected = processor.reconstruct(Image.open(image_path).convert("RGB"))[0]
    assert np.asarray(written.crop((42, 0, 84, 42))).tolist() == np.asarray(expected).tolist()
    explicit = tmp_path / "out.png"
    assert main(["--processor", str(proc_dir), "--image", str(image_path), "--output", str(explicit),
                 "--device", "cpu"]) == 0
    assert Image.open(explicit).size == (84, 42)
