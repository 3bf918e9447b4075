"""The export formats, defined once: the convert command's ``--to``, the app's downloads and docs/export.md's table
all read :data:`EXPORT_FORMATS`, so they cannot disagree about what exists or what each one writes.

Every writer takes the pipeline with the adapter loaded and writes every part of it (denoiser and text encoders).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from .export import export_lora, export_merged, export_peft, lora_file
from .io import atomic_folder
from .model import hra_adapters
from .pipelines import pipeline_components

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

# write(pipe, out, adapter_name, base_model) -> the file or folder written
Writer = Callable[["DiffusionPipeline", "str | os.PathLike", str, "str | None"], Path]


@dataclass(frozen=True)
class ExportFormat:
    """One format: ``description`` is what --help, the app's download list and docs/export.md show; ``output`` is
    the name of its file (ending in .safetensors) or folder (anything else) where the caller picks none."""

    name: str
    description: str
    output: str
    write: Writer

    @property
    def folder(self) -> bool:
        """Whether the export is a folder (the app zips those)."""
        return Path(self.output).suffix != ".safetensors"

    def target(self, out: str | os.PathLike) -> Path:
        """What writing to ``out`` creates: the folder ``out``, or for a file format the LoRA file ``out`` names."""
        return Path(out) if self.folder else lora_file(out)


def _parts(pipe: DiffusionPipeline, adapter_name: str) -> dict[str, nn.Module]:
    """The pipeline's models that hold a part of adapter ``adapter_name``."""
    parts = {comp: model for comp, model in pipeline_components(pipe).items() if adapter_name in hra_adapters(model)}
    if not parts:
        raise ValueError(f"no HRA adapter named {adapter_name!r} to export")
    return parts


def _write_peft(pipe: DiffusionPipeline, out: str | os.PathLike, adapter_name: str, base_model: str | None) -> Path:
    """A peft folder holds one model: ``out`` itself for a UNet-only adapter, else ``out/<component>`` for each."""
    parts = _parts(pipe, adapter_name)
    if len(parts) == 1:
        (model,) = parts.values()
        return export_peft(model, out, adapter_name, base_model)

    def write(tmp: Path) -> None:
        for comp, model in parts.items():
            export_peft(model, tmp / comp, adapter_name, base_model)

    return atomic_folder(out, write)


def _lora_writer(key_format: str) -> Writer:
    """export_lora with ``key_format`` keys, over every adapted model of the pipeline."""

    def write(pipe: DiffusionPipeline, out: str | os.PathLike, adapter_name: str, base_model: str | None) -> Path:
        return export_lora(_parts(pipe, adapter_name), out, format=key_format, adapter_name=adapter_name)

    return write


def _write_merged(pipe: DiffusionPipeline, out: str | os.PathLike, adapter_name: str, base_model: str | None) -> Path:
    """Merges this adapter alone: the app's pipeline also holds its other adapters, switched off."""
    return export_merged(pipe, out, adapter_name)


EXPORT_FORMATS: dict[str, ExportFormat] = {
    fmt.name: fmt
    for fmt in (
        ExportFormat(
            "peft",
            "peft HRA folder (a subfolder per model when text encoders have parts too): PeftModel.from_pretrained",
            "peft",
            _write_peft,
        ),
        ExportFormat(
            "lora-diffusers",
            "exact LoRA file, diffusers keys: pipe.load_lora_weights; ComfyUI reads it for SD3 and FLUX.1",
            "lora_diffusers.safetensors",
            _lora_writer("diffusers"),
        ),
        ExportFormat(
            "lora-kohya",
            "exact LoRA file, kohya keys (SD 1.x/2.x, SDXL): ComfyUI, A1111 / Forge, anything reading kohya LoRA",
            "lora_kohya.safetensors",
            _lora_writer("kohya"),
        ),
        ExportFormat(
            "merged",
            "the base pipeline with the adapter merged in, a diffusers folder: from_pretrained",
            "merged",
            _write_merged,
        ),
    )
}
