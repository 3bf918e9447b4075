"""The tiny SD3 and FLUX.1 builders: the offline T5 tokenizer, the families' real pipeline classes and settings,
generation, determinism, the CLI's family choice."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hra_diffusion.testing import tiny
from hra_diffusion.testing.offline_tokenizers import t5_tokenizer

PROMPT = "a photo of sks dog"
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _generate(pipe, **size) -> np.ndarray:
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator().manual_seed(0)
    image = pipe(PROMPT, num_inference_steps=2, generator=gen, output_type="np", **size).images
    assert image.shape == (1, 64, 64, 3) and np.isfinite(image).all()
    return image


def test_t5_tokenizer_round_trips_and_is_deterministic(tmp_path):
    from transformers import T5TokenizerFast

    t5_tokenizer(tmp_path / "a")
    t5_tokenizer(tmp_path / "b")
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()
    tok = T5TokenizerFast.from_pretrained(tmp_path / "a")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    assert len(tok) == 32100 and tok.model_max_length == 512
    assert tok.convert_tokens_to_ids(["<extra_id_0>", "<extra_id_99>"]) == [32099, 32000]  # T5's sentinel order
    ids = tok(PROMPT).input_ids
    assert ids[-1] == tok.eos_token_id and tok.unk_token_id not in ids
    assert tok.convert_ids_to_tokens(ids)[:3] == ["▁a", "▁photo", "▁of"]  # whole words, SentencePiece-style
    assert tok.decode(ids, skip_special_tokens=True) == PROMPT
    assert tok.decode(tok("It's 3:45pm... don't you think?").input_ids[:-1]) == "It's 3:45pm... don't you think?"
    padded = tok(PROMPT, padding="max_length", max_length=16).input_ids
    assert padded == ids + [tok.pad_token_id] * (16 - len(ids))


def test_sd3_pipeline(tiny_sd3):
    from diffusers import DiffusionPipeline, StableDiffusion3Pipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd3)
    assert type(pipe) is StableDiffusion3Pipeline
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__, type(pipe.text_encoder_3).__name__] \
        == ["CLIPTextModelWithProjection", "CLIPTextModelWithProjection", "T5EncoderModel"]
    assert pipe.tokenizer_3.eos_token_id == 1 and pipe.tokenizer.eos_token_id == 49407
    sched, vae, dit = pipe.scheduler.config, pipe.vae.config, pipe.transformer.config
    assert (type(pipe.scheduler).__name__, sched.shift, sched.use_dynamic_shifting) == (
        "FlowMatchEulerDiscreteScheduler", 3.0, False)
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 1.5305, 0.0609)
    assert dit.joint_attention_dim == pipe.text_encoder_3.config.d_model > 2 * pipe.text_encoder.config.hidden_size
    assert dit.pooled_projection_dim == 2 * pipe.text_encoder.config.projection_dim
    modules = dict(pipe.transformer.named_modules())
    assert "transformer_blocks.0.attn2.to_q" in modules and "transformer_blocks.1.attn2" not in modules
    assert "transformer_blocks.0.attn.add_q_proj" in modules and "transformer_blocks.1.attn.to_add_out" not in modules
    _generate(pipe)  # the transformer's 32 latent pixels x the VAE's 2x: 64 px by default


@pytest.mark.parametrize("schnell", [False, True], ids=["dev", "schnell"])
def test_flux_pipeline(schnell, tiny_flux, tmp_path):
    from diffusers import DiffusionPipeline, FluxPipeline

    folder = tiny.build_tiny_pipeline(tmp_path / "schnell", family="flux-schnell") if schnell else tiny_flux
    pipe = DiffusionPipeline.from_pretrained(folder)
    assert type(pipe) is FluxPipeline
    assert [type(pipe.text_encoder).__name__, type(pipe.text_encoder_2).__name__] == ["CLIPTextModel", "T5EncoderModel"]
    sched, vae, dit = pipe.scheduler.config, pipe.vae.config, pipe.transformer.config
    assert (sched.use_dynamic_shifting, sched.shift) == ((False, 1.0) if schnell else (True, 3.0))
    assert (sched.base_shift, sched.max_shift, sched.base_image_seq_len, sched.max_image_seq_len) == (
        0.5, 1.15, 256, 4096)
    assert (vae.latent_channels, vae.scaling_factor, vae.shift_factor) == (16, 0.3611, 0.1159)
    assert dit.in_channels == 4 * vae.latent_channels and dit.guidance_embeds is not schnell
    assert dit.pooled_projection_dim == pipe.text_encoder.config.hidden_size
    assert dit.joint_attention_dim == pipe.text_encoder_2.config.d_model
    assert len(pipe.transformer.transformer_blocks) == len(pipe.transformer.single_transformer_blocks) == 2
    _generate(pipe, height=64, width=64, max_sequence_length=64)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_same_seed_same_bits(family, request, tmp_path):
    built = request.getfixturevalue(f"tiny_{family}")
    again = tiny.build_tiny_pipeline(tmp_path / "again", family=family)
    files = sorted(f.relative_to(built) for f in built.rglob("*") if f.is_file())
    assert files == sorted(f.relative_to(again) for f in again.rglob("*") if f.is_file())
    assert {f.parts[0] for f in files} >= {"transformer", "text_encoder_2", "tokenizer_2", "scheduler", "vae"}
    for f in files:
        assert (built / f).read_bytes() == (again / f).read_bytes(), f
    info = json.loads((again / tiny.MARKER).read_text())
    assert (info["family"], info["seed"]) == (family, 0) and "prediction_type" not in info
    tiny.build_tiny_pipeline(again, family=family, seed=1)
    a, b = load_file(built / "transformer" / WEIGHTS), load_file(again / "transformer" / WEIGHTS)
    assert a.keys() == b.keys() and not torch.equal(a["proj_out.weight"], b["proj_out.weight"])


def test_family_options_are_checked(tmp_path):
    with pytest.raises(ValueError, match="one of sd, sdxl, sd3, flux, flux-schnell"):
        tiny.build_tiny_pipeline(tmp_path / "x", family="sd2")
    with pytest.raises(ValueError, match="only the tiny SD pipeline has a ControlNet"):
        tiny.build_tiny_pipeline(tmp_path / "x", family="sd3", controlnet=True)
    with pytest.raises(ValueError, match="flow matching"):
        tiny.build_tiny_pipeline(tmp_path / "x", family="flux", prediction_type="v_prediction")
    assert list(tmp_path.iterdir()) == []


def test_cli_family_and_sdxl_alias(tmp_path, capsys):
    assert tiny.main([str(tmp_path / "sd3"), "--family", "sd3", "--seed", "2"]) == 0
    assert json.loads((tmp_path / "sd3" / tiny.MARKER).read_text())["family"] == "sd3"
    assert "text_encoder_3: 4,440,832 parameters" in capsys.readouterr().out
    assert tiny.main([str(tmp_path / "xl"), "--sdxl", "--prediction-type", "v_prediction"]) == 0
    info = json.loads((tmp_path / "xl" / tiny.MARKER).read_text())
    assert (info["family"], info["prediction_type"]) == ("sdxl", "v_prediction")
