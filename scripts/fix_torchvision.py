"""Make `import torchvision` work when its C extension cannot load (CPU torch with a CUDA torchvision).

torchvision 0.28.0's wheel is built against CUDA torch; with the CPU torch 2.13.0 its extension fails to
load and `_meta_registrations.py` then dies registering fakes for `torchvision::nms` (pytorch/vision#9085),
taking transformers, diffusers, lpips and open_clip down with it. Guarding those two registrations with
`extension._has_ops()` is enough: transforms and models work; `torchvision.ops.nms` does not (unused here).
A matching torch/torchvision pair never needs this, so the script does nothing there. Install-time only.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

GUARD = "if torchvision.extension._has_ops():  # patched by hra-studio scripts/fix_torchvision.py\n"


def imports_cleanly() -> bool:
    return subprocess.run([sys.executable, "-c", "import torchvision"], capture_output=True).returncode == 0


def main() -> int:
    spec = importlib.util.find_spec("torchvision")
    if spec is None or imports_cleanly():
        return 0
    path = Path(spec.origin).parent / "_meta_registrations.py"
    text = path.read_text()
    if GUARD in text:
        print(f"{path} is already patched but torchvision still fails to import", file=sys.stderr)
        return 1
    # the decorator, its def line, then the indented body (blank lines included)
    decorator = r'^@torch\.library\.register_fake\("torchvision::q?nms"\)\n'
    pattern = re.compile(decorator + r"def [^\n]*\n(?:    [^\n]*\n|\n)*", re.M)

    def indent(match: re.Match) -> str:
        return GUARD + "".join("    " + line if line.strip() else line for line in match.group(0).splitlines(True))

    patched, count = pattern.subn(indent, text)
    if count != 2:
        print(f"could not find the nms/qnms registrations in {path}; torchvision layout changed", file=sys.stderr)
        return 1
    if "import torchvision.extension" not in patched:
        patched = "import torchvision.extension\n" + patched
    path.write_text(patched)
    if not imports_cleanly():
        print("patched torchvision still fails to import", file=sys.stderr)
        return 1
    print(f"patched {path}: nms/qnms fake registrations now need the compiled extension")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
