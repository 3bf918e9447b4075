"""The one training loop shared by every HRA Studio trainer (DreamBooth, controllable generation).

A trainer gives :func:`train` a dataset, a collate function, its networks, the names of those that carry trainable
parameters, and ``loss_fn(batch, models) -> (loss, logs)``; this module does the rest the same way for all of them:
accelerate setup, fp32 adapters on low-precision frozen weights, the optimizer and lr schedule, gradient
accumulation, pure-data checkpoints (:mod:`.checkpoint`: the adapters, never the frozen model, and never a pickle),
exact resume, a NaN/inf guard, tqdm + tracker + JSON-lines progress, SIGTERM/SIGINT as a clean stop, validation
images and the final adapter file.

Exact resume rests on three things: accelerate's seedable sampler with ``set_epoch`` + ``skip_first_batches`` replays
the data order (a function of the seed and the step, which the checkpoint records), the dataset's ``set_epoch``
replays its augmentation, and every micro-step reseeds torch from (seed, step, micro-step, rank), so noise and
timesteps are a function of the step alone. The optimizer, the lr schedule and the RNG states are restored on top.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator, PartialState, skip_first_batches
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    broadcast_object_list,
    gather_object,
    set_seed,
)
from diffusers.optimization import get_scheduler
from PIL import Image
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from . import checkpoint as ckpt
from .checkpoint import MANIFEST as CHECKPOINT_STATE
from .checkpoint import WEIGHTS as CHECKPOINT_WEIGHTS
from .config import HRAConfig
from .diffusion import UnsupportedModelError
from .hub import HubError, create_hub_repo, push_run
from .images import ImageError
from .io import AdapterFileError, AdapterMismatchError, atomic_write, save_hra
from .model import hra_layers, orthogonality_loss
from .pipelines import ModelNotFoundError

logger = logging.getLogger(__name__)

ADAPTER_FILE = "hra_adapter.safetensors"
DEFAULT_STEPS = 500
DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


class TrainingError(RuntimeError):
    """A problem the user can fix (bad flag, missing package, diverged run); shown as one line, no traceback."""


USER_ERRORS = (
    TrainingError,
    ModelNotFoundError,
    UnsupportedModelError,
    ImageError,
    AdapterFileError,
    AdapterMismatchError,
    HubError,
)


# --------------------------------------------------------------------------------------------------------------------
# Command line: the flags every trainer shares (diffusers' names)


def add_training_args(parser: argparse.ArgumentParser, *, default_output_dir: str) -> None:
    """Model, HRA, optimization, checkpoint, validation and logging flags, named as in diffusers' scripts."""
    g = parser.add_argument_group("base model")
    g.add_argument("--pretrained_model_name_or_path", required=True, help="hub id or local diffusers folder")
    g.add_argument("--revision", default=None, help="hub revision of the base model")
    g.add_argument("--variant", default=None, help="weights variant of the base model, e.g. fp16")

    g = parser.add_argument_group("HRA adapter")
    g.add_argument("--hra_r", type=int, default=8, help="reflections per layer (even: starts exactly at the base)")
    g.add_argument("--hra_apply_GS", action="store_true", help="strictly orthogonal reflection planes")
    g.add_argument("--hra_lambda", type=float, default=0.0, help="weight of the orthogonality regularizer")
    g.add_argument(
        "--hra_target_modules",
        default="to_q,to_k,to_v,to_out.0",
        help="comma-separated module-name suffixes, or one regex matched in full against module paths",
    )

    g = parser.add_argument_group("optimization")
    g.add_argument("--seed", type=int, default=None, help="seed for full determinism (random and logged if unset)")
    g.add_argument("--train_batch_size", type=int, default=1, help="batch size per device")
    g.add_argument(
        "--max_train_steps",
        type=int,
        default=None,
        help=f"optimizer steps (default {DEFAULT_STEPS}, or --num_train_epochs worth)",
    )
    g.add_argument("--num_train_epochs", type=int, default=None, help="epochs, used when --max_train_steps is unset")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--gradient_checkpointing", action="store_true", help="trade compute for activation memory")
    g.add_argument("--learning_rate", type=float, default=1e-4)
    g.add_argument("--scale_lr", action="store_true", help="multiply lr by batch size x accumulation x processes")
    g.add_argument("--lr_scheduler", default="constant", choices=LR_SCHEDULERS)
    g.add_argument("--lr_warmup_steps", type=int, default=0)
    g.add_argument("--lr_num_cycles", type=int, default=1, help="restarts of cosine_with_restarts")
    g.add_argument("--lr_power", type=float, default=1.0, help="power of the polynomial schedule")
    g.add_argument("--use_8bit_adam", action="store_true", help="bitsandbytes' AdamW8bit")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=1e-2)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    g.add_argument(
        "--mixed_precision",
        default=None,
        choices=("no", "fp16", "bf16"),
        help="dtype of the frozen weights and autocast; adapters stay fp32 (default: accelerate config)",
    )
    g.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls on Ampere+ GPUs")
    g.add_argument(
        "--enable_xformers_memory_efficient_attention",
        action="store_true",
        help="xformers attention (needs the xformers package; torch's SDPA, the default, is about as fast)",
    )
    g.add_argument("--dataloader_num_workers", type=int, default=0)

    g = parser.add_argument_group("output and checkpoints")
    g.add_argument("--output_dir", default=default_output_dir)
    g.add_argument("--checkpointing_steps", type=int, default=500, help="save a resumable checkpoint every N steps")
    g.add_argument("--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints")
    g.add_argument("--resume_from_checkpoint", default=None, help='a checkpoint folder, or "latest"')

    g = parser.add_argument_group("validation")
    g.add_argument("--validation_prompt", default=None, help="prompt of the sample images (default: instance prompt)")
    g.add_argument("--num_validation_images", type=int, default=4, help="0 disables samples")
    g.add_argument("--validation_steps", type=int, default=100, help="sample every N steps (and at the end)")
    g.add_argument("--validation_epochs", type=int, default=None, help="sample every N epochs instead")
    g.add_argument("--num_validation_inference_steps", type=int, default=25)

    g = parser.add_argument_group("logging")
    g.add_argument("--report_to", default="tensorboard", choices=("tensorboard", "wandb", "all", "none"))
    g.add_argument("--logging_dir", default="logs", help="tracker folder, relative to --output_dir")
    g.add_argument("--progress_file", default=None, help="append JSON-lines progress events here (for UIs)")

    g = parser.add_argument_group("hugging face hub")
    g.add_argument("--push_to_hub", action="store_true", help="upload the finished run (adapter, card, samples)")
    g.add_argument("--hub_model_id", default=None, help="repo to push to (default: the --output_dir folder name)")
    g.add_argument("--hub_token", default=None, help="token (prefer `hf auth login`: flags end up in shell history)")


def target_modules(spec: str) -> tuple[str, ...] | str:
    """--hra_target_modules: a regex if it has regex syntax beyond dots, else a comma list of suffixes."""
    if re.search(r"[*+?|()\[\]^$\\{}]", spec):
        try:
            re.compile(spec)
        except re.error as err:
            raise TrainingError(f"--hra_target_modules {spec!r} is not a valid regex: {err}") from err
        return spec
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if not names:
        raise TrainingError("--hra_target_modules is empty")
    return names


def hra_config_from_args(args: argparse.Namespace, targets: tuple[str, ...] | str | None = None) -> HRAConfig:
    """The adapter the --hra_* flags ask for; ``targets`` replaces --hra_target_modules (the text encoder's)."""
    try:
        return HRAConfig(
            r=args.hra_r,
            apply_GS=args.hra_apply_GS,
            lambda_orth=args.hra_lambda,
            target_modules=targets or target_modules(args.hra_target_modules),
        )
    except ValueError as err:
        raise TrainingError(f"--hra_* flags: {err}") from err


def run_metadata(
    args: argparse.Namespace, cfg: TrainConfig, accelerator, prediction_type: str, trainer: str, **specific: Any
) -> dict[str, Any]:
    """What every trainer records in the adapter file's metadata, with the trainer's own ``specific`` fields."""
    return {
        "base_model": args.pretrained_model_name_or_path,
        **specific,
        "resolution": args.resolution,
        "learning_rate": cfg.learning_rate,
        "lr_scheduler": cfg.lr_scheduler,
        "train_batch_size": cfg.train_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "hra_r": args.hra_r,
        "hra_apply_GS": args.hra_apply_GS,
        "hra_lambda": args.hra_lambda,
        "hra_target_modules": args.hra_target_modules,
        "prediction_type": prediction_type,
        "seed": cfg.seed,
        "mixed_precision": accelerator.mixed_precision,
        "trainer": f"hra-studio {trainer}",
    }


@dataclass
class TrainConfig:
    """The loop's settings; :meth:`from_args` picks them from the parsed flags by name."""

    output_dir: Path
    seed: int | None = None
    train_batch_size: int = 1
    max_train_steps: int | None = None
    num_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    learning_rate: float = 1e-4
    scale_lr: bool = False
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    lr_num_cycles: int = 1
    lr_power: float = 1.0
    use_8bit_adam: bool = False
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    mixed_precision: str | None = None
    allow_tf32: bool = False
    enable_xformers_memory_efficient_attention: bool = False
    dataloader_num_workers: int = 0
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    validation_steps: int | None = 100
    validation_epochs: int | None = None
    report_to: str = "tensorboard"
    logging_dir: str = "logs"
    tracker_project_name: str = "hra-studio"
    push_to_hub: bool = False
    hub_model_id: str | None = None
    hub_token: str | None = None

    def __post_init__(self) -> None:
        self.output_dir = Path(self.output_dir).absolute()
        positive = ("train_batch_size", "gradient_accumulation_steps", "checkpointing_steps")
        for name in positive + ("max_train_steps", "num_train_epochs", "checkpoints_total_limit", "validation_epochs"):
            value = getattr(self, name)
            if (value is not None or name in positive) and value < 1:
                raise TrainingError(f"--{name} must be >= 1, got {value}")
        if self.learning_rate <= 0:
            raise TrainingError(f"--learning_rate must be > 0, got {self.learning_rate}")

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides: Any) -> TrainConfig:
        values = {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}
        return cls(**{**values, **overrides})


# --------------------------------------------------------------------------------------------------------------------
# Progress file, stop requests, the CLI wrapper


def is_main_rank() -> bool:
    """Rank 0 of a launch (usable before accelerate is set up: torchrun sets RANK, a single process has none)."""
    return os.environ.get("RANK", "0") in ("", "0")


class ProgressFile:
    """JSON-lines events for UIs, one line per event, flushed at once; written by the main process only."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path).absolute() if path and is_main_rank() else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: str, **values: Any) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(json.dumps({"event": event, **values}) + "\n")
            fh.flush()


class StopRequest:
    """SIGTERM / SIGINT (a UI's Stop button, Ctrl-C) only set a flag; the loop stops cleanly after the current step."""

    def __init__(self) -> None:
        self.requested = False

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum: int, frame: Any) -> None:
        if not self.requested:
            print(f"\n{signal.Signals(signum).name}: stopping after the current step", file=sys.stderr, flush=True)
        self.requested = True


STOP = StopRequest()


def stop_agreed(accelerator: Accelerator) -> bool:
    """Whether any process was asked to stop; the same answer on all of them (a collective call)."""
    flag = torch.tensor([float(STOP.requested)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)


def run_cli(run: Callable[[argparse.Namespace, ProgressFile], int], args: argparse.Namespace) -> int:
    """Run a trainer's ``run(args, progress)``: user errors become one line on stderr, an "error" event and exit 1."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_rank() else logging.WARNING,
    )
    progress = ProgressFile(getattr(args, "progress_file", None))
    STOP.install()
    try:
        return run(args, progress)
    except USER_ERRORS as err:
        progress.emit("error", message=str(err))
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:
        progress.emit("error", message=f"{type(err).__name__}: {err}")
        raise


# --------------------------------------------------------------------------------------------------------------------
# Setup


def find_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, folder) of the complete checkpoints in ``output_dir``, oldest first."""
    found = []
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            match = re.fullmatch(r"checkpoint-(\d+)", path.name)
            if match and (path / CHECKPOINT_STATE).is_file():
                found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(cfg: TrainConfig) -> Path | None:
    """The checkpoint folder to resume from; "latest" with none yet starts fresh (so a UI can always pass it)."""
    if not cfg.resume_from_checkpoint:
        return None
    if cfg.resume_from_checkpoint == "latest":
        found = find_checkpoints(cfg.output_dir)
        if not found:
            logger.info("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", cfg.output_dir)
            return None
        return open_checkpoint(found[-1][1]).folder
    path = Path(cfg.resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = cfg.output_dir / path
    if not (path / CHECKPOINT_STATE).is_file():
        raise TrainingError(
            f"--resume_from_checkpoint {cfg.resume_from_checkpoint}: {path} is not a checkpoint "
            f"folder (no {CHECKPOINT_STATE}); pass a checkpoint-N folder or 'latest'"
        )
    return open_checkpoint(path.absolute()).folder


def open_checkpoint(path: Path) -> ckpt.Checkpoint:
    """The checkpoint folder at ``path``, checked before anything is loaded (no pickle, this format, whole files)."""
    with _unusable_checkpoint(path):
        return ckpt.Checkpoint(path)


@contextlib.contextmanager
def _unusable_checkpoint(path: Path):
    """A :class:`~.checkpoint.CheckpointError` becomes the one-line TrainingError users see, naming the folder."""
    try:
        yield
    except ckpt.CheckpointError as err:
        raise TrainingError(f"cannot resume from {path}: {err}") from err


def make_accelerator(cfg: TrainConfig) -> Accelerator:
    """Check what can fail early, agree on a seed across processes, create the Accelerator and seed everything.

    Sets ``cfg.seed`` (from the checkpoint being resumed, or drawn at random, when not given) and resolves
    ``cfg.resume_from_checkpoint`` to a folder (or None).
    """
    if cfg.use_8bit_adam:
        _adamw8bit()
    resume = resolve_resume(cfg)
    cfg.resume_from_checkpoint = str(resume) if resume else None
    # A multi-process launch (accelerate launch --multi_gpu, torchrun) on a machine without CUDA: accelerate would run
    # N independent single-process copies that all write the same files; train over gloo on the CPU instead.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if cfg.seed is None:
        stored = open_checkpoint(resume).manifest["seed"] if resume else None
        seed = [stored if stored is not None else int.from_bytes(os.urandom(4), "little") >> 1]
        if state.num_processes > 1:
            broadcast_object_list(seed)
        cfg.seed = seed[0]
        logger.info("seed: %d", cfg.seed)
    log_with = None if cfg.report_to == "none" else cfg.report_to
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=cfg.mixed_precision,
            log_with=log_with,
            project_config=ProjectConfiguration(
                project_dir=str(cfg.output_dir), logging_dir=str(cfg.output_dir / cfg.logging_dir)
            ),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=cfg.seed),
        )
    except (ValueError, ImportError) as err:
        raise TrainingError(f"cannot set up training ({err})") from err
    if cfg.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(cfg.seed)
    if accelerator.is_main_process:
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
    return accelerator


def weight_dtype(accelerator) -> torch.dtype:
    return DTYPES[accelerator.mixed_precision]


# --------------------------------------------------------------------------------------------------------------------
# Adapter-only state: what checkpoints hold


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """The trainable parameters plus the frozen initial vectors of strictly orthogonal HRA adapters (both needed to
    rebuild the adapter); never the frozen base weights."""
    state = {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}
    for path, layer in hra_layers(model):
        state.update({f"{path}.hra_u0.{name}": u0.detach() for name, u0 in layer.hra_u0.items()})
    return state


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


def _component_state(models: Mapping[str, nn.Module]) -> dict[str, Tensor]:
    return {f"{comp}.{key}": value for comp, model in models.items() for key, value in trainable_state(model).items()}


# --------------------------------------------------------------------------------------------------------------------
# The loop


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
    tracker_config: dict[str, Any] = field(default_factory=dict)
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


def _cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
    """Frozen floating weights to ``dtype``; trainable parameters and HRA's initial vectors stay float32."""
    keep = {id(p) for p in model.parameters() if p.requires_grad}
    keep |= {id(p) for _, layer in hra_layers(model) for p in layer.hra_u0.values()}
    with torch.no_grad():
        for p in model.parameters():
            if id(p) not in keep and p.is_floating_point():
                p.data = p.data.to(dtype)
        for module in model.modules():
            for name, buf in module.named_buffers(recurse=False):
                if buf.is_floating_point():
                    setattr(module, name, buf.to(dtype))


def _enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers models (non-reentrant by default)
        model.enable_gradient_checkpointing()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers: reentrant would drop the adapters' grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TrainingError(f"--gradient_checkpointing: {type(model).__name__} does not support it")


def _enable_xformers(model: nn.Module) -> None:
    try:
        model.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as err:
        raise TrainingError(
            f"--enable_xformers_memory_efficient_attention: {err}. Install xformers for your torch and CUDA "
            "(pip install xformers), or leave the flag out: torch's scaled-dot-product attention is used by default."
        ) from err


def _adamw8bit():
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise TrainingError(
            "--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
            "(CUDA GPUs only), or drop the flag (HRA's optimizer state is tiny anyway)"
        ) from err
    return bnb.optim.AdamW8bit


def _optimizer(cfg: TrainConfig, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    cls = _adamw8bit() if cfg.use_8bit_adam else torch.optim.AdamW
    return cls(
        params, lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.adam_weight_decay, eps=cfg.adam_epsilon
    )


def _step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{micro}:{rank}".encode()).digest()[:8], "little") >> 1


def _tracker_value(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


class _Loop:
    """State of one :func:`train` call; its methods are the pieces of the loop."""

    def __init__(self, accelerator, cfg: TrainConfig, spec: TrainSpec, progress: ProgressFile) -> None:
        self.acc, self.cfg, self.spec, self.progress = accelerator, cfg, spec, progress
        self.main = accelerator.is_main_process
        self.dtype = weight_dtype(accelerator)
        self.trainable = {name: spec.models[name] for name in spec.trainable}
        self.samples: list[Path] = []
        self.last_checkpoint: Path | None = None
        self.validated_at = -1

    # -- checkpoints --------------------------------------------------------------------------------------------------

    def save_checkpoint(self, step: int) -> Path:
        """Write checkpoint-{step} into a temp folder renamed at the end, so a crash never leaves a "latest" that is
        half written; then drop the oldest beyond --checkpoints_total_limit. Every process hands its RNG state to the
        main process, the only one that writes."""
        out = self.cfg.output_dir
        final, tmp = out / f"checkpoint-{step}", out / f".checkpoint-{step}.tmp"
        rng_states = gather_object([ckpt.rng_state()])
        if self.main:
            if tmp.exists():
                shutil.rmtree(tmp)
            optimizer_tensors, optimizer_state = ckpt.optimizer_state(self.optimizer, self.params)
            if self.acc.scaler is not None:
                optimizer_state["grad_scaler"] = ckpt.plain_state(self.acc.scaler)
            rng_tensors, rng_state = ckpt.rng_files(rng_states)
            state = {
                "step": step,
                "seed": self.cfg.seed,
                "updates_per_epoch": self.updates_per_epoch,
                "num_processes": self.acc.num_processes,
                "train_batch_size": self.cfg.train_batch_size,
                "gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
            }
            ckpt.write_checkpoint(
                tmp,
                state,
                tensors={
                    CHECKPOINT_WEIGHTS: _component_state(self.trainable),
                    ckpt.OPTIMIZER_TENSORS: optimizer_tensors,
                    ckpt.RNG_TENSORS: rng_tensors,
                },
                documents={
                    ckpt.OPTIMIZER_STATE: optimizer_state,
                    ckpt.SCHEDULER_STATE: ckpt.plain_state(self.lr_scheduler),
                    ckpt.RNG_STATE: rng_state,
                },
            )
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            limit = self.cfg.checkpoints_total_limit
            if limit:
                for _, old in find_checkpoints(out)[:-limit]:
                    shutil.rmtree(old, ignore_errors=True)
            self.progress.emit("checkpoint", step=step, path=str(final))
            logger.info("saved %s", final)
        self.acc.wait_for_everyone()
        self.last_checkpoint = final
        return final

    def resume(self, path: Path) -> int:
        """Restore the adapters, the optimizer (and fp16 grad scaler), the lr schedule and this process's RNG states
        from checkpoint ``path``; returns its step."""
        with _unusable_checkpoint(path):
            checkpoint = ckpt.Checkpoint(path)
            state = checkpoint.manifest
            if state["seed"] != self.cfg.seed:
                logger.warning(
                    "resuming with --seed %s, the checkpoint used %s: data and noise will not replay exactly",
                    self.cfg.seed,
                    state["seed"],
                )
            if state.get("updates_per_epoch") != self.updates_per_epoch:
                logger.warning(
                    "steps per epoch changed since the checkpoint (batch size, accumulation or processes): "
                    "the data order will not replay exactly"
                )
            weights = checkpoint.tensors(CHECKPOINT_WEIGHTS)
            for comp, model in self.trainable.items():
                prefix = f"{comp}."
                sub = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
                load_trainable_state(model, sub, f"checkpoint {path} ({comp})")
            optimizer_state = checkpoint.document(ckpt.OPTIMIZER_STATE)
            optimizer_tensors = checkpoint.tensors(ckpt.OPTIMIZER_TENSORS)
            ckpt.load_optimizer_state(self.optimizer, self.params, optimizer_tensors, optimizer_state)
            if self.acc.scaler is not None and "grad_scaler" not in optimizer_state:
                logger.warning("the checkpoint was not trained in fp16: the loss scale starts afresh")
            elif self.acc.scaler is not None:
                ckpt.load_plain_state(self.acc.scaler, optimizer_state["grad_scaler"], "the grad scaler")
            scheduler_state = checkpoint.document(ckpt.SCHEDULER_STATE)
            ckpt.load_plain_state(self.lr_scheduler, scheduler_state, ckpt.SCHEDULER_STATE)
            rng_tensors, rng_state = checkpoint.tensors(ckpt.RNG_TENSORS), checkpoint.document(ckpt.RNG_STATE)
            ckpt.load_rng_state(rng_tensors, rng_state, self.acc.process_index)
        logger.info("resumed from %s at step %d", path, state["step"])
        self.last_checkpoint = path
        return state["step"]

    # -- samples ------------------------------------------------------------------------------------------------------

    def validate(self, step: int) -> None:
        """Main process: sample images, save them under validation/step-{step}/, log them."""
        if self.spec.validate is None or not self.main or self.validated_at == step:
            return
        self.validated_at = step
        for model in self.trainable.values():
            model.eval()
        autocast = torch.autocast(self.acc.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32)
        with torch.no_grad(), autocast:
            images = self.spec.validate(step)
        for model in self.trainable.values():
            model.train()
        folder = self.cfg.output_dir / "validation" / f"step-{step}"
        paths = [
            atomic_write(folder / f"{i:02d}.png", lambda tmp, im=im: im.save(tmp, format="PNG"))
            for i, im in enumerate(images)
        ]
        self.samples = [p.absolute() for p in paths]
        self._log_images(images, step)
        self.progress.emit("validation", step=step, images=[str(p) for p in self.samples])

    def _log_images(self, images: list[Image.Image], step: int) -> None:
        import numpy as np

        for tracker in self.acc.trackers:
            if tracker.name == "tensorboard":
                stacked = np.stack([np.asarray(im.convert("RGB")) for im in images])
                tracker.writer.add_images("validation", stacked, step, dataformats="NHWC")
            elif tracker.name == "wandb":
                import wandb

                tracker.log({"validation": [wandb.Image(im, caption=f"{i}") for i, im in enumerate(images)]}, step=step)

    # -- the final file -----------------------------------------------------------------------------------------------

    def save_adapter(self, step: int) -> Path | None:
        if not self.main:
            return None
        meta = {**self.spec.metadata, "steps": step, "date": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        path = self.cfg.output_dir / ADAPTER_FILE
        save = self.spec.save_adapter or (lambda models, p, m: save_hra(models, p, metadata=m))
        return Path(save(self.trainable, path, meta)).absolute()

    def check_ranks_agree(self) -> None:
        """All processes must hold bit-identical adapters (DDP averages gradients); a mismatch means a bug, so the
        digests are compared and printed rather than trusted."""
        if self.acc.num_processes == 1:
            return
        digests = gather_object([state_digest(_component_state(self.trainable))])
        if self.main:
            print(f"trainable state sha256 per process: {' '.join(digests)}", flush=True)
        if len(set(digests)) != 1:
            raise TrainingError(f"processes ended with different adapters ({digests}); please report this bug")

    # -- the loop -----------------------------------------------------------------------------------------------------

    def run(self) -> TrainResult:
        acc, cfg, spec = self.acc, self.cfg, self.spec
        for name, model in spec.models.items():
            if isinstance(model, nn.Module):
                model.to(acc.device)
                _cast_frozen(model, torch.float32 if name in spec.keep_fp32 else self.dtype)
        if cfg.gradient_checkpointing:
            for model in self.trainable.values():
                _enable_gradient_checkpointing(model)
        if cfg.enable_xformers_memory_efficient_attention:
            for model in spec.models.values():
                if hasattr(model, "enable_xformers_memory_efficient_attention"):  # diffusers models
                    _enable_xformers(model)
        repo_id = None
        if cfg.push_to_hub and self.main:  # created now: a bad token or no network fails before any step
            repo_id = create_hub_repo(cfg.hub_model_id or cfg.output_dir.name, cfg.hub_token)
        # named as in the checkpoint's trainable.safetensors; the names also key the optimizer state
        self.params = {
            f"{comp}.{name}": p
            for comp, model in self.trainable.items()
            for name, p in model.named_parameters()
            if p.requires_grad
        }
        params = list(self.params.values())
        if not params:
            raise TrainingError("nothing to train: the trainable models have no parameter with requires_grad")
        n_trainable = sum(p.numel() for p in params)
        n_total = sum(p.numel() for m in spec.models.values() if isinstance(m, nn.Module) for p in m.parameters())
        logger.info(
            "trainable parameters: %s (%.4f%% of %s)", f"{n_trainable:,}", 100 * n_trainable / n_total, f"{n_total:,}"
        )
        if acc.is_main_process:
            print(f"trainable parameters: {n_trainable:,}", flush=True)

        lr = cfg.learning_rate
        if cfg.scale_lr:
            lr *= cfg.gradient_accumulation_steps * cfg.train_batch_size * acc.num_processes
        optimizer = _optimizer(cfg, params, lr)
        loader = DataLoader(
            spec.dataset,
            batch_size=cfg.train_batch_size,
            shuffle=True,
            collate_fn=spec.collate_fn,
            num_workers=cfg.dataloader_num_workers,
        )
        prepared = acc.prepare(*self.trainable.values(), optimizer, loader)
        wrapped = dict(zip(self.trainable, prepared[:-2]))
        optimizer, loader = prepared[-2:]
        run_models = {**spec.models, **wrapped}

        micro_per_epoch = len(loader)
        if micro_per_epoch == 0:
            raise TrainingError("the dataset is empty")
        acc_steps = cfg.gradient_accumulation_steps
        self.updates_per_epoch = math.ceil(micro_per_epoch / acc_steps)
        max_steps = cfg.max_train_steps or (cfg.num_train_epochs or 0) * self.updates_per_epoch or DEFAULT_STEPS
        validation_steps = (
            cfg.validation_epochs * self.updates_per_epoch if cfg.validation_epochs else cfg.validation_steps
        )

        # Not passed to accelerate.prepare (which would step it once per process); checkpoints save it themselves.
        lr_scheduler = get_scheduler(
            cfg.lr_scheduler,
            optimizer=optimizer.optimizer,
            num_warmup_steps=cfg.lr_warmup_steps,
            num_training_steps=max_steps,
            num_cycles=cfg.lr_num_cycles,
            power=cfg.lr_power,
        )
        self.optimizer, self.lr_scheduler = optimizer.optimizer, lr_scheduler

        if acc.is_main_process:
            config = {**spec.tracker_config, "max_train_steps": max_steps}
            config = {k: _tracker_value(v) for k, v in config.items() if k != "hub_token"}  # logs get shared
            acc.init_trackers(cfg.tracker_project_name, config=config)

        resume = resolve_resume(cfg)
        step = self.resume(resume) if resume else 0
        self.progress.emit("start", max_steps=max_steps, trainable_params=n_trainable)
        for model in self.trainable.values():
            model.train()

        bar = tqdm(total=max_steps, initial=step, desc="steps", disable=not acc.is_main_process, dynamic_ncols=True)
        t0, start_step = time.monotonic(), step
        status, stopping = "done", False
        epoch = step // self.updates_per_epoch
        try:
            while step < max_steps and not stopping:
                loader.set_epoch(epoch)  # the sampler's permutation for this epoch
                if hasattr(spec.dataset, "set_epoch"):  # its augmentation (accelerate skips this under DDP)
                    spec.dataset.set_epoch(epoch)
                first_micro = (step - epoch * self.updates_per_epoch) * acc_steps
                batches = iter(skip_first_batches(loader, first_micro) if first_micro else loader)
                micro = first_micro
                while micro < micro_per_epoch and step < max_steps:
                    group = min(acc_steps, micro_per_epoch - micro)
                    loss_sum, orth_sum, logs = self._accumulate(batches, group, step, run_models, wrapped)
                    micro += group

                    grad_norm = self._grad_norm(params)
                    flags = torch.tensor(
                        [loss_sum, orth_sum, grad_norm, float(STOP.requested)], device=acc.device, dtype=torch.float32
                    )
                    flags = acc.reduce(flags, reduction="sum")
                    mean_loss, mean_orth = (flags[:2] / acc.num_processes).tolist()
                    problem = None
                    if not (math.isfinite(mean_loss) and math.isfinite(mean_orth)):
                        problem = f"the loss is {mean_loss} (orthogonality term {mean_orth})"
                    elif not math.isfinite(flags[2].item()) and self.dtype != torch.float16:
                        problem = f"the gradient norm is {flags[2].item()}"  # (fp16's scaler skips such steps itself)
                    else:
                        optimizer.step()
                        # an update can overflow even from finite gradients (a huge lr): never keep such parameters
                        if not torch.stack([p.isfinite().all() for p in params]).all():
                            problem = "the update overflowed the trainable parameters"
                    current_lr = lr_scheduler.get_last_lr()[0]  # the rate this step used
                    if problem:
                        self._diverged(step + 1, problem, current_lr)
                    lr_scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    step += 1
                    stopping = flags[3].item() > 0  # decided together: every process stops after the same step

                    elapsed = time.monotonic() - t0
                    eta = elapsed / (step - start_step) * (max_steps - step)
                    bar.update(1)
                    bar.set_postfix(loss=f"{mean_loss:.4f}", orth=f"{mean_orth:.3g}", lr=f"{current_lr:.2e}")
                    acc.log({"loss": mean_loss, "orth": mean_orth, "lr": current_lr, **logs}, step=step)
                    self.progress.emit(
                        "step",
                        step=step,
                        max_steps=max_steps,
                        loss=mean_loss,
                        orth=mean_orth,
                        lr=current_lr,
                        elapsed_s=round(elapsed, 3),
                        eta_s=round(eta, 3),
                    )
                    if stopping:
                        break
                    if step % cfg.checkpointing_steps == 0 and step < max_steps:
                        self.save_checkpoint(step)
                    if validation_steps and step % validation_steps == 0 and step < max_steps:
                        self.validate(step)
                if micro >= micro_per_epoch:
                    epoch += 1
            if stopping:
                status = "stopped"
        finally:
            bar.close()

        self.check_ranks_agree()
        adapter = None
        if step > start_step or resume:
            adapter = self.save_adapter(step)
            if self.last_checkpoint is None or self.last_checkpoint.name != f"checkpoint-{step}":
                self.save_checkpoint(step)
        if status == "done":
            self.validate(step)
        acc.wait_for_everyone()
        acc.end_training()
        result = TrainResult(status, step, max_steps, adapter, self.last_checkpoint, self.samples)
        if self.main:
            if status == "done" and spec.finish is not None:
                spec.finish(result)
            self.progress.emit(status, step=step, adapter=str(adapter) if adapter else None)
            logger.info("%s at step %d: %s", status, step, adapter)
            if status == "done" and repo_id is not None:
                logger.info("pushed to the Hub: %s", push_run(cfg.output_dir, repo_id, cfg.hub_token))
        return result

    def _accumulate(self, batches, group: int, step: int, run_models: dict, wrapped: dict) -> tuple[float, float, dict]:
        """Forward/backward ``group`` micro-batches into the gradients (DDP syncs on the last only); each loss is
        divided by the group's own size, so a short group at an epoch's end is a true mean too."""
        loss_sum, orth_sum, logs_sum = 0.0, 0.0, {}
        for i in range(group):
            batch = next(batches)
            torch.manual_seed(_step_seed(self.cfg.seed, step, i, self.acc.process_index))
            with contextlib.ExitStack() as stack:
                if i < group - 1:
                    for model in wrapped.values():
                        stack.enter_context(self.acc.no_sync(model))
                loss, logs = self.spec.loss_fn(batch, run_models)
                orth = sum(
                    (orthogonality_loss(m) for m in self.trainable.values()), torch.zeros((), device=self.acc.device)
                )
                self.acc.backward((loss + orth) / group)
            loss_sum += loss.detach().float().item() / group
            orth_sum += orth.detach().float().item() / group
            for key, value in logs.items():
                logs_sum[key] = logs_sum.get(key, 0.0) + value / group
        return loss_sum, orth_sum, logs_sum

    def _grad_norm(self, params: list[nn.Parameter]) -> float:
        """Clip (when --max_grad_norm) and return the total gradient norm, the divergence signal."""
        if self.cfg.max_grad_norm and self.cfg.max_grad_norm > 0:
            return float(self.acc.clip_grad_norm_(params, self.cfg.max_grad_norm))
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    def _diverged(self, step: int, problem: str, lr: float) -> None:
        """Stop without saving: a run that diverged needs a lower learning rate, not more steps from here."""
        last = self.last_checkpoint
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        self.acc.end_training()
        raise TrainingError(
            f"training diverged at step {step}: {problem} (lr {lr:.3g}). Nothing was saved from this step; {where}. "
            "Lower --learning_rate (or use --mixed_precision bf16 instead of fp16) and resume from that checkpoint."
        )


def train(accelerator, cfg: TrainConfig, spec: TrainSpec, progress: ProgressFile) -> TrainResult:
    """Run the loop: resume if asked, train to --max_train_steps or a stop request, save the adapter.

    Returns on every process; files are written by the main process only. A diverged run raises
    :class:`TrainingError` and writes nothing new; a stop request (SIGTERM/SIGINT) saves a checkpoint and the adapter.
    """
    return _Loop(accelerator, cfg, spec, progress).run()
