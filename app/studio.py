"""The app without Gradio: one data folder, its lock and adapter shelf, a pipeline host and a training service.

Everything the web page and the API do goes through a :class:`Studio`, so it can be tested in plain Python and
two studios (two data folders) can live in one process. The work is done by its two parts:
:class:`~app.host.PipelineHost` (the pipeline and the adapters on it) and
:class:`~app.training_service.TrainingService` (the Train form and the job queue).
"""

from __future__ import annotations

from pathlib import Path

from hra_diffusion.demo_world import find_demo_world

from .host import PipelineHost
from .lock import DataDirLock
from .store import AdapterStore
from .training_service import TrainingService

DEMO_WORLD_LABEL = "the demo world (a small Stable Diffusion trained on toy pictures, 64 px)"
DEMO_CONTROL_NAME = "demo-world-canny"  # the demo world's control adapter, on a new data folder's shelf


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
        new_shelf = not (self.data_dir / "adapters").exists()
        self.store = AdapterStore(self.data_dir / "adapters", self.data_dir / "exports")
        if new_shelf and self.world is not None and self.world.control.is_file():
            self.store.add(self.world.control, DEMO_CONTROL_NAME)  # once: a user who deletes it keeps it deleted
        self.host = PipelineHost(base_model, self.store, self.data_dir / "models", warm=warm)
        self.training = TrainingService(self.data_dir, self.host, demo=self.demo, world=self.world)
        self.jobs = self.training.jobs

        # The app's actions under the names the page, the API and scripts call: each is its part's own method.
        self.generate = self.host.generate
        self.condition = self.host.condition
        self.list_adapters = self.host.list_adapters
        self.import_adapter = self.host.import_adapter
        self.export_adapter = self.host.export_adapter
        self.delete_adapter = self.host.delete_adapter
        self.defaults = self.training.defaults
        self.demo_subjects = self.training.demo_subjects
        self.check_photos = self.training.check_photos
        self.request = self.training.request
        self.train = self.training.train
        self.describe = self.training.describe
        self.job_status = self.training.job_status
        self.list_jobs = self.training.list_jobs
        self.cancel = self.training.cancel
        self.resume = self.training.resume
        self.served_file = self.training.served_file

    @property
    def base_model(self) -> str:
        """The base model's hub id or folder (the demo's folder once it is built)."""
        return self.host.base_model

    def close(self) -> None:
        """Stop the queue; a running job is saved and shown as interrupted at the next start."""
        self.training.close()
        self._lock_file.release()
