"""Model families: Stable Diffusion 1.x/2.x, SDXL, SD3/3.5, FLUX.1, each one module behind :class:`Family`.

The rest of the code finds a model's family here (from model_index.json, a pipeline, or its components) and asks it;
no other module tests for a model kind (tests/test_families.py checks that).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from .base import Conditioning, Family
from .flux import Flux
from .objectives import FlowOptions, Objective, UnsupportedModelError
from .sd import StableDiffusion
from .sd3 import StableDiffusion3
from .sdxl import StableDiffusionXL

# Most specific first: an SDXL UNet is also a UNet2DConditionModel.
FAMILIES: tuple[Family, ...] = (StableDiffusionXL(), StableDiffusion3(), Flux(), StableDiffusion())
BY_NAME = {family.name: family for family in FAMILIES}
DENOISERS = tuple(dict.fromkeys(family.denoiser for family in FAMILIES))  # "unet", "transformer"
_BY_AGE = [BY_NAME[name] for name in ("sd", "sdxl", "sd3", "flux")]
SUPPORTED = ", ".join(f"{f.title} ({f.pipeline})" for f in _BY_AGE)
SUPPORTED_CONTROL = ", ".join(f.title for f in _BY_AGE if f.control)


class UnknownFamilyError(ValueError):
    """A model or pipeline none of the families knows."""


def family_for_pipeline(class_name: str) -> Family:
    """The family of a model_index.json ``_class_name`` (or a pipeline class name): the longest matching prefix."""
    matches = [f for f in FAMILIES if class_name.startswith(f.pipeline_prefix)]
    if not matches:
        kind = class_name or "a pipeline of unknown kind"
        raise UnknownFamilyError(f"{kind} is not supported; HRA Studio works with {SUPPORTED}")
    return max(matches, key=lambda f: len(f.pipeline_prefix))


def family_of(models: Any) -> Family:
    """The family of a pipeline, a {component: model} mapping or a bare denoiser, by its denoiser."""
    if isinstance(models, nn.Module):
        denoisers = [models]
    else:
        get = models.get if isinstance(models, Mapping) else lambda name: getattr(models, name, None)
        denoisers = [m for m in map(get, DENOISERS) if isinstance(m, nn.Module)]
    for family in FAMILIES:
        if any(family.recognizes(d) for d in denoisers):
            return family
    found = ", ".join(type(d).__name__ for d in denoisers) or "none"
    raise UnknownFamilyError(f"no supported denoiser found ({found}); HRA Studio works with {SUPPORTED}")


def denoiser_of(pipe: Any) -> nn.Module:
    """The pipeline's UNet or transformer."""
    return getattr(pipe, family_of(pipe).denoiser)


__all__ = [
    "BY_NAME",
    "DENOISERS",
    "FAMILIES",
    "SUPPORTED",
    "SUPPORTED_CONTROL",
    "Conditioning",
    "Family",
    "FlowOptions",
    "Objective",
    "UnknownFamilyError",
    "UnsupportedModelError",
    "denoiser_of",
    "family_for_pipeline",
    "family_of",
]
