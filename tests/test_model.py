"""Adapters on a real (tiny) diffusers UNet: identity start, merge/unmerge, several adapters, targeting, dtypes."""

import pytest
import torch
from test_householder import dense_reflections
from torch import nn

from hra_diffusion import (
    HRAConfig,
    HRALayer,
    active_adapters,
    add_hra,
    disable_hra,
    hra_layers,
    hra_parameters,
    hra_state_dict,
    merge_hra,
    orthogonality_loss,
    remove_hra,
    set_active_adapters,
    set_hra_form,
    unmerge_hra,
)
from hra_diffusion import householder as hh


def unet_inputs(seed=0, batch=2):
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, 4, 32, 32, generator=gen),
        torch.tensor([10, 500][:batch]),
        torch.randn(batch, 7, 32, generator=gen),
    )


def run(unet, inputs):
    with torch.no_grad():
        return unet(*inputs).sample


def perturb(model, scale=0.3, seed=1):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hra_parameters(model):
            p.add_(scale * torch.randn(p.shape, generator=gen) * p.norm(dim=0, keepdim=True))


def test_fresh_adapter_gives_base_outputs_and_freezes_base(tiny_unet):
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run(unet, inputs)
    add_hra(unet, HRAConfig(r=8))
    torch.testing.assert_close(run(unet, inputs), base, rtol=1e-5, atol=1e-6)
    trainable = [n for n, p in unet.named_parameters() if p.requires_grad]
    assert trainable and all(n.endswith("hra_u.default") for n in trainable)
    paths = [path for path, _ in hra_layers(unet)]
    assert len(paths) == 32  # 4 transformer blocks (1 down, 1 mid, 2 up) x (attn1, attn2) x (q, k, v, out)
    assert all(p.rsplit(".", 1)[-1] in ("to_q", "to_k", "to_v", "0") for p in paths)
    n_params = sum(p.numel() for p in hra_parameters(unet))
    assert n_params == sum(layer.d_in * 8 for _, layer in hra_layers(unet))


def test_gs_adapter_starts_at_base_outputs(tiny_unet):
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run(unet, inputs)
    add_hra(unet, HRAConfig(r=7, apply_GS=True))
    torch.testing.assert_close(run(unet, inputs), base, rtol=1e-5, atol=1e-5)


def test_odd_r_is_refused_unless_explicit():
    with pytest.raises(ValueError, match="even r"):
        HRAConfig(r=7)
    assert HRAConfig(r=7, init="random").r == 7


def test_trained_adapter_matches_dense_reference_on_unet(tiny_unet):
    """Every wrapped layer must compute with weight W H, H the float64 product of the reflections."""
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4))
    perturb(unet)
    inputs = unet_inputs()
    ours = run(unet, inputs)
    reference = tiny_unet().double()
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for path, layer in hra_layers(unet):
            h = dense_reflections(layer.hra_u["default"].detach().double())
            modules[path].weight.copy_(modules[path].weight @ h)
        expected = reference(*(t.double() if t.is_floating_point() else t for t in inputs)).sample
    assert (ours.double() - expected).abs().max() > 0 and (expected - run(tiny_unet(), inputs)).abs().max() > 1e-3
    torch.testing.assert_close(ours.double(), expected, rtol=1e-4, atol=1e-5)


def test_forms_agree_and_merge_unmerge_roundtrip(tiny_unet):
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=8))
    perturb(unet)
    inputs = unet_inputs()
    outputs = {}
    for form in ("activation", "lora", "weight", "auto"):
        set_hra_form(unet, form)
        outputs[form] = run(unet, inputs)
    for form, out in outputs.items():
        torch.testing.assert_close(out, outputs["weight"], rtol=1e-5, atol=1e-5, msg=form)
    before = {k: v.clone() for k, v in unet.state_dict().items() if "hra_u" not in k}
    merge_hra(unet)
    assert all(layer.merged == ["default"] for _, layer in hra_layers(unet))
    torch.testing.assert_close(run(unet, inputs), outputs["auto"], rtol=1e-5, atol=1e-5)
    changed = [k for k, v in unet.state_dict().items() if "hra_u" not in k and not torch.equal(v, before[k])]
    assert changed, "merging must change the base weights"
    unmerge_hra(unet)
    for key, value in unet.state_dict().items():
        if "hra_u" not in key:
            torch.testing.assert_close(value, before[key], rtol=0, atol=2e-6)


def test_several_adapters_order_strength_disable_remove(tiny_unet):
    unet = tiny_unet()
    inputs = unet_inputs()
    base = run(unet, inputs)
    add_hra(unet, HRAConfig(r=4), "a")
    perturb(unet, seed=1)
    add_hra(unet, HRAConfig(r=4), "b")
    with torch.no_grad():
        for _, layer in hra_layers(unet):
            layer.hra_u["b"].add_(0.5 * torch.randn_like(layer.hra_u["b"]))
    assert active_adapters(unet) == ["a", "b"]
    ab = run(unet, inputs)
    set_active_adapters(unet, ["b", "a"])
    ba = run(unet, inputs)
    assert (ab - ba).abs().max() > 1e-4, "W H_a H_b and W H_b H_a differ"
    # W H_a H_b computed densely on one layer
    path, layer = next(iter(hra_layers(unet)))
    set_active_adapters(unet, ["a", "b"])
    x = torch.randn(3, layer.d_in)
    h = {n: hh.dense(*layer.factors(n)) for n in ("a", "b")}
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.base_layer.weight @ h["a"] @ h["b"],
                                                                layer.base_layer.bias), rtol=1e-5, atol=1e-5)
    set_active_adapters(unet, ["a"], strengths=[0.0])
    torch.testing.assert_close(run(unet, inputs), base, rtol=1e-5, atol=1e-5)
    set_active_adapters(unet, ["a", "b"])
    with disable_hra(unet):
        torch.testing.assert_close(run(unet, inputs), base, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(run(unet, inputs), ab)
    merge_hra(unet)
    with pytest.raises(RuntimeError, match="unmerge"):
        set_active_adapters(unet, ["a"])
    unmerge_hra(unet)
    with pytest.raises(ValueError, match="no HRA adapter named 'c'"):
        set_active_adapters(unet, ["c"])
    remove_hra(unet, "b")
    set_active_adapters(unet, ["a"])
    a_only = run(unet, inputs)
    remove_hra(unet, merge=True)
    assert not list(hra_layers(unet)) and not any(isinstance(m, HRALayer) for m in unet.modules())
    torch.testing.assert_close(run(unet, inputs), a_only, rtol=1e-5, atol=1e-5)


def test_targets_by_suffix_regex_exclude_and_conv(tiny_unet):
    unet = tiny_unet()
    excluded = "up_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    add_hra(unet, HRAConfig(r=2, target_modules=r".*attn2\.to_[kv]", exclude_modules=(excluded,)))
    paths = sorted(p for p, _ in hra_layers(unet))
    assert len(paths) == 7 and excluded not in paths and all("attn2.to_" in p for p in paths)
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=2, target_modules=("conv1", "ff.net.0.proj")))
    kinds = {type(layer.base_layer).__name__ for _, layer in hra_layers(unet)}
    assert kinds == {"Conv2d", "Linear"}
    with pytest.raises(ValueError, match="match no Linear/Conv2d layer"):
        add_hra(tiny_unet(), HRAConfig(target_modules=("to_qq",)))
    with pytest.raises(ValueError, match="already has an HRA adapter"):
        add_hra(unet, HRAConfig(r=2, target_modules=("conv1",)))


def test_orthogonality_loss(tiny_unet):
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4))
    assert orthogonality_loss(unet).item() == 0.0
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4, lambda_orth=1e-3))
    expected = sum(1e-3 * hh.orthogonality_penalty(p) for p in hra_parameters(unet))
    loss = orthogonality_loss(unet)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(p.grad is not None and p.grad.norm() > 0 for p in hra_parameters(unet))


def test_state_dict_layout(tiny_unet):
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=6))
    state = hra_state_dict(unet)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.hra_u"
    assert key in state and state[key].shape == (32, 6) and len(state) == 32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_keeps_fp32_adapter(tiny_unet, dtype):
    unet = tiny_unet().to(dtype)
    add_hra(unet, HRAConfig(r=8))
    perturb(unet)
    assert all(p.dtype == torch.float32 for p in hra_parameters(unet))
    x, t, c = unet_inputs()
    out = unet(x.to(dtype), t, c.to(dtype)).sample
    assert out.dtype == dtype
    out.float().pow(2).mean().backward()
    grads = [p.grad for p in hra_parameters(unet)]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all() for g in grads)
    reference = tiny_unet()
    add_hra(reference, HRAConfig(r=8))
    with torch.no_grad():
        for p, q in zip(hra_parameters(reference), hra_parameters(unet)):
            p.copy_(q)
    expected = run(reference, (x, t, c))
    assert (out.float() - expected).abs().max() < 0.05 * expected.abs().max()


def _step(unet, inputs):
    """Outputs and HRA gradients of one forward+backward through the whole model (where the batching hook runs)."""
    for p in hra_parameters(unet):
        p.grad = None
    out = unet(*inputs).sample
    out.square().mean().backward()
    return out.detach(), [p.grad.clone() for p in hra_parameters(unet)]


def test_batched_factors_match_per_layer_ones(tiny_unet):
    """The model-level hook computes all plain factors in one batched node; results must equal the per-layer path
    (the layers alone, hooks removed), with gradient checkpointing too (its recomputation must see the same work)."""
    from hra_diffusion.model import _remove_call_hooks

    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4))
    add_hra(unet, HRAConfig(r=2, apply_GS=True, target_modules=("to_q",)), "gs")  # a batch of its own kind
    for p in hra_parameters(unet):
        p.requires_grad_(True)  # add_hra froze the first adapter: train both
    perturb(unet)
    inputs = unet_inputs()
    layer = next(layer for _, layer in hra_layers(unet))
    seen = []
    layer.register_forward_pre_hook(lambda module, args: seen.append(dict(module.call_factors)))
    batched_out, batched_grads = _step(unet, inputs)
    assert set(seen[-1]) == {"default", "gs"}, "both adapters' factors came from the batches"

    reference = tiny_unet()
    add_hra(reference, HRAConfig(r=4))
    add_hra(reference, HRAConfig(r=2, apply_GS=True, target_modules=("to_q",)), "gs")
    reference.load_state_dict(unet.state_dict())
    for p in hra_parameters(reference):
        p.requires_grad_(True)
    _remove_call_hooks(reference)
    ref_out, ref_grads = _step(reference, inputs)
    close = dict(rtol=1e-4, atol=1e-5)  # float32 rounding: batched and single QR / solves differ in the last bits
    torch.testing.assert_close(batched_out, ref_out, **close)
    for got, want in zip(batched_grads, ref_grads):
        assert ((got - want).norm() / want.norm()).item() < 1e-4

    for model in (unet, reference):  # sampling at fractional strengths: batched float64 eigen-work vs per layer
        set_active_adapters(model, ["default", "gs"], [0.6, 0.4])
    torch.testing.assert_close(run(unet, inputs), run(reference, inputs), **close)
    assert seen[-1]["default"][2][0].shape == layer.hra_u["default"].shape, "the fractional factors came batched"
    set_active_adapters(unet, ["default", "gs"])

    unet.enable_gradient_checkpointing()  # its recomputation in backward must find the same work as the forward
    unet.train()
    ckpt_out, ckpt_grads = _step(unet, inputs)
    torch.testing.assert_close(ckpt_out, batched_out, **close)
    for got, want in zip(ckpt_grads, batched_grads):
        assert ((got - want).norm() / want.norm()).item() < 1e-4


def test_batched_factors_are_never_stale(tiny_unet):
    unet = tiny_unet()
    add_hra(unet, HRAConfig(r=4))
    perturb(unet)
    inputs = unet_inputs()
    layer = next(layer for _, layer in hra_layers(unet))
    before = run(unet, inputs)
    assert layer.call_factors, "kept after the call (gradient checkpointing re-runs layers in backward)"
    perturb(unet, seed=5)  # an optimizer-like in-place update: the kept factors no longer apply
    x = torch.randn(3, layer.d_in)
    v, s = hh.hra_factors(layer.hra_u["default"].detach())
    expected = nn.functional.linear(hh.apply_transpose(x, v, s), layer.base_layer.weight, layer.base_layer.bias)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    assert (run(unet, inputs) - before).abs().max() > 1e-4
    set_active_adapters(unet, ["default"], [0.5])  # a new strength: the kept factors no longer apply either
    v, s = hh.fractional_factors(*hh.hra_factors(layer.hra_u["default"].detach().double()), 0.5)
    expected = nn.functional.linear(hh.apply_transpose(x, v.float(), s.float()), layer.base_layer.weight)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-6)
    remove_hra(unet)
    assert not unet._forward_pre_hooks and not unet._forward_hooks, "a plain model again"
