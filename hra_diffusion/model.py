"""Putting HRA adapters on a model: find the target layers, add/activate/merge/remove adapters, collect parameters.

Works on any torch module (a diffusers UNet, a CLIP text encoder); nothing here knows about pipelines or files.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from . import householder as hh
from .config import HRAConfig
from .layers import FORMS, HRALayer


def hra_layers(model: nn.Module) -> Iterator[tuple[str, HRALayer]]:
    """(module path, layer) for every HRA-wrapped layer, paths as in the unwrapped model."""
    for name, module in model.named_modules():
        if isinstance(module, HRALayer):
            yield name, module


def _matches(name: str, patterns: tuple[str, ...] | str) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def find_targets(model: nn.Module, config: HRAConfig) -> list[str]:
    """Paths of the Linear/Conv2d layers (or already wrapped ones) that ``config`` selects."""
    wrapped_inner = {f"{name}.base_layer" for name, _ in hra_layers(model)}
    candidates = [
        name
        for name, module in model.named_modules()
        if isinstance(module, (nn.Linear, nn.Conv2d, HRALayer)) and name not in wrapped_inner
    ]
    chosen = [n for n in candidates if _matches(n, config.target_modules) and not _matches(n, config.exclude_modules)]
    if isinstance(config.target_modules, tuple):
        missing = [t for t in config.target_modules if not any(_matches(n, (t,)) for n in candidates)]
        if missing:
            examples = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in candidates})[:12])
            raise ValueError(
                f"target_modules {missing} match no Linear/Conv2d layer of {type(model).__name__}; "
                f"layer names end with e.g.: {examples}"
            )
    if not chosen:
        raise ValueError(f"HRAConfig selects no layer of {type(model).__name__} (targets {config.target_modules!r})")
    return chosen


def add_hra(
    model: nn.Module,
    config: HRAConfig | None = None,
    adapter_name: str = "default",
    *,
    targets: Iterable[str] | None = None,
) -> nn.Module:
    """Add adapter ``adapter_name`` to the selected layers, in place; base weights are frozen.

    The new adapter becomes active after those already active (so W H_first H_new). ``targets`` (module paths)
    overrides the config's selection; loading uses it to restore exactly the stored layers.
    """
    config = config or HRAConfig()
    check_adapter_name(adapter_name)
    if adapter_name in hra_adapters(model):
        raise ValueError(f"the model already has an HRA adapter named {adapter_name!r}")
    paths = list(targets) if targets is not None else find_targets(model, config)
    for param in model.parameters():
        param.requires_grad_(False)
    modules = dict(model.named_modules())
    for path in paths:
        if path not in modules:
            raise ValueError(f"{type(model).__name__} has no layer {path!r}")
        module = modules[path]
        layer = module if isinstance(module, HRALayer) else HRALayer(module)
        layer.add_adapter(adapter_name, config)
        if layer is not module:  # wrapped only once the adapter is in: a failure leaves no empty wrapper behind
            parent_name, _, child = path.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, layer)
    if not any(hook is _prepare_call_factors for hook in model._forward_pre_hooks.values()):
        model.register_forward_pre_hook(_prepare_call_factors)
    return model


def check_adapter_name(name: str) -> None:
    """Raise ValueError unless ``name`` can key an adapter: torch refuses "" and dotted parameter names, and would
    do so only halfway through adding the adapter."""
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter names must be non-empty strings without '.', got {name!r}")


def _prepare_call_factors(model: nn.Module, args: tuple) -> None:
    """Forward pre-hook of a model with HRA layers: the factors of all its adapters, batched by shape and kind.

    One batched computation instead of one per layer and call (hundreds of tiny kernels: 4% of an SDXL training step
    on CPU, more where kernel launches dominate), and for sampling at a fractional strength one batched float64
    eigen-decomposition instead of one per layer. Layers find theirs in ``call_factors`` (and compute them
    themselves when training at a fractional strength, or when called on their own). The factors stay until the
    next call, because gradient checkpointing re-runs the layers during backward and must see the same computation
    as the forward did; a layer uses them only while its vectors keep the version, storage and strength they were
    computed from (an optimizer step moves the version on).
    """
    groups: dict[tuple, list[tuple[HRALayer, str]]] = {}
    for _, layer in hra_layers(model):
        layer.call_factors.clear()
        for name in layer.pending():
            u, strength = layer.hra_u[name], layer.strength[name]
            graph = torch.is_grad_enabled() and u.requires_grad
            if strength != 1.0 and graph:  # training at a fractional strength: per layer, as it is rare
                continue
            gs, planes = layer.configs[name].apply_GS, name in layer.hra_u0
            key = (tuple(u.shape), u.device, u.dtype, graph, strength != 1.0, gs, planes)
            groups.setdefault(key, []).append((layer, name))
    for (*_, graph, fractional, gs, planes), entries in groups.items():
        us = [layer.hra_u[name] for layer, name in entries]
        u0s = [layer.hra_u0[name] for layer, name in entries] if planes else None
        if fractional:  # sampling at a strength: float64 eigen-work per layer, worth batching even for one
            strengths = [layer.strength[name] for layer, name in entries]
            batch = hh.fractional_factors_batch(us, strengths, u0s, gram_schmidt=gs)
        elif len(entries) > 1:
            batch = hh.hra_factors_batch(us, u0s, gram_schmidt=gs)
        else:
            continue
        for (layer, name), u, factors in zip(entries, us, batch):
            layer.call_factors[name] = ((u._version, u.data_ptr(), layer.strength[name]), graph, factors)


def _remove_call_hooks(model: nn.Module) -> None:
    for key in [key for key, hook in model._forward_pre_hooks.items() if hook is _prepare_call_factors]:
        del model._forward_pre_hooks[key]


def hra_adapters(model: nn.Module) -> dict[str, HRAConfig]:
    """Adapter name -> config, for every adapter on the model."""
    found: dict[str, HRAConfig] = {}
    for _, layer in hra_layers(model):
        found.update(layer.configs)
    return found


def _require(model: nn.Module, adapter_name: str) -> None:
    if adapter_name not in hra_adapters(model):
        raise ValueError(f"no HRA adapter named {adapter_name!r}; the model has {sorted(hra_adapters(model))}")


def hra_parameters(model: nn.Module, adapter_name: str | None = None) -> Iterator[nn.Parameter]:
    """The trainable HRA vectors (all adapters, or one)."""
    for _, layer in hra_layers(model):
        for name, param in layer.hra_u.items():
            if adapter_name is None or name == adapter_name:
                yield param


def hra_state_dict(model: nn.Module, adapter_name: str = "default") -> dict[str, Tensor]:
    """{"<module path>.hra_u": (d_in, r)} raw vectors (peft's layout); identity_start GS adapters add
    "<path>.hra_u0"."""
    _require(model, adapter_name)
    state = {}
    for path, layer in hra_layers(model):
        if adapter_name in layer.hra_u:
            state[f"{path}.hra_u"] = layer.hra_u[adapter_name].detach()
            if adapter_name in layer.hra_u0:
                state[f"{path}.hra_u0"] = layer.hra_u0[adapter_name].detach()
    return state


def set_hra_state_dict(model: nn.Module, state: dict[str, Tensor], adapter_name: str = "default") -> None:
    """Copy vectors into an existing adapter; every key must match a layer and shape."""
    _require(model, adapter_name)
    expected = hra_state_dict(model, adapter_name)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ValueError(f"HRA state does not fit adapter {adapter_name!r}: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for key, target in expected.items():
            if target.shape != state[key].shape:
                raise ValueError(f"{key}: stored shape {tuple(state[key].shape)}, model needs {tuple(target.shape)}")
            target.copy_(state[key])


def orthogonality_loss(model: nn.Module) -> Tensor:
    """sum over layers and trainable adapters of lambda_orth * ||I - U^T U||_F^2 (column-normalized U).

    Zero (a tensor) when every lambda is 0; strictly orthogonal adapters need no penalty and add none.
    """
    total = None
    for _, layer in hra_layers(model):
        for name, u in layer.hra_u.items():
            cfg = layer.configs[name]
            if cfg.lambda_orth and not cfg.apply_GS and u.requires_grad:
                term = cfg.lambda_orth * hh.orthogonality_penalty(u)
                total = term if total is None else total + term
    if total is None:
        param = next(model.parameters())
        return torch.zeros((), device=param.device)
    return total


def set_active_adapters(model: nn.Module, names: str | list[str], strengths: list[float] | None = None) -> None:
    """Make exactly ``names`` active, applied in this order (W H_names[0] H_names[1] ...), each at its strength.

    Strength s in [0, 1] is the exact orthogonal power H^s: 0 is the base model, 1 the adapter.
    """
    names = [names] if isinstance(names, str) else list(names)
    for name in names:
        _require(model, name)
    strengths = [1.0] * len(names) if strengths is None else list(strengths)
    if len(strengths) != len(names):
        raise ValueError(f"{len(names)} adapters but {len(strengths)} strengths")
    for s in strengths:
        if not 0.0 <= s <= 1.0:
            raise ValueError(f"HRA strength must be in [0, 1], got {s}")
    for path, layer in hra_layers(model):
        if layer.merged:
            raise RuntimeError(f"{path}: adapters are merged into the weights; unmerge_hra() before switching adapters")
        layer.active = [n for n in names if n in layer.configs]
        for name, s in zip(names, strengths):
            if name in layer.configs:
                layer.strength[name] = float(s)


def active_adapters(model: nn.Module) -> list[str]:
    order: list[str] = []
    for _, layer in hra_layers(model):
        order.extend(n for n in layer.active if n not in order)
    return order


@contextmanager
def disable_hra(model: nn.Module) -> Iterator[nn.Module]:
    """Run the base model inside the block (adapters must not be merged)."""
    layers = [layer for _, layer in hra_layers(model)]
    for layer in layers:
        if layer.merged:
            raise RuntimeError("HRA adapters are merged into the weights; unmerge_hra() before disabling them")
    previous = [layer.enabled for layer in layers]
    for layer in layers:
        layer.enabled = False
    try:
        yield model
    finally:
        for layer, was in zip(layers, previous):
            layer.enabled = was


def set_hra_form(model: nn.Module, form: str) -> None:
    """Force how layers apply H ("activation", "lora", "weight"); "auto" (default) picks the cheaper per call."""
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    for _, layer in hra_layers(model):
        layer.form = form


def merge_hra(model: nn.Module) -> nn.Module:
    """Fold the active adapters into the base weights (O(d_out d_in r) per layer); forward then costs nothing extra."""
    for _, layer in hra_layers(model):
        layer.merge()
    return model


def unmerge_hra(model: nn.Module) -> nn.Module:
    """Undo merge_hra exactly (H is orthogonal: W = (W H) H^T)."""
    for _, layer in hra_layers(model):
        layer.unmerge()
    return model


def remove_hra(model: nn.Module, adapter_name: str | None = None, *, merge: bool = False) -> nn.Module:
    """Delete one adapter (or all). With ``merge=True`` the removed adapters that are active stay folded into the
    weights (others merged before are unmerged and applied on the fly again).

    Layers left without adapters are unwrapped, so the model is a plain model again.
    """
    if adapter_name is not None:
        _require(model, adapter_name)
    modules = dict(model.named_modules())
    for path, layer in list(hra_layers(model)):
        names = list(layer.configs) if adapter_name is None else [adapter_name]
        names = [n for n in names if n in layer.configs]
        if merge:
            kept_active = layer.active
            layer.active = [n for n in layer.active if n in names]
            layer.unmerge()
            layer.merge()
            layer.merged.clear()
            layer.active = [n for n in kept_active if n not in names]
        else:
            layer.unmerge()
        for name in names:
            layer.delete_adapter(name)
        if not layer.configs:
            parent_name, _, child = path.rpartition(".")
            setattr(modules[parent_name] if parent_name else model, child, layer.base_layer)
    if not any(hra_layers(model)):
        _remove_call_hooks(model)
    return model


def layer_fingerprint(model: nn.Module, adapter_name: str) -> dict[str, list[int]]:
    """{module path: [d_out, d_in]} of the layers an adapter sits on: what a stored adapter must find again."""
    return {path: [layer.d_out, layer.d_in] for path, layer in hra_layers(model) if adapter_name in layer.configs}
