"""Text-to-image prompting: generate an image's codes after a prompt that ends in ``<img_gen>`` (BOI), then decode
them to pixels.

``python -m libra_model.image_generation --checkpoint DIR --prompt TEXT --output PATH.png`` does it from the
command line. The prompt is raw text (no chat template); without a ``<img_gen>`` marker, "\\n <img_gen>" is
appended (the prompt form "caption\\n <img_gen>" suits the pretraining text-to-image layout: caption, newline,
image).

The loop runs the model's forward with the bridge KV cache: the prompt (left-padded batch, every row ending in
BOI at vision index 0) once, then one token per step at vision indices 1..P. Each step chooses one code per
codebook row, independently (greedy or sampled with temperature / top-k / top-p), only among the 2^K codes (never
BOI/EOI); generated tokens get a zero contiguous signal (they have no CLIP features). After P codes the image is
closed with EOI, so every row holds exactly one complete image span. Both prediction modes work: in "2d" the
model builds each code's predictor from its up and left neighbours through the cache.

The released chat model was trained for image-to-text only (its text-to-image pretraining variant was disabled),
so the images it generates are a demonstration of the mechanism, not a trained capability.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass

import torch

from libra_model.modules.cache import BridgeKVCache
from libra_model.text import IMAGE_GENERATION_MARKER

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ImageGenerationOutput:
    """codes: int64 [C, B, P] (code values in [0, 2^K), raster order); sequences: int64 [C, B, N + P + 1] (the
    prompt, the code ids, EOI); vision_indices and attention_mask: int64 [B, N + P + 1] (0 at the prompt's left
    padding); num_prompt_tokens: N."""

    codes: torch.Tensor
    sequences: torch.Tensor
    vision_indices: torch.Tensor
    attention_mask: torch.Tensor
    num_prompt_tokens: int


def sample_codes(logits: torch.Tensor, *, do_sample: bool, temperature: float = 1.0, top_k: int = 0,
                 top_p: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
    """One code per row of logits [R, K'] (float): argmax, or a draw from softmax(logits / temperature) restricted
    to the ``top_k`` largest (0 = all) and to the smallest set holding ``top_p`` of the mass. Returns int64 [R]."""
    if not do_sample or temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep a code while the codes ranked above it hold less than top_p; the first one always stays.
        sorted_probs = sorted_probs.masked_fill(sorted_probs.cumsum(-1) - sorted_probs >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(-1, order, sorted_probs)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_options(do_sample, temperature, top_k, top_p) -> None:
    if not isinstance(do_sample, bool):
        raise TypeError(f"generate_image_codes: do_sample must be a bool, got {do_sample!r}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or temperature < 0:
        raise ValueError(f"generate_image_codes: temperature must be a number >= 0, got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise ValueError(f"generate_image_codes: top_k must be an int >= 0 (0 = no limit), got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0:
        raise ValueError(f"generate_image_codes: top_p must be in (0, 1], got {top_p!r}")


@torch.no_grad()
def generate_image_codes(model, input_ids: torch.Tensor, vision_indices: torch.Tensor,
                         attention_mask: torch.Tensor | None = None, contiguous_signal: torch.Tensor | None = None,
                         *, do_sample: bool = False, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                         generator: torch.Generator | None = None) -> ImageGenerationOutput:
    """Generate one image per prompt row.

    Args:
        model: a LibraForCausalLM ("1d" or "2d" prediction mode).
        input_ids: int64 [C, B, N], each row ending in BOI (a prompt built with a final ``<img_gen>``);
            vision_indices: int64 [B, N] (0 at that BOI); attention_mask: [B, N] left padding or None;
            contiguous_signal: float [B, N, cs] or None (the prompt's CLIP features, if it holds images).
        do_sample, temperature, top_k, top_p, generator: code choice (see :func:`sample_codes`); greedy by default.
    Returns:
        :class:`ImageGenerationOutput`.
    """
    _check_options(do_sample, temperature, top_k, top_p)
    config = model.config
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 3 or input_ids.shape[-1] == 0:
        raise ValueError("generate_image_codes: input_ids must be a non-empty int64 tensor [C, B, N]")
    codebooks, batch, length = input_ids.shape
    device = input_ids.device
    if not isinstance(vision_indices, torch.Tensor) or tuple(vision_indices.shape) != (batch, length):
        raise ValueError(f"generate_image_codes: vision_indices must be [B, N] = {(batch, length)}")
    if not bool((vision_indices[:, -1] == 0).all()) or not bool((input_ids[:, :, -1] == config.boi_token_id).all()):
        raise ValueError(f"generate_image_codes: every prompt must end in BOI (id {config.boi_token_id}, vision "
                         f"index 0); end the text with {IMAGE_GENERATION_MARKER} and use template=None")
    if attention_mask is None:
        attention_mask = torch.ones(batch, length, dtype=torch.long, device=device)
    elif not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, length):
        raise ValueError(f"generate_image_codes: attention_mask must be [B, N] = {(batch, length)}")
    elif not bool((attention_mask[:, -1] != 0).all()):
        raise ValueError("generate_image_codes: the prompt batch must be left-padded (attention_mask[:, -1] = 1)")
    patches = config.image_feature_resolution ** 2
    num_codes = 2 ** (config.num_codes.bit_length() - 1)  # the 2^K codes the LFQ bits (and the decoder) can hold
    vocab = config.vocab_size

    was_training = model.training
    model.eval()
    try:
        cache = BridgeKVCache(config.num_hidden_layers, capacity=length + patches)
        out = model(input_ids, vision_indices, attention_mask.long(), contiguous_signal, return_logits=False,
                    past_key_values=cache)
        ones = torch.ones(batch, 1, dtype=torch.long, device=device)
        codes = []
        for index in range(1, patches + 1):
            logits = model.last_logits(out.head_inputs, out.layout)[:, :, vocab:vocab + num_codes]  # [C, B, 2^K]
            chosen = sample_codes(logits.reshape(codebooks * batch, num_codes).float(), do_sample=do_sample,
                                  temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            codes.append(chosen.view(codebooks, batch))
            if index < patches:  # the last code is never fed: EOI closes the image without a model step
                out = model((codes[-1] + vocab)[:, :, None], ones * index, ones, None, return_logits=False,
                            past_key_values=cache)
    finally:
        model.train(was_training)
    codes_t = torch.stack(codes, dim=-1)  # [C, B, P]
    eoi = codes_t.new_full((codebooks, batch, 1), config.eoi_token_id)
    sequences = torch.cat([input_ids, codes_t + vocab, eoi], dim=-1)
    new_indices = torch.arange(1, patches + 2, device=device).expand(batch, -1)
    mask = torch.cat([attention_mask.long(), torch.ones_like(new_indices)], dim=-1)
    return ImageGenerationOutput(codes_t, sequences, torch.cat([vision_indices.long(), new_indices], dim=-1), mask,
                                 length)


def generate_images(model, processor, prompts, *, images=None, decode: bool = True, **options):
    """Raw text prompts (a list; each ends with ``<img_gen>``, which is appended when absent) -> (PIL images or
    None when ``decode`` is False, :class:`ImageGenerationOutput`). ``images``: per prompt None or images for its
    ``<image>`` markers. ``options`` go to :func:`generate_image_codes`. Decoding needs ``processor.pixel_decoder``."""
    if isinstance(prompts, str) or not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("generate_images: prompts must be a non-empty list of str")
    texts = [p if IMAGE_GENERATION_MARKER in p else p + "\n " + IMAGE_GENERATION_MARKER for p in prompts]
    inputs = processor(images=images, texts=texts, template=None, padding_side="left")
    device = next(model.parameters()).device
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    signal = inputs.get("contiguous_signal")
    if signal is not None:
        signal = signal.to(model.model.embed_tokens.weight.dtype)
    out = generate_image_codes(model, inputs["input_ids"], inputs["vision_indices"], inputs["attention_mask"], signal,
                               **options)
    return (processor.decode_images(out.codes) if decode else None), out


# ------------------------------------------------------------------------------------------------ command line
def parse_args(argv=None) -> argparse.Namespace:
    """The command line options (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m libra_model.image_generation",
                                     description="Generate an image from a text prompt and write it as a PNG.")
    parser.add_argument("--checkpoint", required=True, help="Libra model directory (config.json + weights)")
    parser.add_argument("--processor", default=None, help="processor directory with the pixel decoder "
                                                          "(default: the checkpoint)")
    parser.add_argument("--prompt", required=True, help=f"raw text; '\\n {IMAGE_GENERATION_MARKER}' is appended "
                                                        f"unless it holds {IMAGE_GENERATION_MARKER}")
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: as saved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cpp"])
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """Entry point: write the generated image to ``--output`` and print its path."""
    from libra_model.model import LibraForCausalLM
    from libra_model.processor import LibraProcessor

    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model = LibraForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device, backend=args.backend)
    processor = LibraProcessor.from_pretrained(args.processor or args.checkpoint, model.config, device=device)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    images, _ = generate_images(model, processor, [args.prompt], do_sample=args.temperature > 0,
                                temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                                generator=generator)
    images[0].save(args.output)
    print(args.output)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
