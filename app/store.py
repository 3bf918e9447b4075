"""The adapter shelf: HRA files under ``adapters/``, their metadata, and the exports made from them.

An adapter's name is its file stem and the name it is loaded under in the pipeline, so names are restricted to
letters, digits, "_" and "-": nothing a request can turn into a path outside the folder.
"""

from __future__ import annotations

import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from hra_diffusion.families import DENOISERS
from hra_diffusion.io import atomic_write, read_hra_metadata

SUFFIX = ".safetensors"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,79}")


def slug(text: str, fallback: str = "adapter") -> str:
    """A valid adapter name made from free text (an uploaded file's name, a token)."""
    name = re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-_")[:80]
    return name if NAME_RE.fullmatch(name) else fallback


def inside(root: Path, path: str | os.PathLike) -> Path:
    """``path`` resolved (links followed) if it lies inside ``root``; PermissionError otherwise."""
    resolved = Path(path).resolve()
    if not resolved.is_relative_to(root.resolve()):
        raise PermissionError(f"{path} is outside the data folder; only files inside {root} are served")
    return resolved


class AdapterStore:
    """Adapter files in ``root``; exports cached in ``exports_root/<name>/``."""

    def __init__(self, root: str | os.PathLike, exports_root: str | os.PathLike) -> None:
        self.root = Path(root).absolute()
        self.exports_root = Path(exports_root).absolute()
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, name: str) -> Path:
        """The file of adapter ``name``; ValueError for a malformed name, FileNotFoundError for an unknown one."""
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an adapter name (letters, digits, '_' and '-', at most 80)")
        path = inside(self.root, self.root / f"{name}{SUFFIX}")
        if not path.is_file():
            raise FileNotFoundError(f"no adapter named {name!r}")
        return path

    def names(self) -> list[str]:
        """Adapter names, newest first."""
        files = [p for p in self.root.glob(f"*{SUFFIX}") if NAME_RE.fullmatch(p.stem)]
        return [p.stem for p in sorted(files, key=lambda p: -p.lstat().st_mtime)]  # lstat: a dangling link has no stat

    def unique_name(self, wanted: str) -> str:
        """``wanted`` (made valid), or ``wanted-2``, ``wanted-3``, ... if taken."""
        base = slug(wanted)
        taken = set(self.names())
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base[:75]}-{n}"
        return name

    def info(self, name: str) -> dict[str, Any]:
        """What the adapter list shows; the file's own metadata is the only source, so imports look the same."""
        path = self.path(name)
        meta = read_hra_metadata(path)
        parts = meta["adapters"]
        main = next((parts[name] for name in DENOISERS if name in parts), next(iter(parts.values()), {}))
        config = main.get("config", {})
        stat = path.stat()
        return {
            "name": name,
            "kind": meta.get("kind", "subject"),
            "base_model": meta.get("base_model", ""),
            "instance_prompt": meta.get("instance_prompt", ""),
            "steps": _number(meta.get("steps")),
            "r": config.get("r"),
            "components": sorted(parts),
            "created": meta.get("date") or time.strftime("%Y-%m-%d %H:%M", time.localtime(stat.st_mtime)),
            "size_kb": round(stat.st_size / 1024, 1),
        }

    def list(self) -> list[dict[str, Any]]:
        """Every readable adapter; an unreadable file (or a link leading outside the folder) is listed with the reason
        instead of hiding it or breaking the whole list."""
        rows = []
        for name in self.names():
            try:
                rows.append(self.info(name))
            except (ValueError, OSError) as err:  # AdapterFileError is a ValueError; inside() raises PermissionError
                rows.append({"name": name, "error": str(err)})
        return rows

    def add(self, source: str | os.PathLike, name: str) -> Path:
        """Copy ``source`` in as adapter ``name`` (replacing an older file of that name), atomically."""
        if not NAME_RE.fullmatch(name):
            raise ValueError(f"{name!r} is not an adapter name")
        self.drop_exports(name)
        return atomic_write(self.root / f"{name}{SUFFIX}", lambda tmp: shutil.copyfile(source, tmp))

    def delete(self, name: str) -> None:
        path = self.path(name)
        self.drop_exports(name)
        path.unlink()

    def export_path(self, name: str, filename: str) -> Path:
        """Where export ``filename`` of adapter ``name`` is cached (``add`` and ``delete`` drop the cache)."""
        self.path(name)
        return self.exports_root / name / filename

    def drop_exports(self, name: str) -> None:
        shutil.rmtree(self.exports_root / name, ignore_errors=True)


def _number(value: Any) -> Any:
    try:
        return int(value)
    except (TypeError, ValueError):
        return value
