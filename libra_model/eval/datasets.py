"""The evaluation data formats, read and checked: errors name the file and what is wrong in it.

* Captions (COCO, and NoCaps / Flickr30k in the same layout): one JSON object with ``images``
  (``[{"id": int|str, "file_name": str, ...}]``) and ``annotations`` (``[{"image_id": ..., "caption": str}]``).
* VQA (VQAv2, OK-VQA): the official questions JSON (``{"questions": [{"question_id", "image_id", "question"}],
  "data_subtype": "val2014", ...}``) and annotations JSON (``{"annotations": [{"question_id", "image_id",
  "answers": [{"answer": str, ...}] (10 for VQAv2), "answer_type": "yes/no"|"number"|"other", ...}]}``).
* Results (the official submission formats): captions ``[{"image_id", "caption"}]``, VQA
  ``[{"question_id", "answer"}]``.

VQA questions carry no file names: an image is looked up under the image root as ``COCO_<subtype>_<id:012d>.jpg``
(directly or in a ``<subtype>/`` folder; test-dev2015 images live in test2015) or ``<id:012d>.jpg`` (COCO 2017),
unless an explicit ``image_template`` such as ``"val2014/COCO_val2014_{image_id:012d}.jpg"`` is given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field


def _read_json(path: str, what: str):
    if not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{what}: the path must be a str, got {type(path).__name__}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{what}: {path} is not valid JSON ({error})") from None


def _records(data, key: str, path: str, what: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(key), list):
        found = sorted(data)[:6] if isinstance(data, dict) else type(data).__name__
        raise ValueError(f"{what}: {path} must be a JSON object with a {key!r} list (found {found})")
    return data[key]


def _check_fields(record, index: int, fields: dict, path: str, what: str, list_name: str) -> None:
    if not isinstance(record, dict):
        raise ValueError(f"{what}: {path}: {list_name}[{index}] must be an object, got {type(record).__name__}")
    for name, types in fields.items():
        value = record.get(name)
        if not isinstance(value, types) or isinstance(value, bool):
            raise ValueError(f"{what}: {path}: {list_name}[{index}] needs {name!r} of type "
                             f"{'/'.join(t.__name__ for t in types)}, got {value!r:.60}")


_ID = (int, str)


@dataclass
class CaptionSet:
    """A caption evaluation set: ``images`` {image_id: file name relative to the image root} in file order and
    ``references`` {image_id: [caption, ...]} (every image has at least one)."""

    path: str
    images: dict = field(default_factory=dict)
    references: dict = field(default_factory=dict)


def load_caption_set(path: str) -> CaptionSet:
    """Read a COCO-format caption annotation file (see the module docstring)."""
    what = "caption annotations"
    data = _read_json(path, what)
    images = _records(data, "images", path, what)
    annotations = _records(data, "annotations", path, what)
    out = CaptionSet(os.fspath(path))
    for i, image in enumerate(images):
        _check_fields(image, i, {"id": _ID, "file_name": (str,)}, path, what, "images")
        if image["id"] in out.images:
            raise ValueError(f"{what}: {path}: images[{i}] repeats image id {image['id']!r}")
        out.images[image["id"]] = image["file_name"]
        out.references[image["id"]] = []
    for i, annotation in enumerate(annotations):
        _check_fields(annotation, i, {"image_id": _ID, "caption": (str,)}, path, what, "annotations")
        if annotation["image_id"] not in out.references:
            raise ValueError(f"{what}: {path}: annotations[{i}] refers to image id {annotation['image_id']!r}, "
                             "which is not in 'images'")
        out.references[annotation["image_id"]].append(annotation["caption"])
    if not out.images:
        raise ValueError(f"{what}: {path} lists no images")
    bare = [image_id for image_id, captions in out.references.items() if not captions]
    if bare:
        raise ValueError(f"{what}: {path}: {len(bare)} images have no caption annotation (first: {bare[:5]})")
    return out


@dataclass
class VQASet:
    """A VQA evaluation set: ``questions`` {question_id: {"image_id", "question"}} in file order, ``subtype`` (the
    questions file's ``data_subtype``, e.g. "val2014", or None) and ``annotations`` {question_id: {"answers":
    [str, ...], "answer_type": str}} (None when no annotation file was given: prediction only)."""

    questions_path: str
    subtype: str | None
    questions: dict = field(default_factory=dict)
    annotations: dict | None = None
    annotations_path: str | None = None


def load_vqa_set(questions_path: str, annotations_path: str | None = None) -> VQASet:
    """Read the official VQA questions file and, when given, its annotations file; they must hold the same
    question ids with the same image ids (else ValueError naming both files)."""
    what = "VQA questions"
    data = _read_json(questions_path, what)
    questions = _records(data, "questions", questions_path, what)
    subtype = data.get("data_subtype")
    out = VQASet(os.fspath(questions_path), subtype if isinstance(subtype, str) else None)
    for i, question in enumerate(questions):
        _check_fields(question, i, {"question_id": _ID, "image_id": _ID, "question": (str,)}, questions_path, what,
                      "questions")
        if question["question_id"] in out.questions:
            raise ValueError(f"{what}: {questions_path}: questions[{i}] repeats question id "
                             f"{question['question_id']!r}")
        out.questions[question["question_id"]] = {"image_id": question["image_id"], "question": question["question"]}
    if not out.questions:
        raise ValueError(f"{what}: {questions_path} lists no questions")
    if annotations_path is None:
        return out
    what = "VQA annotations"
    records = _records(_read_json(annotations_path, what), "annotations", annotations_path, what)
    out.annotations, out.annotations_path = {}, os.fspath(annotations_path)
    for i, record in enumerate(records):
        _check_fields(record, i, {"question_id": _ID, "image_id": _ID, "answers": (list,)}, annotations_path, what,
                      "annotations")
        qid = record["question_id"]
        if qid in out.annotations:
            raise ValueError(f"{what}: {annotations_path}: annotations[{i}] repeats question id {qid!r}")
        answers = record["answers"]
        if not answers or not all(isinstance(a, dict) and isinstance(a.get("answer"), str) for a in answers):
            raise ValueError(f"{what}: {annotations_path}: annotations[{i}] (question {qid!r}) needs a non-empty "
                             "'answers' list of {'answer': str} objects")
        question = out.questions.get(qid)
        if question is None:
            raise ValueError(f"{what}: {annotations_path}: question id {qid!r} (annotations[{i}]) is not in the "
                             f"questions file {questions_path}: do the two files belong to the same split?")
        if question["image_id"] != record["image_id"]:
            raise ValueError(f"{what}: {annotations_path}: question {qid!r} has image id {record['image_id']!r}, "
                             f"the questions file {questions_path} says {question['image_id']!r}")
        answer_type = record.get("answer_type", "other")
        out.annotations[qid] = {"answers": [a["answer"] for a in answers],
                                "answer_type": answer_type if isinstance(answer_type, str) else "other"}
    unanswered = [qid for qid in out.questions if qid not in out.annotations]
    if unanswered:
        raise ValueError(f"{what}: {annotations_path} has no annotation for {len(unanswered)} questions of "
                         f"{questions_path} (first: {unanswered[:5]}): do the two files belong to the same split?")
    return out


def vqa_image_candidates(image_root: str, image_id, subtype: str | None, image_template: str | None = None
                         ) -> list[str]:
    """The paths tried, in order, for the image of a VQA question (see the module docstring)."""
    if image_template is not None:
        return [os.path.join(image_root, image_template.format(image_id=image_id, subtype=subtype))]
    if not isinstance(image_id, int):
        return [os.path.join(image_root, str(image_id))]
    folders = [subtype, subtype.replace("test-dev", "test")] if subtype else []
    names = [f"COCO_{folder}_{image_id:012d}.jpg" for folder in dict.fromkeys(folders)] + [f"{image_id:012d}.jpg"]
    paths = []
    for name in names:
        paths.append(os.path.join(image_root, name))
        paths.extend(os.path.join(image_root, folder, name) for folder in dict.fromkeys(folders))
    return paths


def resolve_vqa_image(image_root: str, image_id, subtype: str | None, image_template: str | None = None) -> str:
    """The first existing candidate path, or the first candidate when none exists (reading it reports it missing)."""
    candidates = vqa_image_candidates(image_root, image_id, subtype, image_template)
    return next((path for path in candidates if os.path.isfile(path)), candidates[0])


def load_caption_predictions(path: str) -> dict:
    """Read caption results ``[{"image_id", "caption"}]`` -> {image_id: caption}; a repeated image id is an error."""
    return _load_results(path, "caption predictions", "image_id", "caption")


def load_vqa_predictions(path: str) -> dict:
    """Read VQA results ``[{"question_id", "answer"}]`` -> {question_id: answer}; a repeated id is an error."""
    return _load_results(path, "VQA predictions", "question_id", "answer")


def _load_results(path: str, what: str, key: str, value: str) -> dict:
    data = _read_json(path, what)
    if not isinstance(data, list):
        raise ValueError(f"{what}: {path} must hold a JSON list of {{{key!r}, {value!r}}} objects, "
                         f"got {type(data).__name__}")
    out = {}
    for i, record in enumerate(data):
        _check_fields(record, i, {key: _ID, value: (str,)}, path, what, "results")
        if record[key] in out:
            raise ValueError(f"{what}: {path}: results[{i}] repeats {key} {record[key]!r}")
        out[record[key]] = record[value]
    if not out:
        raise ValueError(f"{what}: {path} holds no results")
    return out


def write_results(path: str, results: list[dict]) -> None:
    """Write a results list as JSON (atomically: a temporary file renamed into place)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(results, handle)
        handle.write("\n")
    os.replace(temporary, path)


def match_predictions(predictions: dict, known: dict, predictions_path: str, known_path: str, key: str) -> None:
    """Raise ValueError when a prediction's id is not in ``known`` (the annotation side): it names both files."""
    unknown = [k for k in predictions if k not in known]
    if unknown:
        raise ValueError(f"{predictions_path}: {len(unknown)} predicted {key}s are not in {known_path} "
                         f"(first: {unknown[:5]}): do the predictions belong to this annotation file?")
