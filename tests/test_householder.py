"""The compact forms against independent references: a float64 dense product of reflections and peft's HRALinear."""

import pytest
import torch
from adapter_helpers import same_as_peft
from peft import HRAConfig as PeftHRAConfig
from peft.tuners.hra.layer import HRALinear as PeftHRALinear
from torch import nn

from hra_diffusion import householder as hh
from hra_diffusion.config import HRAConfig
from hra_diffusion.layers import HRALayer

F64 = torch.float64


def dense_reflections(u: torch.Tensor) -> torch.Tensor:
    """H_1 H_2 ... H_r built one reflection at a time: the definition, nothing shared with the fast code."""
    d = u.shape[0]
    h = torch.eye(d, dtype=u.dtype)
    for i in range(u.shape[1]):
        col = u[:, i : i + 1]
        h = h @ (torch.eye(d, dtype=u.dtype) - 2 * col @ col.T / (col.T @ col))
    return h


@pytest.mark.parametrize("d,r", [(16, 1), (64, 8), (320, 8), (128, 7)])
def test_wy_form_equals_dense_product(d, r):
    u = torch.randn(d, r, dtype=F64, generator=torch.Generator().manual_seed(d + r))
    v, s = hh.hra_factors(u)
    assert torch.allclose(hh.dense(v, s), dense_reflections(u), atol=1e-12)
    assert v.shape == (d, r) and s.shape == (r, r)


def test_fast_forms_equal_dense_weight():
    gen = torch.Generator().manual_seed(0)
    u = torch.randn(48, 8, dtype=F64, generator=gen)
    w = torch.randn(24, 48, dtype=F64, generator=gen)
    x = torch.randn(3, 5, 48, dtype=F64, generator=gen)
    h = dense_reflections(u)
    v, s = hh.hra_factors(u)
    ref = x @ (w @ h).T
    assert torch.allclose(hh.apply_transpose(x, v, s) @ w.T, ref, atol=1e-12)
    down, up = hh.lora_factors(w, v, s)
    assert torch.allclose(x @ w.T + (x @ down.T) @ up.T, ref, atol=1e-12)
    assert torch.allclose(hh.merge(w, v, s), w @ h, atol=1e-12)
    assert torch.allclose(hh.unmerge(hh.merge(w, v, s), v, s), w, atol=1e-12)


def test_orthogonal_and_identity_at_start():
    u = hh.paired_init(64, 8).double()
    assert torch.equal(u[:, 0], u[:, 1]) and not torch.equal(u[:, 1], u[:, 2])
    v, s = hh.hra_factors(u)
    assert torch.allclose(hh.dense(v, s), torch.eye(64, dtype=F64), atol=1e-14)
    trained = u + 0.1 * torch.randn_like(u)
    h = hh.dense(*hh.hra_factors(trained))
    assert torch.allclose(h.T @ h, torch.eye(64, dtype=F64), atol=1e-13)
    with pytest.raises(ValueError, match="even r"):
        hh.paired_init(64, 7)


@pytest.mark.parametrize("r", [7, 8])
def test_gs_variant_starts_at_identity_and_stays_orthogonal(r):
    """The reference 'GS' adapters start as a large random reflection (||H^T H - I|| = 14 measured); ours is I."""
    u0 = hh.random_init(64, r).double()
    v, s = hh.hra_factors(u0.clone(), u0)
    assert torch.allclose(hh.dense(v, s), torch.eye(64, dtype=F64), atol=1e-12)
    moved = u0 + torch.randn_like(u0)
    h = hh.dense(*hh.hra_factors(moved, u0))
    assert (h - torch.eye(64, dtype=F64)).abs().max() > 0.1  # it really moved
    assert torch.allclose(h.T @ h, torch.eye(64, dtype=F64), atol=1e-12)
    # and it is the composition of the two subspace reflections, as documented
    q, q0 = torch.linalg.qr(moved)[0], torch.linalg.qr(u0)[0]
    eye = torch.eye(64, dtype=F64)
    assert torch.allclose(h, (eye - 2 * q @ q.T) @ (eye - 2 * q0 @ q0.T), atol=1e-12)


def test_regularizer_matches_definition():
    u = torch.randn(32, 6, dtype=F64)
    un = u / u.norm(dim=0)
    expected = ((torch.eye(6, dtype=F64) - un.T @ un) ** 2).sum()
    assert torch.allclose(hh.orthogonality_penalty(u), expected)
    assert hh.orthogonality_penalty(torch.linalg.qr(u)[0]) < 1e-20


def test_gradcheck_float64():
    u = torch.randn(12, 4, dtype=F64, requires_grad=True)
    u0 = torch.randn(12, 3, dtype=F64)
    x = torch.randn(5, 12, dtype=F64, requires_grad=True)
    w = torch.randn(7, 12, dtype=F64)
    assert torch.autograd.gradcheck(lambda u, x: hh.apply_transpose(x, *hh.hra_factors(u)), (u, x))
    assert torch.autograd.gradcheck(lambda u: hh.lora_factors(w, *hh.hra_factors(u))[1], (u,))
    ug = torch.randn(12, 3, dtype=F64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda u, x: hh.apply_transpose(x, *hh.hra_factors(u, u0)), (ug, x))


@pytest.mark.parametrize("strength", [0.0, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("gs", [False, True])
def test_fractional_power(strength, gs):
    gen = torch.Generator().manual_seed(3)
    u = torch.randn(40, 6, dtype=F64, generator=gen)
    v, s = hh.hra_factors(u, torch.randn(40, 6, dtype=F64, generator=gen) if gs else None)
    h = hh.dense(v, s)
    a = hh.dense(*hh.fractional_factors(v, s, strength))
    b = hh.dense(*hh.fractional_factors(v, s, 1 - strength))
    eye = torch.eye(40, dtype=F64)
    assert torch.allclose(a @ b, h, atol=1e-9)
    assert torch.allclose(a.T @ a, eye, atol=1e-9)
    if strength == 0.0:
        assert torch.allclose(a, eye, atol=1e-12)


def test_fractional_power_of_half_turn_and_odd_r():
    q = torch.linalg.qr(torch.randn(20, 2, dtype=F64))[0]
    v, s = hh.hra_factors(q)  # two orthogonal reflections: a rotation by pi in one plane
    half = hh.dense(*hh.fractional_factors(v, s, 0.5))
    assert torch.allclose(half @ half, hh.dense(v, s), atol=1e-7)
    with pytest.raises(ValueError, match="det H = -1"):
        hh.fractional_factors(*hh.hra_factors(torch.randn(20, 3, dtype=F64)), 0.5)


def peft_pair(d_in=64, d_out=48, r=8, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(d_in, d_out)
    peft_layer = PeftHRALinear(nn.Linear(d_in, d_out), "default", config=PeftHRAConfig(r=r, init_weights=False), r=r)
    peft_layer.base_layer.load_state_dict(base.state_dict())
    ours = HRALayer(base)
    ours.add_adapter("default", HRAConfig(r=r), u=peft_layer.hra_u["default"].detach().clone())
    return peft_layer, ours


@pytest.mark.parametrize("form", ["activation", "lora", "weight"])
def test_matches_peft_outputs_and_gradients(form):
    peft_layer, ours = peft_pair()
    ours.form = form
    gu_peft, gu_ours = same_as_peft(peft_layer, ours, torch.randn(4, 10, 64))
    assert gu_ours.norm() > 0
    torch.testing.assert_close(gu_ours, gu_peft, rtol=1e-5, atol=1e-5 * gu_peft.abs().max().item())


def test_conv_matches_dense_reference():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, kernel_size=(3, 1), padding=(1, 0), stride=2)
    layer = HRALayer(conv)
    layer.add_adapter("default", HRAConfig(r=4, init="random"))
    u = layer.hra_u["default"].detach().double()
    w = conv.weight.detach().double().reshape(10, -1) @ dense_reflections(u)
    x = torch.randn(2, 6, 9, 7)
    ref = nn.functional.conv2d(x.double(), w.reshape(conv.weight.shape), conv.bias.double(), stride=2, padding=(1, 0))
    for form in ("lora", "weight"):
        layer.form = form
        torch.testing.assert_close(layer(x).double(), ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="grouped"):
        HRALayer(nn.Conv2d(4, 4, 3, groups=2))
