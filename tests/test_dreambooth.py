"""DreamBooth with HRA, end to end: the real script in subprocesses on the tiny model and the fixture photos."""

from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load, load_file

from hra_diffusion import read_hra_metadata
from hra_diffusion.checkpoint import WEIGHTS as CHECKPOINT_WEIGHTS
from hra_diffusion.train.checkpointing import state_digest
from hra_diffusion.train.runtime import cast_frozen

ROOT = Path(__file__).resolve().parents[1]
DOG = ROOT / "tests" / "fixtures" / "subjects" / "dog"
# One thread per process: the tiny model gains nothing from more, and on a busy 2-core machine OpenMP threads
# waiting on each other make steps 50x slower.
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def base_args(model: Path, out: Path, **flags) -> list[str]:
    """The script's flags for a short tiny-model run; ``flags`` add or override (True = bare flag)."""
    values = {
        "pretrained_model_name_or_path": model,
        "instance_data_dir": DOG,
        "instance_prompt": "a photo of sks dog",
        "output_dir": out,
        "resolution": 32,
        "seed": 7,
        "max_train_steps": 2,
        "num_validation_images": 0,
        "report_to": "none",
        "progress_file": out / "progress.jsonl",
        **flags,
    }
    args = []
    for key, value in values.items():
        if value is True:
            args.append(f"--{key}")
        elif value is not None:
            args += [f"--{key}", str(value)]
    return args


def run_script(args: list[str], launcher: list[str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = launcher or [sys.executable, "-m", "training.dreambooth_hra"]
    return subprocess.run(cmd + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=timeout)


def ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def sigterm(proc: subprocess.Popen, timeout: float) -> tuple[str, float]:
    """Send SIGTERM and wait for the exit: (stderr, seconds it took to stop)."""
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=timeout)
    return stderr, time.monotonic() - sent


def events(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "progress.jsonl").read_text().splitlines()]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name.split("-")[1]) for p in out.glob("checkpoint-*"))


def adapter_tensors(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "hra_adapter.safetensors"))


def max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.slow
def test_full_run_with_prior_preservation(tiny_sd, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    args = base_args(
        tiny_sd,
        out,
        with_prior_preservation=True,
        class_prompt="a photo of a dog",
        class_data_dir=class_dir,
        num_class_images=3,
        sample_batch_size=2,
        num_class_inference_steps=2,
        max_train_steps=4,
        learning_rate=3e-3,
        checkpointing_steps=1,
        checkpoints_total_limit=2,
        validation_steps=2,
        num_validation_images=2,
        num_validation_inference_steps=2,
        report_to="tensorboard",
        random_flip=True,
    )
    proc = ok(run_script(args))
    assert "generating 3 with the base model" in proc.stderr
    class_images = sorted(class_dir.glob("*.png"))
    assert len(class_images) == 3
    mtimes = {p: p.stat().st_mtime_ns for p in class_images}

    ev = events(out)
    assert ev[0]["event"] == "start" and ev[0]["max_steps"] == 4 and ev[-1]["event"] == "done"
    assert [e["step"] for e in ev if e["event"] == "step"] == [1, 2, 3, 4]
    step = next(e for e in ev if e["event"] == "step")
    assert set(step) == {"event", "step", "max_steps", "loss", "orth", "lr", "elapsed_s", "eta_s"}
    assert [e["step"] for e in ev if e["event"] == "checkpoint"] == [1, 2, 3, 4]
    validations = [e for e in ev if e["event"] == "validation"]
    assert [e["step"] for e in validations] == [2, 4]
    for e in validations:
        assert len(e["images"]) == 2 and all(Path(p).is_absolute() and Path(p).is_file() for p in e["images"])
    assert ev[-1]["adapter"] == str(out / "hra_adapter.safetensors")

    assert checkpoint_steps(out) == [3, 4], "--checkpoints_total_limit 2 keeps the newest two"
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-2", "step-4"]
    assert (out / "sample_grid.png").is_file()
    assert list((out / "logs").rglob("events.out.tfevents.*")), "tensorboard logs"
    assert not list(out.rglob("pytorch_lora_weights.safetensors"))
    card = (out / "README.md").read_text()
    for text in (
        str(tiny_sd),
        "a photo of sks dog",
        "hra_adapter.safetensors",
        "attach_adapters",
        "sample_grid.png",
        "validation/step-4/00.png",
        "a photo of a dog",
    ):
        assert text in card

    meta = read_hra_metadata(out / "hra_adapter.safetensors")
    assert meta["base_model"] == str(tiny_sd) and meta["instance_prompt"] == "a photo of sks dog"
    assert meta["class_prompt"] == "a photo of a dog" and meta["steps"] == "4" and meta["resolution"] == "32"
    assert float(meta["learning_rate"]) == 3e-3 and meta["hra_r"] == "8" and meta["date"].startswith("20")
    tensors = adapter_tensors(out)
    assert sum(t.numel() for t in tensors.values()) == ev[0]["trainable_params"]
    checkpoint = load_file(str(out / "checkpoint-4" / CHECKPOINT_WEIGHTS))
    checkpoint = {k.replace(".hra_u.default", ".hra_u"): v for k, v in checkpoint.items()}
    assert max_diff(tensors, checkpoint) == 0.0, "the last checkpoint holds the final adapter"

    # the adapter loads in one call and changes the images
    from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

    pipe = load_pipeline(tiny_sd, device="cpu")
    kwargs = dict(seed=0, steps=2, height=32, width=32, output_type="np")
    before = generate(pipe, "a photo of sks dog", **kwargs)[0]
    attach_adapters(pipe, [out / "hra_adapter.safetensors"])
    after = generate(pipe, "a photo of sks dog", **kwargs)[0]
    assert np.abs(after - before).max() > 1e-4

    # a rerun (here: resuming for one more step) finds the class images and generates none
    proc = ok(
        run_script(
            base_args(
                tiny_sd,
                out,
                with_prior_preservation=True,
                class_prompt="a photo of a dog",
                class_data_dir=class_dir,
                num_class_images=3,
                max_train_steps=5,
                learning_rate=3e-3,
                resume_from_checkpoint="latest",
                checkpointing_steps=100,
                random_flip=True,
            )
        )
    )
    assert "none to generate" in proc.stderr
    assert {p: p.stat().st_mtime_ns for p in sorted(class_dir.glob("*.png"))} == mtimes
    assert [e["step"] for e in events(out)[len(ev) :] if e["event"] == "step"] == [5]


@pytest.mark.slow
def test_resume_is_exact(tiny_sd, tmp_path):
    """2N steps straight == N steps, stop, resume latest, N more: data order, crops/flips, noise and timesteps replay.
    Accumulation 2 over 3 photos makes steps of 2 and 1 micro-batches, so the resume lands mid-epoch."""
    common = dict(gradient_accumulation_steps=2, random_flip=True, learning_rate=1e-3)
    straight, split = tmp_path / "straight", tmp_path / "split"
    ok(run_script(base_args(tiny_sd, straight, max_train_steps=6, checkpointing_steps=100, **common)))
    ok(run_script(base_args(tiny_sd, split, max_train_steps=3, checkpointing_steps=3, **common)))
    half = adapter_tensors(split)
    ok(
        run_script(
            base_args(
                tiny_sd, split, max_train_steps=6, checkpointing_steps=100, resume_from_checkpoint="latest", **common
            )
        )
    )
    assert [e["step"] for e in events(split) if e["event"] == "step"] == [1, 2, 3, 4, 5, 6]
    assert max_diff(adapter_tensors(straight), adapter_tensors(split)) <= 1e-6
    assert max_diff(adapter_tensors(straight), half) > 1e-4, "the last N steps changed the adapter"


@pytest.mark.slow
def test_v_prediction_text_encoder_bf16_checkpointing(tiny_sd_v, tmp_path):
    out = tmp_path / "out"
    ok(
        run_script(
            base_args(
                tiny_sd_v,
                out,
                train_text_encoder=True,
                gradient_checkpointing=True,
                mixed_precision="bf16",
                hra_lambda=1e-3,
                num_validation_images=1,
                num_validation_inference_steps=2,
            )
        )
    )
    tensors = adapter_tensors(out)
    text = {k: t for k, t in tensors.items() if k.startswith("text_encoder.")}
    assert any(k.endswith("q_proj.hra_u") for k in text)
    # the vectors start in equal pairs (H = I); gradients reached them through gradient checkpointing
    assert all((t[:, 0::2] - t[:, 1::2]).abs().max() > 0 for t in text.values())
    assert any(k.startswith("unet.") for k in tensors)
    assert all(t.dtype == torch.float32 and torch.isfinite(t).all() for t in tensors.values())
    meta = read_hra_metadata(out / "hra_adapter.safetensors")
    assert meta["prediction_type"] == "v_prediction" and meta["train_text_encoder"] == "true"
    assert sorted(meta["adapters"]) == ["text_encoder", "unet"]
    steps = [e for e in events(out) if e["event"] == "step"]
    assert all(e["orth"] > 0 for e in steps), "--hra_lambda adds the orthogonality term"


@pytest.mark.slow
def test_sdxl_with_both_text_encoders_bf16(tiny_sdxl, tmp_path):
    out = tmp_path / "out"
    ok(
        run_script(
            base_args(
                tiny_sdxl,
                out,
                train_text_encoder=True,
                mixed_precision="bf16",
                learning_rate=3e-3,
                num_validation_images=1,
                num_validation_inference_steps=2,
            )
        )
    )
    meta = read_hra_metadata(out / "hra_adapter.safetensors")
    assert meta["pipeline"] == "StableDiffusionXLPipeline" and meta["resolution"] == "32"
    assert sorted(meta["adapters"]) == ["text_encoder", "text_encoder_2", "unet"]
    tensors = adapter_tensors(out)
    for part in ("unet.", "text_encoder.", "text_encoder_2."):  # the equal starting pairs moved apart: gradients came
        assert all((t[:, 0::2] - t[:, 1::2]).abs().max() > 0 for k, t in tensors.items() if k.startswith(part))
    assert "- stable-diffusion-xl" in (out / "README.md").read_text()

    from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

    pipe = load_pipeline(tiny_sdxl, device="cpu")
    kwargs = dict(seed=0, steps=2, height=32, width=32, output_type="np")
    before = generate(pipe, "a photo of sks dog", **kwargs)[0]
    attach_adapters(pipe, [out / "hra_adapter.safetensors"])
    assert np.abs(generate(pipe, "a photo of sks dog", **kwargs)[0] - before).max() > 1e-4


def test_mixed_precision_keeps_adapters_fp32(tiny_unet):
    from hra_diffusion import HRAConfig, add_hra, hra_parameters

    unet = add_hra(tiny_unet(), HRAConfig(r=4, apply_GS=True))
    cast_frozen(unet, torch.bfloat16)
    assert {p.dtype for p in hra_parameters(unet)} == {torch.float32}
    assert unet.conv_in.weight.dtype == torch.bfloat16
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.hra_u0["default"].dtype == torch.float32


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_end_identical(tiny_sd, tmp_path):
    """accelerate launch --multi_gpu with 2 processes (gloo on a machine without GPUs). Each rank hashes its own
    adapter and the main process prints the gathered digests: they must agree with each other and with the file."""
    out = tmp_path / "out"
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        str(ROOT / "training" / "dreambooth_hra.py"),
    ]
    proc = ok(
        run_script(
            base_args(
                tiny_sd,
                out,
                max_train_steps=3,
                checkpointing_steps=2,
                report_to="tensorboard",
                num_validation_images=1,
                num_validation_inference_steps=2,
            ),
            launcher=launcher,
            timeout=300,
        )
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("trainable state sha256 per process:")]
    assert len(lines) == 1, proc.stdout
    digests = lines[0].split(":", 1)[1].split()
    assert len(digests) == 2 and digests[0] == digests[1]
    assert digests[0] == state_digest(load_file(str(out / "checkpoint-3" / CHECKPOINT_WEIGHTS)))
    rng = load_file(str(out / "checkpoint-3" / "rng_state.safetensors"))
    assert set(rng) == {"rank0.torch", "rank1.torch"}, "the main process writes every process's RNG state"
    ev = events(out)
    assert [e["step"] for e in ev if e["event"] == "step"] == [1, 2, 3], "one line per step: main process only"
    assert [e["event"] for e in ev].count("done") == 1
    writers = {p.name.split(".")[-2] for p in (out / "logs").rglob("events.out.tfevents.*")}
    assert len(writers) == 1, "one process (pid) wrote the tensorboard logs"
    assert proc.stdout.count("trainable parameters:") == 1


@pytest.mark.slow
def test_corrupt_photos_missing_model_and_8bit_adam_fail_clearly(tiny_sd, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.jpg").write_bytes(os.urandom(400))
    (bad / "empty.png").write_bytes(b"")
    proc = run_script(base_args(tiny_sd, tmp_path / "o1", instance_data_dir=bad))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "broken.jpg: not an image" in proc.stderr and "empty.png: file is empty" in proc.stderr
    assert events(tmp_path / "o1")[-1]["event"] == "error"

    proc = run_script(base_args(tmp_path / "no-such-model", tmp_path / "o2"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "could not load base model" in proc.stderr and "no-such-model" in proc.stderr
    assert "could not load base model" in events(tmp_path / "o2")[-1]["message"]

    if importlib.util.find_spec("bitsandbytes") is None:  # where it is installed, the flag simply works
        proc = run_script(base_args(tiny_sd, tmp_path / "o3", use_8bit_adam=True))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "--use_8bit_adam needs bitsandbytes" in proc.stderr

    proc = run_script(base_args(tiny_sd, tmp_path / "o4", push_to_hub=True))  # HF_HUB_OFFLINE=1 here
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "--push_to_hub: could not create or open the Hub repo 'o4'" in proc.stderr
    assert [e["event"] for e in events(tmp_path / "o4")] == ["error"], "refused before the first step"

    if importlib.util.find_spec("xformers") is None:
        proc = run_script(base_args(tiny_sd, tmp_path / "o5", enable_xformers_memory_efficient_attention=True))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        assert "--enable_xformers_memory_efficient_attention" in proc.stderr and "pip install xformers" in proc.stderr


@pytest.mark.slow
def test_divergence_stops_and_keeps_the_last_good_checkpoint(tiny_sd, tmp_path):
    """An absurd learning rate makes the vectors overflow within a few steps (no test hook: real divergence)."""
    out = tmp_path / "out"
    proc = run_script(base_args(tiny_sd, out, learning_rate=1e30, max_train_steps=10, checkpointing_steps=1))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "training diverged at step" in proc.stderr
    assert not (out / "hra_adapter.safetensors").exists()
    ev = events(out)
    assert ev[-1]["event"] == "error" and "diverged" in ev[-1]["message"]
    steps = checkpoint_steps(out)
    assert steps, "at least one good step before the overflow"
    assert f"checkpoint-{steps[-1]}" in ev[-1]["message"]
    for step in steps:
        tensors = load_file(str(out / f"checkpoint-{step}" / CHECKPOINT_WEIGHTS))
        assert all(torch.isfinite(t).all() for t in tensors.values())


@pytest.mark.slow
def test_sigterm_stops_cleanly_and_resumes(tiny_sd, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "training.dreambooth_hra"] + base_args(
        tiny_sd, out, max_train_steps=100000, checkpointing_steps=100000
    )
    proc = subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "progress.jsonl").is_file() or '"step": 2,' not in (out / "progress.jsonl").read_text():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.2)
        stderr, took = sigterm(proc, timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert took < 15, f"took {took:.1f} s to stop"
    last = events(out)[-1]
    assert last["event"] == "stopped" and last["adapter"] == str(out / "hra_adapter.safetensors")
    stopped_at = last["step"]
    assert checkpoint_steps(out) == [stopped_at]

    from hra_diffusion import load_hra
    from hra_diffusion.pipelines import load_pipeline

    load_hra(load_pipeline(tiny_sd, device="cpu").unet, out / "hra_adapter.safetensors")
    # what a kill during the final save leaves (atomic_write's temp file, a checkpoint's temp folder) goes on resume
    stale = [out / ".hra_adapter.safetensors.x1y2.tmp", out / f".checkpoint-{stopped_at + 1}.tmp"]
    stale[0].write_bytes(b"half")
    stale[1].mkdir()
    ok(run_script(base_args(tiny_sd, out, max_train_steps=stopped_at + 1, resume_from_checkpoint="latest")))
    assert not any(path.exists() for path in stale)
    ev = events(out)
    assert ev[-1] == {"event": "done", "step": stopped_at + 1, "adapter": str(out / "hra_adapter.safetensors")}
    assert [e["step"] for e in ev if e["event"] == "step"][-1] == stopped_at + 1


def test_a_stop_ends_class_image_generation_between_denoising_steps(tiny_sd, tmp_path, monkeypatch):
    """A stop was seen only between batches: a 50-step batch on a starved CPU held it for minutes."""
    from types import SimpleNamespace

    from hra_diffusion.pipelines import load_pipeline
    from hra_diffusion.train.runtime import STOP
    from training.dreambooth_hra import DreamBoothSettings, generate_class_images

    monkeypatch.setattr(STOP, "requested", False)
    pipe = load_pipeline(tiny_sd, device="cpu")
    pipe.set_progress_bar_config(disable=True)
    steps = []
    step = pipe.scheduler.step

    def step_then_stop(*args, **kwargs):  # the signal arrives while the third denoising step runs
        steps.append(1)
        STOP.requested = len(steps) >= 3
        return step(*args, **kwargs)

    monkeypatch.setattr(pipe.scheduler, "step", step_then_stop)
    class_dir = tmp_path / "class"
    settings = DreamBoothSettings(
        pretrained_model_name_or_path=str(tiny_sd), instance_data_dir=str(DOG), instance_prompt="a photo of sks dog",
        output_dir=str(tmp_path / "out"), with_prior_preservation=True, class_prompt="a photo of a dog",
        class_data_dir=str(class_dir), num_class_images=4, sample_batch_size=2, num_class_inference_steps=50,
        resolution=32,
    )  # fmt: skip
    alone = SimpleNamespace(
        process_index=0, num_processes=1, device=torch.device("cpu"), is_local_main_process=False,
        wait_for_everyone=lambda: None,
    )  # fmt: skip
    generate_class_images(pipe, settings, alone, seed=0)
    assert len(steps) == 3, "the batch ended right after the step during which the stop came"
    assert list(class_dir.iterdir()) == [], "no image of the unfinished batch, and no temp file"


@pytest.mark.slow
def test_sigterm_during_class_images_stops_within_seconds(tiny_sd, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    args = base_args(
        tiny_sd, out, with_prior_preservation=True, class_prompt="a photo of a dog", class_data_dir=class_dir,
        num_class_images=2, sample_batch_size=2, num_class_inference_steps=500,
    )  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "training.dreambooth_hra", *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not class_dir.is_dir():  # made as generation starts, after the model has loaded
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(2)  # well inside the 500-step batch
        stderr, took = sigterm(proc, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr[-3000:]
    assert took < 10, f"took {took:.1f} s to stop"
    assert events(out)[-1] == {"event": "stopped", "step": 0, "adapter": None}
    assert list(class_dir.iterdir()) == []


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints are data: safetensors + JSON, never a pickle

SCHEDULED = dict(lr_scheduler="cosine", lr_warmup_steps=1, learning_rate=1e-3, random_flip=True)
# runs the trainer with unpickling (pickle.load/loads) and torch.save/torch.load refusing, and saying so on stderr
NO_PICKLE = [
    sys.executable,
    "-c",
    "import pickle, runpy, sys, torch\n"
    "def refuse(*args, **kwargs):\n"
    "    print('PICKLE USED', file=sys.stderr, flush=True)\n"
    "    raise AssertionError('pickle used')\n"
    "torch.load = torch.save = pickle.load = pickle.loads = refuse\n"
    "runpy.run_module('training.dreambooth_hra', run_name='__main__', alter_sys=True)\n",
]


@pytest.fixture(scope="module")
def scheduled_run(tiny_sd, tmp_path_factory) -> Path:
    """4 steps of warmup + cosine with checkpoints at 2 and 4: what the tests below resume, inspect and damage."""
    out = tmp_path_factory.mktemp("scheduled") / "out"
    ok(run_script(base_args(tiny_sd, out, max_train_steps=4, checkpointing_steps=2, **SCHEDULED), launcher=NO_PICKLE))
    return out


@pytest.mark.slow
def test_checkpoints_hold_no_pickle(scheduled_run):
    assert checkpoint_steps(scheduled_run) == [2, 4]
    for path in scheduled_run.glob("checkpoint-*/*"):
        assert path.suffix in (".json", ".safetensors"), f"{path.name}: only JSON and safetensors"
        data = path.read_bytes()
        assert not data.startswith((b"\x80", b"PK")), f"{path.name} is a pickle or a torch.save zip"
        json.loads(data) if path.suffix == ".json" else load(data)


@pytest.mark.slow
def test_resume_with_lr_schedule_is_bit_exact_without_pickle(scheduled_run, tiny_sd, tmp_path):
    """Steps 3-4 resumed from the 4-step run's checkpoint-2: same lrs, bit-identical adapter and checkpoint-4."""
    split = tmp_path / "split"
    args = base_args(
        tiny_sd,
        split,
        max_train_steps=4,
        checkpointing_steps=2,
        resume_from_checkpoint=scheduled_run / "checkpoint-2",
        **SCHEDULED,
    )
    ok(run_script(args, launcher=NO_PICKLE))
    straight = {e["step"]: e["lr"] for e in events(scheduled_run) if e["event"] == "step"}
    resumed = {e["step"]: e["lr"] for e in events(split) if e["event"] == "step"}
    assert len(set(straight.values())) == 4, "warmup, then cosine: a new lr every step"
    assert resumed == {3: straight[3], 4: straight[4]}
    a, b = adapter_tensors(scheduled_run), adapter_tensors(split)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    files = sorted(p.name for p in (scheduled_run / "checkpoint-4").iterdir())
    assert files == sorted(p.name for p in (split / "checkpoint-4").iterdir())
    for name in files:  # adapter, optimizer moments and step, schedule, RNG states, manifest
        expected = (scheduled_run / "checkpoint-4" / name).read_bytes()
        assert (split / "checkpoint-4" / name).read_bytes() == expected, name


class CreatesFile:
    """Unpickling this creates ``path``: it stands for any code a crafted pickle runs."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.slow
def test_checkpoint_with_a_pickle_is_refused_unopened(scheduled_run, tiny_sd, tmp_path):
    out, marker = tmp_path / "out", tmp_path / "code-ran"
    shutil.copytree(scheduled_run / "checkpoint-4", out / "checkpoint-4")
    (out / "checkpoint-4" / "custom_checkpoint_0.pkl").write_bytes(pickle.dumps(CreatesFile(marker)))
    proc = run_script(base_args(tiny_sd, out, max_train_steps=5, resume_from_checkpoint="latest"))
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert f"cannot resume from {out / 'checkpoint-4'}: it holds pickle files (custom_checkpoint_0.pkl)" in proc.stderr
    assert "can run arbitrary code" in proc.stderr
    assert not marker.exists(), "the pickle was loaded"
    assert [e["event"] for e in events(out)] == ["error"]


@pytest.mark.slow
def test_damaged_checkpoint_files_fail_clearly(scheduled_run, tiny_sd, tmp_path):
    """A truncated optimizer file (found before the model loads) and a flipped adapter byte (found when resuming)."""
    damages = (
        ("optimizer.safetensors", lambda data: data[:100], "optimizer.safetensors has 100 bytes, trainer_state.json"),
        (
            CHECKPOINT_WEIGHTS,
            lambda data: data[:-1] + bytes([data[-1] ^ 0xFF]),
            f"{CHECKPOINT_WEIGHTS} does not match its sha256 in trainer_state.json",
        ),
    )
    for name, damage, message in damages:
        out = tmp_path / name
        shutil.copytree(scheduled_run / "checkpoint-2", out / "checkpoint-2")
        path = out / "checkpoint-2" / name
        path.write_bytes(damage(path.read_bytes()))
        proc = run_script(base_args(tiny_sd, out, max_train_steps=3, resume_from_checkpoint="latest"))
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
        assert f"cannot resume from {out / 'checkpoint-2'}: {message}" in proc.stderr
        assert events(out)[-1]["event"] == "error" and not (out / "hra_adapter.safetensors").exists()
