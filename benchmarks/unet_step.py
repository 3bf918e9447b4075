"""One training step of the real SD1.5 (or SDXL) UNet, random weights: frozen, LoRA r=8, peft HRA r=8, our HRA r=8.

Why the whole UNet: the layer benchmark (hra_layer.py) isolates the adapter, this one shows what a user pays per
training step, and peak memory, which only a full model shows (peft's HRA keeps dense d x d matrices per layer).

    python benchmarks/unet_step.py                                  # CPU: 256 px, batch 1, float32
    python benchmarks/unet_step.py --resolution 512 --dtype bf16    # a GPU
    python benchmarks/unet_step.py --modes lora ours --steps 5 --json unet.json
    python benchmarks/unet_step.py --threads 1 --clock cpu          # a CPU shared with other jobs
    python benchmarks/unet_step.py --arch sdxl --resolution 1024 --dtype bf16   # SDXL on a GPU

A step: grads set to None, forward at a random timestep with random text states (77 x 768), loss = MSE to a random
target, backward. No optimizer update (the adapters' update is negligible next to the UNet). In "frozen" mode the
UNet has no trainable parameter and the latents require grad, so backward runs through the whole network; in the
adapter modes only the adapters are trainable and the latents do not require grad, as in real training.

Workers, memory and the paired measurement are stepbench.py's, described there. CPU memory needed: about 4.5 GiB
per mode alive at once (13.5 GiB for the three fast modes), then about 10.5 GiB for peft's HRA (SD1.5, 256 px).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stepbench  # noqa: E402

from hra_diffusion.testing.tiny import SD15_UNET_CONFIG, SDXL_UNET_CONFIG  # noqa: E402

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")


def unet_arch(config: dict, label: str, text_width: int, pooled_width: int | None, size: float) -> stepbench.Arch:
    """An Arch for a UNet ``config``; ``size`` scales the memory estimate (SDXL's UNet is three times SD1.5's)."""

    def build(args: argparse.Namespace) -> torch.nn.Module:
        from diffusers import UNet2DConditionModel

        return UNet2DConditionModel(**config)

    def inputs(args: argparse.Namespace, gen: torch.Generator) -> dict[str, torch.Tensor]:
        latent = args.resolution // 8
        out = {
            "sample": torch.randn(args.batch, 4, latent, latent, generator=gen),
            "timestep": torch.randint(0, 1000, (args.batch,), generator=gen),
            "encoder_hidden_states": torch.randn(args.batch, 77, text_width, generator=gen),
        }
        if pooled_width:  # SDXL: pooled text embedding and size conditioning (original, crop, target)
            ids = [args.resolution, args.resolution, 0, 0, args.resolution, args.resolution]
            text_embeds = torch.randn(args.batch, pooled_width, generator=gen)
            out["added_cond_kwargs"] = {"text_embeds": text_embeds, "time_ids": torch.tensor([ids] * args.batch)}
        return out

    def memory_gib(mode: str, args: argparse.Namespace) -> float:
        """Rough peak RSS of a CPU worker, float32: SD1.5 4.4 GiB at 256 px batch 1, 6.7 at 512; peft's HRA 10.3."""
        scale = args.batch * (args.resolution / 256) ** 2
        return size * (11.0 + 1.5 * scale if mode == "hra_peft" else 4.2 + 0.6 * scale)

    def setting(args: argparse.Namespace) -> str:
        latent = args.resolution // 8
        return f"{args.resolution} px ({latent}x{latent} latents)"

    return stepbench.Arch(label, build, inputs, "sample", TARGETS, memory_gib, setting)


ARCHS = {
    "sd15": unet_arch(SD15_UNET_CONFIG, "SD1.5 UNet", 768, None, 1.0),
    "sdxl": unet_arch(SDXL_UNET_CONFIG, "SDXL UNet", 2048, 1280, 3.0),
}


def main() -> None:
    parser = stepbench.parser(__doc__.split("\n\n")[0], ARCHS, "sd15")
    parser.add_argument("--resolution", type=int, default=256, help="pixels; latents are resolution / 8")
    stepbench.main(parser.parse_args(), ARCHS)


if __name__ == "__main__":
    main()
