"""Score a folder of generated images against a folder of real ones: DINO, CLIP-I, CLIP-T and LPIPS.

    python -m eval.score --real REAL_DIR --generated GEN_DIR [--prompts FILE] --out report.json

The prompts file gives CLIP-T its texts: either a JSON object mapping generated file name -> prompt (files ending
in .json), or plain text with one prompt per generated image, in sorted file-name order (blank lines ignored).
DINO, CLIP-I and LPIPS are means over every (real, generated) pair; per image they are means over the real images.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from PIL import Image

from eval.images import list_images, load_images
from eval.metrics import CLIPScorer, DINOScorer, LPIPSScorer, ModelLoadError
from hra_diffusion.cli import HelpFormatter
from hra_diffusion.io import atomic_write

METRICS = ("dino", "clip_i", "clip_t", "lpips")


@dataclass(frozen=True)
class ScorerSettings:
    """Which networks score, shared by eval.score, the benchmark and the real-images row so all read the same flags."""

    dino_model: str = "facebook/dino-vits16"
    clip_model: str = "ViT-L-14"
    clip_pretrained: str | None = "openai"
    lpips_net: str = "vgg"
    lpips_pretrained_backbone: bool = True
    lpips_size: int = 512
    device: str | None = None
    batch_size: int = 16

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ScorerSettings:
        clip_pretrained = None if args.clip_pretrained.lower() == "none" else args.clip_pretrained
        return cls(args.dino_model, args.clip_model, clip_pretrained, args.lpips_net, not args.lpips_random_backbone,
                   args.lpips_size, args.device, args.batch_size)

    def load(self) -> tuple[DINOScorer, CLIPScorer, LPIPSScorer]:
        """Load the three networks (raises ModelLoadError naming the flag to fix)."""
        return (DINOScorer(self.dino_model, device=self.device, batch_size=self.batch_size),
                CLIPScorer(self.clip_model, self.clip_pretrained, device=self.device, batch_size=self.batch_size),
                LPIPSScorer(self.lpips_net, device=self.device, pretrained_backbone=self.lpips_pretrained_backbone,
                            size=self.lpips_size, batch_size=self.batch_size))

    def random_networks(self) -> list[str]:
        """The scores that come from random weights (offline tests), so reports can say they mean nothing."""
        random_clip = self.clip_pretrained is None and not (Path(self.clip_model) / "config.json").is_file()
        return [name for name, random in (("CLIP-I/CLIP-T", random_clip),
                                          ("LPIPS", not self.lpips_pretrained_backbone)) if random]

    def describe(self) -> dict:
        """The settings that change scores, for reports (the device and batch size do not)."""
        return {key: value for key, value in asdict(self).items() if key not in ("device", "batch_size")}


def add_scorer_arguments(parser: argparse.ArgumentParser) -> None:
    """The metric-network flags, read back by ScorerSettings.from_args."""
    group = parser.add_argument_group("metric networks")
    group.add_argument("--dino_model", default="facebook/dino-vits16", help="Hub name or local folder")
    group.add_argument("--clip_model", default="ViT-L-14",
                       help="open_clip architecture name, or local-dir:FOLDER (open_clip_config.json + weights)")
    group.add_argument("--clip_pretrained", default="openai",
                       help="open_clip tag or local checkpoint file; 'none' = random weights (tests only)")
    group.add_argument("--lpips_net", default="vgg", choices=["vgg", "alex"])
    group.add_argument("--lpips_size", type=int, default=512, help="side images are resized to for LPIPS")
    group.add_argument("--lpips_random_backbone", action="store_true",
                       help="random LPIPS backbone, for offline tests only (scores are meaningless)")
    group.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if available)")
    group.add_argument("--batch_size", type=int, default=16, help="images per metric-network batch")


def load_prompts(path: str | Path, files: Sequence[Path]) -> list[str]:
    """One prompt per file in `files`, from a JSON name->prompt mapping or a one-prompt-per-line text file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".json":
        mapping = json.loads(text)
        if not isinstance(mapping, dict):
            raise ValueError(f"{path}: expected a JSON object mapping file name -> prompt")
        missing = [file.name for file in files if file.name not in mapping]
        if missing:
            raise ValueError(f"{path}: no prompt for {len(missing)} generated image(s), e.g. {missing[:3]}")
        return [str(mapping[file.name]) for file in files]
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if len(prompts) != len(files):
        raise ValueError(f"{path}: {len(prompts)} prompts for {len(files)} generated images; "
                         "give one line per image in sorted file-name order")
    return prompts


def score_images(real: Sequence[Image.Image], generated: Sequence[Image.Image], names: Sequence[str],
                 prompts: Sequence[str] | None, dino: DINOScorer, clip: CLIPScorer,
                 lpips: LPIPSScorer) -> dict:
    """Per-image and aggregate scores with already loaded scorers (so a benchmark loads each model once).

    A generated image's DINO / CLIP-I / LPIPS is its mean over the real images; every image has the same number
    of real partners, so the mean of those is the mean over all (real, generated) pairs.
    """
    if len(names) != len(generated):
        raise ValueError(f"{len(names)} names for {len(generated)} generated images")
    per_generated = {
        "dino": dino.similarity(real, generated).mean(dim=1),
        "clip_i": clip.image_similarity(real, generated).mean(dim=1),
        "lpips": lpips.distance(real, generated).mean(dim=1),
    }
    if prompts is not None:
        per_generated["clip_t"] = clip.text_similarity(generated, prompts)
    keys = [key for key in METRICS if key in per_generated]
    per_image = [{"file": name, **{key: float(per_generated[key][i]) for key in keys}} for i, name in enumerate(names)]
    return {"aggregate": {key: float(per_generated[key].mean()) for key in keys}, "per_image": per_image}


def write_json_atomic(path: str | Path, data: dict) -> None:
    """JSON through the library's atomic_write: readers never see a half-written report."""
    text = json.dumps(data, indent=2) + "\n"
    atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def score_folders(real_dir: str | Path, generated_dir: str | Path, prompts_file: str | Path | None = None,
                  out: str | Path | None = None, *, dino_model: str = "facebook/dino-vits16",
                  clip_model: str = "ViT-L-14", clip_pretrained: str | None = "openai", lpips_net: str = "vgg",
                  lpips_pretrained_backbone: bool = True, lpips_size: int = 512, device: str | None = None,
                  batch_size: int = 16) -> dict:
    """Score `generated_dir` against `real_dir`, write the report to `out` (when given) and return it."""
    settings = ScorerSettings(dino_model, clip_model, clip_pretrained, lpips_net, lpips_pretrained_backbone,
                              lpips_size, device, batch_size)
    real_files, generated_files = list_images(real_dir), list_images(generated_dir)
    prompts = load_prompts(prompts_file, generated_files) if prompts_file is not None else None
    scores = score_images(load_images(real_files), load_images(generated_files),
                          [file.name for file in generated_files], prompts, *settings.load())
    report = {
        "real_dir": str(real_dir),
        "generated_dir": str(generated_dir),
        "num_real": len(real_files),
        "num_generated": len(generated_files),
        "models": settings.describe(),
        **scores,
    }
    if out is not None:
        write_json_atomic(out, report)
    return report


def markdown_table(aggregate: Mapping[str, float], leading: Mapping[str, str] | None = None) -> str:
    """One-row table in the paper's column order; `leading` puts e.g. method and params columns first."""
    leading = dict(leading or {})
    keys = [key for key in METRICS if key in aggregate]
    header = "| " + " | ".join([*leading, *(key.upper().replace("_", "-") for key in keys)]) + " |"
    rule = "| " + " | ".join("---" for _ in [*leading, *keys]) + " |"
    row = "| " + " | ".join([*leading.values(), *(f"{aggregate[key]:.4f}" for key in keys)]) + " |"
    return "\n".join([header, rule, row])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m eval.score", description=__doc__.split("\n\n")[0],
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--real", required=True, help="folder of real (reference) images")
    parser.add_argument("--generated", required=True, help="folder of generated images")
    parser.add_argument("--prompts", help="CLIP-T prompts: JSON {file name: prompt} or one line per image")
    parser.add_argument("--out", required=True, help="JSON report path")
    add_scorer_arguments(parser)
    args = parser.parse_args(argv)
    settings = ScorerSettings.from_args(args)
    try:
        report = score_folders(args.real, args.generated, args.prompts, args.out, **asdict(settings))
    except (FileNotFoundError, ValueError, ModelLoadError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(markdown_table(report["aggregate"]))
    if settings.random_networks():
        print(f"\nWARNING: {' and '.join(settings.random_networks())} come from networks with random weights here "
              "(--clip_pretrained none / --lpips_random_backbone): those numbers mean nothing.", file=sys.stderr)
    print(f"\n{report['num_generated']} generated vs {report['num_real']} real images; report: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
