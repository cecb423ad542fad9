"""Webdataset-format caption shards (the pretraining data): tar files whose members are grouped into samples by key (the
member path up to the first dot of its file name), each with an image (``jpg``/``jpeg``/``png``/``webp``) and a
``json`` holding a ``caption`` string (``txt`` is accepted as the caption when there is no json caption).

Shards are named by brace patterns (``data/{00000..00123}.tar``, ``{a,b}.tar``), as in webdataset. Unlike
webdataset's stream, the shards are indexed once (tar headers only) and samples are read by offset, so any sample
can be fetched by index: that is what makes the order deterministic and resumable (``ResumableSampler``) at the
price of one header scan per shard at start-up.

Unreadable shards, members that run past the end of a truncated shard, samples without an image or a caption, and
images that do not decode are skipped and counted (``SkipStats``), never fatal.
"""

from __future__ import annotations

import io
import json
import os
import re
import tarfile

from libra_model.data.loader import SampleError, SkipStats

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_RANGE = re.compile(r"\{(\d+)\.\.(\d+)\}")


def expand_braces(pattern: str) -> list[str]:
    """All names of a brace pattern, in order: ``{000..002}`` is a zero-padded numeric range (width of the first
    bound), ``{a,b}`` a list; several braces expand as a product. ``"a::b"`` (webdataset's separator) joins the
    expansions of both parts."""
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"expand_braces: pattern must be a non-empty string, got {pattern!r}")
    if "::" in pattern:
        return [name for part in pattern.split("::") for name in expand_braces(part)]
    start = pattern.find("{")
    if start < 0:
        if "}" in pattern:
            raise ValueError(f"expand_braces: unbalanced '}}' in {pattern!r}")
        return [pattern]
    end = pattern.find("}", start)
    if end < 0:
        raise ValueError(f"expand_braces: unbalanced '{{' in {pattern!r}")
    body, head, tail = pattern[start + 1:end], pattern[:start], pattern[end + 1:]
    match = _RANGE.fullmatch("{" + body + "}")
    if match:
        low, high = match.group(1), match.group(2)
        if int(high) < int(low):
            raise ValueError(f"expand_braces: empty range {{{body}}} in {pattern!r}")
        width = len(low) if low.startswith("0") or len(low) == len(high) else 0
        options = [str(i).zfill(width) for i in range(int(low), int(high) + 1)]
    else:
        options = body.split(",")
    return [name for option in options for name in expand_braces(head + option + tail)]


def _split_key(member_name: str) -> tuple[str, str]:
    directory, base = os.path.split(member_name)
    if "." not in base:
        return member_name, ""
    stem, ext = base.split(".", 1)
    return os.path.join(directory, stem), ext.lower()


class WebDatasetCaptions:
    """Image-caption samples from webdataset tar shards, by index.

    Args:
        shards: a brace pattern, or a list of patterns/paths.
        stats: where unreadable shards/members and bad samples are counted (a new :class:`SkipStats` when None).

    ``self[i]`` returns ``{"image": PIL.Image (RGB), "caption": str, "key": str}`` or raises :class:`SampleError`.
    """

    def __init__(self, shards: str | list[str], stats: SkipStats | None = None):
        patterns = [shards] if isinstance(shards, str) else list(shards)
        self.shards = [path for pattern in patterns for path in expand_braces(pattern)]
        if not self.shards:
            raise ValueError("WebDatasetCaptions: shards names no file")
        self.stats = stats if stats is not None else SkipStats()
        # One entry per sample: (shard index, key, {ext: (offset, size)}).
        self.samples: list[tuple[int, str, dict[str, tuple[int, int]]]] = []
        for shard_index, path in enumerate(self.shards):
            self._index_shard(shard_index, path)
        if not self.samples:
            raise ValueError(f"WebDatasetCaptions: no usable sample in {len(self.shards)} shard(s) "
                             f"({self.stats.summary()})")

    def _index_shard(self, shard_index: int, path: str) -> None:
        if not os.path.isfile(path):
            self.stats.add("missing_shard", path)
            return
        file_size = os.path.getsize(path)
        groups: dict[str, dict[str, tuple[int, int]]] = {}
        order: list[str] = []
        try:
            with tarfile.open(path, mode="r:") as tar:
                while True:
                    try:
                        member = tar.next()
                    except tarfile.TarError as error:
                        # A corrupt header mid-shard: keep what was indexed before it.
                        self.stats.add("broken_tar_member", f"{path}: {error} after byte {tar.offset}")
                        break
                    if member is None:
                        # tarfile reads a header cut short as the end of the archive; a complete shard has two
                        # zero blocks after its last member, so their absence means the rest was lost.
                        if file_size - tar.offset < 2 * tarfile.BLOCKSIZE:
                            self.stats.add("broken_tar_member", f"{path}: truncated at byte {file_size} (no "
                                                                f"end-of-archive after byte {tar.offset}); the "
                                                                "members after it are lost")
                        break
                    if not member.isfile():
                        continue
                    if member.offset_data + member.size > file_size:
                        # A truncated shard: this member and everything after it are gone.
                        self.stats.add("broken_tar_member", f"{path}:{member.name} runs past the end of the file")
                        break
                    key, ext = _split_key(member.name)
                    if key not in groups:
                        groups[key] = {}
                        order.append(key)
                    groups[key][ext] = (member.offset_data, member.size)
        except (tarfile.TarError, OSError, EOFError) as error:
            self.stats.add("corrupt_shard", f"{path}: {error}")
            if not groups:
                return
        for key in order:
            members = groups[key]
            if not any(ext in members for ext in IMAGE_EXTENSIONS):
                self.stats.add("no_image", f"{path}:{key}")
                continue
            if "json" not in members and "txt" not in members:
                self.stats.add("no_caption", f"{path}:{key}")
                continue
            self.samples.append((shard_index, key, members))

    def __len__(self) -> int:
        return len(self.samples)

    def _read(self, shard_index: int, offset: int, size: int) -> bytes:
        with open(self.shards[shard_index], "rb") as handle:
            handle.seek(offset)
            data = handle.read(size)
        if len(data) != size:
            raise SampleError("broken_tar_member", f"{self.shards[shard_index]} is shorter than its index")
        return data

    def __getitem__(self, index: int) -> dict:
        from PIL import Image

        shard_index, key, members = self.samples[index]
        caption = None
        if "json" in members:
            try:
                record = json.loads(self._read(shard_index, *members["json"]).decode("utf-8"))
            except (ValueError, UnicodeDecodeError) as error:
                raise SampleError("corrupt_json", f"{key}: {error}") from error
            caption = record.get("caption") if isinstance(record, dict) else None
        if caption is None and "txt" in members:
            caption = self._read(shard_index, *members["txt"]).decode("utf-8", errors="replace")
        if not isinstance(caption, str) or not caption.strip():
            raise SampleError("no_caption", key)
        ext = next(ext for ext in IMAGE_EXTENSIONS if ext in members)
        try:
            image = Image.open(io.BytesIO(self._read(shard_index, *members[ext])))
            image.load()
            image = image.convert("RGB")
        except (OSError, ValueError, SyntaxError) as error:
            raise SampleError("corrupt_image", f"{key}: {error}") from error
        return {"image": image, "caption": caption, "key": key}
