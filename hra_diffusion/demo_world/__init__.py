"""The demo world: procedural captioned pictures, and a small Stable Diffusion trained on them from nothing.

It lets everyone see HRA learn a subject without downloading a model: `assets/demo_world/` (built by
``python -m hra_diffusion.demo_world build``) holds the pipeline (`base/`, loaded by plain
``StableDiffusionPipeline.from_pretrained``), its scorers (`scorer/clip`, `scorer/dino`) and five subjects in the
DreamBooth dataset's layout (`subjects/`). Importing this package is cheap: no torch, no diffusers.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

ENV_VAR = "HRA_DEMO_WORLD"  # another built world (a folder written by `build`), or "none" for no world
SHIPPED = Path(__file__).resolve().parents[2] / "assets" / "demo_world"
UNIQUE_TOKEN = "qwe"  # the rare word the demo subjects are trained with (as in the HRA paper's code)


@dataclass(frozen=True)
class DemoWorld:
    """The folders of a built demo world."""

    root: Path

    @property
    def base(self) -> Path:
        return self.root / "base"

    @property
    def clip(self) -> Path:
        return self.root / "scorer" / "clip"

    @property
    def dino(self) -> Path:
        return self.root / "scorer" / "dino"

    @property
    def subjects(self) -> Path:
        return self.root / "subjects"

    @property
    def control(self) -> Path:
        """The Canny control adapter for base/ (the build's last stage)."""
        return self.root / "control" / "hra_control.safetensors"


def find_demo_world() -> DemoWorld | None:
    """$HRA_DEMO_WORLD, else the world shipped in the repository's assets/; None when neither is built (a plain
    `pip install` of the library ships no weights) or $HRA_DEMO_WORLD is "none"."""
    setting = os.environ.get(ENV_VAR)
    if setting == "none":
        return None
    root = Path(setting or SHIPPED)
    return DemoWorld(root) if (root / "base" / "model_index.json").is_file() else None
