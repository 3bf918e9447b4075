"""The paper's "real images" row: how alike a subject's own photos are, the ceiling for DINO and CLIP-I.

    python -m eval.real_images --dataset_dir DIR [--subjects ...] [--out report.json]

For every subject of a DreamBooth-format folder: DINO, CLIP-I and LPIPS over all distinct pairs of its photos
(n photos, n(n-1)/2 pairs; all three are symmetric), averaged per subject, then over subjects. CLIP-T has no
prompt here, so it is left out, as in the paper.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from eval.images import load_images
from eval.metrics import CLIPScorer, DINOScorer, LPIPSScorer, ModelLoadError
from eval.prompts import load_benchmark
from eval.score import ScorerSettings, add_scorer_arguments, markdown_table, write_json_atomic
from hra_diffusion.cli import HelpFormatter

PAIR_METRICS = ("dino", "clip_i", "lpips")


def pair_scores(images: Sequence[Image.Image], dino: DINOScorer, clip: CLIPScorer,
                lpips: LPIPSScorer) -> dict[str, float]:
    """Means over the distinct pairs (i < j): self-pairs would add a perfect 1 (or 0 for LPIPS) per photo."""
    if len(images) < 2:
        raise ValueError(f"need at least 2 photos to form a pair, got {len(images)}")
    rows, cols = torch.triu_indices(len(images), len(images), offset=1)
    matrices = {"dino": dino.similarity(images, images), "clip_i": clip.image_similarity(images, images),
                "lpips": lpips.distance(images, images)}
    return {key: float(matrix[rows, cols].mean()) for key, matrix in matrices.items()}


def score_real_images(dataset_dir: str | Path, settings: ScorerSettings, subjects: Sequence[str] | None = None,
                      out: str | Path | None = None) -> dict:
    """Per-subject pair means and their mean over subjects; written to `out` when given."""
    benchmark = load_benchmark(dataset_dir, subjects=subjects)
    too_few = [subject.name for subject in benchmark if len(subject.image_paths) < 2]
    if too_few:
        raise ValueError(f"subject(s) with fewer than 2 photos, so no pair to score: {', '.join(too_few)}")
    scorers = settings.load()
    per_subject = {}
    for subject in tqdm(benchmark, desc="subjects", disable=None):
        n = len(subject.image_paths)
        per_subject[subject.name] = {"num_images": n, "num_pairs": n * (n - 1) // 2,
                                     **pair_scores(load_images(subject.image_paths), *scorers)}
    report = {
        "dataset_dir": str(dataset_dir),
        "num_subjects": len(per_subject),
        "aggregate": {key: float(np.mean([s[key] for s in per_subject.values()])) for key in PAIR_METRICS},
        "models": settings.describe(),
        "per_subject": per_subject,
    }
    if out is not None:
        write_json_atomic(out, report)
    return report


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.real_images", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--dataset_dir", required=True, help="DreamBooth-format folder (subject folders + "
                        "prompts_and_classes.txt)")
    parser.add_argument("--subjects", nargs="+", help="only these subjects (default: every subject folder present)")
    parser.add_argument("--out", help="JSON report path")
    add_scorer_arguments(parser)
    args = parser.parse_args(argv)
    try:
        report = score_real_images(args.dataset_dir, ScorerSettings.from_args(args), args.subjects, args.out)
    except (FileNotFoundError, ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(report["aggregate"], {"method": "real images", "params": "-"}))
    print(f"\n{report['num_subjects']} subjects" + (f"; report: {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
