"""Exports read by their real consumers (peft, diffusers' LoRA loader in both key formats, from_pretrained), strength
and mixing at pipeline level, the convert CLI, and the one registry of formats that convert, the app and the docs
share."""

import contextlib
import json
import logging
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from adapter_helpers import TE_TARGETS, UNET_TARGETS, adapted, assert_rel
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors import safe_open

from hra_diffusion import (
    AdapterMismatchError,
    HRAConfig,
    hra_adapters,
    hra_layers,
    load_hra,
    save_hra,
    set_active_adapters,
)
from hra_diffusion import householder as hh
from hra_diffusion.convert import build_parser
from hra_diffusion.convert import main as convert_main
from hra_diffusion.export import export_lora, export_merged, export_peft
from hra_diffusion.export_formats import EXPORT_FORMATS

REPO = Path(__file__).resolve().parents[1]

GEN = {"prompt": "a photo of sks dog", "num_inference_steps": 2, "output_type": "latent"}


def unet_out(unet):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 32, 32, generator=gen), 10, torch.randn(1, 7, 32, generator=gen)).sample


def text_out(text_encoder):
    with torch.no_grad():
        return text_encoder(torch.tensor([[49406, 320, 1125, 539, 49407]])).last_hidden_state


def generate(pipe):
    return pipe(**GEN, generator=torch.Generator().manual_seed(0)).images


def pipeline(path):
    pipe = StableDiffusionPipeline.from_pretrained(path)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def other_unet():
    """Same block layout as the tiny UNet, another cross-attention width: attn2.to_k/to_v differ."""
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48, sample_size=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8,
    )  # fmt: skip


@pytest.fixture
def load_warnings():
    """Warnings diffusers and transformers log while loading (unexpected or dropped LoRA keys land there)."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    loggers = [logging.getLogger("diffusers"), logging.getLogger("transformers")]
    for logger in loggers:
        logger.addHandler(handler)
    yield records
    for logger in loggers:
        logger.removeHandler(handler)


def test_peft_export_loads_in_peft(tiny_unet, tmp_path):
    from peft import PeftModel

    unet = adapted(tiny_unet(), HRAConfig(r=4, target_modules=UNET_TARGETS))
    out = export_peft(unet, tmp_path / "peft", base_model="tiny-sd")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"], "no temp folder left behind"
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    config = json.loads((out / "adapter_config.json").read_text())
    paths = [path for path, _ in hra_layers(unet)]
    assert config["peft_type"] == "HRA" and config["r"] == 4 and config["apply_GS"] is False
    assert config["target_modules"] == paths and config["base_model_name_or_path"] == "tiny-sd"
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(f"base_model.model.{p}.hra_u" for p in paths)
    expected = unet_out(unet)
    assert_rel(unet_out(PeftModel.from_pretrained(tiny_unet(), out)), expected)
    torch.testing.assert_close(unet_out(load_hra(tiny_unet(), out)), expected, rtol=0, atol=0)
    with pytest.raises(FileExistsError, match="already exists"):
        export_peft(unet, out)


@pytest.mark.parametrize("r", [4, 3])
def test_peft_trained_adapter_loads_identically(tiny_unet, tmp_path, r):
    from peft import HRAConfig as PeftHRAConfig
    from peft import get_peft_model

    odd_r_warning = pytest.warns(UserWarning, match="symmetric initialization") if r % 2 else contextlib.nullcontext()
    with odd_r_warning:  # peft: an odd r cannot start at the identity
        peft_model = get_peft_model(tiny_unet(), PeftHRAConfig(r=r, target_modules=["to_q", "to_v", "conv1"]))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "hra_u" in name:
                p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.norm(dim=0, keepdim=True))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_hra(tiny_unet(), tmp_path / "peft")
    assert hra_adapters(ours)["default"].r == r
    assert hra_adapters(ours)["default"].init == ("random" if r % 2 else "identity")
    assert_rel(unet_out(ours), unet_out(peft_model))
    if r == 4:
        with pytest.raises(AdapterMismatchError, match=r"attn2\.to_v: stored \(out, in\) \(any, 32\), model has"):
            load_hra(other_unet(), tmp_path / "peft")


def test_identity_start_gs_is_refused_by_peft_and_peft_apply_gs_loads_as_the_paper_form(tiny_unet, tmp_path):
    """Our default strictly orthogonal form has no peft twin, so exporting it is refused; peft's apply_GS folder is
    the paper's I - 2QQ^T and loads as gs_form="paper", computing what peft computes."""
    from peft import HRAConfig as PeftHRAConfig
    from peft import get_peft_model

    unet = adapted(tiny_unet(), HRAConfig(r=2, apply_GS=True, target_modules=("to_q",)))
    with pytest.raises(ValueError, match="different operator.*export_lora"):
        export_peft(unet, tmp_path / "ours")
    assert not list(tmp_path.iterdir())
    theirs = get_peft_model(tiny_unet(), PeftHRAConfig(r=2, apply_GS=True, target_modules=["to_q"]))
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "hra_u" in name:
                p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    theirs.save_pretrained(tmp_path / "theirs")
    ours = load_hra(tiny_unet(), tmp_path / "theirs")
    (config,) = hra_adapters(ours).values()
    assert config.apply_GS and config.gs_form == "paper"
    expected = unet_out(theirs)
    assert_rel(unet_out(ours), expected)
    assert (expected - unet_out(tiny_unet())).abs().max() > 1e-3


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_lora_export_reproduces_hra_in_diffusers(tiny_sd, tmp_path, fmt, load_warnings):
    hra_pipe = pipeline(tiny_sd)
    adapted(hra_pipe.unet, HRAConfig(r=4, target_modules=UNET_TARGETS))
    adapted(hra_pipe.text_encoder, HRAConfig(r=2, target_modules=TE_TARGETS), seed=1)
    parts = {"unet": hra_pipe.unet, "text_encoder": hra_pipe.text_encoder}
    path = export_lora(parts, tmp_path / "lora", format=fmt)
    assert path == tmp_path / "lora" / "pytorch_lora_weights.safetensors"
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    conv, attn = "down_blocks.0.resnets.0.conv1", "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    te = "text_model.encoder.layers.0.self_attn.q_proj"
    if fmt == "diffusers":
        down, up = tensors[f"unet.{conv}.lora_A.weight"], tensors[f"unet.{conv}.lora_B.weight"]
        assert f"unet.{attn}.lora_A.weight" in tensors and f"text_encoder.{te}.lora_B.weight" in tensors
    else:
        name = "lora_unet_" + conv.replace(".", "_")
        down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
        assert tensors[f"{name}.alpha"].item() == 4.0
        assert "lora_unet_" + attn.replace(".", "_") + ".lora_down.weight" in tensors
        assert "lora_te_" + te.replace(".", "_") + ".lora_up.weight" in tensors
    assert down.shape == (4, 32, 3, 3) and up.shape == (32, 4, 1, 1)
    assert (
        set(json.loads(meta["hra_base_sha256"])) == {"unet", "text_encoder"} and "Exact LoRA form" in meta["hra_note"]
    )

    lora_pipe = pipeline(tiny_sd)
    lora_pipe.load_lora_weights(str(path.parent))
    assert not load_warnings, [r.getMessage() for r in load_warnings]
    assert_rel(unet_out(lora_pipe.unet), unet_out(hra_pipe.unet))
    assert_rel(text_out(lora_pipe.text_encoder), text_out(hra_pipe.text_encoder))
    assert_rel(generate(lora_pipe), generate(hra_pipe))


def test_lora_export_of_gs_adapter_at_strength(tiny_sd, tmp_path):
    hra_pipe = pipeline(tiny_sd)
    adapted(hra_pipe.unet, HRAConfig(r=2, apply_GS=True, target_modules=UNET_TARGETS))
    set_active_adapters(hra_pipe.unet, ["default"], [0.6])
    path = export_lora(hra_pipe.unet, tmp_path / "gs.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.get_tensor(f"unet.{next(hra_layers(hra_pipe.unet))[0]}.lora_A.weight").shape[0] == 4, "rank 2r"
    lora_pipe = pipeline(tiny_sd)
    lora_pipe.load_lora_weights(str(tmp_path), weight_name="gs.safetensors")
    assert_rel(unet_out(lora_pipe.unet), unet_out(hra_pipe.unet))
    assert_rel(generate(lora_pipe), generate(hra_pipe))


def test_merged_export_is_standalone_and_leaves_caller_alone(tiny_sd, tmp_path):
    pipe = pipeline(tiny_sd)
    adapted(pipe.unet, HRAConfig(r=4, target_modules=UNET_TARGETS), "a")
    adapted(pipe.unet, HRAConfig(r=2, apply_GS=True, target_modules=("to_q", "conv1")), "b", seed=1)
    adapted(pipe.text_encoder, HRAConfig(r=2, target_modules=TE_TARGETS), "a", seed=2)
    set_active_adapters(pipe.unet, ["b", "a"], [1.0, 0.5])
    before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
    expected_unet, expected_text = unet_out(pipe.unet), text_out(pipe.text_encoder)

    out = export_merged(pipe, tmp_path / "merged")
    assert all(torch.equal(before[k], v) for k, v in pipe.unet.state_dict().items()), "caller's model unchanged"
    torch.testing.assert_close(unet_out(pipe.unet), expected_unet, rtol=0, atol=0)
    loaded = pipeline(out)
    assert not any(hra_layers(loaded.unet))
    assert_rel(unet_out(loaded.unet), expected_unet)
    assert_rel(text_out(loaded.text_encoder), expected_text)
    with safe_open(str(out / "unet.safetensors"), "pt") as f:
        assert sorted(f.keys()) == sorted(loaded.unet.state_dict())
        assert all(torch.equal(f.get_tensor(k), v) for k, v in loaded.unet.state_dict().items())

    only_a = export_merged(pipe.unet, tmp_path / "unet_a", adapter_name="a")
    set_active_adapters(pipe.unet, ["a"], [0.5])
    assert_rel(unet_out(UNet2DConditionModel.from_pretrained(only_a)), unet_out(pipe.unet))


def test_strength_and_mixing_at_pipeline_level(tiny_sd, tiny_unet, tmp_path):
    config = HRAConfig(r=4, target_modules=("to_q", "to_v", "conv1"))
    first = save_hra(adapted(tiny_unet(), config), tmp_path / "a.safetensors")
    second = save_hra(adapted(tiny_unet(), HRAConfig(r=2, apply_GS=True), seed=1), tmp_path / "c.safetensors")
    pipe = pipeline(tiny_sd)
    base_out, base_images = unet_out(pipe.unet), generate(pipe)
    load_hra(pipe.unet, first, "a")
    load_hra(pipe.unet, first, "b")
    load_hra(pipe.unet, second, "c")

    set_active_adapters(pipe.unet, ["a"], [0.0])
    assert_rel(unet_out(pipe.unet), base_out, 1e-6)
    assert_rel(generate(pipe), base_images, 1e-6)
    set_active_adapters(pipe.unet, ["a"])
    full = unet_out(pipe.unet)
    assert ((full - base_out).norm() / base_out.norm()).item() > 1e-2
    set_active_adapters(pipe.unet, ["a", "b"], [0.5, 0.5])  # W H^0.5 H^0.5 = W H
    assert_rel(unet_out(pipe.unet), full)

    gen = torch.Generator().manual_seed(0)
    path, layer = next((p, lay) for p, lay in hra_layers(pipe.unet) if p.endswith("attn1.to_q"))
    for s in torch.rand(3, generator=gen).tolist():
        h = hh.dense(*hh.fractional_factors(*hh.hra_factors(layer.hra_u["a"].detach().double()), s))
        torch.testing.assert_close(h.T @ h, torch.eye(h.shape[0], dtype=h.dtype), rtol=0, atol=1e-12)
        set_active_adapters(pipe.unet, ["a"], [s])
        torch.testing.assert_close(hh.dense(*layer.factors("a")).double(), h, rtol=0, atol=1e-5)

    def powered(lay, name, s):
        u0 = lay.hra_u0[name].detach().double() if name in lay.hra_u0 else None
        return hh.dense(*hh.fractional_factors(*hh.hra_factors(lay.hra_u[name].detach().double(), u0), s))

    set_active_adapters(pipe.unet, ["c", "a"], [0.3, 0.8])  # W H_c^0.3 H_a^0.8, built densely in float64
    reference = tiny_unet()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for path, lay in hra_layers(pipe.unet):
            w = lay.weight2d().double()
            for name, s in (("c", 0.3), ("a", 0.8)):
                if name in lay.configs:
                    w = w @ powered(lay, name, s)
            modules[path].weight.copy_(w.reshape(modules[path].weight.shape))
    mixed = unet_out(pipe.unet)
    assert_rel(mixed, unet_out(reference))
    set_active_adapters(pipe.unet, ["a", "c"], [0.8, 0.3])
    assert ((unet_out(pipe.unet) - mixed).norm() / mixed.norm()).item() > 1e-4, "the order matters"


def test_convert_cli(tiny_sd, tiny_unet, tmp_path, capsys):
    from transformers import CLIPTextModel

    unet = adapted(tiny_unet(), HRAConfig(r=4))
    text_encoder = adapted(
        CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder"), HRAConfig(r=2, target_modules=TE_TARGETS)
    )
    source = save_hra({"unet": unet, "text_encoder": text_encoder}, tmp_path / "subject.safetensors")
    assert convert_main([str(source), str(tmp_path / "peft"), "--to", "peft", "--base-model", str(tiny_sd)]) == 0
    assert sorted(p.name for p in (tmp_path / "peft").iterdir()) == ["text_encoder", "unet"]
    torch.testing.assert_close(unet_out(load_hra(tiny_unet(), tmp_path / "peft" / "unet")), unet_out(unet))

    code = convert_main([str(source), str(tmp_path / "x"), "--to", "merged", "--base-model", "nobody/no-such-model"])
    assert code == 2
    err = capsys.readouterr().err
    assert "could not load base model 'nobody/no-such-model'" in err and "HF_HUB_OFFLINE" in err
    assert "Traceback" not in err and not (tmp_path / "x").exists()

    foreign = save_hra(adapted(other_unet(), HRAConfig(r=2)), tmp_path / "other.safetensors")
    out = tmp_path / "lora.safetensors"
    cmd = [sys.executable, "-m", "hra_diffusion.convert", str(foreign), str(out), "--to", "lora-kohya"]
    result = subprocess.run(
        [*cmd, "--base-model", str(tiny_sd)],
        capture_output=True,
        text=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "different model" in result.stderr and "attn2.to_k: stored (out, in) (32, 48)" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()


def test_convert_refuses_an_existing_output_before_loading_the_model(tmp_path, capsys, monkeypatch):
    """The check used to come after loading the base pipeline (minutes for SDXL); now it comes first."""
    import hra_diffusion.convert as convert_module

    monkeypatch.setattr(convert_module, "load_pipeline", lambda *a, **k: pytest.fail("the model was loaded"))
    existing = tmp_path / "lora.safetensors"
    existing.write_bytes(b"mine")
    for out, to in ((existing, "lora-kohya"), (tmp_path, "lora-diffusers"), (tmp_path, "merged")):
        if to == "lora-diffusers":
            (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"mine")
        assert convert_main(["in.safetensors", str(out), "--to", to, "--base-model", "unused"]) == 2
        assert "already exists" in capsys.readouterr().err
    assert existing.read_bytes() == b"mine"


def table_rows(doc: Path, header: str) -> dict[str, str]:
    """{first cell: second cell} of the markdown table under ``header``, backticks stripped from the first."""
    lines = doc.read_text(encoding="utf-8").splitlines()
    start = lines.index(header) + 2  # past the header and its | --- | line
    rows = {}
    for line in lines[start:]:
        if not line.startswith("|"):
            break
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = cells[1]
    return rows


def test_convert_the_app_and_the_docs_offer_the_one_registry():
    import app.host as host_module
    import hra_diffusion.convert as convert_module

    assert host_module.EXPORT_FORMATS is convert_module.EXPORT_FORMATS is EXPORT_FORMATS
    [to] = [action for action in build_parser()._actions if action.dest == "to"]
    assert to.choices == list(EXPORT_FORMATS)
    assert all(fmt.description in to.help for fmt in EXPORT_FORMATS.values())
    downloads = host_module.DOWNLOADS
    assert list(downloads) == [host_module.HRA_FILE, *EXPORT_FORMATS]
    assert all(downloads[name].startswith(fmt.description) for name, fmt in EXPORT_FORMATS.items())

    documented = table_rows(REPO / "docs" / "export.md", "| `--to` | what it is: how it loads | from Python |")
    assert documented == {name: fmt.description for name, fmt in EXPORT_FORMATS.items()}
    assert list(table_rows(REPO / "docs" / "app.md", "| download as | file | for |")) == list(downloads)
    assert re.search(r"--to " + re.escape("|".join(EXPORT_FORMATS)) + r" ", (REPO / "docs" / "export.md").read_text())


@pytest.fixture(scope="module")
def app_with_two_part_adapter(tiny_sd, tmp_path_factory):
    """The app (its Studio, no web page) holding an adapter with UNet and text-encoder parts, and what the
    HRA-adapted models compute, which every export must reproduce."""
    from app.studio import Studio

    hra_pipe = pipeline(tiny_sd)
    base_text = text_out(hra_pipe.text_encoder)
    adapted(hra_pipe.unet, HRAConfig(r=4, target_modules=UNET_TARGETS))
    adapted(hra_pipe.text_encoder, HRAConfig(r=2, target_modules=TE_TARGETS), seed=1)
    expected_text = text_out(hra_pipe.text_encoder)
    assert ((expected_text - base_text).norm() / base_text.norm()).item() > 1e-2, "a text-encoder part that matters"
    folder = tmp_path_factory.mktemp("app")
    source = save_hra({"unet": hra_pipe.unet, "text_encoder": hra_pipe.text_encoder}, folder / "subject.safetensors")
    studio = Studio(folder / "data", base_model=str(tiny_sd), warm=False)
    name = studio.import_adapter(source)["name"]
    yield studio, name, unet_out(hra_pipe.unet), expected_text
    studio.close()


def peft_models(base, folder):
    from peft import PeftModel
    from transformers import CLIPTextModel

    assert sorted(p.name for p in folder.iterdir()) == ["text_encoder", "unet"]  # a peft folder holds one model
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder")
    return PeftModel.from_pretrained(unet, folder / "unet"), PeftModel.from_pretrained(
        text_encoder, folder / "text_encoder"
    )


def lora_models(base, file):
    pipe = pipeline(base)
    pipe.load_lora_weights(str(file.parent), weight_name=file.name)
    return pipe.unet, pipe.text_encoder


def merged_models(base, folder):
    pipe = pipeline(folder)
    return pipe.unet, pipe.text_encoder


# Each format's real consumer: (base model folder, the export, unzipped) -> (unet, text encoder) as loaded there
CONSUMERS = {"peft": peft_models, "lora-diffusers": lora_models, "lora-kohya": lora_models, "merged": merged_models}


@pytest.mark.parametrize("fmt", list(EXPORT_FORMATS))
def test_every_app_export_keeps_the_text_encoder_part(app_with_two_part_adapter, tiny_sd, tmp_path, fmt,
                                                      load_warnings):  # fmt: skip
    """The app once exported peft from the UNet alone, silently dropping the text encoder's part."""
    assert fmt in CONSUMERS, f"{fmt}: a new export format needs its real consumer in CONSUMERS"
    studio, name, expected_unet, expected_text = app_with_two_part_adapter
    path = studio.export_adapter(name, fmt)
    if EXPORT_FORMATS[fmt].folder:
        with zipfile.ZipFile(path) as archive:
            archive.extractall(tmp_path / fmt)
        path = tmp_path / fmt
    unet, text_encoder = CONSUMERS[fmt](tiny_sd, path)
    assert not load_warnings, [r.getMessage() for r in load_warnings]
    assert_rel(unet_out(unet), expected_unet)
    assert_rel(text_out(text_encoder), expected_text)
