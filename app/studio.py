"""The app's state, without Gradio: the training queue, the adapter store and one cached pipeline.

Everything the web page and the API do goes through a :class:`Studio`, so it can be tested in plain Python and
two studios (two data folders) can live in one process. All maths is the library's; this is bookkeeping.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import threading
import zipfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from PIL import Image

from hra_diffusion.control import CONTROL_KIND, make_condition
from hra_diffusion.demo_world import UNIQUE_TOKEN, find_demo_world
from hra_diffusion.export_formats import EXPORT_FORMATS
from hra_diffusion.images import ImageError, load_image
from hra_diffusion.io import atomic_write, read_hra_metadata
from hra_diffusion.pipelines import attach_adapters, is_sdxl, load_pipeline, unload_adapter
from hra_diffusion.pipelines import generate as sample
from hra_diffusion.train.settings import MAX_SEED
from training.dreambooth_hra import DreamBoothSettings

from .jobs import Job, JobQueue
from .lock import DataDirLock
from .store import AdapterStore, inside, slug

MAX_PHOTOS = 50
MAX_PHOTO_BYTES = 30 * 1024 * 1024
MAX_PHOTO_PIXELS = 40_000_000  # a 40 MP camera still passes; a decompression bomb does not
MAX_ADAPTER_BYTES = 2 * 1024**3
CONTROL_TYPES = ("canny", "none")  # the preprocessors that run offline, without detector weights
TOKEN_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
CLASS_RE = re.compile(r"[A-Za-z][A-Za-z -]{0,39}")
HRA_FILE = "hra"  # the adapter file as stored, metadata and all; a control adapter's only download
# What export_adapter offers, format -> what it is for: the stored file, then the library's export formats.
DOWNLOADS: dict[str, str] = {
    HRA_FILE: "HRA Studio file: this app, hra_diffusion.load_hra",
    **{name: f"{fmt.description} (zip)" if fmt.folder else fmt.description for name, fmt in EXPORT_FORMATS.items()},
}


TRAINER = "training.dreambooth_hra"
MAX_R = 256


def _in_range(name: str, value: float, low: float, high: float) -> None:
    """ValueError with the allowed range unless low <= value <= high (NaN included)."""
    if not low <= value <= high:
        raise ValueError(f"{name} must be between {low} and {high}, got {value}")


@dataclass
class TrainForm:
    """What the Train tab asks; defaults suit SD 1.5 (:meth:`Studio.defaults` shrinks them for the demo). The page's
    own limits are checked here; :meth:`Studio.request` turns it into the trainer's settings, which check the rest."""

    token: str = "sks"
    class_noun: str = "dog"
    steps: int = 500
    r: int = 8
    learning_rate: float = 1e-4
    lambda_orth: float = 0.0
    resolution: int = 512
    prior_preservation: bool = False
    num_class_images: int = 100
    seed: int = 0
    preview_steps: int = 20  # sampling steps of each preview image

    def check(self) -> None:
        """ValueError naming the first bad field and its range, before anything is created: a job folder is never
        made for a request the trainer would refuse later (or, like a 2**64 seed, could not even store)."""
        if not TOKEN_RE.fullmatch(self.token):
            raise ValueError(f"subject token {self.token!r}: one word of letters, digits or '_' (e.g. sks)")
        if not CLASS_RE.fullmatch(self.class_noun):
            raise ValueError(f"class noun {self.class_noun!r}: a plain noun such as 'dog' or 'coffee mug'")
        _in_range("steps", self.steps, 1, 100_000)
        _in_range("r", self.r, 1, MAX_R)
        _in_range("resolution", self.resolution, 32, 2048)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 between 32 and 2048, got {self.resolution}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.learning_rate}")
        _in_range("λ (orthogonality)", self.lambda_orth, 0.0, 1000.0)
        _in_range("class images", self.num_class_images, 1, 10_000)
        _in_range("seed", self.seed, 0, MAX_SEED)
        _in_range("preview steps", self.preview_steps, 1, 150)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    @property
    def preview_every(self) -> int:
        """Samples (and checkpoints) about four times per run: enough to watch, cheap enough not to slow it."""
        return max(1, self.steps // 4)


DEMO_WORLD_LABEL = "the demo world (a small Stable Diffusion trained on toy pictures, 64 px)"
# Chosen on the demo subjects (docs/app.md has the measurements): 600 steps at 1e-3 bind a subject in about a
# minute on 2 CPU cores (plus about 30 s for the class images, once per class); 3e-3 binds harder but moves the
# class images and the prompts further.
DEMO_WORLD_SETTINGS = TrainForm(token=UNIQUE_TOKEN, class_noun="toy", steps=600, learning_rate=1e-3,
                                    resolution=64, prior_preservation=True, num_class_images=20, preview_steps=20)


class Studio:
    """One data folder's jobs, adapters and pipeline.

    ``base_model=None`` uses the demo world (a small model trained on toy pictures, shipped in assets/), or, where
    it is not there (a plain ``pip install``), a tiny model with random weights that draws noise.
    """

    def __init__(self, data_dir: str | Path, base_model: str | None = None, warm: bool = True) -> None:
        """``warm``: build the demo model and load the pipeline in the background, so the page is up first."""
        self.data_dir = Path(data_dir).absolute()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._lock_file = DataDirLock(self.data_dir)  # first: a second app on this folder stops here, changing nothing
        self.demo = base_model is None
        self.world = find_demo_world() if self.demo else None
        if self.world is not None:
            base_model = str(self.world.base)
        self.base_label = (DEMO_WORLD_LABEL if self.world else "the built-in tiny demo model" if self.demo
                           else base_model)
        self.store = AdapterStore(self.data_dir / "adapters", self.data_dir / "exports")
        self._base = base_model
        self._pipe: Any = None
        self._pipe_error: Exception | None = None
        self._ready = threading.Event()
        self._lock = threading.RLock()  # one pipeline, used by one request at a time
        self.jobs = JobQueue(self.data_dir / "jobs", on_finish=self._keep_adapter)  # last: its worker calls back
        if warm:
            threading.Thread(target=self._load, name="hra-warm", daemon=True).start()
        else:
            self._load()

    def _load(self) -> None:
        """Build the demo model if needed, then load the pipeline once; an error is kept and shown on every use."""
        try:
            if self._base is None:
                from hra_diffusion.tiny import ensure_tiny_pipeline  # imports diffusers: kept off the start path

                self._base = str(ensure_tiny_pipeline(self.data_dir / "models", controlnet=False))
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

    # ------------------------------------------------------------------------------------------------ training

    def defaults(self) -> TrainForm:
        if self.world is not None:
            return replace(DEMO_WORLD_SETTINGS)
        if self.demo:
            # It draws noise whatever the steps: small, quick previews keep the demo snappy on a CPU.
            return TrainForm(steps=40, resolution=64, num_class_images=8, preview_steps=4)
        return TrainForm(resolution=1024) if self._base_is_sdxl() else TrainForm()

    def demo_subjects(self) -> list[dict[str, Any]]:
        """The demo world's subjects (name, class noun, photo paths) for one-click examples; [] elsewhere."""
        if self.world is None:
            return []
        from hra_diffusion.demo_world.subjects import SUBJECTS

        return [{"name": s.name, "class_noun": s.cls, "description": s.description,
                 "photos": [str(p) for p in sorted((self.world.subjects / s.name).glob("*.png"))]}
                for s in SUBJECTS if (self.world.subjects / s.name).is_dir()]

    def _base_is_sdxl(self) -> bool:
        """From the loaded pipeline, or before it is loaded from a local folder's model_index.json (a hub id then
        counts as SD until the pipeline is there)."""
        if self._pipe is not None:
            return is_sdxl(self._pipe)
        index = Path(self._base).expanduser() / "model_index.json"
        try:
            return json.loads(index.read_text()).get("_class_name", "").startswith("StableDiffusionXL")
        except (OSError, ValueError):
            return False

    def check_photos(self, paths: list[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
        """(usable photos, [{"file", "reason"}, ...]): every file is decoded once here, with the library's checks."""
        good: list[Path] = []
        rejected: list[dict[str, str]] = []
        for raw in paths:
            path = Path(raw)
            try:
                size = path.stat().st_size
                if size > MAX_PHOTO_BYTES:
                    raise ImageError(path, f"file is {size / 2**20:.1f} MB, over the {MAX_PHOTO_BYTES >> 20} MB limit")
                load_image(path, max_pixels=MAX_PHOTO_PIXELS)
            except (ImageError, OSError) as err:
                rejected.append({"file": path.name, "reason": getattr(err, "reason", str(err))})
            else:
                good.append(path)
        return good, rejected

    def train(self, photos: list[str | Path], form: TrainForm) -> dict[str, Any]:
        """Queue a DreamBooth run on the usable photos; the answer lists the rejected ones with their reasons."""
        request = self.request(form)
        good, rejected = self.check_photos(photos)
        if not good:
            reasons = "; ".join(f"{r['file']}: {r['reason']}" for r in rejected) or "no files were given"
            raise ValueError(f"no usable photos ({reasons})")
        if len(good) > MAX_PHOTOS:
            raise ValueError(f"{len(good)} photos; at most {MAX_PHOTOS} per run (DreamBooth needs 3-20)")

        def prepare(folder: Path) -> DreamBoothSettings:
            instance = folder / request.instance_data_dir
            instance.mkdir()
            for i, photo in enumerate(good):
                shutil.copyfile(photo, instance / f"{i:02d}-{slug(photo.stem, 'photo')}{photo.suffix.lower()}")
            return request

        job = self.jobs.submit({**asdict(form), "photos": len(good)}, TRAINER, prepare)
        return {**self.describe(job), "rejected": rejected}

    def request(self, form: TrainForm) -> DreamBoothSettings:
        """The DreamBooth trainer's settings for ``form``: the page's limits, then the trainer's own checks (HRA's
        rules included) as the settings are made. Paths inside the job are relative: the trainer runs in its folder."""
        form.check()
        prior = {}
        if form.prior_preservation:
            # Class images depend only on the base model and the class: shared by every job that asks for them.
            model_key = hashlib.sha256(self.base_model.encode()).hexdigest()[:8]
            prior = {
                "with_prior_preservation": True,
                "class_prompt": f"a photo of {form.class_noun}",
                "class_data_dir": str(self.data_dir / "class_images" / f"{model_key}-{slug(form.class_noun)}"),
                "num_class_images": form.num_class_images,
            }
        return DreamBoothSettings(
            pretrained_model_name_or_path=self.base_model,
            instance_data_dir="instance",
            instance_prompt=form.instance_prompt,
            output_dir="out",
            resolution=form.resolution,
            max_train_steps=form.steps,
            learning_rate=form.learning_rate,
            hra_r=form.r,
            hra_lambda=form.lambda_orth,
            checkpointing_steps=form.preview_every,
            validation_prompt=form.instance_prompt,
            validation_steps=form.preview_every,
            num_validation_images=1,
            num_validation_inference_steps=form.preview_steps,
            seed=form.seed,
            **prior,
        )

    def _keep_adapter(self, job: Job) -> str:
        """Put a finished (or stopped) job's adapter on the shelf as ``<token>-<job id>``; a resumed job replaces it."""
        name = job.result or f"{job.settings['token']}-{job.id}"
        with self._lock:
            self._unload(name)
            self.store.add(inside(self.data_dir, job.adapter), name)
        return name

    def describe(self, job: Job) -> dict[str, Any]:
        """A job as the API returns it: no trainer module or pid, plus the queue position and a 0-1 progress."""
        data = job.to_dict()
        for key in ("trainer", "pid", "ended"):
            data.pop(key)
        data["position"] = self.jobs.position(job.id)
        data["progress"] = min(1.0, job.step / job.max_steps) if job.max_steps else 0.0
        data["samples"] = [p for p in job.samples if self._served(p)]
        data["logs"] = str(self.jobs.job_dir(job.id) / "out" / "logs")  # the trainer's TensorBoard folder
        return data

    def job_status(self, job_id: str) -> dict[str, Any]:
        return self.describe(self.jobs.get(job_id))

    def list_jobs(self) -> list[dict[str, Any]]:
        return [self.describe(job) for job in self.jobs.list()]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.describe(self.jobs.cancel(job_id))

    def resume(self, job_id: str) -> dict[str, Any]:
        return self.describe(self.jobs.resume(job_id))

    # ---------------------------------------------------------------------------------------------- generation

    def _pipeline(self) -> Any:
        """The base pipeline, loaded once at start and kept for every later request."""
        self._ready.wait()
        if self._pipe is None:
            raise self._pipe_error
        return self._pipe

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
            _in_range(name, value, low, high)
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

    # ---------------------------------------------------------------------------------------------------- files

    def _served(self, path: str | Path) -> bool:
        try:
            self.served_file(path)
        except OSError:
            return False
        return True

    def served_file(self, path: str | Path) -> Path:
        """``path`` if it may be sent to a browser (a file inside the data folder); PermissionError otherwise."""
        resolved = inside(self.data_dir, path)
        if not resolved.is_file():
            raise FileNotFoundError(f"{path}: no such file")
        return resolved

    def close(self) -> None:
        """Stop the queue; a running job is saved and shown as interrupted at the next start."""
        self.jobs.close()
        self._lock_file.release()


def _zip(folder: Path, target: Path) -> None:
    """Zip ``folder``'s contents into ``target``, atomically."""

    def write(tmp: str) -> None:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(folder))

    atomic_write(target, write)
