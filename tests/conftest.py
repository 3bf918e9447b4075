"""Shared fixtures: offline environment and tiny Stable Diffusion pipelines built once per session."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(2)


@pytest.fixture(scope="session")
def tiny_unet(tiny_sd: Path):
    """A factory for fresh copies of the tiny pipeline's UNet (float32, eval mode)."""
    from diffusers import UNet2DConditionModel

    return lambda: UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet").eval()


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny epsilon-prediction SD pipeline folder with `controlnet/`."""
    from hra_diffusion.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "sd", controlnet=True)


@pytest.fixture(scope="session")
def tiny_sd_v(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny v-prediction SD pipeline folder, no controlnet."""
    from hra_diffusion.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_v") / "sd", prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SDXL pipeline folder (two text encoders, size conditioning)."""
    from hra_diffusion.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_xl") / "sdxl", family="sdxl")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny SD3.5-medium-style pipeline folder (MMDiT, three text encoders, flow matching)."""
    from hra_diffusion.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_sd3") / "sd3", family="sd3")


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny FLUX.1-dev-style pipeline folder (guidance embedding, dynamic shifting, CLIP and T5)."""
    from hra_diffusion.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("tiny_flux") / "flux", family="flux")
