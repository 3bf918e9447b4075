"""The DreamBooth benchmark driver and the real-images row, on the tiny SD pipeline and tiny random scorers."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from eval_helpers import noise_image, prompts_file_text, save_tiny_clip_dir, save_tiny_dino
from PIL import Image

import eval.dreambooth_benchmark as benchmark
from eval.prompts import shard
from eval.real_images import main as real_images_main
from eval.real_images import pair_scores
from eval.score import ScorerSettings
from hra_diffusion import HRAConfig, add_hra, hra_parameters, save_hra
from hra_diffusion.baselines import trained_parameters
from hra_diffusion.train import write_request

FIXTURES = Path(__file__).parent / "fixtures" / "subjects"
REPO = Path(__file__).resolve().parents[1]


def make_adapter(unet, path: Path, config: HRAConfig) -> Path:
    add_hra(unet, config)
    with torch.no_grad():
        for p in hra_parameters(unet):
            p.add_(torch.randn_like(p))
    return save_hra(unet, path)


@pytest.fixture(scope="module")
def bench(tmp_path_factory, tiny_sd, tiny_unet):
    """A DreamBooth-format folder (dog: live, teapot: object), one adapter per subject in each layout, scorers."""
    root = tmp_path_factory.mktemp("bench")
    dataset = root / "dataset"
    dataset.mkdir()
    (dataset / "prompts_and_classes.txt").write_text(prompts_file_text())
    for name in ("dog", "teapot"):
        shutil.copytree(FIXTURES / name, dataset / name)
    adapters = root / "adapters"
    torch.manual_seed(0)
    make_adapter(tiny_unet(), adapters / "dog" / benchmark.ADAPTER_FILE, HRAConfig(r=2))
    make_adapter(tiny_unet(), adapters / "teapot.safetensors", HRAConfig(r=2))
    scorer_args = ["--dino_model", save_tiny_dino(root / "dino"), "--clip_model", save_tiny_clip_dir(root / "clip"),
                   "--clip_pretrained", "none", "--lpips_net", "alex", "--lpips_random_backbone", "--lpips_size", "64",
                   "--device", "cpu", "--batch_size", "4"]

    def args(out: Path, *extra: str, adapters_dir: Path = adapters, base_model: Path = tiny_sd) -> list[str]:
        return ["--dataset_dir", str(dataset), "--adapters_dir", str(adapters_dir), "--base_model", str(base_model),
                "--out", str(out), "--prompts_limit", "2", "--images_per_prompt", "2", "--steps", "2", *scorer_args,
                *extra]

    return SimpleNamespace(root=root, dataset=dataset, adapters=adapters, scorer_args=scorer_args, args=args)


@pytest.fixture
def count_generate(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(kwargs["seed"])
        return real(*args, **kwargs)

    real = benchmark.generate
    monkeypatch.setattr(benchmark, "generate", counting)
    return calls


@pytest.fixture(scope="module")
def single_run(bench):
    """One in-process run, shared: its images are the reference for the resume and two-process tests."""
    out = bench.root / "single"
    assert benchmark.main(bench.args(out, "--method_name", "HRA test")) == 0
    return out


EXPECTED = [f"{subject}/{p:02d}_{i}.png" for subject in ("dog", "teapot") for p in range(2) for i in range(2)]


def image_files(out: Path) -> list[str]:
    return sorted(str(p.relative_to(out / "images")) for p in (out / "images").rglob("*") if p.is_file())


def test_sharding_covers_every_job_exactly_once(bench):
    args = benchmark.parse_args(bench.args(bench.root / "unused", "--prompts_limit", "25", "--images_per_prompt", "4"))
    jobs = benchmark.benchmark_jobs(benchmark.load_subjects(args), args.images_per_prompt)
    assert len(jobs) == 2 * 25 * 4
    rank0, rank1 = shard(jobs, 0, 2), shard(jobs, 1, 2)
    assert set(rank0).isdisjoint(rank1) and set(rank0) | set(rank1) == set(jobs)
    assert len({job.path(bench.root) for job in jobs}) == len(jobs)  # one file per job
    assert {job.image_idx for job in rank0} == {0, 2}  # each prompt's images are split between the processes


def test_benchmark_writes_images_and_reports(bench, single_run, tiny_unet):
    out = single_run
    assert image_files(out) == EXPECTED
    assert not [p for p in out.rglob("*.tmp")]
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "HRA test"
    assert set(report["aggregate"]) == {"dino", "clip_i", "clip_t", "lpips"}
    assert report["num_subjects"] == 2 and report["num_live_subjects"] == 1
    assert report["num_images"] == 8 and report["black_images"] == 0
    assert report["settings"]["scheduler"] == "dpm" and report["settings"]["seed"] == 0
    dog, teapot = report["per_subject"]["dog"], report["per_subject"]["teapot"]
    assert dog["live"] and not teapot["live"]
    assert dog["adapter"].endswith(f"dog/{benchmark.ADAPTER_FILE}") and teapot["adapter"].endswith("teapot.safetensors")
    prompts = [row["prompt"] for row in teapot["per_image"]]
    assert prompts[::2] == ["a qwe teapot in the jungle", "a qwe teapot in the snow"]
    assert report["aggregate"]["dino"] == pytest.approx((dog["aggregate"]["dino"] + teapot["aggregate"]["dino"]) / 2)
    expected_params = sum(p.numel() for p in hra_parameters(add_hra(tiny_unet(), HRAConfig(r=2))))
    assert report["trainable_params"] == dog["trainable_params"] == expected_params
    md = (out / "report.md").read_text()
    assert "| method | params | DINO | CLIP-I | CLIP-T | LPIPS |" in md and "| HRA test |" in md
    rows = list(csv.DictReader((out / "per_subject.csv").open()))
    assert [row["subject"] for row in rows] == ["dog", "teapot"] and float(rows[0]["dino"]) == pytest.approx(
        dog["aggregate"]["dino"], abs=1e-6)
    sheet = Image.open(out / "contact_sheet.png")
    assert sheet.size == (3 * 192, 2 * 192)  # a photo + both prompts, per subject


def test_rerun_does_no_work_twice_and_counts_black_images(bench, single_run, count_generate):
    out = bench.root / "resume"
    shutil.copytree(single_run / "images", out / "images")
    mtimes = {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")}
    assert benchmark.main(bench.args(out)) == 0
    assert count_generate == []
    assert {p: p.stat().st_mtime_ns for p in (out / "images").rglob("*.png")} == mtimes
    (out / "images" / "teapot" / "01_1.png").unlink()
    Image.new("RGB", (64, 64)).save(out / "images" / "dog" / "00_0.png")
    assert benchmark.main(bench.args(out)) == 0
    assert count_generate == [1]  # only the deleted image, with its own seed (seed 0 + image 1)
    remade = np.asarray(Image.open(out / "images" / "teapot" / "01_1.png"))
    assert np.array_equal(remade, np.asarray(Image.open(single_run / "images" / "teapot" / "01_1.png")))
    report = json.loads((out / "report.json").read_text())
    assert report["black_images"] == 1 and report["per_subject"]["dog"]["black_images"] == 1
    assert report["num_images"] == 8  # the black image is scored, not dropped


@pytest.mark.slow
def test_two_processes_split_the_work(bench, single_run):
    """A real `accelerate launch` with 2 processes (gloo on CPU): same images as one process, each made once."""
    out = bench.root / "two"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--multi_gpu",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port",
               "29517", str(REPO / "eval" / "dreambooth_benchmark.py"), *bench.args(out)]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "process 0: 4 of 8 images, 0 already there, 4 to make" in result.stdout
    assert "process 1: 4 of 8 images, 0 already there, 4 to make" in result.stdout
    assert result.stdout.count("# DreamBooth benchmark") == 1  # only the main process reports
    assert image_files(out) == EXPECTED
    for name in EXPECTED:  # equal up to float rounding (1 thread per process here, 2 in pytest)
        two, one = (np.asarray(Image.open(folder / "images" / name), dtype=int) for folder in (out, single_run))
        assert np.abs(two - one).max() <= 2, name
    assert json.loads((out / "report.json").read_text())["num_images"] == 8


def test_clear_errors(bench, tmp_path, capsys):
    only_dog = tmp_path / "only_dog"
    shutil.copytree(bench.adapters / "dog", only_dog / "dog")
    assert benchmark.main(bench.args(tmp_path / "a", adapters_dir=only_dog)) == 2
    err = capsys.readouterr().err
    assert "no adapter for 1 of 2 subject(s): teapot" in err and "--train" in err
    assert benchmark.main(bench.args(tmp_path / "b", adapters_dir=tmp_path / "nowhere")) == 2
    assert "adapters folder not found" in capsys.readouterr().err
    assert benchmark.main(bench.args(tmp_path / "c", "--subjects", "dog", "unicorn")) == 2
    assert "unknown subject(s) ['unicorn']" in capsys.readouterr().err
    assert benchmark.main(bench.args(tmp_path / "d", base_model=tmp_path / "no_model")) == 2
    assert "could not load base model" in capsys.readouterr().err
    assert benchmark.main(bench.args(tmp_path / "e", "--dino_model", str(tmp_path / "no_dino"))) == 2
    assert "--dino_model" in capsys.readouterr().err
    assert not (tmp_path / "e" / "images").exists()  # a missing metric network stops the run before generating


def test_trainable_parameters_skip_frozen_gs_start(tiny_unet, tmp_path):
    unet = tiny_unet()
    path = make_adapter(unet, tmp_path / "gs.safetensors", HRAConfig(r=3, apply_GS=True))
    assert trained_parameters(path) == sum(p.numel() for p in hra_parameters(unet) if p.requires_grad)
    assert benchmark.is_black(Image.new("RGB", (8, 8))) and not benchmark.is_black(noise_image(0))


needs_trainer = pytest.mark.skipif(not benchmark.TRAINER.is_file(), reason="the DreamBooth trainer is not here yet")


@needs_trainer
def test_trainer_command_uses_the_paper_settings(bench):
    from training.dreambooth_hra import parse_args as trainer_args

    (dog,) = benchmark.load_subjects(benchmark.parse_args(bench.args(bench.root / "out", "--subjects", "dog")))
    args = benchmark.parse_args(bench.args(bench.root / "out"))
    request = write_request(benchmark.trainer_request(args, dog), bench.root / "dog.json")
    command = benchmark.trainer_command(args, request)
    launch = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    assert command[:12] == [sys.executable, "-m", "accelerate.commands.launch", *launch, str(benchmark.TRAINER)]
    parsed = trainer_args(command[12:])  # the trainer accepts every flag we pass
    assert parsed.instance_prompt == "a photo of qwe dog" and parsed.class_prompt == "a photo of dog"
    assert parsed.with_prior_preservation and parsed.num_class_images == 200
    assert parsed.class_data_dir == str(bench.root / "out" / "class_images" / "dog")
    assert (parsed.hra_r, parsed.learning_rate, parsed.max_train_steps, parsed.hra_apply_GS) == (8, 1e-4, 2000, False)
    assert parsed.output_dir == str(bench.adapters / "dog") and parsed.instance_data_dir == str(bench.dataset / "dog")


@pytest.mark.slow
@needs_trainer
def test_train_then_evaluate(bench, tmp_path):
    adapters = tmp_path / "adapters"
    argv = bench.args(tmp_path / "out", "--subjects", "dog", "--train", "--train_launcher", "python",
                      "--train_steps", "1", "--train_resolution", "64", "--no-with_prior_preservation",
                      "--train_extra_args", "--num_validation_images 0 --report_to none",
                      "--images_per_prompt", "1", "--prompts_limit", "1", adapters_dir=adapters)
    assert benchmark.main(argv) == 0
    assert (adapters / "dog" / benchmark.ADAPTER_FILE).is_file()
    assert json.loads((tmp_path / "out" / "report.json").read_text())["num_images"] == 1


def test_real_images_row(bench, tmp_path, capsys):
    out = tmp_path / "real.json"
    assert real_images_main(["--dataset_dir", str(bench.dataset), "--out", str(out), *bench.scorer_args]) == 0
    assert "| real images | - |" in capsys.readouterr().out
    report = json.loads(out.read_text())
    assert set(report["aggregate"]) == {"dino", "clip_i", "lpips"}
    assert report["per_subject"]["dog"]["num_pairs"] == 3  # 3 photos
    mean = np.mean([report["per_subject"][s]["dino"] for s in ("dog", "teapot")])
    assert report["aggregate"]["dino"] == pytest.approx(mean)


def test_real_pairs_are_distinct_pairs_only(bench):
    settings = ScorerSettings.from_args(benchmark.parse_args(bench.args(bench.root / "unused")))
    dino, clip, lpips = settings.load()
    a, b = noise_image(0), noise_image(1)
    scores = pair_scores([a, a, b], dino, clip, lpips)  # pairs (a, a), (a, b), (a, b)
    ab = dino.similarity([a], [b]).item()
    assert scores["dino"] == pytest.approx((1 + 2 * ab) / 3, abs=1e-5)
    assert scores["lpips"] == pytest.approx(2 * lpips.distance([a], [b]).item() / 3, abs=1e-5)
    with pytest.raises(ValueError, match="at least 2 photos"):
        pair_scores([a], dino, clip, lpips)
