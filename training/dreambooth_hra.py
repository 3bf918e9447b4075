#!/usr/bin/env python
"""DreamBooth with HRA: teach Stable Diffusion (1.x, 2.x, SDXL) a subject from a few photos; the result is one adapter
file.

    accelerate launch training/dreambooth_hra.py \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
      --instance_data_dir photos/ --instance_prompt "a photo of sks dog" \\
      --with_prior_preservation --class_prompt "a photo of a dog" --class_data_dir class_dog \\
      --output_dir out/ --max_train_steps 500

Then ``attach_adapters(load_pipeline(base), ["out/hra_adapter.safetensors"])``. The guide is docs/personalize.md.
This file is the DreamBooth part only (flags, data, class images, loss, model card); the loop, checkpoints, resume,
logging and signals live in hra_diffusion/training.py, shared with the other trainers.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion import add_hra
from hra_diffusion.cli import HelpFormatter
from hra_diffusion.data import DreamBoothDataset, collate_dreambooth
from hra_diffusion.diffusion import PromptEncoder, encode_latents, load_base, noisy_latents, sdxl_time_ids
from hra_diffusion.images import require_images, scan_images
from hra_diffusion.io import atomic_write
from hra_diffusion.model_card import common_settings, sample_links, write_model_card
from hra_diffusion.pipelines import fp32_vae_decode, generate, is_sdxl, pipeline_components
from hra_diffusion.training import (
    ADAPTER_FILE,
    DTYPES,
    STOP,
    ProgressFile,
    TrainConfig,
    TrainingError,
    TrainResult,
    TrainSpec,
    add_training_args,
    hra_config_from_args,
    make_accelerator,
    run_cli,
    run_metadata,
    stop_agreed,
    train,
    weight_dtype,
)

logger = logging.getLogger("dreambooth_hra")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
GRID_FILE = "sample_grid.png"


# Named default sets; flags given explicitly still win. "quick" is the flags' own defaults, sized for a first try.
PRESETS: dict[str, dict[str, object]] = {
    "quick": {},
    "paper": {"max_train_steps": 2000, "num_class_images": 200, "with_prior_preservation": True},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="DreamBooth with HRA adapters for Stable Diffusion 1.x/2.x and SDXL.",
        formatter_class=HelpFormatter,
    )
    g = parser.add_argument_group("subject")
    g.add_argument("--instance_data_dir", required=True, help="folder of subject photos (JPEG/PNG/WebP, any size)")
    g.add_argument("--instance_prompt", required=True, help='prompt with the identifier, e.g. "a photo of sks dog"')
    g.add_argument(
        "--ignore_captions",
        action="store_true",
        help="use --instance_prompt for every photo even where a same-name .txt/.caption file exists",
    )
    g.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="training size, a multiple of 8: shorter side resized, then cropped (default: the model's own size, "
        "512 for SD1.5, 1024 for SDXL, 64 for the demo world)",
    )
    g.add_argument("--center_crop", action="store_true", help="center crop (default: random crop)")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips")
    g.add_argument(
        "--train_text_encoder",
        action="store_true",
        help="also put HRA on the text encoders' q_proj/k_proj/v_proj/out_proj (SDXL: both encoders)",
    )
    g.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="another VAE, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE is kept in fp32 instead)",
    )

    g = parser.add_argument_group("prior preservation")
    g.add_argument(
        "--with_prior_preservation",
        action="store_true",
        help="also train on base-model images of the class so the class keeps its variety",
    )
    g.add_argument("--class_data_dir", default=None, help="class images; missing ones are generated here")
    g.add_argument("--class_prompt", default=None, help='e.g. "a photo of a dog"')
    g.add_argument("--num_class_images", type=int, default=100)
    g.add_argument("--prior_loss_weight", type=float, default=1.0)
    g.add_argument("--sample_batch_size", type=int, default=4, help="batch size when generating class images")
    g.add_argument("--num_class_inference_steps", type=int, default=50)
    g.add_argument(
        "--prior_generation_precision",
        default=None,
        choices=("fp32", "fp16", "bf16"),
        help="autocast dtype for class images (default: fp16 on GPU, fp32 on CPU)",
    )

    add_training_args(parser, default_output_dir="hra-dreambooth-model")
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="quick",
        help="quick: the defaults above (500 steps, 100 class images, prior preservation off); paper: the HRA "
        "paper's DreamBooth runs (2000 steps, 200 class images, prior preservation on)",
    )
    preset = argparse.ArgumentParser(add_help=False)
    preset.add_argument("--preset", choices=sorted(PRESETS), default="quick")
    parser.set_defaults(**PRESETS[preset.parse_known_args(argv)[0].preset])
    args = parser.parse_args(argv)
    if args.resolution is not None and not (args.resolution > 0 and args.resolution % 8 == 0):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.with_prior_preservation and (not args.class_data_dir or not args.class_prompt):
        parser.error("--with_prior_preservation needs --class_data_dir and --class_prompt")
    if not args.with_prior_preservation and (args.class_data_dir or args.class_prompt):
        logger.warning("--class_data_dir/--class_prompt are ignored without --with_prior_preservation")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Prior preservation: class images from the base model


def generate_class_images(pipe, args: argparse.Namespace, accelerator, seed: int) -> None:
    """Top up --class_data_dir to --num_class_images with images of --class_prompt from the base model.

    Resumable: usable images already there count, new ones get free names class-NNNNN.png and appear atomically, so
    an interrupted run never leaves half-written files and a rerun generates nothing twice. Each image's seed comes
    from its name, so the set does not depend on the batch size or the number of processes that share the work.
    """
    folder = Path(args.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    present = len(scan_images(folder)[0])
    missing = args.num_class_images - present
    names, i = [], 0
    while len(names) < missing:
        if not (folder / f"class-{i:05d}.png").exists():
            names.append(f"class-{i:05d}.png")
        i += 1
    accelerator.wait_for_everyone()  # every process has counted and named before any writes
    if missing <= 0:
        logger.info("class images: %d in %s, none to generate", present, folder)
        return
    mine = names[accelerator.process_index :: accelerator.num_processes]
    logger.info("class images: %d in %s, generating %d with the base model", present, folder, missing)
    precision = args.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = DTYPES["no" if precision == "fp32" else precision]
    autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(total=len(mine), desc="class images", disable=not accelerator.is_local_main_process)
    for start in range(0, len(mine), args.sample_batch_size):
        if STOP.requested:
            break
        batch = mine[start : start + args.sample_batch_size]
        generators = [torch.Generator("cpu").manual_seed(_name_seed(seed, name)) for name in batch]
        with autocast, fp32_vae_decode(pipe):
            images = pipe(
                prompt=[args.class_prompt] * len(batch),
                num_inference_steps=args.num_class_inference_steps,
                generator=generators,
            ).images
        for name, image in zip(batch, images):
            atomic_write(folder / name, lambda tmp, im=image: im.save(tmp, format="PNG"))
        bar.update(len(batch))
    bar.close()
    accelerator.wait_for_everyone()


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


# --------------------------------------------------------------------------------------------------------------------
# The DreamBooth loss


def make_loss_fn(noise_scheduler, prompts: PromptEncoder, args: argparse.Namespace):
    """MSE to the model's target (noise for epsilon models, velocity for v-prediction) on the instance half, plus
    --prior_loss_weight times the same on the class half (the batch is instance images, then class images)."""

    def loss_fn(batch: dict, models: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            latents = encode_latents(models["vae"], batch["pixel_values"])
        noisy, timesteps, target = noisy_latents(noise_scheduler, latents)
        hidden, pooled = prompts(batch["prompts"], models, latents.device)
        added = None
        if pooled is not None:  # SDXL: the pooled prompt and the size conditioning join the timestep embedding
            time_ids = sdxl_time_ids(batch["size_crop"].to(latents.device), args.resolution)
            added = {"text_embeds": pooled, "time_ids": time_ids.to(pooled.dtype)}
        pred = models["unet"](noisy, timesteps, hidden, added_cond_kwargs=added).sample.float()
        target = target.float()
        if not args.with_prior_preservation:
            return F.mse_loss(pred, target), {}
        pred, pred_prior = pred.chunk(2)
        target, target_prior = target.chunk(2)
        instance = F.mse_loss(pred, target)
        prior = F.mse_loss(pred_prior, target_prior)
        return instance + args.prior_loss_weight * prior, {"instance_loss": instance.item(), "prior_loss": prior.item()}

    return loss_fn


# --------------------------------------------------------------------------------------------------------------------
# Model card


def image_grid(images: list[Image.Image]) -> Image.Image:
    cols = min(4, len(images))
    rows = math.ceil(len(images) / cols)
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h), "white")
    for i, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((i % cols) * w, (i // cols) * h))
    return grid


def write_card(args: argparse.Namespace, cfg: TrainConfig, result: TrainResult, n_photos: int, sdxl: bool) -> None:
    out = cfg.output_dir
    samples = ""
    if result.samples:
        atomic_write(
            out / GRID_FILE, lambda tmp: image_grid([Image.open(p) for p in result.samples]).save(tmp, format="PNG")
        )
        samples = f"![samples]({GRID_FILE})\n\n{sample_links(result.samples, out)}"
    prompt = args.validation_prompt or args.instance_prompt
    if samples:
        samples = f'Samples at step {result.step}, prompt "{prompt}", seed {cfg.seed}:\n\n{samples}'
    prior = f'{args.num_class_images} images of "{args.class_prompt}", weight {args.prior_loss_weight}'
    settings = {
        **common_settings(args, cfg, result.step),
        "text encoder trained": args.train_text_encoder,
        "prior preservation": prior if args.with_prior_preservation else "off",
    }
    write_model_card(
        out,
        base_model=args.pretrained_model_name_or_path,
        front_matter={"instance_prompt": args.instance_prompt},
        tags=("text-to-image", "dreambooth", *(("stable-diffusion-xl",) if sdxl else ())),
        title=f'HRA DreamBooth: "{args.instance_prompt}"',
        body=f"""HRA (Householder reflection adaptation) weights for `{args.pretrained_model_name_or_path}`, trained
with DreamBooth on {n_photos} photos. The file `{ADAPTER_FILE}` holds r={args.hra_r} reflection vectors per adapted
layer; the base model's weights are untouched.

{samples}""",
        settings=settings,
        usage=f"""from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

pipe = load_pipeline("{args.pretrained_model_name_or_path}")
attach_adapters(pipe, ["{ADAPTER_FILE}"])
image = generate(pipe, "{prompt}", seed=0)[0]""",
        notes="""`attach_adapters(pipe, [path], strengths=[0.5])` applies it at half strength (an exact orthogonal
interpolation). This is not a LoRA file: diffusers' `load_lora_weights` cannot read it; `python -m
hra_diffusion.convert` exports one that it can.""",
    )


# --------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, progress: ProgressFile) -> int:
    cfg = TrainConfig.from_args(args, tracker_project_name="dreambooth-hra")
    unet_config = hra_config_from_args(args)
    text_config = hra_config_from_args(args, TEXT_ENCODER_TARGETS)
    photos = require_images(args.instance_data_dir)  # fail on unusable photos before loading gigabytes of model
    accelerator = make_accelerator(cfg)

    pipe, noise_scheduler = load_base(
        args.pretrained_model_name_or_path,
        device=accelerator.device,
        revision=args.revision,
        variant=args.variant,
        vae=args.pretrained_vae_model_name_or_path,
    )
    sdxl = is_sdxl(pipe)
    if args.resolution is None:  # the size the model was trained at, as diffusers' pipelines default to
        args.resolution = pipe.unet.config.sample_size * pipe.vae_scale_factor
    if args.with_prior_preservation:
        generate_class_images(pipe, args, accelerator, cfg.seed)
        if stop_agreed(accelerator):
            progress.emit("stopped", step=0, adapter=None)
            return 0
    dataset = DreamBoothDataset(
        args.instance_data_dir,
        args.instance_prompt,
        args.resolution,
        center_crop=args.center_crop,
        random_flip=args.random_flip,
        class_dir=args.class_data_dir if args.with_prior_preservation else None,
        class_prompt=args.class_prompt,
        seed=cfg.seed,
        use_captions=not args.ignore_captions,
    )

    models = {**pipeline_components(pipe), "vae": pipe.vae}
    text_encoders = tuple(name for name in models if name.startswith("text_encoder"))
    trainable = ("unet", *text_encoders) if args.train_text_encoder else ("unet",)
    configs = {"unet": unet_config, "text_encoder": text_config, "text_encoder_2": text_config}
    if sdxl:  # SDXL reads text_encoder's penultimate states: its last layer never reaches the UNet, so adapt none of it
        last = models["text_encoder"].config.num_hidden_layers - 1
        configs["text_encoder"] = dataclasses.replace(text_config, exclude_modules=rf".*\.layers\.{last}\..*")
    torch.manual_seed(cfg.seed)  # the adapters' initial vectors depend on the seed alone
    try:
        for name in trainable:
            add_hra(models[name], configs[name])
    except ValueError as err:
        raise TrainingError(f"--hra_target_modules: {err}") from err

    def validate(step: int) -> list[Image.Image]:
        return generate(
            pipe,
            args.validation_prompt or args.instance_prompt,
            num_images=args.num_validation_images,
            seed=cfg.seed,
            steps=args.num_validation_inference_steps,
            height=args.resolution,
            width=args.resolution,
            scheduler="dpm",
        )

    metadata = run_metadata(
        args,
        cfg,
        accelerator,
        noise_scheduler.config.prediction_type,
        "dreambooth_hra",
        instance_prompt=args.instance_prompt,
        class_prompt=args.class_prompt if args.with_prior_preservation else None,
        prior_loss_weight=args.prior_loss_weight if args.with_prior_preservation else None,
        train_text_encoder=args.train_text_encoder,
        pipeline=type(pipe).__name__,
    )
    spec = TrainSpec(
        dataset=dataset,
        collate_fn=lambda examples: collate_dreambooth(examples, args.with_prior_preservation),
        models=models,
        trainable=trainable,
        loss_fn=make_loss_fn(noise_scheduler, PromptEncoder(pipe, cache=not args.train_text_encoder), args),
        validate=validate if args.num_validation_images > 0 else None,
        metadata=metadata,
        tracker_config={**vars(args), "seed": cfg.seed, "weight_dtype": str(weight_dtype(accelerator))},
        finish=lambda result: write_card(args, cfg, result, len(photos), sdxl),
        keep_fp32=("vae",) if sdxl and args.pretrained_vae_model_name_or_path is None else (),  # fp16 overflows it
    )
    train(accelerator, cfg, spec, progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
