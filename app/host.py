"""The app's one pipeline, without Gradio: loaded once in the background, used by one request at a time.

A :class:`PipelineHost` generates, makes condition maps, and does everything that touches the adapters loaded in the
pipeline: importing, exporting and deleting adapters, and shelving a trained one (the training service hands it
over through :meth:`PipelineHost.shelve`). All maths is the library's.
"""

from __future__ import annotations

import json
import shutil
import threading
import zipfile
from pathlib import Path
from typing import Any

from PIL import Image

from hra_diffusion.control import CONTROL_KIND, make_condition
from hra_diffusion.export_formats import EXPORT_FORMATS
from hra_diffusion.families import BY_NAME, family_for_pipeline, family_of
from hra_diffusion.io import atomic_write, read_hra_metadata
from hra_diffusion.pipelines import attach_adapters, load_pipeline, unload_adapter
from hra_diffusion.pipelines import generate as sample
from hra_diffusion.train.settings import MAX_SEED

from .store import AdapterStore

MAX_ADAPTER_BYTES = 2 * 1024**3
CONTROL_TYPES = ("canny", "none")  # the preprocessors that run offline, without detector weights
HRA_FILE = "hra"  # the adapter file as stored, metadata and all; a control adapter's only download
# What export_adapter offers, format -> what it is for: the stored file, then the library's export formats.
DOWNLOADS: dict[str, str] = {
    HRA_FILE: "HRA Studio file: this app, hra_diffusion.load_hra",
    **{name: f"{fmt.description} (zip)" if fmt.folder else fmt.description for name, fmt in EXPORT_FORMATS.items()},
}


def in_range(name: str, value: float, low: float, high: float) -> None:
    """ValueError with the allowed range unless low <= value <= high (NaN included)."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


class PipelineHost:
    """One base pipeline and the shelf's adapters on it.

    ``base_model=None`` builds a tiny model with random weights in ``models_dir`` first (the demo where the demo
    world is not installed). ``warm``: load in the background, so the page is up first.
    """

    def __init__(self, base_model: str | None, store: AdapterStore, models_dir: Path, warm: bool = True) -> None:
        self.store = store
        self._base = base_model
        self._models_dir = models_dir
        self._pipe: Any = None
        self._pipe_error: Exception | None = None
        self._ready = threading.Event()
        self._lock = threading.RLock()  # one pipeline, used by one request at a time
        if warm:
            threading.Thread(target=self._load, name="hra-warm", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        """Build the demo model if needed, then load the pipeline once; an error is kept and shown on every use."""
        try:
            if self._base is None:
                from hra_diffusion.testing.tiny import ensure_tiny_pipeline  # diffusers: kept off the start path

                self._base = str(ensure_tiny_pipeline(self._models_dir, controlnet=False))
            self._pipe = load_pipeline(self._base)
        except Exception as err:
            self._pipe_error = err
        finally:
            self._ready.set()

    @property
    def base_model(self) -> str:
        """The base model's hub id or folder (the demo's folder once it is built)."""
        self._ready.wait()
        if self._base is None:
            raise self._pipe_error
        return self._base

    def default_resolution(self) -> int:
        """The base model's own image size: from the loaded pipeline, or before it is loaded from a local folder's
        model_index.json (its family's usual size; a hub id counts as SD 1.x until the pipeline is there)."""
        if self._pipe is not None:
            return family_of(self._pipe).default_resolution(self._pipe)
        index = Path(self._base).expanduser() / "model_index.json"
        try:
            return family_for_pipeline(json.loads(index.read_text()).get("_class_name", "")).typical_resolution
        except (OSError, ValueError):
            return BY_NAME["sd"].typical_resolution

    def _pipeline(self) -> Any:
        """The base pipeline, loaded once at start and kept for every later request."""
        self._ready.wait()
        if self._pipe is None:
            raise self._pipe_error
        return self._pipe

    # ---------------------------------------------------------------------------------------------- generation

    def generate(
        self,
        prompt: str,
        adapter: str | None = None,
        negative_prompt: str = "",
        seed: int = 0,
        steps: int = 25,
        guidance: float = 7.5,
        num_images: int = 1,
        strength: float = 1.0,
        control_adapter: str | None = None,
        control_image: Image.Image | None = None,
        control_type: str = "canny",
        control_scale: float = 1.0,
    ) -> list[Image.Image]:
        """Images for ``prompt`` with one subject adapter (or none) at ``strength``; image i uses seed + i.

        With ``control_image``, ``control_adapter`` steers the layout: the image is turned into its condition map
        (``control_type``: "canny" edges, or "none" for an image that already is one).
        """
        for name, value, low, high in (("number of images", num_images, 1, 8), ("seed", seed, 0, MAX_SEED),
                                       ("steps", steps, 1, 150), ("guidance", guidance, 0.0, 30.0),
                                       ("adapter strength", strength, 0.0, 1.0), ("control strength", control_scale,
                                                                                 0.0, 2.0)):
            in_range(name, value, low, high)
        if control_image is not None and not control_adapter:
            raise ValueError("a control image needs a control adapter (import one on the Adapters tab)")
        condition = self.condition(control_image, control_type) if control_image is not None else None
        with self._lock:
            pipe = self._pipeline()
            self._use(adapter or None, control_adapter if condition is not None else None, strength)
            return sample(
                pipe, prompt, negative_prompt=negative_prompt or None, num_images=int(num_images), seed=int(seed),
                steps=int(steps), guidance=float(guidance), control_image=condition, control_scale=control_scale,
            )  # fmt: skip

    def condition(self, image: Image.Image, control_type: str = "canny") -> Image.Image:
        """The condition map a control adapter sees for ``image`` (shown beside the upload)."""
        if control_type not in CONTROL_TYPES:
            raise ValueError(f"control preprocessing must be one of {CONTROL_TYPES}, got {control_type!r}")
        return make_condition(image, control_type)

    def _use(self, subject: str | None, control: str | None, strength: float = 1.0) -> None:
        """Make exactly these adapters active, loading each file once (attach_adapters swaps control encoders)."""
        names = [name for name in (control, subject) if name]  # control first, as docs/control.md loads them
        paths = [self.store.path(name) for name in names]
        attach_adapters(self._pipe, paths, strengths=[strength if n == subject else 1.0 for n in names], names=names)

    def _unload(self, name: str) -> None:
        """Drop adapter ``name`` from the cached pipeline: its file changed or went away."""
        if self._pipe is not None:
            unload_adapter(self._pipe, name)

    # ------------------------------------------------------------------------------------------------ adapters

    def list_adapters(self) -> list[dict[str, Any]]:
        return self.store.list()

    def shelve(self, source: Path, name: str) -> None:
        """Put ``source`` on the shelf as ``name``; the pipeline's copy of an older file of that name is dropped."""
        with self._lock:
            self._unload(name)
            self.store.add(source, name)

    def delete_adapter(self, name: str) -> None:
        with self._lock:
            self._unload(name)
            self.store.delete(name)

    def import_adapter(self, upload: str | Path, filename: str | None = None) -> dict[str, Any]:
        """Shelve an uploaded adapter file once it has loaded into this base model (never unpickled: safetensors).

        Refused with the reason when it is not an HRA file or was made for other layers.
        """
        upload = Path(upload)
        if upload.stat().st_size > MAX_ADAPTER_BYTES:
            raise ValueError(f"{upload.name} is over {MAX_ADAPTER_BYTES >> 30} GB: not an adapter")
        read_hra_metadata(upload)  # a clear error for what is not an HRA Studio file, before the model loads
        name = self.store.unique_name(Path(filename or upload.name).stem)
        with self._lock:
            pipe = self._pipeline()
            try:
                attach_adapters(pipe, [upload], names=[name])
            finally:
                self._unload(name)  # loaded again from the shelf when used; this load only proved that it fits
            self.store.add(upload, name)
        return self.store.info(name)

    def export_adapter(self, name: str, fmt: str = HRA_FILE) -> Path:
        """A downloadable file of adapter ``name`` in format ``fmt`` (see DOWNLOADS), made once and cached.

        Every part of the adapter (UNet and text encoders) is exported, as the convert command does; folders are
        zipped, since a browser downloads one file.
        """
        if fmt not in DOWNLOADS:
            raise ValueError(f"unknown export format {fmt!r}; choose from {list(DOWNLOADS)}")
        if fmt == HRA_FILE:
            return self.store.path(name)
        if self.store.info(name)["kind"] == CONTROL_KIND:
            raise ValueError("a control adapter downloads as an HRA file only: its hint encoder has no other form")
        export = EXPORT_FORMATS[fmt]
        # dropped whenever the adapter's file changes
        target = self.store.export_path(name, f"{export.output}.zip" if export.folder else export.output)
        if target.is_file():
            return target
        with self._lock:
            pipe = self._pipeline()
            self._use(name, None)
            if export.folder:
                work = target.with_name(f"{target.stem}-work")
                shutil.rmtree(work, ignore_errors=True)
                _zip(export.write(pipe, work, name, self.base_model), target)
                shutil.rmtree(work, ignore_errors=True)
            else:
                export.write(pipe, target, name, self.base_model)
        return target


def _zip(folder: Path, target: Path) -> None:
    """Zip ``folder``'s contents into ``target``, atomically."""

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(folder))

    atomic_write(target, write)
