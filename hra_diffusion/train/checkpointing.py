"""Checkpoints of a training run and exact resume: what is saved (the adapters, the optimizer, the lr schedule, every
process's RNG), when it counts as written (a temp folder renamed at the end) and how a run picks one up.

The file format (pure data: safetensors + JSON, never a pickle) is :mod:`hra_diffusion.checkpoint`; this module knows
the training loop's side of it.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import gather_object
from torch import Tensor, nn

from .. import checkpoint as ckpt
from ..io import atomic_folder, remove_stale_temps
from ..model import hra_layers
from .errors import TrainingError
from .events import Checkpoint as CheckpointEvent
from .events import ProgressFile

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Finding and opening checkpoints


def find_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in ``output_dir``, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if match and (path / ckpt.MANIFEST).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """The checkpoint folder --resume_from_checkpoint names; "latest" with none yet starts fresh (so a UI can always
    pass it)."""
    if not spec:
        return None
    if spec == "latest":
        found = find_checkpoints(output_dir)
        if not found:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
            return None
        return open_checkpoint(found[-1][1]).folder
    path = Path(spec)
    if not path.is_absolute() and not path.exists():
        path = output_dir / path
    if not (path / ckpt.MANIFEST).is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {spec}: {path} is not a checkpoint folder (no {ckpt.MANIFEST}); "
            "pass a checkpoint-N folder or 'latest'"
        )
    return open_checkpoint(path.absolute()).folder


def open_checkpoint(path: Path) -> ckpt.Checkpoint:
    """The checkpoint folder at ``path``, checked before anything is loaded (no pickle, this format, whole files)."""
    with _unusable_checkpoint(path):
        return ckpt.Checkpoint(path)


@contextlib.contextmanager
def _unusable_checkpoint(path: Path):
    """A :class:`~hra_diffusion.checkpoint.CheckpointError` becomes the one-line TrainingError users see."""
    try:
        yield
    except ckpt.CheckpointError as err:
        raise TrainingError(f"cannot resume from {path}: {err}") from err


# --------------------------------------------------------------------------------------------------------------------
# Adapter-only state


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters plus the frozen initial vectors of strictly orthogonal HRA adapters (both needed to
    rebuild the adapter); never the frozen base weights."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for path, layer in hra_layers(model):
        state.update({f"{path}.hra_u0.{name}": u0.detach() for name, u0 in layer.hra_u0.items()})
    return state


def components_state(models: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    """:func:`trainable_state` of several models, keys prefixed by their component name ("unet.", ...)."""
    return {f"{comp}.{key}": value for comp, model in models.items() for key, value in trainable_state(model).items()}


def load_trainable_state(model: nn.Module, state: Mapping[str, Tensor], what: str) -> None:
    expected = trainable_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise TrainingError(
            f"{what} does not match this run's adapters (another --hra_r or targets?): "
            f"{len(missing)} missing, {len(unexpected)} unexpected, e.g. {(missing + unexpected)[:3]}"
        )
    with torch.no_grad():
        for key, target in expected.items():
            if target.shape != state[key].shape:
                raise TrainingError(
                    f"{what}: {key} has shape {tuple(state[key].shape)}, this run needs {tuple(target.shape)}"
                )
            target.copy_(state[key])


def state_digest(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names and float32 bytes: equal digests mean bit-identical parameters."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        digest.update(key.encode())
        digest.update(tensors[key].detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


# --------------------------------------------------------------------------------------------------------------------
# Saving and restoring a run


@dataclass
class RunState:
    """What a checkpoint holds of a run: the trainable models and their parameters by checkpoint name, the optimizer,
    the lr schedule, and the facts that decide whether the data order replays (seed, steps per epoch, ...)."""

    trainable: dict[str, nn.Module]
    params: dict[str, nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    manifest: dict[str, Any]


class Checkpointer:
    """Saves and restores one run's checkpoints; ``last`` is the newest written or resumed from."""

    def __init__(self, accelerator, output_dir: Path, limit: int | None, progress: ProgressFile) -> None:
        self.acc, self.output_dir, self.limit, self.progress = accelerator, output_dir, limit, progress
        self.last: Path | None = None
        if accelerator.is_main_process:  # a run killed mid-save left half-written temp files: never kept
            for path in remove_stale_temps(output_dir):
                logger.info("removed %s, left by a run that was stopped while saving", path)

    def save(self, step: int, run: RunState) -> Path:
        """Write checkpoint-{step} through a temp folder renamed at the end (io.atomic_folder), so a crash never
        leaves a "latest" that is half written; then drop the oldest beyond the limit. Every process hands its RNG
        state to the main process, the only one that writes."""
        final = self.output_dir / f"checkpoint-{step}"
        rng_states = gather_object([ckpt.rng_state()])
        if self.acc.is_main_process:
            optimizer_tensors, optimizer_state = ckpt.optimizer_state(run.optimizer, run.params)
            if self.acc.scaler is not None:
                optimizer_state["grad_scaler"] = ckpt.plain_state(self.acc.scaler)
            rng_tensors, rng_state = ckpt.rng_files(rng_states)
            tensors = {
                ckpt.WEIGHTS: components_state(run.trainable),
                ckpt.OPTIMIZER_TENSORS: optimizer_tensors,
                ckpt.RNG_TENSORS: rng_tensors,
            }
            documents = {
                ckpt.OPTIMIZER_STATE: optimizer_state,
                ckpt.SCHEDULER_STATE: ckpt.plain_state(run.lr_scheduler),
                ckpt.RNG_STATE: rng_state,
            }
            state = {"step": step, **run.manifest}
            atomic_folder(final, lambda tmp: ckpt.write_checkpoint(tmp, state, tensors, documents), replace=True)
            if self.limit:
                for _, old in find_checkpoints(self.output_dir)[: -self.limit]:
                    shutil.rmtree(old, ignore_errors=True)
            self.progress.emit(CheckpointEvent(step=step, path=str(final)))
            logger.info("saved %s", final)
        self.acc.wait_for_everyone()
        self.last = final
        return final

    def restore(self, path: Path, run: RunState) -> int:
        """Restore the adapters, the optimizer (and fp16 grad scaler), the lr schedule and this process's RNG states
        from checkpoint ``path``; returns its step. Warns where the data order cannot replay exactly."""
        with _unusable_checkpoint(path):
            checkpoint = ckpt.Checkpoint(path)
            state = checkpoint.manifest
            if state["seed"] != run.manifest["seed"]:
                logger.warning(
                    "resuming with --seed %s, the checkpoint used %s: data and noise will not replay exactly",
                    run.manifest["seed"],
                    state["seed"],
                )
            if state.get("updates_per_epoch") != run.manifest["updates_per_epoch"]:
                logger.warning(
                    "steps per epoch changed since the checkpoint (batch size, accumulation or processes): "
                    "the data order will not replay exactly"
                )
            weights = checkpoint.tensors(ckpt.WEIGHTS)
            for comp, model in run.trainable.items():
                prefix = f"{comp}."
                sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
                load_trainable_state(model, sub, f"checkpoint {path} ({comp})")
            optimizer_state = checkpoint.document(ckpt.OPTIMIZER_STATE)
            optimizer_tensors = checkpoint.tensors(ckpt.OPTIMIZER_TENSORS)
            ckpt.load_optimizer_state(run.optimizer, run.params, optimizer_tensors, optimizer_state)
            if self.acc.scaler is not None and "grad_scaler" not in optimizer_state:
                logger.warning("the checkpoint was not trained in fp16: the loss scale starts afresh")
            elif self.acc.scaler is not None:
                ckpt.load_plain_state(self.acc.scaler, optimizer_state["grad_scaler"], "the grad scaler")
            scheduler_state = checkpoint.document(ckpt.SCHEDULER_STATE)
            ckpt.load_plain_state(run.lr_scheduler, scheduler_state, ckpt.SCHEDULER_STATE)
            rng_tensors, rng_state = checkpoint.tensors(ckpt.RNG_TENSORS), checkpoint.document(ckpt.RNG_STATE)
            ckpt.load_rng_state(rng_tensors, rng_state, self.acc.process_index)
        logger.info("resumed from %s at step %d", path, state["step"])
        self.last = path
        return state["step"]
