"""The control comparison's --quick run on the demo world: every method trains, draws from held-out edges and is scored
(slow tier)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from eval import compare_control
from hra_diffusion.demo_world import find_demo_world

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_demo_world() is None, reason="the demo world is not in assets/"),
]


def hra_control_size(base) -> int:
    """HRA r=8 on the control targets (8 vectors of each layer's input width) plus the hint encoder, from the model's
    shapes alone."""
    from diffusers import UNet2DConditionModel

    from hra_diffusion.control import CONTROL_TARGETS, ConditionEncoder

    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet")
    vectors = sum(8 * m.in_features for name, m in unet.named_modules()
                  if isinstance(m, torch.nn.Linear) and name.endswith(CONTROL_TARGETS))
    return vectors + sum(p.numel() for p in ConditionEncoder.for_unet(unet, vae_scale_factor=4).parameters())


def test_quick_control_comparison_has_a_row_per_method_with_finite_numbers(tmp_path):
    assert compare_control.main(["--out", str(tmp_path), "--quick"]) == 0
    rows = json.loads((tmp_path / "control_comparison.json").read_text())["methods"]
    assert [r["method"] for r in rows] == [m.name for m in compare_control.METHODS]
    for row in rows:
        assert set(row["aggregate"]) == {"canny_iou", "canny_f1"}, row
        assert all(math.isfinite(value) and 0 <= value <= 1 for value in row["aggregate"].values()), row
        score = json.loads((tmp_path / row["slug"] / "score.json").read_text())
        assert score["num_pairs"] == compare_control.QUICK["held_out"]
    none, *trained = rows
    assert none["trainable_params"] is None and "train_s" not in none
    for row in trained:
        assert row["train_s"] > 0 and row["peak_memory_mib"] > 0 and row["learning_rate"] == 1e-3
    by_slug = {r["slug"]: r for r in trained}
    assert by_slug["hra"]["trainable_params"] == hra_control_size(find_demo_world().base)
    assert 0.8 < by_slug["lora"]["trainable_params"] / by_slug["hra"]["trainable_params"] < 1.25
    assert 0.8 < by_slug["oft"]["trainable_params"] / by_slug["hra"]["trainable_params"] < 1.25
    table = (tmp_path / "control_comparison.md").read_text()
    assert all(f"| {m.name} |" in table for m in compare_control.METHODS)
    assert (tmp_path / "control_chart.png").is_file() and (tmp_path / "control_contact_sheet.png").is_file()

    # a rerun reuses every run and image (the same numbers, nothing trained again); other settings need a new OUT
    progress = {r["slug"]: (tmp_path / r["slug"] / "progress.jsonl").stat().st_mtime_ns for r in trained}
    assert compare_control.main(["--out", str(tmp_path), "--quick"]) == 0
    again = json.loads((tmp_path / "control_comparison.json").read_text())["methods"]
    assert [r["aggregate"] for r in again] == [r["aggregate"] for r in rows]
    assert {s: (tmp_path / s / "progress.jsonl").stat().st_mtime_ns for s in progress} == progress
    assert compare_control.main(["--out", str(tmp_path), "--quick", "--steps", "21"]) == 2
