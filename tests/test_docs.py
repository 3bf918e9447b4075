"""The README's and the guides' commands run as written.

A fenced block right after a `<!-- test: run -->` line is run here: bash blocks with the project's venv first on
PATH (what `source .venv/bin/activate` does), python blocks with the venv's python, in the order they appear in
their file, so a later block may use what an earlier one made. The only change made to the text is that `/tmp/`
becomes this test's own temp folder, so runs never see each other's files.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = "<!-- test: run -->"
BLOCK = re.compile(re.escape(MARKER) + r"\s*\n```(bash|python)\n(.*?)\n```", re.S)


def runnable_blocks(path: Path) -> list[tuple[str, str]]:
    return BLOCK.findall(path.read_text(encoding="utf-8"))


def test_every_marker_is_followed_by_a_block():
    for path in DOCS:
        text = path.read_text(encoding="utf-8")
        assert text.count(MARKER) == len(runnable_blocks(path)), f"{path.name}: a marker without a block after it"


# What `accelerate launch` guesses, with a warning on every call, when neither given nor in an accelerate config
LAUNCH_GUESSES = ("--num_processes", "--num_machines", "--mixed_precision", "--dynamo_backend")


def test_accelerate_launch_commands_leave_nothing_to_guess():
    commands = []
    for path in DOCS:
        for block in re.findall(r"```bash\n(.*?)\n```", path.read_text(encoding="utf-8"), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                if "accelerate launch" in line:
                    launch = line.split("accelerate launch", 1)[1].split(".py", 1)[0].split()
                    commands.append((path.name, [flag for flag in LAUNCH_GUESSES if flag not in launch]))
    assert len(commands) >= 6, "the guides' launch commands were not found"
    assert [(name, missing) for name, missing in commands if missing] == []


@pytest.mark.slow
@pytest.mark.parametrize("doc", [p for p in DOCS if runnable_blocks(p)], ids=lambda p: p.name)
def test_commands_run_as_written(doc, tmp_path):
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
           "HF_HUB_OFFLINE": "1"}
    for i, (language, code) in enumerate(runnable_blocks(doc)):
        code = code.replace("/tmp/", f"{tmp_path}/")
        argv = ["bash", "-euo", "pipefail", "-c", code] if language == "bash" else [sys.executable, "-c", code]
        result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{doc.name} block {i + 1} failed:\n{code}\n{result.stdout[-2000:]}" \
                                       f"\n{result.stderr[-4000:]}"
        assert "were not passed to `accelerate launch`" not in result.stderr, f"{doc.name} block {i + 1}"
