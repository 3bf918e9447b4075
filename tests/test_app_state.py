"""The app's state without Gradio: the job queue (with a stand-in trainer that speaks the progress protocol), the
adapter store and the Studio (photo checks, path safety, adapters, exports, control) on the tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from app.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    INTERRUPTED,
    QUEUED,
    RUNNING,
    STOPPED,
    Job,
    JobQueue,
    _is_our_trainer,
)
from app.store import AdapterStore
from app.studio import Studio
from app.training_service import TrainForm
from hra_diffusion import HRAConfig, add_hra, hra_parameters, save_hra
from hra_diffusion.train import TrainSettings, events
from hra_diffusion.train.events import ProgressReader
from hra_diffusion.train.settings import option
from training.dreambooth_hra import DreamBoothSettings

# A stand-in for training/dreambooth_hra.py: the same progress events and SIGTERM behaviour, no model, fast.
FAKE_TRAINER = textwrap.dedent(
    """
    import argparse, json, os, signal, sys, time
    p = argparse.ArgumentParser()
    p.add_argument("--config"); p.add_argument("--progress_file"); p.add_argument("--resume_from_checkpoint")
    args = p.parse_args()
    request = json.load(open(args.config))
    args.output_dir, args.steps = request["output_dir"], request["max_train_steps"]
    args.step_s, args.fail = request["step_s"], request["fail"]
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "runs.jsonl"), "a") as log:
        log.write(json.dumps({"argv": sys.argv[1:], "t0": time.time()}) + "\\n")
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    def emit(event, **kw):
        with open(args.progress_file, "a") as f:
            f.write(json.dumps({"event": event, **kw}) + "\\n")
    ckpt = os.path.join(args.output_dir, "step.txt")
    step = int(open(ckpt).read()) if args.resume_from_checkpoint and os.path.exists(ckpt) else 0
    emit("start", max_steps=args.steps, trainable_params=10)
    if args.fail:
        emit("error", message="the photos are all black")
        sys.exit(1)
    adapter = os.path.join(args.output_dir, "hra_adapter.safetensors")
    while step < args.steps:
        time.sleep(args.step_s)
        step += 1
        open(ckpt, "w").write(str(step))
        emit("step", step=step, max_steps=args.steps, loss=1.0 / step, orth=0.0, lr=1e-4, elapsed_s=step * args.step_s,
             eta_s=(args.steps - step) * args.step_s)
        if stop:
            open(adapter, "w").write("x")
            emit("stopped", step=step, adapter=adapter)
            sys.exit(0)
    open(adapter, "w").write("x")
    with open(os.path.join(args.output_dir, "runs.jsonl"), "a") as log:
        log.write(json.dumps({"t1": time.time()}) + "\\n")
    emit("done", step=step, adapter=adapter)
    """
)


@dataclass(kw_only=True)
class FakeSettings(TrainSettings):
    """The fake trainer's request: the shared settings plus its pace and whether it fails at once."""

    step_s: float = option(0.05, group="fake trainer", help="seconds per step")
    fail: bool = option(False, group="fake trainer", help="fail before the first step")


@pytest.fixture()
def fake_trainer(tmp_path: Path):
    script = tmp_path / "fake_trainer.py"
    script.write_text(FAKE_TRAINER)

    def prepare(steps: int = 3, step_s: float = 0.05, fail: bool = False):
        def request(folder: Path) -> FakeSettings:
            return FakeSettings(pretrained_model_name_or_path="fake", output_dir=str(folder / "out"),
                                max_train_steps=steps, step_s=step_s, fail=fail)

        return str(script), request

    return prepare


def wait_for(queue: JobQueue, job_id: str, done, timeout: float = 30.0) -> Job:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = queue.get(job_id)
        if done(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {queue.get(job_id).status} after {timeout} s")


def finished(job: Job) -> bool:
    return job.status not in (QUEUED, RUNNING, "stopping")


# ---------------------------------------------------------------------------------------------------------- queue


def test_a_job_shows_its_end_only_with_its_stored_adapter(tmp_path, fake_trainer):
    """While on_finish stores the adapter the job still reads as running; then done and its result appear together."""
    storing, release = threading.Event(), threading.Event()

    def on_finish(job):
        storing.set()
        release.wait(30)
        return "kept"

    queue = JobQueue(tmp_path / "jobs", on_finish=on_finish)
    try:
        job_id = queue.submit({"n": 0}, *fake_trainer(steps=2)).id
        assert storing.wait(30), "the trainer ran and on_finish was called"
        seen = queue.get(job_id)
        assert (seen.status, seen.result) == (RUNNING, None)
        release.set()
        job = wait_for(queue, job_id, finished)
    finally:
        release.set()
        queue.close()
    assert (job.status, job.result) == (DONE, "kept")


def test_jobs_run_one_at_a_time_in_order(tmp_path, fake_trainer):
    kept = []
    queue = JobQueue(tmp_path / "jobs", on_finish=lambda job: kept.append(job.id) or "kept")
    try:
        ids = [queue.submit({"n": i}, *fake_trainer(steps=3)).id for i in range(3)]
        assert queue.position(ids[2]) in (2, 3)  # the first may already have started
        jobs = [wait_for(queue, job_id, finished) for job_id in ids]
    finally:
        queue.close()
    assert [j.status for j in jobs] == [DONE] * 3
    assert kept == ids and all(j.result == "kept" for j in jobs)
    assert [j.step for j in jobs] == [3, 3, 3] and jobs[0].loss == pytest.approx(1 / 3)
    spans = []
    for job in jobs:
        lines = [json.loads(x) for x in (tmp_path / "jobs" / job.id / "out" / "runs.jsonl").read_text().splitlines()]
        spans.append((lines[0]["t0"], lines[-1]["t1"]))
    assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), "jobs overlapped"


def test_cancel_waiting_and_running_jobs(tmp_path, fake_trainer):
    queue = JobQueue(tmp_path / "jobs", on_finish=lambda job: "kept")
    try:
        running = queue.submit({}, *fake_trainer(steps=10_000, step_s=0.05))
        waiting = queue.submit({}, *fake_trainer(steps=3))
        wait_for(queue, running.id, lambda j: j.step >= 1)
        assert queue.cancel(waiting.id).status == CANCELLED
        t0 = time.monotonic()
        queue.cancel(running.id)
        stopped = wait_for(queue, running.id, finished)
        assert time.monotonic() - t0 < 5
    finally:
        queue.close()
    assert stopped.status == STOPPED and stopped.adapter and stopped.result == "kept"
    assert queue.get(waiting.id).status == CANCELLED and queue.get(waiting.id).attempts == 0


def test_failed_job_keeps_the_trainers_message(tmp_path, fake_trainer):
    queue = JobQueue(tmp_path / "jobs")
    try:
        job = wait_for(queue, queue.submit({}, *fake_trainer(fail=True)).id, finished)
    finally:
        queue.close()
    assert job.status == FAILED and job.message == "the photos are all black"


@pytest.mark.slow
def test_jobs_survive_an_app_crash_and_resume(tmp_path, fake_trainer):
    """A queue in another process is SIGKILLed mid-job: the next queue stops the orphan, shows the job as
    interrupted, and resuming continues from the checkpoint."""
    root = tmp_path / "jobs"
    script = tmp_path / "fake_trainer.py"  # written by the fixture
    app = subprocess.Popen([sys.executable, "-c", textwrap.dedent(f"""
        import time
        from app.jobs import JobQueue
        from tests.test_app_state import FakeSettings
        q = JobQueue({str(root)!r})
        request = lambda f: FakeSettings(pretrained_model_name_or_path="fake", output_dir=str(f / "out"),
                                         max_train_steps=40, step_s=0.1)
        q.submit({{}}, {str(script)!r}, request)
        q.submit({{}}, {str(script)!r}, request)
        time.sleep(60)
    """)])  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            states = [json.loads(p.read_text()) for p in root.glob("*/job.json")]
            if any(s["status"] == RUNNING and s["step"] >= 2 for s in states):
                break
            time.sleep(0.1)
        else:
            raise AssertionError("the job never ran")
    finally:
        app.send_signal(signal.SIGKILL)
        app.wait()
    orphan = next(s for s in (json.loads(p.read_text()) for p in root.glob("*/job.json")) if s["status"] == RUNNING)
    assert _is_our_trainer(orphan["pid"], root / orphan["id"]), "the trainer outlives the killed app"
    queue = JobQueue(root)
    try:
        first, second = sorted(queue.list(), key=lambda j: j.seq)
        assert first.status == INTERRUPTED and "resume" in first.message and second.status == QUEUED
        first = wait_for(queue, first.id, lambda j: j.pid is None)
        assert not _is_our_trainer(orphan["pid"], root / orphan["id"]), "the new app stopped the orphaned trainer"
        assert first.status == INTERRUPTED and 2 <= first.step < 40
        # the waiting job stays queued and now runs; the interrupted one resumes after it
        queue.resume(first.id)
        assert wait_for(queue, second.id, finished).status == DONE
        resumed = wait_for(queue, first.id, finished)
    finally:
        queue.close()
    assert resumed.status == DONE and resumed.step == 40 and resumed.attempts == 2
    runs = (root / first.id / "out" / "runs.jsonl").read_text()
    assert '"--resume_from_checkpoint", "latest"' in runs


def test_progress_reader_waits_for_whole_lines(tmp_path):
    path = tmp_path / "p.jsonl"
    reader = ProgressReader(path)
    assert reader.read() == []
    path.write_text('{"event": "start", "max_steps": 3, "trainable_params": 10}\n{"event": "ch')
    assert reader.read() == [events.Start(max_steps=3, trainable_params=10)]
    with open(path, "a") as f:
        f.write('eckpoint", "step": 1, "path": "c"}\n')
    assert reader.read() == [events.Checkpoint(step=1, path="c")]


@pytest.mark.parametrize("start_step", [0, 400])  # a fresh run and a resume at step 400 of 500
def test_time_left_leaves_out_the_warm_up(start_step):
    """The job view's time left, from the trainer's Step events: 1 s steps after a 20 s warm-up in an attempt's first
    step. Counting the warm-up in made the estimate after a resume far off (step 402 of 500: 18 minutes left, not
    1.6); from the second step on it is the pace since the first."""
    now = [1000.0]
    pace = events.Pace(start_step, clock=lambda: now[0])
    job = Job(id="j", seq=1, trainer="t", settings={})
    for step in range(start_step + 1, 501):
        now[0] += 21.0 if step == start_step + 1 else 1.0
        elapsed, eta = pace.update(step, 500)
        job.apply(events.Step(step=step, max_steps=500, loss=0.1, orth=0.0, lr=1e-4, elapsed_s=elapsed, eta_s=eta))
        assert job.elapsed_s == now[0] - 1000.0
        if step == start_step + 1:
            assert job.eta_s == 21.0 * (500 - step), "one step seen: its own time is all there is"
        else:
            assert job.eta_s == pytest.approx(500 - step), f"step {step}"


def test_job_json_is_written_atomically_and_reloaded(tmp_path, fake_trainer):
    queue = JobQueue(tmp_path / "jobs")
    try:
        job = wait_for(queue, queue.submit({"token": "sks"}, *fake_trainer()).id, finished)
    finally:
        queue.close()
    folder = tmp_path / "jobs" / job.id
    assert sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) == []  # no temp files left
    again = JobQueue(tmp_path / "jobs")
    try:
        assert again.get(job.id) == job
    finally:
        again.close()


# ---------------------------------------------------------------------------------------------------------- studio


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_sd):
    studio = Studio(tmp_path_factory.mktemp("data"), base_model=str(tiny_sd), warm=False)
    yield studio
    studio.close()


@pytest.fixture(scope="module")
def adapter_file(tmp_path_factory, tiny_sd) -> Path:
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd, subfolder="unet")
    add_hra(unet, HRAConfig(r=4))
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.add_(torch.randn_like(p))
    return save_hra(unet, tmp_path_factory.mktemp("a") / "my dog!.safetensors", metadata={"instance_prompt": "qwe"})


def pixel_diff(a: Image.Image, b: Image.Image) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def photos(folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    good = folder / "good.jpg"
    Image.new("RGB", (80, 60), (200, 30, 30)).save(good)
    truncated = folder / "truncated.jpg"
    truncated.write_bytes(good.read_bytes()[:200])
    text = folder / "notes.png"
    text.write_text("not an image")
    bomb = folder / "bomb.png"
    Image.new("1", (9000, 9000)).save(bomb)  # 81 MP, a few kB on disk
    empty = folder / "empty.webp"
    empty.write_bytes(b"")
    return {"good": good, "truncated": truncated, "text": text, "bomb": bomb, "empty": empty}


def test_photos_are_checked_one_by_one(studio, tmp_path):
    files = photos(tmp_path)
    good, rejected = studio.check_photos(list(files.values()))
    assert good == [files["good"]]
    reasons = {r["file"]: r["reason"] for r in rejected}
    assert set(reasons) == {"truncated.jpg", "notes.png", "bomb.png", "empty.webp"}
    assert "truncated or corrupt" in reasons["truncated.jpg"] and "not an image" in reasons["notes.png"]
    assert "over the limit" in reasons["bomb.png"] and "empty" in reasons["empty.webp"]
    with pytest.raises(ValueError, match="no usable photos.*notes.png: not an image"):
        studio.train([files["text"], files["empty"]], TrainForm())


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"r": 7}, "odd number of reflections"),
        ({"token": "two words"}, "subject token"),
        ({"class_noun": "../etc"}, "class noun"),
        ({"resolution": 100}, "multiple of 8"),
        ({"steps": 0}, "steps"),
        ({"seed": 2**64}, "seed must be between 0 and 4294967295"),
        ({"seed": -1}, "seed must be between"),
        ({"seed": 2**32}, "seed must be between"),
        ({"resolution": 0}, "resolution must be between 32 and 2048"),
        ({"resolution": -64}, "resolution must be between"),
        ({"learning_rate": float("nan")}, "learning rate"),
        ({"lambda_orth": float("inf")}, "λ"),
        ({"r": 200_000}, "r must be between 1 and 256"),
    ],
)
def test_bad_settings_are_explained(studio, change, message):
    with pytest.raises(ValueError, match=message):
        studio.request(TrainForm(**change))


def test_trainer_request_uses_diffusers_settings(studio):
    request = studio.request(TrainForm(steps=8, prior_preservation=True, class_noun="coffee mug"))
    assert isinstance(request, DreamBoothSettings)
    assert request.instance_prompt == "a photo of sks coffee mug" and request.validation_steps == 2
    assert request.with_prior_preservation and Path(request.class_data_dir).is_relative_to(studio.data_dir)


def test_only_files_inside_the_data_folder_are_served(studio, tmp_path):
    inside = studio.data_dir / "jobs" / "x.png"
    inside.parent.mkdir(parents=True, exist_ok=True)
    inside.write_bytes(b"png")
    assert studio.served_file(inside) == inside.resolve()
    link = studio.data_dir / "jobs" / "link.png"
    link.symlink_to("/etc/passwd")
    for path in ("/etc/passwd", studio.data_dir / ".." / "outside.png", link, Path(__file__)):
        with pytest.raises(PermissionError):
            studio.served_file(path)
    for name in ("../../etc/passwd", "/etc/passwd", "a/b", "", ".hidden"):
        with pytest.raises(ValueError, match="not an adapter name"):
            studio.export_adapter(name)
    with pytest.raises(FileNotFoundError):
        studio.export_adapter("no-such-adapter")
    job = Job(id="j", seq=1, trainer="training.dreambooth_hra", settings={},
              samples=[str(inside), "/etc/passwd", str(link)])
    studio.jobs.jobs["j"] = job
    try:
        assert studio.describe(job)["samples"] == [str(inside)]
    finally:
        del studio.jobs.jobs["j"]


def test_import_generate_export_delete(studio, adapter_file):
    info = studio.import_adapter(adapter_file)
    assert info["name"] == "my-dog" and info["kind"] == "subject" and info["r"] == 4
    assert info["instance_prompt"] == "qwe"
    assert studio.import_adapter(adapter_file)["name"] == "my-dog-2"
    kwargs = dict(seed=3, steps=2, num_images=1)
    base = studio.generate("a qwe dog", **kwargs)[0]
    adapted = studio.generate("a qwe dog", adapter="my-dog", **kwargs)[0]
    assert base.size == adapted.size == (64, 64) and pixel_diff(base, adapted) > 10
    assert pixel_diff(studio.generate("a qwe dog", adapter="my-dog", strength=0.0, **kwargs)[0], base) <= 1
    assert pixel_diff(studio.generate("a qwe dog", **kwargs)[0], base) <= 1, "none means the base model"

    assert studio.export_adapter("my-dog") == studio.store.path("my-dog")
    with zipfile.ZipFile(studio.export_adapter("my-dog", "peft")) as archive:
        assert sorted(archive.namelist()) == ["adapter_config.json", "adapter_model.safetensors"]
    for fmt in ("lora-diffusers", "lora-kohya"):
        path = studio.export_adapter("my-dog", fmt)
        assert path.suffix == ".safetensors" and path.is_relative_to(studio.data_dir)
    with zipfile.ZipFile(studio.export_adapter("my-dog", "merged")) as archive:
        assert "model_index.json" in archive.namelist()
    studio.delete_adapter("my-dog")
    studio.delete_adapter("my-dog-2")
    assert [a["name"] for a in studio.list_adapters()] == []
    assert not (studio.data_dir / "exports" / "my-dog").exists()
    with pytest.raises(FileNotFoundError):
        studio.generate("a qwe dog", adapter="my-dog", **kwargs)


def test_imports_that_do_not_fit_are_refused(studio, tmp_path):
    from diffusers import UNet2DConditionModel

    other = UNet2DConditionModel(
        sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=48,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        attention_head_dim=8, norm_num_groups=32,
    )  # fmt: skip
    add_hra(other, HRAConfig(r=2))
    wrong = save_hra(other, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="made for a different model"):
        studio.import_adapter(wrong)
    lora = tmp_path / "lora.safetensors"
    save_file({"unet.x.lora_A.weight": torch.zeros(2, 2)}, str(lora))
    with pytest.raises(ValueError, match="not an HRA Studio adapter"):
        studio.import_adapter(lora)
    pickled = tmp_path / "evil.safetensors"
    torch.save({"x": torch.zeros(1)}, pickled)  # a pickle, whatever its name says
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        studio.import_adapter(pickled)
    assert studio.list_adapters() == [] and not any(studio.store.root.iterdir())
    assert studio.generate("x", steps=1)[0].size == (64, 64), "a refused file leaves the pipeline usable"


def test_control_adapter_steers_generation(studio, tmp_path):
    from diffusers import UNet2DConditionModel

    from hra_diffusion.control import CONTROL_TARGETS, ConditionEncoder, attach_control, save_control_adapter

    unet = UNet2DConditionModel.from_pretrained(studio.base_model, subfolder="unet")
    add_hra(unet, HRAConfig(r=4, target_modules=CONTROL_TARGETS))
    encoder = ConditionEncoder.for_unet(unet, vae_scale_factor=2)
    torch.nn.init.normal_(encoder.conv_out.weight, std=0.5)  # a "trained" encoder: its output is not zero
    attach_control(unet, encoder)
    path = save_control_adapter(unet, encoder, tmp_path / "edges.safetensors")
    assert studio.import_adapter(path)["kind"] == "control"
    edges = Image.new("RGB", (64, 64))
    ImageDraw.Draw(edges).rectangle((16, 16, 48, 48), outline=(255, 255, 255), width=3)
    kwargs = dict(seed=0, steps=2, num_images=1)
    plain = studio.generate("a box", **kwargs)[0]
    steered = studio.generate("a box", control_adapter="edges", control_image=edges, control_type="none", **kwargs)
    assert pixel_diff(steered[0], plain) > 10
    assert pixel_diff(studio.generate("a box", **kwargs)[0], plain) <= 1, "no control image: no control"
    assert studio.condition(Image.new("RGB", (40, 30)), "canny").size == (40, 30)
    with pytest.raises(ValueError, match="needs a control adapter"):
        studio.generate("a box", control_image=edges, **kwargs)
    with pytest.raises(ValueError, match="HRA file only"):
        studio.export_adapter("edges", "lora-kohya")
    studio.delete_adapter("edges")


def test_store_lists_unreadable_files_with_the_reason(tmp_path):
    store = AdapterStore(tmp_path / "adapters", tmp_path / "exports")
    (store.root / "broken.safetensors").write_bytes(b"\x00" * 10)
    (store.root / "../escape.safetensors").write_bytes(b"")
    (store.root / "notes.txt").write_text("x")
    [row] = store.list()
    assert row["name"] == "broken" and "not a readable safetensors file" in row["error"]
    assert store.unique_name("broken") == "broken-2" and store.unique_name("ü/..") == "adapter"


def test_the_form_defaults_to_the_base_models_own_size(tiny_sdxl, tmp_path):
    """The size diffusers' own pipeline draws at when given no height (1024 for real SDXL; the tiny one's 64)."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl)
    studio = Studio(tmp_path / "data", base_model=str(tiny_sdxl), warm=False)
    try:
        assert studio.defaults().resolution == pipe.default_sample_size * pipe.vae_scale_factor
    finally:
        studio.close()


def test_a_rejected_request_creates_nothing(studio, tmp_path):
    """seed=2**64 once made a job whose job.json broke the job list for good; now nothing is created."""
    before = sorted(p.name for p in (studio.data_dir / "jobs").iterdir())
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 64), "red").save(photo)
    with pytest.raises(ValueError, match="seed"):
        studio.train([photo], TrainForm(seed=2**64))
    assert sorted(p.name for p in (studio.data_dir / "jobs").iterdir()) == before
    assert studio.list_jobs() == [studio.describe(j) for j in studio.jobs.list()]


@pytest.mark.parametrize(("field", "value", "message"), [
    ("seed", 2**64, "seed"), ("guidance", 1e30, "guidance must be between 0.0 and 30.0"), ("steps", 0, "steps"),
    ("strength", 1.5, "adapter strength"),
])  # fmt: skip
def test_generation_numbers_are_checked_first(studio, field, value, message):
    with pytest.raises(ValueError, match=message):
        studio.generate("a photo", **{field: value})


def test_a_second_app_on_one_data_folder_is_refused(studio):
    from app.lock import DataDirBusyError

    with pytest.raises(DataDirBusyError, match=f"pid {os.getpid()}"):
        Studio(studio.data_dir, base_model="unused", warm=False)
