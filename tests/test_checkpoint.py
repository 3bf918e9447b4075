"""The pure-data checkpoint format, in process: exact round trips of optimizer, lr schedule and RNG, and clear errors
for folders that are damaged, of another format or hold pickles. The trainers' use of it: tests/test_dreambooth.py."""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.optimization import get_scheduler
from safetensors.torch import save

from hra_diffusion import checkpoint as ckpt
from hra_diffusion.train import TrainingError
from hra_diffusion.train.checkpointing import open_checkpoint

STEPS, SPLIT = 6, 3


def make_run(lr: float = 1e-2) -> tuple[dict[str, torch.nn.Parameter], torch.optim.Optimizer, object]:
    """Two named parameters, AdamW and a warmup + cosine schedule, as the trainer builds them."""
    gen = torch.Generator().manual_seed(0)
    params = {
        "unet.a.hra_u": torch.nn.Parameter(torch.randn(4, 2, generator=gen)),
        "unet.b.hra_u": torch.nn.Parameter(torch.randn(3, 2, generator=gen)),
    }
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=1e-2)
    scheduler = get_scheduler("cosine", optimizer=optimizer, num_warmup_steps=2, num_training_steps=STEPS)
    return params, optimizer, scheduler


def train_steps(params, optimizer, scheduler, n: int) -> list[float]:
    """``n`` steps whose gradients come from torch's, python's and numpy's global RNGs; returns the lr of each."""
    lrs = []
    for _ in range(n):
        scale = random.random() + float(np.random.rand())
        for p in params.values():
            p.grad = torch.randn_like(p) * scale
        lrs.append(scheduler.get_last_lr()[0])
        optimizer.step()
        scheduler.step()
    return lrs


def save_run(folder: Path, params, optimizer, scheduler) -> None:
    """What the trainer writes, without the trainer."""
    opt_tensors, opt_state = ckpt.optimizer_state(optimizer, params)
    rng_tensors, rng_state = ckpt.rng_files([ckpt.rng_state()])
    ckpt.write_checkpoint(
        folder,
        {"step": SPLIT, "seed": 7},
        tensors={ckpt.WEIGHTS: dict(params), ckpt.OPTIMIZER_TENSORS: opt_tensors, ckpt.RNG_TENSORS: rng_tensors},
        documents={
            ckpt.OPTIMIZER_STATE: opt_state,
            ckpt.SCHEDULER_STATE: ckpt.plain_state(scheduler),
            ckpt.RNG_STATE: rng_state,
        },
    )


def load_run(folder: Path, params, optimizer, scheduler) -> None:
    checkpoint = ckpt.Checkpoint(folder)
    with torch.no_grad():
        for name, tensor in checkpoint.tensors(ckpt.WEIGHTS).items():
            params[name].copy_(tensor)
    tensors, state = checkpoint.tensors(ckpt.OPTIMIZER_TENSORS), checkpoint.document(ckpt.OPTIMIZER_STATE)
    ckpt.load_optimizer_state(optimizer, params, tensors, state)
    ckpt.load_plain_state(scheduler, checkpoint.document(ckpt.SCHEDULER_STATE), ckpt.SCHEDULER_STATE)
    ckpt.load_rng_state(checkpoint.tensors(ckpt.RNG_TENSORS), checkpoint.document(ckpt.RNG_STATE), rank=0)


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    """A checkpoint after SPLIT steps."""
    seed_all(1)
    run = make_run()
    train_steps(*run, SPLIT)
    save_run(tmp_path / "checkpoint", *run)
    return tmp_path / "checkpoint"


def test_resume_is_bit_exact_with_lr_schedule_and_rngs(tmp_path):
    """STEPS straight == SPLIT steps, save, fresh objects and RNGs, load, the rest: same weights, same lrs."""
    seed_all(1)
    straight = make_run()
    straight_lrs = train_steps(*straight, STEPS)

    seed_all(1)
    first = make_run()
    first_lrs = train_steps(*first, SPLIT)
    save_run(tmp_path / "checkpoint", *first)
    seed_all(99)  # a new process: other RNG states, a fresh optimizer and schedule
    second = make_run()
    load_run(tmp_path / "checkpoint", *second)
    resumed_lrs = train_steps(*second, STEPS - SPLIT)

    assert first_lrs + resumed_lrs == straight_lrs and len(set(straight_lrs)) > 2, "warmup and cosine, replayed"
    for name, p in straight[0].items():
        assert torch.equal(p, second[0][name]), name
    assert second[1].state_dict()["state"][0]["step"].item() == STEPS


def test_files_are_safetensors_and_json(saved):
    files = sorted(p.name for p in saved.iterdir())
    assert files == sorted(
        [
            ckpt.MANIFEST,
            ckpt.WEIGHTS,
            ckpt.OPTIMIZER_TENSORS,
            ckpt.OPTIMIZER_STATE,
            ckpt.SCHEDULER_STATE,
            ckpt.RNG_TENSORS,
            ckpt.RNG_STATE,
        ]
    )
    manifest = json.loads((saved / ckpt.MANIFEST).read_text())
    assert manifest["format"] == ckpt.FORMAT and manifest["format_version"] == ckpt.FORMAT_VERSION
    assert manifest["step"] == SPLIT and set(manifest["files"]) == set(files) - {ckpt.MANIFEST}
    assert "lr_lambdas" not in json.loads((saved / ckpt.SCHEDULER_STATE).read_text()), "code is not data"


def rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace a file and its manifest entry: damage that sizes and digests cannot see."""
    (folder / name).write_bytes(data)
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    manifest["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / ckpt.MANIFEST).write_text(json.dumps(manifest))


def edit_manifest(folder: Path, **values) -> None:
    manifest = json.loads((folder / ckpt.MANIFEST).read_text())
    (folder / ckpt.MANIFEST).write_text(json.dumps({**manifest, **values}))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        pytest.param(
            lambda f: (f / "random_states_0.pkl").write_bytes(b"\x80\x04."),
            r"it holds pickle files \(random_states_0\.pkl\), which can run arbitrary code when loaded",
            id="pickle",
        ),
        pytest.param(lambda f: (f / ckpt.OPTIMIZER_TENSORS).unlink(), "optimizer.safetensors is missing", id="missing"),
        pytest.param(
            lambda f: truncate(f / ckpt.OPTIMIZER_TENSORS),
            "optimizer.safetensors has .* bytes, .*truncated",
            id="truncated",
        ),
        pytest.param(
            lambda f: edit_manifest(f, format_version=99),
            "format version 99, this trainer reads version 1",
            id="version",
        ),
        pytest.param(
            lambda f: (f / ckpt.MANIFEST).write_text('{"step": 3}'),
            "older HRA Studio wrote accelerate checkpoints",
            id="old-manifest",
        ),
        pytest.param(lambda f: (f / ckpt.MANIFEST).write_text("{"), "not readable JSON", id="manifest-json"),
        pytest.param(lambda f: edit_manifest(f, step="3"), "'step' must be an integer", id="step"),
        pytest.param(
            lambda f: edit_manifest(f, files={"../x": {"bytes": 1, "sha256": ""}}),
            "plain file names",
            id="path",
        ),
    ],
)
def test_unusable_folders_are_refused_before_loading(saved, damage, message):
    damage(saved)
    with pytest.raises(TrainingError, match=message) as err:
        open_checkpoint(saved)
    assert str(err.value).startswith(f"cannot resume from {saved}: ")


@pytest.mark.parametrize(
    ("damage", "load", "message"),
    [
        pytest.param(
            lambda f: flip_last_byte(f / ckpt.WEIGHTS),
            "weights",
            "^trainable.safetensors does not match its sha256",
            id="flipped",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.WEIGHTS, b"\x08" + bytes(15)),
            "weights",
            "trainable.safetensors is not a valid safetensors file",
            id="not-safetensors",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.OPTIMIZER_STATE, b"{"),
            "optimizer",
            "optimizer.json is not valid JSON",
            id="not-json",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.OPTIMIZER_TENSORS, save({"unet.a.hra_u/exp_avg": torch.zeros(2, 2)})),
            "optimizer",
            r"unet.a.hra_u/exp_avg has shape \(2, 2\), this run needs \(4, 2\)",
            id="shape",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.OPTIMIZER_TENSORS, save({"unet.c.hra_u/exp_avg": torch.zeros(2, 2)})),
            "optimizer",
            r"state for unknown parameters, e.g. \['unet.c.hra_u'\]",
            id="unknown-parameter",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.SCHEDULER_STATE, b'{"base_lrs": [0.1]}'),
            "scheduler",
            "has no last_epoch",
            id="scheduler-incomplete",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.SCHEDULER_STATE, b'{"base_lrs": [0.1, 0.2], "last_epoch": 1}'),
            "scheduler",
            "base_lrs is .*, this run needs",
            id="scheduler-groups",
        ),
        pytest.param(
            lambda f: rewrite(f, ckpt.RNG_STATE, b'{"python": 1}'),
            "rng",
            "does not hold python and numpy RNG states",
            id="rng",
        ),
    ],
)
def test_damaged_files_raise_checkpoint_errors(saved, damage, load, message):
    """Damage found while loading: a CheckpointError with the reason, which the trainer reports as a TrainingError."""
    damage(saved)
    params, optimizer, scheduler = make_run()
    checkpoint = ckpt.Checkpoint(saved)
    loads = {
        "weights": lambda: checkpoint.tensors(ckpt.WEIGHTS),
        "optimizer": lambda: ckpt.load_optimizer_state(
            optimizer, params, checkpoint.tensors(ckpt.OPTIMIZER_TENSORS), checkpoint.document(ckpt.OPTIMIZER_STATE)
        ),
        "scheduler": lambda: ckpt.load_plain_state(scheduler, checkpoint.document(ckpt.SCHEDULER_STATE), "schedule"),
        "rng": lambda: ckpt.load_rng_state(
            checkpoint.tensors(ckpt.RNG_TENSORS), checkpoint.document(ckpt.RNG_STATE), rank=0
        ),
    }
    with pytest.raises(ckpt.CheckpointError, match=message):
        loads[load]()


def test_optimizer_state_follows_names_not_positions(saved):
    """A run whose parameters come in another order still gets each parameter's own moments."""
    params, optimizer, _ = make_run()
    reordered = dict(reversed(params.items()))
    optimizer = torch.optim.AdamW(reordered.values(), lr=1e-2)
    checkpoint = ckpt.Checkpoint(saved)
    tensors = checkpoint.tensors(ckpt.OPTIMIZER_TENSORS)
    ckpt.load_optimizer_state(optimizer, reordered, tensors, checkpoint.document(ckpt.OPTIMIZER_STATE))
    for name, p in params.items():
        assert torch.equal(optimizer.state[p]["exp_avg"], tensors[f"{name}/exp_avg"])
