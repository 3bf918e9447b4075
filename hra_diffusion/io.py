"""Adapter files: one safetensors file with the config and a fingerprint of the target layers in its metadata.

Keys are "<component>.<module path>.hra_u" (component: unet, text_encoder, ...), so one file can hold the UNet's
and the text encoder's adapters. Nothing is ever unpickled; files are written to a temp file, then renamed.
``load_hra`` also reads peft HRA folders (adapter_config.json + adapter_model.safetensors), the ecosystem's format.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

from .config import HRAConfig
from .model import (
    add_hra,
    check_adapter_name,
    hra_adapters,
    hra_layers,
    hra_state_dict,
    layer_fingerprint,
    remove_hra,
    set_hra_state_dict,
)

FORMAT = "hra-studio/1"
RESERVED = ("format", "adapters", "fingerprint")
PEFT_CONFIG, PEFT_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
ADAPTER_FILE = "hra_adapter.safetensors"  # what a training run leaves in its output folder
PEFT_PREFIX = "base_model.model."  # what PeftModel.save_pretrained puts before every module path


class AdapterFileError(ValueError):
    """The file cannot be read as an HRA adapter (missing, truncated, corrupt, NaN, not ours)."""


class AdapterMismatchError(ValueError):
    """The adapter was made for layers this model does not have (another base model)."""


def component_name(model: nn.Module) -> str:
    """The name a bare model is stored under: unet, transformer, text_encoder or model."""
    return _class_component(type(model).__name__)


def _class_component(cls: str) -> str:
    if "UNet" in cls:
        return "unet"
    if "Transformer2DModel" in cls:
        return "transformer"
    if "TextModel" in cls:
        return "text_encoder"
    return "model"


def _components(models: nn.Module | Mapping[str, nn.Module]) -> dict[str, nn.Module]:
    return dict(models) if isinstance(models, Mapping) else {component_name(models): models}


def fingerprint_digest(layers: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()


def atomic_write(path: str | os.PathLike, write: Any) -> Path:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file.

    The file gets the mode open() would give it (0666 less the umask): mkstemp and safetensors both make 0600 files,
    which tools running as another user (ComfyUI, a web server) cannot read.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Delete what :func:`atomic_write` and :func:`atomic_folder` leave in ``folder`` when a process is killed
    mid-write (hidden ``.NAME.*.tmp`` files, ``.NAME.tmp-*`` folders); for a folder one writer owns, before it writes.
    Returns what was removed."""
    removed = []
    for path in Path(folder).glob(".*"):
        if re.fullmatch(r"\..+\.tmp(-\w+)?", path.name):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            removed.append(path)
    return removed


def atomic_folder(out_dir: str | os.PathLike, write: Callable[[Path], None], replace: bool = False) -> Path:
    """Fill a temp folder beside ``out_dir`` with ``write(tmp)``, then rename it into place: readers never see half
    a folder. An existing non-empty ``out_dir`` is refused rather than deleted (it may be anything the user owns),
    unless ``replace``: for a folder its writer owns (a checkpoint saved again, a resumed run's result), which is
    then swapped out whole. The folder gets the mode mkdir would give it (mkdtemp makes 0700)."""
    out_dir = Path(out_dir).absolute()
    full = out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir()))
    if full and not replace:
        raise FileExistsError(f"{out_dir} already exists; choose a new folder (or delete it first)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    old = out_dir.with_name(f".{out_dir.name}.tmp-old")  # a name remove_stale_temps clears after a kill
    try:
        write(tmp)
        tmp.chmod(folder_mode())
        if full:
            shutil.rmtree(old, ignore_errors=True)
            os.rename(out_dir, old)
        elif out_dir.is_dir():
            out_dir.rmdir()
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return out_dir


def folder_mode() -> int:
    """0777 less the umask: what mkdir gives a folder, for folders made with mkdtemp (0700)."""
    return 0o777 & ~_umask()


def _umask() -> int:
    """The process umask, read from /proc where there is one: os.umask reads it only by setting it, for a moment in
    which another thread's new files get the temporary mask (so that is 0o077: stricter, never looser)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def save_hra(
    models: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike,
    adapter_name: str = "default",
    metadata: Mapping[str, Any] | None = None,
    extra_tensors: Mapping[str, Tensor] | None = None,
) -> Path:
    """Write adapter ``adapter_name`` of a model (or of {"unet": unet, "text_encoder": te}) to one file.

    ``metadata`` (base model, instance prompt, steps, ...) is stored alongside; non-string values as JSON.
    ``extra_tensors`` (e.g. a control encoder's "control_encoder.*" weights) are stored under their own keys, which
    must not start with a component name; load_hra ignores them, read_extra_tensors returns them.
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
    for key, value in (extra_tensors or {}).items():
        if key.split(".", 1)[0] in adapters:
            raise ValueError(f"extra tensor {key!r} would be read as part of the {key.split('.', 1)[0]} adapter")
        value = value.detach().to("cpu")
        tensors[key] = (value.float() if value.is_floating_point() else value).contiguous()
    for key, value in tensors.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} holds NaN or inf values: training diverged; save an earlier checkpoint instead")
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items() if k not in RESERVED}
    meta.update(format=FORMAT, adapters=json.dumps(adapters, sort_keys=True), fingerprint=fingerprint_digest(adapters))
    meta.setdefault("adapter_name", adapter_name)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_hra_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """The file's metadata with "adapters" parsed and checked; cheap (reads the header only). Raises AdapterFileError.

    Checked down to every type, so nothing after it trips over a hand-edited or hostile file with a bare KeyError.
    """
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
    try:
        meta["adapters"] = _parse_parts(meta.get("adapters"))
        check_adapter_name(meta.get("adapter_name", "default"))
    except (ValueError, RecursionError) as err:  # RecursionError: JSON nested too deep
        raise AdapterFileError(
            f"{path} has damaged HRA Studio metadata: {err}. Export or download the adapter again."
        ) from err
    meta["tensor_keys"] = keys
    return meta


def _parse_parts(text: str | None) -> dict[str, dict[str, Any]]:
    """The "adapters" metadata: {component: {"config": HRAConfig fields, "layers": {path: [d_out, d_in]}}}.

    d_out may be None (peft folders record only d_in). Raises ValueError saying what is malformed.
    """
    if text is None:
        raise ValueError("no 'adapters' entry")
    parts = json.loads(text)
    if not isinstance(parts, dict) or not parts:
        raise ValueError(f"'adapters' must be a non-empty JSON object, got {type(parts).__name__} {text[:60]!r}")
    for comp, part in parts.items():
        if not (isinstance(part, dict) and all(isinstance(part.get(key), dict) for key in ("config", "layers"))):
            raise ValueError(f"part {comp!r} must be an object holding a 'config' object and a 'layers' object")
        if not part["layers"]:
            raise ValueError(f"part {comp!r} names no layers")
        try:
            HRAConfig.from_json(json.dumps(part["config"]))
        except ValueError as err:
            raise ValueError(f"part {comp!r} has an invalid config ({err})") from err
        for layer, shape in part["layers"].items():
            if not (isinstance(shape, list) and len(shape) == 2 and (shape[0] is None or _is_size(shape[0]))
                    and _is_size(shape[1])):
                raise ValueError(f"layer {layer!r} of part {comp!r} has shape {shape!r}, not [out, in] (positive ints)")
    return parts


def _is_size(value: Any) -> bool:
    return type(value) is int and value > 0


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


def check_fits(model: nn.Module, layers: Mapping[str, list[int | None]], what: str = "adapter") -> None:
    """Raise AdapterMismatchError naming every stored layer the model lacks or has in another shape.

    A stored d_out of None means any (peft files only record d_in, all that H depends on).
    """
    modules = dict(model.named_modules())
    wrapped = {path: layer for path, layer in hra_layers(model)}
    problems = []
    for path, shape in layers.items():
        module = wrapped.get(path, modules.get(path))
        if module is None or path.rpartition(".")[0] in wrapped:  # a frozen layer inside an HRA layer is no target
            problems.append(f"{path}: no such layer")
            continue
        base = module.base_layer if path in wrapped else module
        if not isinstance(base, (nn.Linear, nn.Conv2d)):
            problems.append(f"{path}: is a {type(base).__name__}, not Linear/Conv2d")
            continue
        actual = [base.weight.shape[0], base.weight[0].numel()]
        if any(want is not None and want != have for want, have in zip(shape, actual)):
            stored = "(" + ", ".join("any" if n is None else str(n) for n in shape) + ")"
            problems.append(f"{path}: stored (out, in) {stored}, model has {tuple(actual)}")
    if problems:
        shown = "\n  ".join(problems[:12]) + (f"\n  ... and {len(problems) - 12} more" if len(problems) > 12 else "")
        raise AdapterMismatchError(
            f"this {what} was made for a different model ({len(problems)} of {len(layers)} layers differ from "
            f"{type(model).__name__}):\n  {shown}\nLoad it into the base model it was trained on."
        )


def _read_peft_folder(path: Path) -> tuple[dict[str, Any], str, Callable[[str], dict[str, Tensor]]]:
    """A peft HRA folder as (stored parts, adapter name, part reader), the shape load_hra takes from our files.

    Target paths and r come from the tensors; the part is named from peft's auto_mapping (else: text_encoder when
    every path is in text_model, unet otherwise). Odd r gets init="random" (peft's own fallback; the values are
    overwritten anyway); apply_GS=True is our gs_form="paper", the same operator.
    """
    try:
        peft_config = json.loads((path / PEFT_CONFIG).read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise AdapterFileError(f"{path}: no readable {PEFT_CONFIG} ({err}); not a peft adapter folder") from err
    if not isinstance(peft_config, dict):
        raise AdapterFileError(f"{path}: {PEFT_CONFIG} is not a JSON object; not a peft adapter folder")
    peft_type = peft_config.get("peft_type")
    if peft_type != "HRA":
        raise AdapterFileError(
            f"{path} is a peft {peft_type} adapter, not HRA. LoRA folders load with diffusers' load_lora_weights."
        )
    weights = path / PEFT_WEIGHTS
    if not weights.is_file():
        raise AdapterFileError(
            f"{path}: no {PEFT_WEIGHTS}. Pickled adapter_model.bin files are never loaded (they can run code); "
            "re-save the adapter with safetensors (save_pretrained(..., safe_serialization=True))."
        )
    try:
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as err:  # safetensors raises its own error types for every way a header can be broken
        raise AdapterFileError(f"{weights} is not a readable safetensors file (truncated or corrupt: {err})") from err
    other = [k for k in keys if not k.endswith(".hra_u")]
    if other:
        raise AdapterFileError(
            f"{path} holds tensors other than HRA vectors ({other[:4]}...): peft bias or modules_to_save "
            "training is not supported; retrain with bias='none' and no modules_to_save."
        )
    r = peft_config.get("r")
    if not _is_size(r):
        raise AdapterFileError(f"{path}: {PEFT_CONFIG} has r={r!r}, not a positive integer; the folder is damaged")
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in _read_tensors(weights, keys).items()}
    bad = {k: tuple(v.shape) for k, v in tensors.items() if v.ndim != 2 or v.shape[1] != r}
    if bad or not tensors:
        raise AdapterFileError(f"{path}: HRA vectors must be (d_in, r={r}); found {bad or 'none'}")
    paths = [k.removesuffix(".hra_u") for k in tensors]
    mapping = peft_config.get("auto_mapping")
    cls = mapping.get("base_model_class") if isinstance(mapping, dict) else None
    if isinstance(cls, str) and cls:
        comp = _class_component(cls)
    else:
        comp = "text_encoder" if all(p.startswith("text_model.") for p in paths) else "unet"
    if peft_config.get("apply_GS"):  # peft's I - 2QQ^T is exactly our gs_form="paper", which starts off the identity
        config = HRAConfig(r=r, target_modules=tuple(paths), apply_GS=True, gs_form="paper", init="random")
    else:
        config = HRAConfig(r=r, target_modules=tuple(paths), init="random" if r % 2 else "identity")
    layers = {p: [None, tensors[f"{p}.hra_u"].shape[0]] for p in paths}
    return {comp: {"config": json.loads(config.to_json()), "layers": layers}}, "default", lambda _comp: tensors


def _open_adapter(path: Path) -> tuple[dict[str, Any], str, Callable[[str], dict[str, Tensor]]]:
    """(stored parts, adapter name, reader of one part's tensors keyed by module path) for a file or a peft folder."""
    if path.is_dir():
        return _read_peft_folder(path)
    meta = read_hra_metadata(path)

    def read_part(comp: str) -> dict[str, Tensor]:
        prefix = f"{comp}."
        keys = [k for k in meta["tensor_keys"] if k.startswith(prefix)]
        return {k[len(prefix):]: v for k, v in _read_tensors(path, keys).items()}

    return meta["adapters"], meta.get("adapter_name", "default"), read_part


def read_extra_tensors(path: str | os.PathLike, prefix: str) -> dict[str, Tensor]:
    """The extra tensors save_hra stored under ``prefix.`` (prefix removed); empty if there are none."""
    if Path(path).is_dir():
        raise AdapterFileError(f"{path} is a folder; extra tensors live only in HRA Studio adapter files")
    return _open_adapter(Path(path))[2](prefix)


def _align_paths(model: nn.Module, layers: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Map stored layer paths onto the model's: transformers 5 dropped CLIPTextModel's ``text_model.`` level, so a
    text-encoder adapter written under either layout loads under the other."""
    names = {name for name, _ in model.named_modules()}
    rename = {}
    for path in layers:
        alt = path[len("text_model."):] if path.startswith("text_model.") else f"text_model.{path}"
        rename[path] = alt if path not in names and alt in names else path
    return {rename[path]: shape for path, shape in layers.items()}, rename


def _renamed(tensors: Mapping[str, Tensor], rename: Mapping[str, str]) -> dict[str, Tensor]:
    out = {}
    for key, value in tensors.items():
        path, _, leaf = key.rpartition(".")
        out[f"{rename.get(path, path)}.{leaf}"] = value
    return out


def load_hra(
    models: nn.Module | Mapping[str, nn.Module],
    path: str | os.PathLike,
    adapter_name: str | None = None,
) -> nn.Module | Mapping[str, nn.Module]:
    """Add the adapter stored in ``path`` (our file, or a peft HRA folder) to a plain model, or to each component
    present in the file.

    The stored config and layer list are authoritative; a model whose layers differ is refused, naming them.
    A bare model takes its own component from the file (a UNet loads "unet" even if the file also has a text
    encoder part). All or nothing: the whole file is checked before the model changes, and a failure while adding
    is undone, so no half-loaded adapter is left for a retry to reuse. Returns what it was given.
    """
    path = Path(path)
    stored, stored_name, read_part = _open_adapter(path)
    name = adapter_name or stored_name
    check_adapter_name(name)
    comps = _components(models)
    if not isinstance(models, Mapping) and len(stored) == 1:
        comps = {next(iter(stored)): models}
    wanted = {comp: model for comp, model in comps.items() if comp in stored}
    if not wanted:
        raise AdapterMismatchError(
            f"{path} holds adapters for {sorted(stored)}, none of which is given ({sorted(comps)})"
        )
    configs, targets, parts = {}, {}, {}
    for comp, model in wanted.items():  # the whole file is checked before anything is allocated or changed
        layers, rename = _align_paths(model, stored[comp]["layers"])
        check_fits(model, layers, what=f"adapter's {comp} part")
        if name in hra_adapters(model):
            raise ValueError(f"{comp} already has an adapter named {name!r}; pass adapter_name= to load it as another")
        configs[comp] = HRAConfig.from_json(json.dumps(stored[comp]["config"]))
        targets[comp] = list(layers)
        parts[comp] = _renamed(read_part(comp), rename)
        _check_part(f"{path} ({comp} part)", configs[comp], layers, parts[comp])
    with _undo_on_error(wanted.values(), name):
        for comp, model in wanted.items():
            add_hra(model, configs[comp], name, targets=targets[comp])
            set_hra_state_dict(model, parts[comp], name)
    return models


def _check_part(
    where: str, config: HRAConfig, layers: Mapping[str, list[int | None]], tensors: Mapping[str, Tensor]
) -> None:
    """Raise AdapterFileError unless ``tensors`` are exactly the float vectors ``config`` puts on ``layers``.

    ``layers`` must already fit the model (check_fits), so their stored d_in is the model's. r is bounded by the
    layers' width before add_hra sizes its (d_in, r) vectors by it: a 46 KB file claiming r=200000 took 1.2 GB.
    """
    narrowest = min(layers, key=lambda p: layers[p][1])
    if config.r > layers[narrowest][1]:
        raise AdapterFileError(
            f"{where}: its config says r={config.r}, but layer {narrowest} has only {layers[narrowest][1]} inputs and "
            "r can be at most that; the config was damaged or edited. Export the adapter again."
        )
    leaves = ("hra_u", "hra_u0") if config.has_initial_planes else ("hra_u",)
    shapes = {f"{p}.{leaf}": (shape[1], config.r) for p, shape in layers.items() for leaf in leaves}
    missing, unexpected = sorted(set(shapes) - set(tensors)), sorted(set(tensors) - set(shapes))
    if missing or unexpected:
        raise AdapterFileError(
            f"{where}: its tensors do not match its own layer list (missing {missing[:4]}, unexpected "
            f"{unexpected[:4]}, {len(missing) + len(unexpected)} in all); the file is damaged. Export it again."
        )
    for key, value in tensors.items():
        if not value.is_floating_point():
            raise AdapterFileError(
                f"{where}: {key} holds {value.dtype} values, but HRA vectors are floating point; the file is damaged "
                "or was not written by HRA Studio. Export it again."
            )
        if tuple(value.shape) != shapes[key]:
            raise AdapterFileError(
                f"{where}: {key} has shape {tuple(value.shape)}, but r={config.r} on a layer with {shapes[key][0]} "
                f"inputs needs {shapes[key]}; the file is damaged. Export it again."
            )


@contextmanager
def _undo_on_error(models: Iterable[nn.Module], name: str) -> Iterator[None]:
    """On any error in the block, remove adapter ``name`` from ``models`` and restore every requires_grad (add_hra
    freezes them): a load adds everything or nothing, and a retry never finds a half-loaded adapter to reuse."""
    models = list(models)
    trainable = [(param, param.requires_grad) for model in models for param in model.parameters()]
    try:
        yield
    except BaseException:
        for model in models:
            if name in hra_adapters(model):
                remove_hra(model, name)
        for param, flag in trainable:
            param.requires_grad_(flag)
        raise
