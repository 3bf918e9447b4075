"""FLUX.1 (dev and schnell): a double/single-stream transformer trained by rectified flow on 2x2-packed latents,
conditioned on T5's states and CLIP's pooled output, with an embedded guidance scale on dev."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from .base import Conditioning, Family, token_ids
from .sd3 import MMDIT_TARGETS

T5_LENGTH = 512  # FluxPipeline's default max_sequence_length
TRAIN_GUIDANCE = 3.5  # the guidance dev is trained and sampled at (diffusers' FLUX DreamBooth default)


class Flux(Family):
    name = "flux"
    title = "FLUX.1"
    pipeline = "FluxPipeline"
    pipeline_prefix = "Flux"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2")
    trainable_text_encoders = ("text_encoder",)  # CLIP; T5 stays frozen, as in diffusers' FLUX scripts
    # Double blocks: both streams' attention; single blocks: their attn.to_q/k/v (the suffixes match them too).
    default_targets = MMDIT_TARGETS
    objective = "flow"
    sample_scheduler = None
    tags = ("flux",)

    def recognizes(self, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "FluxTransformer2DModel"

    def default_resolution(self, pipe: Any) -> int:
        return pipe.default_sample_size * pipe.vae_scale_factor

    def tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer, pipe.tokenizer_2]

    def encode(self, tokenizers: Sequence[Any], models: Mapping[str, nn.Module], prompts: Sequence[str],
               device: torch.device) -> Conditioning:
        pooled = models["text_encoder"](token_ids(tokenizers[0], prompts).to(device)).pooler_output
        hidden = models["text_encoder_2"](token_ids(tokenizers[1], prompts, T5_LENGTH).to(device))[0]
        return hidden, pooled

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                batch: Mapping[str, Any], resolution: int) -> Tensor:
        from diffusers import FluxPipeline

        hidden, pooled = cond
        b, c, h, w = noisy.shape
        packed = FluxPipeline._pack_latents(noisy, b, c, h, w)
        image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, noisy.device, noisy.dtype)
        text_ids = torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=noisy.dtype)
        guidance = None
        if denoiser.config.guidance_embeds:
            guidance = torch.full((b,), TRAIN_GUIDANCE, device=noisy.device, dtype=torch.float32)
        out = denoiser(
            hidden_states=packed, timestep=timesteps / 1000, guidance=guidance, pooled_projections=pooled,
            encoder_hidden_states=hidden, txt_ids=text_ids, img_ids=image_ids, return_dict=False,
        )[0]
        return out.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
