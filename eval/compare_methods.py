"""HRA against LoRA and OFT with one protocol: the paper's Table 4, end to end, by one command.

    python -m eval.compare_methods --out /tmp/compare            # the demo world: 5 methods x 5 subjects
    python -m eval.compare_methods --out /tmp/compare --quick    # one subject, short runs (CI)

Every method is trained on every subject by the same trainer (training/dreambooth_hra.py --adapter ...), with the
same photos, steps, learning rate, prior preservation (class images shared), seeds and target layers; then the
DreamBooth benchmark (eval/dreambooth_benchmark.py) generates the prompt list with fixed seeds and scores DINO,
CLIP-I, CLIP-T and LPIPS. OUT/<method>/ keeps each method's adapters, images and reports; OUT/comparison.md (and
.json) is the table, OUT/comparison.png the chart, OUT/contact_sheet.png a row of images per method. A rerun skips
what exists (trained adapters, generated images).

With the demo world found, its model, subjects and scorers are the defaults; on real weights pass the benchmark's
flags (docs/evaluate.md has the paper's command for SD1.5 and the DreamBooth dataset).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

import eval.dreambooth_benchmark as benchmark
from eval.score import write_json_atomic
from hra_diffusion.demo_world import UNIQUE_TOKEN, find_demo_world
from hra_diffusion.io import atomic_write


@dataclass(frozen=True)
class Method:
    """One row of the table: a name, a folder name, and the trainer settings that make it this method."""

    name: str
    slug: str
    settings: dict[str, Any] = field(default_factory=dict)


# HRA r=8 and LoRA rank 4 train the same number of values on a square layer (8d against 4(d+d)); OFT with blocks of 16
# trains 16*15/2 per block, 7.5d per layer. Every other setting is shared.
METHODS = (
    Method("HRA (lambda 0)", "hra", {"adapter": "hra", "hra_r": 8}),
    Method("HRA (lambda 1e-3)", "hra_lambda", {"adapter": "hra", "hra_r": 8, "hra_lambda": 1e-3}),
    Method("HRA strictly orthogonal", "hra_gs", {"adapter": "hra", "hra_r": 8, "hra_apply_GS": True}),
    Method("LoRA (rank 4)", "lora", {"adapter": "lora", "rank": 4}),
    Method("OFT (blocks of 16)", "oft", {"adapter": "oft", "oft_block_size": 16}),
)

# The demo world's protocol: its subjects and scorers, the app's DreamBooth settings, 64 px, 2 images per prompt.
# LPIPS has no trained backbone offline, so its column there is a random-VGG structural distance (docs/evaluate.md).
DEMO_DEFAULTS = {"train_steps": 600, "learning_rate": 1e-3, "train_resolution": 64, "resolution": 64,
                 "num_class_images": 20, "images_per_prompt": 2, "token": UNIQUE_TOKEN, "lpips_size": 64,
                 "lpips_random_backbone": True, "train_launcher": "python", "contact_columns": 5}
QUICK = {"subjects": ["star_toy"], "train_steps": 40, "prompts_limit": 2, "images_per_prompt": 1, "steps": 10,
         "num_class_images": 4}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--base_model")
    first.add_argument("--quick", action="store_true")
    given = first.parse_known_args(argv)[0]
    world = find_demo_world()
    defaults: dict[str, Any] = {"adapters_dir": None, "train": True}
    if world is not None and given.base_model is None:  # the demo world's protocol; real weights take the paper's
        defaults |= {"dataset_dir": world.subjects, "base_model": str(world.base), "dino_model": str(world.dino),
                     "clip_model": str(world.clip), **DEMO_DEFAULTS}
    parser = benchmark.build_parser(prog="python -m eval.compare_methods", description=__doc__.split("\n\n")[0],
                                    defaults=defaults)
    parser.add_argument("--methods", nargs="+", choices=[m.slug for m in METHODS], default=[m.slug for m in METHODS],
                        help="only these rows of the table")
    parser.add_argument("--quick", action="store_true",
                        help="one subject, 40 steps, 2 prompts x 1 image: a check that every method runs (CI)")
    parser.add_argument("--learning_rates", nargs="+", default=[], metavar="METHOD=LR",
                        help="a learning rate per method (e.g. lora=3e-3), picked by the same sweep for every method "
                        "(docs/evaluate.md); the others use --learning_rate")
    if given.quick:  # its settings are defaults: flags given still win
        parser.set_defaults(**QUICK)
    args = benchmark.check_args(parser, parser.parse_args(argv))
    args.learning_rates = parse_rates(parser, args.learning_rates, METHODS)
    return args


def parse_rates(parser: argparse.ArgumentParser, items: Sequence[str], methods: Sequence[Method]) -> dict[str, float]:
    """--learning_rates METHOD=LR pairs as {slug: rate}; a malformed pair or an unknown method is a usage error."""
    try:
        rates = {slug: float(rate) for slug, rate in (item.split("=", 1) for item in items)}
    except ValueError:
        parser.error(f"--learning_rates takes METHOD=LR pairs, got {' '.join(items)}")
    unknown = set(rates) - {m.slug for m in methods}
    if unknown:
        parser.error(f"--learning_rates: no method {', '.join(sorted(unknown))}")
    return rates


def method_args(args: argparse.Namespace, method: Method) -> argparse.Namespace:
    """The benchmark's arguments for one method: its own folders, shared class images, its settings on top."""
    root = args.out / method.slug
    return argparse.Namespace(**{**vars(args), **method.settings, "out": root, "adapters_dir": root / "adapters",
                                 "method_name": method.name, "class_dir": args.class_dir or args.out / "class_images",
                                 "learning_rate": args.learning_rates.get(method.slug, args.learning_rate)})


def run(args: argparse.Namespace) -> list[dict]:
    reports = []
    for method in (m for m in METHODS if m.slug in args.methods):
        print(f"== {method.name}", flush=True)
        t0 = time.monotonic()
        settings = method_args(args, method)
        report = benchmark.run(settings)
        report["wall_s"], report["learning_rate"], report["train_steps"] = (time.monotonic() - t0,
                                                                            settings.learning_rate,
                                                                            settings.train_steps)
        reports.append(report)
    write_outputs(args, reports)
    return reports


# --------------------------------------------------------------------------------------------------------------------
# The table, the chart, the contact sheet


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """The lines of a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def report_cells(report: dict) -> list[str]:
    """A report's trainable parameters, learning rate, scores (the chart's keys), train seconds and peak memory, as
    table cells; "-" for what it does not have (an untrained row)."""
    def cell(key: str, form: str) -> str:
        return format(report[key], form) if report.get(key) else "-"

    return [cell("trainable_params", ","), cell("learning_rate", "g"),
            *(f"{value:.3f}" for value in report["aggregate"].values()), cell("train_s", ".0f"),
            cell("peak_memory_mib", ".0f")]


def comparison_markdown(reports: Sequence[dict]) -> str:
    keys = list(reports[0]["aggregate"])
    header = ["method", "trainable params", "lr", *keys, "train s / subject", "peak memory (MiB)"]
    lines = markdown_table(header, [[r["method"], *report_cells(r)] for r in reports])
    s = reports[0]["settings"]
    lines += ["", f"{reports[0]['train_steps']} training steps per subject for every method. "
              f"{reports[0]['num_subjects']} subjects, {reports[0]['prompts_per_subject']} prompts x "
              f"{reports[0]['images_per_prompt']} images per method; base model {s['base_model']}; {s['scheduler']} "
              f"{s['steps']} steps, guidance {s['guidance']}, seed {s['seed']}.",
              f"Metric networks: {', '.join(f'{k}={v}' for k, v in reports[0]['models'].items())}."]
    if "lpips" in keys and not reports[0]["models"].get("lpips_pretrained_backbone", True):
        lines.append("LPIPS used a random VGG backbone (no trained one offline): not the calibrated metric, only a "
                     "rough structural distance; compare it between rows, never with published LPIPS.")
    return "\n".join(lines) + "\n"


def chart(reports: Sequence[dict], size: tuple[int, int] = (720, 300)) -> Image.Image:
    """One panel per score of the reports' ``aggregate``, one bar per method, each panel scaled to its own range (PIL
    only: no plotting stack)."""
    keys = list(reports[0]["aggregate"])
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    colors = [(66, 103, 178), (96, 153, 220), (150, 190, 240), (220, 120, 60), (90, 170, 90)]
    panel_w, top, bottom = size[0] // max(len(keys), 1), 24, size[1] - 40
    for p, key in enumerate(keys):
        values = [r["aggregate"][key] for r in reports]
        high = max(max(values), 1e-9)
        x0 = p * panel_w + 10
        draw.text((x0, 4), key, fill="black")
        bar_w = (panel_w - 20) // len(values)
        for i, value in enumerate(values):
            height = 0 if not math.isfinite(value) else (bottom - top) * max(value, 0) / high
            x = x0 + i * bar_w
            draw.rectangle((x, bottom - height, x + bar_w - 4, bottom), fill=colors[i % len(colors)])
            draw.text((x, bottom + 4), f"{value:.2f}", fill="black")
    for i, r in enumerate(reports):
        draw.text((10 + i * (size[0] // len(reports)), size[1] - 16), r["method"], fill=colors[i % len(colors)])
    return image


def contact_sheet(args: argparse.Namespace, reports: Sequence[dict], cell: int = 96) -> Image.Image:
    """A row per method: the first subject's first photo, then image 0 of its first prompts, side by side."""
    subjects = benchmark.load_subjects(args)
    subject = subjects[0]
    prompts = range(min(args.contact_columns, len(subject.prompts)))
    rows = []
    for method in (m for m in METHODS if m.slug in args.methods):
        out = args.out / method.slug
        rows.append((method.name, [subject.image_paths[0],
                                   *(benchmark.Job(subject.name, p, 0).path(out) for p in prompts)]))
    return benchmark.labelled_rows(rows, cell)


def write_outputs(args: argparse.Namespace, reports: Sequence[dict]) -> None:
    summary = [{k: v for k, v in r.items() if k != "per_subject"} for r in reports]
    write_json_atomic(args.out / "comparison.json", {"methods": summary})
    text = comparison_markdown(reports)
    atomic_write(args.out / "comparison.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    for name, image in (("comparison.png", chart(reports)), ("contact_sheet.png", contact_sheet(args, reports))):
        atomic_write(args.out / name, lambda tmp, image=image: image.save(tmp, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        reports = run(args)
    except (benchmark.BenchmarkError, FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(comparison_markdown(reports))
    print(f"tables, chart and contact sheet in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
