"""SDXL: HRA on the UNet and both text encoders, through the same file, pipeline and export paths as SD 1.x."""

import json

import numpy as np
import pytest
import torch
from adapter_helpers import TE_TARGETS, UNET_TARGETS, adapted, assert_rel
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open

from hra_diffusion import HRAConfig, add_hra, hra_adapters, read_hra_metadata, save_hra
from hra_diffusion.diffusion import PromptEncoder
from hra_diffusion.export import export_lora, export_merged
from hra_diffusion.families.sdxl import sdxl_time_ids
from hra_diffusion.pipelines import (
    ModelNotFoundError,
    attach_adapters,
    fp32_vae_decode,
    generate,
    load_pipeline,
    pipeline_components,
)

GEN = {"prompt": "a photo of sks dog", "num_inference_steps": 2, "output_type": "latent", "height": 64, "width": 64}
TE_PROBE = "text_model.encoder.layers.0.self_attn.q_proj"


def latents(pipe):
    return pipe(**GEN, generator=torch.Generator().manual_seed(0)).images


def adapt_all(pipe):
    adapted(pipe.unet, HRAConfig(r=4, target_modules=UNET_TARGETS))
    adapted(pipe.text_encoder, HRAConfig(r=2, target_modules=TE_TARGETS), seed=1)
    adapted(pipe.text_encoder_2, HRAConfig(r=2, target_modules=(*TE_TARGETS, "text_projection")), seed=2)


def test_sdxl_identity_at_start_then_file_round_trip(tiny_sdxl, tmp_path):
    pipe = load_pipeline(tiny_sdxl, device="cpu")
    assert isinstance(pipe, StableDiffusionXLPipeline)
    assert set(pipeline_components(pipe)) == {"unet", "text_encoder", "text_encoder_2"}
    base = latents(pipe)
    for name, model in pipeline_components(pipe).items():
        add_hra(model, HRAConfig(r=2, target_modules=UNET_TARGETS if name == "unet" else TE_TARGETS))
    assert_rel(latents(pipe), base, tol=1e-5)  # fresh adapters: the base model's output, to float32 rounding

    trained = load_pipeline(tiny_sdxl, device="cpu")
    adapt_all(trained)
    expected = latents(trained)
    assert (expected - base).abs().max() > 1e-3
    path = save_hra(pipeline_components(trained), tmp_path / "subject.safetensors")
    assert set(read_hra_metadata(path)["adapters"]) == {"unet", "text_encoder", "text_encoder_2"}

    fresh = load_pipeline(tiny_sdxl, device="cpu")
    attach_adapters(fresh, [path])
    assert all("subject" in hra_adapters(m) for m in pipeline_components(fresh).values())
    assert_rel(latents(fresh), expected, tol=1e-6)  # the same computation: equal to float32 rounding


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_sdxl_lora_export_reproduces_hra_in_diffusers(tiny_sdxl, tmp_path, fmt):
    hra_pipe = load_pipeline(tiny_sdxl, device="cpu")
    adapt_all(hra_pipe)
    path = export_lora(pipeline_components(hra_pipe), tmp_path / "lora", format=fmt)
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
        assert set(json.loads(f.metadata()["hra_base_sha256"])) == {"unet", "text_encoder", "text_encoder_2"}
    if fmt == "kohya":  # kohya / ComfyUI name SDXL's encoders te1 and te2
        te = TE_PROBE.replace(".", "_")
        assert f"lora_te1_{te}.lora_down.weight" in keys and f"lora_te2_{te}.lora_down.weight" in keys
        assert not any(k.startswith("lora_te_") for k in keys)
    lora_pipe = load_pipeline(tiny_sdxl, device="cpu")
    lora_pipe.load_lora_weights(str(path.parent))
    assert_rel(latents(lora_pipe), latents(hra_pipe), tol=1e-4)


def test_sdxl_merged_export_loads_as_sdxl(tiny_sdxl, tmp_path):
    pipe = load_pipeline(tiny_sdxl, device="cpu")
    adapt_all(pipe)
    expected = latents(pipe)
    merged = load_pipeline(export_merged(pipe, tmp_path / "merged"), device="cpu")
    assert isinstance(merged, StableDiffusionXLPipeline)
    assert_rel(latents(merged), expected, tol=1e-5)


def test_other_pipeline_kinds_are_refused_clearly(tmp_path):
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "KandinskyV22Pipeline"}))
    with pytest.raises(ModelNotFoundError, match=r"KandinskyV22Pipeline is not supported.*SDXL.*FLUX"):
        load_pipeline(tmp_path, device="cpu")


@pytest.mark.parametrize("cache", [False, True])
def test_prompt_encoder_matches_the_sdxl_pipeline(tiny_sdxl, cache):
    """The trainer's conditioning must be what StableDiffusionXLPipeline itself feeds the UNet at inference."""
    pipe = load_pipeline(tiny_sdxl, device="cpu")
    prompts = ["a photo of sks dog", "a dog", "a photo of sks dog"]
    encoder = PromptEncoder(pipe, cache=cache)
    hidden, pooled = encoder(prompts, pipeline_components(pipe), torch.device("cpu"))
    with torch.no_grad():
        expected_hidden, _, expected_pooled, _ = pipe.encode_prompt(prompts, do_classifier_free_guidance=False)
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-6)

    size_crop = torch.tensor([[700, 1200, 16, 88], [1024, 1024, 0, 0]])
    expected = [
        pipe._get_add_time_ids(
            (h, w), (top, left), (512, 512), torch.float32, pipe.text_encoder_2.config.projection_dim
        )[0]
        for h, w, top, left in size_crop.tolist()
    ]  # fmt: skip
    assert torch.equal(sdxl_time_ids(size_crop, 512).float(), torch.stack(expected))


def test_vae_decodes_in_fp32_under_autocast(tiny_sdxl):
    """Mixed-precision validation and class images run under autocast; SDXL's float32 VAE must not be lowered to
    fp16 there (it overflows: black images). The pipelines upcast only a VAE whose weights are fp16."""
    pipe = load_pipeline(tiny_sdxl, device="cpu")
    seen = []
    pipe.vae.decoder.register_forward_pre_hook(lambda module, args: seen.append(args[0].dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        images = generate(pipe, "a dog", steps=2, height=64, width=64, output_type="np")
        with fp32_vae_decode(pipe):
            pipe.vae.decode(torch.randn(1, 4, 32, 32))
    assert seen == [torch.float32, torch.float32] and np.isfinite(images[0]).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        pipe.vae.decode(torch.randn(1, 4, 32, 32))  # outside the context: autocast lowers it, as before
    assert seen[-1] == torch.bfloat16 and "decode" not in vars(pipe.vae), "the VAE is left as it was"
