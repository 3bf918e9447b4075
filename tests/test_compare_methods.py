"""The method comparison's --quick run on the demo world: every method trains, generates and scores (slow tier)."""

from __future__ import annotations

import json
import math

import pytest

from eval import compare_methods
from hra_diffusion.demo_world import find_demo_world

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(find_demo_world() is None, reason="the demo world is not in assets/"),
]


def test_quick_comparison_has_a_row_per_method_with_finite_numbers(tmp_path):
    assert compare_methods.main(["--out", str(tmp_path), "--quick"]) == 0
    rows = json.loads((tmp_path / "comparison.json").read_text())["methods"]
    assert [r["method"] for r in rows] == [m.name for m in compare_methods.METHODS]
    for row in rows:
        assert row["trainable_params"] > 0 and row["num_images"] == 2
        assert all(math.isfinite(value) for value in row["aggregate"].values()), row
        assert row["train_s"] > 0 and row["peak_memory_mib"] > 0
    hra, lora = rows[0]["trainable_params"], rows[3]["trainable_params"]
    assert 0.5 < lora / hra < 2, "LoRA is sized to about HRA's parameter count"
    table = (tmp_path / "comparison.md").read_text()
    assert all(f"| {m.name} |" in table for m in compare_methods.METHODS)
    assert (tmp_path / "comparison.png").is_file() and (tmp_path / "contact_sheet.png").is_file()
