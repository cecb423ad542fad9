"""Command line generation: ``python -m libra_model.generate --checkpoint DIR --image PATH --prompt TEXT``.

The checkpoint directory holds the model (config.json + safetensors) and, unless ``--processor`` names another
directory, the processor files (tokenizer/, clip/, vision_tokenizer.ckpt, processor_config.json; see
:mod:`libra_model.processor`). Prompts use the "v1" chat template by default (image first, ending with
"ASSISTANT:"), as the released demo does; several ``--prompt`` arguments make one left-padded batch.

Decoding takes the fast path by default: the static text cache (``--cache static``) and, where compiled decoding
pays off (a CUDA device with Triton, see :func:`libra_model.decoding.compiled_decoding_available`), the compiled
decode step (``--compile auto``). ``--num-beams K`` runs beam search.
"""

from __future__ import annotations

import argparse
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line options (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m libra_model.generate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="Libra model directory (config.json + weights)")
    parser.add_argument("--processor", default=None, help="processor directory (default: the checkpoint)")
    parser.add_argument("--image", action="append", default=[],
                        help="image file; give one per prompt, or one for all prompts, or none (text only)")
    parser.add_argument("--prompt", action="append", required=True, help="user text (repeat for a batch)")
    parser.add_argument("--template", default="v1", choices=["v1", "caption", "none"],
                        help="prompt template: v1 chat (default), caption (image then newline) or none (raw)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0 = no top-k filtering (default)")
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--num-beams", type=int, default=1, help="> 1: beam search (greedy otherwise)")
    parser.add_argument("--length-penalty", type=float, default=1.0, help="beam scores: log-prob / length ** this")
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--cache", default="static", choices=["static", "dynamic"],
                        help="static: the static text cache (default); dynamic: the general cache, eager")
    parser.add_argument("--compile", default="auto", choices=["auto", "on", "off"],
                        help="compile the static cache's decode step: auto = on a CUDA device with Triton")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="model dtype (default: as saved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--backend", default="auto", choices=["auto", "torch", "triton", "cpp"])
    return parser.parse_args(argv)


def _load_images(paths: list[str], count: int) -> list:
    from PIL import Image

    if not paths:
        return [None] * count
    if len(paths) not in (1, count):
        raise SystemExit(f"give one --image per --prompt ({count}), one for all, or none; got {len(paths)}")
    images = [Image.open(path).convert("RGB") for path in paths]
    return images * count if len(images) == 1 else images


def decoding_options(args: argparse.Namespace, device: torch.device) -> dict:
    """The ``cache``/``compile`` arguments of ``generate`` for the command line's ``--cache`` and ``--compile``."""
    from libra_model.decoding import compiled_decoding_available

    if args.compile == "on" and args.cache != "static":
        raise SystemExit("--compile on needs --cache static")
    compile_step = args.compile == "on" or (args.compile == "auto" and args.cache == "static"
                                            and compiled_decoding_available(device))
    return {"cache": args.cache, "compile": compile_step}


def run(args: argparse.Namespace) -> list[str]:
    """Load the model and the processor, generate for every prompt, return the decoded answers (row 0, text with
    one ``<image>`` marker per generated image)."""
    from libra_model.model import LibraForCausalLM
    from libra_model.processor import LibraProcessor

    device = torch.device(args.device)
    dtype = DTYPES[args.dtype] if args.dtype else None
    model = LibraForCausalLM.from_pretrained(args.checkpoint, dtype=dtype, device=device, backend=args.backend)
    processor = LibraProcessor.from_pretrained(args.processor or args.checkpoint, model.config, device=device)
    prompts = list(args.prompt)
    template = None if args.template == "none" else args.template
    images = _load_images(args.image, len(prompts))
    inputs = processor(images=images, texts=prompts, template=template, padding_side="left")
    inputs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    signal = inputs.get("contiguous_signal")
    if signal is not None:
        signal = signal.to(model.model.embed_tokens.weight.dtype)
    generator = torch.Generator(device=device).manual_seed(args.seed)
    out = model.generate(inputs["input_ids"], inputs["vision_indices"], inputs.get("attention_mask"), signal,
                         max_new_tokens=args.max_new_tokens, do_sample=args.temperature > 0,
                         temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                         repetition_penalty=args.repetition_penalty, num_beams=args.num_beams,
                         length_penalty=args.length_penalty, stop_strings=args.stop or None, tokenizer=processor,
                         generator=generator, **decoding_options(args, device))
    answers = []
    eos = model.config.eos_token_id
    for b in range(out.new_tokens.shape[1]):
        tokens = out.new_tokens[:, b].cpu()
        stops = (tokens[0] == eos).nonzero()
        if len(stops):
            tokens = tokens[:, :int(stops[0])]  # EOS and the padding after it are not part of the answer
        answers.append(processor.decode(tokens).strip())
    return answers


def main(argv=None) -> int:
    """Entry point: print one answer per prompt."""
    args = parse_args(argv)
    for answer in run(args):
        print(answer)
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
