"""The demo world learns: its base model draws what prompts say, DreamBooth-HRA with the app's defaults binds a
subject it has never seen, strength 0 is the base model, and control adapters (the shipped one, and one trained
here in a minute) make images follow edges.

Thresholds come from measured values (docs/evaluate.md gives them with their commands) with margins; each test
fails if its capability breaks. Everything runs on the shipped weights in assets/demo_world.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.images import load_images
from hra_diffusion.demo_world import UNIQUE_TOKEN, find_demo_world

WORLD = find_demo_world()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(WORLD is None, reason="assets/demo_world is not built"),
]
REPO = Path(__file__).resolve().parents[1]
SUBJECT = "star_toy"
EVAL_PROMPTS = 6  # the first prompts of the subject's list: scenes, which the base model draws well
SEEDS = (0, 1)
# Measured (docs/evaluate.md, "The demo world"), and the margins kept here:
RETRIEVAL_MIN = 0.6  # measured 1.00 (30 of 30 images), chance 0.10
REDNESS_GAP_MIN = 40.0  # measured: R - B of "a red ball" 11.0, of "a blue ball" -74.9
# star_toy with the app's defaults, on the 6 prompts x 2 seeds used here (all 15 prompts in the docs):
DINO_GAIN_MIN = 0.03  # 0.191 -> 0.287
CLIP_I_GAIN_MIN = 0.05  # 0.138 -> 0.306
CLIP_T_DROP_MAX = 0.10  # 0.610 -> 0.529: HRA costs some prompt fidelity here (0.08 of the margin's 0.10)
CLASS_KEPT_MIN = 0.5  # DINO cosine of same-seed class images, base vs adapter: 0.72
CONTROL_IMAGES, CONTROL_STEPS = 400, 300  # about a minute of training
CONTROL_F1_GAIN_MIN = 0.01  # measured: edge F1 0.134 controlled, 0.108 without (1,000 steps: 0.144)
# the shipped control adapter (3,000 steps, residual hints), 16 held-out pictures: edge F1 gain over no control at
# control scales 1 and 3; measured 0.102 -> 0.176 (+0.073, paired SE 0.023) and 0.201 (+0.099, SE 0.021)
SHIPPED_CONTROL_N = 16
SHIPPED_F1_GAIN_MIN = {1.0: 0.04, 3.0: 0.06}


@pytest.fixture(scope="module")
def world():
    from eval.demo_world import World

    return World.load(WORLD)


@pytest.fixture(scope="module")
def subject():
    from eval.prompts import load_benchmark

    return load_benchmark(WORLD.subjects, UNIQUE_TOKEN, [SUBJECT])[0]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """DreamBooth-HRA on the subject with exactly the request and command the app runs with its page defaults."""
    from app.jobs import REQUEST_FILE
    from app.studio import Studio
    from app.training_service import TRAINER
    from hra_diffusion.train import write_request
    from hra_diffusion.train.settings import trainer_argv

    data = tmp_path_factory.mktemp("studio")
    studio = Studio(data, warm=False)
    try:
        request = studio.request(studio.defaults())  # the page's defaults: class noun "toy", prior preservation on
        folder = data / "job"
        (folder / request.instance_data_dir).mkdir(parents=True)
        for photo in sorted((WORLD.subjects / SUBJECT).glob("*.png")):
            (folder / request.instance_data_dir / photo.name).write_bytes(photo.read_bytes())
        argv = trainer_argv(TRAINER, write_request(request, folder / REQUEST_FILE))
    finally:
        studio.close()
    subprocess.run([*argv, "--report_to", "none"], cwd=folder, check=True, timeout=600)  # as the job queue runs it
    return folder / request.output_dir / "hra_adapter.safetensors"


def test_base_model_draws_what_the_prompt_says(world):
    from eval.demo_world import prompt_following

    report = prompt_following(world, seeds=(0, 1))
    assert report["retrieval_top1"] >= RETRIEVAL_MIN, report  # chance: 0.10
    assert report["redness_red_prompt"] > report["redness_blue_prompt"] + REDNESS_GAP_MIN, report
    assert report["red_redder_per_seed"] == 1.0, report


def test_dreambooth_binds_the_subject_and_keeps_the_prompts(world, subject, trained):
    from eval.demo_world import subject_fidelity

    prompts = subject.prompts[:EVAL_PROMPTS]
    base = subject_fidelity(world, subject, None, SEEDS, prompts)
    tuned = subject_fidelity(world, subject, trained, SEEDS, prompts)
    assert tuned["dino"] > base["dino"] + DINO_GAIN_MIN, (base, tuned)
    assert tuned["clip_i"] > base["clip_i"] + CLIP_I_GAIN_MIN, (base, tuned)
    assert tuned["clip_t"] > base["clip_t"] - CLIP_T_DROP_MAX, (base, tuned)


def test_prior_preservation_keeps_the_class(world, subject, trained):
    from eval.demo_world import class_preservation

    report = class_preservation(world, subject, trained)
    assert report["base_vs_adapter_dino"] > CLASS_KEPT_MIN, report


def test_strength_zero_is_the_base_model_and_one_the_subject(world, subject, trained):
    prompt = subject.prompts[0]
    world.use([])
    base = world.images(prompt, [0])[0]
    world.use([trained], [0.0])
    zero = world.images(prompt, [0])[0]
    world.use([trained], [1.0])
    one = world.images(prompt, [0])[0]
    assert np.abs(np.asarray(zero, float) - np.asarray(base, float)).max() <= 1  # float rounding of uint8 only
    photos = load_images(subject.image_paths)
    assert world.dino.similarity(photos, [one]).mean() > world.dino.similarity(photos, [base]).mean() + 0.02


def test_control_adapter_follows_the_edges(world, tmp_path):
    from eval.demo_world import control_following

    data = tmp_path / "edges"
    subprocess.run([sys.executable, "-m", "hra_diffusion.demo_world", "control-data", str(data), "--n",
                    str(CONTROL_IMAGES)], cwd=REPO, check=True, timeout=120)
    out = tmp_path / "control"
    subprocess.run([sys.executable, "-m", "training.control_hra", "--pretrained_model_name_or_path", str(WORLD.base),
                    "--train_data_dir", str(data), "--control_type", "canny", "--resolution", "64",
                    "--max_train_steps", str(CONTROL_STEPS), "--train_batch_size", "8", "--seed", "0",
                    "--num_validation_images", "0", "--report_to", "none", "--output_dir", str(out)],
                   cwd=REPO, check=True, timeout=600)
    report = control_following(world, out / "hra_control.safetensors", n=8)
    assert report["controlled_f1"] > report["uncontrolled_f1"] + CONTROL_F1_GAIN_MIN, report


def test_shipped_control_adapter_follows_the_edges(world):
    from eval.demo_world import control_following

    report = control_following(world, WORLD.control, n=SHIPPED_CONTROL_N, scales=tuple(SHIPPED_F1_GAIN_MIN))
    for scale, gain in SHIPPED_F1_GAIN_MIN.items():
        key = "controlled_f1" if scale == 1 else f"controlled_x{scale:g}_f1"
        assert report[key] > report["uncontrolled_f1"] + gain, (scale, report)


def test_a_new_app_data_folder_offers_the_world_control_adapter(tmp_path):
    from app.studio import DEMO_CONTROL_NAME, Studio

    studio = Studio(tmp_path / "data", warm=False)
    try:
        (row,) = studio.list_adapters()
        assert (row["name"], row["kind"]) == (DEMO_CONTROL_NAME, "control")
        studio.delete_adapter(DEMO_CONTROL_NAME)
    finally:
        studio.close()
    studio = Studio(tmp_path / "data", warm=False)
    try:
        assert studio.list_adapters() == [], "a deleted demo adapter stays deleted"
    finally:
        studio.close()
