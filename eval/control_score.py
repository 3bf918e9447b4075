"""Score canny-controlled generations the HRA paper's way: edge IoU and F1 against the control source.

    python -m eval.control_score --conditions SOURCE_DIR --generated GEN_DIR [--out report.json] [--low 100 --high 200]

SOURCE_DIR holds the images the canny conditions were computed from (e.g. a control dataset's ``images/``), not
the edge maps: cv2.Canny(low, high) runs on each source and on its generated image (resized to the source's size),
and per-image pixel IoU and F1 are averaged. Pairs are matched by file name without extension (0001.jpg <-> 0001.png).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from eval.images import list_images, load_images
from eval.metrics import canny_iou_f1
from eval.score import write_json_atomic
from hra_diffusion.cli import HelpFormatter

METRICS = ("canny_iou", "canny_f1")


def _by_stem(folder: str | Path) -> dict[str, Path]:
    files: dict[str, Path] = {}
    for path in list_images(folder):
        if path.stem in files:
            raise ValueError(f"{folder}: {files[path.stem].name} and {path.name} share a name; keep one")
        files[path.stem] = path
    return files


def match_pairs(conditions_dir: str | Path, generated_dir: str | Path) -> list[tuple[Path, Path]]:
    """(source, generated) pairs matched by file stem; any image without a partner is an error naming it."""
    sources, generated = _by_stem(conditions_dir), _by_stem(generated_dir)
    problems = [
        f"{len(names)} {what} without a partner in {where}: {', '.join(sorted(names)[:5])}"
        + (" ..." if len(names) > 5 else "")
        for names, what, where in (
            (sources.keys() - generated.keys(), "condition source(s)", generated_dir),
            (generated.keys() - sources.keys(), "generated image(s)", conditions_dir),
        )
        if names
    ]
    if problems:
        raise ValueError("unmatched file names (pairs are matched by name without extension):\n  " +
                         "\n  ".join(problems))
    return [(sources[stem], generated[stem]) for stem in sorted(sources)]


def score_control(conditions_dir: str | Path, generated_dir: str | Path, out: str | Path | None = None,
                  low: int = 100, high: int = 200) -> dict:
    """Per-image and mean canny IoU / F1; the report is also written atomically to ``out`` when given."""
    per_image = []
    for source_path, generated_path in match_pairs(conditions_dir, generated_dir):
        source, generated = load_images([source_path, generated_path])  # one pair at a time: sets can be large
        iou, f1 = canny_iou_f1(source, generated, low, high)
        per_image.append({"file": generated_path.name, "condition": source_path.name, "canny_iou": iou,
                          "canny_f1": f1})
    report = {
        "conditions_dir": str(conditions_dir),
        "generated_dir": str(generated_dir),
        "canny_thresholds": [low, high],
        "num_pairs": len(per_image),
        "aggregate": {key: sum(row[key] for row in per_image) / len(per_image) for key in METRICS},
        "per_image": per_image,
    }
    if out is not None:
        write_json_atomic(out, report)
    return report


def markdown_table(aggregate: dict[str, float]) -> str:
    return "\n".join(["| canny IoU | canny F1 |", "| --- | --- |",
                      f"| {aggregate['canny_iou']:.4f} | {aggregate['canny_f1']:.4f} |"])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.control_score", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--conditions", required=True, help="folder of control source images (not edge maps)")
    parser.add_argument("--generated", required=True, help="folder of generated images, same file names")
    parser.add_argument("--out", help="JSON report path")
    parser.add_argument("--low", type=int, default=100, help="Canny lower threshold")
    parser.add_argument("--high", type=int, default=200, help="Canny upper threshold")
    args = parser.parse_args(argv)
    try:
        report = score_control(args.conditions, args.generated, args.out, args.low, args.high)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(report["aggregate"]))
    print(f"\n{report['num_pairs']} pairs" + (f"; report: {args.out}" if args.out else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
