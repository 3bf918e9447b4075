"""The training datasets: DreamBooth photo folders and ControlNet-style image/condition/caption sets.

Random augmentation is drawn from a local ``random.Random`` seeded by ``(seed, epoch, index)``: the same sample looks
the same whatever the number of DataLoader workers, processes or calls to the global RNG, which makes runs and resumes
reproducible. Images are loaded and checked by :mod:`hra_diffusion.images`.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .images import DEFAULT_MAX_PIXELS, load_image, read_caption, require_images, to_tensor

_RESAMPLE = Image.Resampling.LANCZOS


# --------------------------------------------------------------------------------------------------------------------
# Geometry shared by both datasets


@dataclass(frozen=True)
class _Geometry:
    """Where one sample is resized, cropped and flipped, so image and condition get exactly the same treatment."""

    resized: tuple[int, int]
    box: tuple[int, int, int, int]
    flip: bool


def _plan(
    size: tuple[int, int], resolution: int, center_crop: bool, random_flip: bool, rng: random.Random
) -> _Geometry:
    """Resize the shorter side to ``resolution``, then a center or random square crop and an optional h-flip."""
    width, height = size
    scale = resolution / min(width, height)
    new_w, new_h = max(resolution, round(width * scale)), max(resolution, round(height * scale))
    if center_crop:
        left, top = (new_w - resolution) // 2, (new_h - resolution) // 2
    else:
        left, top = rng.randint(0, new_w - resolution), rng.randint(0, new_h - resolution)
    flip = random_flip and rng.random() < 0.5
    return _Geometry((new_w, new_h), (left, top, left + resolution, top + resolution), flip)


def _apply(img: Image.Image, geo: _Geometry) -> Image.Image:
    if img.size != geo.resized:
        img = img.resize(geo.resized, _RESAMPLE)
    img = img.crop(geo.box)
    return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if geo.flip else img


def _sample_rng(seed: int, epoch: int, index: int, stream: str) -> random.Random:
    # String seeds are hashed with SHA-512 by random.Random, so this is stable across processes and PYTHONHASHSEED.
    return random.Random(f"{seed}:{epoch}:{index}:{stream}")


class _AugmentedDataset(Dataset):
    """What both datasets share: square crops of ``resolution``, optional flips, and the per-epoch seeded draw."""

    def __init__(self, resolution: int, center_crop: bool, random_flip: bool, seed: int, max_pixels: int) -> None:
        if not isinstance(resolution, int) or resolution <= 0:
            raise ValueError(f"resolution must be a positive integer, got {resolution!r}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.seed = seed
        self.epoch = 0
        self.max_pixels = max_pixels

    def set_epoch(self, epoch: int) -> None:
        """Select the augmentation draw for ``epoch`` (DataLoader workers see it only if re-created each epoch)."""
        self.epoch = epoch

    def _plan(self, size: tuple[int, int], rng: random.Random) -> _Geometry:
        return _plan(size, self.resolution, self.center_crop, self.random_flip, rng)


# --------------------------------------------------------------------------------------------------------------------
# DreamBooth


class DreamBoothDataset(_AugmentedDataset):
    """Instance (and optional prior-preservation class) images, as in diffusers' ``train_dreambooth_lora.py``.

    Items: ``instance_images`` (3xRxR float in [-1, 1]), ``instance_size_crop`` (original height, width, crop top,
    left) and ``instance_prompt`` (the image's sidecar caption when ``use_captions`` and one exists, else
    ``instance_prompt``); with ``class_dir`` also ``class_images``, ``class_size_crop`` and ``class_prompt``. The
    length is max(instances, class images) and indices wrap, like diffusers. Call :meth:`set_epoch` before each
    epoch to get fresh crops/flips.
    """

    def __init__(
        self,
        instance_dir: str | Path,
        instance_prompt: str,
        resolution: int,
        center_crop: bool = False,
        random_flip: bool = False,
        class_dir: str | Path | None = None,
        class_prompt: str | None = None,
        seed: int = 0,
        use_captions: bool = True,
        *,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(resolution, center_crop, random_flip, seed, max_pixels)
        if class_dir is not None and class_prompt is None:
            raise ValueError("class_prompt is required when class_dir is given (prior preservation)")
        self.instance_prompt = instance_prompt
        self.instance_paths = require_images(instance_dir, "instance", max_pixels=max_pixels)
        self.instance_prompts = [
            (read_caption(p) if use_captions else None) or instance_prompt for p in self.instance_paths
        ]
        self.class_prompt = class_prompt
        self.class_paths = require_images(class_dir, "class", max_pixels=max_pixels) if class_dir is not None else []

    def __len__(self) -> int:
        return max(len(self.instance_paths), len(self.class_paths))

    def _transform(self, path: Path, rng: random.Random) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
        """(image in [-1, 1], SDXL's size conditioning: original height, width, crop top, crop left)."""
        img = load_image(path, max_pixels=self.max_pixels)
        geo = self._plan(img.size, rng)
        left, top, right, _ = geo.box
        if geo.flip:  # the crop as seen in the flipped image, where the cut-off side is the other one
            left = geo.resized[0] - right
        return to_tensor(_apply(img, geo)) * 2.0 - 1.0, (img.height, img.width, top, left)

    def __getitem__(self, index: int) -> dict:
        rng = _sample_rng(self.seed, self.epoch, index, "dreambooth")
        i = index % len(self.instance_paths)
        image, size_crop = self._transform(self.instance_paths[i], rng)
        example = {"instance_images": image, "instance_size_crop": size_crop}
        example["instance_prompt"] = self.instance_prompts[i]
        if self.class_paths:
            image, size_crop = self._transform(self.class_paths[index % len(self.class_paths)], rng)
            example.update(class_images=image, class_size_crop=size_crop, class_prompt=self.class_prompt)
        return example


def collate_dreambooth(examples: Sequence[dict], with_prior_preservation: bool) -> dict:
    """Batch DreamBooth items: ``pixel_values`` (Bx3xRxR, or 2B with instance images first, then class images,
    as diffusers concatenates them so the loss can be chunked in two), ``prompts`` and ``size_crop`` (Bx4 or 2Bx4:
    original height, width, crop top, left; SDXL's conditioning) in the same order."""
    kinds = ("instance", "class") if with_prior_preservation else ("instance",)
    if with_prior_preservation and any("class_images" not in ex for ex in examples):
        raise ValueError("with_prior_preservation needs class images: build DreamBoothDataset with class_dir")
    return {
        "pixel_values": torch.stack([ex[f"{k}_images"] for k in kinds for ex in examples]).contiguous().float(),
        "prompts": [ex[f"{k}_prompt"] for k in kinds for ex in examples],
        "size_crop": torch.tensor([ex[f"{k}_size_crop"] for k in kinds for ex in examples], dtype=torch.long),
    }


# --------------------------------------------------------------------------------------------------------------------
# Control (ControlNet-style) data


def _read_metadata(path: Path) -> list[tuple[int, dict]]:
    """``(line number, row)`` for every non-blank line, so later errors can point at the line."""
    if not path.is_file():
        raise ValueError(
            f"{path}: metadata.jsonl not found; a control dataset is a folder with a metadata.jsonl holding one JSON "
            "object per line with 'image', 'conditioning_image' and 'text' columns (Hugging Face imagefolder "
            "layout). Try `python -m hra_diffusion.synthetic OUTDIR` for an example."
        )
    rows = []
    with path.open(encoding="utf-8-sig") as fh:
        for lineno, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}, line {lineno}: not valid JSON ({exc}); fix or remove the line") from exc
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            rows.append((lineno, row))
    if not rows:
        raise ValueError(f"{path}: metadata.jsonl has no rows; add one JSON object per image")
    return rows


class ControlDataset(_AugmentedDataset):
    """Image / conditioning image / caption triples from an imagefolder with ``metadata.jsonl``.

    Items: ``pixel_values`` (3xRxR in [-1, 1]), ``conditioning_pixel_values`` (3xRxR in [0, 1], same resize, crop and
    flip as the image, matching diffusers' ``train_controlnet.py`` ranges) and ``prompt`` (replaced by "" with
    probability ``proportion_empty_prompts``, which teaches the adapter to follow the condition alone).

    Without a conditioning column, ``conditioning_transform`` (PIL -> PIL, e.g. a canny detector) computes the
    condition from the already cropped and flipped target, so it is aligned by construction. File existence is
    checked at construction; decoding happens per item because control sets can hold tens of thousands of images.
    """

    def __init__(
        self,
        data_dir: str | Path,
        resolution: int,
        *,
        image_column: str = "image",
        conditioning_image_column: str = "conditioning_image",
        caption_column: str = "text",
        center_crop: bool = True,
        random_flip: bool = False,
        proportion_empty_prompts: float = 0.0,
        seed: int = 0,
        conditioning_transform: Callable[[Image.Image], Image.Image] | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
    ) -> None:
        super().__init__(resolution, center_crop, random_flip, seed, max_pixels)
        if not 0.0 <= proportion_empty_prompts <= 1.0:
            raise ValueError(f"proportion_empty_prompts must be in [0, 1], got {proportion_empty_prompts}")
        self.data_dir = Path(data_dir)
        if not self.data_dir.is_dir():
            raise ValueError(f"{self.data_dir}: control dataset folder does not exist")
        self.proportion_empty_prompts = proportion_empty_prompts
        self.conditioning_transform = conditioning_transform

        metadata = self.data_dir / "metadata.jsonl"
        rows = _read_metadata(metadata)
        present = sorted({key for _, row in rows for key in row})

        def missing(column: str, flag: str) -> ValueError:
            return ValueError(
                f"{metadata}: no column '{column}'; columns present: {', '.join(present)}. Pass {flag} to pick one."
            )

        if image_column not in present and image_column == "image" and "file_name" in present:
            image_column = "file_name"  # Hugging Face imagefolder's own name for the image column.
        if image_column not in present:
            raise missing(image_column, "--image_column")
        if caption_column not in present:
            raise missing(caption_column, "--caption_column")
        use_condition_column = conditioning_image_column in present
        if not use_condition_column and conditioning_transform is None:
            raise missing(conditioning_image_column, "--conditioning_image_column (or a conditioning transform)")

        columns = [image_column, caption_column] + ([conditioning_image_column] if use_condition_column else [])
        self.images: list[Path] = []
        self.conditions: list[Path] | None = [] if use_condition_column else None
        self.captions: list[str | list[str]] = []
        absent: list[str] = []
        for lineno, row in rows:
            for column in columns:
                if column not in row:
                    raise ValueError(f"{metadata}, line {lineno}: row has no '{column}' value")
            caption = row[caption_column]
            if caption is None:
                caption = ""
            is_list = isinstance(caption, list) and caption and all(isinstance(c, str) for c in caption)
            if not (isinstance(caption, str) or is_list):
                raise ValueError(f"{metadata}, line {lineno}: '{caption_column}' must be a string or list of strings")
            self.captions.append(caption)
            image = self.data_dir / str(row[image_column])
            self.images.append(image)
            paths = [image]
            if self.conditions is not None:
                condition = self.data_dir / str(row[conditioning_image_column])
                self.conditions.append(condition)
                paths.append(condition)
            absent += [f"  - line {lineno}: {p}" for p in paths if not p.is_file()]
        if absent:
            shown = "\n".join(absent[:20]) + (f"\n  ... and {len(absent) - 20} more" if len(absent) > 20 else "")
            raise ValueError(
                f"{metadata}: {len(absent)} referenced file(s) missing "
                f"(paths are relative to {self.data_dir}):\n{shown}"
            )

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> dict:
        rng = _sample_rng(self.seed, self.epoch, index, "control")
        # A separate stream, so changing proportion_empty_prompts does not change the crops.
        prompt_rng = _sample_rng(self.seed, self.epoch, index, "control-prompt")
        image = load_image(self.images[index], max_pixels=self.max_pixels)
        geo = self._plan(image.size, rng)
        target = _apply(image, geo)
        if self.conditions is not None:
            condition = load_image(self.conditions[index], max_pixels=self.max_pixels)
            if condition.size != image.size:
                condition = condition.resize(image.size, _RESAMPLE)
            condition = _apply(condition, geo)
        else:
            condition = self.conditioning_transform(target).convert("RGB")
            if condition.size != target.size:
                condition = condition.resize(target.size, _RESAMPLE)
        caption = self.captions[index]
        if isinstance(caption, list):
            caption = rng.choice(caption)
        if prompt_rng.random() < self.proportion_empty_prompts:
            caption = ""
        return {
            "pixel_values": to_tensor(target) * 2.0 - 1.0,
            "conditioning_pixel_values": to_tensor(condition),
            "prompt": caption,
        }


def collate_control(examples: Sequence[dict]) -> dict:
    """Batch control items: ``pixel_values``, ``conditioning_pixel_values`` (both Bx3xRxR) and ``prompts``."""
    return {
        "pixel_values": torch.stack([ex["pixel_values"] for ex in examples]).contiguous().float(),
        "conditioning_pixel_values": torch.stack([ex["conditioning_pixel_values"] for ex in examples])
        .contiguous()
        .float(),
        "prompts": [ex["prompt"] for ex in examples],
    }
