"""The LoRA and OFT baselines in the DreamBooth trainer: trained by the same loop, resumed exactly, and saved files that
their own consumers (diffusers' load_lora_weights, peft's PeftModel) load into the models the trainer trained."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_dreambooth import base_args, max_diff, ok, run_script

from hra_diffusion.baselines import LORA_WEIGHT_NAME, OFT_FOLDER, add_adapter, find_trained, trained_parameters
from hra_diffusion.checkpoint import WEIGHTS, Checkpoint
from hra_diffusion.families import BY_NAME
from hra_diffusion.train import read_request
from hra_diffusion.train.checkpointing import load_trainable_state
from hra_diffusion.train.loop import SETTINGS_FILE
from training.dreambooth_hra import DreamBoothSettings

pytestmark = pytest.mark.slow

BASELINE_FLAGS = {"lora": {"rank": 2, "lora_alpha": 4}, "oft": {"oft_block_size": 8}}


def saved_tensors(out: Path) -> dict[str, torch.Tensor]:
    path = find_trained(out)
    files = [path] if path.is_file() else sorted(path.glob("*/adapter_model.safetensors"))
    return {f"{file.relative_to(out)}/{key}": value for file in files for key, value in load_file(str(file)).items()}


def trained_models(model_dir: Path, out: Path):
    """The UNet and text encoder as the trainer left them: the adapter its settings describe, with the last
    checkpoint's weights (an independent path to the saved file's contents)."""
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextModel

    settings = DreamBoothSettings.from_values(read_request(out / SETTINGS_FILE))
    models = {"unet": UNet2DConditionModel.from_pretrained(model_dir, subfolder="unet"),
              "text_encoder": CLIPTextModel.from_pretrained(model_dir, subfolder="text_encoder")}
    configs = {"unet": settings.adapter_config(), "text_encoder": settings.adapter_config(BY_NAME["sd"].text_targets)}
    step = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    weights = Checkpoint(out / f"checkpoint-{step}").tensors(WEIGHTS)
    for name, model in models.items():
        model.requires_grad_(False)
        add_adapter(model, configs[name])
        state = {k.removeprefix(f"{name}."): v for k, v in weights.items() if k.startswith(f"{name}.")}
        load_trainable_state(model, state, name)
    return models


def outputs(unet, text_encoder, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    ids = tokenizer(["a photo of sks dog"], padding="max_length", max_length=tokenizer.model_max_length,
                    return_tensors="pt").input_ids
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
        torch.manual_seed(0)
        sample = torch.randn(1, unet.config.in_channels, 8, 8)
        return hidden, unet(sample, 500, hidden).sample


@pytest.mark.parametrize("kind", ["lora", "oft"])
def test_baseline_trains_resumes_exactly_and_loads_in_its_consumer(kind, tiny_sd, tmp_path):
    flags = dict(adapter=kind, train_text_encoder=True, gradient_accumulation_steps=2, random_flip=True,
                 learning_rate=1e-2, **BASELINE_FLAGS[kind])
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = ok(run_script(base_args(tiny_sd, straight, max_train_steps=6, checkpointing_steps=100, **flags)))
    saved = find_trained(straight)
    assert saved == (straight / LORA_WEIGHT_NAME if kind == "lora" else straight / OFT_FOLDER)
    count = trained_parameters(saved)
    assert f"trainable parameters: {count:,}" in proc.stdout, "the printed count is the saved file's"
    card = (straight / "README.md").read_text()
    assert card.startswith("---") and f"{ {'lora': 'LoRA', 'oft': 'OFT'}[kind]} DreamBooth" in card

    # exact resume: 3 steps, stop, resume latest for 3 more == 6 straight (mid-epoch, accumulation 2 over 3 photos)
    ok(run_script(base_args(tiny_sd, split, max_train_steps=3, checkpointing_steps=3, **flags)))
    ok(run_script(base_args(tiny_sd, split, max_train_steps=6, checkpointing_steps=100,
                            resume_from_checkpoint="latest", **flags)))
    assert max_diff(saved_tensors(straight), saved_tensors(split)) <= 1e-6

    # the consumer reproduces what the trainer trained, UNet and text encoder alike
    from diffusers import StableDiffusionPipeline

    reference = trained_models(tiny_sd, straight)
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd, safety_checker=None)
    base_hidden, base_pred = outputs(pipe.unet, pipe.text_encoder, pipe.tokenizer)
    if kind == "lora":
        pipe.load_lora_weights(straight)
        unet, text_encoder = pipe.unet, pipe.text_encoder
    else:
        from peft import PeftModel

        unet = PeftModel.from_pretrained(pipe.unet, straight / OFT_FOLDER / "unet")
        text_encoder = PeftModel.from_pretrained(pipe.text_encoder, straight / OFT_FOLDER / "text_encoder")
    hidden, pred = outputs(unet, text_encoder, pipe.tokenizer)
    want_hidden, want_pred = outputs(reference["unet"], reference["text_encoder"], pipe.tokenizer)
    assert (hidden - base_hidden).abs().max() > 1e-4 and (pred - base_pred).abs().max() > 1e-4, "it learned"
    assert torch.allclose(hidden, want_hidden, atol=1e-5) and torch.allclose(pred, want_pred, atol=1e-5)
    assert math.isfinite(pred.abs().sum().item())
