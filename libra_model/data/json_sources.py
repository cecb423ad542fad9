"""COCO caption JSON and LLaVA instruction JSON, by index.

COCO (Karpathy split): a list of records with ``image`` (a path relative to the image root) and ``caption`` (a
string, or a list of strings as in LAVIS's val/test files: each caption becomes its own sample).

LLaVA: a list of records with ``id``, an optional ``image`` (relative to the image root; when the file is missing
the name with "-" replaced by "_" is tried, as the reference does) and ``conversations`` (a list of
``{"from": "human" | "gpt", "value": str}``). ``<image>`` may only appear in a human turn; a record with an image
must have it there. Text-only records have ``image`` None.

Records that are malformed are counted and dropped when the file is read; missing or undecodable image files are
counted and skipped when the sample is fetched.
"""

from __future__ import annotations

import json
import os

from libra_model.data.loader import SampleError, SkipStats


def _load_list(path: str, what: str) -> list:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what}: no such file {path}")
    try:
        with open(path, encoding="utf-8") as handle:
            records = json.load(handle)
    except json.JSONDecodeError as error:
        raise ValueError(f"{what}: {path} is not valid JSON: {error.msg} at line {error.lineno}, column "
                         f"{error.colno} (byte {error.pos}); fix or regenerate the annotation file") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{what}: {path} is not UTF-8 text (byte {error.start}); is it an annotation file?") from None
    except OSError as error:
        raise OSError(f"{what}: cannot read {path} ({error.strerror or error})") from error
    if not isinstance(records, list):
        raise ValueError(f"{what}: {path} must hold a JSON list of records, got {type(records).__name__}")
    return records


def load_image(path: str):
    """An RGB ``PIL.Image`` from ``path``; raises :class:`SampleError` ("missing_file" / "corrupt_image")."""
    from PIL import Image

    if not os.path.isfile(path):
        raise SampleError("missing_file", path)
    try:
        with Image.open(path) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, ValueError, SyntaxError) as error:
        raise SampleError("corrupt_image", f"{path}: {error}") from error


class CocoCaptions:
    """COCO-format caption records. ``self[i]`` = ``{"image": PIL.Image, "caption": str, "key": str}``.

    Args:
        annotation_file: the JSON list.  image_root: folder the ``image`` paths are relative to.
        stats: skip counter (new when None).
    """

    def __init__(self, annotation_file: str, image_root: str, stats: SkipStats | None = None):
        self.image_root = image_root
        self.stats = stats if stats is not None else SkipStats()
        self.samples: list[tuple[str, str]] = []
        for i, record in enumerate(_load_list(annotation_file, "CocoCaptions")):
            image = record.get("image") if isinstance(record, dict) else None
            captions = record.get("caption") if isinstance(record, dict) else None
            if isinstance(captions, str):
                captions = [captions]
            if not isinstance(image, str) or not isinstance(captions, list) or \
                    not all(isinstance(c, str) for c in captions) or not captions:
                self.stats.add("malformed_record", f"{annotation_file} record {i}")
                continue
            self.samples.extend((image, caption) for caption in captions)
        if not self.samples:
            raise ValueError(f"CocoCaptions: no usable record in {annotation_file} ({self.stats.summary()})")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        image, caption = self.samples[index]
        return {"image": load_image(os.path.join(self.image_root, image)), "caption": caption, "key": image}


class LlavaInstructions:
    """LLaVA instruction records. ``self[i]`` = ``{"image": PIL.Image | None, "conversations": list, "key": str}``.

    Args:
        annotation_file: the JSON list.  image_root: folder the ``image`` paths are relative to.
        stats: skip counter (new when None).
    """

    def __init__(self, annotation_file: str, image_root: str, stats: SkipStats | None = None):
        self.image_root = image_root
        self.stats = stats if stats is not None else SkipStats()
        self.records: list[dict] = []
        for i, record in enumerate(_load_list(annotation_file, "LlavaInstructions")):
            problem = self._problem(record)
            if problem:
                self.stats.add("malformed_record", f"{annotation_file} record {i}: {problem}")
                continue
            self.records.append(record)
        if not self.records:
            raise ValueError(f"LlavaInstructions: no usable record in {annotation_file} ({self.stats.summary()})")

    @staticmethod
    def _problem(record) -> str:
        if not isinstance(record, dict):
            return "not an object"
        turns = record.get("conversations")
        if not isinstance(turns, list) or not turns:
            return "no conversations"
        for turn in turns:
            if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") \
                    or not isinstance(turn.get("value"), str):
                return "a turn is not {from: human|gpt, value: str}"
            if turn["from"] == "gpt" and "<image>" in turn["value"]:
                return "<image> in a gpt turn"
        has_tag = any("<image>" in t["value"] for t in turns)
        if record.get("image") is not None and not isinstance(record["image"], str):
            return "image is not a path"
        if record.get("image") is not None and not has_tag:
            return "an image but no <image> tag"
        if record.get("image") is None and has_tag:
            return "an <image> tag but no image"
        return ""

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        key = str(record.get("id", index))
        image = None
        if record.get("image") is not None:
            path = os.path.join(self.image_root, record["image"])
            if not os.path.isfile(path):
                directory, name = os.path.split(path)
                fallback = os.path.join(directory, name.replace("-", "_"))
                path = fallback if os.path.isfile(fallback) else path
            image = load_image(path)
        return {"image": image, "conversations": record["conversations"], "key": key}
