"""Adapter files: one safetensors file with the config and a fingerprint of the target layers in its metadata.

Keys are "<component>.<module path>.hra_u" (component: unet, text_encoder, ...), so one file can hold the UNet's
and the text encoder's adapters. Nothing is ever unpickled; files are written to a temp file, then renamed.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import HRAConfig
from .model import add_hra, hra_adapters, hra_layers, hra_state_dict, layer_fingerprint, set_hra_state_dict

FORMAT = "hra-studio/1"
RESERVED = ("format", "adapters", "fingerprint")


class AdapterFileError(ValueError):
    """The file cannot be read as an HRA adapter (missing, truncated, corrupt, NaN, not ours)."""


class AdapterMismatchError(ValueError):
    """The adapter was made for layers this model does not have (another base model)."""


def component_name(model: nn.Module) -> str:
    """The name a bare model is stored under: unet, text_encoder or model."""
    cls = type(model).__name__
    if "UNet" in cls:
        return "unet"
    if "TextModel" in cls:
        return "text_encoder"
    return "model"


def _components(models: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    return dict(models) if isinstance(models, Mapping) else {component_name(models): models}


def fingerprint_digest(layers: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def save_hra(
    models: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike,
    adapter_name: str = "default",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of a model (or of {"unet": unet, "text_encoder": te}) to one file.

    ``metadata`` (base model, instance prompt, steps, ...) is stored alongside; non-string values as JSON.
    """
    tensors: dict[str, Tensor] = {}
    adapters: dict[str, Any] = {}
    for comp, model in _components(models).items():
        if adapter_name not in hra_adapters(model):
            continue
        for key, value in hra_state_dict(model, adapter_name).items():
            tensors[f"{comp}.{key}"] = value.detach().to("cpu", torch.float32).contiguous()
        adapters[comp] = {
            "config": json.loads(hra_adapters(model)[adapter_name].to_json()),
            "layers": layer_fingerprint(model, adapter_name),
        }
    if not adapters:
        raise ValueError(f"no HRA adapter named {adapter_name!r} to save")
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or inf values: training diverged; save an earlier checkpoint instead")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items() if k not in RESERVED}
    meta.update(format=FORMAT, adapters=json.dumps(adapters, sort_keys=True), fingerprint=fingerprint_digest(adapters))
    meta.setdefault("adapter_name", adapter_name)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_hra_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's metadata with "adapters" parsed; cheap (reads the header only). Raises AdapterFileError."""
    path = Path(path)
    if not path.is_file():
        raise AdapterFileError(f"{path}: no such adapter file")
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            keys = list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for every way a header can be broken
        raise AdapterFileError(
            f"{path} is not a readable safetensors file (truncated or corrupt: {err}). Download or export it again."
        ) from err
    if meta.get("format") != FORMAT:
        raise AdapterFileError(
            f"{path} is not an HRA Studio adapter (metadata format={meta.get('format')!r}, expected {FORMAT!r}). "
            "LoRA files load with diffusers' load_lora_weights; peft HRA folders load by their folder path."
        )
    meta["adapters"] = json.loads(meta["adapters"])
    meta["tensor_keys"] = keys
    return meta


def _read_tensors(path: Path, keys: list[str]) -> dict[str, Tensor]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            tensors = {key: handle.get_tensor(key) for key in keys}
    except Exception as err:
        raise AdapterFileError(f"{path}: the tensor data is truncated or corrupt ({err}). Export it again.") from err
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise AdapterFileError(f"{path}: {key} holds NaN or inf values; the adapter is unusable")
    return tensors


def check_fits(model: nn.Module, layers: Mapping[str, list[int]], what: str = "adapter") -> None:
    """Raise AdapterMismatchError naming every stored layer the model lacks or has in another shape."""
    modules = dict(model.named_modules())
    wrapped = {path: layer for path, layer in hra_layers(model)}
    problems = []
    for path, shape in layers.items():
        module = wrapped.get(path, modules.get(path))
        if module is None:
            problems.append(f"{path}: no such layer")
            continue
        base = module.base_layer if path in wrapped else module
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            problems.append(f"{path}: is a {type(base).__name__}, not Linear/Conv2d")
            continue
        actual = [base.weight.shape[0], base.weight[0].numel()]
        if actual != list(shape):
            problems.append(f"{path}: stored (out, in) {tuple(shape)}, model has {tuple(actual)}")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise AdapterMismatchError(
            f"this {what} was made for a different model ({len(problems)} of {len(layers)} layers differ from "
            f"{type(model).__name__}):\n  {shown}\nLoad it into the base model it was trained on."
        )


def load_hra(
    models: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike,
    adapter_name: str | None = None,
) -> nn.Module | Mapping[str, nn.Module]:
    """Add the adapter stored in ``path`` to a plain model (or to each component present in the file).

    The stored config and layer list are authoritative; a model whose layers differ is refused, naming them.
    A bare model takes its own component from the file (a UNet loads "unet" even if the file also has a text
    encoder part). Returns what it was given.
    """
    path = Path(path)
    meta = read_hra_metadata(path)
    stored = meta["adapters"]
    name = adapter_name or meta.get("adapter_name", "default")
    comps = _components(models)
    if not isinstance(models, Mapping) and len(stored) == 1:
        comps = {next(iter(stored)): models}
    wanted = {comp: model for comp, model in comps.items() if comp in stored}
    if not wanted:
        raise AdapterMismatchError(
            f"{path} holds adapters for {sorted(stored)}, none of which is given ({sorted(comps)})"
        )
    for comp, model in wanted.items():
        check_fits(model, stored[comp]["layers"], what=f"adapter's {comp} part")
        if name in hra_adapters(model):
            raise ValueError(f"{comp} already has an adapter named {name!r}; pass adapter_name= to load it as another")
    for comp, model in wanted.items():
        prefix = f"{comp}."
        keys = [k for k in meta["tensor_keys"] if k.startswith(prefix)]
        tensors = {k[len(prefix):]: v for k, v in _read_tensors(path, keys).items()}
        config = HRAConfig.from_json(json.dumps(stored[comp]["config"]))
        add_hra(model, config, name, targets=list(stored[comp]["layers"]))
        set_hra_state_dict(model, tensors, name)
    return models
