"""Out-of-range numbers on the trainers' command lines are refused by argparse, before anything loads."""

from __future__ import annotations

import pytest

from training import control_hra, dreambooth_hra

DREAMBOOTH = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "a sks dog"]
CONTROL = ["--pretrained_model_name_or_path", "m", "--train_data_dir", "d"]


@pytest.mark.parametrize("trainer, required", [(dreambooth_hra, DREAMBOOTH), (control_hra, CONTROL)])
@pytest.mark.parametrize("resolution", ["0", "-64", "100"])
def test_resolution_must_be_a_positive_multiple_of_8(trainer, required, resolution, capsys):
    """0 once trained silently at 512 and -64 ended in a traceback."""
    with pytest.raises(SystemExit):
        trainer.parse_args([*required, "--resolution", resolution])
    assert f"--resolution must be a positive multiple of 8, got {resolution}" in capsys.readouterr().err


def test_dreambooth_resolution_defaults_to_the_models_own_size():
    assert dreambooth_hra.parse_args(DREAMBOOTH).resolution is None  # resolved from the UNet once it is loaded


def test_paper_preset_sets_the_papers_defaults_and_flags_still_win():
    prior = ["--class_data_dir", "c", "--class_prompt", "a dog"]
    paper = dreambooth_hra.parse_args([*DREAMBOOTH, *prior, "--preset", "paper"])
    assert (paper.max_train_steps, paper.num_class_images, paper.with_prior_preservation) == (2000, 200, True)
    mine = dreambooth_hra.parse_args([*DREAMBOOTH, *prior, "--preset", "paper", "--max_train_steps", "800"])
    assert mine.max_train_steps == 800 and mine.num_class_images == 200
    quick = dreambooth_hra.parse_args(DREAMBOOTH)
    assert (quick.max_train_steps, quick.with_prior_preservation) == (None, False)
