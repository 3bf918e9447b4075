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
from .export import export_lora, export_merged, export_peft, lora_file
from .io import AdapterFileError, AdapterMismatchError, load_hra
from .model import hra_adapters, set_active_adapters
from .pipelines import load_pipeline, pipeline_components

TARGETS = ("peft", "lora-diffusers", "lora-kohya", "merged")


def convert(
    source: str | Path,
    out: str | Path,
    to: str,
    base_model: str,
    adapter_name: str | None = None,
    strength: float = 1.0,
) -> list[Path]:
    """Load ``source`` onto the base pipeline and write it as ``to``; returns what was written."""
    if to not in TARGETS:
        raise ValueError(f"--to must be one of {TARGETS}, got {to!r}")
    target = lora_file(out) if to.startswith("lora-") else Path(out)
    if target.exists() and not (target.is_dir() and not any(target.iterdir())):
        raise FileExistsError(f"{target} already exists; choose another OUT (or delete it first)")
    pipe = load_pipeline(base_model, device="cpu")  # SD 1.x/2.x or SDXL; clear errors for missing models
    components = pipeline_components(pipe)
    load_hra(components, source, adapter_name)
    adapted = {comp: model for comp, model in components.items() if hra_adapters(model)}
    (name,) = {n for model in adapted.values() for n in hra_adapters(model)}
    for model in adapted.values():
        set_active_adapters(model, [name], [strength])
    if to == "peft":  # one peft folder per model: OUT itself, or OUT/<component> when text encoders have parts
        if len(adapted) == 1:
            return [export_peft(next(iter(adapted.values())), out, name, base_model=base_model)]
        return [export_peft(model, Path(out) / comp, name, base_model=base_model) for comp, model in adapted.items()]
    if to == "merged":
        return [export_merged(pipe, out)]
    return [export_lora(adapted, out, format=to.removeprefix("lora-"), adapter_name=name)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m hra_diffusion.convert", description=__doc__.splitlines()[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("source", metavar="IN", help="HRA Studio adapter file (.safetensors) or peft HRA folder")
    parser.add_argument(
        "out",
        metavar="OUT",
        help="output: a folder (peft, merged; must not exist) or, for LoRA, a .safetensors file or a folder",
    )
    parser.add_argument("--to", required=True, choices=TARGETS, help="output format")
    parser.add_argument("--base-model", required=True, help="pipeline the adapter was trained on (folder, hub id)")
    parser.add_argument("--adapter-name", default=None, help="name to load the adapter under (default: the file's)")
    parser.add_argument(
        "--strength",
        type=float,
        default=1.0,
        help="bake in H^strength (0..1) for lora-* and merged; peft needs 1",
    )
    args = parser.parse_args(argv)
    try:
        written = convert(args.source, args.out, args.to, args.base_model, args.adapter_name, args.strength)
    except (AdapterFileError, AdapterMismatchError, OSError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
