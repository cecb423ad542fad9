"""The evaluation data formats: well-formed files load; malformed or mismatched ones raise errors that name the
file and what is wrong."""

import json
import os

import pytest

from libra_model.eval.datasets import (
    load_caption_predictions,
    load_caption_set,
    load_vqa_predictions,
    load_vqa_set,
    resolve_vqa_image,
    vqa_image_candidates,
)


def write(path, data):
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(data if isinstance(data, str) else json.dumps(data))
    return str(path)


COCO = {"images": [{"id": 5, "file_name": "a.jpg"}, {"id": 9, "file_name": "b.jpg", "domain": "in-domain"}],
        "annotations": [{"image_id": 5, "caption": "one", "id": 1}, {"image_id": 9, "caption": "two", "id": 2},
                        {"image_id": 5, "caption": "three", "id": 3}]}
QUESTIONS = {"data_subtype": "val2014", "questions": [{"question_id": 50, "image_id": 5, "question": "What?"},
                                                      {"question_id": 51, "image_id": 9, "question": "How many?"}]}
ANNOTATIONS = {"annotations": [
    {"question_id": 50, "image_id": 5, "answer_type": "other", "answers": [{"answer": "x", "answer_id": i}
                                                                          for i in range(10)]},
    {"question_id": 51, "image_id": 9, "answer_type": "number", "answers": [{"answer": "2"}] * 10}]}


def test_coco_captions_load(tmp_path):
    caption_set = load_caption_set(write(tmp_path / "c.json", COCO))
    assert caption_set.images == {5: "a.jpg", 9: "b.jpg"}
    assert caption_set.references == {5: ["one", "three"], 9: ["two"]}


@pytest.mark.parametrize("data, message", [
    ("{not json", "is not valid JSON"),
    ([1, 2], "must be a JSON object with a 'images' list"),
    ({"images": [], "annotations": []}, "lists no images"),
    ({"images": [{"id": 1}], "annotations": []}, r"images\[0\] needs 'file_name'"),
    ({"images": [{"id": 1, "file_name": "a"}, {"id": 1, "file_name": "b"}], "annotations": []},
     "repeats image id 1"),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 2, "caption": "x"}]},
     "refers to image id 2, which is not in 'images'"),
    ({"images": [{"id": 1, "file_name": "a"}], "annotations": [{"image_id": 1, "caption": 3}]},
     r"annotations\[0\] needs 'caption' of type str"),
    ({"images": [{"id": 1, "file_name": "a"}, {"id": 2, "file_name": "b"}],
      "annotations": [{"image_id": 1, "caption": "x"}]}, "1 images have no caption annotation"),
])
def test_malformed_caption_files(tmp_path, data, message):
    path = write(tmp_path / "bad.json", data)
    with pytest.raises(ValueError, match=message) as error:
        load_caption_set(path)
    assert path in str(error.value)


def test_missing_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.json"):
        load_caption_set(str(tmp_path / "nowhere.json"))


def test_vqa_loads(tmp_path):
    vqa = load_vqa_set(write(tmp_path / "q.json", QUESTIONS), write(tmp_path / "a.json", ANNOTATIONS))
    assert vqa.subtype == "val2014" and list(vqa.questions) == [50, 51]
    assert vqa.annotations[50] == {"answers": ["x"] * 10, "answer_type": "other"}
    assert vqa.annotations[51]["answer_type"] == "number"
    assert load_vqa_set(str(tmp_path / "q.json")).annotations is None


def test_mismatched_vqa_files(tmp_path):
    questions = write(tmp_path / "q.json", QUESTIONS)
    other_split = {"annotations": [dict(ANNOTATIONS["annotations"][0], question_id=77)]}
    with pytest.raises(ValueError, match="question id 77 .* is not in the questions file") as error:
        load_vqa_set(questions, write(tmp_path / "a1.json", other_split))
    assert "a1.json" in str(error.value) and "q.json" in str(error.value)
    with pytest.raises(ValueError, match="has no annotation for 1 questions"):
        load_vqa_set(questions, write(tmp_path / "a2.json", {"annotations": ANNOTATIONS["annotations"][:1]}))
    wrong_image = {"annotations": [dict(ANNOTATIONS["annotations"][0], image_id=9), ANNOTATIONS["annotations"][1]]}
    with pytest.raises(ValueError, match="question 50 has image id 9"):
        load_vqa_set(questions, write(tmp_path / "a3.json", wrong_image))
    no_answers = {"annotations": [dict(ANNOTATIONS["annotations"][0], answers=[]), ANNOTATIONS["annotations"][1]]}
    with pytest.raises(ValueError, match="non-empty 'answers' list"):
        load_vqa_set(questions, write(tmp_path / "a4.json", no_answers))
    with pytest.raises(ValueError, match="must be a JSON object with a 'questions' list"):
        load_vqa_set(write(tmp_path / "q2.json", {"annotations": []}))
    # Swapped arguments: the annotations file given as questions.
    with pytest.raises(ValueError, match="a.json must be a JSON object with a 'questions' list"):
        load_vqa_set(write(tmp_path / "a.json", ANNOTATIONS), questions)


def test_predictions(tmp_path):
    assert load_caption_predictions(write(tmp_path / "p.json", [{"image_id": 5, "caption": "c"}])) == {5: "c"}
    assert load_vqa_predictions(write(tmp_path / "v.json", [{"question_id": 50, "answer": "x"}])) == {50: "x"}
    with pytest.raises(ValueError, match="repeats image_id 5"):
        load_caption_predictions(write(tmp_path / "d.json", [{"image_id": 5, "caption": "c"}] * 2))
    with pytest.raises(ValueError, match=r"results\[0\] needs 'answer'"):
        load_vqa_predictions(write(tmp_path / "w.json", [{"question_id": 50, "caption": "x"}]))
    with pytest.raises(ValueError, match="must hold a JSON list"):
        load_caption_predictions(write(tmp_path / "o.json", {"image_id": 5}))
    with pytest.raises(ValueError, match="holds no results"):
        load_caption_predictions(write(tmp_path / "e.json", []))


def test_vqa_image_lookup(tmp_path):
    os.makedirs(tmp_path / "val2014")
    path = tmp_path / "val2014" / "COCO_val2014_000000000005.jpg"
    path.write_bytes(b"")
    assert resolve_vqa_image(str(tmp_path), 5, "val2014") == str(path)
    candidates = vqa_image_candidates("/r", 7, "test-dev2015")
    assert "/r/test2015/COCO_test2015_000000000007.jpg" in candidates and "/r/000000000007.jpg" in candidates
    assert resolve_vqa_image("/r", 5, None, "imgs/{image_id:06d}.png") == "/r/imgs/000005.png"
