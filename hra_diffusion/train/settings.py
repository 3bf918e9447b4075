"""Training settings, declared once as dataclasses: the command-line flags, the JSON job requests and the checks all
come from the fields.

A field's ``metadata`` holds its help text, its flag group and, where it has one, its range or choices; :func:`parse`
turns a settings class into an argparse parser, and :func:`read_request` / :func:`write_request` into a JSON file
that ``--config FILE`` reads back (flags given on the command line still win). Checks run in ``__post_init__``, so a
settings object that exists is valid, whoever made it (a command line, the app, the benchmark runner).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
import sys
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

from ..baselines import ADAPTER_KINDS, BaselineConfig
from ..cli import HelpFormatter
from ..config import DEFAULT_TARGETS, GS_FORMS, HRAConfig
from ..families.objectives import WEIGHTING_SCHEMES, FlowOptions
from ..io import atomic_write
from .errors import TrainingError

MAX_RESOLUTION = 8192
MAX_SEED = 2**32 - 1  # what torch, numpy and accelerate's samplers accept
DEFAULT_STEPS = 500
LR_SCHEDULERS = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
SECRET_FIELDS = ("hub_token",)  # never written to a request, a settings file or a tracker
ATTEMPT_FIELDS = ("progress_file", "resume_from_checkpoint")  # per attempt of a job, not part of its request

S = TypeVar("S", bound="TrainSettings")


class SettingsError(TrainingError, ValueError):
    """A setting out of its range, or a request file that does not describe these settings."""


def inherit(name: str, default: Any) -> Any:
    """A trainer's own default for a shared setting (its help and range stay the shared ones)."""
    return field(default=default, metadata=TrainSettings.__dataclass_fields__[name].metadata)


def option(
    default: Any = MISSING,
    *,
    help: str,
    group: str,
    choices: Sequence[Any] | None = None,
    range: tuple[float, float] | None = None,
    metavar: str | None = None,
) -> Any:
    """A settings field with what its flag needs; no ``default`` makes it required (from a flag or ``--config``)."""
    meta = {"help": help, "group": group, "choices": choices, "range": range, "metavar": metavar}
    return field(default=default, metadata=meta)


@dataclass(kw_only=True)
class TrainSettings:
    """What every trainer shares, named as in diffusers' training scripts."""

    config: str | None = option(None, group="request", help="JSON request file with any of these settings; flags "
                                "given as well override it (the app and the benchmark runner write one per job)")

    pretrained_model_name_or_path: str = option(group="base model", help="hub id or local diffusers folder")
    revision: str | None = option(None, group="base model", help="hub revision of the base model")
    variant: str | None = option(None, group="base model", help="weights variant of the base model, e.g. fp16")
    resolution: int | None = option(None, group="base model",
                                    help="training size, a multiple of 8: shorter side resized, then cropped "
                                    "(default: the model's own size, 512 for SD1.5, 1024 for SDXL, 64 for the demo "
                                    "world)")

    hra_r: int = option(8, group="HRA adapter", range=(1, 4096),
                        help="reflections per layer (even: starts exactly at the base)")
    hra_apply_GS: bool = option(False, group="HRA adapter", help="strictly orthogonal reflection planes")
    hra_gs_form: str = option("identity_start", group="HRA adapter", choices=GS_FORMS,
                              help="the strictly orthogonal operator (with --hra_apply_GS): identity_start = "
                              "(I - 2QQ^T)(I - 2Q0Q0^T), starts at the base model, update of rank up to 2r; paper = "
                              "I - 2QQ^T, the paper's lambda = infinity (Table 4) and peft's apply_GS, rank r, "
                              "starts away from the base model")
    hra_lambda: float = option(0.0, group="HRA adapter", range=(0.0, 1e6),
                               help="weight of the orthogonality regularizer")
    hra_target_modules: str | None = option(None, group="HRA adapter",
                                            help="comma-separated module-name suffixes, or one regex matched in full "
                                            "against module paths (default: the model family's: to_q,to_k,to_v,"
                                            "to_out.0 for SD/SDXL UNets; SD3 and FLUX add the text stream's "
                                            "add_q_proj,add_k_proj,add_v_proj,to_add_out)")

    weighting_scheme: str | None = option(None, group="flow matching (SD3, FLUX)", choices=WEIGHTING_SCHEMES,
                                          help="timestep density and loss weighting, as diffusers' SD3/FLUX scripts "
                                          "(default: the family's: logit_normal for SD3, none for FLUX)")
    logit_mean: float = option(0.0, group="flow matching (SD3, FLUX)", range=(-10.0, 10.0),
                               help="mean of the logit_normal density")
    logit_std: float = option(1.0, group="flow matching (SD3, FLUX)", range=(1e-3, 10.0),
                              help="standard deviation of the logit_normal density")
    mode_scale: float = option(1.29, group="flow matching (SD3, FLUX)", range=(-10.0, 10.0),
                               help="scale of the mode density")

    adapter: str = option("hra", group="adapter", choices=ADAPTER_KINDS,
                          help="hra (ours), or a baseline from peft trained by the same loop on the same layers: lora "
                          "(set up as diffusers' DreamBooth-LoRA script) or oft")
    rank: int = option(4, group="baselines (--adapter lora / oft)", range=(1, 4096), help="LoRA rank")
    lora_alpha: int | None = option(None, group="baselines (--adapter lora / oft)", range=(1, 1 << 20),
                                    help="LoRA alpha (default: the rank, as diffusers' script)")
    lora_dropout: float = option(0.0, group="baselines (--adapter lora / oft)", range=(0.0, 1.0),
                                 help="LoRA dropout")
    oft_block_size: int = option(32, group="baselines (--adapter lora / oft)", range=(1, 1 << 16),
                                 help="OFT block size (peft's oft_block_size); it must divide every adapted layer")
    oft_coft: bool = option(False, group="baselines (--adapter lora / oft)", help="constrained OFT (peft's coft)")
    oft_eps: float = option(6e-5, group="baselines (--adapter lora / oft)", range=(0.0, 1e6),
                            help="COFT's constraint radius (peft's eps)")

    seed: int | None = option(None, group="optimization", range=(0, MAX_SEED),
                              help="seed for full determinism (random and logged if unset)")
    train_batch_size: int = option(1, group="optimization", range=(1, 1 << 20), help="batch size per device")
    max_train_steps: int | None = option(None, group="optimization", range=(1, 1 << 40),
                                         help=f"optimizer steps (default {DEFAULT_STEPS}, or --num_train_epochs "
                                         "worth)")
    num_train_epochs: int | None = option(None, group="optimization", range=(1, 1 << 40),
                                          help="epochs, used when --max_train_steps is unset")
    gradient_accumulation_steps: int = option(1, group="optimization", range=(1, 1 << 20),
                                              help="micro-batches per optimizer step")
    gradient_checkpointing: bool = option(False, group="optimization",
                                          help="trade compute for activation memory")
    learning_rate: float = option(1e-4, group="optimization", help="peak learning rate")
    scale_lr: bool = option(False, group="optimization",
                            help="multiply lr by batch size x accumulation x processes")
    lr_scheduler: str = option("constant", group="optimization", choices=LR_SCHEDULERS, help="learning-rate schedule")
    lr_warmup_steps: int = option(0, group="optimization", range=(0, 1 << 40), help="linear warm-up steps")
    lr_num_cycles: int = option(1, group="optimization", range=(1, 1 << 20), help="restarts of cosine_with_restarts")
    lr_power: float = option(1.0, group="optimization", range=(0.0, 1e3), help="power of the polynomial schedule")
    use_8bit_adam: bool = option(False, group="optimization", help="bitsandbytes' AdamW8bit")
    adam_beta1: float = option(0.9, group="optimization", range=(0.0, 1.0), help="AdamW beta1")
    adam_beta2: float = option(0.999, group="optimization", range=(0.0, 1.0), help="AdamW beta2")
    adam_weight_decay: float = option(1e-2, group="optimization", range=(0.0, 1e3), help="AdamW weight decay")
    adam_epsilon: float = option(1e-8, group="optimization", range=(0.0, 1.0), help="AdamW epsilon")
    max_grad_norm: float = option(1.0, group="optimization", range=(0.0, 1e12),
                                  help="gradient clipping (0 disables)")
    mixed_precision: str | None = option(None, group="optimization", choices=("no", "fp16", "bf16"),
                                         help="dtype of the frozen weights and autocast; adapters stay fp32 "
                                         "(default: accelerate config)")
    allow_tf32: bool = option(False, group="optimization", help="TF32 matmuls on Ampere+ GPUs")
    enable_xformers_memory_efficient_attention: bool = option(
        False, group="optimization",
        help="xformers attention (needs the xformers package; torch's SDPA, the default, is about as fast)")
    dataloader_num_workers: int = option(0, group="optimization", range=(0, 1024), help="data loading processes")

    output_dir: str = option(group="output and checkpoints", help="where the adapter, checkpoints and logs go")
    checkpointing_steps: int = option(500, group="output and checkpoints", range=(1, 1 << 40),
                                      help="save a resumable checkpoint every N steps")
    checkpoints_total_limit: int | None = option(None, group="output and checkpoints", range=(1, 1 << 20),
                                                 help="keep only the newest N checkpoints")
    resume_from_checkpoint: str | None = option(None, group="output and checkpoints",
                                                help='a checkpoint folder, or "latest"')

    validation_prompt: str | None = option(None, group="validation", help="prompt of the sample images")
    num_validation_images: int = option(4, group="validation", range=(0, 1024), help="0 disables samples")
    validation_steps: int | None = option(100, group="validation", range=(1, 1 << 40),
                                          help="sample every N steps (and at the end)")
    validation_epochs: int | None = option(None, group="validation", range=(1, 1 << 40),
                                           help="sample every N epochs instead")
    num_validation_inference_steps: int = option(25, group="validation", range=(1, 1000),
                                                 help="sampling steps of each sample image")

    report_to: str = option("tensorboard", group="logging", choices=("tensorboard", "wandb", "all", "none"),
                            help="experiment tracker")
    logging_dir: str = option("logs", group="logging", help="tracker folder, relative to --output_dir")
    progress_file: str | None = option(None, group="logging",
                                       help="append JSON-lines progress events here (for UIs)")

    push_to_hub: bool = option(False, group="hugging face hub",
                               help="upload the finished run (adapter, card, samples)")
    hub_model_id: str | None = option(None, group="hugging face hub",
                                      help="repo to push to (default: the --output_dir folder name)")
    hub_token: str | None = option(None, group="hugging face hub",
                                   help="token (prefer `hf auth login`: flags end up in shell history)")

    tracker_project_name: typing.ClassVar[str] = "hra-studio"

    def __post_init__(self) -> None:
        for f in fields(self):
            _check_field(f, getattr(self, f.name))
        if self.resolution is not None and not (0 < self.resolution <= MAX_RESOLUTION and self.resolution % 8 == 0):
            raise SettingsError(f"--resolution must be a positive multiple of 8, got {self.resolution} "
                                f"(at most {MAX_RESOLUTION})")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise SettingsError(f"--learning_rate must be > 0, got {self.learning_rate}")
        self.hra_config()  # HRA's own rules (for example r against the strictly orthogonal form)

    # -- derived values ---------------------------------------------------------------------------------------------

    @property
    def output_path(self) -> Path:
        return Path(self.output_dir).absolute()

    def target_modules(self) -> tuple[str, ...] | str:
        """--hra_target_modules: a regex if it has regex syntax beyond dots, else a comma list of suffixes."""
        spec = self.hra_target_modules
        if spec is None:  # filled in from the model's family once it is loaded (checks before that see the default)
            return DEFAULT_TARGETS
        if re.search(r"[*+?|()\[\]^$\\{}]", spec):
            try:
                re.compile(spec)
            except re.error as err:
                raise SettingsError(f"--hra_target_modules {spec!r} is not a valid regex: {err}") from err
            return spec
        names = tuple(s.strip() for s in spec.split(",") if s.strip())
        if not names:
            raise SettingsError("--hra_target_modules is empty")
        return names

    def flow_options(self) -> FlowOptions | None:
        """The flow-matching options asked for, or None for the family's defaults."""
        if self.weighting_scheme is None:
            return None
        return FlowOptions(self.weighting_scheme, self.logit_mean, self.logit_std, self.mode_scale)

    def adapter_config(self, targets: tuple[str, ...] | str | None = None) -> HRAConfig | BaselineConfig:
        """The adapter --adapter asks for, on --hra_target_modules (or ``targets``: the text encoder's)."""
        if self.adapter == "hra":
            return self.hra_config(targets)
        return BaselineConfig(self.adapter, targets or self.target_modules(), rank=self.rank,
                              lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                              oft_block_size=self.oft_block_size, oft_coft=self.oft_coft, oft_eps=self.oft_eps)

    def hra_config(self, targets: tuple[str, ...] | str | None = None) -> HRAConfig:
        """The adapter the --hra_* flags ask for; ``targets`` replaces --hra_target_modules (the text encoder's).

        --hra_gs_form paper asks for an operator that is never the identity, so it accepts the non-identity start.
        """
        try:
            return HRAConfig(r=self.hra_r, apply_GS=self.hra_apply_GS, gs_form=self.hra_gs_form,
                             lambda_orth=self.hra_lambda, target_modules=targets or self.target_modules(),
                             init="random" if self.hra_gs_form == "paper" else "identity")
        except ValueError as err:
            raise SettingsError(f"--hra_* flags: {err}") from err

    def adapter_metadata(self, trainer: str, mixed_precision: str, prediction_type: str, **specific: Any) -> dict:
        """What every trainer records in its adapter file's metadata, with the trainer's own ``specific`` fields."""
        return {
            "base_model": self.pretrained_model_name_or_path,
            **specific,
            "adapter": self.adapter,
            "resolution": self.resolution,
            "learning_rate": self.learning_rate,
            "lr_scheduler": self.lr_scheduler,
            "train_batch_size": self.train_batch_size,
            "gradient_accumulation_steps": self.gradient_accumulation_steps,
            "hra_r": self.hra_r,
            "hra_apply_GS": self.hra_apply_GS,
            "hra_gs_form": self.hra_gs_form,
            "hra_lambda": self.hra_lambda,
            "hra_target_modules": self.hra_target_modules,
            "prediction_type": prediction_type,
            "seed": self.seed,
            "mixed_precision": mixed_precision,
            "trainer": f"hra-studio {trainer}",
        }

    # -- requests -----------------------------------------------------------------------------------------------------

    def to_request(self) -> dict[str, Any]:
        """The settings as a JSON-able request: no secrets, no per-attempt fields, no ``config`` pointer."""
        skip = {"config", *SECRET_FIELDS, *ATTEMPT_FIELDS}
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skip}

    @classmethod
    def from_values(cls: type[S], values: Mapping[str, Any], where: str = "the request") -> S:
        """Settings from plain values (a JSON request), every name and type checked against the fields."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise SettingsError(f"{where}: unknown setting(s) {', '.join(unknown)} for {cls.__name__}")
        hints = typing.get_type_hints(cls)
        for name, value in values.items():
            if not _has_type(value, hints[name]):
                raise SettingsError(f"{where}: {name} must be {_type_name(hints[name])}, got {value!r}")
        missing = [f"--{f.name}" for f in fields(cls) if _required(f) and f.name not in values]
        if missing:
            raise SettingsError(f"{where}: missing {', '.join(missing)}")
        return cls(**values)


# --------------------------------------------------------------------------------------------------------------------
# Requests on disk


def write_request(settings: TrainSettings, path: str | Path) -> Path:
    """Write ``settings`` as a JSON request that ``--config`` reads back into equal settings."""
    text = json.dumps(settings.to_request(), indent=1) + "\n"
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_request(path: str | Path) -> dict[str, Any]:
    """The values of a JSON request file (checked against a settings class by :meth:`TrainSettings.from_values`)."""
    try:
        values = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise SettingsError(f"--config {path}: cannot read a JSON request ({err})") from err
    if not isinstance(values, dict):
        raise SettingsError(f"--config {path}: a request is a JSON object of settings, got {type(values).__name__}")
    return values


def trainer_argv(trainer: str, request: str | Path, **overrides: Any) -> list[str]:
    """The command that runs ``trainer`` (a module, or a script's path) on a request file, with per-attempt
    ``overrides`` as flags."""
    run = [trainer] if trainer.endswith(".py") else ["-m", trainer]
    argv = [sys.executable, *run, "--config", str(request)]
    for name, value in overrides.items():
        if value is True:
            argv.append(f"--{name}")
        elif value not in (None, False):
            argv += [f"--{name}", str(value)]
    return argv


# --------------------------------------------------------------------------------------------------------------------
# Command lines


def parse(
    cls: type[S],
    argv: Sequence[str] | None = None,
    *,
    description: str,
    epilog: str | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> S:
    """Settings from a command line: defaults < ``--preset`` < ``--config FILE`` < the flags given."""
    parser = make_parser(cls, description=description, epilog=epilog, presets=presets)
    given = vars(parser.parse_args(argv))
    values: dict[str, Any] = dict((presets or {}).get(given.pop("preset", "quick"), {}))
    try:
        if given.get("config"):
            values.update(read_request(given["config"]))
        values.update(given)
        return cls.from_values(values, where="settings")
    except SettingsError as err:
        parser.error(str(err).removeprefix("settings: "))


def make_parser(
    cls: type[TrainSettings],
    *,
    description: str,
    epilog: str | None = None,
    presets: Mapping[str, Mapping[str, Any]] | None = None,
) -> argparse.ArgumentParser:
    """One flag per field, grouped; defaults stay out of the namespace (SUPPRESS) so :func:`parse` can tell which
    flags were given and let them override a request file and a preset."""
    parser = argparse.ArgumentParser(description=description, epilog=epilog, formatter_class=HelpFormatter,
                                     argument_default=argparse.SUPPRESS)
    groups: dict[str, argparse._ArgumentGroup] = {}
    hints = typing.get_type_hints(cls)
    for f in fields(cls):
        meta = f.metadata
        group = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        kind, _ = _base_type(hints[f.name])
        text = meta["help"] + _default_note(f)
        if kind is bool:
            group.add_argument(f"--{f.name}", action="store_true", help=text)
        elif kind is list:
            group.add_argument(f"--{f.name}", nargs="+", help=text, metavar=meta["metavar"])
        else:
            group.add_argument(f"--{f.name}", type=kind, choices=meta["choices"], help=text, metavar=meta["metavar"])
    if presets:
        names = sorted(presets)
        parser.add_argument("--preset", choices=names, default="quick",
                            help="named sets of defaults that flags and --config still override: "
                            + "; ".join(f"{n}: {_describe(presets[n])}" for n in names))
    return parser


def _default_note(f: dataclasses.Field) -> str:
    if _required(f):
        return " (required, here or in --config)"
    if f.default in (None, False) or "default" in f.metadata["help"]:
        return ""
    return f" (default: {f.default})"


def _describe(preset: Mapping[str, Any]) -> str:
    return ", ".join(f"--{k} {v}" for k, v in preset.items()) or "the defaults"


def _required(f: dataclasses.Field) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


# --------------------------------------------------------------------------------------------------------------------
# Types and ranges


def _base_type(hint: Any) -> tuple[type, bool]:
    """(the flag's type, whether None is allowed) of ``int | None``, ``list[str] | None``, ``bool``, ..."""
    optional = False
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        optional, hint = True, args[0]
    origin = typing.get_origin(hint)
    return (origin or hint), optional


def _has_type(value: Any, hint: Any) -> bool:
    kind, optional = _base_type(hint)
    if value is None:
        return optional
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is list:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)
    return isinstance(value, kind)


def _type_name(hint: Any) -> str:
    kind, optional = _base_type(hint)
    name = "a list of strings" if kind is list else {int: "an integer", float: "a number", bool: "true or false",
                                                     str: "a string"}[kind]
    return f"{name} or null" if optional else name


def _check_field(f: dataclasses.Field, value: Any) -> None:
    low_high, choices = f.metadata.get("range"), f.metadata.get("choices")
    if value is None:
        return
    if choices is not None and value not in choices:
        raise SettingsError(f"--{f.name} must be one of {', '.join(map(str, choices))}, got {value!r}")
    if low_high is not None:
        low, high = low_high
        if isinstance(value, float) and not math.isfinite(value) or not low <= value <= high:
            raise SettingsError(f"--{f.name} must be between {low:g} and {high:g}, got {value}")
