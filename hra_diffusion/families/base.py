"""The family interface: what differs between Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and FLUX.1, in one place.

Everything else (the loop, adapters, files, exports, the app) asks a :class:`Family` instead of testing for a model
kind, so a new family is one new module here.
"""

from __future__ import annotations

import importlib
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .objectives import DDPMObjective, FlowMatchObjective, FlowOptions, Objective

Conditioning = tuple[Tensor, Tensor | None]  # (encoder hidden states, pooled embedding or None), batch first
CLIP_TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


class Family:
    """One model family. Subclasses set the class attributes and implement the text conditioning and the model call.

    name: short id in files and on the command line; title: what users call it.
    pipeline: the diffusers pipeline class; ``pipeline_prefix`` matches model_index.json's ``_class_name``
        (the longest matching prefix wins, so "StableDiffusionXL..." is SDXL, not SD).
    denoiser: the component that denoises ("unet" or "transformer"); text_encoders: those that carry adapters,
        trainable_text_encoders: those ``--train_text_encoder`` trains (as in diffusers' DreamBooth-LoRA scripts).
    default_targets: the denoiser's adapted layers by default; text_targets: the text encoders'.
    kohya_prefixes: component -> key prefix of kohya/ComfyUI LoRA files ({} where ComfyUI reads diffusers keys).
    objective: "ddpm" (epsilon / v-prediction from the scheduler config) or "flow" (rectified flow matching, with
        ``flow_weighting`` and ``precondition_outputs`` as diffusers' DreamBooth script for the family defaults to).
    vae_fp32: the VAE overflows in fp16 and stays float32 under mixed precision.
    control: control adapters' hint encoder can attach to the denoiser (after the UNet's conv_in).
    sample_scheduler: the sampler for training previews (None: the pipeline's own).
    typical_resolution: the usual image size, for forms shown before the model is loaded.
    """

    name: ClassVar[str]
    title: ClassVar[str]
    pipeline: ClassVar[str]
    pipeline_prefix: ClassVar[str]
    denoiser: ClassVar[str] = "unet"
    text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    trainable_text_encoders: ClassVar[tuple[str, ...]] = ("text_encoder",)
    default_targets: ClassVar[tuple[str, ...]] = ("to_q", "to_k", "to_v", "to_out.0")
    text_targets: ClassVar[tuple[str, ...]] = CLIP_TEXT_TARGETS
    kohya_prefixes: ClassVar[dict[str, str]] = {}
    objective: ClassVar[str] = "ddpm"
    flow_weighting: ClassVar[str] = "none"
    precondition_outputs: ClassVar[bool] = False
    vae_fp32: ClassVar[bool] = False
    control: ClassVar[bool] = False
    sample_scheduler: ClassVar[str | None] = "dpm"
    typical_resolution: ClassVar[int] = 1024
    tags: ClassVar[tuple[str, ...]] = ()

    @property
    def components(self) -> tuple[str, ...]:
        """The components an adapter file can hold parts for, denoiser first."""
        return (self.denoiser, *self.text_encoders)

    def pipeline_class(self) -> type:
        return getattr(importlib.import_module("diffusers"), self.pipeline)

    def recognizes(self, denoiser: nn.Module) -> bool:
        """Whether a loaded denoiser belongs to this family (for models met without their pipeline)."""
        raise NotImplementedError

    def default_resolution(self, pipe: Any) -> int:
        """The image size the model was trained at, as its pipeline defaults to."""
        return getattr(pipe, self.denoiser).config.sample_size * pipe.vae_scale_factor

    def make_objective(self, scheduler_config: Any, flow: FlowOptions | None = None) -> Objective:
        """The training objective for a model's scheduler config; ``flow`` overrides the flow-matching defaults."""
        if self.objective == "flow":
            options = flow or FlowOptions(weighting_scheme=self.flow_weighting)
            return FlowMatchObjective(scheduler_config, options, precondition=self.precondition_outputs)
        return DDPMObjective(scheduler_config)

    def tokenizers(self, pipe: Any) -> list[Any]:
        """The tokenizers :meth:`encode` needs, in the order it takes them."""
        return [pipe.tokenizer]

    def encode(self, tokenizers: Sequence[Any], models: Mapping[str, nn.Module], prompts: Sequence[str],
               device: torch.device) -> Conditioning:
        """The denoiser's text conditioning, computed as the family's pipeline computes it at inference."""
        raise NotImplementedError

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                batch: Mapping[str, Any], resolution: int) -> Tensor:
        """The denoiser's output for latents ``noisy`` (B, C, H, W), in the same layout."""
        raise NotImplementedError

    def text_excludes(self, models: Mapping[str, nn.Module]) -> dict[str, str]:
        """component -> regex of text-encoder layers that never reach the denoiser (adapting them is wasted)."""
        return {}


def token_ids(tokenizer: Any, prompts: Sequence[str], max_length: int | None = None) -> Tensor:
    """Ids padded to the tokenizer's full length, as the pipelines pad them."""
    return tokenizer(
        list(prompts),
        padding="max_length",
        truncation=True,
        max_length=max_length or tokenizer.model_max_length,
        return_tensors="pt",
    ).input_ids
