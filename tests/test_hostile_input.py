"""Hostile or damaged input: adapter files, images and adapter folders that must be refused clearly and cheaply."""

from __future__ import annotations

import json
import os
import resource
import shutil
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from app.store import AdapterStore
from hra_diffusion import (
    AdapterFileError,
    HRAConfig,
    add_hra,
    hra_adapters,
    hra_parameters,
    load_hra,
    read_hra_metadata,
    save_hra,
)
from hra_diffusion import io as hra_io
from hra_diffusion.data import ControlDataset, DreamBoothDataset
from hra_diffusion.images import ImageError, load_image

# --------------------------------------------------------------------------------------------------------------------
# Adapter files


def trained(model, config=None):
    """A model with an adapter moved away from the identity, as training leaves it."""
    add_hra(model, config or HRAConfig(r=2))
    with torch.no_grad():
        for p in hra_parameters(model):
            p.add_(0.3 * torch.randn(p.shape, generator=torch.Generator().manual_seed(0)))
    return model


def outputs(unet):
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        return unet(torch.randn(1, 4, 32, 32, generator=gen), 10, torch.randn(1, 7, 32, generator=gen)).sample


def contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata())


def rewritten(path: Path, out: Path, edit: Callable[[dict, dict, dict], None]) -> Path:
    """A copy of adapter ``path`` after ``edit(tensors, raw metadata, parsed "adapters")``."""
    tensors, meta = contents(path)
    stored = meta["adapters"]
    adapters = json.loads(stored)
    edit(tensors, meta, adapters)
    if meta.get("adapters") == stored:  # not replaced or removed by ``edit``
        meta["adapters"] = json.dumps(adapters)
    save_file(tensors, out, metadata=meta)
    return out


def snapshot(model) -> tuple:
    """Everything a failed load must leave as it was: adapters, parameter names and sizes, trainability, modules."""
    params = [(name, tuple(p.shape), p.requires_grad) for name, p in model.named_parameters()]
    modules = [(name, type(m).__name__) for name, m in model.named_modules()]
    return sorted(hra_adapters(model)), sorted(model.state_dict()), params, modules


@pytest.fixture(scope="module")
def good_file(tiny_unet, tmp_path_factory) -> Path:
    return save_hra(trained(tiny_unet()), tmp_path_factory.mktemp("good") / "good.safetensors")


def test_absurd_r_is_refused_before_allocating(tiny_unet, good_file, tmp_path):
    """A 46 KB file claiming r=200000 grew the process by 1.2 GB: add_hra sized its vectors by r before any check."""

    def huge_r(tensors, meta, adapters):
        adapters["unet"]["config"]["r"] = 200_000

    path = rewritten(good_file, tmp_path / "huge.safetensors", huge_r)
    unet = tiny_unet()
    before, peak_kb = snapshot(unet), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(AdapterFileError, match=r"r=200000, but layer \S+ has only \d+ inputs"):
        load_hra(unet, path)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_kb < 200_000, "the refused load allocated"
    assert snapshot(unet) == before


def drop_one(tensors, meta, adapters):
    del tensors[sorted(tensors)[0]]


def add_one(tensors, meta, adapters):
    tensors["unet.conv_in.hra_u"] = torch.zeros(36, 2)


def widen_one(tensors, meta, adapters):
    key = sorted(tensors)[-1]
    tensors[key] = torch.zeros(tensors[key].shape[0], 3)


def unlisted_layer(tensors, meta, adapters):
    del adapters["unet"]["layers"][sorted(adapters["unet"]["layers"])[0]]


@pytest.mark.parametrize(
    "damage, match",
    [
        (drop_one, "do not match its own layer list"),
        (add_one, "do not match its own layer list"),
        (unlisted_layer, "do not match its own layer list"),
        (widen_one, r"has shape \(\d+, 3\), but r=2"),
    ],
)
def test_failed_load_leaves_the_model_as_it_was(tiny_unet, good_file, tmp_path, damage, match):
    """The file's tensors disagree with its own layer list: nothing may be added, and a retry must load for real
    (a half-added identity adapter used to stay behind, and attach_adapters reused it)."""
    unet = tiny_unet()
    before = snapshot(unet)
    with pytest.raises(AdapterFileError, match=match):
        load_hra(unet, rewritten(good_file, tmp_path / "bad.safetensors", damage))
    assert snapshot(unet) == before
    load_hra(unet, good_file)
    torch.testing.assert_close(outputs(unet), outputs(load_hra(tiny_unet(), good_file)))
    assert (outputs(unet) - outputs(tiny_unet())).abs().max() > 1e-4, "the retry loaded the trained vectors"


def test_error_while_adding_is_rolled_back(tiny_unet, tiny_sd, tmp_path, monkeypatch):
    """Whatever fails once the model starts changing (here: the text encoder part after the UNet's), every component
    is put back, trainability included, since add_hra freezes all parameters."""
    from transformers import CLIPTextModel

    def encoder():
        return CLIPTextModel.from_pretrained(tiny_sd, subfolder="text_encoder")

    text_encoder = trained(encoder(), HRAConfig(r=2, target_modules=("q_proj",)))
    path = save_hra({"unet": trained(tiny_unet()), "text_encoder": text_encoder}, tmp_path / "both.safetensors")
    models = {"unet": tiny_unet(), "text_encoder": encoder()}
    before = {comp: snapshot(model) for comp, model in models.items()}
    real = hra_io.set_hra_state_dict

    def failing(model, state, name):
        if model is models["text_encoder"]:
            raise RuntimeError("out of device memory")
        real(model, state, name)

    monkeypatch.setattr(hra_io, "set_hra_state_dict", failing)
    with pytest.raises(RuntimeError, match="out of device memory"):
        load_hra(models, path)
    assert {comp: snapshot(model) for comp, model in models.items()} == before
    monkeypatch.undo()
    load_hra(models, path)
    assert all(hra_adapters(model) for model in models.values())


def int_vectors(tensors, meta, adapters):
    key = sorted(tensors)[0]
    tensors[key] = torch.ones(tensors[key].shape, dtype=torch.int64)


def inf_vector(tensors, meta, adapters):
    tensors[sorted(tensors)[0]][0, 0] = float("-inf")


@pytest.mark.parametrize("damage, match", [(int_vectors, "holds torch.int64 values"), (inf_vector, "NaN or inf")])
def test_non_float_and_non_finite_vectors_are_refused(tiny_unet, good_file, tmp_path, damage, match):
    unet = tiny_unet()
    before = snapshot(unet)
    with pytest.raises(AdapterFileError, match=match):
        load_hra(unet, rewritten(good_file, tmp_path / "bad.safetensors", damage))
    assert snapshot(unet) == before


def set_meta(key, value):
    def edit(tensors, meta, adapters):
        meta[key] = value

    return edit


def drop_meta(key):
    return lambda tensors, meta, adapters: meta.pop(key)


def set_part(change):
    """Edit the unet part of "adapters" in place: ``change(part)``."""
    return lambda tensors, meta, adapters: change(adapters["unet"])


def set_config(**values):
    return set_part(lambda part: part["config"].update(values))


def first_layer_shape(shape):
    return set_part(lambda part: part["layers"].update({sorted(part["layers"])[0]: shape}))


MALFORMED = {
    "no adapters entry": (drop_meta("adapters"), "no 'adapters' entry"),
    "adapters not JSON": (set_meta("adapters", "{'unet': "), "damaged HRA Studio metadata: Expecting"),
    "adapters a list": (set_meta("adapters", "[1, 2]"), "must be a non-empty JSON object, got list"),
    "adapters empty": (set_meta("adapters", "{}"), "must be a non-empty JSON object"),
    "adapters nested too deep": (set_meta("adapters", "[" * 100_000), "damaged HRA Studio metadata"),
    "part a number": (set_meta("adapters", '{"unet": 3}'), "part 'unet' must be an object"),
    "no config": (set_part(lambda part: part.pop("config")), "part 'unet' must be an object"),
    "config a list": (set_part(lambda part: part.update(config=[2])), "part 'unet' must be an object"),
    "layers a list": (set_part(lambda part: part.update(layers=list(part["layers"]))), "part 'unet' must be"),
    "no layers": (set_part(lambda part: part.update(layers={})), "names no layers"),
    "r a string": (set_config(r="2"), "r must be a positive integer"),
    "r zero": (set_config(r=0), "r must be a positive integer"),
    "apply_GS a string": (set_config(apply_GS="no"), "apply_GS must be true or false"),
    "lambda a string": (set_config(lambda_orth="0.1"), "lambda_orth must be a number"),
    "targets a number": (set_config(target_modules=5), "target_modules must be a string or a list"),
    "unknown config field": (set_config(alpha=1), "unknown HRAConfig fields"),
    "layer shape one number": (first_layer_shape([32]), "not \\[out, in\\]"),
    "layer shape strings": (first_layer_shape(["32", "32"]), "not \\[out, in\\]"),
    "layer shape negative": (first_layer_shape([32, -1]), "not \\[out, in\\]"),
    "dotted adapter name": (set_meta("adapter_name", "a.b"), "without '.'"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_metadata_is_an_adapter_file_error(tiny_unet, good_file, tmp_path, case):
    damage, match = MALFORMED[case]
    path = rewritten(good_file, tmp_path / "bad.safetensors", damage)
    with pytest.raises(AdapterFileError, match=match) as err:
        read_hra_metadata(path)
    assert "again" in str(err.value), "the message says what to do"
    unet = tiny_unet()
    before = snapshot(unet)
    with pytest.raises(AdapterFileError, match=match):
        load_hra(unet, path)
    assert snapshot(unet) == before


def safetensors_bytes(header: object) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text


@pytest.mark.parametrize(
    "content, match",
    [
        (lambda good: good[: len(good) // 2], "truncated or corrupt"),
        (lambda good: good[:5], "not a readable safetensors file"),
        (lambda good: b"PK\x03\x04 a zip, not safetensors", "not a readable safetensors file"),
        (lambda good: safetensors_bytes({"__metadata__": [1, 2]}), "not a readable safetensors file"),
        (lambda good: safetensors_bytes([1, 2]), "not a readable safetensors file"),
        (lambda good: safetensors_bytes({}), "not an HRA Studio adapter"),
    ],
)
def test_unreadable_files_are_adapter_file_errors(tiny_unet, good_file, tmp_path, content, match):
    path = tmp_path / "bad.safetensors"
    path.write_bytes(content(good_file.read_bytes()))
    with pytest.raises(AdapterFileError, match=match):
        read_hra_metadata(path)
    with pytest.raises(AdapterFileError, match=match):
        load_hra(tiny_unet(), path)


@pytest.mark.parametrize(
    "config, match",
    [
        ([1, 2], "is not a JSON object"),
        ({"peft_type": "HRA", "r": "2"}, "r='2', not a positive integer"),
        ({"peft_type": "HRA", "r": 2, "auto_mapping": ["UNet2DConditionModel"]}, None),
        ({"peft_type": "HRA", "r": 2, "auto_mapping": {"base_model_class": 7}}, None),
    ],
)
def test_malformed_peft_folders(tiny_unet, good_file, tmp_path, config, match):
    """peft's adapter_config.json is as open to damage as our metadata; odd but harmless fields are ignored."""
    tensors, _ = contents(good_file)
    (tmp_path / hra_io.PEFT_CONFIG).write_text(json.dumps(config))
    peft = {hra_io.PEFT_PREFIX + k.removeprefix("unet."): v for k, v in tensors.items()}
    save_file(peft, tmp_path / hra_io.PEFT_WEIGHTS)
    unet = tiny_unet()
    if match is None:
        torch.testing.assert_close(outputs(load_hra(unet, tmp_path)), outputs(load_hra(tiny_unet(), good_file)))
        return
    with pytest.raises(AdapterFileError, match=match):
        load_hra(unet, tmp_path)
    assert not hra_adapters(unet)


# --------------------------------------------------------------------------------------------------------------------
# Written files are readable by other users' tools


@pytest.fixture
def umask():
    """Set the process umask for one test (os.umask returns the previous one, restored after)."""
    previous = os.umask(0o022)
    yield os.umask
    os.umask(previous)


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_written_files_get_the_umask_mode(tiny_unet, good_file, tmp_path, umask, mask, mode):
    """mkstemp's 0600 kept exported files from ComfyUI running as another user; files are made as open() makes them."""
    umask(mask)
    saved = save_hra(load_hra(tiny_unet(), good_file), tmp_path / "out" / "a.safetensors")
    copied = AdapterStore(tmp_path / "adapters", tmp_path / "exports").add(good_file, "copy")
    for path in (saved, copied):
        assert stat.S_IMODE(path.stat().st_mode) == mode, oct(path.stat().st_mode)
    assert sorted(p.name for p in saved.parent.iterdir()) == ["a.safetensors"], "no temp file left behind"


# --------------------------------------------------------------------------------------------------------------------
# Images


@pytest.mark.parametrize("size", [(1, 40_000), (5_000, 1), (2, 41)])
def test_thin_images_are_refused_before_decoding(tmp_path, size):
    """A few hundred bytes of 1x40000 PNG pass the pixel limit, and training would scale the 1-pixel side up to the
    resolution: 512 x 20 million pixels."""
    path = tmp_path / "strip.png"
    Image.new("RGB", size).save(path)
    assert path.stat().st_size < 2_000
    with pytest.raises(ImageError, match=r"too thin to train on.*crop it"):
        load_image(path)


def test_thin_images_fail_dataset_checks(tmp_path):
    photos, thin = tmp_path / "photos", tmp_path / "thin"
    photos.mkdir()
    thin.mkdir()
    Image.new("RGB", (1, 40_000)).save(thin / "strip.png")
    Image.new("RGB", (40, 2)).save(photos / "wide.png")  # 20:1 is still allowed
    Image.new("RGB", (1, 40_000)).save(photos / "strip.png")
    with pytest.raises(ImageError, match=r"strip\.png: image is 1x40000, too thin"):
        DreamBoothDataset(thin, "a photo of sks dog", resolution=32)
    with pytest.warns(UserWarning, match="strip.png"):
        ds = DreamBoothDataset(photos, "a photo of sks dog", resolution=32)
    assert [p.name for p in ds.instance_paths] == ["wide.png"]
    assert ds[0]["instance_images"].shape == (3, 32, 32)
    (thin / "metadata.jsonl").write_text(json.dumps({"image": "strip.png", "text": "x"}) + "\n")
    control = ControlDataset(thin, resolution=32, conditioning_transform=lambda img: img)
    with pytest.raises(ImageError, match="too thin"):
        control[0]


# --------------------------------------------------------------------------------------------------------------------
# The adapter shelf


def test_store_lists_around_links_leading_outside(good_file, tmp_path):
    """One link in adapters/ pointing outside (or nowhere) used to break the whole adapter list."""
    store = AdapterStore(tmp_path / "adapters", tmp_path / "exports")
    store.add(good_file, "mine")
    outside = shutil.copyfile(good_file, tmp_path / "elsewhere.safetensors")
    (store.root / "escape.safetensors").symlink_to(outside)
    (store.root / "dangling.safetensors").symlink_to(tmp_path / "gone" / "x.safetensors")
    rows = {row["name"]: row for row in store.list()}
    assert set(rows) == {"mine", "escape", "dangling"}
    assert "error" not in rows["mine"] and rows["mine"]["r"] == 2
    assert "outside the data folder" in rows["escape"]["error"]
    assert "outside the data folder" in rows["dangling"]["error"]
