"""Convert an HRA adapter (HRA Studio file or peft HRA folder) to peft, diffusers/kohya LoRA or a merged pipeline.

``python -m hra_diffusion.convert IN OUT --to FORMAT --base-model BASE``. The base pipeline is loaded because the
LoRA and merged forms contain its weights, and because an adapter for another model must be refused before anything
is written.
Exit codes: 0 done, 2 refused (wrong base model, unreadable adapter, unloadable base, existing output); the reason
goes to stderr, without a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .cli import HelpFormatter
from .export_formats import EXPORT_FORMATS
from .io import AdapterFileError, AdapterMismatchError, load_hra
from .model import hra_adapters, set_active_adapters
from .pipelines import load_pipeline, pipeline_components


def convert(
    source: str | Path,
    out: str | Path,
    to: str,
    base_model: str,
    adapter_name: str | None = None,
    strength: float = 1.0,
) -> Path:
    """Load ``source`` onto the base pipeline and write it in format ``to`` (see EXPORT_FORMATS); returns the file
    or folder written."""
    if to not in EXPORT_FORMATS:
        raise ValueError(f"--to must be one of {list(EXPORT_FORMATS)}, got {to!r}")
    fmt = EXPORT_FORMATS[to]
    target = fmt.target(out)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; choose another OUT (or delete it first)")
    pipe = load_pipeline(base_model, device="cpu")  # any supported family; clear errors for missing models
    components = pipeline_components(pipe)
    load_hra(components, source, adapter_name)
    adapted = {comp: model for comp, model in components.items() if hra_adapters(model)}
    (name,) = {n for model in adapted.values() for n in hra_adapters(model)}
    for model in adapted.values():
        set_active_adapters(model, [name], [strength])
    return fmt.write(pipe, out, name, base_model)


def build_parser() -> argparse.ArgumentParser:
    """The command line; ``--to`` lists EXPORT_FORMATS with their descriptions."""
    parser = argparse.ArgumentParser(
        prog="python -m hra_diffusion.convert",
        description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="IN", help="HRA Studio adapter file (.safetensors) or peft HRA folder")
    folders = ", ".join(fmt.name for fmt in EXPORT_FORMATS.values() if fmt.folder)
    files = ", ".join(fmt.name for fmt in EXPORT_FORMATS.values() if not fmt.folder)
    parser.add_argument(
        "out",
        metavar="OUT",
        help=f"output: for {folders} a folder that must not exist; for {files} a .safetensors file or a folder",
    )
    formats = "; ".join(f"{fmt.name}: {fmt.description}" for fmt in EXPORT_FORMATS.values())
    parser.add_argument("--to", required=True, choices=list(EXPORT_FORMATS), help=f"output format. {formats}")
    parser.add_argument("--base-model", required=True, help="pipeline the adapter was trained on (folder, hub id)")
    parser.add_argument("--adapter-name", default=None, help="name to load the adapter under (default: the file's)")
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="bake in H^strength (0..1) for lora-* and merged; peft needs 1",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        written = convert(args.source, args.out, args.to, args.base_model, args.adapter_name, args.strength)
    except (AdapterFileError, AdapterMismatchError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(written)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
