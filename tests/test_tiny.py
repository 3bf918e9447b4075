"""The offline tiny Stable Diffusion factory: real CLIP tokenizer, loadable pipelines, determinism, caching, CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hra_diffusion.testing import tiny

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "a photo of a cat",
    "A photo of sks dog, in the style of Van Gogh!!",
    "an  astronaut riding a horse, 4k, highly-detailed; (masterpiece:1.2) [bad] <lora> #hashtag @me",
    "It's 3:45pm... don't you think?",
    "qwe",
    "",
]


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        for k, v in load_file(f).items():
            out[f"{f.parent.name}/{k}"] = v
    return out


def test_tokenizer_matches_open_clip(tmp_path):
    from open_clip.tokenizer import SimpleTokenizer

    ref = SimpleTokenizer()
    tok = tiny.clip_tokenizer(tmp_path / "tok")
    assert len(tok) == 49408 and tok.model_max_length == 77
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (49406, 49407, 49407)
    assert (tmp_path / "tok" / "merges.txt").read_text().startswith("#version: 0.2\n")
    assert len(json.loads((tmp_path / "tok" / "vocab.json").read_text())) == 49408
    for text in TEXTS:
        assert tok(text).input_ids == [ref.sot_token_id, *ref.encode(text), ref.eot_token_id], text
    assert tok.convert_ids_to_tokens(tok("qwe").input_ids) == ["<|startoftext|>", "q", "we</w>", "<|endoftext|>"]
    padded = tok("a photo", padding="max_length", max_length=77).input_ids
    assert len(padded) == 77 and padded[-1] == 49407


def test_pipeline_loads_and_generates(tiny_sd):
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.safety_checker is None and pipe.feature_extractor is None
    cfg = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("scaled_linear", 0.00085, 0.012)
    assert (cfg.steps_offset, cfg.clip_sample, cfg.set_alpha_to_one) == (1, False, False)
    assert cfg.prediction_type == "epsilon"
    te = pipe.text_encoder.config
    assert (te.bos_token_id, te.eos_token_id, te.pad_token_id) == (49406, 49407, 49407)
    gen = torch.Generator().manual_seed(0)
    image = pipe("a photo of sks dog", num_inference_steps=2, generator=gen, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_v_prediction_variant(tiny_sd_v):
    from diffusers import StableDiffusionPipeline

    assert not (tiny_sd_v / "controlnet").exists()
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_v)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    image = pipe("x", num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_unet_has_attention_and_geglu(tiny_sd):
    from diffusers import UNet2DConditionModel
    from diffusers.models.activations import GEGLU

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    modules = dict(unet.named_modules())
    block = "down_blocks.0.attentions.0.transformer_blocks.0"
    for attn in ("attn1", "attn2"):
        for proj in ("to_q", "to_k", "to_v", "to_out.0"):
            assert isinstance(modules[f"{block}.{attn}.{proj}"], torch.nn.Linear)
    assert isinstance(modules[f"{block}.ff.net.0"], GEGLU)
    assert isinstance(modules[f"{block}.ff.net.0.proj"], torch.nn.Linear)
    assert "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k" in modules
    assert modules[f"{block}.attn2.to_k"].in_features == 32  # cross_attention_dim
    assert unet.config.sample_size == 32 and tuple(unet.config.block_out_channels) == (32, 64)


def test_same_seed_same_bits_and_overwrite(tiny_sd, tmp_path):
    again = tiny.build_tiny_pipeline(tmp_path / "again", controlnet=True)
    a, b = _weights(tiny_sd), _weights(again)
    assert a.keys() == b.keys() and any(k.startswith("controlnet/") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    # An existing tiny pipeline is replaced in place; another seed gives other weights.
    tiny.build_tiny_pipeline(again, seed=1)
    c = _weights(again)
    assert not (again / "controlnet").exists()
    assert not torch.equal(a["unet/conv_in.weight"], c["unet/conv_in.weight"])
    assert [p.name for p in tmp_path.iterdir()] == ["again"]  # no temp dirs left behind


def test_refuses_foreign_folder(tmp_path):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny pipeline"):
        tiny.build_tiny_pipeline(tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError):
        tiny.build_tiny_pipeline(tmp_path / "bad", prediction_type="sample")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]


def test_controlnet_pipeline_runs(tiny_sd):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    controlnet = ControlNetModel.from_pretrained(tiny_sd / "controlnet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(tiny_sd, controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    cond = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8))
    image = pipe("a cat", image=cond, num_inference_steps=2, output_type="np").images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()


def test_ensure_builds_once_and_reuses(tmp_path, monkeypatch):
    calls = []
    real_build = tiny._build_into
    monkeypatch.setattr(tiny, "_build_into", lambda folder, **kw: calls.append(kw) or real_build(folder, **kw))
    first = tiny.ensure_tiny_pipeline(tmp_path, controlnet=True)
    stamp = (first / "model_index.json").stat().st_mtime_ns
    second = tiny.ensure_tiny_pipeline(tmp_path, controlnet=True)
    assert first == second and len(calls) == 1
    assert (second / "model_index.json").stat().st_mtime_ns == stamp
    assert (second / "controlnet" / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_ensure_race_loser_uses_winner(tmp_path, monkeypatch):
    real_build = tiny._build_into
    target = tmp_path / "tiny-sd"

    def build_while_another_process_wins(folder, **kw):
        winner = tmp_path / "winner"
        real_build(winner, **kw)
        (winner / "won").write_text("")
        winner.rename(target)  # the other process publishes first
        real_build(folder, **kw)

    monkeypatch.setattr(tiny, "_build_into", build_while_another_process_wins)
    assert tiny.ensure_tiny_pipeline(tmp_path, controlnet=False) == target
    assert (target / "won").exists() and tiny.is_tiny_pipeline(target)
    assert [p.name for p in tmp_path.iterdir()] == ["tiny-sd"]  # the loser's copy is gone


@pytest.mark.slow
def test_cli(tmp_path):
    out = tmp_path / "cli"
    cmd = [sys.executable, "-m", "hra_diffusion.testing.tiny", str(out),
           "--prediction-type", "v_prediction", "--seed", "3"]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert lines[0] == str(out.absolute())
    assert any(line.startswith("unet: ") and line.endswith(" parameters") for line in lines)
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["prediction_type"] == "v_prediction"
    assert json.loads((out / tiny.MARKER).read_text())["seed"] == 3
