"""Offline tiny Stable Diffusion: the SD1.5 (or SDXL) layout at toy size, built from configs with random weights.

No model hub is reachable from the dev, CI and GPU machines, yet tests, benchmarks, the demo app and outside checks
need a real `StableDiffusionPipeline` folder to load by path. This module writes one (~1M-parameter UNet with real
attention and GEGLU layers, a small VAE and CLIP text encoder, DDIM with SD1.5 settings, optionally a ControlNet)
together with the real OpenAI CLIP BPE tokenizer rebuilt from the vocabulary file open_clip ships. ``--sdxl`` writes
a `StableDiffusionXLPipeline` instead: two text encoders (the second with a projection, its pooled output feeding
the UNet's "text_time" embedding with the size conditioning), Euler with SDXL settings. Same seed, same bits.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

from ..cli import HelpFormatter
from ..io import folder_mode

MARKER = "tiny_sd.json"  # written last into every folder this module builds
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
N_MERGES = 49152 - 256 - 2  # 48,894: what OpenAI CLIP (and SD1.5) use of the 262k-line BPE file

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


def _bytes_to_unicode() -> dict[int, str]:
    """OpenAI's reversible byte -> printable unicode map (same as CLIP / GPT-2)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _clip_bpe() -> tuple[tuple[str, ...], dict[str, int]]:
    """(merges, vocab) of OpenAI CLIP, from open_clip's bundled `bpe_simple_vocab_16e6.txt.gz`."""
    spec = importlib.util.find_spec("open_clip")  # locate the package without importing it (and torchvision)
    if spec is None or spec.origin is None:
        raise ModuleNotFoundError(
            'the CLIP vocabulary (bpe_simple_vocab_16e6) ships with open_clip: pip install "hra-studio[eval]"',
            name="open_clip",
        )
    bpe_path = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    merges = tuple(lines[1 : N_MERGES + 1])  # line 0 is a version header
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [t + "</w>" for t in byte_tokens] + [m.replace(" ", "") for m in merges] + [BOS, EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert len(vocab) == 49408, len(vocab)
    return merges, vocab


def clip_tokenizer(out_dir: Path | None = None) -> CLIPTokenizer:
    """The SD1.5 CLIP tokenizer (ids equal to open_clip's). Writes vocab.json/merges.txt to `out_dir` if given."""
    merges, vocab = _clip_bpe()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(out_dir) if out_dir is not None else Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
        (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")
        tokenizer = CLIPTokenizer.from_pretrained(
            folder, model_max_length=77, bos_token=BOS, eos_token=EOS, unk_token=EOS, pad_token=EOS
        )
        if out_dir is not None:
            tokenizer.save_pretrained(folder)  # loadable by path with the same settings
        return tokenizer


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


def _vae(seed: int, scaling_factor: float) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(32, 64),
        latent_channels=4,
        sample_size=64,
        scaling_factor=scaling_factor,
    )


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


def _build_into(folder: Path, *, controlnet: bool, prediction_type: str, seed: int, sdxl: bool = False) -> None:
    """Build every component with fixed seeds and save the pipeline (and controlnet) into `folder`."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if sdxl and controlnet:
        raise ValueError("the tiny SDXL pipeline has no ControlNet; build it without --controlnet")
    pipe = (_build_sdxl if sdxl else _build_sd)(clip_tokenizer(), prediction_type, seed)
    pipe.save_pretrained(folder, safe_serialization=True)
    names = ("unet", "vae", "text_encoder", "text_encoder_2")
    params = {name: _n_params(getattr(pipe, name)) for name in names if getattr(pipe, name, None) is not None}
    if controlnet:
        torch.manual_seed(seed)
        cn = ControlNetModel.from_unet(pipe.unet, conditioning_embedding_out_channels=(16, 32))
        cn.save_pretrained(folder / "controlnet", safe_serialization=True)
        params["controlnet"] = _n_params(cn)
    info = {"builder": __name__, "controlnet": controlnet, "prediction_type": prediction_type, "seed": seed}
    if sdxl:
        info["sdxl"] = True
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
    controlnet: bool = False,
    prediction_type: str = "epsilon",
    seed: int = 0,
    sdxl: bool = False,
) -> Path:
    """Write a tiny StableDiffusionPipeline (``sdxl``: StableDiffusionXLPipeline) folder to `out_dir` (plus
    `out_dir/controlnet` if asked); return it.

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
        _build_into(tmp, controlnet=controlnet, prediction_type=prediction_type, seed=seed, sdxl=sdxl)
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
        _build_into(tmp, controlnet=controlnet, prediction_type="epsilon", seed=0)
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
    parser.add_argument("--controlnet", action="store_true", help="also write OUT_DIR/controlnet")
    parser.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default="epsilon")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sdxl", action="store_true", help="an SDXL pipeline (two text encoders, size conditioning)")
    args = parser.parse_args(argv)
    path = build_tiny_pipeline(
        args.out_dir, controlnet=args.controlnet, prediction_type=args.prediction_type, seed=args.seed, sdxl=args.sdxl
    )
    print(path)
    for name, n in json.loads((path / MARKER).read_text())["params"].items():
        print(f"{name}: {n:,} parameters")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
