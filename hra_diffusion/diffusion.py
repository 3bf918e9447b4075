"""The diffusion side of training: the frozen base models, the text conditioning (computed as each family's pipeline
computes it at inference), latents, and :func:`denoising_loss`, the one objective every trainer optimizes. What
differs between model families (conditioning, the denoiser call, DDPM or flow matching) is asked of
hra_diffusion.families; the loop (hra_diffusion.train) knows nothing of diffusion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .control import control_condition
from .families import Conditioning, Family, FlowOptions, Objective, family_of
from .pipelines import ModelNotFoundError, load_pipeline, pipeline_components


def load_base(
    name: str,
    *,
    device: torch.device | str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
    flow: FlowOptions | None = None,
) -> tuple[Any, Family, Objective]:
    """(pipeline, its family, the training objective) of a supported base model, every weight frozen.

    ``vae`` replaces the pipeline's VAE (a folder or hub id, e.g. an fp16-safe SDXL VAE); ``flow`` overrides the
    flow-matching defaults of SD3 and FLUX (DDPM families take their target from the scheduler config). Raises
    :class:`ModelNotFoundError` with the same wording as the app when a model is not available offline.
    """
    components = {}
    if vae is not None:
        from diffusers import AutoencoderKL

        try:
            components["vae"] = AutoencoderKL.from_pretrained(vae, revision=revision)
        except (OSError, ValueError) as err:
            raise ModelNotFoundError(
                f"--pretrained_vae_model_name_or_path {vae!r}: could not load an AutoencoderKL from it "
                f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})"
            ) from err
    pipe = load_pipeline(name, device=device, revision=revision, variant=variant, **components)
    for model in (*pipeline_components(pipe).values(), pipe.vae):
        model.requires_grad_(False)
    family = family_of(pipe)
    return pipe, family, family.make_objective(pipe.scheduler.config, flow)


class PromptEncoder:
    """The denoiser's text conditioning for a pipeline's prompts, as its own pipeline computes it (the family says
    how). With frozen encoders each prompt is encoded once and cached (``cache=True``)."""

    def __init__(self, pipe: Any, cache: bool) -> None:
        self.family = family_of(pipe)
        self.tokenizers = self.family.tokenizers(pipe)
        self.cache: dict[str, tuple[Tensor, Tensor | None]] | None = {} if cache else None

    def __call__(self, prompts: Sequence[str], models: Mapping[str, nn.Module], device) -> Conditioning:
        """(encoder hidden states, pooled embeddings or None) of ``prompts``, by the given (maybe wrapped) encoders."""
        if self.cache is None:
            return self.family.encode(self.tokenizers, models, prompts, device)
        new = sorted(set(prompts) - set(self.cache))
        if new:
            with torch.no_grad():
                hidden, pooled = self.family.encode(self.tokenizers, models, new, device)
            for i, prompt in enumerate(new):
                self.cache[prompt] = (hidden[i], None if pooled is None else pooled[i])
        hidden = torch.stack([self.cache[p][0] for p in prompts])
        pooled = [self.cache[p][1] for p in prompts]
        return hidden, None if pooled[0] is None else torch.stack(pooled)


def encode_latents(vae: nn.Module, pixel_values: Tensor) -> Tensor:
    """VAE latents of images in [-1, 1] (a sample of the posterior, as in training the base model), shifted and
    scaled as the family's pipeline expects (SD3 and FLUX VAEs have a shift factor)."""
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    latents = vae.encode(pixel_values).latent_dist.sample()
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return (latents - shift) * vae.config.scaling_factor


def denoising_loss(
    batch: Mapping,
    models: Mapping[str, nn.Module],
    objective: Objective,
    prompts: PromptEncoder,
    resolution: int,
    prior_loss_weight: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One training step's objective: MSE between the denoiser's prediction and its target at random timesteps
    (noise or velocity for DDPM models, the flow's velocity for SD3/FLUX, weighted as the objective says).

    ``batch``: ``pixel_values`` and ``prompts``, plus ``size_crop`` (SDXL) and ``conditioning_pixel_values`` for a
    control adapter (fed to its hint encoder). With ``prior_loss_weight`` the batch is instance images then class
    images (DreamBooth's prior preservation) and the class half's loss is added with that weight.
    """
    family = prompts.family
    denoiser = models[family.denoiser]
    with torch.no_grad():
        latents = encode_latents(models["vae"], batch["pixel_values"])
    noisy, timesteps, target, weight = objective.sample(latents)
    cond = prompts(batch["prompts"], models, latents.device)
    condition = batch.get("conditioning_pixel_values")
    with control_condition(denoiser, condition) if condition is not None else contextlib.nullcontext():
        pred = family.predict(denoiser, noisy, timesteps, cond, batch, resolution).float()
    target = target.float()
    if prior_loss_weight is None:
        return _mse(pred, target, weight), {}
    weights = weight.chunk(2) if weight is not None else (None, None)
    instance, prior = (_mse(p, t, w) for p, t, w in zip(pred.chunk(2), target.chunk(2), weights))
    return instance + prior_loss_weight * prior, {"instance_loss": instance.item(), "prior_loss": prior.item()}


def _mse(pred: Tensor, target: Tensor, weight: Tensor | None) -> Tensor:
    """MSE, each sample's weighted by ``weight`` where the objective gives weights."""
    if weight is None:
        return F.mse_loss(pred, target)
    return (weight.float() * (pred - target).pow(2).flatten(1).mean(1)).mean()
