"""Training, as a small package: settings declared once (:mod:`.settings`), one readable loop (:mod:`.loop`),
checkpoints and exact resume (:mod:`.checkpointing`), the progress protocol (:mod:`.events`), the machinery under the
loop (:mod:`.runtime`) and the command-line wrapper (:mod:`.cli`). The trainers in ``training/`` add their data and
models; the diffusion objective is :func:`hra_diffusion.diffusion.denoising_loss`.
"""

from .errors import TrainingError
from .loop import ADAPTER_FILE, TrainResult, TrainSpec, train
from .settings import SettingsError, TrainSettings, read_request, write_request

__all__ = [
    "ADAPTER_FILE",
    "SettingsError",
    "TrainResult",
    "TrainSettings",
    "TrainSpec",
    "TrainingError",
    "read_request",
    "train",
    "write_request",
]
