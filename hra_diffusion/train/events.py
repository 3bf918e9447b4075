"""The progress protocol between a trainer and whoever watches it (the app's job queue): typed events, one JSON line
each, appended to ``--progress_file``.

The trainer writes with :class:`ProgressFile`, a reader gets the same classes back from :class:`ProgressReader`; the
schema lives here only, so both ends change together.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import ClassVar


@dataclass(frozen=True)
class Event:
    """One line of the progress file: ``{"event": kind, **fields}``."""

    kind: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps({"event": self.kind, **asdict(self)})


@dataclass(frozen=True)
class Start(Event):
    """Training begins (or resumes): the step count it runs to and how many values it trains."""

    kind: ClassVar[str] = "start"
    max_steps: int
    trainable_params: int


@dataclass(frozen=True)
class Step(Event):
    """One optimizer step done: its mean loss and orthogonality term, the rate it used, time so far and left."""

    kind: ClassVar[str] = "step"
    step: int
    max_steps: int
    loss: float
    orth: float
    lr: float
    elapsed_s: float
    eta_s: float


class Pace:
    """Step's elapsed_s and eta_s for one attempt (a start or a resume): the time left is the pace of this attempt's
    steps after its first one. The first step carries one-time costs (lazy initialization, allocator growth, the first
    batch); counted in, they ruled the estimate over the few steps a resumed tail has seen: a 20 s warm-up before 1 s
    steps put step 402 of 500 at 18 minutes left instead of 1.6."""

    def __init__(self, start_step: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.start_step, self.clock = start_step, clock
        self.t0 = clock()
        self.first_done: float | None = None

    def update(self, step: int, max_steps: int) -> tuple[float, float]:
        """(seconds since the attempt began, seconds left) now that ``step`` is done; steps come one by one."""
        now = self.clock()
        if self.first_done is None:  # the only step seen: its own time, warm-up and all, until the next one
            self.first_done = now
            per_step = now - self.t0
        else:
            per_step = (now - self.first_done) / (step - self.start_step - 1)
        return now - self.t0, per_step * (max_steps - step)


@dataclass(frozen=True)
class Validation(Event):
    """Sample images written at a step (absolute paths)."""

    kind: ClassVar[str] = "validation"
    step: int
    images: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Checkpoint(Event):
    """A whole checkpoint folder exists at ``path``."""

    kind: ClassVar[str] = "checkpoint"
    step: int
    path: str


@dataclass(frozen=True)
class Resources(Event):
    """What the run cost, written just before its last event: seconds spent in training steps in this attempt, and
    the peak memory (CUDA's peak allocation on a GPU, the process's peak resident set on a CPU)."""

    kind: ClassVar[str] = "resources"
    train_s: float
    peak_memory_mib: float


@dataclass(frozen=True)
class Done(Event):
    """Training reached its last step; ``adapter`` is the file written."""

    kind: ClassVar[str] = "done"
    step: int
    adapter: str | None


@dataclass(frozen=True)
class Stopped(Event):
    """A stop request (SIGTERM, Ctrl-C) ended the run after a step; a checkpoint and the adapter were saved."""

    kind: ClassVar[str] = "stopped"
    step: int
    adapter: str | None


@dataclass(frozen=True)
class Error(Event):
    """The run stopped on an error; ``message`` is what the user is told."""

    kind: ClassVar[str] = "error"
    message: str


EVENTS: dict[str, type[Event]] = {
    cls.kind: cls for cls in (Start, Step, Validation, Checkpoint, Resources, Done, Stopped, Error)
}


def parse_event(line: str | bytes) -> Event | None:
    """The event on one line, or None for a line that is not one (never written by our trainers, never fatal)."""
    try:
        data = json.loads(line)
        cls = EVENTS[data.pop("event")]
        return cls(**{f.name: data[f.name] for f in fields(cls) if f.name in data})
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def is_main_rank() -> bool:
    """Rank 0 of a launch (usable before accelerate is set up: torchrun sets RANK, a single process has none)."""
    return os.environ.get("RANK", "0") in ("", "0")


class ProgressFile:
    """Appends events as JSON lines, flushed at once; written by the main process only (None: no file)."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path).absolute() if path and is_main_rank() else None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def emit(self, event: Event) -> None:
        if self.path is None:
            return
        with self.path.open("a", encoding="utf-8") as fh:
            fh.write(event.to_json() + "\n")
            fh.flush()


class ProgressReader:
    """The events appended to a file since the last call; a half-written last line waits for the next call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def read(self) -> list[Event]:
        try:
            with open(self.path, "rb") as handle:
                handle.seek(self.offset)
                data = handle.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self.offset += end
        return [event for line in data[:end].splitlines() if (event := parse_event(line)) is not None]

