"""Image loading and folder validation: every training or uploaded image passes through here.

Users upload whatever their phone or image editor produced (EXIF-rotated JPEGs, RGBA PNGs, CMYK, 16-bit scans,
half-copied files), so every image goes through :func:`load_image`, which either returns a clean upright RGB image or
raises an :class:`ImageError` that names the file and says what to do. Folders are checked when a run starts, so a
bad file fails it then, not hours into training.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

DEFAULT_MAX_PIXELS = 64_000_000
# Training scales the short side up to the resolution, so a 1x40000 strip (a few hundred bytes) would become
# 512x20 million pixels; no usable photo is this thin.
MAX_ASPECT_RATIO = 20
SIDECAR_SUFFIXES = frozenset({".txt", ".caption", ".json", ".jsonl"})
# Files that OS file managers drop into photo folders; never images, never worth a warning.
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini"})


class ImageError(ValueError):
    """A training file that cannot be used; ``str()`` names the file and says what to do about it."""

    def __init__(self, path: str | Path, reason: str) -> None:
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")


# --------------------------------------------------------------------------------------------------------------------
# Loading


def load_image(path: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode ``path`` into an upright 8-bit RGB image, or raise :class:`ImageError` saying why not.

    The pixel count and aspect ratio are checked from the header before decoding, so neither a decompression bomb
    nor a hair-thin strip (which training would upscale to gigabytes) allocates; the image is fully decoded here so
    truncated files fail now rather than inside a DataLoader worker.
    """
    return _decode(Path(path), max_pixels=max_pixels, draft=None)


def _decode(path: Path, *, max_pixels: int, draft: tuple[int, int] | None) -> Image.Image:
    """Shared body of :func:`load_image`; ``draft`` lets JPEG decode at reduced scale when only validating."""
    if not path.exists():
        raise ImageError(path, "no such file; check the path or upload the image again")
    if path.is_dir():
        raise ImageError(path, "is a directory, not an image file; pass the image files inside it")
    if path.stat().st_size == 0:
        raise ImageError(path, "file is empty (0 bytes); upload it again or remove it")
    try:
        with Image.open(path) as img:
            width, height = img.size
            if width * height > max_pixels:
                raise ImageError(
                    path,
                    f"image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}; "
                    "downscale it (or raise max_pixels if you trust the file)",
                )
            if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
                raise ImageError(
                    path,
                    f"image is {width}x{height}, too thin to train on: its long side is over {MAX_ASPECT_RATIO} times "
                    "its short side, and scaling the short side up to the training resolution would need gigabytes; "
                    "crop it to a less extreme shape or remove it",
                )
            if draft is not None:
                img.draft(None, draft)
            img.load()
            return _to_rgb(ImageOps.exif_transpose(img))
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(path, f"refused by Pillow as a possible decompression bomb ({exc}); downscale it") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            path,
            "not an image Pillow can read (unknown format or not an image at all); convert it to JPEG/PNG/WebP "
            "or remove it",
        ) from exc
    except PermissionError as exc:
        raise ImageError(path, "cannot read the file (permission denied); fix its permissions") from exc
    except MemoryError:
        raise
    except Exception as exc:  # Pillow raises OSError, SyntaxError, struct.error, ... for corrupt data.
        raise ImageError(
            path,
            f"could not decode the image ({type(exc).__name__}: {exc}); the file is probably truncated or "
            "corrupt; export it again or remove it",
        ) from exc


def _to_rgb(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to RGB: transparency onto white, high bit depths rescaled rather than clipped."""
    if img.mode in ("I", "F") or img.mode.startswith("I;16"):
        return Image.fromarray(_high_depth_to_uint8(img)).convert("RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, (255, 255, 255, 255))
        canvas.alpha_composite(rgba)
        return canvas.convert("RGB")
    return img.convert("RGB")


def _high_depth_to_uint8(img: Image.Image) -> np.ndarray:
    """Map a 16-bit/32-bit/float single-channel image to uint8.

    Integer modes are read as 16-bit data (how Pillow presents 16-bit PNG and TIFF), so 65535 -> 255 and
    32768 -> 128. Float images in [0, 1] are scaled by 255; any other float range is taken as 0..255.
    """
    arr = np.asarray(img)
    if img.mode == "F":
        arr = np.nan_to_num(arr.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if arr.size and arr.min() >= 0.0 and arr.max() <= 1.0:
            arr = arr * 255.0
        return np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    arr = np.clip(arr.astype(np.int64), 0, 65535)
    return ((arr * 255 + 32767) // 65535).astype(np.uint8)


# --------------------------------------------------------------------------------------------------------------------
# Folders and captions


def _candidate_files(folder: Path) -> list[Path]:
    """Files in ``folder`` that should be images: no subfolders, hidden files, caption/metadata sidecars or OS junk."""
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file()
        and not p.name.startswith(".")
        and p.suffix.lower() not in SIDECAR_SUFFIXES
        and p.name.lower() not in _JUNK_NAMES
    )


def scan_images(
    folder: str | Path, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> tuple[list[Path], list[tuple[Path, str]]]:
    """Return ``(usable images, [(bad file, reason), ...])`` for the top level of ``folder``, both sorted.

    Every candidate is really decoded (JPEGs at reduced scale, which still reads the whole file), because a
    header-only check misses the truncated uploads that are the most common failure.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(folder, "folder does not exist (or is not a folder); create it and add JPEG/PNG/WebP photos")
    good: list[Path] = []
    bad: list[tuple[Path, str]] = []
    for path in _candidate_files(folder):
        try:
            _decode(path, max_pixels=max_pixels, draft=(256, 256))
        except ImageError as exc:
            bad.append((path, exc.reason))
        else:
            good.append(path)
    return good, bad


def require_images(folder: str | Path, what: str = "instance", *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[Path]:
    """Return the usable images of ``folder``; raise :class:`ImageError` listing every bad file if there are none.

    Bad files next to good ones are skipped with a warning, so one broken upload does not block a run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ImageError(folder, f"the {what} image folder does not exist; create it and add JPEG/PNG/WebP photos")
    good, bad = scan_images(folder, max_pixels=max_pixels)
    listing = "\n".join(f"  - {path.name}: {reason}" for path, reason in bad)
    if not good:
        if not bad:
            raise ImageError(
                folder,
                f"the {what} image folder contains no image files (subfolders and .txt/.caption/.json "
                "sidecars are ignored); add JPEG/PNG/WebP photos",
            )
        raise ImageError(folder, f"no usable {what} images; every file was rejected:\n{listing}")
    if bad:
        warnings.warn(f"{folder}: skipping {len(bad)} unusable {what} image(s):\n{listing}", stacklevel=2)
    return good


def read_caption(image_path: str | Path) -> str | None:
    """Caption from a same-basename ``.txt`` or ``.caption`` sidecar (kohya convention), or None.

    ``.txt`` wins when both exist. Line breaks are folded into spaces; an empty sidecar counts as no caption so an
    accidentally blank file does not train on the empty prompt.
    """
    image_path = Path(image_path)
    for suffix in (".txt", ".caption"):
        sidecar = image_path.with_suffix(suffix)
        if sidecar.is_file():
            try:
                text = sidecar.read_text(encoding="utf-8-sig")
            except UnicodeDecodeError as exc:
                raise ValueError(f"{sidecar}: caption is not valid UTF-8 ({exc}); save it as UTF-8") from exc
            text = " ".join(text.split())
            return text or None
    return None


def to_tensor(img: Image.Image) -> torch.Tensor:
    """uint8 HxWx3 image -> float32 3xHxW tensor in [0, 1]."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 255.0)
