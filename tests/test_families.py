"""Model families: detection, the training side against each family's own pipeline, and HRA on SD3 and FLUX.1
through the same file, pipeline and export paths as SD (identity, float64 reference, save/load, strength, the
diffusers LoRA and merged exports read by diffusers' loaders, DreamBooth with exact resume)."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from adapter_helpers import adapted, assert_rel
from test_dreambooth import adapter_tensors, base_args, events, max_diff, ok, run_script
from test_householder import dense_reflections

from hra_diffusion import HRAConfig, add_hra, hra_adapters, hra_layers, hra_parameters, read_hra_metadata, save_hra
from hra_diffusion.diffusion import PromptEncoder
from hra_diffusion.export import export_lora, export_merged
from hra_diffusion.families import BY_NAME, FlowOptions, family_for_pipeline, family_of
from hra_diffusion.families.objectives import FlowMatchObjective
from hra_diffusion.pipelines import attach_adapters, load_pipeline, pipeline_components

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = {"sd": "tiny_sd", "sdxl": "tiny_sdxl", "sd3": "tiny_sd3", "flux": "tiny_flux"}
NEW = ("sd3", "flux")
PROMPTS = ["a photo of sks dog", "a red cube in the snow", "a photo of sks dog"]
# Guidance 1 turns classifier-free guidance off (one denoiser call per image); FLUX.1-dev embeds its guidance
# instead and is trained at 3.5, which its pipeline then feeds the transformer.
GUIDANCE = {"sd": 1.0, "sdxl": 1.0, "sd3": 1.0, "flux": 3.5, "flux-schnell": 0.0}
WITH_SCHNELL = {**FIXTURES, "flux-schnell": "tiny_flux_schnell"}  # FLUX without the guidance embedding


@pytest.fixture(scope="module")
def tiny_flux_schnell(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from hra_diffusion.testing.tiny import build_tiny_pipeline

    return build_tiny_pipeline(tmp_path_factory.mktemp("schnell") / "flux-schnell", family="flux-schnell")


def pipe_of(request, name: str):
    return load_pipeline(request.getfixturevalue(WITH_SCHNELL[name]), device="cpu")


def latents(pipe, name: str, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return pipe("a photo of sks dog", num_inference_steps=2, guidance_scale=GUIDANCE[name], height=64, width=64,
                output_type="latent", generator=generator).images


# -- detection and the one-place rule --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
def test_each_family_is_found_from_its_index_its_pipeline_and_its_denoiser(request, name):
    folder = request.getfixturevalue(FIXTURES[name])
    pipe = load_pipeline(folder, device="cpu")
    class_name = json.loads((folder / "model_index.json").read_text())["_class_name"]
    family = BY_NAME[name]
    assert type(pipe).__name__ == family.pipeline == class_name
    assert family_for_pipeline(class_name) is family
    denoiser = getattr(pipe, family.denoiser)
    assert family_of(pipe) is family_of(pipeline_components(pipe)) is family_of(denoiser) is family
    assert set(pipeline_components(pipe)) == set(family.components)


FAMILY_WORDS = ("sdxl", "sd3", "flux", "text_time", "stablediffusionxl", "stablediffusion3")


def family_checks(source: str) -> list[tuple[int, str]]:
    """(line, text) of each identifier, attribute, compared string or prefix test that names a model kind."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            texts = [node.id]
        elif isinstance(node, ast.Attribute):
            texts = [node.attr]
        elif isinstance(node, ast.Compare):  # kind == "sdxl"
            texts = [c.value for c in (node.left, *node.comparators) if isinstance(c, ast.Constant)]
        elif isinstance(node, ast.Call) and getattr(node.func, "attr", "") in ("startswith", "endswith"):
            texts = [c.value for c in node.args if isinstance(c, ast.Constant)]
        else:
            continue
        found += [(node.lineno, t) for t in texts if isinstance(t, str) and any(w in t.lower() for w in FAMILY_WORDS)]
    return sorted(found)


def test_no_family_checks_outside_the_family_package():
    """Model kinds are known in hra_diffusion/families only: no identifier or compared string elsewhere names one
    (docstrings, comments and help texts may)."""
    offenders = []
    for folder in ("hra_diffusion", "training", "app", "eval"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if not rel.startswith(("hra_diffusion/families/", "hra_diffusion/testing/")):
                offenders += [f"{rel}:{line}: {text}" for line, text in family_checks(path.read_text())]
    assert not offenders, "family checks outside hra_diffusion/families:\n" + "\n".join(offenders)


def test_the_scan_sees_family_checks():
    """The scan above is not blind: the checks SD and SDXL were told apart by before families existed are caught."""
    assert sorted({line for line, _ in family_checks(
        "if is_sdxl(pipe):\n    pass\nok = name.startswith('StableDiffusionXL')\nsd = kind == 'sd3'\n"
        "added = config.addition_embed_type\nhelp_text = 'SDXL works too'"
    )}) == [1, 3, 4]


# -- the training side against each family's own pipeline ------------------------------------------------------------


@pytest.mark.parametrize("name", FIXTURES)
@pytest.mark.parametrize("cache", [False, True])
def test_prompt_encoder_matches_the_pipeline(request, name, cache):
    pipe = pipe_of(request, name)
    hidden, pooled = PromptEncoder(pipe, cache=cache)(PROMPTS, pipeline_components(pipe), torch.device("cpu"))
    with torch.no_grad():
        if name == "flux":
            expected_hidden, expected_pooled, _ = pipe.encode_prompt(PROMPTS, prompt_2=None)
        elif name == "sd":
            expected_hidden, _ = pipe.encode_prompt(PROMPTS, "cpu", 1, do_classifier_free_guidance=False)
            expected_pooled = None
        else:
            expected_hidden, _, expected_pooled, _ = pipe.encode_prompt(
                PROMPTS, **({"prompt_2": None, "prompt_3": None} if name == "sd3" else {}),
                do_classifier_free_guidance=False,
            )
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    if expected_pooled is None:
        assert pooled is None
    else:
        torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-6)


def test_sd3_without_t5_encodes_zeros_as_its_pipeline_does(tiny_sd3):
    pipe = load_pipeline(tiny_sd3, device="cpu", text_encoder_3=None, tokenizer_3=None)
    hidden, pooled = PromptEncoder(pipe, cache=False)(PROMPTS, pipeline_components(pipe), torch.device("cpu"))
    with torch.no_grad():
        expected_hidden, _, expected_pooled, _ = pipe.encode_prompt(
            PROMPTS, prompt_2=None, prompt_3=None, do_classifier_free_guidance=False
        )
    torch.testing.assert_close(hidden, expected_hidden, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, expected_pooled, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", WITH_SCHNELL)
def test_the_training_call_is_the_pipelines_own(request, name):
    """Family.predict on unpacked latents, with the trainer's conditioning, returns what the pipeline's own denoiser
    call returned at its first step (FLUX: packed 2x2 latents, ids, guidance or none, timestep / 1000; SDXL: size
    ids)."""
    pipe = pipe_of(request, name)
    family = family_of(pipe)
    denoiser = getattr(pipe, family.denoiser)
    calls = []
    hook = denoiser.register_forward_hook(lambda m, args, kwargs, out: calls.append((args, kwargs, out)),
                                          with_kwargs=True)
    latents(pipe, name)
    hook.remove()
    args, kwargs, out = calls[0]
    cond = PromptEncoder(pipe, cache=False)(["a photo of sks dog"], pipeline_components(pipe), torch.device("cpu"))
    if family.denoiser == "unet":
        noisy, timestep, expected = args[0], args[1], out[0]
    else:
        noisy, timestep, expected = kwargs["hidden_states"], kwargs["timestep"], out[0]
    if family.name == "flux":  # the pipeline packs latents and feeds t / 1000; the trainer works on (B, C, H, W), t
        noisy, expected = (pipe._unpack_latents(x, 64, 64, pipe.vae_scale_factor) for x in (noisy, expected))
        timestep = timestep * 1000
    batch = {"size_crop": torch.tensor([[64, 64, 0, 0]])}  # SDXL at inference: original 64x64, no crop
    with torch.no_grad():
        pred = family.predict(denoiser, noisy, timestep.expand(len(noisy)), cond, batch, 64)
    torch.testing.assert_close(pred, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NEW)
def test_flow_objective_noises_as_the_scheduler_does(request, name):
    """(noisy, t, target) from the objective: noisy is the scheduler's own scale_noise of x at t, target is noise - x,
    and the timestep density follows the scheme (logit_normal concentrates mid-schedule, 'none' is uniform)."""
    pipe = pipe_of(request, name)
    config = pipe.scheduler.config
    torch.manual_seed(0)
    x = torch.randn(256, 4, 2, 2)
    for scheme in ("none", "logit_normal"):
        noisy, t, target, weight = FlowMatchObjective(config, FlowOptions(scheme)).sample(x)
        noise = target + x
        reference = type(pipe.scheduler).from_config(config)
        torch.testing.assert_close(noisy, reference.scale_noise(x, t, noise), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(weight, torch.ones(len(x)))
        index = (reference.timesteps[None, :] == t[:, None]).float().argmax(dim=1)  # where t sits in the schedule
        middle = ((index > 250) & (index < 750)).float().mean().item()
        assert (0.4 < middle < 0.6) if scheme == "none" else middle > 0.6, (scheme, middle)
    sigmas = FlowMatchObjective(config, FlowOptions("sigma_sqrt")).sample(x)
    assert torch.all(sigmas[3] >= 1), "sigma^-2 weights are at least 1"


# -- HRA on SD3 and FLUX ---------------------------------------------------------------------------------------------


def adapt(pipe, name: str, seed: int = 0) -> None:
    """HRA on the denoiser's default targets and on every CLIP text encoder, moved away from the identity."""
    family = BY_NAME[name]
    adapted(getattr(pipe, family.denoiser), HRAConfig(r=4, target_modules=family.default_targets), seed=seed)
    for i, te in enumerate(family.trainable_text_encoders):
        adapted(getattr(pipe, te), HRAConfig(r=2, target_modules=family.text_targets), seed=seed + 1 + i)


@pytest.mark.parametrize("name", NEW)
def test_identity_at_start_and_dense_reference_on_every_adapted_layer(request, name):
    """Both streams' attention is adapted by default; each layer computes with W H, H the float64 product of its
    reflections built one at a time."""
    pipe = pipe_of(request, name)
    base = latents(pipe, name)
    family = BY_NAME[name]
    denoiser = getattr(pipe, family.denoiser)
    add_hra(denoiser, HRAConfig(r=4, target_modules=family.default_targets))
    torch.testing.assert_close(latents(pipe, name), base, rtol=0, atol=1e-6)
    paths = [path for path, _ in hra_layers(denoiser)]
    assert any(p.endswith("add_q_proj") for p in paths) and any(p.endswith("to_add_out") for p in paths)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in hra_parameters(denoiser):
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.norm(dim=0, keepdim=True))
    for _, layer in hra_layers(denoiser):
        u = layer.hra_u["default"].detach().double()
        h = dense_reflections(u)
        x = torch.randn(3, u.shape[0], generator=gen)
        bias = layer.base_layer.bias
        expected = x.double() @ (layer.base_layer.weight.double() @ h).T
        expected = expected + (bias.double() if bias is not None else 0)
        with torch.no_grad():
            assert_rel(layer(x).double(), expected, 1e-5)


@pytest.mark.parametrize("name", NEW)
def test_file_round_trip_strength_and_exports(request, name, tmp_path):
    """save -> load in a fresh pipeline gives the same images; strength 0 is the base; the diffusers LoRA export read
    by the family's own load_lora_weights, and the merged export loaded as a plain pipeline, reproduce them."""
    pipe = pipe_of(request, name)
    base = latents(pipe, name)
    adapt(pipe, name)
    ours = latents(pipe, name)
    assert (ours - base).abs().max() > 1e-3
    path = save_hra(pipeline_components(pipe), tmp_path / "subject.safetensors")
    assert sorted(read_hra_metadata(path)["adapters"]) == sorted({BY_NAME[name].denoiser,
                                                                   *BY_NAME[name].trainable_text_encoders})

    fresh = pipe_of(request, name)
    attach_adapters(fresh, [path])
    assert_rel(latents(fresh, name), ours, 1e-5)
    attach_adapters(fresh, [path], strengths=[0.0])
    torch.testing.assert_close(latents(fresh, name), base, rtol=0, atol=1e-5)

    lora = pipe_of(request, name)
    lora.load_lora_weights(export_lora(pipeline_components(pipe), tmp_path / "lora", adapter_name="default"))
    assert_rel(latents(lora, name), ours, 1e-4)

    merged = load_pipeline(export_merged(pipe, tmp_path / "merged"), device="cpu")
    assert not any(hra_adapters(m) for m in pipeline_components(merged).values())
    assert_rel(latents(merged, name), ours, 1e-4)
    with pytest.raises(ValueError, match="no kohya LoRA keys.*diffusers"):
        export_lora(pipeline_components(pipe), tmp_path / "kohya.safetensors", format="kohya")


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_dreambooth_trains_and_resumes_exactly(request, name, tmp_path):
    """DreamBooth with the CLIP encoders trained, prior preservation, bf16 and a validation sample: 4 steps straight
    == 2, stop, resume, 2 more (flow matching's timestep density and noise replay), and the adapter changes what the
    pipeline draws."""
    model = request.getfixturevalue(FIXTURES[name])
    common = dict(train_text_encoder=True, learning_rate=3e-3, gradient_accumulation_steps=2, mixed_precision="bf16",
                  with_prior_preservation=True, class_prompt="a photo of dog", num_class_images=2,
                  num_class_inference_steps=2, class_data_dir=tmp_path / "class")
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_script(base_args(model, straight, max_train_steps=4, checkpointing_steps=100, num_validation_images=1,
                            num_validation_inference_steps=2, **common)))
    assert len(list((tmp_path / "class").glob("*.png"))) == 2
    assert f"- {BY_NAME[name].tags[0]}" in (straight / "README.md").read_text()
    ok(run_script(base_args(model, split, max_train_steps=2, checkpointing_steps=2, **common)))
    ok(run_script(base_args(model, split, max_train_steps=4, checkpointing_steps=100,
                            resume_from_checkpoint="latest", **common)))
    assert [e["step"] for e in events(split) if e["event"] == "step"] == [1, 2, 3, 4]
    assert max_diff(adapter_tensors(straight), adapter_tensors(split)) <= 1e-6
    family = BY_NAME[name]
    meta = read_hra_metadata(straight / "hra_adapter.safetensors")
    assert meta["pipeline"] == family.pipeline and meta["prediction_type"] == "flow_matching"
    assert sorted(meta["adapters"]) == sorted({family.denoiser, *family.trainable_text_encoders})
    assert all(e["loss"] == e["loss"] for e in events(straight) if e["event"] == "step")
    pipe = load_pipeline(model, device="cpu")
    before = latents(pipe, name)
    attach_adapters(pipe, [straight / "hra_adapter.safetensors"])
    assert (latents(pipe, name) - before).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("name", NEW)
def test_the_app_runs_on_the_family(request, name, tmp_path):
    """The app with an SD3 / FLUX base: its form defaults to the model's size, it trains a subject with the page's
    request, generates with the result, and downloads it as a diffusers LoRA the family's pipeline reads."""
    import time

    from app.studio import Studio
    from app.training_service import TrainForm

    model = request.getfixturevalue(FIXTURES[name])
    studio = Studio(tmp_path / "data", base_model=str(model), warm=False)
    try:
        pipe = load_pipeline(model, device="cpu")
        assert studio.defaults().resolution == BY_NAME[name].default_resolution(pipe)
        photos = sorted((ROOT / "tests" / "fixtures" / "subjects" / "dog").glob("*.jpg"))
        form = TrainForm(steps=3, resolution=32, learning_rate=3e-3, preview_steps=2)
        job = studio.train(photos, form)
        deadline = time.monotonic() + 300
        while (job := studio.job_status(job["id"]))["status"] in ("queued", "running"):
            assert time.monotonic() < deadline, job
            time.sleep(0.5)
        assert job["status"] == "done", job
        (adapter,) = [a["name"] for a in studio.list_adapters()]
        kwargs = dict(seed=0, steps=2, guidance=GUIDANCE[name])
        base = np.asarray(studio.generate("a photo of sks dog", **kwargs)[0], dtype=float)
        tuned = np.asarray(studio.generate("a photo of sks dog", adapter=adapter, **kwargs)[0], dtype=float)
        assert np.abs(tuned - base).max() > 0
        lora = studio.export_adapter(adapter, "lora-diffusers")
        pipe.load_lora_weights(str(lora))
    finally:
        studio.close()
