"""Batched generation of evaluation answers with the evaluation prompts.

Prompts: captions use the base-model prompt ``<s>`` + image + "\\n" (the pretraining
caption template without its caption); VQA uses the "v1" chat template with the image first and the question
followed by the short-answer instruction below, ending in "ASSISTANT:". Decoding is greedy unless ``num_beams`` asks
for beam search. An answer is the generated text up to EOS, cut at its first newline and stripped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch

from libra_model.data.loader import SampleError, SkipStats

VQA_INSTRUCTION = "Answer the question using a single word or phrase."
TASKS = ("caption", "vqa")


@dataclass
class EvalItem:
    """One generation request: ``key`` (image id or question id), ``image`` (a path, or a callable returning a
    PIL image; reading it may raise :class:`SampleError`), ``question`` (VQA) or None (captions)."""

    key: object
    image: str | Callable
    question: str | None = None


def prompt_for(task: str, question: str | None) -> tuple[str, str | None]:
    """(text, template) of the processor call for ``task``: captions the raw template with an empty text (image +
    "\\n"), VQA the "v1" template with the question and :data:`VQA_INSTRUCTION`."""
    if task == "caption":
        return "", None
    if task == "vqa":
        if not isinstance(question, str) or not question.strip():
            raise ValueError(f"prompt_for: a VQA item needs a non-empty question, got {question!r}")
        return f"{question.strip()}\n{VQA_INSTRUCTION}", "v1"
    raise ValueError(f"prompt_for: task must be one of {TASKS}, got {task!r}")


def decoding_kwargs(num_beams: int, device: torch.device) -> dict:
    """The keyword arguments of ``model.generate`` for evaluation: ``num_beams`` beams (1 = greedy) on the static
    cache, with the compiled decode step where it is available on ``device`` (a CUDA device with Triton)."""
    from libra_model.decoding import compiled_decoding_available

    if isinstance(num_beams, bool) or not isinstance(num_beams, int) or num_beams < 1:
        raise ValueError(f"num_beams must be an int >= 1, got {num_beams!r}")
    return {"num_beams": num_beams, "cache": "static", "compile": compiled_decoding_available(device)}


def _read_image(item: EvalItem):
    from libra_model.data.json_sources import load_image

    return item.image() if callable(item.image) else load_image(item.image)


def answer_text(processor, tokens: torch.Tensor, eos_token_id: int) -> str:
    """Generated ids int [C, T] of one sample -> the answer: text up to the first EOS, its first line, stripped."""
    stops = (tokens[0] == eos_token_id).nonzero()
    if len(stops):
        tokens = tokens[:, :int(stops[0])]
    return processor.decode(tokens).split("\n")[0].strip()


def _batches(items: Iterable[EvalItem], batch_size: int, stats: SkipStats):
    """Groups of (item, image) with readable images; unreadable ones are counted in ``stats`` and skipped."""
    group = []
    for item in items:
        try:
            group.append((item, _read_image(item)))
        except SampleError as error:
            stats.add(error.reason, error.detail)
            continue
        if len(group) == batch_size:
            yield group
            group = []
    if group:
        yield group


@torch.no_grad()
def predict(model, processor, task: str, items: Sequence[EvalItem], *, batch_size: int = 8,
            max_new_tokens: int = 30, num_beams: int = 1, dtype: torch.dtype | None = None,
            stats: SkipStats | None = None, progress: bool = False) -> dict:
    """Generate an answer for every item whose image can be read.

    Args:
        model: a LibraForCausalLM (TP-sharded models work when every rank calls this with the same items).
        processor: its LibraProcessor.  task: "caption" or "vqa".  items: the requests.
        batch_size: prompts per generate call (left-padded).  max_new_tokens: per answer.
        num_beams: 1 = greedy (see :func:`decoding_kwargs`).  dtype: the contiguous signal's dtype (default the model's
            embedding dtype).  stats: counts the skipped (missing / corrupt) images.  progress: a tqdm bar on stderr.
    Returns:
        {key: answer str} in item order, without the skipped items.
    """
    if task not in TASKS:
        raise ValueError(f"predict: task must be one of {TASKS}, got {task!r}")
    for name, value in (("batch_size", batch_size), ("max_new_tokens", max_new_tokens)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"predict: {name} must be a positive int, got {value!r}")
    stats = stats if stats is not None else SkipStats()
    dtype = dtype or model.model.embed_tokens.weight.dtype
    device = model.model.embed_tokens.weight.device
    extra = decoding_kwargs(num_beams, device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(items), desc=f"{task} generation", unit="item")
    answers = {}
    for group in _batches(items, batch_size, stats):
        texts, templates = zip(*(prompt_for(task, item.question) for item, _ in group))
        inputs = processor(images=[image for _, image in group], texts=list(texts), template=templates[0],
                           padding_side="left")
        signal = inputs.get("contiguous_signal")
        out = model.generate(inputs["input_ids"].to(device), inputs["vision_indices"].to(device),
                             inputs["attention_mask"].to(device), None if signal is None else signal.to(device, dtype),
                             max_new_tokens=max_new_tokens, **extra)
        new_tokens = out.new_tokens.cpu()
        for row, (item, _) in enumerate(group):
            answers[item.key] = answer_text(processor, new_tokens[:, row], model.config.eos_token_id)
        if bar is not None:
            bar.update(len(group))
    if bar is not None:
        bar.update(len(items) - bar.n)
        bar.close()
    return answers
