"""One training step of the real SD3.5-medium or FLUX.1-dev transformer, random weights: frozen, LoRA, peft HRA, ours.

Why: these are the models people fine-tune now, at widths (1536, 3072) and token counts (4096 image tokens at 1024
px, plus 333 or 512 text tokens) far above the SD1.5 UNet's, and it is there that peft's HRA runs out of memory. The
configs are the released ones (transformer/config.json of stabilityai/stable-diffusion-3.5-medium and
black-forest-labs/FLUX.1-dev), written here so nothing is downloaded; --depth cuts the number of blocks (full width
always) so that a step fits in a CPU machine's memory.

    python benchmarks/transformer_step.py --arch sd35 --dtype bf16                  # a GPU: full model, 1024 px
    python benchmarks/transformer_step.py --arch flux --depth 1 --resolution 256    # a 24 GiB CPU machine
    python benchmarks/transformer_step.py --arch flux --depth 1 --resolution 256 --threads 1 --clock cpu

A step: grads set to None, forward at a random timestep with random text states and pooled embedding (FLUX.1-dev:
and guidance 3.5, packed latents and their position ids), loss = MSE to a random target, backward, no optimizer
update. The adapters sit on the MMDiT attention projections (q/k/v/out of the image stream, add_q/k/v_proj and
to_add_out of the text stream, FLUX's single blocks' to_q/k/v), the families' default targets. Modes, workers,
memory and the paired measurement are stepbench.py's, described there.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import stepbench  # noqa: E402

# suffix match; FLUX's single blocks have attn.to_q/k/v only, SD3's last block no to_add_out
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
SD35_MEDIUM = dict(
    sample_size=128,
    patch_size=2,
    in_channels=16,
    num_layers=24,
    attention_head_dim=64,
    num_attention_heads=24,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    out_channels=16,
    pos_embed_max_size=384,
    dual_attention_layers=tuple(range(13)),
    qk_norm="rms_norm",
)
FLUX_DEV = dict(
    patch_size=1,
    in_channels=64,
    num_layers=19,
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)


def sd35_config(depth: int | None) -> dict:
    """SD3.5-medium with ``depth`` blocks (dual attention where the full model has it: blocks 0-12)."""
    if depth is None:
        return SD35_MEDIUM
    dual = tuple(i for i in SD35_MEDIUM["dual_attention_layers"] if i < depth)
    return {**SD35_MEDIUM, "num_layers": depth, "dual_attention_layers": dual}


def flux_config(depth: int | None) -> dict:
    """FLUX.1-dev with ``depth`` double blocks and twice as many single blocks, as in the full model (19 and 38)."""
    return FLUX_DEV if depth is None else {**FLUX_DEV, "num_layers": depth, "num_single_layers": 2 * depth}


def build_sd35(args: argparse.Namespace) -> torch.nn.Module:
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(**sd35_config(args.depth))


def build_flux(args: argparse.Namespace) -> torch.nn.Module:
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(**flux_config(args.depth))


def sd35_inputs(args: argparse.Namespace, gen: torch.Generator) -> dict[str, torch.Tensor]:
    latent = args.resolution // 8
    return {
        "hidden_states": torch.randn(args.batch, 16, latent, latent, generator=gen),
        "encoder_hidden_states": torch.randn(args.batch, text_tokens(args), 4096, generator=gen),
        "pooled_projections": torch.randn(args.batch, 2048, generator=gen),
        "timestep": torch.rand(args.batch, generator=gen) * 1000,
    }


def flux_inputs(args: argparse.Namespace, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Packed latents: 2x2 patches of the 16-channel latents, 64 channels per token, with their (0, row, col) ids."""
    side = args.resolution // 16
    rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3).float()
    return {
        "hidden_states": torch.randn(args.batch, side * side, 64, generator=gen),
        "encoder_hidden_states": torch.randn(args.batch, text_tokens(args), 4096, generator=gen),
        "pooled_projections": torch.randn(args.batch, 768, generator=gen),
        "timestep": torch.rand(args.batch, generator=gen),  # FLUX takes sigma in [0, 1]
        "img_ids": img_ids,
        "txt_ids": torch.zeros(text_tokens(args), 3),
        "guidance": torch.full((args.batch,), 3.5),
    }


def image_tokens(args: argparse.Namespace) -> int:
    """16 px per token: the VAE's 8x, then 2x2 patches (SD3's patch_size 2, FLUX's packing)."""
    return (args.resolution // 16) ** 2


def text_tokens(args: argparse.Namespace) -> int:
    """SD3: 77 CLIP + 256 T5 tokens (the pipeline's default max_sequence_length); FLUX.1-dev: 512 T5 tokens."""
    return args.text_tokens or {"sd35": 333, "flux": 512}[args.arch]


@functools.cache
def sizes(arch: str, depth: int | None) -> tuple[int, int, int]:
    """(parameters + buffer elements, adapted layers, blocks) of the model, counted on the meta device."""
    with torch.device("meta"):
        model = BUILDERS[arch](argparse.Namespace(depth=depth))
    elements = sum(t.numel() for t in [*model.parameters(), *model.buffers()])
    adapted = sum(isinstance(m, torch.nn.Linear) and name.endswith(TARGETS) for name, m in model.named_modules())
    return elements, adapted, model.config.num_layers + getattr(model.config, "num_single_layers", 0)


def memory_gib(mode: str, args: argparse.Namespace) -> float:
    """Rough peak memory of a worker: libraries (CPU) or context (CUDA), weights, activations (about 50 values per
    token, width and block, measured at depth 1-2 on CPU), and for peft's HRA its dense d x d matrices: r + 8 per
    layer (its loop over the r reflections keeps each product for backward), three times that on CPU where a matrix
    is under glibc's 32 MiB mmap threshold. Measured: SD3.5's 9 MiB matrices took 20 per layer at r = 8 (12 live;
    the heap fragments, probably), and at r = 32 its worker reached 23 GiB and the OOM killer ended it; FLUX's 36 MiB
    ones, mmapped and returned at once, took 9.5 at r = 8."""
    elements, adapted, blocks = sizes(args.arch, args.depth)
    width = WIDTHS[args.arch]
    activations = 50 * args.batch * (image_tokens(args) + text_tokens(args)) * width * blocks
    nbytes = torch.finfo(stepbench.DTYPES[args.dtype]).bits // 8
    fragments = 3 if args.device == "cpu" and nbytes * width**2 < 32 * 2**20 else 1
    dense = fragments * (args.r + 8) * adapted * width**2 if mode == "hra_peft" else 0
    return (1.5 if args.device == "cpu" else 0.5) + nbytes * (elements + activations + dense) / 2**30


def setting(args: argparse.Namespace) -> str:
    blocks = f"{args.depth or 24} of 24 blocks"
    if args.arch == "flux":
        depth = args.depth or 19
        blocks = f"{depth} of 19 double + {2 * depth} of 38 single blocks"
    return f"{args.resolution} px, {image_tokens(args)} image + {text_tokens(args)} text tokens, {blocks}"


BUILDERS = {"sd35": build_sd35, "flux": build_flux}
WIDTHS = {"sd35": 1536, "flux": 3072}
ARCHS = {
    "sd35": stepbench.Arch(
        "SD3.5-medium transformer", build_sd35, sd35_inputs, "hidden_states", TARGETS, memory_gib, setting
    ),
    "flux": stepbench.Arch(
        "FLUX.1-dev transformer", build_flux, flux_inputs, "hidden_states", TARGETS, memory_gib, setting
    ),
}


def main() -> None:
    parser = stepbench.parser(__doc__.split("\n\n")[0], ARCHS, "sd35")
    parser.add_argument("--resolution", type=int, default=1024, help="pixels; 16 px per image token")
    parser.add_argument(
        "--depth", type=int, help="blocks (FLUX: double blocks, and twice as many single ones); default: the full model"
    )
    parser.add_argument("--text-tokens", type=int, help="default: 333 for SD3.5 (77 CLIP + 256 T5), 512 for FLUX.1")
    args = parser.parse_args()
    if args.arch == "sd35" and args.depth is not None and args.depth < 2:
        parser.error("--depth must be at least 2 for sd35: its last block has no to_add_out, the others do")
    stepbench.main(args, ARCHS)


if __name__ == "__main__":
    main()
