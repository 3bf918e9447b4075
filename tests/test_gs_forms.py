"""The two strictly orthogonal forms: the paper's I - 2QQ^T (gs_form="paper") against a float64 Gram-Schmidt
reference, peft's apply_GS layer and a peft folder round trip; our identity_start default kept as it was."""

import json

import pytest
import torch
from adapter_helpers import UNET_TARGETS, adapted, assert_rel, same_as_peft
from peft import HRAConfig as PeftHRAConfig
from peft import PeftModel
from peft.tuners.hra.layer import HRALinear as PeftHRALinear
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from hra_diffusion import HRAConfig, add_hra, hra_adapters, hra_layers, load_hra, save_hra, set_active_adapters
from hra_diffusion import householder as hh
from hra_diffusion.export import export_peft
from hra_diffusion.layers import HRALayer
from hra_diffusion.train.settings import SettingsError, TrainSettings

F64 = torch.float64
PAPER = HRAConfig(r=4, apply_GS=True, gs_form="paper", init="random")


def gram_schmidt(u: torch.Tensor) -> torch.Tensor:
    """Classical Gram-Schmidt, column by column: the paper's definition, nothing shared with the QR in the code."""
    cols = []
    for i in range(u.shape[1]):
        c = u[:, i].clone()
        for q in cols:
            c = c - (q @ c) * q
        cols.append(c / c.norm())
    return torch.stack(cols, dim=1)


def unet_out(unet):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 32, 32, generator=gen), 10, torch.randn(1, 7, 32, generator=gen)).sample


@pytest.mark.parametrize("d,r", [(16, 1), (64, 4), (96, 7)])
def test_paper_form_is_one_reflection_of_the_gram_schmidt_span(d, r):
    u = torch.randn(d, r, dtype=F64, generator=torch.Generator().manual_seed(d + r))
    q = gram_schmidt(u)
    v, s = hh.hra_factors(u, gram_schmidt=True)
    assert v.shape == (d, r) and s.shape == (r, r), "compact form of width r"
    h = hh.dense(v, s)
    eye = torch.eye(d, dtype=F64)
    torch.testing.assert_close(h, eye - 2 * q @ q.T, rtol=0, atol=1e-12)
    assert torch.linalg.matrix_rank(h - eye).item() == r, "an update of rank exactly r"
    assert torch.linalg.matrix_norm(h - eye, ord=2).item() == pytest.approx(2), "a reflection: never the identity"


@pytest.mark.parametrize("form", ["activation", "lora", "weight"])
def test_paper_form_layer_equals_dense_reference(form):
    """W (I - 2QQ^T) in float64 against the float32 layer, in each way the layer can apply H, and merged."""
    torch.manual_seed(0)
    base = nn.Linear(48, 24)
    w = base.weight.detach().double()
    layer = HRALayer(base)
    layer.add_adapter("default", PAPER)
    assert not layer.hra_u0, "the paper's form keeps no frozen initial planes"
    q = gram_schmidt(layer.hra_u["default"].detach().double())
    reference_weight = w @ (torch.eye(48, dtype=F64) - 2 * q @ q.T)
    x = torch.randn(5, 48)
    expected = x.double() @ reference_weight.T + base.bias.detach().double()
    layer.form = form
    torch.testing.assert_close(layer(x).double(), expected, rtol=1e-5, atol=1e-5)
    layer.merge()
    torch.testing.assert_close(base.weight.detach().double(), reference_weight, rtol=1e-5, atol=1e-6)
    layer.unmerge()
    torch.testing.assert_close(base.weight.detach().double(), w, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("form", ["activation", "lora", "weight"])
def test_paper_form_matches_peft_apply_gs_outputs_and_gradients(form):
    torch.manual_seed(0)
    peft_cfg = PeftHRAConfig(r=6, apply_GS=True, init_weights=False)
    peft_layer = PeftHRALinear(nn.Linear(64, 40), "default", config=peft_cfg, r=6)
    ours = HRALayer(nn.Linear(64, 40))
    ours.base_layer.load_state_dict(peft_layer.base_layer.state_dict())
    ours.add_adapter("default", HRAConfig(r=6, apply_GS=True, gs_form="paper", init="random"),
                     u=peft_layer.hra_u["default"].detach().clone())  # fmt: skip
    ours.form = form
    gu_peft, gu_ours = same_as_peft(peft_layer, ours, torch.randn(3, 7, 64))
    torch.testing.assert_close(gu_ours, gu_peft, rtol=1e-4, atol=1e-6)


def test_paper_form_exports_to_peft_exactly(tiny_unet, tmp_path):
    """Many layers of one shape go through the batched factors; conv1 checks peft's conv layout."""
    unet = adapted(tiny_unet(), HRAConfig(r=4, apply_GS=True, gs_form="paper", init="random",
                                          target_modules=UNET_TARGETS))  # fmt: skip
    ours = unet_out(unet)
    assert ((ours - unet_out(tiny_unet())).norm() / ours.norm()) > 1e-2, "the adapter changes the model"
    out = export_peft(unet, tmp_path / "peft", base_model="tiny-sd")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["apply_GS"] is True and config["r"] == 4 and config["init_weights"] is False
    assert config["target_modules"] == [path for path, _ in hra_layers(unet)]
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        assert not [k for k in f.keys() if not k.endswith(".hra_u")], "no frozen planes: peft has none"
    assert_rel(unet_out(PeftModel.from_pretrained(tiny_unet(), out)), ours)


def test_identity_start_form_is_unchanged_and_still_refused_by_peft_export(tiny_unet, tmp_path):
    assert HRAConfig(apply_GS=True).gs_form == "identity_start"
    unet = add_hra(tiny_unet(), HRAConfig(r=3, apply_GS=True, target_modules=("to_q",)))
    assert_rel(unet_out(unet), unet_out(tiny_unet()), tol=1e-6)  # identity at the start, odd r included
    layer = next(layer for _, layer in hra_layers(unet))
    u0 = layer.hra_u0["default"].detach().double()
    with torch.no_grad():
        layer.hra_u["default"].add_(torch.randn_like(layer.hra_u["default"]))
    q, q0 = gram_schmidt(layer.hra_u["default"].detach().double()), gram_schmidt(u0)
    eye = torch.eye(q.shape[0], dtype=F64)
    v, s = layer.factors("default")
    torch.testing.assert_close(hh.dense(v.double(), s.double()), (eye - 2 * q @ q.T) @ (eye - 2 * q0 @ q0.T),
                               rtol=0, atol=1e-5)  # fmt: skip
    with pytest.raises(ValueError, match="identity_start form"):
        export_peft(unet, tmp_path / "peft")


def test_adapter_files_without_gs_form_load_as_identity_start(tiny_unet, tmp_path):
    """Files written before gs_form existed: the missing field means the form they were trained with."""
    unet = adapted(tiny_unet(), HRAConfig(r=2, apply_GS=True, target_modules=("to_q", "to_v")))
    path = save_hra(unet, tmp_path / "new.safetensors")
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    adapters = json.loads(meta["adapters"])
    assert adapters["unet"]["config"].pop("gs_form") == "identity_start"
    save_file(load_file(path), tmp_path / "old.safetensors", metadata={**meta, "adapters": json.dumps(adapters)})
    loaded = load_hra(tiny_unet(), tmp_path / "old.safetensors")
    assert hra_adapters(loaded)["default"].gs_form == "identity_start"
    torch.testing.assert_close(unet_out(loaded), unet_out(unet), rtol=0, atol=0)


def test_paper_form_saves_loads_and_takes_strengths(tiny_unet, tmp_path):
    unet = adapted(tiny_unet(), HRAConfig(r=4, apply_GS=True, gs_form="paper", init="random",
                                          target_modules=("to_q", "to_k")))  # fmt: skip
    loaded = load_hra(tiny_unet(), save_hra(unet, tmp_path / "paper.safetensors"))
    assert hra_adapters(loaded)["default"] == hra_adapters(unet)["default"]
    torch.testing.assert_close(unet_out(loaded), unet_out(unet), rtol=0, atol=0)
    set_active_adapters(loaded, ["default"], strengths=[0.0])
    assert_rel(unet_out(loaded), unet_out(tiny_unet()), tol=1e-5)
    layer = next(layer for _, layer in hra_layers(unet))
    v, s = hh.hra_factors(layer.hra_u["default"].detach().double(), gram_schmidt=True)
    half = hh.dense(*hh.fractional_factors(v, s, 0.5))
    torch.testing.assert_close(half @ half, hh.dense(v, s), rtol=0, atol=1e-9)


@pytest.mark.parametrize(
    "values,match",
    [
        ({"apply_GS": True, "gs_form": "exact"}, "gs_form must be one of"),
        ({"gs_form": "paper", "init": "random"}, "apply_GS is false"),
        ({"apply_GS": True, "gs_form": "paper"}, "never the identity"),
    ],
)
def test_gs_form_validation(values, match):
    with pytest.raises(ValueError, match=match):
        HRAConfig(**values)


def test_trainer_flag_selects_the_paper_form():
    base = {"pretrained_model_name_or_path": "m", "output_dir": "o"}
    paper = TrainSettings(**base, hra_apply_GS=True, hra_gs_form="paper", hra_r=7).hra_config()
    assert (paper.apply_GS, paper.gs_form, paper.init, paper.r) == (True, "paper", "random", 7)
    assert TrainSettings(**base, hra_apply_GS=True).hra_config().gs_form == "identity_start"
    with pytest.raises(SettingsError, match="--hra_\\* flags: .*apply_GS is false"):
        TrainSettings(**base, hra_gs_form="paper")
    with pytest.raises(SettingsError, match="hra_gs_form"):
        TrainSettings(**base, hra_apply_GS=True, hra_gs_form="exact")
