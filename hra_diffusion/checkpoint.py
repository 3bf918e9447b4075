"""Training checkpoints as pure data: safetensors for tensors, JSON for the rest, never a pickle.

A pickle runs arbitrary code when it is loaded, and checkpoint folders get copied around, shared and resumed by UIs
with "latest", so resuming must not unpickle anything. A checkpoint is a folder of:

- ``trainable.safetensors``: the adapters (written by the trainer, any tensors it likes);
- ``optimizer.safetensors`` + ``optimizer.json``: per-parameter optimizer tensors keyed by parameter *name* (not
  torch's positional ids, so a changed model is caught instead of silently misassigned), and the param groups'
  hyperparameters (plus the fp16 grad scaler when there is one);
- ``scheduler.json``: the lr schedule's counters and rates (its lambdas are code: rebuilt from the flags);
- ``rng_state.safetensors`` + ``rng_state.json``: every process's torch (CPU, CUDA), python and numpy RNG states;
- ``trainer_state.json``, written last: the manifest, with the format version, the trainer's state (step, seed, ...)
  and every file's size and sha256, so a truncated or altered file is reported as such.

Reading refuses folders that hold pickle files (accelerate's format, or a crafted folder) without opening them, and
turns every other problem into a :class:`CheckpointError` that says what is wrong.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load, save
from torch import Tensor

logger = logging.getLogger(__name__)

FORMAT = "hra-studio-checkpoint"
FORMAT_VERSION = 1
MANIFEST = "trainer_state.json"
WEIGHTS = "trainable.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_STATE = "optimizer.json"
SCHEDULER_STATE = "scheduler.json"
RNG_TENSORS = "rng_state.safetensors"
RNG_STATE = "rng_state.json"
PICKLE_SUFFIXES = frozenset({".pkl", ".pickle", ".bin", ".pt", ".pth", ".ckpt"})
# optimizer state that has its parameter's shape (AdamW; bitsandbytes' 8-bit AdamW), and its scalar step counter
PARAM_SHAPED = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "state1", "state2")
SCALAR = ("step",)


class CheckpointError(Exception):
    """A checkpoint folder that cannot be resumed from; the message says why."""


# --------------------------------------------------------------------------------------------------------------------
# Files


def write_checkpoint(
    folder: Path, state: Mapping[str, Any], tensors: Mapping[str, Mapping[str, Tensor]], documents: Mapping[str, Any]
) -> None:
    """Create ``folder`` with one safetensors file per ``tensors`` entry and one JSON file per ``documents`` entry,
    then the manifest (format version, ``state``, each file's size and sha256) last: a folder with a manifest is
    whole. Write it through ``io.atomic_folder``, so readers never see it half written."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, group in tensors.items():
        cpu = {key: value.detach().to("cpu", copy=True).contiguous() for key, value in group.items()}
        files[name] = _write(folder / name, save(cpu))
    for name, document in documents.items():
        files[name] = _write(folder / name, (json.dumps(document) + "\n").encode())
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, **state, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _write(path: Path, data: bytes) -> dict[str, Any]:
    path.write_bytes(data)
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


class Checkpoint:
    """A checkpoint folder opened for reading: the folder and its manifest are checked at once (no pickle, known
    format, every listed file present with its size), each file's sha256 and contents when it is read."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise CheckpointError("not a folder")
        pickles = sorted(p.name for p in self.folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(
                f"it holds pickle files ({', '.join(pickles[:4])}), which can run arbitrary code when loaded, so they "
                "are never opened. It is an accelerate checkpoint from an older HRA Studio, or not one of this "
                "trainer's; start a new run or resume from a checkpoint written by this version"
            )
        self.manifest = self._read_manifest()
        for name, entry in self.manifest["files"].items():
            path = self.folder / name
            if not path.is_file():
                raise CheckpointError(f"{name} is missing")
            size = path.stat().st_size
            if size != entry["bytes"]:
                raise CheckpointError(
                    f"{name} has {size} bytes, {MANIFEST} says {entry['bytes']}: it is truncated or was changed"
                )

    def _read_manifest(self) -> dict[str, Any]:
        try:
            manifest = json.loads((self.folder / MANIFEST).read_bytes())
        except FileNotFoundError:
            raise CheckpointError(f"no {MANIFEST}: not a checkpoint folder") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{MANIFEST} is not readable JSON ({err})") from err
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise CheckpointError(
                f"{MANIFEST} does not describe an {FORMAT} folder (an older HRA Studio wrote accelerate checkpoints, "
                "which this version does not read); start a new run"
            )
        if manifest.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"it has format version {manifest.get('format_version')!r}, this trainer reads version {FORMAT_VERSION}"
            )
        files = manifest.get("files")
        valid_files = isinstance(files, dict) and all(
            re.fullmatch(r"\w[\w.-]*", name)
            and isinstance(entry, dict)
            and _is_int(entry.get("bytes"))
            and isinstance(entry.get("sha256"), str)
            for name, entry in files.items()
        )
        if not valid_files:
            raise CheckpointError(f"{MANIFEST}: 'files' must map plain file names to their bytes and sha256")
        if not (_is_int(manifest.get("step")) and manifest["step"] >= 0):
            raise CheckpointError(f"{MANIFEST}: 'step' must be an integer >= 0, got {manifest.get('step')!r}")
        if not (manifest.get("seed") is None or _is_int(manifest["seed"])):
            raise CheckpointError(f"{MANIFEST}: 'seed' must be an integer or null, got {manifest['seed']!r}")
        return manifest

    def _read(self, name: str) -> bytes:
        entry = self.manifest["files"].get(name)
        if entry is None:
            raise CheckpointError(f"it has no {name} (not listed in {MANIFEST})")
        try:
            data = (self.folder / name).read_bytes()
        except OSError as err:
            raise CheckpointError(f"cannot read {name} ({err})") from err
        if len(data) != entry["bytes"] or hashlib.sha256(data).hexdigest() != entry["sha256"]:
            raise CheckpointError(f"{name} does not match its sha256 in {MANIFEST}: it is corrupted or was changed")
        return data

    def tensors(self, name: str) -> dict[str, Tensor]:
        """The tensors of the safetensors file ``name``."""
        data = self._read(name)
        try:
            return load(data)
        except (SafetensorError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{name} is not a valid safetensors file ({err})") from err

    def document(self, name: str) -> Any:
        """The parsed JSON file ``name``."""
        data = self._read(name)
        try:
            return json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{name} is not valid JSON ({err})") from err


# --------------------------------------------------------------------------------------------------------------------
# Optimizer


def optimizer_state(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor]
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """``optimizer``'s state as (tensors, JSON): per-parameter entries keyed ``{name}/{key}`` by the names of
    ``params``, the param groups' hyperparameters with their parameters' names."""
    names = {id(p): name for name, p in params.items()}
    saved = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    groups, values = [], {}
    for group, saved_group in zip(optimizer.param_groups, saved["param_groups"]):
        group_names = [names[id(p)] for p in group["params"]]
        groups.append({**{k: v for k, v in saved_group.items() if k != "params"}, "params": group_names})
        for name, index in zip(group_names, saved_group["params"]):
            for key, value in saved["state"].get(index, {}).items():
                if isinstance(value, Tensor):
                    tensors[f"{name}/{key}"] = value
                else:
                    values.setdefault(name, {})[key] = value
    return tensors, {"param_groups": groups, "state": values}


def load_optimizer_state(
    optimizer: torch.optim.Optimizer, params: Mapping[str, Tensor], tensors: Mapping[str, Tensor], document: Any
) -> None:
    """Check, then restore what :func:`optimizer_state` saved (torch moves it to each parameter's device and dtype)."""
    current = optimizer.state_dict()
    names = {id(p): name for name, p in params.items()}
    groups = document.get("param_groups") if isinstance(document, dict) else None
    values = document.get("state") if isinstance(document, dict) else None
    if not isinstance(groups, list) or not isinstance(values, dict) or len(groups) != len(current["param_groups"]):
        raise CheckpointError(f"{OPTIMIZER_STATE} must hold {len(current['param_groups'])} param groups and a state")
    entries: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        name, _, field = key.rpartition("/")
        entries.setdefault(name, {})[field] = tensor
    for name, scalars in values.items():
        if not isinstance(scalars, dict) or not all(_is_number(v) for v in scalars.values()):
            raise CheckpointError(f"{OPTIMIZER_STATE}: the state of {name} must map keys to numbers")
        entries.setdefault(name, {}).update(scalars)

    restored_groups, state = [], {}
    for group, cur, saved in zip(optimizer.param_groups, current["param_groups"], groups):
        group_names = [names[id(p)] for p in group["params"]]
        saved_names = saved.get("params") if isinstance(saved, dict) else None
        listed = isinstance(saved_names, list) and all(isinstance(n, str) for n in saved_names)
        if not listed or sorted(saved_names) != sorted(group_names):
            raise CheckpointError(
                "the optimizer's parameters differ from this run's (another --hra_r, targets or trained models?)"
            )
        if "lr" not in saved:
            raise CheckpointError(f"{OPTIMIZER_STATE}: a param group has no lr")
        hyper = {k: v for k, v in saved.items() if k in cur and k != "params"}
        for key, value in hyper.items():
            if not _same_kind(value, cur[key]):
                raise CheckpointError(f"{OPTIMIZER_STATE}: {key} is {value!r}, this optimizer needs {cur[key]!r}")
        hyper = {k: tuple(v) if isinstance(cur[k], tuple) else v for k, v in hyper.items()}
        restored_groups.append({**cur, **hyper})  # cur["params"]: torch's ids of this run's parameters
        for name, index, param in zip(group_names, cur["params"], group["params"]):
            entry = entries.pop(name, None)
            if entry:
                _check_shapes(name, entry, param)
                state[index] = entry
    if entries:
        raise CheckpointError(f"{OPTIMIZER_TENSORS} has state for unknown parameters, e.g. {sorted(entries)[:3]}")
    optimizer.load_state_dict({"state": state, "param_groups": restored_groups})


def _check_shapes(name: str, entry: Mapping[str, Any], param: Tensor) -> None:
    for key, value in entry.items():
        expected = param.shape if key in PARAM_SHAPED else torch.Size() if key in SCALAR else None
        if expected is not None and isinstance(value, Tensor) and value.shape != expected:
            raise CheckpointError(
                f"{OPTIMIZER_TENSORS}: {name}/{key} has shape {tuple(value.shape)}, this run needs {tuple(expected)}"
            )


# --------------------------------------------------------------------------------------------------------------------
# LR schedule, grad scaler: their state_dict()s minus code


def plain_state(obj: Any) -> dict[str, Any]:
    """``obj.state_dict()`` without what JSON cannot hold: a LambdaLR's ``lr_lambdas`` are code, which the trainer
    rebuilds from its flags."""
    return {k: v for k, v in obj.state_dict().items() if k != "lr_lambdas" and _is_plain(v)}


def load_plain_state(obj: Any, saved: Any, what: str) -> None:
    """Restore :func:`plain_state` into ``obj``. Public entries (``last_epoch``, ``base_lrs``, ``scale``) are
    required; private ones (torch's bookkeeping, which changes between versions) are restored when present."""
    current = plain_state(obj)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{what}: expected a JSON object")
    for key, value in current.items():
        if key in saved and not _same_kind(saved[key], value):
            raise CheckpointError(f"{what}: {key} is {saved[key]!r}, this run needs something like {value!r}")
        if key not in saved and not key.startswith("_"):
            raise CheckpointError(f"{what} has no {key}")
    obj.load_state_dict({**obj.state_dict(), **{k: v for k, v in saved.items() if k in current}})


# --------------------------------------------------------------------------------------------------------------------
# RNG


def rng_state() -> dict[str, Any]:
    """This process's RNG states as plain lists, to gather on the main process, which writes them all."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state().tolist(),
        "cuda": [s.tolist() for s in torch.cuda.get_rng_state_all()] if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": [name, keys.tolist(), int(pos), int(has_gauss), float(cached)],
    }


def rng_files(states: list[dict[str, Any]]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """The gathered :func:`rng_state` of every process as (torch's byte states, python's and numpy's as JSON)."""
    tensors = {}
    for rank, state in enumerate(states):
        tensors[f"rank{rank}.torch"] = torch.tensor(state["torch"], dtype=torch.uint8)
        for device, cuda in enumerate(state["cuda"]):
            tensors[f"rank{rank}.cuda{device}"] = torch.tensor(cuda, dtype=torch.uint8)
    return tensors, {"python": [s["python"] for s in states], "numpy": [s["numpy"] for s in states]}


def load_rng_state(tensors: Mapping[str, Tensor], document: Any, rank: int) -> None:
    """Restore process ``rank``'s RNG states; a process the checkpoint did not have keeps its own (with a warning)."""
    try:
        python, numpy_state = document["python"], document["numpy"]
        cpu = tensors.get(f"rank{rank}.torch")
        if cpu is None or rank >= len(python) or rank >= len(numpy_state):
            logger.warning("the checkpoint has no RNG state for process %d: it keeps its own", rank)
            return
        if cpu.dtype != torch.uint8 or cpu.shape != torch.get_rng_state().shape:
            raise CheckpointError(f"{RNG_TENSORS}: rank{rank}.torch is not a torch RNG state")
        version, internal, gauss = python[rank]
        name, keys, pos, has_gauss, cached = numpy_state[rank]
        random.setstate((version, tuple(internal), gauss))
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    except (KeyError, TypeError, ValueError, OverflowError) as err:
        raise CheckpointError(f"{RNG_STATE} does not hold python and numpy RNG states ({err})") from err
    torch.set_rng_state(cpu)
    if torch.cuda.is_available():
        current = torch.cuda.get_rng_state_all()
        cuda = [tensors.get(f"rank{rank}.cuda{d}") for d in range(len(current))]
        if f"rank{rank}.cuda{len(current)}" in tensors or not all(
            s is not None and s.dtype == torch.uint8 and s.shape == c.shape for s, c in zip(cuda, current)
        ):
            logger.warning("the checkpoint's CUDA RNG states do not fit these %d GPUs: not restored", len(current))
        else:
            torch.cuda.set_rng_state_all(cuda)


# --------------------------------------------------------------------------------------------------------------------
# JSON values


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _same_kind(saved: Any, current: Any) -> bool:
    """Whether a JSON value can stand in for ``current``: its type (any number for a float), same-length lists for
    sequences."""
    if isinstance(current, (list, tuple)):
        return (
            isinstance(saved, list)
            and len(saved) == len(current)
            and all(_same_kind(s, c) for s, c in zip(saved, current))
        )
    if isinstance(current, float):
        return _is_number(saved)
    return type(saved) is type(current)
