"""Load a base pipeline of any supported family (hra_diffusion.families), attach HRA adapters, generate: for
validation, eval and the app."""

from __future__ import annotations

import inspect
import os
import socket
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from urllib.parse import urlparse

import torch
from PIL import Image

from .control import (
    CONTROL_KIND,
    condition_tensor,
    control_condition,
    control_encoder,
    detach_control,
    load_control_adapter,
)
from .families import UnknownFamilyError, denoiser_of, family_for_pipeline, family_of
from .householder import autocast_enabled
from .io import load_hra, read_hra_metadata
from .model import hra_adapters, remove_hra, set_active_adapters

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "unipc": "UniPCMultistepScheduler",
    "ddpm": "DDPMScheduler",
}


class ModelNotFoundError(OSError):
    """A base model that is neither a local diffusers folder nor downloadable from here, or not a supported kind."""


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"


def load_pipeline(
    base_model: str | os.PathLike,
    *,
    device: str | None = None,
    dtype: torch.dtype | None = None,
    revision: str | None = None,
    variant: str | None = None,
    pipeline_class: type | None = None,
    **components,
):
    """The text-to-image pipeline of a hub id or a local folder, of the family its model_index.json names.

    The SD safety checker is off because it silently turns images black, which corrupts evaluation and previews;
    turn it back on by passing ``safety_checker=...``. Extra keyword arguments replace pipeline components
    (``controlnet=...`` with ``pipeline_class=StableDiffusionControlNetPipeline``; ``text_encoder_3=None,
    tokenizer_3=None`` drops SD3's T5). Without a network a hub id loads from the local cache or fails at once.
    """
    local = Path(base_model).expanduser()
    if local.exists() and not (local / "model_index.json").is_file():
        raise ModelNotFoundError(f"{local} is not a diffusers pipeline folder (no model_index.json inside)")
    source = str(local) if local.exists() else str(base_model)
    options = {} if local.exists() else _hub_options(source, revision)
    try:
        cls = pipeline_class or _pipeline_class(source, revision, options)
        if "safety_checker" in inspect.signature(cls.__init__).parameters:
            components.setdefault("safety_checker", None)
            components.setdefault("requires_safety_checker", False)
        pipe = cls.from_pretrained(
            source, dtype=dtype or torch.float32, revision=revision, variant=variant, **options, **components
        )
    except (OSError, ValueError) as err:
        if local.exists() or isinstance(err, ModelNotFoundError):
            raise
        raise ModelNotFoundError(
            f"could not load base model {str(base_model)!r}: it is not a local folder and could not be downloaded "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}). Give a local diffusers folder, "
            "or check the hub id and your network (HF_HUB_OFFLINE must be unset to download)."
        ) from err
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device or default_device())


def _hub_options(repo_id: str, revision: str | None) -> dict[str, bool]:
    """``local_files_only`` when the Hub cannot be reached but the model is cached; an error at once when it is not
    cached, instead of half a minute of retries. Behind a proxy (HTTPS_PROXY) the Hub is assumed reachable."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE or os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy"):
        return {}
    if hub_reachable(constants.ENDPOINT):
        return {}
    if isinstance(try_to_load_from_cache(repo_id, "model_index.json", revision=revision), str):
        return {"local_files_only": True}
    raise ModelNotFoundError(
        f"could not load base model {repo_id!r}: {urlparse(constants.ENDPOINT).hostname} cannot be reached from here "
        "(no network?) and the model is not in the local Hugging Face cache. Connect and retry (it is downloaded "
        "once), or give a local diffusers folder."
    )


def hub_reachable(endpoint: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to the Hub's host opens within ``timeout`` seconds (name lookup included)."""
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
    except OSError:
        return False
    return True


def _pipeline_class(source: str, revision: str | None, options: dict[str, bool]) -> type:
    """The family's pipeline class, by the ``_class_name`` in model_index.json."""
    import diffusers

    name = diffusers.DiffusionPipeline.load_config(source, revision=revision, **options).get("_class_name", "")
    try:
        return family_for_pipeline(name).pipeline_class()
    except UnknownFamilyError as err:
        raise ModelNotFoundError(f"{source}: {err}") from err


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    """The pipeline's models that adapters go on: its denoiser and text encoders (those it has loaded)."""
    names = family_of(pipe).components
    return {name: getattr(pipe, name) for name in names if getattr(pipe, name, None) is not None}


def set_scheduler(pipe, name: str) -> None:
    """Swap the sampler by short name (ddim, dpm, euler, euler_a, pndm, unipc, ddpm), keeping the model's config."""
    import diffusers

    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    pipe.scheduler = getattr(diffusers, SCHEDULERS[name]).from_config(pipe.scheduler.config)


def attach_adapters(
    pipe,
    adapters: Sequence[str | os.PathLike],
    strengths: Sequence[float] | None = None,
    names: Sequence[str] | None = None,
) -> list[str]:
    """Make exactly these adapter files active on the pipeline's UNet (and text encoders, where a file has parts
    for them), in the given order (W H_1 H_2 ...), each at its strength in [0, 1].

    A file already loaded under the same name is reused and adapters left out are only deactivated, so calling this
    per request is cheap. At most one control adapter: its hint encoder is attached (pass ``control_image=`` to
    :func:`generate`), and one loaded by an earlier call but left out now is unloaded, encoder and all. Returns the
    adapter names.
    """
    paths = [Path(p) for p in adapters]
    names = list(names) if names is not None else [p.stem for p in paths]
    if len(set(names)) != len(names):
        raise ValueError(f"adapter names must be unique, got {names}")
    controls = [name for path, name in zip(paths, names) if _is_control_file(path)]
    if len(controls) > 1:
        raise ValueError(f"at most one control adapter at a time (the UNet has one hint input), got {controls}")
    denoiser = denoiser_of(pipe)
    attached = control_encoder(denoiser)
    if attached is not None and attached.adapter_name is not None and attached.adapter_name not in controls:
        unload_adapter(pipe, attached.adapter_name)
    components = pipeline_components(pipe)
    for path, name in zip(paths, names):
        if name in hra_adapters(denoiser):
            continue
        if name in controls:
            load_control_adapter(denoiser, path, adapter_name=name)
        else:
            load_hra(components, path, adapter_name=name)
    for model in components.values():
        present = hra_adapters(model)
        if present:
            chosen = [n for n in names if n in present]
            weights = [s for n, s in zip(names, strengths or [1.0] * len(names)) if n in present]
            set_active_adapters(model, chosen, weights)
    return names


def unload_adapter(pipe, name: str) -> None:
    """Remove adapter ``name`` from the pipeline, its control encoder too: for a file that changed or was deleted."""
    encoder = control_encoder(denoiser_of(pipe))
    if encoder is not None and encoder.adapter_name == name:
        detach_control(denoiser_of(pipe))
    for model in pipeline_components(pipe).values():
        if name in hra_adapters(model):
            remove_hra(model, name)


def _is_control_file(path: Path) -> bool:
    return path.is_file() and read_hra_metadata(path).get("kind") == CONTROL_KIND


@contextmanager
def fp32_vae_decode(pipe) -> Iterator[None]:
    """Under autocast (samples and class images during mixed-precision training), decode with the float32 VAE in
    float32: SDXL's VAE overflows in fp16 and decodes black images, and the pipelines upcast it only when its
    weights are fp16, not when autocast lowers a float32 VAE's convolutions."""
    vae = pipe.vae
    if vae.dtype != torch.float32 or not autocast_enabled(vae.device.type):
        yield
        return
    decode = vae.decode

    def decode_fp32(latents: torch.Tensor, *args, **kwargs):
        with torch.autocast(latents.device.type, enabled=False):
            return decode(latents.float(), *args, **kwargs)

    vae.decode = decode_fp32
    try:
        yield
    finally:
        del vae.decode  # the class's method again


@torch.no_grad()
def generate(
    pipe,
    prompt: str,
    *,
    negative_prompt: str | None = None,
    num_images: int = 1,
    seed: int = 0,
    steps: int = 25,
    guidance: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    scheduler: str | None = None,
    control_image: Image.Image | None = None,
    control_scale: float = 1.0,
    **pipe_kwargs,
) -> list[Image.Image]:
    """Images for one prompt; image i uses seed + i, so each is reproducible on its own.

    ``control_image`` (a condition map, see control.make_condition) steers a UNet with a control adapter attached;
    it is resized to the output size and used for every image and both halves of the guidance batch.
    """
    if scheduler:
        set_scheduler(pipe, scheduler)
    device = pipe._execution_device
    generators = [torch.Generator(device="cpu").manual_seed(seed + i) for i in range(num_images)]
    control = nullcontext()
    if control_image is not None:
        default = family_of(pipe).default_resolution(pipe)
        size = (width or default, height or default)
        control = control_condition(denoiser_of(pipe), condition_tensor(control_image, size), control_scale)
    with control, fp32_vae_decode(pipe):
        result = pipe(
            prompt=[prompt] * num_images,
            negative_prompt=[negative_prompt] * num_images if negative_prompt else None,
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
            generator=generators if device.type != "mps" else None,
            **pipe_kwargs,
        )
    return list(result.images)
