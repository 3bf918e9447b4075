"""Uploaded photos (training photos, control images): their limits and the one check each passes before use.

Gradio has a single upload limit for the whole server, and it is the adapters' (``host.MAX_ADAPTER_BYTES``, 2 GiB):
an upload is streamed to disk under it, never held in memory. Photos get their own, far smaller limits here, checked
on that file before anything reads it: its size on disk first, then the library's header checks (pixel count, shape)
before decoding.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

from hra_diffusion.images import ImageError, load_image

MAX_PHOTO_BYTES = 30 * 1024 * 1024  # a 40 MP JPEG is 10-20 MB; a PNG of a phone photo well under 30 MB
MAX_PHOTO_PIXELS = 40_000_000  # a 40 MP camera still passes; a decompression bomb does not


def open_photo(path: str | Path) -> Image.Image:
    """The upright RGB image of an uploaded photo, or an ImageError that says which limit it broke and what to do."""
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as err:
        raise ImageError(path, f"cannot read the upload ({err.strerror}); upload it again") from err
    if size > MAX_PHOTO_BYTES:
        raise ImageError(
            path,
            f"file is {size / 2**20:.1f} MB, over the {MAX_PHOTO_BYTES >> 20} MB limit for photos; "
            "downscale it or save it as JPEG",
        )
    return load_image(path, max_pixels=MAX_PHOTO_PIXELS)
