"""One app per data folder: two apps on one folder would both run the same queued job into the same output folder.

An advisory ``flock`` on ``<data>/.lock``, held for the app's lifetime; the kernel drops it when the process dies,
so a crash never leaves a stale lock. The file records the holder's pid for the error message.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path


class DataDirBusyError(RuntimeError):
    """Another HRA Studio process holds the data folder."""


class DataDirLock:
    def __init__(self, data_dir: Path) -> None:
        self.path = data_dir / ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirBusyError(
                f"another HRA Studio (pid {holder}) is using the data folder {data_dir}; stop it first, or start this "
                "one with another --data-dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock
            self._fd = None
