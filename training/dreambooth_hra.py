#!/usr/bin/env python
"""DreamBooth with HRA: teach a diffusion model (Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, FLUX.1) a subject from a
few photos; the result is one adapter file.

    accelerate launch training/dreambooth_hra.py \\
      --pretrained_model_name_or_path runwayml/stable-diffusion-v1-5 \\
      --instance_data_dir photos/ --instance_prompt "a photo of sks dog" \\
      --with_prior_preservation --class_prompt "a photo of a dog" --class_data_dir class_dog \\
      --output_dir out/ --max_train_steps 500

Then ``attach_adapters(load_pipeline(base), ["out/hra_adapter.safetensors"])``. The guide is docs/personalize.md.
This file is the DreamBooth part only (settings, data, class images, model card); the loop, checkpoints, resume,
logging and signals live in hra_diffusion/train/, the loss in hra_diffusion/diffusion.py, shared with the other
trainers.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import ClassVar

import torch
from PIL import Image
from tqdm.auto import tqdm

from hra_diffusion.baselines import LORA_WEIGHT_NAME, OFT_FOLDER, adapter_saver, add_adapter
from hra_diffusion.data import DreamBoothDataset, collate_dreambooth
from hra_diffusion.diffusion import PromptEncoder, denoising_loss, load_base
from hra_diffusion.families import Family
from hra_diffusion.images import require_images, scan_images
from hra_diffusion.io import atomic_write
from hra_diffusion.model_card import common_settings, sample_links, write_model_card
from hra_diffusion.pipelines import fp32_vae_decode, generate, pipeline_components
from hra_diffusion.train import ADAPTER_FILE, TrainingError, TrainResult, TrainSettings, TrainSpec, train
from hra_diffusion.train.cli import run_cli
from hra_diffusion.train.events import ProgressFile, Stopped
from hra_diffusion.train.runtime import DTYPES, STOP, make_accelerator, stop_agreed
from hra_diffusion.train.settings import SettingsError, inherit, option, parse

logger = logging.getLogger("dreambooth_hra")
GRID_FILE = "sample_grid.png"


@dataclass(kw_only=True)
class DreamBoothSettings(TrainSettings):
    """The DreamBooth trainer's settings: the shared ones plus the subject and prior preservation."""

    instance_data_dir: str = option(group="subject", help="folder of subject photos (JPEG/PNG/WebP, any size)")
    instance_prompt: str = option(group="subject", help='prompt with the identifier, e.g. "a photo of sks dog"')
    ignore_captions: bool = option(False, group="subject", help="use --instance_prompt for every photo even where a "
                                   "same-name .txt/.caption file exists")
    center_crop: bool = option(False, group="subject", help="center crop (default: random crop)")
    random_flip: bool = option(False, group="subject", help="random horizontal flips")
    train_text_encoder: bool = option(False, group="subject", help="also put HRA on the CLIP text encoders' "
                                      "q_proj/k_proj/v_proj/out_proj (SDXL and SD3: both; T5 stays frozen)")
    pretrained_vae_model_name_or_path: str | None = option(
        None, group="subject",
        help="another VAE, e.g. madebyollin/sdxl-vae-fp16-fix (SDXL's own VAE is kept in fp32 instead)")

    with_prior_preservation: bool = option(False, group="prior preservation", help="also train on base-model "
                                           "images of the class so the class keeps its variety")
    class_data_dir: str | None = option(None, group="prior preservation",
                                        help="class images; missing ones are generated here")
    class_prompt: str | None = option(None, group="prior preservation", help='e.g. "a photo of a dog"')
    num_class_images: int = option(100, group="prior preservation", range=(1, 1_000_000),
                                   help="class images to train with (generated where missing)")
    prior_loss_weight: float = option(1.0, group="prior preservation", range=(0.0, 1e6),
                                      help="weight of the class images' loss")
    sample_batch_size: int = option(4, group="prior preservation", range=(1, 4096),
                                    help="batch size when generating class images")
    num_class_inference_steps: int = option(50, group="prior preservation", range=(1, 1000),
                                            help="sampling steps of each class image")
    prior_generation_precision: str | None = option(None, group="prior preservation",
                                                    choices=("fp32", "fp16", "bf16"),
                                                    help="autocast dtype for class images (default: fp16 on GPU, "
                                                    "fp32 on CPU)")

    output_dir: str = inherit("output_dir", "hra-dreambooth-model")
    validation_prompt: str | None = option(None, group="validation",
                                           help="prompt of the sample images (default: the instance prompt)")

    tracker_project_name: ClassVar[str] = "dreambooth-hra"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.with_prior_preservation and (not self.class_data_dir or not self.class_prompt):
            raise SettingsError("--with_prior_preservation needs --class_data_dir and --class_prompt")
        if not self.with_prior_preservation and (self.class_data_dir or self.class_prompt):
            logger.warning("--class_data_dir/--class_prompt are ignored without --with_prior_preservation")


# Named default sets; flags given explicitly still win. "quick" is the flags' own defaults, sized for a first try.
PRESETS: dict[str, dict[str, object]] = {
    "quick": {},
    "paper": {"max_train_steps": 2000, "num_class_images": 200, "with_prior_preservation": True},
}


def parse_args(argv: list[str] | None = None) -> DreamBoothSettings:
    return parse(DreamBoothSettings, argv, presets=PRESETS,
                 description="DreamBooth with HRA adapters for Stable Diffusion 1.x/2.x, SDXL, SD3/3.5 and FLUX.1.")


# --------------------------------------------------------------------------------------------------------------------
# Prior preservation: class images from the base model


def generate_class_images(pipe, settings: DreamBoothSettings, accelerator, seed: int) -> None:
    """Top up --class_data_dir to --num_class_images with images of --class_prompt from the base model.

    Resumable: usable images already there count, new ones get free names class-NNNNN.png and appear atomically, so
    an interrupted run never leaves half-written files and a rerun generates nothing twice. Each image's seed comes
    from its name, so the set does not depend on the batch size or the number of processes that share the work.
    """
    folder = Path(settings.class_data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    present = len(scan_images(folder)[0])
    missing = settings.num_class_images - present
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
    precision = settings.prior_generation_precision or ("fp16" if accelerator.device.type == "cuda" else "fp32")
    dtype = DTYPES["no" if precision == "fp32" else precision]
    autocast = torch.autocast(accelerator.device.type, dtype=dtype, enabled=dtype != torch.float32)
    bar = tqdm(total=len(mine), desc="class images", disable=not accelerator.is_local_main_process)
    for start in range(0, len(mine), settings.sample_batch_size):
        if STOP.requested:
            break
        batch = mine[start : start + settings.sample_batch_size]
        generators = [torch.Generator("cpu").manual_seed(_name_seed(seed, name)) for name in batch]
        with autocast, fp32_vae_decode(pipe):
            output = STOP.sample(
                pipe,
                prompt=[settings.class_prompt] * len(batch),
                num_inference_steps=settings.num_class_inference_steps,
                generator=generators,
            )
        if output is None:  # stopped between two denoising steps: nothing of this batch is written
            break
        for name, image in zip(batch, output.images):
            atomic_write(folder / name, lambda tmp, im=image: im.save(tmp, format="PNG"))
        bar.update(len(batch))
    bar.close()
    accelerator.wait_for_everyone()


def _name_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1


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


def write_card(settings: DreamBoothSettings, result: TrainResult, n_photos: int, family: Family) -> None:
    out = settings.output_path
    samples = ""
    if result.samples:
        atomic_write(
            out / GRID_FILE, lambda tmp: image_grid([Image.open(p) for p in result.samples]).save(tmp, format="PNG")
        )
        samples = f"![samples]({GRID_FILE})\n\n{sample_links(result.samples, out)}"
    prompt = settings.validation_prompt or settings.instance_prompt
    if samples:
        samples = f'Samples at step {result.step}, prompt "{prompt}", seed {settings.seed}:\n\n{samples}'
    prior = f'{settings.num_class_images} images of "{settings.class_prompt}", weight {settings.prior_loss_weight}'
    base = settings.pretrained_model_name_or_path
    what, files, usage, notes = _card_parts(settings, prompt, family.denoiser)
    write_model_card(
        out,
        base_model=base,
        front_matter={"instance_prompt": settings.instance_prompt},
        tags=("text-to-image", "dreambooth", *family.tags),
        title=f'{what} DreamBooth: "{settings.instance_prompt}"',
        body=f"""{what} weights for `{base}`, trained with DreamBooth on {n_photos} photos: {files}. The base model's
weights are untouched.

{samples}""",
        settings={
            **common_settings(settings, result.step),
            "text encoder trained": settings.train_text_encoder,
            "prior preservation": prior if settings.with_prior_preservation else "off",
        },
        usage=usage,
        notes=notes,
    )


def _card_parts(settings: DreamBoothSettings, prompt: str, denoiser: str) -> tuple[str, str, str, str]:
    """(method, what the files are, a usage snippet, notes) of the model card, per --adapter."""
    base = settings.pretrained_model_name_or_path
    if settings.adapter == "lora":
        usage = f"""from diffusers import DiffusionPipeline

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.load_lora_weights(".")  # the folder holding {LORA_WEIGHT_NAME}
image = pipe("{prompt}").images[0]"""
        files = f"`{LORA_WEIGHT_NAME}`, a rank-{settings.rank} LoRA in diffusers' keys"
        return "LoRA", files, usage, "Trained by HRA Studio as a baseline, with the same loop and data as its HRA runs."
    if settings.adapter == "oft":
        usage = f"""from diffusers import DiffusionPipeline
from peft import PeftModel

pipe = DiffusionPipeline.from_pretrained("{base}")
pipe.{denoiser} = PeftModel.from_pretrained(pipe.{denoiser}, "{OFT_FOLDER}/{denoiser}")
image = pipe("{prompt}").images[0]"""
        files = f"`{OFT_FOLDER}/<component>/`, peft OFT folders (block size {settings.oft_block_size})"
        return "OFT", files, usage, "Trained by HRA Studio as a baseline, with the same loop and data as its HRA runs."
    usage = f"""from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

pipe = load_pipeline("{base}")
attach_adapters(pipe, ["{ADAPTER_FILE}"])
image = generate(pipe, "{prompt}", seed=0)[0]"""
    files = f"`{ADAPTER_FILE}` holds r={settings.hra_r} Householder reflection vectors per adapted layer"
    notes = """`attach_adapters(pipe, [path], strengths=[0.5])` applies it at half strength (an exact orthogonal
interpolation). This is not a LoRA file: diffusers' `load_lora_weights` cannot read it; `python -m
hra_diffusion.convert` exports one that it can."""
    return "HRA", files, usage, notes


# --------------------------------------------------------------------------------------------------------------------


def run(settings: DreamBoothSettings, progress: ProgressFile) -> int:
    photos = require_images(settings.instance_data_dir)  # fail on unusable photos before loading gigabytes of model
    accelerator = make_accelerator(settings)

    pipe, family, objective = load_base(
        settings.pretrained_model_name_or_path,
        device=accelerator.device,
        revision=settings.revision,
        variant=settings.variant,
        vae=settings.pretrained_vae_model_name_or_path,
        flow=settings.flow_options(),
    )
    if settings.resolution is None:  # the size the model was trained at, as diffusers' pipelines default to
        settings.resolution = family.default_resolution(pipe)
    if settings.hra_target_modules is None:
        settings.hra_target_modules = ",".join(family.default_targets)
    prior = settings.with_prior_preservation
    if prior:
        generate_class_images(pipe, settings, accelerator, settings.seed)
        if stop_agreed(accelerator):
            progress.emit(Stopped(step=0, adapter=None))
            return 0
    dataset = DreamBoothDataset(
        settings.instance_data_dir,
        settings.instance_prompt,
        settings.resolution,
        center_crop=settings.center_crop,
        random_flip=settings.random_flip,
        class_dir=settings.class_data_dir if prior else None,
        class_prompt=settings.class_prompt,
        seed=settings.seed,
        use_captions=not settings.ignore_captions,
    )

    models = {**pipeline_components(pipe), "vae": pipe.vae}
    text_encoders = [name for name in family.trainable_text_encoders if name in models]
    trainable = (family.denoiser, *text_encoders) if settings.train_text_encoder else (family.denoiser,)
    text_config = settings.adapter_config(family.text_targets)
    excludes = family.text_excludes(models)
    configs = {family.denoiser: settings.adapter_config()}
    for name in text_encoders:
        configs[name] = dataclasses.replace(text_config, exclude_modules=excludes[name]) if name in excludes else (
            text_config
        )
    torch.manual_seed(settings.seed)  # the adapters' initial vectors depend on the seed alone
    try:
        for name in trainable:
            add_adapter(models[name], configs[name])
    except ValueError as err:
        raise TrainingError(f"--hra_target_modules ({settings.adapter}): {err}") from err

    def validate(step: int) -> list[Image.Image]:
        return generate(
            pipe,
            settings.validation_prompt or settings.instance_prompt,
            num_images=settings.num_validation_images,
            seed=settings.seed,
            steps=settings.num_validation_inference_steps,
            height=settings.resolution,
            width=settings.resolution,
            scheduler=family.sample_scheduler,
        )

    metadata = settings.adapter_metadata(
        "dreambooth_hra",
        accelerator.mixed_precision,
        objective.prediction_type,
        instance_prompt=settings.instance_prompt,
        class_prompt=settings.class_prompt if prior else None,
        prior_loss_weight=settings.prior_loss_weight if prior else None,
        train_text_encoder=settings.train_text_encoder,
        pipeline=type(pipe).__name__,
    )
    spec = TrainSpec(
        dataset=dataset,
        collate_fn=partial(collate_dreambooth, with_prior_preservation=prior),
        models=models,
        trainable=trainable,
        loss_fn=partial(
            denoising_loss,
            objective=objective,
            prompts=PromptEncoder(pipe, cache=not settings.train_text_encoder),
            resolution=settings.resolution,
            prior_loss_weight=settings.prior_loss_weight if prior else None,
        ),
        validate=validate if settings.num_validation_images > 0 else None,
        metadata=metadata,
        save_adapter=adapter_saver(settings.adapter, type(pipe), settings.pretrained_model_name_or_path),
        finish=lambda result: write_card(settings, result, len(photos), family),
        keep_fp32=("vae",) if family.vae_fp32 and settings.pretrained_vae_model_name_or_path is None else (),
    )
    train(accelerator, settings, spec, progress)
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_cli(run, parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
