"""The machinery under the loop: accelerate and seeds, precision, the optimizer, memory options, stop requests.

Small functions with one job each (in the manner of diffusers' training_utils), so the loop itself reads as a loop.
"""

from __future__ import annotations

import hashlib
import logging
import os
import signal
import sys
from typing import Any

import torch
from accelerate import Accelerator, PartialState
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    broadcast_object_list,
    set_seed,
)
from torch import nn

from ..model import hra_layers
from .checkpointing import open_checkpoint, resolve_resume
from .errors import TrainingError
from .settings import TrainSettings

logger = logging.getLogger(__name__)

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_accelerator(settings: TrainSettings) -> Accelerator:
    """Check what can fail early, agree on a seed across processes, create the Accelerator and seed everything.

    Sets ``settings.seed`` (from the checkpoint being resumed, or drawn at random, when not given) and resolves
    ``settings.resume_from_checkpoint`` to a folder (or None).
    """
    if settings.use_8bit_adam:
        adamw8bit()
    resume = resolve_resume(settings.resume_from_checkpoint, settings.output_path)
    settings.resume_from_checkpoint = str(resume) if resume else None
    # A multi-process launch (accelerate launch --multi_gpu, torchrun) on a machine without CUDA: accelerate would run
    # N independent single-process copies that all write the same files; train over gloo on the CPU instead.
    cpu = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    if settings.seed is None:
        stored = open_checkpoint(resume).manifest["seed"] if resume else None
        seed = [stored if stored is not None else int.from_bytes(os.urandom(4), "little") >> 1]
        if state.num_processes > 1:
            broadcast_object_list(seed)
        settings.seed = seed[0]
        logger.info("seed: %d", settings.seed)
    out = settings.output_path
    try:
        accelerator = Accelerator(
            cpu=cpu,
            mixed_precision=settings.mixed_precision,
            log_with=None if settings.report_to == "none" else settings.report_to,
            project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / settings.logging_dir)),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=settings.seed),
        )
    except (ValueError, ImportError) as err:
        raise TrainingError(f"cannot set up training ({err})") from err
    if settings.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
    set_seed(settings.seed)
    if accelerator.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
    return accelerator


def weight_dtype(accelerator: Accelerator) -> torch.dtype:
    return DTYPES[accelerator.mixed_precision]


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    """The torch seed of one micro-step: noise and timesteps are a function of the step alone (exact resume)."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{step}:{micro}:{rank}".encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------------------------
# Models: precision and memory


def cast_frozen(model: nn.Module, dtype: torch.dtype) -> None:
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


def enable_gradient_checkpointing(model: nn.Module) -> None:
    if hasattr(model, "enable_gradient_checkpointing"):  # diffusers models (non-reentrant by default)
        model.enable_gradient_checkpointing()
    elif hasattr(model, "gradient_checkpointing_enable"):  # transformers: reentrant would drop the adapters' grads
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    else:
        raise TrainingError(f"--gradient_checkpointing: {type(model).__name__} does not support it")


def enable_xformers(model: nn.Module) -> None:
    try:
        model.enable_xformers_memory_efficient_attention()
    except (ImportError, ModuleNotFoundError, ValueError) as err:
        raise TrainingError(
            f"--enable_xformers_memory_efficient_attention: {err}. Install xformers for your torch and CUDA "
            "(pip install xformers), or leave the flag out: torch's scaled-dot-product attention is used by default."
        ) from err


# --------------------------------------------------------------------------------------------------------------------
# Optimizer


def adamw8bit() -> type[torch.optim.Optimizer]:
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise TrainingError(
            "--use_8bit_adam needs bitsandbytes, which is not installed: `pip install bitsandbytes` "
            "(CUDA GPUs only), or drop the flag (HRA's optimizer state is tiny anyway)"
        ) from err
    return bnb.optim.AdamW8bit


def make_optimizer(settings: TrainSettings, params: list[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    cls = adamw8bit() if settings.use_8bit_adam else torch.optim.AdamW
    betas = (settings.adam_beta1, settings.adam_beta2)
    return cls(params, lr=lr, betas=betas, weight_decay=settings.adam_weight_decay, eps=settings.adam_epsilon)


def peak_memory_mib() -> float:
    """Peak memory so far: CUDA's peak allocation on a GPU, else this process's peak resident set (Linux: KiB)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tracker_value(value: Any) -> Any:
    return value if isinstance(value, (int, float, str, bool)) else str(value)


# --------------------------------------------------------------------------------------------------------------------
# Stop requests


class _Interrupted(Exception):
    """Raised between two denoising steps of a pipeline call that a stop request ends (see StopRequest.sample)."""


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

    def sample(self, pipe: Any, **kwargs: Any) -> Any:
        """``pipe(**kwargs)``, or None when a stop request ends it between two denoising steps (its images are
        dropped unfinished). A 50-step call on a starved CPU takes minutes; checked only between calls, a stop waited
        for all of them."""

        def check(pipe: Any, step: int, timestep: Any, callback_kwargs: dict) -> dict:
            if self.requested:
                raise _Interrupted
            return callback_kwargs

        try:
            return pipe(**kwargs, callback_on_step_end=check)
        except _Interrupted:
            return None


STOP = StopRequest()


def stop_agreed(accelerator: Accelerator) -> bool:
    """Whether any process was asked to stop; the same answer on all of them (a collective call)."""
    flag = torch.tensor([float(STOP.requested)], device=accelerator.device)
    return bool(accelerator.reduce(flag, reduction="sum").item() > 0)
