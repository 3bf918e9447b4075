#!/usr/bin/env python
"""Controllable generation with HRA, the paper's way: HRA on the UNet plus a small hint encoder at ``conv_in``.
``--adapter lora|oft`` trains the baselines the same way (same encoder, targets, loop and data).

    accelerate launch training/control_hra.py \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
      --train_data_dir coco/ --control_type canny --train_batch_size 8 --num_train_epochs 11 \\
      --validation_image photo.jpg --validation_prompt "a kitchen with a wooden table" --output_dir out/

Then ``attach_adapters(load_pipeline(base), ["out/hra_control.safetensors"])`` (any kind:
``attach_trained(pipe, find_trained("out"), "control")``) and
``generate(pipe, prompt, control_image=make_condition(photo, "canny"))``; the guide is docs/control.md. This file is
the control part only (settings, data, condition maps, model card); the loop, checkpoints, resume, logging and
signals live in hra_diffusion/train/, the loss in hra_diffusion/diffusion.py, shared with the other trainers.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion import HRAConfig
from hra_diffusion.baselines import LORA_WEIGHT_NAME, OFT_FOLDER, BaselineConfig, adapter_saver, add_adapter
from hra_diffusion.control import (
    ANNOTATORS,
    CONTROL_ENCODER_FILE,
    CONTROL_FILE,
    CONTROL_TARGETS,
    DETECTORS,
    ConditionEncoder,
    attach_control,
    control_encoder,
    make_condition,
    save_control_adapter,
    save_control_encoder,
)
from hra_diffusion.data import ControlDataset, collate_control
from hra_diffusion.diffusion import PromptEncoder, denoising_loss, load_base
from hra_diffusion.families import SUPPORTED_CONTROL
from hra_diffusion.images import load_image
from hra_diffusion.io import atomic_write
from hra_diffusion.model_card import common_settings, sample_links, write_model_card
from hra_diffusion.pipelines import generate, pipeline_components
from hra_diffusion.train import TrainingError, TrainResult, TrainSettings, TrainSpec, train
from hra_diffusion.train.cli import run_cli
from hra_diffusion.train.events import ProgressFile
from hra_diffusion.train.runtime import make_accelerator
from hra_diffusion.train.settings import SettingsError, inherit, option, parse

logger = logging.getLogger("control_hra")
CONTROL_TYPES = ("none", "canny", *DETECTORS)
CONTROL_LEARNING_RATE = 9e-4  # the released control script's, with the same vector initialization (docs/control.md)
VALIDATION_GUIDANCE = 9.0  # the paper samples controlled images with DDIM and guidance 9.0


@dataclass(kw_only=True)
class ControlSettings(TrainSettings):
    """The control trainer's settings: the shared ones plus the data and its condition maps."""

    train_data_dir: str | None = option(None, group="data", help="imagefolder with metadata.jsonl (image, "
                                        "conditioning_image, text); this or --dataset_name")
    dataset_name: str | None = option(None, group="data", help="Hugging Face dataset (needs `datasets`; exported "
                                      "once to --cache_dir)")
    dataset_config_name: str | None = option(None, group="data", help="config of --dataset_name")
    image_column: str = option("image", group="data", help="column of the target images")
    conditioning_image_column: str = option("conditioning_image", group="data",
                                            help="column of the condition maps")
    caption_column: str = option("text", group="data", help="column of the captions (a string or a list)")
    random_crop: bool = option(False, group="data", help="random instead of center crops")
    random_flip: bool = option(False, group="data", help="random horizontal flips (condition flipped alike)")
    proportion_empty_prompts: float = option(0.0, group="data", range=(0.0, 1.0), help="fraction of captions "
                                             "replaced by '' so the adapter learns to follow the condition alone")
    control_residuals: bool = option(False, group="condition maps", help="also add the hint to every skip "
                                     "connection of the UNet's down blocks and to its mid block (ControlNet's "
                                     "places; one zero-initialized 1x1 conv each); off: the paper's design, the "
                                     "hint joins after conv_in only")

    control_type: str = option("none", group="condition maps", choices=CONTROL_TYPES,
                               help="none: the conditioning column holds the maps; otherwise maps are computed from "
                               "the target images (when that column is absent) with controlnet-aux and cached")
    canny_low_threshold: int = option(100, group="condition maps", range=(0, 255), help="Canny's lower threshold")
    canny_high_threshold: int = option(200, group="condition maps", range=(0, 255), help="Canny's upper threshold")
    annotator_weights: str = option(ANNOTATORS, group="condition maps",
                                    help="local folder or cached hub id of detector weights")
    cache_dir: str | None = option(None, group="condition maps",
                                   help="computed maps and exported datasets (default OUTPUT_DIR/cache)")
    validation_image: list[str] | None = option(None, group="validation", help="condition maps for samples "
                                                "(photos when the maps are computed: converted with --control_type)")

    resolution: int | None = option(512, group="base model", help="training size, a multiple of 8")
    output_dir: str = inherit("output_dir", "hra-control-model")
    learning_rate: float = inherit("learning_rate", CONTROL_LEARNING_RATE)
    hra_target_modules: str = inherit("hra_target_modules", ",".join(CONTROL_TARGETS))

    tracker_project_name: ClassVar[str] = "control-hra"

    def __post_init__(self) -> None:
        super().__post_init__()
        if (self.train_data_dir is None) == (self.dataset_name is None):
            raise SettingsError("give one of --train_data_dir and --dataset_name")
        if self.validation_image and not self.validation_prompt:
            raise SettingsError("--validation_image needs --validation_prompt")


def parse_args(argv: list[str] | None = None) -> ControlSettings:
    return parse(
        ControlSettings,
        argv,
        description="Train a control adapter (HRA, or --adapter lora/oft, + hint encoder) for SD 1.x/2.x.",
        epilog="Defaults differing from the DreamBooth trainer: "
        f"--learning_rate {CONTROL_LEARNING_RATE} (the released code's), "
        f"--hra_target_modules {','.join(CONTROL_TARGETS)}. Guide: docs/control.md.",
    )


# --------------------------------------------------------------------------------------------------------------------
# Data: Hugging Face datasets, condition maps


def export_hub_dataset(settings: ControlSettings, root: Path, accelerator) -> Path:
    """--dataset_name as the imagefolder ControlDataset reads, so both sources share one dataset class.

    Every process loads (same error everywhere, no process left waiting), the main one writes; metadata.jsonl comes
    last, so a complete export is reused by later runs and an interrupted one is redone.
    """
    folder = root / re.sub(r"[^\w.-]+", "--", f"{settings.dataset_name}--{settings.dataset_config_name or 'default'}")
    if not (folder / "metadata.jsonl").is_file():
        try:
            import datasets
        except ImportError as err:
            raise TrainingError(
                "--dataset_name needs the `datasets` package (`pip install datasets`); or pass --train_data_dir with "
                "an imagefolder holding metadata.jsonl"
            ) from err
        try:
            data = datasets.load_dataset(settings.dataset_name, settings.dataset_config_name, split="train")
        except Exception as err:  # hub, network, cache and format errors all mean "cannot use this dataset"
            raise TrainingError(
                f"cannot load dataset {settings.dataset_name!r} ({type(err).__name__}: {err}). Offline, only datasets "
                "already in the Hugging Face cache load; or pass --train_data_dir"
            ) from err
        if accelerator.is_main_process:
            _write_imagefolder(data, folder, settings)
    accelerator.wait_for_everyone()
    return folder


def _write_imagefolder(data, folder: Path, settings: ControlSettings) -> None:
    image_columns = {settings.image_column: "images", settings.conditioning_image_column: "conditioning_images"}
    image_columns = {column: sub for column, sub in image_columns.items() if column in data.column_names}
    rows = []
    for i, row in enumerate(tqdm(data, desc=f"exporting {settings.dataset_name}")):
        entry = {settings.caption_column: row.get(settings.caption_column)}
        for column, sub in image_columns.items():
            if not isinstance(row[column], Image.Image):
                raise TrainingError(f"{settings.dataset_name}: column {column!r} holds {type(row[column]).__name__}")
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


def add_control(unet: torch.nn.Module, config: HRAConfig | BaselineConfig, vae_scale_factor: int,
                residuals: bool = False) -> ConditionEncoder:
    """The adapter on the UNet, then the zero-initialized hint encoder attached (in this order: add_hra and peft's
    injection freeze every other UNet parameter, an attached encoder included). At this point the controlled UNet
    computes exactly the base model."""
    try:
        add_adapter(unet, config)
    except ValueError as err:
        raise TrainingError(f"--hra_target_modules: {err}") from err
    encoder = ConditionEncoder.for_unet(unet, vae_scale_factor, residuals=residuals)
    attach_control(unet, encoder)
    return encoder


# --------------------------------------------------------------------------------------------------------------------
# Model card


METHOD_NAMES = {"hra": "HRA", "lora": "LoRA", "oft": "OFT"}


def _card_files(settings: ControlSettings) -> tuple[str, str]:
    """(what the files are, the lines that put them on ``pipe``), per --adapter."""
    if settings.adapter == "hra":
        return (f"One file, `{CONTROL_FILE}`: the HRA reflections and the encoder.",
                f'from hra_diffusion.pipelines import attach_adapters\n\nattach_adapters(pipe, ["{CONTROL_FILE}"])')
    adapter = (f"`{LORA_WEIGHT_NAME}` (a rank-{settings.rank} LoRA in diffusers' keys)" if settings.adapter == "lora"
               else f"`{OFT_FOLDER}/unet/` (a peft OFT folder, block size {settings.oft_block_size})")
    return (f"{adapter} and the encoder in `{CONTROL_ENCODER_FILE}`. Trained by HRA Studio as a baseline, with the "
            "same loop, data and encoder as its HRA control adapters.",
            'from hra_diffusion.baselines import attach_trained, find_trained\n\n'
            'attach_trained(pipe, find_trained("."), "control")  # the adapter with its loader, then the encoder')


def write_card(settings: ControlSettings, result: TrainResult, counts: dict[str, int]) -> None:
    samples = sample_links(result.samples, settings.output_path)
    if samples:
        samples = f'Samples at step {result.step}, prompt "{settings.validation_prompt}":\n\n{samples}'
    method = METHOD_NAMES[settings.adapter]
    joins = ", and at every skip connection, where ControlNet adds its residuals" if settings.control_residuals else ""
    rows = {
        **common_settings(settings, result.step),
        "data": settings.train_data_dir or settings.dataset_name,
        "control type": settings.control_type,
        "empty prompts": settings.proportion_empty_prompts,
        "trainable parameters": f"{counts['adapter']:,} {method} + {counts['encoder']:,} condition encoder",
    }
    source = 'Image.open("photo.jpg")'
    condition = source if settings.control_type == "none" else f'make_condition({source}, "{settings.control_type}")'
    files, attach = _card_files(settings)
    write_model_card(
        settings.output_path,
        base_model=settings.pretrained_model_name_or_path,
        tags=("controlnet",),
        title=f"{method} control adapter ({settings.control_type})",
        body=f"""A control adapter for `{settings.pretrained_model_name_or_path}`: {method} on the UNet plus a small
hint encoder whose output joins the UNet after `conv_in` (the HRA paper's controllable generation){joins}. {files}

{samples}""",
        settings=rows,
        usage=f"""from PIL import Image
from hra_diffusion.control import make_condition
from hra_diffusion.pipelines import generate, load_pipeline

pipe = load_pipeline("{settings.pretrained_model_name_or_path}")
{attach}
condition = {condition}
image = generate(pipe, "a prompt", control_image=condition, steps=50, guidance=9.0, scheduler="ddim")[0]""",
    )


# --------------------------------------------------------------------------------------------------------------------


def run(settings: ControlSettings, progress: ProgressFile) -> int:
    config = settings.adapter_config()
    validation_sources = [load_image(path) for path in settings.validation_image or []]
    accelerator = make_accelerator(settings)
    cache = Path(settings.cache_dir).absolute() if settings.cache_dir else settings.output_path / "cache"
    data_dir = settings.train_data_dir or export_hub_dataset(settings, cache / "datasets", accelerator)
    thresholds = [settings.canny_low_threshold, settings.canny_high_threshold]
    maps = None
    if settings.control_type != "none":
        maps = ConditionMaps(settings.control_type, cache / "conditions", *thresholds, settings.annotator_weights)
    try:
        dataset = ControlDataset(
            data_dir,
            settings.resolution,
            image_column=settings.image_column,
            conditioning_image_column=settings.conditioning_image_column,
            caption_column=settings.caption_column,
            center_crop=not settings.random_crop,
            random_flip=settings.random_flip,
            proportion_empty_prompts=settings.proportion_empty_prompts,
            seed=settings.seed,
            conditioning_transform=maps,
        )
    except ValueError as err:
        raise TrainingError(str(err)) from err
    if dataset.conditions is None:
        maps.check()
        logger.info("condition maps: computed with %s, cached in %s", settings.control_type, maps.folder)
    elif maps is not None:
        logger.info("condition maps: column %r (--control_type computes none)", settings.conditioning_image_column)
    to_condition = maps if dataset.conditions is None else lambda image: image
    validation_conditions = [to_condition(image) for image in validation_sources]

    pipe, family, objective = load_base(
        settings.pretrained_model_name_or_path,
        device=accelerator.device,
        revision=settings.revision,
        variant=settings.variant,
    )
    if not family.control:
        raise TrainingError(
            f"{settings.pretrained_model_name_or_path} is a {family.title} model; control_hra.py trains control "
            f"adapters for {SUPPORTED_CONTROL} (personalization works for every family: training/dreambooth_hra.py)"
        )
    denoiser = getattr(pipe, family.denoiser)
    torch.manual_seed(settings.seed)  # the adapters' initial vectors depend on the seed alone
    encoder = add_control(denoiser, config, pipe.vae_scale_factor, settings.control_residuals)
    n_encoder = sum(p.numel() for p in encoder.parameters())
    counts = {"adapter": sum(p.numel() for p in denoiser.parameters() if p.requires_grad) - n_encoder,
              "encoder": n_encoder}
    if accelerator.is_main_process:
        print(f"trainable: {counts['adapter']:,} {METHOD_NAMES[settings.adapter]} + {counts['encoder']:,} condition "
              "encoder", flush=True)

    def validate(step: int) -> list[Image.Image]:
        images = []
        for condition in validation_conditions:
            images += generate(
                pipe,
                settings.validation_prompt,
                num_images=settings.num_validation_images,
                seed=settings.seed,
                steps=settings.num_validation_inference_steps,
                guidance=VALIDATION_GUIDANCE,
                height=settings.resolution,
                width=settings.resolution,
                scheduler="ddim",
                control_image=condition,
            )
        return images

    save_baseline = adapter_saver(settings.adapter, type(pipe), settings.pretrained_model_name_or_path)

    def save(models: dict, path: Path, meta: dict) -> Path:
        trained = models[family.denoiser]
        if save_baseline is None:
            return save_control_adapter(trained, control_encoder(trained), path.with_name(CONTROL_FILE), metadata=meta)
        # the encoder first: once find_trained sees the adapter, its encoder is there too
        save_control_encoder(control_encoder(trained), path.with_name(CONTROL_ENCODER_FILE), metadata=meta)
        return save_baseline(models, path, meta)

    metadata = settings.adapter_metadata(
        "control_hra",
        accelerator.mixed_precision,
        objective.prediction_type,
        control_type=settings.control_type,
        canny_thresholds=thresholds if settings.control_type == "canny" else None,
        dataset=settings.train_data_dir or settings.dataset_name,
        proportion_empty_prompts=settings.proportion_empty_prompts,
    )
    spec = TrainSpec(
        dataset=dataset,
        collate_fn=collate_control,
        models={**pipeline_components(pipe), "vae": pipe.vae},
        trainable=(family.denoiser,),
        # encoded per batch, not cached: a control set has as many captions as images
        loss_fn=partial(denoising_loss, objective=objective, prompts=PromptEncoder(pipe, cache=False),
                        resolution=settings.resolution),
        validate=validate if validation_conditions and settings.num_validation_images > 0 else None,
        metadata=metadata,
        save_adapter=save,
        finish=lambda result: write_card(settings, result, counts),
    )
    train(accelerator, settings, spec, progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
