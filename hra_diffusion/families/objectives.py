"""What a training step asks the denoiser to predict: DDPM noise / velocity, or rectified-flow velocity.

An objective turns clean latents into (noisy latents, timesteps, target, per-sample loss weight). The family picks
which one (``Family.objective``); the options of flow matching are those of diffusers' SD3 / FLUX DreamBooth scripts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

WEIGHTING_SCHEMES = ("none", "logit_normal", "mode", "sigma_sqrt", "cosmap")


class UnsupportedModelError(ValueError):
    """A base model this trainer cannot train (an unknown prediction type)."""


@dataclass(frozen=True)
class FlowOptions:
    """Timestep density and loss weighting for flow matching (diffusers' names and defaults: logit_normal(0, 1) is
    SD3's; FLUX's scripts default to "none")."""

    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29

    def __post_init__(self) -> None:
        if self.weighting_scheme not in WEIGHTING_SCHEMES:
            raise ValueError(f"weighting_scheme must be one of {WEIGHTING_SCHEMES}, got {self.weighting_scheme!r}")


Sample = tuple[Tensor, Tensor, Tensor, Tensor | None]  # noisy latents, timesteps, target, loss weight per sample


class DDPMObjective:
    """Uniform timesteps of the model's DDPM schedule; the target is what its scheduler says it predicts."""

    def __init__(self, scheduler_config: Any) -> None:
        from diffusers import DDPMScheduler

        self.scheduler = DDPMScheduler.from_config(scheduler_config)
        self.prediction_type = self.scheduler.config.prediction_type
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise UnsupportedModelError(f"unsupported prediction_type {self.prediction_type!r}")

    def sample(self, latents: Tensor) -> Sample:
        noise = torch.randn_like(latents)
        steps = torch.randint(0, self.scheduler.config.num_train_timesteps, (len(latents),), device=latents.device)
        noisy = self.scheduler.add_noise(latents, noise, steps)
        if self.prediction_type == "epsilon":
            target = noise
        elif self.prediction_type == "v_prediction":
            target = self.scheduler.get_velocity(latents, noise, steps)
        else:
            target = latents
        return noisy, steps, target, None


class FlowMatchObjective:
    """x_t = (1 - sigma) x + sigma noise on the model's shifted sigma grid, target noise - x (the velocity), with
    the timestep density and loss weighting of ``options``.

    ``precondition``: the loss on the implied clean latents, x_t - sigma v against x, as diffusers' SD3 script does
    by default; that is the velocity loss weighted by sigma^2, which is how it is computed here.
    """

    prediction_type = "flow_matching"

    def __init__(self, scheduler_config: Any, options: FlowOptions, precondition: bool = False) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler
        from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

        self._density, self._weighting = compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(scheduler_config)
        self.timesteps, self.sigmas = scheduler.timesteps.float(), scheduler.sigmas.float()
        self.options, self.precondition = options, precondition

    def sample(self, latents: Tensor) -> Sample:
        o = self.options
        u = self._density(o.weighting_scheme, len(latents), o.logit_mean, o.logit_std, o.mode_scale)
        index = (u * len(self.timesteps)).long().clamp(max=len(self.timesteps) - 1)
        timesteps = self.timesteps[index].to(latents.device)
        sigmas = self.sigmas[index].to(latents.device, latents.dtype).view(-1, *[1] * (latents.ndim - 1))
        noise = torch.randn_like(latents)
        noisy = (1.0 - sigmas) * latents + sigmas * noise
        weight = self._weighting(o.weighting_scheme, sigmas).flatten()
        if self.precondition:
            weight = weight * sigmas.flatten() ** 2
        return noisy, timesteps, noise - latents, weight


Objective = DDPMObjective | FlowMatchObjective
