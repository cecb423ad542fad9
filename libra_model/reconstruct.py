"""Show what Libra "sees" of an image: ``python -m libra_model.reconstruct --processor DIR --image PATH
[--output PATH]``.

The image is tokenised (padded to a square, CLIP, the quantiser: C × P codes) and decoded back to pixels by the
processor's pixel decoder; the output PNG holds the input as the tokenizer sees it (padded to a square and resized
to the decoder's resolution) on the left and the reconstruction on the right. The default output is
``<image stem>_reconstruction.png`` beside the input.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def parse_args(argv=None) -> argparse.Namespace:
    """The command line options (see ``--help``)."""
    parser = argparse.ArgumentParser(prog="python -m libra_model.reconstruct", description=__doc__.split("\n\n")[0])
    parser.add_argument("--processor", required=True, help="processor directory with a pixel decoder")
    parser.add_argument("--image", required=True, help="image file")
    parser.add_argument("--output", default=None, help="PNG to write (default: beside the image)")
    parser.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="tokenizer/decoder dtype "
                                                                              "(default: as saved)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return parser.parse_args(argv)


def side_by_side(original, reconstruction):
    """The input padded to a square and resized to the reconstruction's size, then the reconstruction, in one
    RGB PIL image of twice the width."""
    from PIL import Image

    from libra_model.image_tokenizer import pad_to_square

    size = reconstruction.size
    left = pad_to_square(original).resize(size, Image.BICUBIC)
    canvas = Image.new("RGB", (2 * size[0], size[1]))
    canvas.paste(left, (0, 0))
    canvas.paste(reconstruction.convert("RGB"), (size[0], 0))
    return canvas


def default_output(image_path: str) -> str:
    """``<dir>/<stem>_reconstruction.png`` for ``<dir>/<stem>.<ext>``."""
    stem, _ = os.path.splitext(image_path)
    return stem + "_reconstruction.png"


def run(args: argparse.Namespace) -> str:
    """Load the processor, reconstruct the image, write the side-by-side PNG; returns its path."""
    from PIL import Image

    from libra_model.processor import LibraProcessor

    dtype = DTYPES[args.dtype] if args.dtype else None
    processor = LibraProcessor.from_pretrained(args.processor, device=torch.device(args.device), torch_dtype=dtype)
    if processor.pixel_decoder is None:
        raise SystemExit(f"{args.processor} has no pixel decoder (vision_tokenizer_config.yaml and decoder.* "
                         f"weights in the vision tokenizer checkpoint)")
    original = Image.open(args.image).convert("RGB")
    reconstruction = processor.reconstruct([original])[0]
    output = args.output or default_output(args.image)
    side_by_side(original, reconstruction).save(output)
    return output


def main(argv=None) -> int:
    """Entry point: print the path of the written PNG."""
    print(run(parse_args(argv)))
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
