"""SDXL: a UNet conditioned on two CLIP encoders' penultimate states, the second's pooled output and the image's
size and crop ("text_time" added embedding)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Conditioning, Family, token_ids


class StableDiffusionXL(Family):
    name = "sdxl"
    title = "SDXL"
    pipeline = "StableDiffusionXLPipeline"
    pipeline_prefix = "StableDiffusionXL"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")
    kohya_prefixes = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    vae_fp32 = True  # SDXL's VAE overflows in fp16 and decodes black images
    tags = ("stable-diffusion-xl",)

    def recognizes(self, denoiser: nn.Module) -> bool:
        config = getattr(denoiser, "config", None)
        return type(denoiser).__name__ == "UNet2DConditionModel" and (
            getattr(config, "addition_embed_type", None) == "text_time"
        )

    def tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer, pipe.tokenizer_2]

    def encode(self, tokenizers: Sequence[Any], models: Mapping[str, nn.Module], prompts: Sequence[str],
               device: torch.device) -> Conditioning:
        states = []
        for tokenizer, name in zip(tokenizers, self.text_encoders):
            out = models[name](token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
        return torch.cat(states, dim=-1), out[0]  # out[0]: text_encoder_2's projected pooled output

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                batch: Mapping[str, Any], resolution: int) -> Tensor:
        hidden, pooled = cond
        time_ids = sdxl_time_ids(batch["size_crop"].to(noisy.device), resolution).to(pooled.dtype)
        added = {"text_embeds": pooled, "time_ids": time_ids}
        return denoiser(noisy, timesteps, hidden, added_cond_kwargs=added).sample

    def text_excludes(self, models: Mapping[str, nn.Module]) -> dict[str, str]:
        """text_encoder's last layer: SDXL reads its penultimate states, and takes the pooled output from the other."""
        last = models["text_encoder"].config.num_hidden_layers - 1
        return {"text_encoder": rf".*\.layers\.{last}\..*"}


def sdxl_time_ids(size_crop: Tensor, resolution: int) -> Tensor:
    """SDXL's size conditioning per image: (original height, width, crop top, left, target height, width)."""
    target = torch.tensor([resolution, resolution], dtype=size_crop.dtype, device=size_crop.device)
    return torch.cat([size_crop, target.expand(len(size_crop), 2)], dim=1)
