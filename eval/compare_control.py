"""HRA against LoRA and OFT for controllable generation, by one command: the paper's control comparison on the demo
world.

    python -m eval.compare_control --out /tmp/compare-control            # 4 rows, 1,000 steps per method
    python -m eval.compare_control --out /tmp/compare-control --quick    # a few steps: every method runs (CI)

Every method's control adapter (its adapter on the UNet plus the same hint encoder) is trained by the same trainer,
training/control_hra.py --adapter hra|lora|oft, on the same world pictures with their Canny maps (computed once and
shared), with the same steps, batch, empty-caption share, seed and target layers. Then each method draws one image
per held-out picture from that picture's Canny map and caption (image i with seed i), and eval.control_score scores
edge IoU / F1 against the pictures. "No control" is the base model on the captions alone.

OUT/<method>/ keeps the run (adapter/, its progress file), images/ and score.json; OUT/control_comparison.md (and
.json) is the table, OUT/control_chart.png the chart, OUT/control_contact_sheet.png the pictures, their edges and each
method's images. A rerun skips what exists (training data, trained adapters, images); other settings need a new OUT.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from eval.compare_methods import Method, chart, markdown_table, parse_rates, report_cells
from eval.control_score import score_control
from eval.demo_world import SAMPLING
from eval.dreambooth_benchmark import labelled_rows
from eval.score import write_json_atomic
from hra_diffusion.baselines import attach_trained, detach_trained, find_trained, trained_parameters
from hra_diffusion.cli import HelpFormatter
from hra_diffusion.demo_world import find_demo_world
from hra_diffusion.io import atomic_write
from hra_diffusion.train.events import ProgressReader, Resources
from hra_diffusion.train.settings import trainer_argv, write_request

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_WORLD_SEED = 1  # the world seed of the training pictures (the base model itself was trained on seed 0)

# On the demo world's UNet (widths 48-192), on CONTROL_TARGETS: HRA r = 8 trains 77,440 values, LoRA rank 3 86,640
# (rank 2: 57,760), OFT with blocks of 16 72,600; the hint encoder adds 85,920 to each.
NO_CONTROL = Method("no control (caption only)", "none")
METHODS = (
    NO_CONTROL,
    Method("HRA r=8 (lambda 0)", "hra", {"adapter": "hra", "hra_r": 8}),
    Method("LoRA (rank 3)", "lora", {"adapter": "lora", "rank": 3}),
    Method("OFT (blocks of 16)", "oft", {"adapter": "oft", "oft_block_size": 16}),
)
TRAINED = [m for m in METHODS if m is not NO_CONTROL]
QUICK = {"steps": 20, "train_pictures": 16, "batch_size": 4, "held_out": 2, "sample_steps": 5}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m eval.compare_control", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for the runs, images and tables")
    parser.add_argument("--methods", nargs="+", choices=[m.slug for m in METHODS], default=[m.slug for m in METHODS],
                        help="only these rows of the table")
    parser.add_argument("--steps", type=int, default=1000, help="training steps, the same for every method")
    parser.add_argument("--learning_rate", type=float, default=1e-3, help="the rate of every method not in "
                        "--learning_rates")
    parser.add_argument("--learning_rates", nargs="+", default=[], metavar="METHOD=LR",
                        help="a learning rate per method (e.g. lora=3e-3), picked by the same sweep for every method "
                        "(docs/evaluate.md)")
    parser.add_argument("--train_pictures", type=int, default=400, help="world pictures to train on (world seed 1)")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--empty_prompts", type=float, default=0.3, help="share of captions replaced by ''")
    parser.add_argument("--seed", type=int, default=0, help="training seed; held-out image i uses seed + i")
    parser.add_argument("--held_out", type=int, default=32, help="held-out pictures to draw from and score")
    parser.add_argument("--held_out_seed", type=int, default=2, help="their world seed (a sweep uses another)")
    parser.add_argument("--sample_steps", type=int, default=SAMPLING["steps"], help="denoising steps per image")
    parser.add_argument("--quick", action="store_true",
                        help=f"a check that every method runs (CI): {', '.join(f'{k} {v}' for k, v in QUICK.items())}")
    given = parser.parse_known_args(argv)[0]
    if given.quick:  # its settings are defaults: flags given still win
        parser.set_defaults(**QUICK)
    args = parser.parse_args(argv)
    args.learning_rates = parse_rates(parser, args.learning_rates, TRAINED)
    return args


def comparison_settings(args: argparse.Namespace) -> dict:
    """What the table's numbers depend on: a rerun into the same OUT must have the same (its files are reused)."""
    skip = {"out", "methods", "quick", "learning_rates", "learning_rate"}
    return {**{k: v for k, v in vars(args).items() if k not in skip},
            "learning_rates": {m.slug: learning_rate(args, m) for m in TRAINED}}


def learning_rate(args: argparse.Namespace, method: Method) -> float:
    return args.learning_rates.get(method.slug, args.learning_rate)


# --------------------------------------------------------------------------------------------------------------------
# Data, training, generation


def held_out(args: argparse.Namespace) -> list[tuple[Path, Path, str]]:
    """(picture, its Canny map, caption) for each held-out world picture, written under OUT/held_out/."""
    from hra_diffusion.control import make_condition
    from hra_diffusion.demo_world.scene import world_sample

    folder = args.out / "held_out"
    items = []
    for i in range(args.held_out):
        image, caption, _ = world_sample(i, args.held_out_seed)
        source, edges = folder / "pictures" / f"{i:04d}.png", folder / "edges" / f"{i:04d}.png"
        for path, picture in ((source, image), (edges, make_condition(image, "canny"))):
            atomic_write(path, lambda tmp, picture=picture: picture.save(tmp, format="PNG"))
        items.append((source, edges, caption))
    return items


def training_data(args: argparse.Namespace) -> Path:
    """OUT/data: the training pictures and captions, no maps (the trainer computes and caches their Canny maps)."""
    from hra_diffusion.demo_world.scene import world_sample
    from hra_diffusion.synthetic import write_control_dataset

    folder = args.out / "data"
    if not (folder / "metadata.jsonl").is_file():
        samples = (world_sample(i, TRAIN_WORLD_SEED)[:2] for i in range(args.train_pictures))
        write_control_dataset(folder, ((image, None, caption) for image, caption in samples))
    return folder


def train(args: argparse.Namespace, method: Method, base: Path, data: Path) -> Path:
    """The method's control adapter, trained in a trainer process of its own: skipped when one exists, resumed from
    its last checkpoint after an interruption."""
    from training.control_hra import ControlSettings

    root = args.out / method.slug
    adapter = find_trained(root / "adapter")
    if adapter is not None:
        return adapter
    settings = ControlSettings(
        pretrained_model_name_or_path=str(base), train_data_dir=str(data), control_type="canny",
        cache_dir=str(args.out / "cache"), resolution=64, max_train_steps=args.steps,  # the world's pictures: 64 px
        train_batch_size=args.batch_size, learning_rate=learning_rate(args, method),
        proportion_empty_prompts=args.empty_prompts, seed=args.seed, output_dir=str(root / "adapter"),
        **method.settings,
    )
    command = trainer_argv("training.control_hra", write_request(settings, root / "request.json"),
                           progress_file=root / "progress.jsonl", resume_from_checkpoint="latest")
    print(f"training {method.slug}: {' '.join(command)}", flush=True)
    if subprocess.run(command, cwd=REPO_ROOT).returncode != 0:
        raise RuntimeError(f"training {method.name} failed: {' '.join(command)}")
    return find_trained(root / "adapter")


def training_cost(root: Path) -> dict[str, float | None]:
    """Seconds in training steps and peak memory of the method's run, from its progress file."""
    found = [e for e in ProgressReader(root / "progress.jsonl").read() if isinstance(e, Resources)]
    return {"train_s": found[-1].train_s, "peak_memory_mib": found[-1].peak_memory_mib} if found else {}


def draw(pipe, adapter: Path | None, items: Sequence[tuple[Path, Path, str]], folder: Path,
         args: argparse.Namespace) -> None:
    """One image per held-out picture, from its edges (with an adapter) and its caption; existing images are kept."""
    from PIL import Image

    from hra_diffusion.pipelines import generate

    todo = [(i, item) for i, item in enumerate(items) if not (folder / f"{i:04d}.png").is_file()]
    if not todo:
        return
    detach_trained(pipe)
    if adapter is not None:
        attach_trained(pipe, adapter, "control")
    for i, (_, edges, caption) in todo:
        control = {"control_image": Image.open(edges).convert("RGB")} if adapter is not None else {}
        (image,) = generate(pipe, caption, seed=args.seed + i, **{**SAMPLING, "steps": args.sample_steps}, **control)
        atomic_write(folder / f"{i:04d}.png", lambda tmp, image=image: image.save(tmp, format="PNG"))


# --------------------------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> list[dict]:
    from hra_diffusion.pipelines import load_pipeline

    world = find_demo_world()
    if world is None:
        raise FileNotFoundError("the demo world is not built: run `python -m hra_diffusion.demo_world build "
                                "assets/demo_world`, or set HRA_DEMO_WORLD to a built one")
    settings_file = args.out / "settings.json"
    settings = comparison_settings(args)
    if settings_file.is_file() and json.loads(settings_file.read_text()) != settings:
        raise ValueError(f"{args.out} holds a comparison with other settings ({settings_file}); use a new --out")
    write_json_atomic(settings_file, settings)
    t0 = time.monotonic()
    methods = [m for m in METHODS if m.slug in args.methods]
    items = held_out(args)
    data = training_data(args)
    adapters = {m.slug: train(args, m, world.base, data) for m in methods if m is not NO_CONTROL}
    pipe = load_pipeline(world.base)
    reports = []
    for method in methods:
        root, adapter = args.out / method.slug, adapters.get(method.slug)
        draw(pipe, adapter, items, root / "images", args)
        score = score_control(args.out / "held_out" / "pictures", root / "images", root / "score.json")
        reports.append({"method": method.name, "slug": method.slug,
                        "trainable_params": trained_parameters(adapter) if adapter else None,
                        "learning_rate": learning_rate(args, method) if adapter else None,
                        "aggregate": score["aggregate"], **(training_cost(root) if adapter else {})})
    write_outputs(args, reports, items, time.monotonic() - t0)
    return reports


def comparison_markdown(args: argparse.Namespace, reports: Sequence[dict], wall_s: float) -> str:
    header = ["method", "trainable params (adapter + encoder)", "lr", "edge IoU", "edge F1", "train s",
              "peak memory (MiB)"]
    lines = markdown_table(header, [[r["method"], *report_cells(r)] for r in reports])
    lines += ["", f"{args.steps} training steps at batch {args.batch_size} on {args.train_pictures} world pictures "
              f"(seed {TRAIN_WORLD_SEED}) with their Canny maps, {args.empty_prompts:.0%} empty captions, seed "
              f"{args.seed}, for every method. {args.held_out} held-out pictures (world seed {args.held_out_seed}): "
              f"one image each from its Canny map and caption, {args.sample_steps} steps, guidance "
              f"{SAMPLING['guidance']}, image i with seed {args.seed} + i; edge IoU / F1 by eval.control_score "
              f"(Canny 100/200). This run: {wall_s / 60:.1f} minutes (steps skipped on a rerun not counted)."]
    return "\n".join(lines) + "\n"


def write_outputs(args: argparse.Namespace, reports: Sequence[dict], items: Sequence[tuple[Path, Path, str]],
                  wall_s: float) -> None:
    write_json_atomic(args.out / "control_comparison.json", {"methods": list(reports), "wall_s": wall_s,
                                                             "settings": comparison_settings(args)})
    text = comparison_markdown(args, reports, wall_s)
    atomic_write(args.out / "control_comparison.md", lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    columns = range(min(8, len(items)))
    rows = [("held-out picture", [items[i][0] for i in columns]), ("Canny map", [items[i][1] for i in columns])]
    rows += [(r["method"], [args.out / r["slug"] / "images" / f"{i:04d}.png" for i in columns]) for r in reports]
    for name, image in (("control_chart.png", chart(reports)), ("control_contact_sheet.png", labelled_rows(rows, 96))):
        atomic_write(args.out / name, lambda tmp, image=image: image.save(tmp, format="PNG"))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        reports = run(args)
    except (FileNotFoundError, ValueError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out / "control_comparison.md").read_text(encoding="utf-8"))
    print(f"table, chart and contact sheet in {args.out}; {len(reports)} rows")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
