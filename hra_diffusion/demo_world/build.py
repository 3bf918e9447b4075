"""Train the demo world from nothing: a VAE, a CLIP-style scorer (whose text tower is the pipeline's text encoder,
as in Stable Diffusion), a ViT for the DINO slot, and a latent text-to-image UNet, all on the world's pictures; then
a Canny control adapter for that pipeline, trained by the project's own control trainer.

Each stage writes its folder atomically and is skipped when the folder is already there, so an interrupted build
continues where it stopped. Step counts are fixed (not time budgets), so a build is the same on every machine;
the defaults take about 75 minutes on 2 CPU cores. `--quick` checks the whole chain in about a minute.
"""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..io import atomic_folder
from ..synthetic import write_control_dataset
from .scene import CLASSES, COLORS, PATTERNS, SCENES, SIZES, world_sample
from .subjects import write_subjects

SIZE = 64  # picture side in pixels; the VAE shrinks it 4x to 16 x 16 x 4 latents
MAX_TOKENS = 77
CONTROL_SEED = 1  # world seed of the control adapter's pictures (the base model saw seed 0; evaluations use 2)


@dataclass
class BuildConfig:
    images: int = 30000
    vae_steps: int = 1200
    clip_steps: int = 1000
    dino_steps: int = 600
    unet_steps: int = 4000
    unet_batch: int = 32
    control_images: int = 4000
    control_steps: int = 3000
    seed: int = 0

    @classmethod
    def quick(cls) -> BuildConfig:
        return cls(images=512, vae_steps=20, clip_steps=20, dino_steps=10, unet_steps=20, unet_batch=8,
                   control_images=16, control_steps=2)


# ---------------------------------------------------------------- helpers


def _stage(out: Path, name: str, log: dict, write: Callable[[Path], None]) -> None:
    """Build stage `name` into out/name with the library's atomic folder writer; skipped when it is already there."""
    if (out / name).exists():
        print(f"[{name}] already built, skipped")
        return
    start = time.time()
    atomic_folder(out / name, write)
    log[name] = {**log.get(name, {}), "seconds": round(time.time() - start, 1)}
    print(f"[{name}] done in {time.time() - start:.0f} s")


def _to_fp16_safetensors(folder: Path) -> None:
    """Store weights in float16: half the bytes in git; loaders upcast to the float32 they are asked for."""
    from safetensors.torch import load_file, save_file

    for path in folder.rglob("*.safetensors"):
        tensors = {k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in load_file(path).items()}
        save_file(tensors, path, metadata={"format": "pt"})


def _schedule(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def _train(name: str, params, steps: int, lr: float, loss_fn: Callable[[int], torch.Tensor],
           log: dict, on_step: Callable[[], None] | None = None) -> None:
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, max(1, steps // 20)))
    start, smooth = time.time(), None
    for step in range(steps):
        loss = loss_fn(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        if on_step is not None:
            on_step()
        smooth = loss.item() if smooth is None else 0.98 * smooth + 0.02 * loss.item()
        if step % 100 == 0 or step == steps - 1:
            print(f"[{name}] step {step}/{steps} loss {smooth:.4f} ({time.time() - start:.0f} s)", flush=True)
    log[name] = {"steps": steps, "final_loss": round(smooth, 5)}


class World:
    """The training pictures (uint8, N x 64 x 64 x 3), their captions and their attribute labels."""

    def __init__(self, n: int, seed: int) -> None:
        start = time.time()
        samples = [world_sample(i, seed, SIZE) for i in range(n)]
        self.pixels = torch.from_numpy(np.stack([np.asarray(s[0]) for s in samples])).permute(0, 3, 1, 2)
        self.captions = [s[1] for s in samples]
        colors, scenes, sizes = sorted(COLORS), list(SCENES), list(SIZES)
        self.labels = {
            "class": torch.tensor([CLASSES.index(s[2].cls) for s in samples]),
            "color": torch.tensor([colors.index(s[2].color_name) for s in samples]),
            "pattern": torch.tensor([PATTERNS.index(s[2].look.pattern) for s in samples]),
            "pattern_color": torch.tensor([colors.index(s[2].pattern_color_name) + 1 if s[2].pattern_color_name
                                           else 0 for s in samples]),
            "scene": torch.tensor([scenes.index(s[2].scene) for s in samples]),
            "size": torch.tensor([sizes.index(s[2].size) for s in samples]),
            "hat": torch.tensor([colors.index(s[2].hat) + 1 if s[2].hat else 0 for s in samples]),
        }
        print(f"[world] {n} pictures in {time.time() - start:.0f} s")

    def batch(self, rng: torch.Generator, size: int) -> torch.Tensor:
        return torch.randint(0, len(self.captions), (size,), generator=rng)

    def images(self, index: torch.Tensor, augment: bool = False, rng: torch.Generator | None = None) -> torch.Tensor:
        """Pictures in [-1, 1]; `augment` blurs some and adds noise, so scorers also read generated pictures."""
        x = self.pixels[index].float() / 127.5 - 1
        if augment:
            blur = torch.rand(len(x), generator=rng) < 0.4
            if blur.any():
                small = F.interpolate(x[blur], scale_factor=0.5, mode="bilinear", antialias=True)
                x[blur] = F.interpolate(small, size=SIZE, mode="bilinear")
            x = x + 0.03 * torch.randn(x.shape, generator=rng)
        return x


# ---------------------------------------------------------------- stages


def build_vae(world: World, cfg: BuildConfig, log: dict):
    from diffusers import AutoencoderKL

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=SIZE, layers_per_block=1, norm_num_groups=16,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),
    )
    rng = torch.Generator().manual_seed(cfg.seed)

    def loss_fn(step: int) -> torch.Tensor:
        x = world.images(world.batch(rng, 32))
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(generator=rng)).sample
        return F.l1_loss(recon, x) + F.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()

    vae.train()
    _train("vae", list(vae.parameters()), cfg.vae_steps, 2e-3, loss_fn, log)
    vae.eval()
    with torch.no_grad():
        sample = world.images(torch.arange(min(512, len(world.captions))))
        latents = vae.encode(sample).latent_dist.mean
        vae.register_to_config(scaling_factor=float(1 / latents.std()))
        recon = vae.decode(latents).sample
    log["vae"]["reconstruction_mae"] = round(float((recon - sample).abs().mean() / 2), 4)
    return vae


def build_scorer(world: World, cfg: BuildConfig, tokenizer, log: dict):
    """A CLIP (transformers CLIPModel) trained contrastively on the world's pictures and captions."""
    from transformers import CLIPConfig, CLIPModel

    text = dict(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=256,
                vocab_size=len(tokenizer), max_position_embeddings=MAX_TOKENS, bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    vision = dict(image_size=SIZE, patch_size=8, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                  intermediate_size=512)
    torch.manual_seed(cfg.seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=64))
    ids = tokenizer(world.captions, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                    return_tensors="pt").input_ids
    mean = torch.tensor([0.5, 0.5, 0.5]).view(1, 3, 1, 1)
    caption_ids = torch.unique(ids, dim=0, return_inverse=True)[1]
    rng = torch.Generator().manual_seed(cfg.seed + 1)

    def loss_fn(step: int) -> torch.Tensor:
        index = world.batch(rng, 128)
        pixels = (world.images(index, augment=True, rng=rng) + 1) / 2
        out = model(input_ids=ids[index], pixel_values=(pixels - mean) / 0.5)
        same = (caption_ids[index, None] == caption_ids[None, index]).float()
        target = same / same.sum(dim=1, keepdim=True)  # equal captions are all positives
        return (F.cross_entropy(out.logits_per_text, target) + F.cross_entropy(out.logits_per_image, target)) / 2

    model.train()
    _train("clip", list(model.parameters()), cfg.clip_steps, 1e-3, loss_fn, log)
    model.eval()
    # Words the world never uses ("qwe", "sks"...) kept their tiny initial embeddings; give them the length of
    # trained ones, as every token has in a CLIP trained on the web, so the text encoder does not ignore them.
    with torch.no_grad():
        emb = model.text_model.embeddings.token_embedding.weight
        seen = torch.zeros(len(emb), dtype=torch.bool)
        seen[ids.unique()] = True
        typical = emb[seen].norm(dim=1).mean()
        emb[~seen] = F.normalize(emb[~seen], dim=1) * typical
    return model


def save_scorer(model, tokenizer, folder: Path) -> None:
    from transformers import CLIPImageProcessor

    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE},
                       image_mean=[0.5] * 3, image_std=[0.5] * 3).save_pretrained(folder)


def build_dino(world: World, cfg: BuildConfig, log: dict):
    """A small ViT taught to name each picture's class, colors, pattern, hat, size and scene: its CLS token tells
    instances apart by look, which is what the DINO score measures."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(cfg.seed + 2)
    model = ViTModel(ViTConfig(image_size=SIZE, patch_size=8, hidden_size=128, num_hidden_layers=4,
                               num_attention_heads=4, intermediate_size=512))  # its pooler is unused
    heads = torch.nn.ModuleDict({k: torch.nn.Linear(128, int(v.max()) + 1) for k, v in world.labels.items()})
    rng = torch.Generator().manual_seed(cfg.seed + 3)

    def loss_fn(step: int) -> torch.Tensor:
        index = world.batch(rng, 128)
        cls = model(pixel_values=world.images(index, augment=True, rng=rng)).last_hidden_state[:, 0]
        return sum(F.cross_entropy(head(cls), world.labels[k][index]) for k, head in heads.items())

    model.train()
    _train("dino_slot", list(model.parameters()) + list(heads.parameters()), cfg.dino_steps, 1e-3, loss_fn, log)
    return model.eval()


def save_dino(model, folder: Path) -> None:
    from transformers import ViTImageProcessor

    model.save_pretrained(folder)
    ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                      resample=2).save_pretrained(folder)


def build_unet(world: World, cfg: BuildConfig, vae, text_encoder, tokenizer, scheduler, log: dict):
    """The latent UNet, trained as Stable Diffusion was: epsilon prediction, 10% empty captions for guidance,
    min-SNR weighting (gamma 5) and an exponential moving average of the weights."""
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    torch.manual_seed(cfg.seed + 4)
    unet = UNet2DConditionModel(
        sample_size=SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=16,
        block_out_channels=(48, 96, 192), attention_head_dim=(2, 4, 8),
        cross_attention_dim=text_encoder.config.hidden_size,
        down_block_types=("CrossAttnDownBlock2D",) * 3, up_block_types=("CrossAttnUpBlock2D",) * 3,
    )
    with torch.no_grad():  # the posterior of every picture, once
        moments = torch.cat([vae.encode(world.images(torch.arange(i, min(i + 256, len(world.captions)))))
                             .latent_dist.parameters for i in range(0, len(world.captions), 256)])
    scale = vae.config.scaling_factor
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    ema = EMAModel(unet.parameters(), decay=0.999, use_ema_warmup=True)
    rng = torch.Generator().manual_seed(cfg.seed + 5)
    py_rng = random.Random(cfg.seed + 6)

    def loss_fn(step: int) -> torch.Tensor:
        index = world.batch(rng, cfg.unet_batch)
        mean, logvar = moments[index].chunk(2, dim=1)
        latents = (mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=rng)) * scale
        texts = [world.captions[i] if py_rng.random() >= 0.1 else "" for i in index]
        with torch.no_grad():
            ids = tokenizer(texts, padding="max_length", max_length=MAX_TOKENS, truncation=True,
                            return_tensors="pt").input_ids
            states = text_encoder(ids)[0]
        noise = torch.randn(latents.shape, generator=rng)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(index),), generator=rng)
        pred = unet(scheduler.add_noise(latents, noise, t), t, states).sample
        weight = torch.clamp(snr[t], max=5.0) / snr[t]
        return (weight * (pred - noise).pow(2).mean(dim=(1, 2, 3))).mean()

    unet.train()
    _train("unet", list(unet.parameters()), cfg.unet_steps, 1e-3, loss_fn, log,
           on_step=lambda: ema.step(unet.parameters()))
    ema.copy_to(unet.parameters())
    return unet.eval()


def control_samples(n: int, seed: int = CONTROL_SEED) -> Iterator[tuple[Image.Image, None, str]]:
    """(picture, no condition map, caption) for write_control_dataset: the control trainer computes the maps."""
    for i in range(n):
        image, text, _ = world_sample(i, seed)
        yield image, None, text


def build_control(out: Path, cfg: BuildConfig, folder: Path) -> None:
    """A Canny control adapter for out/base, trained by ``training.control_hra`` (the command users run) with its
    defaults plus the residual hints (they bind the edges better here: docs/control.md), in a process of its own; its
    checkpoints in out/parts/control-run let an interrupted build resume."""
    run = out / "parts" / "control-run"
    data = out / "parts" / "control-data"
    if not data.exists():
        write_control_dataset(data, control_samples(cfg.control_images))
    command = [sys.executable, "-m", "training.control_hra", "--pretrained_model_name_or_path", str(out / "base"),
               "--train_data_dir", str(data), "--control_type", "canny", "--resolution", str(SIZE),
               "--control_residuals", "--train_batch_size", "8", "--max_train_steps", str(cfg.control_steps),
               "--checkpointing_steps", "500", "--checkpoints_total_limit", "1", "--seed", str(cfg.seed),
               "--num_validation_images", "0", "--report_to", "none", "--output_dir", str(run)]
    if any(run.glob("checkpoint-*")):
        command += ["--resume_from_checkpoint", "latest"]
    subprocess.run(command, check=True)
    for name in ("hra_control.safetensors", "README.md", "training_settings.json"):
        shutil.copy2(run / name, folder / name)


def _build_base(out: Path, cfg: BuildConfig, world: World, tokenizer, log: dict) -> None:
    """The pipeline folder and the scorers; parts/ keeps finished stages until base/ is written."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPModel, CLIPTextModel

    from ..testing.tiny import ddim_scheduler

    scheduler = ddim_scheduler("epsilon")
    _stage(out, "parts/vae", log, lambda tmp: build_vae(world, cfg, log).save_pretrained(tmp))
    vae = AutoencoderKL.from_pretrained(out / "parts/vae").eval()

    _stage(out, "scorer/clip", log, lambda tmp: save_scorer(build_scorer(world, cfg, tokenizer, log), tokenizer, tmp))
    clip = CLIPModel.from_pretrained(out / "scorer/clip")
    text_encoder = CLIPTextModel(clip.config.text_config)
    getattr(text_encoder, "text_model", text_encoder).load_state_dict(clip.text_model.state_dict())  # flat in v5
    text_encoder.eval().requires_grad_(False)

    _stage(out, "scorer/dino", log, lambda tmp: save_dino(build_dino(world, cfg, log), tmp))

    _stage(out, "parts/unet", log,
           lambda tmp: build_unet(world, cfg, vae, text_encoder, tokenizer, scheduler, log).save_pretrained(tmp))
    unet = UNet2DConditionModel.from_pretrained(out / "parts/unet")

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    _stage(out, "base", log, pipe.save_pretrained)


def build(out: str | Path, cfg: BuildConfig | None = None) -> Path:
    """Build (or finish building) the demo world into `out`: base/, scorer/clip, scorer/dino, subjects/, control/."""
    from ..testing.tiny import clip_tokenizer

    cfg = cfg or BuildConfig()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    log_path = out / "build_log.json"
    log = json.loads(log_path.read_text()) if log_path.exists() else {}
    log["config"] = asdict(cfg)
    if not (out / "base").exists():  # the world's pictures are rendered only for the stages that train on them
        _build_base(out, cfg, World(cfg.images, cfg.seed), clip_tokenizer(), log)
    _stage(out, "subjects", log, lambda tmp: write_subjects(tmp, SIZE))
    for folder in ("base", "scorer/clip", "scorer/dino"):
        _to_fp16_safetensors(out / folder)
    _stage(out, "control", log, lambda tmp: build_control(out, cfg, tmp))
    shutil.rmtree(out / "parts", ignore_errors=True)
    log_path.write_text(json.dumps(log, indent=2) + "\n")
    return out
