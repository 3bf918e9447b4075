"""The one training loop every HRA Studio trainer runs: read :func:`train` top to bottom.

A trainer hands over a :class:`TrainSpec` (data, networks, which of them train, the loss); the loop does the rest the
same way for all of them: fp32 adapters on low-precision frozen weights, AdamW and the lr schedule, gradient
accumulation, pure-data checkpoints and exact resume (:mod:`.checkpointing`), a NaN/inf guard, tqdm + tracker +
progress events (:mod:`.events`), SIGTERM/SIGINT as a clean stop, validation images and the final adapter file.

Exact resume rests on three things: accelerate's seedable sampler with ``set_epoch`` + ``skip_first_batches`` replays
the data order (a function of the seed and the step, which the checkpoint records), the dataset's ``set_epoch``
replays its augmentation, and every micro-step reseeds torch from (seed, step, micro-step, rank), so noise and
timesteps are a function of the step alone.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import skip_first_batches
from accelerate.utils import gather_object
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from ..hub import create_hub_repo, push_run
from ..io import ADAPTER_FILE, atomic_write, save_hra
from ..model import orthogonality_loss
from . import events
from .checkpointing import Checkpointer, RunState, components_state, state_digest
from .errors import TrainingError
from .runtime import (
    STOP,
    cast_frozen,
    enable_gradient_checkpointing,
    enable_xformers,
    make_optimizer,
    peak_memory_mib,
    step_seed,
    tracker_value,
    weight_dtype,
)
from .settings import DEFAULT_STEPS, SECRET_FIELDS, TrainSettings, write_request

logger = logging.getLogger(__name__)

SETTINGS_FILE = "training_settings.json"  # a request: `--config` it to train again with the same settings


@dataclass
class TrainSpec:
    """What a trainer brings to :func:`train`.

    models: every network the loss uses, by component name ("unet", "text_encoder", "vae", ...); all are moved to the
        device and their frozen weights cast to the mixed-precision dtype (trainable parameters stay fp32).
    trainable: names of the models that carry trainable parameters; the loss gets them wrapped for DDP.
    loss_fn: ``(batch, models) -> (loss, logs)``; logs are extra floats for the trackers.
    validate: ``(step) -> images``, run on the main process every --validation_steps and at the end.
    save_adapter: writes the result file from the unwrapped trainable models; default: one HRA safetensors file.
    finish: called on the main process after the final adapter and samples are written (model card, grid).
    keep_fp32: frozen models never cast to the mixed-precision dtype (SDXL's VAE, which overflows in fp16).
    """

    dataset: Dataset
    collate_fn: Callable[[list], dict]
    models: dict[str, Any]
    trainable: tuple[str, ...]
    loss_fn: Callable[[dict, dict[str, Any]], tuple[Tensor, dict[str, float]]]
    validate: Callable[[int], list[Image.Image]] | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    save_adapter: Callable[[dict[str, nn.Module], Path, dict[str, Any]], Path] | None = None
    finish: Callable[[TrainResult], None] | None = None
    keep_fp32: tuple[str, ...] = ()


@dataclass
class TrainResult:
    status: str  # "done" or "stopped"
    step: int
    max_steps: int
    adapter: Path | None
    checkpoint: Path | None
    samples: list[Path]


@dataclass
class StepResult:
    loss: float
    orth: float
    lr: float
    logs: dict[str, float]
    stop: bool  # a stop was requested on some process: every process stops after this same step


def train(accelerator, settings: TrainSettings, spec: TrainSpec, progress: events.ProgressFile) -> TrainResult:
    """Resume if asked, train to --max_train_steps or a stop request, save the adapter.

    Returns on every process; files are written by the main process only. A diverged run raises
    :class:`TrainingError` and writes nothing new; a stop request (SIGTERM/SIGINT) saves a checkpoint and the adapter.
    """
    run = _Run(accelerator, settings, spec, progress)  # models, optimizer, data, schedule, trackers; resumed if asked
    status, step = "done", run.start_step
    for step, micro_batches in run.batches():
        result = run.step(step, micro_batches)
        step += 1
        run.log(step, result)
        if result.stop:
            status = "stopped"
            break
        if step % settings.checkpointing_steps == 0 and step < run.max_steps:
            run.checkpoints.save(step, run.state)
        if run.validation_steps and step % run.validation_steps == 0 and step < run.max_steps:
            run.validate(step)
    return run.finish(status, step)


class _Run:
    """One :func:`train` call: its setup in ``__init__``, then the pieces the loop calls."""

    def __init__(self, accelerator, settings: TrainSettings, spec: TrainSpec, progress: events.ProgressFile) -> None:
        self.acc, self.settings, self.spec, self.progress = accelerator, settings, spec, progress
        self.main = accelerator.is_main_process
        self.dtype = weight_dtype(accelerator)
        self.samples: list[Path] = []
        self.validated_at = -1
        self._prepare_models()
        self.repo_id = None
        if settings.push_to_hub and self.main:  # created now: a bad token or no network fails before any step
            self.repo_id = create_hub_repo(settings.hub_model_id or settings.output_path.name, settings.hub_token)

        trainable = {name: spec.models[name] for name in spec.trainable}
        # named as in the checkpoint's trainable.safetensors; the names also key the optimizer state
        params = {f"{comp}.{name}": p for comp, model in trainable.items()
                  for name, p in model.named_parameters() if p.requires_grad}
        if not params:
            raise TrainingError("nothing to train: the trainable models have no parameter with requires_grad")
        self.params = list(params.values())
        self.n_trainable = self._report_sizes()

        lr = settings.learning_rate
        if settings.scale_lr:
            lr *= settings.gradient_accumulation_steps * settings.train_batch_size * accelerator.num_processes
        loader = DataLoader(spec.dataset, batch_size=settings.train_batch_size, shuffle=True,
                            collate_fn=spec.collate_fn, num_workers=settings.dataloader_num_workers)
        optimizer = make_optimizer(settings, self.params, lr)
        *wrapped, optimizer, self.loader = accelerator.prepare(*trainable.values(), optimizer, loader)
        self.wrapped = dict(zip(trainable, wrapped))
        self.run_models = {**spec.models, **self.wrapped}
        self.optimizer = optimizer

        self.micro_per_epoch = len(self.loader)
        if self.micro_per_epoch == 0:
            raise TrainingError("the dataset is empty")
        self.updates_per_epoch = math.ceil(self.micro_per_epoch / settings.gradient_accumulation_steps)
        self.max_steps = (settings.max_train_steps or (settings.num_train_epochs or 0) * self.updates_per_epoch
                          or DEFAULT_STEPS)
        self.validation_steps = (settings.validation_epochs * self.updates_per_epoch if settings.validation_epochs
                                 else settings.validation_steps)
        from diffusers.optimization import get_scheduler  # diffusers costs a second to import: not for --help

        # Not passed to accelerate.prepare (which would step it once per process); checkpoints save it themselves.
        lr_scheduler = get_scheduler(settings.lr_scheduler, optimizer=optimizer.optimizer,
                                     num_warmup_steps=settings.lr_warmup_steps, num_training_steps=self.max_steps,
                                     num_cycles=settings.lr_num_cycles, power=settings.lr_power)
        self.lr_scheduler = lr_scheduler
        self.state = RunState(trainable, params, optimizer.optimizer, lr_scheduler, manifest={
            "seed": settings.seed,
            "updates_per_epoch": self.updates_per_epoch,
            "num_processes": accelerator.num_processes,
            "train_batch_size": settings.train_batch_size,
            "gradient_accumulation_steps": settings.gradient_accumulation_steps,
        })
        if self.main:
            write_request(settings, settings.output_path / SETTINGS_FILE)  # what this run trains with, resolved
            config = {k: tracker_value(v) for k, v in vars(settings).items() if k not in SECRET_FIELDS}
            accelerator.init_trackers(settings.tracker_project_name,
                                      config={**config, "max_train_steps": self.max_steps,
                                              "weight_dtype": str(self.dtype)})

        self.checkpoints = Checkpointer(accelerator, settings.output_path, settings.checkpoints_total_limit, progress)
        resume = settings.resume_from_checkpoint  # resolved to a folder (or None) by make_accelerator
        self.resumed = bool(resume)
        self.start_step = self.checkpoints.restore(Path(resume), self.state) if resume else 0
        progress.emit(events.Start(max_steps=self.max_steps, trainable_params=self.n_trainable))
        for model in trainable.values():
            model.train()
        self.bar = tqdm(total=self.max_steps, initial=self.start_step, desc="steps", disable=not self.main,
                        dynamic_ncols=True)
        self.pace = events.Pace(self.start_step)

    def _prepare_models(self) -> None:
        """To the device, frozen weights to the mixed-precision dtype, memory options."""
        settings, spec = self.settings, self.spec
        for name, model in spec.models.items():
            if isinstance(model, nn.Module):
                model.to(self.acc.device)
                cast_frozen(model, torch.float32 if name in spec.keep_fp32 else self.dtype)
        if settings.gradient_checkpointing:
            for name in spec.trainable:
                enable_gradient_checkpointing(spec.models[name])
        if settings.enable_xformers_memory_efficient_attention:
            for model in spec.models.values():
                if hasattr(model, "enable_xformers_memory_efficient_attention"):  # diffusers models
                    enable_xformers(model)

    def _report_sizes(self) -> int:
        n_trainable = sum(p.numel() for p in self.params)
        n_total = sum(p.numel() for m in self.spec.models.values() if isinstance(m, nn.Module) for p in m.parameters())
        logger.info("trainable parameters: %s (%.4f%% of %s)", f"{n_trainable:,}", 100 * n_trainable / n_total,
                    f"{n_total:,}")
        if self.main:
            print(f"trainable parameters: {n_trainable:,}", flush=True)
        return n_trainable

    # -- the data -----------------------------------------------------------------------------------------------------

    def batches(self) -> Iterator[tuple[int, list[dict]]]:
        """(step, its micro-batches) from the start step on; a resumed run continues mid-epoch where it stopped. A
        group is short at an epoch's end (the loss divides by the group's own size)."""
        acc_steps, step = self.settings.gradient_accumulation_steps, self.start_step
        epoch = step // self.updates_per_epoch
        while step < self.max_steps:
            self.loader.set_epoch(epoch)  # the sampler's permutation for this epoch
            if hasattr(self.spec.dataset, "set_epoch"):  # its augmentation (accelerate skips this under DDP)
                self.spec.dataset.set_epoch(epoch)
            first = (step - epoch * self.updates_per_epoch) * acc_steps
            loader = iter(skip_first_batches(self.loader, first) if first else self.loader)
            for micro in range(first, self.micro_per_epoch, acc_steps):
                if step >= self.max_steps:
                    return
                group = min(acc_steps, self.micro_per_epoch - micro)
                yield step, list(itertools.islice(loader, group))
                step += 1
            epoch += 1

    # -- one optimizer step -------------------------------------------------------------------------------------------

    def step(self, step: int, micro_batches: list[dict]) -> StepResult:
        """Forward/backward every micro-batch (DDP syncs on the last only), clip, update, or stop on a NaN/inf."""
        acc, settings, group = self.acc, self.settings, len(micro_batches)
        loss_sum, orth_sum, logs = 0.0, 0.0, {}
        for i, batch in enumerate(micro_batches):
            torch.manual_seed(step_seed(settings.seed, step, i, acc.process_index))
            with contextlib.ExitStack() as stack:
                if i < group - 1:
                    for model in self.wrapped.values():
                        stack.enter_context(acc.no_sync(model))
                loss, extra = self.spec.loss_fn(batch, self.run_models)
                orth = sum((orthogonality_loss(m) for m in self.state.trainable.values()),
                           torch.zeros((), device=acc.device))
                acc.backward((loss + orth) / group)
            loss_sum += loss.detach().float().item() / group
            orth_sum += orth.detach().float().item() / group
            for key, value in extra.items():
                logs[key] = logs.get(key, 0.0) + value / group

        grad_norm = self._grad_norm()
        flags = torch.tensor([loss_sum, orth_sum, grad_norm, float(STOP.requested)], device=acc.device)
        flags = acc.reduce(flags, reduction="sum")
        loss, orth = (flags[:2] / acc.num_processes).tolist()
        lr = self.lr_scheduler.get_last_lr()[0]  # the rate this step uses
        if not (math.isfinite(loss) and math.isfinite(orth)):
            self._diverged(step + 1, f"the loss is {loss} (orthogonality term {orth})", lr)
        if not math.isfinite(flags[2].item()) and self.dtype != torch.float16:  # fp16's scaler skips such steps
            self._diverged(step + 1, f"the gradient norm is {flags[2].item()}", lr)
        self.optimizer.step()
        # an update can overflow even from finite gradients (a huge lr): never keep such parameters
        if not torch.stack([p.isfinite().all() for p in self.params]).all():
            self._diverged(step + 1, "the update overflowed the trainable parameters", lr)
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(loss, orth, lr, logs, stop=flags[3].item() > 0)

    def _grad_norm(self) -> float:
        """Clip (when --max_grad_norm) and return the total gradient norm, the divergence signal."""
        if self.settings.max_grad_norm and self.settings.max_grad_norm > 0:
            return float(self.acc.clip_grad_norm_(self.params, self.settings.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in self.params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _diverged(self, step: int, problem: str, lr: float) -> None:
        """Stop without saving: a run that diverged needs a lower learning rate, not more steps from here."""
        last = self.checkpoints.last
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        self.bar.close()
        self.acc.end_training()
        raise TrainingError(
            f"training diverged at step {step}: {problem} (lr {lr:.3g}). Nothing was saved from this step; {where}. "
            "Lower --learning_rate (or use --mixed_precision bf16 instead of fp16) and resume from that checkpoint."
        )

    # -- watching -----------------------------------------------------------------------------------------------------

    def log(self, step: int, result: StepResult) -> None:
        elapsed, eta = self.pace.update(step, self.max_steps)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{result.loss:.4f}", orth=f"{result.orth:.3g}", lr=f"{result.lr:.2e}")
        self.acc.log({"loss": result.loss, "orth": result.orth, "lr": result.lr, **result.logs}, step=step)
        self.progress.emit(events.Step(step=step, max_steps=self.max_steps, loss=result.loss, orth=result.orth,
                                       lr=result.lr, elapsed_s=round(elapsed, 3), eta_s=round(eta, 3)))

    def validate(self, step: int) -> None:
        """Main process: sample images, save them under validation/step-{step}/, log them."""
        if self.spec.validate is None or not self.main or self.validated_at == step:
            return
        self.validated_at = step
        trainable = self.state.trainable.values()
        for model in trainable:
            model.eval()
        autocast = torch.autocast(self.acc.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.no_grad(), autocast:
            images = self.spec.validate(step)
        for model in trainable:
            model.train()
        folder = self.settings.output_path / "validation" / f"step-{step}"
        paths = [atomic_write(folder / f"{i:02d}.png", lambda tmp, im=im: im.save(tmp, format="PNG"))
                 for i, im in enumerate(images)]
        self.samples = [p.absolute() for p in paths]
        self._log_images(images, step)
        self.progress.emit(events.Validation(step=step, images=[str(p) for p in self.samples]))

    def _log_images(self, images: list[Image.Image], step: int) -> None:
        import numpy as np

        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                stacked = np.stack([np.asarray(im.convert("RGB")) for im in images])
                tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=f"{i}") for i, im in enumerate(images)]}, step=step)

    # -- the end ------------------------------------------------------------------------------------------------------

    def finish(self, status: str, step: int) -> TrainResult:
        """Check the processes agree, save the adapter (and a checkpoint of the last step), sample, write the card."""
        self.train_s = time.monotonic() - self.pace.t0  # the steps, with the checkpoints and samples between them
        self.bar.close()
        self._check_ranks_agree()
        adapter = None
        if step > self.start_step or self.resumed:
            adapter = self._save_adapter(step)
            last = self.checkpoints.last
            if last is None or last.name != f"checkpoint-{step}":
                self.checkpoints.save(step, self.state)
        if status == "done":
            self.validate(step)
        self.acc.wait_for_everyone()
        self.acc.end_training()
        result = TrainResult(status, step, self.max_steps, adapter, self.checkpoints.last, self.samples)
        if self.main:
            if status == "done" and self.spec.finish is not None:
                self.spec.finish(result)
            self.progress.emit(events.Resources(train_s=round(self.train_s, 3), peak_memory_mib=peak_memory_mib()))
            end = events.Done if status == "done" else events.Stopped
            self.progress.emit(end(step=step, adapter=str(adapter) if adapter else None))
            logger.info("%s at step %d: %s", status, step, adapter)
            if status == "done" and self.repo_id is not None:
                pushed = push_run(self.settings.output_path, self.repo_id, self.settings.hub_token)
                logger.info("pushed to the Hub: %s", pushed)
        return result

    def _save_adapter(self, step: int) -> Path | None:
        if not self.main:
            return None
        meta = {**self.spec.metadata, "steps": step, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = self.settings.output_path / ADAPTER_FILE
        save = self.spec.save_adapter or (lambda models, p, m: save_hra(models, p, metadata=m))
        return Path(save(self.state.trainable, path, meta)).absolute()

    def _check_ranks_agree(self) -> None:
        """All processes must hold bit-identical adapters (DDP averages gradients); a mismatch means a bug, so the
        digests are compared and printed rather than trusted."""
        if self.acc.num_processes == 1:
            return
        digests = gather_object([state_digest(components_state(self.state.trainable))])
        if self.main:
            print(f"trainable state sha256 per process: {' '.join(digests)}", flush=True)
        if len(set(digests)) != 1:
            raise TrainingError(f"processes ended with different adapters ({digests}); please report this bug")
