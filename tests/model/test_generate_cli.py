"""The generation command line on a tiny checkpoint directory holding the model and the processor files."""

import pytest
import torch
from model_fixtures import randomize_parameters

from libra_model.config import LibraConfig
from libra_model.model import LibraForCausalLM

pytest.importorskip("PIL")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from libra_model.tiny import build_tiny_processor_dir

    directory = tmp_path_factory.mktemp("libra")
    config = LibraConfig.tiny()
    build_tiny_processor_dir(directory, config)
    torch.manual_seed(0)
    model = LibraForCausalLM(config)
    randomize_parameters(model, std=0.3)
    model.save_pretrained(str(directory))
    return directory


def test_cli_prints_the_api_result(checkpoint, tmp_path, capsys):
    from PIL import Image

    from libra_model.generate import main
    from libra_model.processor import LibraProcessor

    image_path = tmp_path / "image.png"
    Image.fromarray((torch.rand(50, 30, 3) * 255).byte().numpy()).save(image_path)
    prompts = ["what is in the image?", "a photo of a dog"]
    assert main(["--checkpoint", str(checkpoint), "--image", str(image_path), "--prompt", prompts[0],
                 "--prompt", prompts[1], "--max-new-tokens", "6", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out.splitlines()

    model = LibraForCausalLM.from_pretrained(str(checkpoint))
    processor = LibraProcessor.from_pretrained(str(checkpoint))
    image = Image.open(image_path).convert("RGB")
    inputs = processor(images=[image, image], texts=prompts, template="v1", padding_side="left")
    assert inputs["contiguous_signal"] is not None
    out = model.generate(inputs["input_ids"], inputs["vision_indices"], inputs["attention_mask"],
                         inputs["contiguous_signal"], max_new_tokens=6)
    expected = []
    for b in range(2):
        tokens = out.new_tokens[:, b]
        stops = (tokens[0] == model.config.eos_token_id).nonzero()
        tokens = tokens[:, :int(stops[0])] if len(stops) else tokens
        expected.append(processor.decode(tokens).strip())
    assert printed == expected
    assert out.new_tokens.shape[-1] >= 1


def test_cli_text_only_and_bad_image_count(checkpoint, capsys):
    from libra_model.generate import main

    assert main(["--checkpoint", str(checkpoint), "--prompt", "hello", "--max-new-tokens", "3",
                 "--temperature", "0.7", "--top-p", "0.9", "--device", "cpu"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 1
    with pytest.raises(SystemExit):
        main(["--checkpoint", str(checkpoint), "--prompt", "a", "--prompt", "b", "--prompt", "c",
              "--image", "x.png", "--image", "y.png", "--device", "cpu"])


def test_cli_fast_path_beams_and_options(checkpoint, capsys):
    import argparse

    from libra_model.generate import decoding_options, main

    common = ["--checkpoint", str(checkpoint), "--prompt", "hello there", "--prompt", "a", "--max-new-tokens", "5",
              "--device", "cpu"]
    assert main(common + ["--cache", "dynamic"]) == 0
    dynamic = capsys.readouterr().out
    assert main(common) == 0  # the default: the static cache (not compiled on the CPU)
    assert capsys.readouterr().out == dynamic
    assert main(common + ["--num-beams", "3", "--length-penalty", "0.5"]) == 0
    assert len(capsys.readouterr().out.splitlines()) == 2
    options = decoding_options(argparse.Namespace(cache="static", compile="auto"), torch.device("cpu"))
    assert options == {"cache": "static", "compile": False}
    assert decoding_options(argparse.Namespace(cache="static", compile="on"), torch.device("cpu"))["compile"]
    with pytest.raises(SystemExit):
        decoding_options(argparse.Namespace(cache="dynamic", compile="on"), torch.device("cpu"))
