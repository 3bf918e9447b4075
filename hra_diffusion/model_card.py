"""The README.md a trainer leaves beside its adapter: Hugging Face front matter, samples, settings, how to use it.

The trainers give the parts that differ (title, text, their own settings, the usage snippet); the layout, the
settings every run shares and the atomic write are here, so every card reads the same.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .io import atomic_write

BASE_TAGS = ("stable-diffusion", "diffusers", "hra")


def common_settings(settings: Any, steps: int) -> dict[str, Any]:
    """The settings table rows every trainer has (``settings``: the run's TrainSettings)."""
    return {
        "steps": steps,
        "resolution": settings.resolution,
        "learning rate": settings.learning_rate,
        "lr scheduler": settings.lr_scheduler,
        "batch size x accumulation": f"{settings.train_batch_size} x {settings.gradient_accumulation_steps}",
        "HRA r": settings.hra_r,
        "strictly orthogonal (GS)": (f"yes, {settings.hra_gs_form} form" if settings.hra_apply_GS else "no"),
        "orthogonality lambda": settings.hra_lambda,
        "target modules": settings.hra_target_modules,
        "mixed precision": settings.mixed_precision or "no",
        "seed": settings.seed,
    }


def sample_links(samples: Sequence[Path], output_dir: Path) -> str:
    """Markdown images for sample files under ``output_dir``, on one line."""
    return "".join(f"![{p.name}]({p.relative_to(output_dir).as_posix()}) " for p in samples)


def write_model_card(
    output_dir: Path,
    *,
    base_model: str,
    title: str,
    body: str,
    settings: Mapping[str, Any],
    usage: str,
    notes: str = "",
    tags: Sequence[str] = (),
    front_matter: Mapping[str, str] | None = None,
) -> Path:
    """Write ``output_dir/README.md`` atomically: ``body`` (markdown: intro, samples), the settings table, then
    ``usage`` (a python snippet) and ``notes`` (markdown after it)."""
    fields = {"base_model": base_model, **(front_matter or {})}
    header = "".join(f"{key}: {json.dumps(value)}\n" for key, value in fields.items())  # JSON strings are YAML
    tag_lines = "".join(f"- {tag}\n" for tag in (*BASE_TAGS, *tags))
    table = "\n".join(f"| {key} | {value} |" for key, value in settings.items())
    card = (
        f"---\n{header}tags:\n{tag_lines}---\n\n# {title}\n\n{body.strip()}\n\n"
        f"## Settings\n\n| setting | value |\n| --- | --- |\n{table}\n\n"
        f"## Use it\n\n```python\n{usage.strip()}\n```\n"
    )
    if notes.strip():
        card += f"\n{notes.strip()}\n"
    path = Path(output_dir) / "README.md"
    atomic_write(path, lambda tmp: Path(tmp).write_text(card, encoding="utf-8"))
    return path
