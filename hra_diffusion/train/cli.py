"""Running a trainer from the command line: one line for a user's error, an "error" event for a UI, exit code 1."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from ..families import UnknownFamilyError, UnsupportedModelError
from ..hub import HubError
from ..images import ImageError
from ..io import AdapterFileError, AdapterMismatchError
from ..pipelines import ModelNotFoundError
from .errors import TrainingError
from .events import Error, ProgressFile, is_main_rank
from .runtime import STOP
from .settings import S

USER_ERRORS = (
    TrainingError,
    ModelNotFoundError,
    UnsupportedModelError,
    UnknownFamilyError,
    ImageError,
    AdapterFileError,
    AdapterMismatchError,
    HubError,
)


def run_cli(run: Callable[[S, ProgressFile], int], settings: S) -> int:
    """Run a trainer's ``run(settings, progress)``: user errors become one line on stderr, an "error" event and
    exit code 1; anything else is a bug and keeps its traceback (after an "error" event)."""
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
        level=logging.INFO if is_main_rank() else logging.WARNING,
    )
    progress = ProgressFile(settings.progress_file)
    STOP.install()
    try:
        return run(settings, progress)
    except USER_ERRORS as err:
        progress.emit(Error(message=str(err)))
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    except Exception as err:
        progress.emit(Error(message=f"{type(err).__name__}: {err}"))
        raise
