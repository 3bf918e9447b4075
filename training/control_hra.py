#!/usr/bin/env python
"""Controllable generation with HRA, the paper's way: HRA on the UNet plus a small hint encoder at ``conv_in``.

    accelerate launch training/control_hra.py \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
      --train_data_dir coco/ --control_type canny --train_batch_size 8 --num_train_epochs 11 \\
      --validation_image photo.jpg --validation_prompt "a kitchen with a wooden table" --output_dir out/

Then ``attach_adapters(load_pipeline(base), ["out/hra_control.safetensors"])`` and
``generate(pipe, prompt, control_image=make_condition(photo, "canny"))``; the guide is docs/control.md. This file is
the control part only (flags, data, condition maps, loss, model card); the loop, checkpoints, resume, logging and
signals live in hra_diffusion/training.py, shared with the other trainers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion import HRAConfig, add_hra, hra_parameters
from hra_diffusion.cli import HelpFormatter
from hra_diffusion.control import (
    ANNOTATORS,
    CONTROL_TARGETS,
    DETECTORS,
    ConditionEncoder,
    attach_control,
    control_condition,
    control_encoder,
    make_condition,
    save_control_adapter,
)
from hra_diffusion.data import ControlDataset, collate_control
from hra_diffusion.diffusion import encode_latents, encode_prompts, load_base, noisy_latents
from hra_diffusion.images import load_image
from hra_diffusion.io import atomic_write
from hra_diffusion.model_card import common_settings, sample_links, write_model_card
from hra_diffusion.pipelines import generate, is_sdxl
from hra_diffusion.training import (
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
    train,
    weight_dtype,
)

logger = logging.getLogger("control_hra")
CONTROL_FILE = "hra_control.safetensors"
CONTROL_TYPES = ("none", "canny", *DETECTORS)
CONTROL_LEARNING_RATE = 9e-4  # the released control script's, with the same vector initialization (docs/control.md)
VALIDATION_GUIDANCE = 9.0  # the paper samples controlled images with DDIM and guidance 9.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        formatter_class=HelpFormatter,
        description="Train an HRA control adapter (HRA + hint encoder) for SD 1.x/2.x.",
        epilog="Defaults differing from the DreamBooth trainer: "
        f"--learning_rate {CONTROL_LEARNING_RATE} (the released code's), "
        f"--hra_target_modules {','.join(CONTROL_TARGETS)}. Guide: docs/control.md.",
    )
    g = parser.add_argument_group("data")
    source = g.add_mutually_exclusive_group(required=True)
    source.add_argument("--train_data_dir", help="imagefolder with metadata.jsonl (image, conditioning_image, text)")
    source.add_argument("--dataset_name", help="Hugging Face dataset (needs `datasets`; exported once to --cache_dir)")
    g.add_argument("--dataset_config_name", default=None, help="config of --dataset_name")
    g.add_argument("--image_column", default="image", help="column of the target images")
    g.add_argument("--conditioning_image_column", default="conditioning_image", help="column of the condition maps")
    g.add_argument("--caption_column", default="text", help="column of the captions (a string or a list)")
    g.add_argument("--resolution", type=int, default=512, help="training size, a multiple of 8")
    g.add_argument("--random_crop", action="store_true", help="random instead of center crops")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips (condition flipped alike)")
    g.add_argument(
        "--proportion_empty_prompts",
        type=float,
        default=0.0,
        help="fraction of captions replaced by '' so the adapter learns to follow the condition alone",
    )

    g = parser.add_argument_group("condition maps")
    g.add_argument(
        "--control_type",
        default="none",
        choices=CONTROL_TYPES,
        help="none: the conditioning column holds the maps; otherwise maps are computed from the target images "
        "(when that column is absent) with controlnet-aux and cached",
    )
    g.add_argument("--canny_low_threshold", type=int, default=100)
    g.add_argument("--canny_high_threshold", type=int, default=200)
    g.add_argument("--annotator_weights", default=ANNOTATORS, help="local folder or cached hub id of detector weights")
    g.add_argument("--cache_dir", default=None, help="computed maps and exported datasets (default OUTPUT_DIR/cache)")
    g.add_argument(
        "--validation_image",
        nargs="+",
        default=None,
        help="condition maps for samples (photos when the maps are computed: converted with --control_type)",
    )

    add_training_args(parser, default_output_dir="hra-control-model")
    parser.set_defaults(learning_rate=CONTROL_LEARNING_RATE, hra_target_modules=",".join(CONTROL_TARGETS))
    args = parser.parse_args(argv)
    if not (args.resolution > 0 and args.resolution % 8 == 0):
        parser.error(f"--resolution must be a positive multiple of 8, got {args.resolution}")
    if args.validation_image and not args.validation_prompt:
        parser.error("--validation_image needs --validation_prompt")
    return args


# --------------------------------------------------------------------------------------------------------------------
# Data: Hugging Face datasets, condition maps


def export_hub_dataset(args: argparse.Namespace, root: Path, accelerator) -> Path:
    """--dataset_name as the imagefolder ControlDataset reads, so both sources share one dataset class.

    Every process loads (same error everywhere, no process left waiting), the main one writes; metadata.jsonl comes
    last, so a complete export is reused by later runs and an interrupted one is redone.
    """
    folder = root / re.sub(r"[^\w.-]+", "--", f"{args.dataset_name}--{args.dataset_config_name or 'default'}")
    if not (folder / "metadata.jsonl").is_file():
        try:
            import datasets
        except ImportError as err:
            raise TrainingError(
                "--dataset_name needs the `datasets` package (`pip install datasets`); or pass --train_data_dir with "
                "an imagefolder holding metadata.jsonl"
            ) from err
        try:
            data = datasets.load_dataset(args.dataset_name, args.dataset_config_name, split="train")
        except Exception as err:  # hub, network, cache and format errors all mean "cannot use this dataset"
            raise TrainingError(
                f"cannot load dataset {args.dataset_name!r} ({type(err).__name__}: {err}). Offline, only datasets "
                "already in the Hugging Face cache load; or pass --train_data_dir"
            ) from err
        if accelerator.is_main_process:
            _write_imagefolder(data, folder, args)
    accelerator.wait_for_everyone()
    return folder


def _write_imagefolder(data, folder: Path, args: argparse.Namespace) -> None:
    image_columns = {args.image_column: "images", args.conditioning_image_column: "conditioning_images"}
    image_columns = {column: sub for column, sub in image_columns.items() if column in data.column_names}
    rows = []
    for i, row in enumerate(tqdm(data, desc=f"exporting {args.dataset_name}")):
        entry = {args.caption_column: row.get(args.caption_column)}
        for column, sub in image_columns.items():
            if not isinstance(row[column], Image.Image):
                raise TrainingError(f"{args.dataset_name}: column {column!r} holds {type(row[column]).__name__}")
            entry[column] = f"{sub}/{i:07d}.png"
            atomic_write(folder / entry[column], lambda tmp, im=row[column]: im.save(tmp, format="PNG"))
        rows.append(entry)
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write(folder / "metadata.jsonl", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


class ConditionMaps:
    """ControlDataset's ``conditioning_transform``: make_condition on the cropped target, memoized on disk.

    Keyed by the target's pixels rather than its file name: a center crop hits the cache in every later epoch and run,
    and a random crop or flip gets an entry of its own instead of a stale map.
    """

    def __init__(self, control_type: str, folder: Path, low: int, high: int, weights: str) -> None:
        self.control_type, self.low, self.high, self.weights = control_type, low, high, weights
        self.folder = folder / control_type
        self.settings = f"{control_type}:{low}:{high}" if control_type == "canny" else control_type

    def check(self) -> None:
        """Fail now, not in the first batch, when controlnet-aux or the detector's weights are missing."""
        try:
            make_condition(Image.new("RGB", (64, 64)), self.control_type, self.low, self.high, weights=self.weights)
        except (FileNotFoundError, ImportError) as err:
            raise TrainingError(f"--control_type {self.control_type}: {err} (here: --annotator_weights)") from err

    def __call__(self, image: Image.Image) -> Image.Image:
        digest = hashlib.sha256(f"{self.settings}:{image.mode}:{image.size}".encode())
        digest.update(image.tobytes())
        path = self.folder / f"{digest.hexdigest()}.png"
        if path.is_file():
            with Image.open(path) as cached:
                return cached.convert("RGB")
        condition = make_condition(image, self.control_type, self.low, self.high, weights=self.weights)
        atomic_write(path, lambda tmp: condition.save(tmp, format="PNG"))
        return condition


# --------------------------------------------------------------------------------------------------------------------
# Model and loss


def add_control(unet: torch.nn.Module, config: HRAConfig, vae_scale_factor: int) -> ConditionEncoder:
    """HRA on the UNet, then the zero-initialized hint encoder attached (in this order: add_hra freezes every UNet
    parameter, an attached encoder included). At this point the controlled UNet computes exactly the base model."""
    try:
        add_hra(unet, config)
    except ValueError as err:
        raise TrainingError(f"--hra_target_modules: {err}") from err
    encoder = ConditionEncoder.for_unet(unet, vae_scale_factor)
    attach_control(unet, encoder)
    return encoder


def make_loss_fn(noise_scheduler, tokenizer):
    """MSE to the model's target with the batch's condition maps fed to the hint encoder. Prompts are encoded per
    batch, not cached: a control set has as many captions as images."""

    def loss_fn(batch: dict, models: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            latents = encode_latents(models["vae"], batch["pixel_values"])
            hidden = encode_prompts(tokenizer, models["text_encoder"], batch["prompts"], latents.device)
        noisy, timesteps, target = noisy_latents(noise_scheduler, latents)
        with control_condition(models["unet"], batch["conditioning_pixel_values"]):
            pred = models["unet"](noisy, timesteps, hidden).sample.float()
        return F.mse_loss(pred, target.float()), {}

    return loss_fn


# --------------------------------------------------------------------------------------------------------------------
# Model card


def write_card(args: argparse.Namespace, cfg: TrainConfig, result: TrainResult, counts: dict[str, int]) -> None:
    samples = sample_links(result.samples, cfg.output_dir)
    if samples:
        samples = f'Samples at step {result.step}, prompt "{args.validation_prompt}":\n\n{samples}'
    settings = {
        **common_settings(args, cfg, result.step),
        "data": args.train_data_dir or args.dataset_name,
        "control type": args.control_type,
        "empty prompts": args.proportion_empty_prompts,
        "trainable parameters": f"{counts['hra']:,} HRA + {counts['encoder']:,} condition encoder",
    }
    source = 'Image.open("photo.jpg")'
    condition = source if args.control_type == "none" else f'make_condition({source}, "{args.control_type}")'
    write_model_card(
        cfg.output_dir,
        base_model=args.pretrained_model_name_or_path,
        tags=("controlnet",),
        title=f"HRA control adapter ({args.control_type})",
        body=f"""A control adapter for `{args.pretrained_model_name_or_path}`: HRA reflections on the UNet plus a small
hint encoder whose output joins the UNet after `conv_in` (the HRA paper's controllable generation). One file,
`{CONTROL_FILE}`.

{samples}""",
        settings=settings,
        usage=f"""from PIL import Image
from hra_diffusion.control import make_condition
from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

pipe = load_pipeline("{args.pretrained_model_name_or_path}")
attach_adapters(pipe, ["{CONTROL_FILE}"])
condition = {condition}
image = generate(pipe, "a prompt", control_image=condition, steps=50, guidance=9.0, scheduler="ddim")[0]""",
    )


# --------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace, progress: ProgressFile) -> int:
    cfg = TrainConfig.from_args(args, tracker_project_name="control-hra")
    config = hra_config_from_args(args)
    validation_sources = [load_image(path) for path in args.validation_image or []]
    accelerator = make_accelerator(cfg)
    cache = Path(args.cache_dir).absolute() if args.cache_dir else cfg.output_dir / "cache"
    data_dir = args.train_data_dir or export_hub_dataset(args, cache / "datasets", accelerator)
    thresholds = [args.canny_low_threshold, args.canny_high_threshold]
    maps = None
    if args.control_type != "none":
        maps = ConditionMaps(args.control_type, cache / "conditions", *thresholds, args.annotator_weights)
    try:
        dataset = ControlDataset(
            data_dir,
            args.resolution,
            image_column=args.image_column,
            conditioning_image_column=args.conditioning_image_column,
            caption_column=args.caption_column,
            center_crop=not args.random_crop,
            random_flip=args.random_flip,
            proportion_empty_prompts=args.proportion_empty_prompts,
            seed=cfg.seed,
            conditioning_transform=maps,
        )
    except ValueError as err:
        raise TrainingError(str(err)) from err
    if dataset.conditions is None:
        maps.check()
        logger.info("condition maps: computed with %s, cached in %s", args.control_type, maps.folder)
    elif maps is not None:
        logger.info("condition maps: column %r (--control_type computes none)", args.conditioning_image_column)
    to_condition = maps if dataset.conditions is None else lambda image: image
    validation_conditions = [to_condition(image) for image in validation_sources]

    pipe, noise_scheduler = load_base(
        args.pretrained_model_name_or_path, device=accelerator.device, revision=args.revision, variant=args.variant
    )
    if is_sdxl(pipe):
        raise TrainingError(
            f"{args.pretrained_model_name_or_path} is an SDXL model; control_hra.py trains SD 1.x/2.x control adapters "
            "(SDXL personalization works: training/dreambooth_hra.py)"
        )
    torch.manual_seed(cfg.seed)  # the adapters' initial vectors depend on the seed alone
    encoder = add_control(pipe.unet, config, pipe.vae_scale_factor)
    counts = {
        "hra": sum(p.numel() for p in hra_parameters(pipe.unet)),
        "encoder": sum(p.numel() for p in encoder.parameters()),
    }
    if accelerator.is_main_process:
        print(f"trainable: {counts['hra']:,} HRA + {counts['encoder']:,} condition encoder", flush=True)

    def validate(step: int) -> list[Image.Image]:
        images = []
        for condition in validation_conditions:
            images += generate(
                pipe,
                args.validation_prompt,
                num_images=args.num_validation_images,
                seed=cfg.seed,
                steps=args.num_validation_inference_steps,
                guidance=VALIDATION_GUIDANCE,
                height=args.resolution,
                width=args.resolution,
                scheduler="ddim",
                control_image=condition,
            )
        return images

    def save(models: dict, path: Path, meta: dict) -> Path:
        unet = models["unet"]
        return save_control_adapter(unet, control_encoder(unet), path.with_name(CONTROL_FILE), metadata=meta)

    metadata = run_metadata(
        args,
        cfg,
        accelerator,
        noise_scheduler.config.prediction_type,
        "control_hra",
        control_type=args.control_type,
        canny_thresholds=thresholds if args.control_type == "canny" else None,
        dataset=args.train_data_dir or args.dataset_name,
        proportion_empty_prompts=args.proportion_empty_prompts,
    )
    spec = TrainSpec(
        dataset=dataset,
        collate_fn=collate_control,
        models={"unet": pipe.unet, "text_encoder": pipe.text_encoder, "vae": pipe.vae},
        trainable=("unet",),
        loss_fn=make_loss_fn(noise_scheduler, pipe.tokenizer),
        validate=validate if validation_conditions and args.num_validation_images > 0 else None,
        metadata=metadata,
        tracker_config={**vars(args), "seed": cfg.seed, "weight_dtype": str(weight_dtype(accelerator))},
        save_adapter=save,
        finish=lambda result: write_card(args, cfg, result, counts),
    )
    train(accelerator, cfg, spec, progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
