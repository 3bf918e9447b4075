"""A tiny fill50k-style control dataset, generated on the spot.

Lets the control trainer, its tests and a first-time user run end to end without downloading anything: each sample
is a colored shape on a colored background, its condition the shape's outline (white on black), its caption says
what is drawn. Output is deterministic per seed and written atomically, so a crash never leaves a half dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections.abc import Iterable
from pathlib import Path

from PIL import Image, ImageDraw

from .cli import HelpFormatter
from .io import atomic_folder

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
    "cyan": (40, 200, 210),
    "pink": (240, 130, 180),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (130, 80, 40),
}
SHAPES = ("circle", "square", "triangle")


def _draw_sample(rng: random.Random, size: int) -> tuple[Image.Image, Image.Image, str]:
    shape = rng.choice(SHAPES)
    background, foreground = rng.sample(sorted(COLORS), 2)
    radius = rng.uniform(0.15, 0.35) * size
    cx, cy = rng.uniform(radius, size - radius), rng.uniform(radius, size - radius)
    edge_width = max(1, round(size / 100))

    image = Image.new("RGB", (size, size), COLORS[background])
    edges = Image.new("L", (size, size), 0)
    paint, outline = ImageDraw.Draw(image), ImageDraw.Draw(edges)
    if shape == "circle":
        box = (cx - radius, cy - radius, cx + radius, cy + radius)
        paint.ellipse(box, fill=COLORS[foreground])
        outline.ellipse(box, outline=255, width=edge_width)
    else:
        sides, start = (4, math.pi / 4) if shape == "square" else (3, -math.pi / 2)
        angle = rng.uniform(0, 2 * math.pi / sides) + start
        turns = [angle + 2 * math.pi * k / sides for k in range(sides)]
        points = [(cx + radius * math.cos(t), cy + radius * math.sin(t)) for t in turns]
        paint.polygon(points, fill=COLORS[foreground])
        outline.polygon(points, outline=255, width=edge_width)
    article = "an" if foreground[0] in "aeiou" else "a"
    return image, edges.convert("RGB"), f"{article} {foreground} {shape} on a {background} background"


def make_shapes_dataset(out_dir: str | Path, n: int = 16, size: int = 64, seed: int = 0) -> Path:
    """Write ``n`` samples of ``size`` px to ``out_dir`` (must not exist or be empty) and return it.

    Layout: ``images/NNNN.png``, ``conditioning_images/NNNN.png`` and ``metadata.jsonl`` with ``image``,
    ``conditioning_image`` and ``text`` columns, i.e. what :class:`hra_diffusion.data.ControlDataset` reads.
    """
    if n < 1 or size < 8:
        raise ValueError(f"need n >= 1 and size >= 8, got n={n}, size={size}")
    rng = random.Random(seed)
    return write_control_dataset(out_dir, (_draw_sample(rng, size) for _ in range(n)))


def write_control_dataset(out_dir: str | Path, samples: Iterable[tuple[Image.Image, Image.Image | None, str]]) -> Path:
    """Write (image, condition map or None, caption) samples as the imagefolder ControlDataset reads; atomic.

    Without condition maps the ``conditioning_image`` column is left out, and the control trainer computes the maps
    from the images (``--control_type canny``).
    """
    def write(tmp: Path) -> None:
        (tmp / "images").mkdir()
        rows = []
        for i, (image, condition, text) in enumerate(samples):
            name = f"{i:04d}.png"
            row = {"image": f"images/{name}", "text": text}
            image.save(tmp / row["image"])
            if condition is not None:
                row["conditioning_image"] = f"conditioning_images/{name}"
                (tmp / "conditioning_images").mkdir(exist_ok=True)
                condition.save(tmp / row["conditioning_image"])
            rows.append(row)
        (tmp / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")

    return atomic_folder(out_dir, write)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Write a small fill50k-style shapes/edges control dataset.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--n", type=int, default=16, help="number of samples")
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        path = make_shapes_dataset(args.out_dir, n=args.n, size=args.size, seed=args.seed)
    except (FileExistsError, ValueError) as exc:
        parser.error(str(exc))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
