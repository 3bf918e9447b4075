"""The app's training service, without Gradio: the Train form, its checks and defaults, and the job queue.

A :class:`TrainingService` turns the Train tab's :class:`TrainForm` and photos into the DreamBooth trainer's
settings, queues the job (:mod:`app.jobs` runs it), reports jobs as the API returns them, and hands a finished job's
adapter to the pipeline host, which shelves it.
"""

from __future__ import annotations

import hashlib
import re
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from hra_diffusion.demo_world import UNIQUE_TOKEN, DemoWorld
from hra_diffusion.images import ImageError
from hra_diffusion.train.settings import MAX_SEED
from training.dreambooth_hra import DreamBoothSettings

from .host import PipelineHost, in_range
from .jobs import Job, JobQueue
from .photos import open_photo
from .store import inside, slug

MAX_PHOTOS = 50
TOKEN_RE = re.compile(r"[A-Za-z0-9_]{1,32}")
CLASS_RE = re.compile(r"[A-Za-z][A-Za-z -]{0,39}")
TRAINER = "training.dreambooth_hra"
MAX_R = 256


@dataclass
class TrainForm:
    """What the Train tab asks; defaults suit SD 1.5 (:meth:`TrainingService.defaults` shrinks them for the demo).
    The page's own limits are checked here; :meth:`TrainingService.request` turns it into the trainer's settings,
    which check the rest."""

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
        in_range("steps", self.steps, 1, 100_000)
        in_range("r", self.r, 1, MAX_R)
        in_range("resolution", self.resolution, 32, 2048)
        if self.resolution % 8:
            raise ValueError(f"resolution must be a multiple of 8 between 32 and 2048, got {self.resolution}")
        if not 0 < self.learning_rate <= 1:
            raise ValueError(f"learning rate must be in (0, 1], got {self.learning_rate}")
        in_range("λ (orthogonality)", self.lambda_orth, 0.0, 1000.0)
        in_range("class images", self.num_class_images, 1, 10_000)
        in_range("seed", self.seed, 0, MAX_SEED)
        in_range("preview steps", self.preview_steps, 1, 150)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {self.token} {self.class_noun}"

    @property
    def preview_every(self) -> int:
        """Samples (and checkpoints) about four times per run: enough to watch, cheap enough not to slow it."""
        return max(1, self.steps // 4)


# Chosen on the demo subjects (docs/app.md has the measurements): 600 steps at 1e-3 bind a subject in about a
# minute on 2 CPU cores (plus about 30 s for the class images, once per class); 3e-3 binds harder but moves the
# class images and the prompts further.
DEMO_WORLD_SETTINGS = TrainForm(token=UNIQUE_TOKEN, class_noun="toy", steps=600, learning_rate=1e-3,
                                    resolution=64, prior_preservation=True, num_class_images=20, preview_steps=20)


class TrainingService:
    """The jobs of data folder ``data_dir`` (in ``jobs/``), trained on ``host``'s base model.

    ``demo``: the app runs a demo model, the demo ``world`` where it is installed (its settings and subjects), else
    the tiny random one. A finished job's adapter goes to ``host.shelve``, which drops the pipeline's copy of the
    adapter a resumed job replaces.
    """

    def __init__(self, data_dir: Path, host: PipelineHost, demo: bool = False, world: DemoWorld | None = None) -> None:
        self.data_dir = data_dir
        self.host = host
        self.demo = demo
        self.world = world
        self.jobs = JobQueue(data_dir / "jobs", on_finish=self._keep_adapter)  # last: its worker calls back

    def defaults(self) -> TrainForm:
        if self.world is not None:
            return replace(DEMO_WORLD_SETTINGS)
        if self.demo:
            # It draws noise whatever the steps: small, quick previews keep the demo snappy on a CPU.
            return TrainForm(steps=40, resolution=64, num_class_images=8, preview_steps=4)
        return TrainForm(resolution=self.host.default_resolution())

    def demo_subjects(self) -> list[dict[str, Any]]:
        """The demo world's subjects (name, class noun, photo paths) for one-click examples; [] elsewhere."""
        if self.world is None:
            return []
        from hra_diffusion.demo_world.subjects import SUBJECTS

        return [{"name": s.name, "class_noun": s.cls, "description": s.description,
                 "photos": [str(p) for p in sorted((self.world.subjects / s.name).glob("*.png"))]}
                for s in SUBJECTS if (self.world.subjects / s.name).is_dir()]

    def check_photos(self, paths: list[str | Path]) -> tuple[list[Path], list[dict[str, str]]]:
        """(usable photos, [{"file", "reason"}, ...]): each file checked and decoded once (photos.open_photo)."""
        good: list[Path] = []
        rejected: list[dict[str, str]] = []
        for raw in paths:
            path = Path(raw)
            try:
                open_photo(path)
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
        base_model = self.host.base_model
        prior = {}
        if form.prior_preservation:
            # Class images depend only on the base model and the class: shared by every job that asks for them.
            model_key = hashlib.sha256(base_model.encode()).hexdigest()[:8]
            prior = {
                "with_prior_preservation": True,
                "class_prompt": f"a photo of {form.class_noun}",
                "class_data_dir": str(self.data_dir / "class_images" / f"{model_key}-{slug(form.class_noun)}"),
                "num_class_images": form.num_class_images,
            }
        return DreamBoothSettings(
            pretrained_model_name_or_path=base_model,
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
        self.host.shelve(inside(self.data_dir, job.adapter), name)
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
