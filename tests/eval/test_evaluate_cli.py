"""``python -m libra_model.evaluate``: ``score`` on fixture files with hand-computed values, ``run`` end to end with
a tiny trained Libra on generated shapes (missing and corrupt images skipped and counted), and the error cases."""

import json
import math
import os

import pytest
import torch

from libra_model import evaluate
from libra_model.eval.caption_metrics import CAPTION_METRICS
from libra_model.eval.predict import decoding_kwargs
from libra_model.eval.vqa_metrics import normalize_answer


def write(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(data, handle)
    return str(path)


def last_json(text):
    return json.loads(text.strip().splitlines()[-1])


def test_score_captions(tmp_path, capsys):
    annotations = write(tmp_path / "c.json", {
        "images": [{"id": 1, "file_name": "1.jpg"}, {"id": 2, "file_name": "2.jpg"}, {"id": 3, "file_name": "3.jpg"}],
        "annotations": [{"image_id": 1, "caption": "A red circle on the right."},
                        {"image_id": 2, "caption": "a blue square in the middle"},
                        {"image_id": 3, "caption": "a cat"}]})
    # Image 3 has no prediction: the score covers images 1 and 2 (the two-sentence BLEU example).
    predictions = write(tmp_path / "p.json", [{"image_id": 1, "caption": "a red circle on the left"},
                                              {"image_id": 2, "caption": "a blue square"}])
    assert evaluate.main(["score", "--task", "caption", "--annotations", annotations,
                          "--predictions", predictions]) == 0
    out = capsys.readouterr().out
    assert "on 2 of 3 images" in out
    scores = last_json(out)
    assert list(scores) == list(CAPTION_METRICS)
    assert scores["Bleu_1"] == pytest.approx(math.exp(1 - 12 / 9) * 8 / 9, rel=1e-6)


def test_score_vqa(tmp_path, capsys):
    questions = write(tmp_path / "q.json", {"questions": [
        {"question_id": 1, "image_id": 1, "question": "Is it red?"},
        {"question_id": 2, "image_id": 1, "question": "How many?"},
        {"question_id": 3, "image_id": 2, "question": "What colour?"}]})
    annotations = write(tmp_path / "a.json", {"annotations": [
        {"question_id": 1, "image_id": 1, "answer_type": "yes/no", "answers": [{"answer": "yes"}] * 10},
        {"question_id": 2, "image_id": 1, "answer_type": "number",
         "answers": [{"answer": "2"}] * 2 + [{"answer": "3"}] * 8},
        {"question_id": 3, "image_id": 2, "answer_type": "other", "answers": [{"answer": "red"}] * 10}]})
    predictions = write(tmp_path / "p.json", [{"question_id": 1, "answer": "Yes."}, {"question_id": 2, "answer": "two"},
                                              {"question_id": 3, "answer": "blue"}])
    assert evaluate.main(["score", "--task", "vqa", "--questions", questions, "--annotations", annotations,
                          "--predictions", predictions]) == 0
    scores = last_json(capsys.readouterr().out)
    assert scores == pytest.approx({"overall": (100 + 60 + 0) / 3, "yes/no": 100.0, "number": 60.0, "other": 0.0})


def test_score_errors_name_the_files(tmp_path, capsys):
    annotations = write(tmp_path / "c.json", {"images": [{"id": 1, "file_name": "1.jpg"}],
                                              "annotations": [{"image_id": 1, "caption": "x"}]})
    predictions = write(tmp_path / "p.json", [{"image_id": 7, "caption": "y"}])
    assert evaluate.main(["score", "--task", "caption", "--annotations", annotations,
                          "--predictions", predictions]) == 2
    err = capsys.readouterr().err
    assert "p.json" in err and "c.json" in err and "not in" in err
    with pytest.raises(SystemExit):
        evaluate.main(["score", "--task", "vqa", "--annotations", annotations, "--predictions", predictions])


def test_decoding_kwargs():
    cpu = torch.device("cpu")
    # The static cache always; the compiled step only where compiled decoding pays off (CUDA with Triton).
    assert decoding_kwargs(2, cpu) == {"num_beams": 2, "cache": "static", "compile": False}
    assert decoding_kwargs(1, cpu)["num_beams"] == 1
    with pytest.raises(ValueError, match="num_beams must be an int >= 1"):
        decoding_kwargs(0, cpu)


# ------------------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def shapes_benchmark(trained_run, tmp_path_factory):
    """Held-out shapes written as a COCO caption set and a VQA set: 4 readable images, one missing, one corrupt."""
    from libra_model.config import LibraConfig
    from libra_model.data.shapes import ShapesCaptions

    root = tmp_path_factory.mktemp("shapes")
    config = LibraConfig.from_pretrained(trained_run["hf"])
    size = config.image_feature_resolution * 14
    source = ShapesCaptions(4, image_size=size, seed=7, split="heldout")
    images, captions, questions, answers = [], [], [], []
    for index in range(6):
        images.append({"id": 100 + index, "file_name": f"img/{100 + index}.png"})
        if index < 4:
            sample = source[index]
            os.makedirs(root / "img", exist_ok=True)
            sample["image"].save(root / "img" / f"{100 + index}.png")
            colour, shape, _, _ = source.describe(index)
        else:
            colour, shape = "red", "circle"
        if index == 5:
            (root / "img" / "105.png").write_bytes(b"not a png")
        captions += [{"image_id": 100 + index, "caption": f"a {colour} {shape}"},
                     {"image_id": 100 + index, "caption": f"there is a {colour} {shape}"}]
        questions.append({"question_id": 10 * index, "image_id": 100 + index, "question": "What colour is it?"})
        answers.append({"question_id": 10 * index, "image_id": 100 + index, "answer_type": "other",
                        "answers": [{"answer": colour, "answer_id": i} for i in range(10)]})
    return {"root": str(root), "captions": write(root / "captions.json", {"images": images, "annotations": captions}),
            "questions": write(root / "questions.json", {"questions": questions, "data_subtype": "val2014"}),
            "answers": write(root / "answers.json", {"annotations": answers}),
            "image_template": "img/{image_id}.png", "colours": {10 * i: a["answers"][0]["answer"]
                                                                for i, a in enumerate(answers)}}


def _run(trained_run, data, capsys, *extra):
    args = ["run", "--checkpoint", trained_run["hf"], "--processor", trained_run["processor"], "--images",
            data["root"], "--batch-size", "3", "--no-progress", *extra]
    assert evaluate.main(args) == 0
    return capsys.readouterr().out


def test_run_captions_end_to_end(trained_run, shapes_benchmark, tmp_path, capsys):
    from libra_model.data.json_sources import load_image
    from libra_model.model import LibraForCausalLM
    from libra_model.processor import LibraProcessor

    output = str(tmp_path / "out" / "captions.json")
    out = _run(trained_run, shapes_benchmark, capsys, "--task", "caption", "--annotations",
               shapes_benchmark["captions"], "--output", output, "--max-new-tokens", "8")
    assert "corrupt_image 1" in out and "missing_file 1" in out and "on 4 of 6 images" in out
    scores = last_json(out)
    assert list(scores) == list(CAPTION_METRICS) and all(math.isfinite(v) for v in scores.values())
    with open(output, encoding="utf-8") as handle:
        results = json.load(handle)
    assert [sorted(r) for r in results] == [["caption", "image_id"]] * 4
    assert [r["image_id"] for r in results] == [100, 101, 102, 103]
    # The batched, left-padded generation gives each image the caption it gets alone.
    model = LibraForCausalLM.from_pretrained(trained_run["hf"])
    processor = LibraProcessor.from_pretrained(trained_run["processor"], model.config)
    for result in results:
        image = load_image(os.path.join(shapes_benchmark["root"], f"img/{result['image_id']}.png"))
        prompt = processor(images=[image], texts=[""], template=None)
        generated = model.generate(prompt["input_ids"], prompt["vision_indices"], prompt["attention_mask"],
                                   prompt["contiguous_signal"], max_new_tokens=8).new_tokens[:, 0]
        stops = (generated[0] == model.config.eos_token_id).nonzero()
        generated = generated[:, :int(stops[0])] if len(stops) else generated
        assert result["caption"] == processor.decode(generated).split("\n")[0].strip()
    # score on the written file gives the same numbers; --limit asks for fewer images.
    assert evaluate.main(["score", "--task", "caption", "--annotations", shapes_benchmark["captions"],
                          "--predictions", output]) == 0
    assert last_json(capsys.readouterr().out) == scores
    _run(trained_run, shapes_benchmark, capsys, "--task", "caption", "--annotations", shapes_benchmark["captions"],
         "--output", output, "--max-new-tokens", "4", "--limit", "2")
    with open(output, encoding="utf-8") as handle:
        assert [r["image_id"] for r in json.load(handle)] == [100, 101]


def test_run_vqa_end_to_end(trained_run, shapes_benchmark, tmp_path, capsys):
    output = str(tmp_path / "vqa.json")
    common = ("--task", "vqa", "--questions", shapes_benchmark["questions"], "--output", output,
              "--image-template", shapes_benchmark["image_template"])
    out = _run(trained_run, shapes_benchmark, capsys, *common, "--annotations", shapes_benchmark["answers"])
    assert "corrupt_image 1" in out and "missing_file 1" in out and "on 4 of 6 questions" in out
    scores = last_json(out)
    with open(output, encoding="utf-8") as handle:
        results = json.load(handle)
    assert [sorted(r) for r in results] == [["answer", "question_id"]] * 4
    # All 10 annotators agree, so a question scores 100 when the normalised answer is the colour, else 0.
    colours = shapes_benchmark["colours"]
    expected = 100 * sum(normalize_answer(r["answer"]) == colours[r["question_id"]] for r in results) / 4
    assert scores == pytest.approx({"overall": expected, "yes/no": None, "number": None, "other": expected})
    # Without annotations (a test-dev submission) the results are written and not scored.
    out = _run(trained_run, shapes_benchmark, capsys, *common)
    assert "not scored" in out and last_json(out) == {"results": 4, "skipped_images": 2}


def test_run_errors(trained_run, shapes_benchmark, tmp_path, capsys):
    args = ["run", "--checkpoint", trained_run["hf"], "--images", shapes_benchmark["root"], "--task", "caption",
            "--annotations", shapes_benchmark["captions"], "--output", str(tmp_path / "x.json")]
    with pytest.raises(SystemExit):
        evaluate.main([*args, "--batch-size", "0"])
    with pytest.raises(SystemExit):
        evaluate.main(["run", "--checkpoint", "x", "--images", "y", "--task", "vqa", "--output", "z"])
    assert torch.is_grad_enabled()
