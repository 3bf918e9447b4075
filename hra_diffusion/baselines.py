"""The baselines HRA is compared with, LoRA and OFT from peft, set up and saved the way their users expect.

LoRA is configured as diffusers' DreamBooth-LoRA script does it (rank, alpha = rank by default, Gaussian init, the
same target modules as the HRA run) and saved as ``pytorch_lora_weights.safetensors`` in diffusers' keys, which
``pipe.load_lora_weights(folder)`` reads. OFT uses peft's ``OFTConfig`` (block size, COFT) and is saved as a peft
folder per adapted model, which ``PeftModel.from_pretrained(model, folder)`` reads. The trainers train them with the
same loop, data, checkpoints and exact resume as HRA: the loop trains whatever has ``requires_grad``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from safetensors.torch import save_file
from torch import nn

from .config import HRAConfig
from .control import (
    CONTROL_ENCODER_FILE,
    CONTROL_FILE,
    ENCODER_ATTR,
    control_encoder,
    detach_control,
    load_control_encoder,
)
from .io import ADAPTER_FILE, PEFT_CONFIG, PEFT_PREFIX, PEFT_WEIGHTS, atomic_folder, atomic_write
from .model import add_hra

ADAPTER_KINDS = ("hra", "lora", "oft")
LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
OFT_FOLDER = "oft"  # OUTPUT_DIR/oft/<component>/ holds one peft folder per adapted model


def _peft():
    """peft, which only the baselines need (the ``train`` extra), or an error that says how to get it."""
    try:
        import peft
    except ImportError as err:
        raise ImportError("the LoRA and OFT baselines need peft: pip install 'hra-studio[train]'") from err
    return peft


@dataclass(frozen=True)
class BaselineConfig:
    """One baseline adapter: ``kind`` "lora" or "oft", its size, and the layers it adapts (as HRAConfig's)."""

    kind: str
    target_modules: tuple[str, ...] | str
    rank: int = 4
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    oft_block_size: int = 32
    oft_coft: bool = False
    oft_eps: float = 6e-5
    exclude_modules: str | None = None

    def peft_config(self):
        """The peft config; the target names are suffixes, or one regex matched in full (HRA's and peft's rule)."""
        peft = _peft()
        targets = self.target_modules if isinstance(self.target_modules, str) else list(self.target_modules)
        if self.kind == "lora":
            return peft.LoraConfig(r=self.rank, lora_alpha=self.lora_alpha or self.rank, lora_dropout=self.lora_dropout,
                              init_lora_weights="gaussian", target_modules=targets,
                              exclude_modules=self.exclude_modules)
        if self.kind == "oft":
            return peft.OFTConfig(oft_block_size=self.oft_block_size, coft=self.oft_coft, eps=self.oft_eps,
                                  target_modules=targets, exclude_modules=self.exclude_modules)
        raise ValueError(f"unknown baseline {self.kind!r}; choose from {ADAPTER_KINDS[1:]}")


def add_baseline(model: nn.Module, config: BaselineConfig) -> None:
    """Put the baseline adapter on a model (peft's own injection, as diffusers' and transformers' ``add_adapter`` do;
    called directly, it does not depend on their peft version checks). Identity at the start, like HRA."""
    try:
        _peft().inject_adapter_in_model(config.peft_config(), model)
    except ValueError as err:  # peft: no target module found, a size that does not divide a layer, ...
        raise ValueError(f"{config.kind}: {err}") from err


def peft_state(model: nn.Module) -> dict:
    return _peft().utils.get_peft_model_state_dict(model)


def save_lora(pipeline_class: type, models: Mapping[str, nn.Module], out_dir: str | os.PathLike) -> Path:
    """``OUT/pytorch_lora_weights.safetensors`` in diffusers' keys (with the configs, so alpha survives), written
    atomically by diffusers' own writer into the temp file."""
    from diffusers.utils import convert_state_dict_to_diffusers

    layers = {f"{comp}_lora_layers": convert_state_dict_to_diffusers(peft_state(model)) for comp, model in
              models.items()}
    metadata = {f"{comp}_lora_adapter_metadata": model.peft_config["default"].to_dict() for comp, model in
                models.items()}

    def write(tmp: str) -> None:
        pipeline_class.save_lora_weights(Path(tmp).parent, **layers, **metadata, weight_name=Path(tmp).name)

    return atomic_write(Path(out_dir) / LORA_WEIGHT_NAME, write)


def save_oft(models: Mapping[str, nn.Module], out_dir: str | os.PathLike, base_model: str) -> Path:
    """``OUT/oft/<component>/`` peft folders (adapter_config.json + adapter_model.safetensors); a resumed run's save
    replaces the folder whole."""

    def write(tmp: Path) -> None:
        for comp, model in models.items():
            folder = tmp / comp
            folder.mkdir(parents=True)
            config = {**model.peft_config["default"].to_dict(), "base_model_name_or_path": base_model}
            for key, value in config.items():
                if isinstance(value, set):  # peft keeps target names as a set; JSON needs a list
                    config[key] = sorted(value)
            (folder / PEFT_CONFIG).write_text(json.dumps(config, indent=1), encoding="utf-8")
            tensors = {PEFT_PREFIX + k: v.detach().to("cpu").contiguous() for k, v in peft_state(model).items()}
            save_file(tensors, folder / PEFT_WEIGHTS, metadata={"format": "pt"})

    return atomic_folder(Path(out_dir) / OFT_FOLDER, write, replace=True)


def add_adapter(model: nn.Module, config: HRAConfig | BaselineConfig) -> None:
    """HRA or a baseline on ``model``, whichever ``config`` describes."""
    if isinstance(config, HRAConfig):
        add_hra(model, config)
    else:
        add_baseline(model, config)


def adapter_saver(kind: str, pipeline_class: type, base_model: str) -> Callable | None:
    """The trainers' ``TrainSpec.save_adapter`` for a baseline ``kind`` (None for HRA: the loop's own file)."""
    if kind == "lora":
        return lambda models, path, meta: save_lora(pipeline_class, models, path.parent)
    if kind == "oft":
        return lambda models, path, meta: save_oft(models, path.parent, base_model)
    return None


# --------------------------------------------------------------------------------------------------------------------
# Trained results, for evaluation: find them in a trainer's output folder, put them on a pipeline, take them off.
# A control run leaves the same files plus its hint encoder: inside the HRA file (control.CONTROL_FILE), or beside
# the LoRA file / OFT folder (control.CONTROL_ENCODER_FILE).


def find_trained(output_dir: str | os.PathLike) -> Path | None:
    """What a trainer wrote in ``output_dir``: the HRA file (DreamBooth or control), the LoRA file or the OFT folder
    (None: nothing yet)."""
    out = Path(output_dir)
    candidates = (out / ADAPTER_FILE, out / CONTROL_FILE, out / LORA_WEIGHT_NAME, out / OFT_FOLDER)
    return next((path for path in candidates if path.exists()), None)


def trained_kind(path: Path) -> str:
    """"hra", "lora" or "oft", from what :func:`find_trained` (or a user) names: an HRA file is any other file."""
    return "lora" if path.name == LORA_WEIGHT_NAME else "oft" if path.is_dir() else "hra"


def encoder_beside(path: Path) -> Path | None:
    """The hint encoder file a LoRA/OFT control run wrote beside ``path`` (None: not a baseline control run)."""
    encoder = path.parent / CONTROL_ENCODER_FILE
    return encoder if trained_kind(path) != "hra" and encoder.is_file() else None


def trained_parameters(path: Path) -> int:
    """Numbers trained in a saved result, a control run's hint encoder included (HRA: the vectors, not the frozen
    start vectors of GS adapters)."""
    from safetensors import safe_open

    kind = trained_kind(path)
    files = [path] if kind in ("hra", "lora") else sorted(path.glob(f"*/{PEFT_WEIGHTS}"))
    encoder = encoder_beside(path)
    total = 0
    for file in [*files, *([encoder] if encoder else [])]:
        with safe_open(str(file), framework="pt") as handle:
            keys = [key for key in handle.keys()
                    if kind != "hra" or key.endswith(".hra_u") or key.startswith(f"{ENCODER_ATTR}.")]
            total += sum(math.prod(handle.get_slice(key).get_shape()) for key in keys)
    return total


def attach_trained(pipe, path: Path, name: str) -> None:
    """Make ``pipe`` draw with one trained result, through each kind's own loader: ours, diffusers'
    ``load_lora_weights``, peft's config and weight loaders for OFT; a control run's hint encoder too, so that
    ``generate(pipe, ..., control_image=...)`` follows conditions. Call :func:`detach_trained` first."""
    from .pipelines import pipeline_components

    kind = trained_kind(path)
    if kind == "hra":
        from .pipelines import attach_adapters

        attach_adapters(pipe, [path], names=[name])
    elif kind == "lora":
        pipe.load_lora_weights(str(path.parent), weight_name=path.name, adapter_name=name)
    else:
        peft = _peft()

        components = pipeline_components(pipe)
        for folder in sorted(p for p in path.iterdir() if p.is_dir()):
            model = components[folder.name]
            peft.inject_adapter_in_model(peft.PeftConfig.from_pretrained(str(folder)), model)
            weights = peft.utils.load_peft_weights(str(folder), device=str(model.device))
            peft.set_peft_model_state_dict(model, {k.removeprefix(PEFT_PREFIX): v for k, v in weights.items()})
    encoder = encoder_beside(path)
    if encoder is not None:
        from .families import denoiser_of

        load_control_encoder(denoiser_of(pipe), encoder)


def detach_trained(pipe) -> None:
    """Take every adapter of any kind off ``pipe``'s models, hint encoders included: the base model again."""
    from .model import remove_hra
    from .pipelines import pipeline_components

    if getattr(pipe, "get_list_adapters", None) and any(pipe.get_list_adapters().values()):
        pipe.unload_lora_weights()
    tuner_layer = _peft().tuners.tuners_utils.BaseTunerLayer
    for model in pipeline_components(pipe).values():
        if control_encoder(model) is not None:
            detach_control(model)
        remove_hra(model)
        for path, module in list(model.named_modules()):
            if isinstance(module, tuner_layer):
                parent, _, child = path.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(model):  # set on the instance by the injection (diffusers also has a class default)
                delattr(model, attr)
