"""HRALayer: a frozen Linear or Conv2d with named HRA adapters, computing with weight W H_a H_b ... .

The layer picks, per call, the cheaper exact way to apply H (see householder.py): on the activations, or in
LoRA shape. Merged adapters live in the base weight; the rest are applied on the fly, in the active order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import householder as hh
from .config import HRAConfig

FORMS = ("auto", "activation", "lora", "weight")


class HRALayer(nn.Module):
    """Wraps ``base_layer``; its weight is flattened to (d_out, d_in) with d_in = in_channels * kh * kw for convs."""

    def __init__(self, base_layer: nn.Linear | nn.Conv2d) -> None:
        super().__init__()
        if isinstance(base_layer, nn.Conv2d):
            if base_layer.groups != 1:
                raise ValueError(
                    f"HRA cannot adapt a grouped convolution (groups={base_layer.groups}): its weight is not one "
                    "(out, in*kh*kw) matrix. Exclude this layer with exclude_modules."
                )
        elif not isinstance(base_layer, nn.Linear):
            raise TypeError(f"HRA adapts nn.Linear and nn.Conv2d layers, not {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.hra_u = nn.ParameterDict()
        self.hra_u0 = nn.ParameterDict()  # frozen initial vectors of identity_start strictly orthogonal adapters
        self.configs: dict[str, HRAConfig] = {}
        self.active: list[str] = []
        self.merged: list[str] = []
        self.strength: dict[str, float] = {}
        self.enabled = True
        self.form = "auto"
        # name -> ((u's version, storage, strength), with a graph?, factors), computed for the latest call of the
        # whole model by the batching hook of hra_diffusion.model
        self.call_factors: dict[str, tuple[tuple[int, int, float], bool, tuple[Tensor, Tensor]]] = {}

    @property
    def d_in(self) -> int:
        w = self.base_layer.weight
        return w[0].numel()

    @property
    def d_out(self) -> int:
        return self.base_layer.weight.shape[0]

    def add_adapter(self, name: str, config: HRAConfig, u: Tensor | None = None, u0: Tensor | None = None) -> None:
        if name in self.configs:
            raise ValueError(f"this layer already has an adapter named {name!r}")
        device = self.base_layer.weight.device
        if u is None:
            init = hh.paired_init if config.init == "identity" and not config.apply_GS else hh.random_init
            u = init(self.d_in, config.r)
        if tuple(u.shape) != (self.d_in, config.r):
            want = (self.d_in, config.r)
            raise ValueError(f"adapter {name!r}: vectors of shape {tuple(u.shape)}, this layer needs {want}")
        self.hra_u[name] = nn.Parameter(u.detach().to(device=device, dtype=torch.float32).clone())
        if config.has_initial_planes:
            start = self.hra_u[name].detach() if u0 is None else u0
            self.hra_u0[name] = nn.Parameter(start.to(device=device, dtype=torch.float32).clone(), requires_grad=False)
        self.configs[name] = config
        self.strength[name] = 1.0
        self.active.append(name)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged:
            raise RuntimeError(f"adapter {name!r} is merged into the weights; unmerge it before deleting it")
        del self.hra_u[name], self.configs[name], self.strength[name]
        self.call_factors.pop(name, None)
        if name in self.hra_u0:
            del self.hra_u0[name]
        if name in self.active:
            self.active.remove(name)

    def factors(self, name: str) -> tuple[Tensor, Tensor]:
        """(V, S) with H = I - V S V^T for this adapter at its strength, in float32.

        Fractional strengths start from float64 factors: near a half turn H^s amplifies rounding in its input by
        about 1/sin(angle), and from float32 factors H^0.5 H^0.5 missed H by up to 1e-3 (strongly moved vectors).
        """
        u, u0, gs = self.hra_u[name], self.hra_u0[name] if name in self.hra_u0 else None, self.configs[name].apply_GS
        state, graph, factors = self.call_factors.get(name, (None, False, None))
        current = (u._version, u.data_ptr(), self.strength[name])
        if state == current and (graph or not (torch.is_grad_enabled() and u.requires_grad)):
            return factors
        strength = self.strength[name]
        if strength == 1.0:
            return hh.hra_factors(u, u0, gram_schmidt=gs)
        u0 = None if u0 is None else u0.double()
        v, s = hh.fractional_factors(*hh.hra_factors(u.double(), u0, gram_schmidt=gs), strength)
        return v.float(), s.float()

    def weight2d(self) -> Tensor:
        return self.base_layer.weight.reshape(self.d_out, -1)

    def pending(self) -> list[str]:
        """Active adapters not merged into the weight: the ones forward must apply."""
        if not self.enabled:
            if self.merged:
                raise RuntimeError("HRA adapters are merged into the weights; unmerge_hra() before disabling them")
            return []
        return [name for name in self.active if name not in self.merged]

    def forward(self, x: Tensor) -> Tensor:
        names = self.pending()
        if not names:
            return self.base_layer(x)
        factors = [self.factors(name) for name in names]
        form = self.form if self.form != "auto" else self._cheapest_form(x, factors)
        if form == "activation":
            if isinstance(self.base_layer, nn.Conv2d):
                raise ValueError("the activation-side form applies to Linear layers only")
            for v, s in reversed(factors[1:]):  # y = x (W H_a H_b)^T = x H_b^T H_a^T W^T
                x = hh.apply_transpose(x, v.to(x.dtype), s.to(x.dtype))
            v, s = factors[0][0].to(x.dtype), factors[0][1].to(x.dtype)
            if type(self.base_layer) is nn.Linear:  # exactly: subclasses (quantized layers) keep their own forward
                return hh.apply_transpose_linear(x, v, s, self.base_layer.weight, self.base_layer.bias)
            return self.base_layer(hh.apply_transpose(x, v, s))
        if form == "lora" and len(factors) == 1:
            return self._lora_forward(x, *factors[0])
        return self._weight_forward(x, factors)

    def _cheapest_form(self, x: Tensor, factors: list[tuple[Tensor, Tensor]]) -> str:
        if isinstance(self.base_layer, nn.Conv2d):
            plain_padding = self.base_layer.padding_mode == "zeros"
            return "lora" if len(factors) == 1 and plain_padding else "weight"
        if len(factors) > 1:
            return "activation"
        # multiply-adds beyond the frozen layer, N tokens: activation side 2 N d_in k,
        # LoRA shape N k (d_in + d_out) + d_out d_in k (the W V S product)
        tokens = x.numel() // self.d_in
        return "lora" if tokens * self.d_out + self.d_out * self.d_in < tokens * self.d_in else "activation"

    def _lora_forward(self, x: Tensor, v: Tensor, s: Tensor) -> Tensor:
        weight = self.base_layer.weight
        down, up = hh.lora_factors(self.weight2d(), v.to(weight.dtype), s.to(weight.dtype))
        down, up = down.to(x.dtype), up.to(x.dtype)
        base = self.base_layer(x)
        if isinstance(self.base_layer, nn.Linear):
            return base + (x @ down.T) @ up.T
        conv = self.base_layer
        hidden = F.conv2d(x, down.reshape(-1, *weight.shape[1:]), None, conv.stride, conv.padding, conv.dilation)
        return base + F.conv2d(hidden, up[:, :, None, None])

    def _weight_forward(self, x: Tensor, factors: list[tuple[Tensor, Tensor]]) -> Tensor:
        weight = self.base_layer.weight
        w2d = self.weight2d()
        for v, s in factors:
            w2d = hh.merge(w2d, v.to(weight.dtype), s.to(weight.dtype))
        w = w2d.reshape(weight.shape)
        if isinstance(self.base_layer, nn.Linear):
            return F.linear(x, w, self.base_layer.bias)
        return self.base_layer._conv_forward(x, w, self.base_layer.bias)

    @torch.no_grad()
    def merge(self) -> None:
        """Fold every pending adapter into the base weight, in the active order (float32 math)."""
        weight = self.base_layer.weight
        w2d = self.weight2d().float()
        for name in self.pending():
            w2d = hh.merge(w2d, *self.factors(name))
            self.merged.append(name)
        weight.copy_(w2d.reshape(weight.shape).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weight: W = (W H) H^T, undoing the merged adapters last-first."""
        weight = self.base_layer.weight
        w2d = self.weight2d().float()
        for name in reversed(self.merged):
            w2d = hh.unmerge(w2d, *self.factors(name))
        self.merged.clear()
        weight.copy_(w2d.reshape(weight.shape).to(weight.dtype))

    def extra_repr(self) -> str:
        return f"adapters={list(self.configs)}, active={self.active}, merged={self.merged}"
