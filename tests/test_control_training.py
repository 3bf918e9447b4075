"""The control trainer end to end: the real script in subprocesses on the tiny model and a synthetic shapes set; HRA
and the LoRA / OFT baselines (same encoder, loop and data), their files loaded back through baselines.attach_trained."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from hra_diffusion import HRAConfig, hra_parameters, read_hra_metadata
from hra_diffusion.baselines import (
    LORA_WEIGHT_NAME,
    OFT_FOLDER,
    BaselineConfig,
    attach_trained,
    detach_trained,
    find_trained,
    trained_parameters,
)
from hra_diffusion.checkpoint import WEIGHTS as CHECKPOINT_WEIGHTS
from hra_diffusion.checkpoint import Checkpoint
from hra_diffusion.control import (
    CONTROL_ENCODER_FILE,
    CONTROL_TARGETS,
    condition_tensor,
    control_condition,
    control_encoder,
    load_control_adapter,
    read_control_encoder_metadata,
)
from hra_diffusion.data import ControlDataset
from hra_diffusion.model import hra_layers
from hra_diffusion.synthetic import make_shapes_dataset
from hra_diffusion.train import TrainingError, read_request
from hra_diffusion.train.checkpointing import load_trainable_state
from hra_diffusion.train.loop import SETTINGS_FILE
from training.control_hra import (
    CONTROL_FILE,
    ConditionMaps,
    ControlSettings,
    add_control,
    export_hub_dataset,
    parse_args,
)

ROOT = Path(__file__).resolve().parents[1]
# One thread per process: on a busy 2-core machine OpenMP threads waiting on each other make steps far slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def train(model: Path, data: Path, out: Path, **flags) -> subprocess.CompletedProcess:
    """Run the script for a short tiny-model run; ``flags`` add or override (True = bare flag). Must succeed."""
    values = {
        "pretrained_model_name_or_path": model,
        "train_data_dir": data,
        "output_dir": out,
        "resolution": 32,
        "seed": 7,
        "train_batch_size": 2,
        "max_train_steps": 4,
        "learning_rate": 1e-3,
        "report_to": "none",
        "progress_file": out / "progress.jsonl",
        **flags,
    }
    args = []
    for key, value in values.items():
        args += [f"--{key}"] if value is True else [f"--{key}", str(value)]
    cmd = [sys.executable, "-m", "training.control_hra", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]


def unet_inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Latents, timesteps and text states for the tiny UNet (16x16 latents = 32 px images)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 16, 16, generator=gen), torch.full((2,), 500), torch.randn(2, 7, 32, generator=gen)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes_dataset(tmp_path_factory.mktemp("data") / "shapes", n=4, size=64)


@pytest.fixture(scope="module")
def photos_only(shapes: Path, tmp_path_factory) -> Path:
    """The shapes set without its conditioning column: the trainer must compute the maps."""
    folder = tmp_path_factory.mktemp("photos")
    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    for row in rows:
        (folder / row["image"]).parent.mkdir(exist_ok=True)
        (folder / row["image"]).write_bytes((shapes / row["image"]).read_bytes())
    text = "".join(json.dumps({"image": r["image"], "text": r["text"]}) + "\n" for r in rows)
    (folder / "metadata.jsonl").write_text(text)
    return folder


CONFIGS = {
    "hra": HRAConfig(r=8, target_modules=CONTROL_TARGETS),
    "lora": BaselineConfig("lora", CONTROL_TARGETS, rank=2),
    "oft": BaselineConfig("oft", CONTROL_TARGETS, oft_block_size=8),
}


@pytest.mark.parametrize(("kind", "residuals"), [*((kind, False) for kind in CONFIGS), ("hra", True)])
def test_zero_init_starts_at_the_base_model(kind, residuals, tiny_unet):
    """What the script builds before step 0 (HRA with paired vectors, LoRA with B = 0, OFT with R = I, and a
    zero-initialized encoder, with or without its residual hints) is the base UNet, and only the adapter and the
    encoder train."""
    base, unet = tiny_unet(), tiny_unet()
    torch.manual_seed(0)
    encoder = add_control(unet, CONFIGS[kind], vae_scale_factor=2, residuals=residuals)
    assert len(encoder.residual_convs) == (4 if residuals else 0)
    inputs = unet_inputs()
    with torch.no_grad(), control_condition(unet, torch.rand(2, 3, 32, 32)):
        controlled = unet(*inputs).sample
        expected = base(*inputs).sample
    assert (controlled - expected).abs().max() <= 1e-5
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    adapter = (hra_parameters(unet) if kind == "hra" else
               [p for name, p in unet.named_parameters() if f"{kind}_" in name])
    assert adapter and trainable == {id(p) for p in [*adapter, *encoder.parameters()]}


@pytest.mark.slow
def test_train_load_generate(tiny_sd, tiny_unet, shapes, tmp_path):
    out = tmp_path / "out"
    validation = shapes / "conditioning_images" / "0000.png"
    proc = train(
        tiny_sd,
        shapes,
        out,
        checkpointing_steps=2,
        validation_image=validation,
        validation_prompt="a red circle",
        num_validation_images=1,
        num_validation_inference_steps=2,
        proportion_empty_prompts=0.5,
    )
    assert "HRA + " in proc.stdout and "condition encoder" in proc.stdout
    ev = events(out)
    assert [e["step"] for e in ev if e["event"] == "step"] == [1, 2, 3, 4]
    assert ev[-1] == {"event": "done", "step": 4, "adapter": str(out / CONTROL_FILE)}
    assert [e["step"] for e in ev if e["event"] == "validation"] == [4]
    assert not (out / "hra_adapter.safetensors").exists()
    assert "hra_control.safetensors" in (out / "README.md").read_text()

    meta = read_hra_metadata(out / CONTROL_FILE)
    assert meta["kind"] == "control" and meta["control_type"] == "none" and meta["steps"] == "4"
    assert meta["hra_target_modules"] == ",".join(CONTROL_TARGETS)

    from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

    unet = tiny_unet()
    encoder = load_control_adapter(unet, out / CONTROL_FILE)
    n_hra, n_encoder = (sum(p.numel() for p in ps) for ps in (hra_parameters(unet), encoder.parameters()))
    assert f"trainable: {n_hra:,} HRA + {n_encoder:,} condition encoder" in proc.stdout
    assert ev[0]["trainable_params"] == n_hra + n_encoder
    assert find_trained(out) == out / CONTROL_FILE and trained_parameters(out / CONTROL_FILE) == n_hra + n_encoder
    assert any(path.endswith("ff.net.0.proj") for path, _ in hra_layers(unet)), "the GEGLU projections are adapted"

    # the trained condition steers the UNet: two condition maps, two different outputs
    inputs = unet_inputs()
    conditions = [Image.open(shapes / "conditioning_images" / f"000{i}.png") for i in (0, 1)]
    with torch.no_grad():
        outputs = []
        for condition in conditions:
            with control_condition(unet, condition_tensor(condition, (32, 32))):
                outputs.append(unet(*inputs).sample)
    assert (outputs[0] - outputs[1]).abs().max() > 1e-5

    # and pipelines.generate uses it, loaded the way users do
    pipe = load_pipeline(tiny_sd, device="cpu")
    kwargs = dict(seed=0, steps=2, height=32, width=32, output_type="np")
    plain = generate(pipe, "a red circle", **kwargs)[0]
    attach_adapters(pipe, [out / CONTROL_FILE])
    images = [generate(pipe, "a red circle", control_image=c, **kwargs)[0] for c in conditions]
    assert images[0].shape == (32, 32, 3)
    assert np.abs(images[0] - images[1]).max() > 1e-6 and np.abs(images[0] - plain).max() > 1e-6
    detach_trained(pipe)  # the evaluation's way off: the base model again, hint encoder and all
    assert control_encoder(pipe.unet) is None and np.array_equal(generate(pipe, "a red circle", **kwargs)[0], plain)


@pytest.mark.slow
def test_canny_maps_are_cached_and_resume_is_exact(tiny_sd, photos_only, tmp_path):
    """Without a conditioning column, canny maps are computed from the crops once and reused in the second epoch and
    by the next run; 4 steps straight == resume from the straight run's step-2 checkpoint + 2 steps."""
    cache = tmp_path / "cache"
    straight, split = tmp_path / "straight", tmp_path / "split"
    common = dict(control_type="canny", cache_dir=cache, random_flip=True)
    train(tiny_sd, photos_only, straight, checkpointing_steps=2, **common)
    maps = sorted((cache / "conditions" / "canny").glob("*.png"))
    # 4 photos, 2 steps per epoch: two epochs, each photo flipped or not per epoch
    assert 4 <= len(maps) <= 8
    edges = np.asarray(Image.open(maps[0]))
    assert edges.shape == (32, 32, 3) and set(np.unique(edges)) <= {0, 255} and edges.max() == 255
    mtimes = {p: p.stat().st_mtime_ns for p in maps}

    train(tiny_sd, photos_only, split, resume_from_checkpoint=straight / "checkpoint-2", **common)
    assert {p: p.stat().st_mtime_ns for p in sorted((cache / "conditions" / "canny").glob("*.png"))} == mtimes
    assert [e["step"] for e in events(split) if e["event"] == "step"] == [3, 4]
    assert read_hra_metadata(split / CONTROL_FILE)["control_type"] == "canny"

    from safetensors.torch import load_file

    a, b = (load_file(str(out / "checkpoint-4" / CHECKPOINT_WEIGHTS)) for out in (straight, split))
    half = load_file(str(straight / "checkpoint-2" / CHECKPOINT_WEIGHTS))
    assert a.keys() == b.keys() and any(k.startswith("unet.control_encoder.") for k in a)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert max((a[k] - half[k]).abs().max().item() for k in a) > 1e-5, "the last 2 steps changed the adapter"


def test_condition_map_cache_keys_on_pixels(tmp_path):
    maps = ConditionMaps("canny", tmp_path, 100, 200, weights="unused")
    square = Image.new("RGB", (32, 32))
    square.paste((255, 255, 255), (2, 4, 14, 20))
    first = maps(square)
    assert maps(square.copy()).tobytes() == first.tobytes()
    assert len(list((tmp_path / "canny").iterdir())) == 1
    maps(square.transpose(Image.Transpose.FLIP_LEFT_RIGHT))  # a flipped crop is a new entry, not the cached map
    assert len(list((tmp_path / "canny").iterdir())) == 2
    with pytest.raises(TrainingError, match="ControlNetHED.pth"):
        ConditionMaps("hed", tmp_path, 100, 200, weights=str(tmp_path / "no-weights")).check()


def test_hub_dataset_is_exported_once(shapes, tmp_path, monkeypatch):
    args = parse_args(["--pretrained_model_name_or_path", "m", "--dataset_name", "user/fill50k"])
    accelerator = SimpleNamespace(is_main_process=True, wait_for_everyone=lambda: None)
    monkeypatch.setitem(sys.modules, "datasets", None)  # import fails as when the package is missing
    with pytest.raises(TrainingError, match="needs the `datasets` package"):
        export_hub_dataset(args, tmp_path, accelerator)

    rows = [json.loads(line) for line in (shapes / "metadata.jsonl").read_text().splitlines()]
    records = [
        {**r, "image": Image.open(shapes / r["image"]), "conditioning_image": Image.open(shapes / r["image"])}
        for r in rows
    ]
    loads = []

    def load_dataset(name, config, split):
        loads.append(name)
        return Rows(records)

    monkeypatch.setitem(sys.modules, "datasets", SimpleNamespace(load_dataset=load_dataset))
    folder = export_hub_dataset(args, tmp_path, accelerator)
    assert folder.parent == tmp_path and loads == ["user/fill50k"]
    exported = [json.loads(line) for line in (folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["text"] for r in exported] == [r["text"] for r in rows]
    assert Image.open(folder / exported[0]["image"]).tobytes() == Image.open(shapes / rows[0]["image"]).tobytes()
    assert export_hub_dataset(args, tmp_path, accelerator) == folder and len(loads) == 1, "reused, not reloaded"
    assert len(ControlDataset(folder, 32)) == len(rows)


class Rows(list):
    """Stands in for a datasets.Dataset: iterable rows plus column_names."""

    column_names = ["image", "conditioning_image", "text"]


# --------------------------------------------------------------------------------------------------------------------
# The baselines: LoRA and OFT control adapters

BASELINE_FLAGS = {"lora": {"rank": 2, "lora_alpha": 4}, "oft": {"oft_block_size": 8}}


def expected_adapter_size(kind: str, unet: torch.nn.Module) -> int:
    """Trained numbers from the layer shapes alone: LoRA r(in + out) per layer, OFT b(b-1)/2 per block of b inputs."""
    rank, block = BASELINE_FLAGS["lora"]["rank"], BASELINE_FLAGS["oft"]["oft_block_size"]
    layers = [m for name, m in unet.named_modules()
              if isinstance(m, torch.nn.Linear) and name.endswith(CONTROL_TARGETS)]
    if kind == "lora":
        return sum(rank * (m.in_features + m.out_features) for m in layers)
    return sum(m.in_features // block * block * (block - 1) // 2 for m in layers)


def saved_files(out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of the saved result: the adapter's file(s) and the encoder file beside them."""
    from safetensors.torch import load_file

    adapter = find_trained(out)
    files = [adapter] if adapter.is_file() else sorted(adapter.glob("*/adapter_model.safetensors"))
    return {f"{file.relative_to(out)}/{key}": value
            for file in [*files, out / CONTROL_ENCODER_FILE] for key, value in load_file(str(file)).items()}


def trained_unet(unet: torch.nn.Module, out: Path) -> torch.nn.Module:
    """The UNet as the trainer left it, rebuilt from its settings and its last checkpoint (not the saved files)."""
    settings = ControlSettings.from_values(read_request(out / SETTINGS_FILE))
    add_control(unet, settings.adapter_config(), vae_scale_factor=2, residuals=settings.control_residuals)
    step = max(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))
    weights = Checkpoint(out / f"checkpoint-{step}").tensors(CHECKPOINT_WEIGHTS)
    load_trainable_state(unet, {k.removeprefix("unet."): v for k, v in weights.items()}, "unet")
    return unet.eval()


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lora", "oft"])
def test_baseline_control_resumes_exactly_and_loads_back(kind, tiny_sd, tiny_unet, shapes, tmp_path):
    flags = dict(adapter=kind, random_flip=True, proportion_empty_prompts=0.5, learning_rate=1e-2,
                 **BASELINE_FLAGS[kind])
    straight, split = tmp_path / "straight", tmp_path / "split"
    proc = train(tiny_sd, shapes, straight, max_train_steps=6, checkpointing_steps=100, **flags)
    saved = find_trained(straight)
    assert saved == (straight / LORA_WEIGHT_NAME if kind == "lora" else straight / OFT_FOLDER)
    meta = read_control_encoder_metadata(straight / CONTROL_ENCODER_FILE)
    assert (meta["kind"], meta["adapter"], meta["steps"]) == ("control", kind, "6")
    assert CONTROL_ENCODER_FILE in (straight / "README.md").read_text()

    # counts: the printed adapter part from the layer shapes, adapter + encoder in the start event and the files
    printed = re.search(r"trainable: ([\d,]+) (\w+) \+ ([\d,]+) condition encoder", proc.stdout)
    n_adapter, n_encoder = (int(printed[i].replace(",", "")) for i in (1, 3))
    assert printed[2] == {"lora": "LoRA", "oft": "OFT"}[kind]
    assert n_adapter == expected_adapter_size(kind, tiny_unet())
    assert n_encoder == sum(p.numel() for name, p in trained_unet(tiny_unet(), straight).named_parameters()
                            if name.startswith("control_encoder."))
    assert events(straight)[0]["trainable_params"] == n_adapter + n_encoder == trained_parameters(saved)

    # exact resume: 3 steps (mid-epoch), then resume latest for 3 more == 6 straight; the encoder is checkpointed
    train(tiny_sd, shapes, split, max_train_steps=3, checkpointing_steps=3, **flags)
    assert any(k.startswith("unet.control_encoder.")
               for k in Checkpoint(split / "checkpoint-3").tensors(CHECKPOINT_WEIGHTS))
    train(tiny_sd, shapes, split, max_train_steps=6, checkpointing_steps=100, resume_from_checkpoint="latest",
          **flags)
    a, b = saved_files(straight), saved_files(split)
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6

    # the saved files, loaded through their own loaders onto a fresh pipeline, are the trained controlled UNet
    from hra_diffusion.pipelines import load_pipeline

    reference = trained_unet(tiny_unet(), straight)
    pipe = load_pipeline(tiny_sd, device="cpu")
    inputs, condition = unet_inputs(), torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = pipe.unet(*inputs).sample
        attach_trained(pipe, saved, "control")
        with control_condition(pipe.unet, condition):
            loaded = pipe.unet(*inputs).sample
        with control_condition(reference, condition):
            want = reference(*inputs).sample
        detach_trained(pipe)
        again = pipe.unet(*inputs).sample
    assert (loaded - base).abs().max() > 1e-4, "it learned"
    assert (loaded - want).abs().max() <= 1e-5
    assert (again - base).abs().max() <= 1e-6 and control_encoder(pipe.unet) is None
