"""Text-to-image prompting: ``<img_gen>`` opens an image (BOI at vision index 0), generation produces exactly one
complete image span (P codes of every codebook, then EOI) that the pixel decoder turns into an image; greedy codes
equal the argmax of a full forward over the generated sequence (so the cached loop is right in "1d" and "2d")."""

import numpy as np
import pytest
import torch
from model_fixtures import randomize_parameters

from libra_model.config import LibraConfig
from libra_model.image_generation import generate_image_codes, generate_images, main, sample_codes
from libra_model.model import LibraForCausalLM
from libra_model.processor import LibraProcessor
from libra_model.text import IMAGE_GENERATION_MARKER, raw_parts, split_image_generation, v1_parts
from libra_model.tiny import build_tiny_processor_dir

PROMPTS = ["a red circle", "a blue square on the left\n <img_gen>"]


@pytest.fixture(scope="module")
def proc_dir(tmp_path_factory):
    return build_tiny_processor_dir(tmp_path_factory.mktemp("proc"), LibraConfig.tiny(),
                                    texts=["a red circle", "a blue square on the left"])


@pytest.fixture(scope="module")
def processor(proc_dir):
    return LibraProcessor.from_pretrained(proc_dir)


def build_model(mode, dtype=torch.float64):
    torch.manual_seed(0)
    model = LibraForCausalLM(LibraConfig.tiny(vision_prediction_mode=mode), backend="torch").to(dtype).eval()
    randomize_parameters(model, std=0.3)
    return model


def test_marker_becomes_a_lone_boi(processor):
    config = processor.config
    assert split_image_generation("a cat\n <img_gen>  ") == ("a cat\n", True)
    assert split_image_generation("a cat") == ("a cat", False)
    assert raw_parts("a cat\n <img_gen>", 0)[-1].kind == "boi"
    with pytest.raises(ValueError, match="end of the prompt"):
        split_image_generation("<img_gen> a cat")
    with pytest.raises(ValueError, match="once"):
        split_image_generation("<img_gen><img_gen>")
    with pytest.raises(ValueError, match="template None"):
        v1_parts(f"draw {IMAGE_GENERATION_MARKER}", False)
    sample = processor.encode_sample("a red circle\n <img_gen>", template=None)
    assert int(sample.ids[-1]) == config.boi_token_id and int(sample.vision_indices[-1]) == 0
    assert not bool(sample.target_mask[-1])
    assert (sample.vision_indices[:-1] == config.text_vision_index).all()
    plain = processor.encode_sample("a red circle\n", template=None)
    assert torch.equal(sample.ids[:-1], plain.ids)  # the spaces before the marker belong to it


@pytest.mark.parametrize("mode", ["1d", "2d"])
def test_greedy_image_is_one_complete_span_matching_a_full_forward(processor, mode):
    model = build_model(mode)
    config = model.config
    images, out = generate_images(model, processor, PROMPTS)
    patches = config.image_feature_resolution ** 2
    codebooks, batch = config.vision_codebook_num, len(PROMPTS)
    assert out.codes.shape == (codebooks, batch, patches) and out.codes.dtype == torch.int64
    assert ((out.codes >= 0) & (out.codes < config.num_codes)).all()
    new = out.sequences[:, :, out.num_prompt_tokens:]
    assert torch.equal(new[:, :, :patches], out.codes + config.vocab_size)
    assert (new[:, :, -1] == config.eoi_token_id).all()
    assert torch.equal(out.vision_indices[:, out.num_prompt_tokens - 1:],
                       torch.arange(patches + 2).expand(batch, -1))
    for b in range(batch):
        spans = processor.split_spans(out.sequences[0, b])
        kinds = [kind for kind, _ in spans]
        assert kinds[-1] == "image" and kinds.count("image") == 1
        assert len(spans[-1][1]) == patches + 2
        (codes,) = processor.image_codes(out.sequences[:, b])
        assert torch.equal(codes, out.codes[:, b])
    assert len(images) == batch and all(image.size == (42, 42) for image in images)
    decoded = processor.pixel_decoder.to_images(processor.pixel_decoder.decode(out.codes))
    assert [np.asarray(a).tolist() for a in images] == [np.asarray(b).tolist() for b in decoded]

    # Greedy decoding: each code is the argmax (over the codes) of a full forward's logits at the position before.
    assert (out.attention_mask[:, out.num_prompt_tokens:] == 1).all()
    assert (out.attention_mask[0, :out.num_prompt_tokens] == 0).any()  # the shorter prompt is left-padded
    with torch.no_grad():
        logits = model(out.sequences[:, :, :-1], out.vision_indices[:, :-1],
                       out.attention_mask[:, :-1]).logits  # [C, B, N + P, V']
    start = out.num_prompt_tokens - 1
    want = logits[:, :, start:start + patches, config.vocab_size:config.vocab_size + config.num_codes].argmax(-1)
    assert torch.equal(want, out.codes)


def test_sampling_is_seeded_and_uses_the_options(processor):
    model = build_model("1d", torch.float32)
    first = generate_images(model, processor, PROMPTS[:1], decode=False, do_sample=True, temperature=1.3, top_k=3,
                            generator=torch.Generator().manual_seed(7))[1]
    again = generate_images(model, processor, PROMPTS[:1], decode=False, do_sample=True, temperature=1.3, top_k=3,
                            generator=torch.Generator().manual_seed(7))[1]
    assert torch.equal(first.codes, again.codes)
    greedy = generate_images(model, processor, PROMPTS[:1], decode=False)[1]
    assert not torch.equal(first.codes, greedy.codes)  # 18 draws at temperature 1.3 are not all the argmax


def test_sample_codes_filters():
    logits = torch.tensor([[0.0, 5.0, 4.9, -1.0], [3.0, 0.0, 0.0, 2.9]])
    assert sample_codes(logits, do_sample=False).tolist() == [1, 0]
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_codes(logits, do_sample=True, temperature=5.0, top_k=2, generator=generator)
                         for _ in range(200)])
    assert set(draws[:, 0].tolist()) == {1, 2} and set(draws[:, 1].tolist()) == {0, 3}
    draws = torch.stack([sample_codes(logits, do_sample=True, top_p=0.3, generator=generator) for _ in range(50)])
    assert draws[:, 0].eq(1).all() and draws[:, 1].eq(0).all()  # the top code alone holds more than 0.3


def test_prompt_must_end_in_boi_and_options_are_checked(processor):
    model = build_model("1d", torch.float32)
    inputs = processor(texts=["a red circle"], template=None, padding_side="left")
    with pytest.raises(ValueError, match="end in BOI"):
        generate_image_codes(model, inputs["input_ids"], inputs["vision_indices"], inputs["attention_mask"])
    inputs = processor(texts=[PROMPTS[1]], template=None, padding_side="left")
    args = (model, inputs["input_ids"], inputs["vision_indices"])
    with pytest.raises(ValueError, match="top_p"):
        generate_image_codes(*args, do_sample=True, top_p=0.0)
    with pytest.raises(ValueError, match="top_k"):
        generate_image_codes(*args, top_k=-1)
    with pytest.raises(ValueError, match="temperature"):
        generate_image_codes(*args, temperature=-1.0)


def test_cli_writes_the_generated_image(proc_dir, processor, tmp_path, capsys):
    from PIL import Image

    model = build_model("1d", torch.float32)
    model.save_pretrained(str(tmp_path / "model"))
    output = tmp_path / "generated.png"
    assert main(["--checkpoint", str(tmp_path / "model"), "--processor", str(proc_dir), "--prompt", "a red circle",
                 "--output", str(output), "--device", "cpu", "--backend", "torch"]) == 0
    assert capsys.readouterr().out.strip() == str(output)
    written = Image.open(output).convert("RGB")
    expected, _ = generate_images(LibraForCausalLM.from_pretrained(str(tmp_path / "model"), backend="torch"),
                                  processor, ["a red circle"])
    assert written.size == (42, 42) and np.asarray(written).tolist() == np.asarray(expected[0]).tolist()
