"""Builders shared by the eval tests: tiny random DINO / CLIP networks and DreamBooth-format prompt files.

Plain functions, not fixtures, so each test module keeps its own fixture scopes without importing fixtures.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import ViTConfig, ViTImageProcessor, ViTModel

TINY_CLIP = "hra-test-tiny-clip"
TINY_CLIP_CONFIG = {  # 1.6M parameters, mostly the 49,408-token embedding
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


def noise_image(seed: int, size: tuple[int, int] = (64, 64)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def save_tiny_dino(folder: Path, with_processor: bool = False) -> str:
    """A tiny DINO-architecture ViT (seed 0) saved with save_pretrained, optionally with an image processor."""
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                               patch_size=16, image_size=64))
    model.save_pretrained(folder)
    if with_processor:
        ViTImageProcessor(size={"height": 64, "width": 64}).save_pretrained(folder)
    return str(folder)


def register_tiny_clip(folder: Path) -> str:
    """Register the tiny open_clip architecture in this process; returns its name (random weights)."""
    config = folder / f"{TINY_CLIP}.json"
    config.write_text(json.dumps(TINY_CLIP_CONFIG))
    open_clip.add_model_config(config)
    return TINY_CLIP


def save_tiny_clip_dir(folder: Path) -> str:
    """The tiny CLIP with fixed weights as an open_clip `local-dir:` model, loadable from any process."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CLIP_CONFIG}))
    torch.manual_seed(0)
    model = open_clip.create_model(register_tiny_clip(folder), pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, folder / "open_clip_model.safetensors")
    return f"local-dir:{folder}"


COMMON = [
    "a {0} {1} in the jungle", "a {0} {1} in the snow", "a {0} {1} on the beach", "a {0} {1} on a cobblestone street",
    "a {0} {1} on top of pink fabric", "a {0} {1} on top of a wooden floor", "a {0} {1} with a city in the background",
    "a {0} {1} with a mountain in the background", "a {0} {1} with a blue house in the background",
    "a {0} {1} on top of a purple rug in a forest",
]
TAIL = ["a red {0} {1}", "a purple {0} {1}", "a shiny {0} {1}", "a wet {0} {1}", "a cube shaped {0} {1}"]
OBJECT_MIDDLE = [
    "a {0} {1} with a wheat field in the background", "a {0} {1} with a tree and autumn leaves in the background",
    "a {0} {1} with the Eiffel Tower in the background", "a {0} {1} floating on top of water",
    "a {0} {1} floating in an ocean of milk", "a {0} {1} on top of green grass with sunflowers around it",
    "a {0} {1} on top of a mirror", "a {0} {1} on top of the sidewalk in a crowded street",
    "a {0} {1} on top of a dirt road", "a {0} {1} on top of a white rug",
]
LIVE_MIDDLE = [
    "a {0} {1} wearing a red hat", "a {0} {1} wearing a santa hat", "a {0} {1} wearing a rainbow scarf",
    "a {0} {1} wearing a black top hat and a monocle", "a {0} {1} in a chef outfit",
    "a {0} {1} in a firefighter outfit", "a {0} {1} in a police outfit", "a {0} {1} wearing pink glasses",
    "a {0} {1} wearing a yellow shirt", "a {0} {1} in a purple wizard outfit",
]
OBJECT_TEMPLATES = COMMON + OBJECT_MIDDLE + TAIL
LIVE_TEMPLATES = COMMON + LIVE_MIDDLE + TAIL
CLASSES = {"backpack": "backpack", "bear_plushie": "stuffed animal", "cat": "cat", "dog": "dog", "dog2": "dog",
           "teapot": "teapot"}


def prompt_list(templates: list[str]) -> list[str]:
    lines = [f"'{t}'.format(unique_token, class_token)," for t in templates]
    lines[-1] = lines[-1].rstrip(",")
    return ["prompt_list = [", *lines, "]"]


def prompts_file_text(newline: str = "\n") -> str:
    """The layout of google/dreambooth's dataset/prompts_and_classes.txt."""
    lines = ["Classes", "", "subject_name,class", *(f"{s},{c}" for s, c in CLASSES.items()), "", "Prompts", "",
             "Object Prompts", "", *prompt_list(OBJECT_TEMPLATES), "", "Live Subject Prompts", "",
             *prompt_list(LIVE_TEMPLATES)]
    return newline.join(lines) + newline
