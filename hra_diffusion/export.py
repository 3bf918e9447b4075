"""Exports for the tools people already use: peft HRA folders, exact LoRA files, merged checkpoints.

- peft: the raw vectors in peft's layout, for ``PeftModel.from_pretrained``: plain HRA, and the paper's strictly
  orthogonal form (gs_form="paper", peft's apply_GS); our default identity-start strictly orthogonal form has no
  peft equivalent, see ``export_peft``.
- LoRA: an HRA layer computes with W H = W + (-(W V S)) V^T, a rank-k update, so the LoRA pair down = V^T,
  up = -(W V S) with alpha = k reproduces the adapter exactly in every LoRA loader (diffusers, ComfyUI, A1111).
  It bakes in the base weights W it was computed from.
- merged: W H folded into the weights, saved as a plain diffusers pipeline (plus the denoiser in one file).

These are the writers; ``export_formats.EXPORT_FORMATS`` names the formats for the convert command and the app.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from . import householder as hh
from .families import family_of
from .io import PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, _components, atomic_folder, atomic_write
from .model import _require, hra_adapters, hra_layers, hra_state_dict, remove_hra, set_active_adapters, unmerge_hra

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

LORA_FORMATS = ("diffusers", "kohya")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # the file diffusers' load_lora_weights looks for in a folder
LORA_NOTE = (
    "Exact LoRA form of an HRA (Householder reflection) adapter: W H = W + lora_up @ lora_down, alpha = rank. "
    "lora_up = -(W V S) contains the base weights W, so this file is valid only on the base model whose weight "
    "digest is in hra_base_sha256."
)


def _strength(model: nn.Module, adapter_name: str) -> float:
    """The adapter's strength (set_active_adapters sets it on every layer alike)."""
    _require(model, adapter_name)
    return next(layer.strength[adapter_name] for _, layer in hra_layers(model) if adapter_name in layer.configs)


def _name_or_path(model: nn.Module) -> str | None:
    """Where the model was loaded from: diffusers keeps it in its config dict, transformers on its config object."""
    config = getattr(model, "config", None)
    return config.get("_name_or_path") if isinstance(config, Mapping) else getattr(config, "name_or_path", None)


def export_peft(
    model: nn.Module, out_dir: str | os.PathLike, adapter_name: str = "default", base_model: str | None = None
) -> Path:
    """Write adapter ``adapter_name`` of one model as a peft HRA folder (load: ``PeftModel.from_pretrained``).

    The paper's strictly orthogonal form (gs_form="paper", I - 2QQ^T) is exactly peft's apply_GS and is written as
    such. The identity_start form (I - 2QQ^T)(I - 2Q0Q0^T) with frozen Q0 is refused: no peft operator equals it. A
    strength other than 1 is refused too (peft has none). ``export_lora`` reaches peft-free LoRA loaders in both cases.
    """
    _require(model, adapter_name)
    config = hra_adapters(model)[adapter_name]
    if config.has_initial_planes:
        raise ValueError(
            f"adapter {adapter_name!r} is strictly orthogonal in the identity_start form: here H = (I - 2QQ^T)"
            "(I - 2Q0Q0^T) with frozen initial vectors Q0, which starts at the identity; peft's apply_GS computes "
            "I - 2QQ^T (our gs_form='paper'), a different operator that is never the identity, so a peft file would "
            "silently change the model. Use export_lora (exact, rank up to 2r) or export_merged instead."
        )
    if _strength(model, adapter_name) != 1.0:
        raise ValueError(
            f"adapter {adapter_name!r} is set to strength {_strength(model, adapter_name)}; peft HRA has no strength. "
            "Set it to 1, or use export_lora / export_merged, which bake the strength in exactly."
        )
    state = hra_state_dict(model, adapter_name)
    tensors = {PEFT_PREFIX + key: value.to("cpu", torch.float32).contiguous() for key, value in state.items()}
    adapter_config = {
        "peft_type": "HRA",
        "r": config.r,
        "apply_GS": config.apply_GS,
        "target_modules": [key.removesuffix(".hra_u") for key in state],
        "exclude_modules": None,
        "init_weights": config.init == "identity",  # how peft would start it; the stored vectors replace that
        "layers_to_transform": None,
        "layers_pattern": None,
        "bias": "none",
        "modules_to_save": None,
        "base_model_name_or_path": base_model if base_model is not None else _name_or_path(model),
        "revision": None,
        "task_type": None,
        "inference_mode": True,
        "auto_mapping": {"base_model_class": type(model).__name__, "parent_library": type(model).__module__},
    }

    def write(tmp: Path) -> None:
        (tmp / PEFT_CONFIG).write_text(json.dumps(adapter_config, indent=2, sort_keys=True) + "\n")
        save_file(tensors, str(tmp / PEFT_WEIGHTS), metadata={"format": "pt"})

    return atomic_folder(out_dir, write)


def lora_file(path: str | os.PathLike) -> Path:
    """``x.safetensors`` is the file itself; anything else is a folder holding pytorch_lora_weights.safetensors.

    A folder with that exact name is what ``pipe.load_lora_weights(folder)`` finds without a weight_name (it is also
    a plain file for ComfyUI / A1111, whose file names are free).
    """
    path = Path(path)
    if path.suffix == ".safetensors":
        return path
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        raise ValueError(f"{path}: LoRA exports are safetensors only (pickle files can run code when loaded)")
    return path / LORA_WEIGHT_NAME


def _base_digest(model: nn.Module, adapter_name: str) -> str:
    """sha256 of the base weights under an adapter: an exported LoRA is exact only on these very weights."""
    digest = hashlib.sha256()
    for path, layer in hra_layers(model):
        if adapter_name in layer.configs:
            weight = layer.base_layer.weight.detach().to("cpu", torch.float32).contiguous()
            digest.update(f"{path}:{tuple(weight.shape)};".encode())
            digest.update(weight.numpy().tobytes())
    return digest.hexdigest()


def lora_pairs(model: nn.Module, adapter_name: str = "default") -> dict[str, tuple[Tensor, Tensor]]:
    """{module path: (down, up)} with W H^strength = W + up @ down, conv pairs shaped as kohya / peft conv LoRA.

    Computed in float32 from the unmerged base weights (merged adapters would be baked into W twice: refused).
    """
    _require(model, adapter_name)
    pairs: dict[str, tuple[Tensor, Tensor]] = {}
    for path, layer in hra_layers(model):
        if adapter_name not in layer.configs:
            continue
        if layer.merged:
            raise RuntimeError(f"{path}: adapters are merged into the weights; unmerge_hra() before exporting a LoRA")
        v, s = layer.factors(adapter_name)
        down, up = hh.lora_factors(layer.weight2d().float(), v, s)
        weight = layer.base_layer.weight
        if weight.ndim == 4:  # conv: a (k, in, kh, kw) conv down, then a 1x1 conv up
            down, up = down.reshape(-1, *weight.shape[1:]), up[:, :, None, None]
        pairs[path] = (down.detach().cpu().contiguous(), up.detach().cpu().contiguous())
    return pairs


def _lora_path(model: nn.Module, path: str) -> str:
    """The module path LoRA files use: CLIP layers as "text_model.encoder...", as every loader expects.

    transformers 5 flattened CLIPTextModel (paths start at "encoder."); diffusers strips "text_model." again for such
    models, and ComfyUI / A1111 only know the prefixed names.
    """
    if type(model).__name__.startswith("CLIPTextModel") and not hasattr(model, "text_model"):
        return f"text_model.{path}"
    return path


def export_lora(
    model_or_components: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike,
    format: str = "diffusers",
    adapter_name: str = "default",
) -> Path:
    """Write adapter ``adapter_name`` (at its current strength) as an exact LoRA file; returns the file.

    format "diffusers": "<component>.<path>.lora_A.weight" / ".lora_B.weight" (unet or transformer, text_encoder...;
    alpha = rank is diffusers' default when no
    alpha is stored), what ``pipe.load_lora_weights`` reads natively. format "kohya":
    "lora_unet_<path with _>.lora_down.weight" / ".lora_up.weight" / ".alpha" (the text encoders' prefixes are the
    family's ``kohya_prefixes``: "lora_te_", or "lora_te1_"/"lora_te2_" for SDXL's two),
    what ComfyUI and A1111 read and diffusers converts. ``path`` ending in .safetensors is the file; otherwise it is
    a folder and the file is named pytorch_lora_weights.safetensors.
    """
    if format not in LORA_FORMATS:
        raise ValueError(f"format must be one of {LORA_FORMATS}, got {format!r}")
    tensors: dict[str, Tensor] = {}
    info: dict[str, Any] = {}
    components = _components(model_or_components)
    family = family_of(components)
    prefixes = family.kohya_prefixes
    for comp, model in components.items():
        if adapter_name not in hra_adapters(model):
            continue
        if format == "kohya" and comp not in prefixes:
            raise ValueError(
                f"{family.title} has no kohya LoRA keys for {comp!r} (they exist for {sorted(prefixes) or 'none'}); "
                "export format 'diffusers' instead"
            )
        for path_in_model, (down, up) in lora_pairs(model, adapter_name).items():
            module_path = _lora_path(model, path_in_model)
            if format == "diffusers":
                tensors[f"{comp}.{module_path}.lora_A.weight"] = down
                tensors[f"{comp}.{module_path}.lora_B.weight"] = up
            else:
                name = f"{prefixes[comp]}_{module_path.replace('.', '_')}"
                tensors[f"{name}.lora_down.weight"] = down
                tensors[f"{name}.lora_up.weight"] = up
                tensors[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        info[comp] = {
            "config": json.loads(hra_adapters(model)[adapter_name].to_json()),
            "strength": _strength(model, adapter_name),
            "base_sha256": _base_digest(model, adapter_name),
        }
    if not info:
        raise ValueError(f"no HRA adapter named {adapter_name!r} to export")
    metadata = {
        "format": "pt",
        "hra_source": json.dumps({"adapter_name": adapter_name, "components": info}, sort_keys=True),
        "hra_base_sha256": json.dumps({comp: part["base_sha256"] for comp, part in info.items()}, sort_keys=True),
        "hra_note": LORA_NOTE,
    }
    return atomic_write(lora_file(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def _merged_copy(model: nn.Module, adapter_name: str | None) -> nn.Module:
    """A plain copy of ``model`` with the active adapters (or just ``adapter_name``) folded in; ``model`` untouched."""
    merged = copy.deepcopy(model)
    unmerge_hra(merged)
    if adapter_name is not None:  # a component without it (say the text encoder) is saved as its base
        names = [adapter_name] if adapter_name in hra_adapters(merged) else []
        set_active_adapters(merged, names, [_strength(merged, name) for name in names])
    return remove_hra(merged, merge=True)


def export_merged(
    pipe_or_model: DiffusionPipeline | nn.Module, out: str | os.PathLike, adapter_name: str | None = None
) -> Path:
    """Save a standalone checkpoint with the active adapters (or only ``adapter_name``) merged in; returns the folder.

    A pipeline gives a diffusers pipeline folder (``DiffusionPipeline.from_pretrained(out)``), a bare denoiser a
    model folder; both also get ``<denoiser>.safetensors`` (unet or transformer), the merged denoiser's state dict in
    one file. Components with adapters are deep-copied before merging, so the caller's models (and their dtypes) stay
    as they are.
    """
    is_model = isinstance(pipe_or_model, nn.Module)
    denoiser = family_of(pipe_or_model).denoiser
    components = {denoiser: pipe_or_model} if is_model else dict(pipe_or_model.components)
    adapted = {name: m for name, m in components.items() if isinstance(m, nn.Module) and any(hra_layers(m))}
    if not adapted:
        raise ValueError("nothing to merge: no component has HRA adapters")
    if adapter_name is not None and not any(adapter_name in hra_adapters(m) for m in adapted.values()):
        raise ValueError(f"no HRA adapter named {adapter_name!r} to merge")
    merged = {name: _merged_copy(model, adapter_name) for name, model in adapted.items()}

    def write(tmp: Path) -> None:
        if is_model:
            merged[denoiser].save_pretrained(tmp, safe_serialization=True)
        else:
            target = copy.copy(pipe_or_model)  # shallow: shares the untouched components, config dict is reassigned
            for name, model in merged.items():
                setattr(target, name, model)
            target.save_pretrained(tmp, safe_serialization=True)
        weights = merged.get(denoiser, components[denoiser]).state_dict()
        state = {key: value.detach().cpu().contiguous() for key, value in weights.items()}
        save_file(state, str(tmp / f"{denoiser}.safetensors"), metadata={"format": "pt"})

    return atomic_folder(out, write)
