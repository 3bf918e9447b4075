"""Stable Diffusion 3 / 3.5: an MMDiT transformer trained by rectified flow, conditioned on two CLIP encoders'
penultimate states (side by side, zero-padded to T5's width) followed by T5's states, and both CLIPs' pooled
outputs. T5 is optional, as in diffusers: without it the pipeline feeds zeros in its place."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import Conditioning, Family, token_ids

T5_LENGTH = 256  # StableDiffusion3Pipeline's default max_sequence_length: train on what inference feeds
# Attention of both streams (image: to_*, text/context: add_*_proj, to_add_out), as diffusers' SD3 DreamBooth-LoRA.
MMDIT_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")


class StableDiffusion3(Family):
    name = "sd3"
    title = "Stable Diffusion 3/3.5"
    pipeline = "StableDiffusion3Pipeline"
    pipeline_prefix = "StableDiffusion3"
    denoiser = "transformer"
    text_encoders = ("text_encoder", "text_encoder_2", "text_encoder_3")
    trainable_text_encoders = ("text_encoder", "text_encoder_2")  # the CLIPs; T5 stays frozen, as in diffusers
    default_targets = MMDIT_TARGETS
    objective = "flow"
    flow_weighting = "logit_normal"
    precondition_outputs = True
    sample_scheduler = None
    tags = ("sd3", "sd3.5")

    def recognizes(self, denoiser: nn.Module) -> bool:
        return type(denoiser).__name__ == "SD3Transformer2DModel"

    def tokenizers(self, pipe: Any) -> list[Any]:
        return [pipe.tokenizer, pipe.tokenizer_2, pipe.tokenizer_3]

    def encode(self, tokenizers: Sequence[Any], models: Mapping[str, nn.Module], prompts: Sequence[str],
               device: torch.device) -> Conditioning:
        states, pooled = [], []
        for tokenizer, name in zip(tokenizers[:2], self.text_encoders[:2]):
            out = models[name](token_ids(tokenizer, prompts).to(device), output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled.append(out[0])
        clip = torch.cat(states, dim=-1)
        t5 = models.get("text_encoder_3")
        if t5 is None or tokenizers[2] is None:
            width = models["transformer"].config.joint_attention_dim
            t5_states = torch.zeros(len(prompts), T5_LENGTH, width, device=device, dtype=clip.dtype)
        else:
            t5_states = t5(token_ids(tokenizers[2], prompts, T5_LENGTH).to(device))[0]
        clip = F.pad(clip, (0, t5_states.shape[-1] - clip.shape[-1]))
        return torch.cat([clip, t5_states.to(clip.dtype)], dim=-2), torch.cat(pooled, dim=-1)

    def predict(self, denoiser: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Conditioning,
                batch: Mapping[str, Any], resolution: int) -> Tensor:
        hidden, pooled = cond
        return denoiser(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=hidden, pooled_projections=pooled,
            return_dict=False,
        )[0]
