"""Helpers shared by the tests: adapters moved well away from the identity, relative error, peft comparisons."""

import torch

from hra_diffusion import add_hra, hra_parameters

UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "ff.net.0.proj")
TE_TARGETS = ("q_proj", "v_proj", "out_proj", "fc1")  # without out_proj diffusers misreads kohya text-encoder keys


def adapted(model, config, name="default", seed=0):
    """Add an adapter and move it well away from the identity, as training would."""
    add_hra(model, config, name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in hra_parameters(model, name):
            p.add_(0.3 * torch.randn(p.shape, generator=gen) * p.norm(dim=0, keepdim=True))
    return model


def assert_rel(actual, expected, tol=1e-5):
    rel = ((actual - expected).norm() / expected.norm()).item()
    assert rel < tol, f"relative error {rel:.2e} >= {tol:.0e}"


def same_as_peft(peft_layer, ours, x):
    """Forward and backward through peft's layer and ours on copies of ``x``: outputs and input gradients must
    agree; returns the two layers' vector gradients (peft's, ours) for the caller's tolerance."""
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_peft, y_ours = peft_layer(x1), ours(x2)
    torch.testing.assert_close(y_ours, y_peft, rtol=1e-5, atol=1e-6)
    g = torch.randn_like(y_peft)
    y_peft.backward(g)
    y_ours.backward(g)
    torch.testing.assert_close(x2.grad, x1.grad, rtol=1e-5, atol=1e-6)
    return peft_layer.hra_u["default"].grad, ours.hra_u["default"].grad
