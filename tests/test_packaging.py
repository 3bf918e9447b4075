"""The library installs alone: every hra_diffusion module imports with only the core dependencies, and the extras'
features name the extra to install when it is missing.

A core-only environment is simulated in a subprocess by blocking every package that only the extras bring in
(sys.modules[name] = None makes its import fail and find_spec return None, as for an absent package).
"""

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def _closure(name: str, extras: frozenset[str] = frozenset()) -> set[str]:
    """The installed distributions that `name[extras]` pulls in, itself included, as its metadata says (setup.sh
    reinstalls the project, so that is pyproject.toml's)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [(name, extras)]
    while todo:
        name, extras = todo.pop()
        if (canonicalize_name(name), extras) in seen:
            continue
        seen.add((canonicalize_name(name), extras))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for req in map(Requirement, requires):
            if req.marker is None or any(req.marker.evaluate({"extra": e}) for e in {"", *extras}):
                todo.append((req.name, frozenset(req.extras)))
    return {dist for dist, _ in seen}


def _extras_only_modules() -> list[str]:
    """Top-level import names of the distributions that the extras (not dev) bring in and the core does not."""
    optional = _closure("hra-studio", frozenset({"all"})) - _closure("hra-studio")
    return sorted(
        module
        for module, dists in metadata.packages_distributions().items()
        if {canonicalize_name(d) for d in dists} <= optional
    )


CORE_ONLY = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys
    for name in json.loads(sys.argv[1]):
        sys.modules[name] = None
    import hra_diffusion
    for info in pkgutil.walk_packages(hra_diffusion.__path__, "hra_diffusion."):
        importlib.import_module(info.name)
    from PIL import Image
    from hra_diffusion.control import make_condition
    try:
        make_condition(Image.new("RGB", (64, 64)), "canny")
    except ModuleNotFoundError as err:
        print(err)
    """
)


def test_extras_bring_what_the_core_lacks():
    blocked = _extras_only_modules()
    assert {"gradio", "lpips", "open_clip", "controlnet_aux", "cv2", "tensorboard", "torchvision"} <= set(blocked)
    assert not {"torch", "diffusers", "transformers", "accelerate", "safetensors", "PIL", "numpy"} & set(blocked)


def test_library_imports_with_core_dependencies_only():
    run = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, json.dumps(_extras_only_modules())],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert 'pip install "hra-studio[train]"' in run.stdout


def test_app_without_gradio_names_its_extra():
    code = "import sys; sys.modules['gradio'] = None; from app.__main__ import main; main([])"
    run = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert run.returncode == 1
    assert 'pip install "hra-studio[app]"' in run.stderr
