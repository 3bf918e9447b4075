"""The DreamBooth benchmark: generate with each subject's adapter, score, and write the paper's Table 4 row.

    accelerate launch eval/dreambooth_benchmark.py --dataset_dir DIR --adapters_dir DIR --base_model ID_OR_PATH \\
        --out DIR [--train] [--method_name NAME]
    python -m eval.dreambooth_benchmark ...          (the same, in one process)

A subject's adapter is ADAPTERS_DIR/<subject>/hra_adapter.safetensors (what the DreamBooth trainer writes to its
--output_dir) or ADAPTERS_DIR/<subject>.safetensors. Every (subject, prompt, image) is one job, written to
OUT/images/<subject>/<prompt>_<image>.png; jobs are dealt round robin to the processes, and a file that exists is
never made again, so a rerun resumes where the last one stopped. Then the main process scores everything and
writes OUT/report.json, OUT/report.md, OUT/per_subject.csv and OUT/contact_sheet.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shlex
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, parse_flag_from_env
from PIL import Image, ImageDraw, ImageOps
from tqdm.auto import tqdm

from eval.images import load_images
from eval.metrics import CLIPScorer, DINOScorer, LPIPSScorer, ModelLoadError
from eval.prompts import DEFAULT_TOKEN, Subject, load_benchmark, shard
from eval.score import METRICS, ScorerSettings, add_scorer_arguments, markdown_table, score_images, write_json_atomic
from hra_diffusion import AdapterFileError, read_hra_metadata
from hra_diffusion.baselines import (
    ADAPTER_KINDS,
    attach_trained,
    detach_trained,
    find_trained,
    trained_kind,
    trained_parameters,
)
from hra_diffusion.cli import HelpFormatter
from hra_diffusion.io import atomic_write
from hra_diffusion.pipelines import (
    SCHEDULERS,
    ModelNotFoundError,
    generate,
    load_pipeline,
    set_scheduler,
)
from hra_diffusion.train import ADAPTER_FILE, write_request
from hra_diffusion.train.events import ProgressReader, Resources
from hra_diffusion.train.settings import trainer_argv
from training.dreambooth_hra import DreamBoothSettings

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAINER = REPO_ROOT / "training" / "dreambooth_hra.py"
# Set by a distributed launch; a trainer started from inside one must not inherit them, or it would try to join it.
LAUNCH_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "ROLE_WORLD_SIZE",
              "GROUP_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
LAUNCH_ENV_PREFIXES = ("ACCELERATE_", "TORCHELASTIC_")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

T = TypeVar("T")
Scorers = tuple[DINOScorer, CLIPScorer, LPIPSScorer]


class BenchmarkError(RuntimeError):
    """A problem the user must fix (a missing folder, adapter, subject or trainer), reported without a traceback."""


@dataclass(frozen=True)
class Job:
    """One image to make: image `image_idx` (seed + image_idx) of prompt `prompt_idx` of a subject."""

    subject: str
    prompt_idx: int
    image_idx: int

    def path(self, out_dir: Path) -> Path:
        return out_dir / "images" / self.subject / f"{self.prompt_idx:02d}_{self.image_idx}.png"


def benchmark_jobs(subjects: Sequence[Subject], images_per_prompt: int) -> list[Job]:
    """Every job, subject-major: sharded round robin, each process then switches adapters once per subject."""
    return [Job(subject.name, prompt_idx, image_idx) for subject in subjects
            for prompt_idx in range(len(subject.prompts)) for image_idx in range(images_per_prompt)]


def find_adapter(adapters_dir: Path, subject: str) -> Path | None:
    """The subject's trained result in either layout (a trainer's output folder: HRA, LoRA or OFT; or an HRA file
    named after it), or None."""
    flat = adapters_dir / f"{subject}.safetensors"
    return find_trained(adapters_dir / subject) or (flat if flat.is_file() else None)


def missing_adapters(adapters_dir: Path, subjects: Sequence[Subject]) -> list[str]:
    return [subject.name for subject in subjects if find_adapter(adapters_dir, subject.name) is None]


def resolve_adapters(adapters_dir: Path, subjects: Sequence[Subject]) -> dict[str, Path]:
    """Subject -> adapter file, every header checked now rather than hours into generation."""
    missing = missing_adapters(adapters_dir, subjects)
    if missing:
        raise BenchmarkError(
            f"no adapter for {len(missing)} of {len(subjects)} subject(s): {', '.join(missing)}. Expected "
            f"{adapters_dir}/<subject>/{ADAPTER_FILE} or {adapters_dir}/<subject>.safetensors; "
            "pass --train to train the missing ones first.")
    adapters = {subject.name: find_adapter(adapters_dir, subject.name) for subject in subjects}
    for path in adapters.values():
        if trained_kind(path) == "hra":
            read_hra_metadata(path)
    return adapters


def is_black(image: Image.Image) -> bool:
    """All pixels zero: what a safety checker (or a NaN in fp16) leaves; counted, never dropped."""
    return not np.asarray(image).any()


def run_on_all(state: PartialState, what: str, step: Callable[[], T]) -> T:
    """Run `step` here, then compare notes with every process: when one failed, all stop with its message.

    Without this, a process that died (a missing file, out of memory) leaves the others waiting at the next
    collective until the process-group timeout.
    """
    try:
        result, error = step(), None
    except Exception as exc:  # every failure must reach the other processes; re-raised right below
        result, error = None, exc
    failures = gather_object([None if error is None else f"process {state.process_index}: {error}"])
    if error is not None:
        raise error
    failed = [failure for failure in failures if failure]
    if failed:
        raise BenchmarkError(f"{what} failed on another process: {'; '.join(failed)}")
    return result


def trainer_request(args: argparse.Namespace, subject: Subject) -> DreamBoothSettings:
    """The DreamBooth trainer's settings for one subject: the paper's unless flags change them."""
    prior = {}
    if args.with_prior_preservation:
        class_dir = args.class_dir or args.out / "class_images"
        prior = {"with_prior_preservation": True, "class_prompt": f"a photo of {subject.class_name}",
                 "class_data_dir": str(class_dir / subject.class_name.replace(" ", "_")),
                 "num_class_images": args.num_class_images}
    return DreamBoothSettings(
        pretrained_model_name_or_path=str(args.base_model),
        instance_data_dir=str(subject.image_paths[0].parent),
        instance_prompt=f"a photo of {args.token} {subject.class_name}",
        output_dir=str(args.adapters_dir / subject.name),
        max_train_steps=args.train_steps,
        learning_rate=args.learning_rate,
        hra_r=args.hra_r,
        hra_lambda=args.hra_lambda,
        hra_apply_GS=args.hra_apply_GS,
        adapter=args.adapter,
        rank=args.rank,
        lora_alpha=args.lora_alpha,
        oft_block_size=args.oft_block_size,
        resolution=args.train_resolution,
        seed=args.seed,
        **prior,
    )


def trainer_command(args: argparse.Namespace, request: Path, progress: Path | None = None) -> list[str]:
    """The command that trains on a request file (--train_extra_args still override it)."""
    if args.train_launcher == "accelerate":
        python, *script = trainer_argv(str(TRAINER), request, progress_file=progress)
        # everything accelerate would otherwise guess, with a warning per subject; the request's precision rules
        precision = json.loads(request.read_text()).get("mixed_precision") or "no"
        launch = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", precision,
                  "--dynamo_backend", "no"]
        command = [python, "-m", "accelerate.commands.launch", *launch, *script]
    else:
        command = trainer_argv("training.dreambooth_hra", request, progress_file=progress)
    return command + shlex.split(args.train_extra_args)


def progress_path(args: argparse.Namespace, subject: str) -> Path:
    return args.out / "requests" / f"{subject}.progress.jsonl"


def training_cost(args: argparse.Namespace, subject: str) -> dict[str, float | None]:
    """Seconds of training and peak memory of the subject's run, from its progress file (None: not trained here)."""
    path = progress_path(args, subject)
    found = [e for e in ProgressReader(path).read() if isinstance(e, Resources)] if path.is_file() else []
    last = found[-1] if found else None
    return {"train_s": last.train_s if last else None, "peak_memory_mib": last.peak_memory_mib if last else None}


def train_adapters(args: argparse.Namespace, subjects: Sequence[Subject]) -> None:
    """Train the subjects' adapters one after another, each in its own trainer process, from a request file each
    (OUT/requests/<subject>.json)."""
    if args.train_launcher == "accelerate" and not TRAINER.is_file():
        raise BenchmarkError(f"--train needs the DreamBooth trainer, not found at {TRAINER}")
    env = {key: value for key, value in os.environ.items()
           if key not in LAUNCH_ENV and not key.startswith(LAUNCH_ENV_PREFIXES)}
    for subject in tqdm(subjects, desc="training adapters", disable=None):
        request = write_request(trainer_request(args, subject), args.out / "requests" / f"{subject.name}.json")
        command = trainer_command(args, request, progress_path(args, subject.name))
        print(f"training {subject.name}: {shlex.join(command)}", flush=True)
        returncode = subprocess.run(command, cwd=REPO_ROOT, env=env).returncode
        if returncode != 0:
            raise BenchmarkError(f"training the adapter of {subject.name} failed (exit code {returncode}); "
                                 f"the command was: {shlex.join(command)}")
        if find_adapter(args.adapters_dir, subject.name) is None:
            raise BenchmarkError(f"the trainer finished but wrote no {args.adapters_dir / subject.name / ADAPTER_FILE}")


def generate_jobs(pipe, subjects: Mapping[str, Subject], adapters: Mapping[str, Path], jobs: Sequence[Job],
                  out_dir: Path, args: argparse.Namespace, show_progress: bool) -> None:
    """Make and save each job's image, swapping adapters when the subject changes.

    One image per call with seed + image_idx: the same pixels as `generate(num_images=4, seed=seed)`, since each
    image has its own generator, and any subset of a prompt's images can be made alone (sharding, resuming).
    """
    current = None
    for job in tqdm(jobs, desc="generating", disable=None if show_progress else True):
        if job.subject != current:
            detach_trained(pipe)
            attach_trained(pipe, adapters[job.subject], job.subject)
            current = job.subject
        (image,) = generate(pipe, subjects[job.subject].prompts[job.prompt_idx], seed=args.seed + job.image_idx,
                            steps=args.steps, guidance=args.guidance, height=args.resolution, width=args.resolution)
        atomic_write(job.path(out_dir), lambda tmp, image=image: image.save(tmp, format="PNG"))


def score_subjects(subjects: Sequence[Subject], adapters: Mapping[str, Path], jobs: Sequence[Job], out_dir: Path,
                   scorers: Scorers) -> dict[str, dict]:
    """Per subject: scores against its own photos, CLIP-T against each image's own prompt, black-image count."""
    results = {}
    for subject in tqdm(subjects, desc="scoring subjects", disable=None):
        own = [job for job in jobs if job.subject == subject.name]
        paths = [job.path(out_dir) for job in own]
        missing = [path.name for path in paths if not path.is_file()]
        if missing:
            raise BenchmarkError(f"{subject.name}: {len(missing)} generated image(s) missing, e.g. {missing[:3]}")
        generated = load_images(paths)
        prompts = [subject.prompts[job.prompt_idx] for job in own]
        scores = score_images(load_images(subject.image_paths), generated, [path.name for path in paths], prompts,
                              *scorers)
        black = [is_black(image) for image in generated]
        for row, prompt, dark in zip(scores["per_image"], prompts, black):
            row.update(prompt=prompt, black=dark)
        results[subject.name] = {
            "class": subject.class_name, "live": subject.is_live, "adapter": str(adapters[subject.name]),
            "trainable_params": trained_parameters(adapters[subject.name]), "num_real": len(subject.image_paths),
            "num_generated": len(generated), "black_images": sum(black), **scores,
        }
    return results


def contact_sheet(subjects: Sequence[Subject], out_dir: Path, columns: int, cell: int = 192) -> Image.Image:
    """One row per subject: its first photo (labelled), then image 0 of up to `columns` prompts spread over its list."""
    rows = []
    for subject in subjects:
        last = len(subject.prompts) - 1
        picks = sorted({round(i * last / max(columns - 1, 1)) for i in range(columns)})
        rows.append((subject.name, [subject.image_paths[0], *(Job(subject.name, p, 0).path(out_dir) for p in picks)]))
    return labelled_rows(rows, cell)


def labelled_rows(rows: Sequence[tuple[str, Sequence[Path]]], cell: int) -> Image.Image:
    """A sheet of square cells, one row per (label, image paths), the label written over the row's first image."""
    sheet = Image.new("RGB", (max(len(paths) for _, paths in rows) * cell, len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for row, (label, paths) in enumerate(rows):
        for col, image in enumerate(load_images(paths)):
            sheet.paste(ImageOps.fit(image, (cell, cell)), (col * cell, row * cell))
        draw.rectangle(draw.textbbox((4, row * cell + 4), label), fill="black")
        draw.text((4, row * cell + 4), label, fill="white")
    return sheet


def format_params(count: int) -> str:
    """Millions with two decimals like the paper (0.69M); small test adapters as plain counts."""
    return f"{count / 1e6:.2f}M" if count >= 10_000 else str(count)


def build_report(args: argparse.Namespace, subjects: Sequence[Subject], per_subject: dict[str, dict],
                 settings: ScorerSettings) -> dict:
    """Means over subjects of per-subject means, so a subject with more photos does not weigh more."""
    keys = [key for key in METRICS if key in next(iter(per_subject.values()))["aggregate"]]
    return {
        "method": args.method_name,
        "trainable_params": round(np.mean([s["trainable_params"] for s in per_subject.values()])),
        **_cost(per_subject.values()),
        "aggregate": {key: float(np.mean([s["aggregate"][key] for s in per_subject.values()])) for key in keys},
        "num_subjects": len(subjects),
        "num_live_subjects": sum(subject.is_live for subject in subjects),
        "prompts_per_subject": len(subjects[0].prompts),
        "images_per_prompt": args.images_per_prompt,
        "num_images": sum(s["num_generated"] for s in per_subject.values()),
        "black_images": sum(s["black_images"] for s in per_subject.values()),
        "settings": {"base_model": str(args.base_model), "token": args.token, "scheduler": args.scheduler,
                     "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "dtype": args.dtype,
                     "resolution": args.resolution},
        "models": settings.describe(),
        "per_subject": per_subject,
    }


def _cost(rows) -> dict[str, float | None]:
    """Mean training seconds per subject and the peak memory of any run (None where a run was not trained here)."""
    seconds = [row["train_s"] for row in rows if row.get("train_s") is not None]
    memory = [row["peak_memory_mib"] for row in rows if row.get("peak_memory_mib") is not None]
    return {"train_s": float(np.mean(seconds)) if seconds else None, "peak_memory_mib": max(memory, default=None)}


def report_markdown(report: dict) -> str:
    table = markdown_table(report["aggregate"], {"method": report["method"],
                                                 "params": format_params(report["trainable_params"])})
    s = report["settings"]
    return "\n".join([
        f"# DreamBooth benchmark: {report['method']}", "", table, "",
        f"{report['num_subjects']} subjects ({report['num_live_subjects']} live), {report['prompts_per_subject']} "
        f"prompts x {report['images_per_prompt']} images each: {report['num_images']} images, "
        f"{report['black_images']} of them all black (kept and scored).",
        f"Base model {s['base_model']}; {s['scheduler']} {s['steps']} steps, guidance {s['guidance']}, "
        f"seed {s['seed']}, {s['dtype']}. Scores: per-subject means, then the mean over subjects.",
        f"Metric networks: {', '.join(f'{k}={v}' for k, v in report['models'].items())}.", "",
    ])


def per_subject_csv(report: dict) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    keys = list(report["aggregate"])
    writer.writerow(["subject", "class", "live", "trainable_params", "num_real", "num_generated", "black_images",
                     *keys, "adapter"])
    for name, s in report["per_subject"].items():
        writer.writerow([name, s["class"], s["live"], s["trainable_params"], s["num_real"], s["num_generated"],
                         s["black_images"], *(f"{s['aggregate'][key]:.6f}" for key in keys), s["adapter"]])
    return buffer.getvalue()


def write_outputs(report: dict, subjects: Sequence[Subject], out_dir: Path, columns: int) -> None:
    write_json_atomic(out_dir / "report.json", report)
    for name, text in (("report.md", report_markdown(report)), ("per_subject.csv", per_subject_csv(report))):
        atomic_write(out_dir / name, lambda tmp, text=text: Path(tmp).write_text(text, encoding="utf-8"))
    sheet = contact_sheet(subjects, out_dir, columns)
    atomic_write(out_dir / "contact_sheet.png", lambda tmp: sheet.save(tmp, format="PNG"))


def load_subjects(args: argparse.Namespace) -> list[Subject]:
    subjects = load_benchmark(args.dataset_dir, args.token, args.subjects)
    if args.prompts_limit is not None:
        subjects = [Subject(s.name, s.class_name, s.is_live, s.image_paths, s.prompts[:args.prompts_limit])
                    for s in subjects]
    return subjects


def process_state(timeout_hours: float) -> PartialState:
    """accelerate's view of the processes. Without CUDA it must be told `cpu=True` (as `accelerate launch --cpu`
    tells Accelerator) to join a multi-process launch over gloo; otherwise each process would run everything alone."""
    multi_process = int(os.environ.get("WORLD_SIZE", "1")) > 1
    cpu = parse_flag_from_env("ACCELERATE_USE_CPU") or (multi_process and not torch.cuda.is_available())
    return PartialState(cpu=cpu, timeout=timedelta(hours=timeout_hours))


def run(args: argparse.Namespace) -> dict | None:
    """The whole benchmark on this process; returns the report on the main process, None on the others."""
    state = process_state(args.timeout_hours)
    if args.dtype == "auto":
        args = argparse.Namespace(**{**vars(args), "dtype": "float16" if state.device.type == "cuda" else "float32"})
    settings = ScorerSettings.from_args(args)

    def setup() -> tuple[list[Subject], dict[str, Path] | None, Scorers | None]:
        subjects = load_subjects(args)
        adapters = None
        if not args.train:
            if not args.adapters_dir.is_dir():
                raise BenchmarkError(f"adapters folder not found: {args.adapters_dir}")
            adapters = resolve_adapters(args.adapters_dir, subjects)
        return subjects, adapters, settings.load() if state.is_main_process else None  # a missing network fails now

    subjects, adapters, scorers = run_on_all(state, "setup", setup)

    def train() -> dict[str, Path]:
        missing = missing_adapters(args.adapters_dir, subjects)
        if state.is_main_process and missing:
            train_adapters(args, [subject for subject in subjects if subject.name in missing])
        return resolve_adapters(args.adapters_dir, subjects)

    if adapters is None:
        adapters = run_on_all(state, "training", train)
    jobs = benchmark_jobs(subjects, args.images_per_prompt)

    def generation() -> None:
        mine = shard(jobs, state.process_index, state.num_processes)
        pending = [job for job in mine if not job.path(args.out).is_file()]
        print(f"process {state.process_index}: {len(mine)} of {len(jobs)} images, {len(mine) - len(pending)} already "
              f"there, {len(pending)} to make", flush=True)
        if not pending:
            return
        pipe = load_pipeline(args.base_model, device=str(state.device), dtype=DTYPES[args.dtype])
        set_scheduler(pipe, args.scheduler)
        generate_jobs(pipe, {s.name: s for s in subjects}, adapters, pending, args.out, args,
                      show_progress=state.is_local_main_process)

    run_on_all(state, "generation", generation)
    state.destroy_process_group()  # no collectives after this: the main process scores alone
    if not state.is_main_process:
        return None
    per_subject = score_subjects(subjects, adapters, jobs, args.out, scorers)
    for name, row in per_subject.items():
        row.update(training_cost(args, name))
    report = build_report(args, subjects, per_subject, settings)
    write_outputs(report, subjects, args.out, args.contact_columns)
    return report


def build_parser(prog: str = "eval/dreambooth_benchmark.py", description: str | None = None,
                 defaults: Mapping[str, Any] | None = None) -> argparse.ArgumentParser:
    """The benchmark's flags; ``defaults`` (another command's, e.g. the method comparison's) also make the flags
    they name optional."""
    defaults = defaults or {}
    parser = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    parser.add_argument("--dataset_dir", type=Path, required="dataset_dir" not in defaults,
                        help="DreamBooth-format folder: one folder of photos per subject + prompts_and_classes.txt")
    parser.add_argument("--adapters_dir", type=Path, required="adapters_dir" not in defaults,
                        help=f"<subject>/ (a trainer's output folder: {ADAPTER_FILE}, pytorch_lora_weights."
                        "safetensors or oft/) or <subject>.safetensors per subject")
    parser.add_argument("--base_model", required="base_model" not in defaults,
                        help="the base model the adapters were trained on")
    parser.add_argument("--out", type=Path, required=True, help="output folder (images/, reports)")
    parser.add_argument("--method_name", default="HRA", help="the report's table row name")
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: every subject folder present)")
    parser.add_argument("--token", default=DEFAULT_TOKEN, help="the unique token in the prompts")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--prompts_limit", type=int, help="only the first N prompts per subject (quick runs)")
    parser.add_argument("--seed", type=int, default=0,
                        help="image i of every prompt uses seed + i; also the seed of --train")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--guidance", type=float, default=7.5)
    parser.add_argument("--scheduler", default="dpm", choices=sorted(SCHEDULERS), help="dpm = DPM-Solver++")
    parser.add_argument("--resolution", type=int, help="image side (default: the model's, 512 for SD1.5)")
    parser.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="generation precision; auto = float16 on CUDA, float32 elsewhere")
    parser.add_argument("--contact_columns", type=int, default=4, help="generated images per contact-sheet row")
    parser.add_argument("--timeout_hours", type=float, default=24.0,
                        help="how long processes wait for each other (the main one trains alone with --train)")
    train = parser.add_argument_group("training the missing adapters (--train)")
    train.add_argument("--train", action="store_true", help="train subjects without an adapter first (main process)")
    train.add_argument("--train_launcher", default="accelerate", choices=["accelerate", "python"],
                       help="accelerate launch training/dreambooth_hra.py, or python -m training.dreambooth_hra")
    train.add_argument("--train_steps", type=int, default=2000)
    train.add_argument("--learning_rate", type=float, default=1e-4)
    train.add_argument("--hra_r", type=int, default=8, help="the paper used r=7; see docs/evaluate.md")
    train.add_argument("--hra_lambda", type=float, default=0.0, help="orthogonality regularizer weight")
    train.add_argument("--hra_apply_GS", action="store_true",
                       help="strictly orthogonal planes, identity at start (near the paper's lambda=inf: api.md)")
    train.add_argument("--adapter", default="hra", choices=ADAPTER_KINDS,
                       help="what to train: HRA, or the LoRA / OFT baselines (docs/evaluate.md)")
    train.add_argument("--rank", type=int, default=4, help="LoRA rank (--adapter lora)")
    train.add_argument("--lora_alpha", type=int, default=None, help="LoRA alpha (default: the rank)")
    train.add_argument("--oft_block_size", type=int, default=32, help="OFT block size (--adapter oft)")
    train.add_argument("--train_resolution", type=int, default=512)
    train.add_argument("--with_prior_preservation", action=argparse.BooleanOptionalAction, default=True)
    train.add_argument("--num_class_images", type=int, default=200)
    train.add_argument("--class_dir", type=Path,
                       help="class images, one folder per class, shared by subjects (default: OUT/class_images)")
    train.add_argument("--train_extra_args", default="", help="more trainer flags, one shell-quoted string")
    add_scorer_arguments(parser)
    parser.set_defaults(**defaults)
    return parser


def check_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    for flag in ("images_per_prompt", "prompts_limit", "steps", "contact_columns"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            parser.error(f"--{flag} must be at least 1")
    return args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    return check_args(parser, parser.parse_args(argv))


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        report = run(args)
    except (BenchmarkError, FileNotFoundError, ValueError, ModelLoadError, ModelNotFoundError,
            AdapterFileError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if report is not None:
        print(report_markdown(report))
        print(f"reports in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
