"""Image folders, shared by the benchmark loader and the scorer so both agree on what counts as an image."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from PIL import Image

IMAGE_EXTENSIONS = frozenset({".bmp", ".jpeg", ".jpg", ".png", ".webp"})


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly in `folder`, sorted by name; a missing or image-less folder is an error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    return files


def load_images(paths: Iterable[str | Path]) -> list[Image.Image]:
    """Read images as RGB (grayscale, palette and RGBA files all become 3 channels, as the models expect)."""
    images = []
    for path in paths:
        with Image.open(path) as image:
            images.append(image.convert("RGB"))
    return images
