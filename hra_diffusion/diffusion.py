"""The diffusion side of training: the frozen base models, the text conditioning (SD 1.x/2.x and SDXL, computed as
the pipelines compute it at inference), latents, noise, the regression target, and :func:`denoising_loss`, the one
objective every trainer optimizes. The loop (hra_diffusion.train) knows nothing of diffusion.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import Tensor, nn

from .control import control_condition
from .pipelines import ModelNotFoundError, is_sdxl, load_pipeline, pipeline_components


class UnsupportedModelError(ValueError):
    """A base model this trainer cannot train (an unknown prediction type)."""


def load_base(
    name: str,
    *,
    device: torch.device | str,
    revision: str | None = None,
    variant: str | None = None,
    vae: str | None = None,
):
    """(pipeline, training noise scheduler) of an SD 1.x/2.x or SDXL model, every weight frozen.

    ``vae`` replaces the pipeline's VAE (a folder or hub id, e.g. an fp16-safe SDXL VAE). Raises
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
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    if noise_scheduler.config.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise UnsupportedModelError(f"unsupported prediction_type {noise_scheduler.config.prediction_type!r}")
    return pipe, noise_scheduler


def _token_ids(tokenizer, prompts: Sequence[str]) -> Tensor:
    return tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length, return_tensors="pt"
    ).input_ids


def encode_prompts(tokenizer, text_encoder: nn.Module, prompts: Sequence[str], device: torch.device) -> Tensor:
    """CLIP hidden states of ``prompts``, padded to the tokenizer's length as the pipelines do."""
    return text_encoder(_token_ids(tokenizer, prompts).to(device))[0]


class PromptEncoder:
    """The UNet's text conditioning for a pipeline's prompts, as its own pipeline computes it.

    SD 1.x/2.x: the text encoder's last hidden states. SDXL: both encoders' penultimate hidden states side by side,
    and the second encoder's pooled, projected output for the added "text_time" embedding. With frozen encoders each
    prompt is encoded once and cached (``cache=True``).
    """

    def __init__(self, pipe, cache: bool) -> None:
        self.sdxl = is_sdxl(pipe)
        self.tokenizers = [pipe.tokenizer, pipe.tokenizer_2] if self.sdxl else [pipe.tokenizer]
        self.cache: dict[str, tuple[Tensor, Tensor | None]] | None = {} if cache else None

    def __call__(self, prompts: Sequence[str], models: Mapping[str, nn.Module], device) -> tuple[Tensor, Tensor | None]:
        """(encoder hidden states, pooled embeddings or None) of ``prompts``, by the given (maybe wrapped) encoders."""
        if self.cache is None:
            return self._encode(prompts, models, device)
        new = sorted(set(prompts) - set(self.cache))
        if new:
            with torch.no_grad():
                hidden, pooled = self._encode(new, models, device)
            for i, prompt in enumerate(new):
                self.cache[prompt] = (hidden[i], None if pooled is None else pooled[i])
        hidden = torch.stack([self.cache[p][0] for p in prompts])
        return hidden, torch.stack([self.cache[p][1] for p in prompts]) if self.sdxl else None

    def _encode(self, prompts: Sequence[str], models: Mapping[str, nn.Module], device) -> tuple[Tensor, Tensor | None]:
        if not self.sdxl:
            return encode_prompts(self.tokenizers[0], models["text_encoder"], prompts, device), None
        states = []
        for tokenizer, name in zip(self.tokenizers, ("text_encoder", "text_encoder_2")):
            out = models[name](_token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), out[0]  # out[0]: the projected pooled output of text_encoder_2


def sdxl_time_ids(size_crop: Tensor, resolution: int) -> Tensor:
    """SDXL's size conditioning per image: (original height, width, crop top, left, target height, width)."""
    target = torch.tensor([resolution, resolution], dtype=size_crop.dtype, device=size_crop.device)
    return torch.cat([size_crop, target.expand(len(size_crop), 2)], dim=1)


def encode_latents(vae: nn.Module, pixel_values: Tensor) -> Tensor:
    """Scaled VAE latents of images in [-1, 1] (a sample of the posterior, as in training the base model)."""
    pixel_values = pixel_values.to(vae.device, dtype=vae.dtype)
    return vae.encode(pixel_values).latent_dist.sample() * vae.config.scaling_factor


def noisy_latents(noise_scheduler, latents: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(noisy latents, timesteps, regression target) at uniform random timesteps, for the model's prediction type."""
    noise = torch.randn_like(latents)
    steps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), device=latents.device)
    noisy = noise_scheduler.add_noise(latents, noise, steps)
    kind = noise_scheduler.config.prediction_type
    target = {
        "epsilon": lambda: noise,
        "v_prediction": lambda: noise_scheduler.get_velocity(latents, noise, steps),
        "sample": lambda: latents,
    }[kind]()
    return noisy, steps, target


def denoising_loss(
    batch: Mapping,
    models: Mapping[str, nn.Module],
    noise_scheduler,
    prompts: PromptEncoder,
    resolution: int,
    prior_loss_weight: float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """One training step's objective: MSE between the UNet's prediction and its target (noise for epsilon models,
    velocity for v-prediction) at random timesteps.

    ``batch``: ``pixel_values`` and ``prompts``, plus ``size_crop`` for SDXL and ``conditioning_pixel_values`` for a
    control adapter (fed to its hint encoder). With ``prior_loss_weight`` the batch is instance images then class
    images (DreamBooth's prior preservation) and the class half's loss is added with that weight.
    """
    with torch.no_grad():
        latents = encode_latents(models["vae"], batch["pixel_values"])
    noisy, timesteps, target = noisy_latents(noise_scheduler, latents)
    hidden, pooled = prompts(batch["prompts"], models, latents.device)
    added = None
    if pooled is not None:  # SDXL: the pooled prompt and the size conditioning join the timestep embedding
        time_ids = sdxl_time_ids(batch["size_crop"].to(latents.device), resolution)
        added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
    condition = batch.get("conditioning_pixel_values")
    with control_condition(models["unet"], condition) if condition is not None else contextlib.nullcontext():
        pred = models["unet"](noisy, timesteps, hidden, added_cond_kwargs=added).sample.float()
    target = target.float()
    if prior_loss_weight is None:
        return F.mse_loss(pred, target), {}
    pred, pred_prior = pred.chunk(2)
    target, target_prior = target.chunk(2)
    instance, prior = F.mse_loss(pred, target), F.mse_loss(pred_prior, target_prior)
    return instance + prior_loss_weight * prior, {"instance_loss": instance.item(), "prior_loss": prior.item()}
