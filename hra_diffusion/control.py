"""Controllable generation the HRA paper's way: a small hint encoder added to the UNet's ``conv_in`` output.

Trainable weights are the HRA adapter on the UNet plus :class:`ConditionEncoder` (about 2M parameters on SD1.5,
against ControlNet's 361M). The encoder is registered on the UNet as ``unet.control_encoder`` so that ``.to()``,
dtype casts, CPU offload and DDP treat it as part of the UNet, and its output joins through a forward hook on
``unet.conv_in``: the module tree and the adapted layers stay untouched (peft, ``ControlNetModel.from_unet``, HRA
targets), and the hook runs outside diffusers' gradient-checkpointed blocks, so it is never recomputed.

Typical use::

    add_hra(unet, HRAConfig(r=8, target_modules=CONTROL_TARGETS))   # first: add_hra freezes every UNet parameter
    encoder = ConditionEncoder.for_unet(unet, vae_scale_factor=8)
    attach_control(unet, encoder)
    with control_condition(unet, batch["conditioning_pixel_values"]):
        noise_pred = unet(noisy_latents, timesteps, text_embeddings).sample
    save_control_adapter(unet, encoder, "canny.safetensors")

LoRA and OFT control adapters (the baselines, hra_diffusion.baselines) are trained the same way; their UNet part is
saved in its own format and the encoder beside it by :func:`save_control_encoder`.
"""

from __future__ import annotations

import functools
import json
import math
import os
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.hooks import RemovableHandle

from .images import to_tensor
from .io import AdapterFileError, atomic_write, load_hra, read_extra_tensors, read_hra_metadata, save_hra

PAPER_CHANNELS = (16, 32, 96, 256)
CONTROL_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj")
CONTROL_KIND = "control"
ENCODER_ATTR = "control_encoder"  # submodule name on the UNet, and key prefix / metadata key in adapter files
CONTROL_FILE = "hra_control.safetensors"  # what the control trainer writes for HRA: adapter and encoder in one file
# what it writes beside a LoRA file or OFT folder, which have no room for the encoder (see save_control_encoder)
CONTROL_ENCODER_FILE = "control_encoder.safetensors"
ENCODER_FORMAT = "hra-studio-control-encoder/1"
ANNOTATORS = "lllyasviel/Annotators"
# control type -> (controlnet_aux detector class, weight files it loads from ANNOTATORS or a local folder)
DETECTORS: dict[str, tuple[str, tuple[str, ...]]] = {
    "hed": ("HEDdetector", ("ControlNetHED.pth",)),
    "pidinet": ("PidiNetDetector", ("table5_pidinet.pth",)),
    "mlsd": ("MLSDdetector", ("mlsd_large_512_fp32.pth",)),
    "lineart": ("LineartDetector", ("sk_model.pth", "sk_model2.pth")),
    "lineart_anime": ("LineartAnimeDetector", ("netG.pth",)),
    "depth": ("MidasDetector", ("dpt_hybrid-midas-501f0c75.pt",)),
    "normal": ("NormalBaeDetector", ("scannet.pt",)),
    "openpose": ("OpenposeDetector", ("body_pose_model.pth", "hand_pose_model.pth", "facenet.pth")),
}


class ConditionEncoder(nn.Module):
    """ControlNet's hint encoder: 3 -> 16 -> 16 -> 32 -> 32 -> 96 -> 96 -> 256 -> out_channels, SiLU between.

    Each width after the first is reached by a stride-2 conv, so ``channels`` of length k+1 downsample by 2**k
    (the paper's four widths give 1/8, SD's latent scale). The last conv is zero-initialized: an untrained encoder
    adds exactly nothing, so training starts from the base model.

    ``residuals`` (see :func:`skip_connections`): also add the hint to each of the UNet's down-block skip connections
    and to its mid block, where ControlNet adds its residuals, through one zero-initialized 1x1 conv each from the
    encoder's last features (average-pooled to each resolution). None, the paper's design: ``conv_in`` only.
    """

    def __init__(self, out_channels: int = 320, channels: Sequence[int] = PAPER_CHANNELS, in_channels: int = 3,
                 residuals: Sequence[Sequence[int]] | None = None) -> None:
        super().__init__()
        if not channels:
            raise ValueError("ConditionEncoder needs at least one hidden width")
        self.config: dict[str, Any] = {"out_channels": out_channels, "channels": list(channels),
                                       "in_channels": in_channels}
        if residuals:
            self.config["residuals"] = [[int(width), int(downscale)] for width, downscale in residuals]
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels[0], 3, padding=1), nn.SiLU()]
        for width, wider in zip(channels[:-1], channels[1:]):
            layers += [nn.Conv2d(width, width, 3, padding=1), nn.SiLU()]
            layers += [nn.Conv2d(width, wider, 3, padding=1, stride=2), nn.SiLU()]
        self.layers = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(channels[-1], out_channels, 3, padding=1)
        self.residual_convs = nn.ModuleList(nn.Conv2d(channels[-1], width, 1) for width, _ in residuals or ())
        for conv in (self.conv_out, *self.residual_convs):
            nn.init.zeros_(conv.weight)
            nn.init.zeros_(conv.bias)
        # Set by set_condition; plain attributes (not buffers), so never saved and never moved by .to().
        self.condition: Tensor | None = None
        self.scale = 1.0
        self._hook: RemovableHandle | None = None
        self._residual_hooks: list[RemovableHandle] = []
        self._features: Tensor | None = None  # this UNet call's encoder features, from conv_in to the mid block
        self.adapter_name: str | None = None  # the HRA adapter it was loaded with (load_control_adapter)

    @classmethod
    def for_unet(cls, unet: nn.Module, vae_scale_factor: int = 8, residuals: bool = False) -> ConditionEncoder:
        """The paper's encoder sized for ``unet``: output width = its first block, downsampling = the VAE's;
        ``residuals``: also one hint per skip connection of ``unet`` (see the class).

        ``vae_scale_factor`` is ``2 ** (len(vae.config.block_out_channels) - 1)`` (8 for SD; 2 for the tiny test
        model, which then uses only the first paper widths).
        """
        stages = math.log2(vae_scale_factor)
        if not stages.is_integer() or not 0 <= stages < len(PAPER_CHANNELS):
            raise ValueError(f"vae_scale_factor must be 1, 2, 4 or 8, got {vae_scale_factor}")
        return cls(unet.config.block_out_channels[0], PAPER_CHANNELS[: int(stages) + 1],
                   residuals=skip_connections(unet) if residuals else None)

    @property
    def downscale(self) -> int:
        return 2 ** (len(self.config["channels"]) - 1)

    def forward(self, condition: Tensor) -> Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, out_channels, H / downscale, W / downscale)."""
        return self.conv_out(self.layers(condition))

    def _tiled(self, hint: Tensor, batch: int) -> Tensor:
        """The hint for a UNet batch: one per condition, or the conditions repeated (classifier-free guidance)."""
        conditions = hint.shape[0]
        if conditions == batch:
            return hint
        if conditions != 1 and batch != 2 * conditions:
            raise ValueError(f"{conditions} condition images for a UNet batch of {batch}: give 1 (shared) or one per "
                             "image")
        return hint.repeat(batch // conditions, 1, 1, 1)

    def _add_hint(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        """Forward hook on ``unet.conv_in``: output + scale * encoder(condition), the condition tiled to the batch."""
        self._features = None
        if self.condition is None:
            return None
        weight = self.conv_out.weight
        features = self.layers(self.condition.to(weight.device, weight.dtype))
        hint = self.conv_out(features) * self.scale
        if hint.shape[-2:] != output.shape[-2:]:
            raise ValueError(
                f"a condition of (H, W) = {tuple(self.condition.shape[-2:])} gives a {tuple(hint.shape[-2:])} hint, "
                f"but the latents are {tuple(output.shape[-2:])}: resize the condition to the generated image's size"
            )
        if len(self.residual_convs):
            self._features = features
        return output + self._tiled(hint, output.shape[0]).to(output.dtype)

    def _residual(self, index: int, like: Tensor) -> Tensor:
        downscale = self.config["residuals"][index][1]
        features = F.avg_pool2d(self._features, downscale) if downscale > 1 else self._features
        return self._tiled(self.residual_convs[index](features) * self.scale, like.shape[0]).to(like.dtype)

    def _add_to_skips(self, first: int) -> Callable:
        """Forward hook on a down block: its skip connections (not its output, as ControlNet) + their hints."""
        def hook(module: nn.Module, args: tuple, output: tuple[Tensor, tuple[Tensor, ...]]) -> Any:
            if self._features is None:
                return None
            hidden, skips = output
            return hidden, tuple(skip + self._residual(first + i, skip) for i, skip in enumerate(skips))
        return hook

    def _add_to_mid(self, module: nn.Module, args: tuple, output: Tensor) -> Tensor | None:
        if self._features is None:
            return None
        output = output + self._residual(len(self.residual_convs) - 1, output)
        self._features = None  # the last use in this call: do not keep it (and its graph) until the next
        return output


def skip_connections(unet: nn.Module) -> list[list[int]]:
    """[channels, downscale from the latents] of each skip connection a UNet2DConditionModel's down blocks make, then
    of its mid block's output: the places, in order, where ControlNet adds its residuals (less the first, conv_in's
    output, which the encoder's main hint already joins)."""
    if getattr(unet, "mid_block", None) is None:
        raise ValueError("residual hints need a UNet2DConditionModel-like UNet with a mid block")
    places = [place for block in _block_skips(unet) for place in block]
    return [*places, [unet.mid_block.resnets[-1].out_channels, places[-1][1]]]


def _block_skips(unet: nn.Module) -> list[list[list[int]]]:
    """skip_connections per down block: one per resnet, and one for the downsampler's output."""
    blocks, downscale = [], 1
    for block in unet.down_blocks:
        width = block.resnets[-1].out_channels
        places = [[width, downscale]] * len(block.resnets)
        if getattr(block, "downsamplers", None):
            downscale *= 2
            places.append([width, downscale])
        blocks.append(places)
    return blocks


@dataclass(frozen=True)
class ControlHandle:
    """Returned by :func:`attach_control`; ``remove()`` undoes it, like :func:`detach_control`."""

    unet: nn.Module
    encoder: ConditionEncoder

    def remove(self) -> ConditionEncoder:
        return detach_control(self.unet)


def _unwrap(unet: nn.Module) -> nn.Module:
    """The UNet inside DDP and torch.compile wrappers, in either order (what accelerate's prepare hands back)."""
    while isinstance(unet, DistributedDataParallel) or hasattr(unet, "_orig_mod"):
        unet = unet.module if isinstance(unet, DistributedDataParallel) else unet._orig_mod
    return unet


def control_encoder(unet: nn.Module) -> ConditionEncoder | None:
    """The encoder attached to ``unet``, or None."""
    encoder = getattr(_unwrap(unet), ENCODER_ATTR, None)
    return encoder if isinstance(encoder, ConditionEncoder) else None


def attach_control(unet: nn.Module, encoder: ConditionEncoder) -> ControlHandle:
    """Make ``encoder``'s output join the UNet after ``conv_in`` (inert until a condition is set).

    Attach after add_hra / load_hra: add_hra freezes every parameter of the model, an attached encoder included,
    and replacing ``conv_in`` with an HRA layer would drop the hook (set_condition then says so).
    """
    unet = _unwrap(unet)
    _check_attachable(unet, encoder)
    unet.add_module(ENCODER_ATTR, encoder)
    encoder._hook = unet.conv_in.register_forward_hook(encoder._add_hint)
    if len(encoder.residual_convs):
        first = 0
        for block, places in zip(unet.down_blocks, _block_skips(unet)):
            encoder._residual_hooks.append(block.register_forward_hook(encoder._add_to_skips(first)))
            first += len(places)
        encoder._residual_hooks.append(unet.mid_block.register_forward_hook(encoder._add_to_mid))
    return ControlHandle(unet, encoder)


def detach_control(unet: nn.Module) -> ConditionEncoder:
    """Remove the hook and the encoder from the UNet (before ``save_pretrained``), returning the encoder."""
    unet = _unwrap(unet)
    encoder = _require(unet)
    for hook in [encoder._hook, *encoder._residual_hooks]:
        hook.remove()
    encoder._hook, encoder._residual_hooks = None, []
    encoder.condition = encoder._features = None
    del unet._modules[ENCODER_ATTR]
    return encoder


def _check_attachable(unet: nn.Module, encoder: ConditionEncoder) -> None:
    if control_encoder(unet) is not None:
        raise ValueError("this UNet already has a control encoder; detach_control(unet) first")
    width = unet.config.block_out_channels[0]
    if encoder.config["out_channels"] != width:
        raise ValueError(f"encoder outputs {encoder.config['out_channels']} channels, the UNet's conv_in {width}")
    if "residuals" in encoder.config and encoder.config["residuals"] != skip_connections(unet):
        raise ValueError(f"the encoder's residual hints fit skip connections {encoder.config['residuals']}, this "
                         f"UNet's are {skip_connections(unet)} ([channels, downscale]): it was made for another UNet")


def _require(unet: nn.Module) -> ConditionEncoder:
    encoder = control_encoder(unet)
    if encoder is None:
        raise ValueError("this UNet has no control encoder: load_control_adapter(unet, path) or attach_control first")
    return encoder


def set_condition(unet: nn.Module, condition: Tensor | None, scale: float = 1.0) -> None:
    """Condition every following UNet call on ``condition`` ((B, 3, H, W) in [0, 1]; None switches control off).

    B is 1 (one map for the whole batch) or the number of images; under classifier-free guidance the UNet batch is
    [unconditional; conditional], twice that, and the hint is tiled so both halves get it, as ControlNet does.
    """
    encoder = _require(unet)
    if condition is not None:
        channels = encoder.config["in_channels"]
        if condition.ndim != 4 or condition.shape[1] != channels:
            raise ValueError(f"condition must be (B, {channels}, H, W), got {tuple(condition.shape)}")
        if encoder._hook.id not in _unwrap(unet).conv_in._forward_hooks:
            raise RuntimeError("unet.conv_in was replaced after attach_control: detach_control and attach again")
    encoder.condition, encoder.scale = condition, scale


@contextmanager
def control_condition(unet: nn.Module, condition: Tensor | None, scale: float = 1.0) -> Iterator[None]:
    """:func:`set_condition` for the duration of a ``with`` block, then the previous condition again."""
    encoder = _require(unet)
    previous = encoder.condition, encoder.scale
    set_condition(unet, condition, scale)
    try:
        yield
    finally:
        encoder.condition, encoder.scale = previous


def condition_tensor(images: Image.Image | Sequence[Image.Image], size: tuple[int, int]) -> Tensor:
    """PIL condition map(s) -> (B, 3, height, width) in [0, 1], resized to ``size`` = (width, height) as in training."""
    images = [images] if isinstance(images, Image.Image) else list(images)
    resized = [img.convert("RGB").resize(size, Image.Resampling.LANCZOS) for img in images]
    return torch.stack([to_tensor(img) for img in resized])


def save_control_adapter(
    unet: nn.Module,
    encoder: ConditionEncoder,
    path: str | os.PathLike,
    adapter_name: str = "default",
    metadata: Mapping[str, Any] | None = None,
) -> Path:
    """One file for the whole control adapter: the UNet's HRA part as save_hra writes it, ``control_encoder.*``
    tensors and, in the metadata, ``kind: control`` and the encoder's config. load_hra reads it as a plain adapter."""
    tensors = {f"{ENCODER_ATTR}.{key}": value for key, value in encoder.state_dict().items()}
    meta = {**(metadata or {}), "kind": CONTROL_KIND, ENCODER_ATTR: encoder.config}
    return save_hra(_unwrap(unet), path, adapter_name, metadata=meta, extra_tensors=tensors)


def load_control_adapter(unet: nn.Module, path: str | os.PathLike, adapter_name: str | None = None) -> ConditionEncoder:
    """Load a control adapter file into a plain UNet: its HRA part (load_hra) and its encoder, attached."""
    meta = read_hra_metadata(path)
    if meta.get("kind") != CONTROL_KIND:
        raise AdapterFileError(f"{path} is not a control adapter (no encoder inside); load it with load_hra")
    encoder = _stored_encoder(path, meta.get(ENCODER_ATTR), lambda: read_extra_tensors(path, ENCODER_ATTR))
    _check_attachable(_unwrap(unet), encoder)  # before load_hra changes the UNet
    load_hra(_unwrap(unet), path, adapter_name)
    encoder.adapter_name = adapter_name or meta.get("adapter_name", "default")
    _attach_stored(unet, encoder)
    return encoder


def save_control_encoder(encoder: ConditionEncoder, path: str | os.PathLike,
                         metadata: Mapping[str, Any] | None = None) -> Path:
    """The hint encoder alone, for control adapters whose UNet part is in another format (a LoRA file, an OFT
    folder) that has no room for it: safetensors, its config and the run's ``metadata`` in the header (no pickle)."""
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    meta.update(format=ENCODER_FORMAT, kind=CONTROL_KIND, **{ENCODER_ATTR: json.dumps(encoder.config)})
    tensors = {key: value.detach().to("cpu", torch.float32).contiguous() for key, value in encoder.state_dict().items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def read_control_encoder_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header of a :func:`save_control_encoder` file (the run's settings), checked to be one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except Exception as err:  # safetensors raises its own error types for every way a header can be broken
        raise AdapterFileError(f"{path} is not a readable safetensors file ({err})") from err
    if meta.get("format") != ENCODER_FORMAT:
        raise AdapterFileError(f"{path} is not a control encoder file (format={meta.get('format')!r})")
    return meta


def load_control_encoder(unet: nn.Module, path: str | os.PathLike) -> ConditionEncoder:
    """Attach the hint encoder of a :func:`save_control_encoder` file to ``unet`` (whose adapter is loaded by its
    own loader: diffusers' load_lora_weights, peft)."""
    meta = read_control_encoder_metadata(path)
    encoder = _stored_encoder(path, meta.get(ENCODER_ATTR), lambda: load_file(str(path)))
    _check_attachable(_unwrap(unet), encoder)
    _attach_stored(unet, encoder)
    return encoder


def _stored_encoder(path: str | os.PathLike, config: str | None, tensors: Callable[[], dict[str, Tensor]]
                    ) -> ConditionEncoder:
    """The encoder a file describes: built from its stored config, then its weights (both must match)."""
    try:
        encoder = ConditionEncoder(**json.loads(config))
        encoder.load_state_dict(tensors())
    except (TypeError, ValueError, RuntimeError) as err:
        raise AdapterFileError(f"{path}: the control encoder does not match its stored config ({err})") from err
    return encoder


def _attach_stored(unet: nn.Module, encoder: ConditionEncoder) -> None:
    weight = _unwrap(unet).conv_in.weight
    attach_control(unet, encoder.to(weight.device, weight.dtype))


def _controlnet_aux() -> Any:
    """Import controlnet_aux lazily (it loads every detector, 2-3 s) and quietly (some detectors warn on import); it
    is an extra, so the library alone installs without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            import controlnet_aux
        except ModuleNotFoundError as err:
            raise ModuleNotFoundError(
                f'condition maps need controlnet_aux (no module {err.name!r}): pip install "hra-studio[train]"',
                name=err.name,
            ) from err
    return controlnet_aux


@functools.lru_cache(maxsize=4)
def _detector(control_type: str, weights: str) -> Any:
    """A controlnet_aux detector loaded from local files only (cached: loading a network takes seconds)."""
    name, files = DETECTORS[control_type]
    try:
        return getattr(_controlnet_aux(), name).from_pretrained(weights, local_files_only=True)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(
            f"control type {control_type!r} needs {name} weights ({', '.join(files)}) from {weights!r}, which are not "
            f"available locally ({type(err).__name__}). Download them with `huggingface-cli download {ANNOTATORS} "
            f"{' '.join(files)}` or pass weights=<folder holding them>. 'canny' needs no weights and works offline."
        ) from err


def make_condition(
    image: Image.Image, control_type: str = "canny", low: int = 100, high: int = 200, *, weights: str = ANNOTATORS
) -> Image.Image:
    """The condition map of ``image`` (RGB, same size as ``image``), with controlnet_aux's detectors.

    "canny" (thresholds ``low``/``high``, near the image's own resolution, as the evaluation measures it; controlnet_aux
    works in multiples of 64) needs no weights; the network detectors (see DETECTORS) load from ``weights``, a local
    folder or the Hugging Face cache. "none" returns ``image`` as RGB: it already is a condition map.
    """
    if control_type == "none":
        return image.convert("RGB")
    if control_type != "canny" and control_type not in DETECTORS:
        raise ValueError(f"unknown control type {control_type!r}; choose from {['none', 'canny', *DETECTORS]}")
    image = image.convert("RGB")
    if control_type == "canny":
        side = max(64, min(image.size))  # controlnet_aux rounds sizes to multiples of 64; resized back below
        detected = _controlnet_aux().CannyDetector()(
            image, low_threshold=low, high_threshold=high, detect_resolution=side, image_resolution=side
        )
        resample = Image.Resampling.NEAREST  # keep the map binary
    else:
        detected = _detector(control_type, str(weights))(image, output_type="pil")
        resample = Image.Resampling.BILINEAR
    return detected.convert("RGB").resize(image.size, resample)
