"""Controllable generation: hint encoder, joining the UNet, control adapter files, generation, canny scoring."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from eval.control_score import main as control_score_main
from eval.control_score import score_control
from hra_diffusion import HRAConfig, add_hra, hra_adapters, hra_parameters, load_hra, read_hra_metadata, save_hra
from hra_diffusion.control import (
    CONTROL_TARGETS,
    ConditionEncoder,
    attach_control,
    control_condition,
    control_encoder,
    detach_control,
    load_control_adapter,
    make_condition,
    save_control_adapter,
    set_condition,
    skip_connections,
)
from hra_diffusion.data import ControlDataset, collate_control
from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline
from hra_diffusion.synthetic import make_shapes_dataset


def _unet_inputs(batch: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, timesteps and text states for the tiny UNet (32x32 latents = 64 px images)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, 32, 32, generator=gen), torch.full((batch,), 500),
            torch.randn(batch, 7, 32, generator=gen))


def _run(unet, inputs, condition=None, scale: float = 1.0) -> torch.Tensor:
    with torch.no_grad():
        if condition is None:
            return unet(*inputs).sample
        with control_condition(unet, condition, scale):
            return unet(*inputs).sample


def _controlled_unet(tiny_unet, randomize: bool = False, residuals: bool = False):
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=8, target_modules=CONTROL_TARGETS))
    encoder = ConditionEncoder.for_unet(unet, vae_scale_factor=2, residuals=residuals)
    if randomize:  # stand-in for a trained encoder: the zero-initialized output convs made non-zero
        torch.manual_seed(0)
        for conv in (encoder.conv_out, *encoder.residual_convs):
            torch.nn.init.normal_(conv.weight, std=0.1)
    attach_control(unet, encoder)
    return unet, encoder


def _square(size: tuple[int, int], box: tuple[int, int, int, int]) -> Image.Image:
    image = Image.new("RGB", size, (0, 0, 0))
    ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    return image


@pytest.fixture(scope="module")
def trained(tiny_sd, tiny_unet, tmp_path_factory):
    """A control adapter after a few optimizer steps on the synthetic shapes set, saved to one file."""
    tmp = tmp_path_factory.mktemp("control")
    pipe = load_pipeline(tiny_sd, device="cpu")
    dataset = ControlDataset(make_shapes_dataset(tmp / "shapes", n=4, size=64), resolution=64)
    batch = collate_control([dataset[i] for i in range(len(dataset))])
    with torch.no_grad():
        latents = pipe.vae.encode(batch["pixel_values"]).latent_dist.mean * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(batch["prompts"], padding="max_length", max_length=16, truncation=True,
                             return_tensors="pt").input_ids
        text = pipe.text_encoder(ids)[0]
    unet, encoder = _controlled_unet(tiny_unet)
    unet.train()
    optimizer = torch.optim.AdamW([*hra_parameters(unet), *encoder.parameters()], lr=1e-2)
    torch.manual_seed(0)
    for _ in range(4):
        noise = torch.randn_like(latents)
        timesteps = torch.randint(0, 1000, (len(latents),))
        noisy = pipe.scheduler.add_noise(latents, noise, timesteps)
        with control_condition(unet, batch["conditioning_pixel_values"]):
            loss = F.mse_loss(unet(noisy, timesteps, text).sample, noise)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    unet.eval()
    path = save_control_adapter(unet, encoder, tmp / "control.safetensors", metadata={"control_type": "canny"})
    return {"unet": unet, "encoder": encoder, "path": path, "conditions": batch["conditioning_pixel_values"]}


def test_encoder_shapes_follow_the_unet_and_the_vae(tiny_unet):
    paper = ConditionEncoder()
    assert paper.downscale == 8 and sum(p.numel() for p in paper.parameters()) == 1_086_480
    assert paper(torch.rand(1, 3, 64, 48)).shape == (1, 320, 8, 6)
    unet = tiny_unet()
    assert ConditionEncoder.for_unet(unet)(torch.rand(2, 3, 64, 64)).shape == (2, 32, 8, 8)
    tiny = ConditionEncoder.for_unet(unet, vae_scale_factor=2)
    assert tiny.config == {"out_channels": 32, "channels": [16, 32], "in_channels": 3}
    assert tiny(torch.rand(2, 3, 64, 64)).shape == (2, 32, 32, 32)
    with pytest.raises(ValueError, match="vae_scale_factor"):
        ConditionEncoder.for_unet(unet, vae_scale_factor=3)


@pytest.mark.parametrize("residuals", [False, True], ids=["conv_in", "residuals"])
def test_zero_init_leaves_the_unet_unchanged_and_detach_restores_it(tiny_unet, residuals):
    unet, encoder = _controlled_unet(tiny_unet, residuals=residuals)
    inputs = _unet_inputs()
    base = _run(unet, inputs)
    assert torch.equal(_run(unet, inputs, torch.rand(2, 3, 64, 64)), base)
    assert control_encoder(unet) is encoder and encoder.condition is None, "the context restores the condition"
    assert control_encoder(torch.compile(unet)) is encoder, "found through torch.compile's wrapper"
    with pytest.raises(ValueError, match="resize the condition"):
        _run(unet, inputs, torch.rand(1, 3, 32, 32))
    assert detach_control(unet) is encoder
    assert control_encoder(unet) is None and not any(k.startswith("control_encoder") for k in unet.state_dict())
    with pytest.raises(ValueError, match="no control encoder"):
        set_condition(unet, torch.rand(1, 3, 64, 64))


def test_guidance_batch_gets_the_hint_in_both_halves(tiny_unet):
    unet, _ = _controlled_unet(tiny_unet, randomize=True)
    latents, timesteps, text = _unet_inputs()
    conditions = torch.rand(2, 3, 64, 64)
    single = _run(unet, (latents, timesteps, text), conditions)
    doubled = _run(unet, (latents.repeat(2, 1, 1, 1), timesteps.repeat(2), text.repeat(2, 1, 1)), conditions)
    torch.testing.assert_close(doubled[:2], single)
    torch.testing.assert_close(doubled[2:], single)
    shared = _run(unet, (latents, timesteps, text), conditions[:1])
    torch.testing.assert_close(shared[0], single[0])
    assert not torch.allclose(_run(unet, (latents, timesteps, text), conditions[:1], scale=0.5), shared)
    with pytest.raises(ValueError, match="2 condition images for a UNet batch of 3"):
        _run(unet, _unet_inputs(batch=3), conditions)


def test_residual_hints_are_what_controlnet_adds(tiny_unet):
    """The hooks against diffusers' own ControlNet inputs: the same hints given as down_block_additional_residuals and
    mid_block_additional_residual to the plain UNet (the main hint added to conv_in's output by a hook of the test)."""
    unet, encoder = _controlled_unet(tiny_unet, randomize=True, residuals=True)
    assert encoder.config["residuals"] == skip_connections(unet) == [[32, 1], [32, 2], [64, 2], [64, 2]]
    latents, timesteps, text = _unet_inputs()
    condition = torch.rand(1, 3, 64, 64)  # shared by the batch: the hints are tiled
    hooked = _run(unet, (latents, timesteps, text), condition, scale=0.7)
    with torch.no_grad():
        features = encoder.layers(condition)
        hints = [0.7 * conv(F.avg_pool2d(features, downscale)) for conv, (_, downscale)
                 in zip(encoder.residual_convs, encoder.config["residuals"])]
        main = 0.7 * encoder.conv_out(features)
    detach_control(unet)
    handle = unet.conv_in.register_forward_hook(lambda module, args, out: out + main)
    with torch.no_grad():
        reference = unet(latents, timesteps, text, down_block_additional_residuals=(
            torch.zeros(1), *(hint.expand(2, -1, -1, -1) for hint in hints[:-1])),
            mid_block_additional_residual=hints[-1].expand(2, -1, -1, -1)).sample
    handle.remove()
    torch.testing.assert_close(hooked, reference)
    assert (hooked - _run(unet, (latents, timesteps, text))).abs().max() > 1e-3, "the hints change the output"


def test_residual_control_file_round_trip_and_a_foreign_unet(tiny_unet, tiny_sd, tmp_path):
    from diffusers import UNet2DConditionModel

    unet, encoder = _controlled_unet(tiny_unet, randomize=True, residuals=True)
    path = save_control_adapter(unet, encoder, tmp_path / "residual.safetensors")
    inputs, condition = _unet_inputs(), torch.rand(2, 3, 64, 64)
    fresh = tiny_unet()
    loaded = load_control_adapter(fresh, path)
    assert loaded.config == encoder.config
    assert torch.equal(_run(fresh, inputs, condition), _run(unet, inputs, condition))
    detach_control(fresh)
    assert not any(module._forward_hooks for module in fresh.modules()), "detach removes every hook"
    config = dict(UNet2DConditionModel.load_config(tiny_sd, subfolder="unet"), layers_per_block=2)
    with pytest.raises(ValueError, match="made for another UNet"):
        load_control_adapter(UNet2DConditionModel.from_config(config), path)


def test_trained_control_follows_the_condition(trained, tiny_unet):
    unet, conditions = trained["unet"], trained["conditions"]
    inputs = _unet_inputs(batch=1)
    first, second = _run(unet, inputs, conditions[:1]), _run(unet, inputs, conditions[1:2])
    assert (first - second).abs().max() > 1e-4
    assert (first - _run(unet, inputs)).abs().max() > 1e-4


def test_control_file_round_trip_and_plain_load(trained, tiny_unet):
    meta = read_hra_metadata(trained["path"])
    assert meta["kind"] == "control" and meta["control_type"] == "canny"
    assert json.loads(meta["control_encoder"]) == trained["encoder"].config
    inputs, condition = _unet_inputs(batch=1), trained["conditions"][2:3]

    fresh = tiny_unet()
    encoder = load_control_adapter(fresh, trained["path"])
    assert control_encoder(fresh) is encoder
    assert torch.equal(_run(fresh, inputs, condition), _run(trained["unet"], inputs, condition))

    plain = load_hra(tiny_unet(), trained["path"])
    assert "default" in hra_adapters(plain) and control_encoder(plain) is None
    assert torch.equal(_run(plain, inputs), _run(trained["unet"], inputs))

    subject = tiny_unet()
    add_hra(subject, HRAConfig(r=2))
    subject_path = save_hra(subject, trained["path"].with_name("subject.safetensors"))
    with pytest.raises(ValueError, match="not a control adapter"):
        load_control_adapter(tiny_unet(), subject_path)


def test_generate_with_a_control_image_and_a_subject_adapter(trained, tiny_sd, tiny_unet, tmp_path):
    subject = tiny_unet()
    add_hra(subject, HRAConfig(r=2))
    subject_path = save_hra(subject, tmp_path / "subject.safetensors")
    pipe = load_pipeline(tiny_sd, device="cpu")
    assert attach_adapters(pipe, [trained["path"], subject_path]) == ["control", "subject"]
    assert control_encoder(pipe.unet) is not None
    kwargs = dict(num_images=2, seed=0, steps=2, height=64, width=64, output_type="np")
    plain = np.stack(generate(pipe, "a red circle", **kwargs))
    circle = make_condition(_square((64, 64), (10, 10, 40, 50)))
    controlled = np.stack(generate(pipe, "a red circle", control_image=circle, **kwargs))
    assert controlled.shape == (2, 64, 64, 3)
    assert np.abs(controlled - plain).max() > 1e-4
    assert control_encoder(pipe.unet).condition is None, "the condition only lasts for the call"


def test_attach_adapters_swaps_control_adapters(trained, tiny_sd, tiny_unet, tmp_path):
    """Per-request attach_adapters (as the app calls it) keeps exactly the listed control encoder on the UNet."""
    other = tmp_path / "other.safetensors"
    shutil.copyfile(trained["path"], other)
    subject = tiny_unet()
    add_hra(subject, HRAConfig(r=2))
    subject_path = save_hra(subject, tmp_path / "subject.safetensors")
    pipe = load_pipeline(tiny_sd, device="cpu")
    circle = make_condition(_square((64, 64), (10, 10, 40, 50)))
    kwargs = dict(seed=0, steps=2, height=64, width=64, output_type="np", control_image=circle)

    attach_adapters(pipe, [trained["path"]])
    first = generate(pipe, "a red circle", **kwargs)[0]
    attach_adapters(pipe, [other, subject_path])
    assert control_encoder(pipe.unet).adapter_name == "other"
    assert "control" not in hra_adapters(pipe.unet), "the replaced control adapter is unloaded, encoder and all"
    attach_adapters(pipe, [subject_path])
    assert control_encoder(pipe.unet) is None
    with pytest.raises(ValueError, match="no control encoder"):
        generate(pipe, "a red circle", **kwargs)
    attach_adapters(pipe, [trained["path"]])
    assert np.array_equal(generate(pipe, "a red circle", **kwargs)[0], first)
    with pytest.raises(ValueError, match="at most one control adapter"):
        attach_adapters(pipe, [trained["path"], other])


def test_hra_adapter_with_an_off_the_shelf_controlnet(tiny_sd, tiny_unet, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4))
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.add_(torch.randn_like(p) * p.norm(dim=0, keepdim=True))
    path = save_hra(unet, tmp_path / "subject.safetensors")
    pipe = load_pipeline(tiny_sd, device="cpu", pipeline_class=StableDiffusionControlNetPipeline,
                         controlnet=ControlNetModel.from_pretrained(tiny_sd / "controlnet"))
    kwargs = dict(image=_square((64, 64), (8, 8, 40, 40)), seed=0, steps=2, height=64, width=64, output_type="np")
    base = generate(pipe, "a qwe dog", **kwargs)[0]
    attach_adapters(pipe, [path])
    adapted = generate(pipe, "a qwe dog", **kwargs)[0]
    assert adapted.shape == (64, 64, 3) and np.abs(adapted - base).max() > 1e-3


def test_make_condition(tmp_path):
    image = _square((100, 70), (20, 15, 60, 50))
    edges = make_condition(image)
    assert edges.size == image.size and edges.mode == "RGB"
    values = np.unique(np.asarray(edges))
    assert values.max() == 255 and set(values) <= {0, 255}
    assert np.array_equal(np.asarray(make_condition(image, "none")), np.asarray(image))
    with pytest.raises(FileNotFoundError, match=r"ControlNetHED\.pth.*'canny' needs no weights"):
        make_condition(image, "hed", weights=str(tmp_path))
    with pytest.raises(ValueError, match="unknown control type"):
        make_condition(image, "sketchy")


def test_control_score_on_hand_made_maps(tmp_path, capsys):
    conditions, generated = tmp_path / "conditions", tmp_path / "generated"
    conditions.mkdir()
    generated.mkdir()
    left, right = (8, 8, 24, 56), (40, 8, 56, 56)
    _square((64, 64), left).save(conditions / "same.bmp")
    _square((64, 64), left).save(generated / "same.png")
    _square((64, 64), left).save(conditions / "apart.png")
    _square((64, 64), right).save(generated / "apart.png")
    out = tmp_path / "report.json"
    assert control_score_main(["--conditions", str(conditions), "--generated", str(generated), "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    scores = {row["file"]: (row["canny_iou"], row["canny_f1"]) for row in report["per_image"]}
    assert scores == {"same.png": (1.0, 1.0), "apart.png": (0.0, 0.0)}
    assert report["aggregate"] == {"canny_iou": 0.5, "canny_f1": 0.5}
    assert "| canny IoU | canny F1 |" in capsys.readouterr().out

    (generated / "extra.png").write_bytes((generated / "same.png").read_bytes())
    assert control_score_main(["--conditions", str(conditions), "--generated", str(generated)]) == 2
    assert "1 generated image(s) without a partner" in capsys.readouterr().err
    assert control_score_main(["--conditions", str(tmp_path / "missing"), "--generated", str(generated)]) == 2
    with pytest.raises(FileNotFoundError, match="image folder not found"):
        score_control(tmp_path / "missing", generated)
