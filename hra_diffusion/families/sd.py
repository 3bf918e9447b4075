"""Stable Diffusion 1.x/2.x: a UNet conditioned on one CLIP text encoder's last hidden states."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Conditioning, Family, token_ids


class StableDiffusion(Family):
    name = "sd"
    title = "Stable Diffusion 1.x/2.x"
    pipeline = "StableDiffusionPipeline"
    pipeline_prefix = "StableDiffusion"
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te"}
    control = True
    typical_resolution = 512
    tags = ("stable-diffusion",)

    def recognizes(self, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "UNet2DConditionModel"

    def encode(self, tokenizers: Sequence[Any], models: Mapping[str, nn.Module], prompts: Sequence[str],
               device: torch.device) -> Conditioning:
        return models["text_encoder"](token_ids(tokenizers[0], prompts).to(device))[0], None

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                batch: Mapping[str, Any], resolution: int) -> Tensor:
        return denoiser(noisy, timesteps, cond[0]).sample
