"""A generated image-caption set: one coloured shape on a plain background, with a caption that describes it
("a red circle on the left"). Every sample is a pure function of (seed, split, index), drawn on the fly, so the set
needs no files and a resumed run sees the same images. It is what the trainer's embedded default trains on.
"""

from __future__ import annotations

import random

COLOURS = {
    "red": (220, 40, 40), "green": (40, 190, 60), "blue": (50, 80, 230), "yellow": (235, 215, 40),
    "purple": (150, 60, 200), "white": (240, 240, 240),
}
SHAPES = ("circle", "square", "triangle")
POSITIONS = ("left", "right", "top", "bottom", "middle")
_SPLIT_OFFSET = {"train": 0, "heldout": 1 << 40}


class ShapesCaptions:
    """``num_samples`` generated samples ``{"image": PIL.Image (RGB, image_size²), "caption": str, "key": str}``.

    Args:
        num_samples: length of the set (> 0).
        image_size: side of the square image in pixels (>= 16).
        seed: the set's seed.  split: "train" or "heldout" (disjoint random streams of the same distribution).
    """

    def __init__(self, num_samples: int = 4096, image_size: int = 64, seed: int = 0, split: str = "train"):
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples <= 0:
            raise ValueError(f"ShapesCaptions: num_samples must be a positive int, got {num_samples!r}")
        if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 16:
            raise ValueError(f"ShapesCaptions: image_size must be an int >= 16, got {image_size!r}")
        if split not in _SPLIT_OFFSET:
            raise ValueError(f"ShapesCaptions: split must be one of {sorted(_SPLIT_OFFSET)}, got {split!r}")
        self.num_samples, self.image_size, self.seed, self.split = num_samples, image_size, seed, split

    def __len__(self) -> int:
        return self.num_samples

    def describe(self, index: int) -> tuple[str, str, str, random.Random]:
        """(colour, shape, position, rng) of sample ``index`` (the rng continues to the drawing details)."""
        if not 0 <= index < self.num_samples:
            raise IndexError(f"ShapesCaptions: index {index} out of range [0, {self.num_samples})")
        rng = random.Random(self.seed * 1_000_003 + _SPLIT_OFFSET[self.split] + index)
        return rng.choice(sorted(COLOURS)), rng.choice(SHAPES), rng.choice(POSITIONS), rng

    def __getitem__(self, index: int) -> dict:
        from PIL import Image, ImageDraw

        colour, shape, position, rng = self.describe(index)
        size = self.image_size
        grey = rng.randint(0, 60)
        image = Image.new("RGB", (size, size), (grey, grey, grey))
        draw = ImageDraw.Draw(image)
        radius = size * rng.uniform(0.24, 0.3)
        jitter = size * 0.05
        centre_x = {"left": 0.25, "right": 0.75}.get(position, 0.5) * size + rng.uniform(-jitter, jitter)
        centre_y = {"top": 0.25, "bottom": 0.75}.get(position, 0.5) * size + rng.uniform(-jitter, jitter)
        box = (centre_x - radius, centre_y - radius, centre_x + radius, centre_y + radius)
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse(box, fill=fill)
        elif shape == "square":
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(centre_x, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
        where = "in the middle" if position == "middle" else f"on the {position}"
        return {"image": image, "caption": f"a {colour} {shape} {where}", "key": f"{self.split}-{index}"}

    @staticmethod
    def vocabulary_text() -> str:
        """Every word any caption can contain, one caption per line (to train a tiny text tokenizer on)."""
        lines = []
        for colour in sorted(COLOURS):
            for shape in SHAPES:
                for position in POSITIONS:
                    where = "in the middle" if position == "middle" else f"on the {position}"
                    lines.append(f"a {colour} {shape} {where}")
        return "\n".join(lines) + "\n"
