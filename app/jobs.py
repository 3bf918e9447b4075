"""Training jobs: a FIFO queue on disk that runs one trainer subprocess at a time and follows its progress file.

The trainer runs in its own process so a crash, an out-of-memory kill or a Stop never takes the app down, and the
GPU (or the CPU cores) are used by one job at a time. Every job lives in ``jobs/<id>/`` (``job.json``, the
trainer's output folder, its log and progress files), written atomically, so the queue survives an app restart: a
job that was running when the app died comes back as "interrupted" and resumes from its last checkpoint.

Each job is a typed request: ``request.json`` in its folder holds the trainer's settings dataclass, and the trainer
runs with ``--config request.json`` (plus the attempt's progress file and, on a resume, ``latest``). The progress
protocol is :mod:`hra_diffusion.train.events`; SIGTERM asks the trainer to finish the current step, save a checkpoint
and the adapter, and exit.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from hra_diffusion.io import atomic_write
from hra_diffusion.train import events
from hra_diffusion.train.events import ProgressReader
from hra_diffusion.train.settings import TrainSettings, trainer_argv, write_request

QUEUED, RUNNING, STOPPING = "queued", "running", "stopping"
DONE, STOPPED, CANCELLED, FAILED, INTERRUPTED = "done", "stopped", "cancelled", "failed", "interrupted"
ACTIVE = (QUEUED, RUNNING, STOPPING)
RESUMABLE = (STOPPED, FAILED, INTERRUPTED)
POLL_S = 0.25
STOP_GRACE_S = 120.0  # SIGTERM waits for the current step; a real SD step on a CPU can take half a minute
LOG_TAIL_CHARS = 2000
MAX_HISTORY = 1000
REQUEST_FILE = "request.json"


@dataclass
class Job:
    """One training run as the UI and the API see it; ``job.json`` is this, as JSON."""

    id: str
    seq: int
    trainer: str  # the trainer's module, run as ``python -m trainer --config request.json``
    settings: dict[str, Any]  # what the page asked, for showing the job
    status: str = QUEUED
    created: float = field(default_factory=time.time)
    started: float | None = None
    finished: float | None = None
    attempts: int = 0
    pid: int | None = None
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    elapsed_s: float | None = None
    eta_s: float | None = None
    samples: list[str] = field(default_factory=list)
    history: list[list[float]] = field(default_factory=list)  # [step, loss, orth] for the live loss curve
    checkpoint: str | None = None
    adapter: str | None = None  # the trainer's adapter file, once it wrote one
    result: str | None = None  # what the app made of it (the adapter's name in the store)
    ended: str | None = None  # the trainer's last word in this attempt: done, stopped or error
    message: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Job:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def apply(self, event: events.Event) -> None:
        """Fold one progress event into the job."""
        if isinstance(event, (events.Start, events.Step)):
            self.max_steps = event.max_steps
        if isinstance(event, events.Step):
            self.step, self.loss, self.elapsed_s, self.eta_s = event.step, event.loss, event.elapsed_s, event.eta_s
            self.history = [h for h in self.history if h[0] < self.step]  # a resumed run repeats later steps
            self.history.append([self.step, float(event.loss), float(event.orth)])
            if len(self.history) > MAX_HISTORY:  # keep job.json small on long runs: every other point
                self.history = self.history[::2]
        elif isinstance(event, events.Validation):
            self.samples += [path for path in event.images if path not in self.samples]
        elif isinstance(event, events.Checkpoint):
            self.checkpoint = event.path
        elif isinstance(event, (events.Done, events.Stopped)):
            self.ended, self.step = event.kind, event.step
            self.adapter = event.adapter or self.adapter
        elif isinstance(event, events.Error):
            self.ended, self.message = event.kind, event.message


def _is_our_trainer(pid: int, job_dir: Path) -> bool:
    """True if ``pid`` is alive and its command line names this job's folder (pids get reused). Linux: /proc."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return False
    return str(job_dir) in cmdline


class JobQueue:
    """Jobs under ``root``, run in submission order by one worker thread, one at a time.

    ``on_finish(job)`` is called (on the worker thread) after a run ends, whatever the outcome, so the caller can
    register the adapter; its return value becomes ``job.result``.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        on_finish: Callable[[Job], str | None] | None = None,
    ) -> None:
        self.root = Path(root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)
        self.on_finish = on_finish
        self._cond = threading.Condition()
        self._procs: dict[str, subprocess.Popen] = {}
        self._closed = False
        self.jobs: dict[str, Job] = {}
        for path in sorted(self.root.glob("*/job.json")):
            try:
                job = Job.from_dict(json.loads(path.read_text()))
            except (OSError, ValueError, TypeError):
                continue  # a foreign or damaged folder is not a job; leave it alone
            self.jobs[job.id] = job
        # Left running by an app that died: shown as interrupted at once; the worker stops their trainers first.
        orphans = [job for job in self.jobs.values() if job.status in (RUNNING, STOPPING)]
        for job in orphans:
            job.status, job.finished = INTERRUPTED, time.time()
            job.message = "the app stopped while this job was running; resume it to continue from its last checkpoint"
            self._save(job)
        self._orphans = orphans
        self._worker = threading.Thread(target=self._work, name="hra-jobs", daemon=True)
        self._worker.start()

    # ---------------------------------------------------------------------------------------------------------- API

    def job_dir(self, job_id: str) -> Path:
        return self.root / job_id

    def submit(self, settings: dict[str, Any], trainer: str, prepare: Callable[[Path], TrainSettings]) -> Job:
        """Create a job folder, let ``prepare(folder)`` fill it (photos) and return the trainer's settings, write them
        as the job's request, then queue it. ``settings`` is what the page shows of the job."""
        job_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
        folder = self.job_dir(job_id)
        folder.mkdir(parents=True)
        write_request(prepare(folder), folder / REQUEST_FILE)
        with self._cond:
            seq = max((j.seq for j in self.jobs.values()), default=0) + 1
            job = Job(id=job_id, seq=seq, trainer=trainer, settings=settings)
            self.jobs[job_id] = job
            self._save(job)
            self._cond.notify_all()
        return job

    def get(self, job_id: str) -> Job:
        with self._cond:
            if job_id not in self.jobs:
                raise KeyError(f"no job {job_id!r}")
            return Job.from_dict(self.jobs[job_id].to_dict())  # a snapshot: the worker keeps updating the original

    def list(self) -> list[Job]:
        """All jobs, newest first."""
        with self._cond:
            return [Job.from_dict(j.to_dict()) for j in sorted(self.jobs.values(), key=lambda j: -j.seq)]

    def position(self, job_id: str) -> int | None:
        """1 for the next job to run, 2 for the one after, ...; None if the job is not waiting."""
        with self._cond:
            waiting = sorted((j for j in self.jobs.values() if j.status == QUEUED), key=lambda j: j.seq)
            return next((i + 1 for i, j in enumerate(waiting) if j.id == job_id), None)

    def cancel(self, job_id: str) -> Job:
        """A waiting job is dropped at once; a running one gets SIGTERM, saves a checkpoint and its adapter."""
        with self._cond:
            job = self.jobs[job_id] if job_id in self.jobs else None
            if job is None:
                raise KeyError(f"no job {job_id!r}")
            if job.status == QUEUED:
                job.status, job.finished = CANCELLED, time.time()
                self._save(job)
            elif job.status == RUNNING:
                job.status = STOPPING
                self._save(job)
                proc = self._procs.get(job_id)
                if proc is not None and proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            return self.get(job_id)

    def resume(self, job_id: str) -> Job:
        """Queue a stopped, failed or interrupted job again; the trainer continues from its latest checkpoint."""
        with self._cond:
            job = self.jobs[job_id] if job_id in self.jobs else None
            if job is None:
                raise KeyError(f"no job {job_id!r}")
            if job.status not in RESUMABLE:
                raise ValueError(f"job {job_id} is {job.status}; only {', '.join(RESUMABLE)} jobs can be resumed")
            job.status, job.message, job.finished, job.ended = QUEUED, "", None, None
            job.seq = max(j.seq for j in self.jobs.values()) + 1  # to the back of the line
            self._save(job)
            self._cond.notify_all()
            return self.get(job_id)

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker; a running trainer is asked to stop and its job marked interrupted (resumable)."""
        with self._cond:
            self._closed = True
            procs = list(self._procs.items())
            self._cond.notify_all()
        for _, proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        self._worker.join(timeout)

    # ------------------------------------------------------------------------------------------------------ workers

    def _save(self, job: Job) -> None:
        text = json.dumps(job.to_dict(), indent=1)
        atomic_write(self.job_dir(job.id) / "job.json", lambda tmp: Path(tmp).write_text(text))

    def _recover(self, job: Job) -> None:
        """Stop the trainer an earlier app left running (it saves a checkpoint), then take in its last progress."""
        folder = self.job_dir(job.id)
        if job.pid and _is_our_trainer(job.pid, folder):
            os.kill(job.pid, signal.SIGTERM)
            deadline = time.monotonic() + STOP_GRACE_S
            while _is_our_trainer(job.pid, folder) and time.monotonic() < deadline:
                time.sleep(POLL_S)
        events = ProgressReader(folder / f"progress-{job.attempts}.jsonl").read()
        with self._cond:
            for event in events:
                job.apply(event)
            job.pid = None
        self._finish(job)

    def _next(self) -> Job | None:
        with self._cond:
            while not self._closed:
                waiting = [j for j in self.jobs.values() if j.status == QUEUED]
                if waiting:
                    job = min(waiting, key=lambda j: j.seq)
                    job.status, job.started, job.attempts = RUNNING, time.time(), job.attempts + 1
                    self._save(job)
                    return job
                self._cond.wait()
            return None

    def _work(self) -> None:
        for job in self._orphans:
            self._recover(job)
        while (job := self._next()) is not None:
            try:
                self._run(job)
            except Exception as err:  # the worker must survive anything one job does
                with self._cond:
                    job.status, job.finished, job.message = FAILED, time.time(), f"{type(err).__name__}: {err}"
                    self._save(job)

    def _run(self, job: Job) -> None:
        folder = self.job_dir(job.id)
        progress = folder / f"progress-{job.attempts}.jsonl"
        argv = trainer_argv(job.trainer, folder / REQUEST_FILE, progress_file=progress,
                            resume_from_checkpoint="latest" if job.attempts > 1 else None)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(folder / "train.log", "ab") as log:
            log.write(f"\n$ {' '.join(argv)}\n".encode())
            log.flush()
            proc = subprocess.Popen(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT)
        reader = ProgressReader(progress)
        with self._cond:
            self._procs[job.id], job.pid = proc, proc.pid
            self._save(job)
            if job.status == STOPPING or self._closed:  # cancelled between the pick and the start
                proc.send_signal(signal.SIGTERM)
        stop_sent: float | None = None
        while True:
            rc = proc.poll()
            events = reader.read()
            with self._cond:
                for event in events:
                    job.apply(event)
                if events:
                    self._save(job)
                if job.status == STOPPING or self._closed:
                    stop_sent = stop_sent or time.monotonic()
            if rc is not None:
                break
            if stop_sent is not None and time.monotonic() - stop_sent > STOP_GRACE_S:
                proc.kill()
            time.sleep(POLL_S)
        with self._cond:
            self._procs.pop(job.id, None)
            status = self._outcome(job, stopping=job.status == STOPPING)
            message = job.message
            if status == FAILED and not message:
                message = f"the trainer exited with code {rc}:\n{self._log_tail(job)}"
        self._finish(job, status, message)

    def _finish(self, job: Job, status: str | None = None, message: str = "") -> None:
        """Hand the adapter (if the trainer wrote one) to ``on_finish``, then publish the run's end (``status``, if
        given) and the result in one step: no reader sees a finished job whose adapter is not stored yet."""
        result, problem = job.result, ""
        if job.adapter and self.on_finish is not None:
            try:
                result = self.on_finish(job)
            except Exception as err:  # a full disk must not stop the queue
                problem = f"the adapter could not be stored: {err}"
        with self._cond:
            if status is not None:
                job.pid, job.finished, job.eta_s = None, time.time(), None
                job.status, job.message = status, message
            job.result = result
            if problem:
                job.status, job.message = FAILED, problem
            self._save(job)

    def _outcome(self, job: Job, stopping: bool) -> str:
        if job.ended == "done":
            return DONE
        if self._closed and not stopping:
            return INTERRUPTED
        if job.ended == "stopped":
            return STOPPED
        return CANCELLED if stopping else FAILED

    def _log_tail(self, job: Job) -> str:
        text = (self.job_dir(job.id) / "train.log").read_text(errors="replace")
        return text[-LOG_TAIL_CHARS:].strip()
