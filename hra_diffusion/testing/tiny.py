"""Offline tiny diffusion pipelines: SD1.5, SDXL, SD3 and FLUX.1 layouts at toy size, from configs, random weights.

No model hub is reachable from the dev, CI and GPU machines, yet tests, benchmarks, the demo app and outside checks
need real pipeline folders to load by path. This module writes them, each with its family's real pipeline class,
component classes and scheduler settings, and with the real OpenAI CLIP BPE tokenizer rebuilt from the vocabulary
file open_clip ships (`offline_tokenizers`):

- ``sd``: a ~1M-parameter UNet with real attention and GEGLU layers, a small VAE and CLIP text encoder, DDIM with
  SD1.5 settings, optionally a ControlNet.
- ``sdxl``: two text encoders (the second with a projection, its pooled output feeding the UNet's "text_time"
  embedding with the size conditioning), Euler with SDXL settings.
- ``sd3``: an SD3.5-medium-style MMDiT (joint blocks, one with dual attention, RMS q/k norm), a 16-channel VAE,
  flow matching with shift 3, two projected CLIP encoders and a T5 encoder with a T5-layout tokenizer.
- ``flux`` (dev) / ``flux-schnell``: double-stream and single-stream blocks over packed 2x2 latents, the guidance
  embedding (dev only), a 16-channel VAE, flow matching with dynamic shifting (dev) or none (schnell), CLIP and T5.

Images are 64 px (FLUX's pipeline must be told: it defaults to 128 latent pixels). Same seed, same bits.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DiffusionPipeline,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    T5Config,
    T5EncoderModel,
    T5TokenizerFast,
)

from ..cli import HelpFormatter
from ..io import folder_mode
from .offline_tokenizers import clip_tokenizer, t5_tokenizer

MARKER = "tiny_sd.json"  # written last into every folder this module builds
DDPM_FAMILIES = ("sd", "sdxl")  # the UNet families; the others learn flow matching and have no prediction_type

# The real SD1.5 UNet architecture; built from this with random weights, benchmarks measure what users train.
SD15_UNET_CONFIG = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
)
# The real SDXL base UNet architecture (2.6B parameters), for the same purpose.
SDXL_UNET_CONFIG = dict(
    sample_size=128,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280),
    layers_per_block=2,
    cross_attention_dim=2048,
    attention_head_dim=(5, 10, 20),
    transformer_layers_per_block=(1, 2, 10),
    use_linear_projection=True,
    addition_embed_type="text_time",
    addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)


def ddim_scheduler(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        clip_sample=False,
        set_alpha_to_one=False,
        prediction_type=prediction_type,
    )


TINY_UNET = dict(sample_size=32, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1)


# SD3's and FLUX's VAE: 16 latent channels and no 1x1 convs around the latent.
FLOW_VAE = dict(latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
T5_WIDTH = 128  # twice the SD3 CLIP pair's 64, as 4096 is twice 768 + 1280: SD3's zero padding of CLIP states is real


def _vae(seed: int, scaling_factor: float, **overrides) -> AutoencoderKL:
    """A two-level VAE (8x downsampling becomes 2x); `overrides` give SD3's and FLUX's latent layout."""
    torch.manual_seed(seed)
    config = dict(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=64,
    )
    return AutoencoderKL(**{**config, **overrides}, scaling_factor=scaling_factor)


def _text_encoder(tokenizer: CLIPTokenizer, seed: int, projection_dim: int | None = None) -> CLIPTextModel:
    """A 5-layer CLIP text encoder; with ``projection_dim`` SDXL's second one (pooled, projected output)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        hidden_size=32,
        num_hidden_layers=5,
        num_attention_heads=4,
        intermediate_size=37,
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **({"projection_dim": projection_dim} if projection_dim else {}),
    )
    return CLIPTextModelWithProjection(config) if projection_dim else CLIPTextModel(config)


def _t5_encoder(tokenizer: T5TokenizerFast, seed: int) -> T5EncoderModel:
    """A 2-layer T5 v1.1 encoder (gated GELU, relative attention), the vocabulary padded to 32,128 as T5's is."""
    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=32128,
        d_model=T5_WIDTH,
        d_kv=32,
        d_ff=256,
        num_layers=2,
        num_heads=4,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    return T5EncoderModel(config)


def _build_sd(tokenizer: CLIPTokenizer, prediction_type: str, seed: int) -> StableDiffusionPipeline:
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    return StableDiffusionPipeline(
        vae=_vae(seed, 0.18215),
        text_encoder=_text_encoder(tokenizer, seed),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=ddim_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _build_sdxl(tokenizer: CLIPTokenizer, prediction_type: str, seed: int) -> StableDiffusionXLPipeline:
    """SDXL's layout: cross-attention over both encoders' states (32 + 32), and the pooled 32 + 6 size numbers x 8
    as the added embedding, as in the full model (1280 + 6 x 256)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=(2, 4),
        transformer_layers_per_block=(1, 2),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=32 + 6 * 8,
    )
    scheduler = EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        steps_offset=1,
        timestep_spacing="leading",
        prediction_type=prediction_type,
    )
    return StableDiffusionXLPipeline(
        vae=_vae(seed, 0.13025),
        text_encoder=_text_encoder(tokenizer, seed),
        text_encoder_2=_text_encoder(tokenizer, seed + 1, projection_dim=32),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )


def _build_sd3(clip: CLIPTokenizer, seed: int) -> StableDiffusion3Pipeline:
    """SD3.5 medium's layout: joint blocks (the last context-pre-only) over 2x2 patches, q/k RMS norms, dual attention
    in block 0; two projected CLIP encoders (pooled 32 + 32, as 768 + 1280) and T5."""
    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        caption_projection_dim=64,
        pooled_projection_dim=64,
        pos_embed_max_size=32,
        dual_attention_layers=(0,),
        qk_norm="rms_norm",
    )
    t5 = t5_tokenizer()
    return StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=_vae(seed, 1.5305, shift_factor=0.0609, **FLOW_VAE),
        text_encoder=_text_encoder(clip, seed, projection_dim=32),
        tokenizer=clip,
        text_encoder_2=_text_encoder(clip, seed + 1, projection_dim=32),
        tokenizer_2=clip,
        text_encoder_3=_t5_encoder(t5, seed + 2),
        tokenizer_3=t5,
    )


def _build_flux(clip: CLIPTokenizer, seed: int, schnell: bool = False) -> FluxPipeline:
    """FLUX.1's layout: double- then single-stream blocks on packed latents (16 channels x 2x2 = 64), 3-axis RoPE,
    CLIP's pooled output and T5's states; dev embeds the guidance scale and shifts by image size, schnell neither."""
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=64,
        num_layers=2,
        num_single_layers=2,
        attention_head_dim=16,
        num_attention_heads=4,
        joint_attention_dim=T5_WIDTH,
        pooled_projection_dim=32,
        guidance_embeds=not schnell,
        axes_dims_rope=(4, 6, 6),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0 if schnell else 3.0,
        use_dynamic_shifting=not schnell,
        base_shift=0.5,
        max_shift=1.15,
        base_image_seq_len=256,
        max_image_seq_len=4096,
    )
    t5 = t5_tokenizer()
    return FluxPipeline(
        scheduler=scheduler,
        vae=_vae(seed, 0.3611, shift_factor=0.1159, **FLOW_VAE),
        text_encoder=_text_encoder(clip, seed),
        tokenizer=clip,
        text_encoder_2=_t5_encoder(t5, seed + 1),
        tokenizer_2=t5,
        transformer=transformer,
    )


_BUILDERS: dict[str, Callable[..., DiffusionPipeline]] = {
    "sd": _build_sd,
    "sdxl": _build_sdxl,
    "sd3": _build_sd3,
    "flux": _build_flux,
    "flux-schnell": partial(_build_flux, schnell=True),
}
FAMILIES = tuple(_BUILDERS)


def _build_into(folder: Path, *, family: str, controlnet: bool, prediction_type: str | None, seed: int) -> None:
    """Build every component with fixed seeds and save the pipeline (and controlnet) into `folder`."""
    if family not in _BUILDERS:
        raise ValueError(f"family must be one of {', '.join(FAMILIES)}; got {family!r}")
    if controlnet and family != "sd":
        raise ValueError(f"only the tiny SD pipeline has a ControlNet; build {family} without --controlnet")
    options = {}
    if family in DDPM_FAMILIES:
        options["prediction_type"] = prediction_type or "epsilon"
        if options["prediction_type"] not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    elif prediction_type is not None:
        raise ValueError(f"{family} learns flow matching; prediction_type is for {' and '.join(DDPM_FAMILIES)}")
    pipe = _BUILDERS[family](clip_tokenizer(), seed=seed, **options)
    pipe.save_pretrained(folder, safe_serialization=True)
    names = ("unet", "transformer", "vae", "text_encoder", "text_encoder_2", "text_encoder_3")
    params = {name: _n_params(getattr(pipe, name)) for name in names if getattr(pipe, name, None) is not None}
    if controlnet:
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
        cn.save_pretrained(folder / "controlnet", safe_serialization=True)
        params["controlnet"] = _n_params(cn)
    info = {"builder": __name__, "family": family, "controlnet": controlnet, **options, "seed": seed}
    (folder / MARKER).write_text(json.dumps({**info, "params": params}, indent=2) + "\n")


def _n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def is_tiny_pipeline(path: str | os.PathLike) -> bool:
    """True if `path` is a complete folder written by this module."""
    path = Path(path)
    return (path / MARKER).is_file() and (path / "model_index.json").is_file()


def _publish(tmp: Path, target: Path) -> bool:
    """Rename `tmp` to `target` if `target` is absent or an empty folder. False if another writer got there first."""
    tmp.chmod(folder_mode())  # mkdtemp makes it 0700
    try:
        target.rmdir()  # only succeeds on an empty folder (Windows cannot rename onto one)
    except OSError:
        pass
    try:
        os.rename(tmp, target)
        return True
    except OSError:
        if target.exists():
            return False
        raise


def build_tiny_pipeline(
    out_dir: str | os.PathLike,
    *,
    family: str = "sd",
    controlnet: bool = False,
    prediction_type: str | None = None,
    seed: int = 0,
) -> Path:
    """Write a tiny pipeline of `family` (one of `FAMILIES`) to `out_dir` (plus `out_dir/controlnet` if asked, SD
    only); return it. `prediction_type` (SD and SDXL: "epsilon", the default, or "v_prediction") picks DDPM's target.

    The folder is built beside `out_dir` and renamed into place. An existing tiny pipeline there is replaced;
    any other non-empty folder (or a file) is refused.
    """
    out_dir = Path(out_dir).absolute()
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not is_tiny_pipeline(out_dir):
        raise FileExistsError(f"{out_dir} is a non-empty folder that is not a tiny pipeline; refusing to overwrite it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        _build_into(tmp, family=family, controlnet=controlnet, prediction_type=prediction_type, seed=seed)
        if not _publish(tmp, out_dir):  # an old tiny pipeline is there: swap it out
            if not is_tiny_pipeline(out_dir):
                raise FileExistsError(f"{out_dir} was filled by someone else while building; not touching it")
            old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
            os.replace(out_dir, old / "x")
            os.rename(tmp, out_dir)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def ensure_tiny_pipeline(cache_dir: str | os.PathLike, controlnet: bool = True) -> Path:
    """Return the tiny pipeline cached in `cache_dir`, building it first if absent. Safe when processes race."""
    target = Path(cache_dir).absolute() / ("tiny-sd-controlnet" if controlnet else "tiny-sd")
    if is_tiny_pipeline(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        _build_into(tmp, family="sd", controlnet=controlnet, prediction_type=None, seed=0)
        if not _publish(tmp, target) and not is_tiny_pipeline(target):
            raise FileExistsError(f"{target} exists and is not a tiny pipeline")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op when the rename won; the loser's copy otherwise
    return target


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hra_diffusion.testing.tiny", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out_dir", type=Path, help="folder to write the pipeline to")
    parser.add_argument("--family", choices=FAMILIES, default="sd", help="which pipeline layout to write")
    parser.add_argument("--sdxl", dest="family", action="store_const", const="sdxl", help="same as --family sdxl")
    parser.add_argument("--controlnet", action="store_true", help="also write OUT_DIR/controlnet (sd only)")
    parser.add_argument(
        "--prediction-type", choices=("epsilon", "v_prediction"), help="sd and sdxl only (default: epsilon)"
    )
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = build_tiny_pipeline(
        args.out_dir, family=args.family, controlnet=args.controlnet, prediction_type=args.prediction_type,
        seed=args.seed,
    )
    print(path)
    for name, n in json.loads((path / MARKER).read_text())["params"].items():
        print(f"{name}: {n:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
