"""What the demo world shows, measured: the base model draws what prompts say, an HRA adapter binds its subject,
a control adapter makes images follow edges. The tests (tests/test_demo_world.py) and the docs' numbers use these.

    python -m eval.demo_world base                                   # prompt retrieval and the color check
    python -m eval.demo_world subject --subject star_toy --adapter out/hra_adapter.safetensors
    python -m eval.demo_world control --adapter out/hra_control.safetensors

Scores use the world's own scorers through the usual metric classes: CLIP-I and CLIP-T with its CLIP
(`scorer/clip`), the DINO score with its ViT (`scorer/dino`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from eval.images import load_images
from eval.metrics import CLIPScorer, DINOScorer, canny_iou_f1
from eval.prompts import Subject, load_benchmark
from hra_diffusion.cli import HelpFormatter
from hra_diffusion.demo_world import UNIQUE_TOKEN, DemoWorld, find_demo_world
from hra_diffusion.pipelines import attach_adapters, generate, load_pipeline

# Ten prompts that differ in class, color and scene: retrieval among them is 10% by chance.
PROBE_PROMPTS = (
    "a photo of a red ball on the grass",
    "a photo of a blue cube in the snow",
    "a photo of a yellow cup on the beach",
    "a photo of a green toy in a room",
    "a photo of a white house in the forest",
    "a photo of a black dog in the city",
    "a photo of an orange ball in the sky",
    "a photo of a purple cube on the water",
    "a photo of a red house on the beach",
    "a photo of a blue dog on the grass",
)
COLOR_PROMPTS = ("a photo of a red ball on the grass", "a photo of a blue ball on the grass")
SAMPLING = dict(steps=25, guidance=7.5)


@dataclass
class World:
    """A loaded demo world: its pipeline (float32, CPU unless asked) and its two scorers."""

    paths: DemoWorld
    pipe: object
    clip: CLIPScorer
    dino: DINOScorer

    @classmethod
    def load(cls, paths: DemoWorld | None = None, device: str = "cpu") -> World:
        paths = paths or find_demo_world()
        if paths is None:
            raise FileNotFoundError("the demo world is not built: run `python -m hra_diffusion.demo_world build "
                                    "assets/demo_world`, or set HRA_DEMO_WORLD to a built one")
        return cls(paths, load_pipeline(paths.base, device=device), CLIPScorer(str(paths.clip), device=device),
                   DINOScorer(str(paths.dino), device=device))

    def images(self, prompt: str, seeds: Sequence[int], **kwargs) -> list[Image.Image]:
        settings = {**SAMPLING, **kwargs}
        return [generate(self.pipe, prompt, seed=seed, **settings)[0] for seed in seeds]

    def use(self, adapters: Sequence[Path], strengths: Sequence[float] | None = None) -> None:
        """Exactly these adapters active (none: the base model). Each file is named by its path's digest: trainers
        all write hra_adapter.safetensors, and a name already loaded would be reused instead of the new file."""
        names = ["a" + hashlib.sha256(str(Path(p).resolve()).encode()).hexdigest()[:12] for p in adapters]
        attach_adapters(self.pipe, list(adapters), strengths=strengths, names=names)


def prompt_following(world: World, seeds: Sequence[int] = (0, 1, 2)) -> dict:
    """Top-1 retrieval of each image's own prompt among PROBE_PROMPTS (CLIP-T), and the color check in pixels."""
    texts = world.clip.embed_texts(list(PROBE_PROMPTS))
    hits, total = 0, 0
    for i, prompt in enumerate(PROBE_PROMPTS):
        scores = world.clip.embed_images(world.images(prompt, seeds)) @ texts.T
        hits += int((scores.argmax(dim=1) == i).sum())
        total += len(seeds)
    redness = {prompt: [_redness(im) for im in world.images(prompt, seeds)] for prompt in COLOR_PROMPTS}
    red, blue = (np.array(redness[p]) for p in COLOR_PROMPTS)
    return {"retrieval_top1": hits / total, "chance": 1 / len(PROBE_PROMPTS), "images": total,
            "redness_red_prompt": float(red.mean()), "redness_blue_prompt": float(blue.mean()),
            "red_redder_per_seed": float((red > blue).mean())}


def _redness(image: Image.Image) -> float:
    """Mean of R - B over the picture, in 0-255 units."""
    array = np.asarray(image.convert("RGB"), dtype=np.float32)
    return float((array[..., 0] - array[..., 2]).mean())


def subject_fidelity(world: World, subject: Subject, adapter: Path | None, seeds: Sequence[int] = (0, 1),
                     prompts: Sequence[str] | None = None, strength: float = 1.0) -> dict:
    """DINO, CLIP-I (means over every generated x real pair) and CLIP-T over the subject's prompts."""
    world.use([adapter] if adapter else [], [strength])
    prompts = list(prompts or subject.prompts)
    real = load_images(subject.image_paths)
    generated, texts = [], []
    for prompt in prompts:
        generated += world.images(prompt, seeds)
        texts += [prompt] * len(seeds)
    return {"dino": float(world.dino.similarity(real, generated).mean()),
            "clip_i": float(world.clip.image_similarity(real, generated).mean()),
            "clip_t": float(world.clip.text_similarity(generated, texts).mean()),
            "images": len(generated)}


def class_preservation(world: World, subject: Subject, adapter: Path, seeds: Sequence[int] = (0, 1, 2, 3)) -> dict:
    """For the class prompt ("a photo of a toy"): how far the adapter moves its images from the base model's (DINO
    cosine of same-seed pairs) and how much like the subject they become (DINO to the subject's photos)."""
    prompt = f"a photo of a {subject.class_name}"
    real = load_images(subject.image_paths)
    world.use([])
    base = world.images(prompt, seeds)
    world.use([adapter])
    tuned = world.images(prompt, seeds)
    pairs = (world.dino.embed(base) * world.dino.embed(tuned)).sum(dim=1)
    return {"base_vs_adapter_dino": float(pairs.mean()),
            "subject_likeness_base": float(world.dino.similarity(real, base).mean()),
            "subject_likeness_adapter": float(world.dino.similarity(real, tuned).mean())}


@dataclass
class ControlRow:
    """One held-out world picture, its Canny map, the base model's image for its caption, and the control adapter's
    image at each control scale (all with seed = the picture's index)."""

    picture: Image.Image
    condition: Image.Image
    plain: Image.Image
    controlled: list[Image.Image]


def control_rows(world: World, adapter: Path, n: int = 12, seed: int = 2,
                 scales: Sequence[float] = (1.0,)) -> list[ControlRow]:
    """What control_scores and control_figure read: held-out pictures 0..n-1 of world ``seed``, drawn from their
    captions without control and from their Canny maps and captions with ``adapter``."""
    from hra_diffusion.control import make_condition
    from hra_diffusion.demo_world.scene import world_sample

    rows = []
    for i in range(n):
        picture, text, _ = world_sample(i, seed)
        condition = make_condition(picture, "canny")
        world.use([])
        plain = world.images(text, [i])[0]
        world.use([adapter])
        controlled = [generate(world.pipe, text, seed=i, control_image=condition, control_scale=scale, **SAMPLING)[0]
                      for scale in scales]
        rows.append(ControlRow(picture, condition, plain, controlled))
    return rows


def control_scores(rows: Sequence[ControlRow], scales: Sequence[float]) -> dict:
    """Edge IoU/F1 of the rows' images against their pictures, without control and at each scale.

    Keys: ``uncontrolled_iou/f1``, ``controlled_iou/f1`` (scale 1) and ``controlled_x{scale}_iou/f1`` for others,
    each controlled one with ``..._f1_gain_se``, the paired standard error of its F1 gain.
    """
    columns = [("uncontrolled", [row.plain for row in rows])]
    columns += [("controlled" if s == 1 else f"controlled_x{s:g}", [row.controlled[k] for row in rows])
                for k, s in enumerate(scales)]
    report = {}
    for kind, images in columns:
        scores = np.array([canny_iou_f1(row.picture, image) for row, image in zip(rows, images)])
        report[f"{kind}_iou"], report[f"{kind}_f1"] = float(scores[:, 0].mean()), float(scores[:, 1].mean())
        if kind == "uncontrolled":
            plain_f1 = scores[:, 1]
        elif len(rows) > 1:  # the standard error of the mean F1 gain, paired picture by picture
            report[f"{kind}_f1_gain_se"] = float((scores[:, 1] - plain_f1).std(ddof=1) / np.sqrt(len(rows)))
        else:
            report[f"{kind}_f1_gain_se"] = float("nan")
    return report


def control_following(world: World, adapter: Path, n: int = 12, seed: int = 2,
                      scales: Sequence[float] = (1.0,)) -> dict:
    """Edge IoU/F1 between held-out world pictures and images generated from their Canny maps and captions, with the
    control adapter at each control scale and without it (the base model on the caption alone): control_scores."""
    return control_scores(control_rows(world, adapter, n, seed, scales), scales)


def control_figure(rows: Sequence[ControlRow], scales: Sequence[float], scale: int = 2) -> Image.Image:
    """The docs' control picture: a row per held-out picture, with its Canny map, the base model on the caption, then
    the control adapter at each control scale."""
    from PIL import ImageDraw

    labels = ["picture", "Canny map", "no control", *(f"control x{s:g}" for s in scales)]
    cell, text_h = 64 * scale, 16
    sheet = Image.new("RGB", (len(labels) * cell, text_h + len(rows) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    for c, label in enumerate(labels):
        draw.text((c * cell + 4, 2), label, fill="black")
    for r, row in enumerate(rows):
        for c, picture in enumerate([row.picture, row.condition, row.plain, *row.controlled]):
            sheet.paste(picture.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST),
                        (c * cell, text_h + r * cell))
    return sheet


FIGURE_ROWS = 6  # held-out pictures in the control figure
FIGURE_PROMPTS = (0, 2, 8, 9, 12)  # indices into the subject's prompts: scenes, a hat, a color change


def figure(world: World, subject: Subject, adapter: Path, prompt_indices: Sequence[int] = FIGURE_PROMPTS,
           seed: int = 0, scale: int = 2) -> Image.Image:
    """The README's picture: the subject's photos, then the base model and the adapter on the same prompts and
    seed, one column per prompt, each row labelled."""
    from PIL import ImageDraw

    prompts = [subject.prompts[i] for i in prompt_indices]
    photos = load_images(subject.image_paths)
    world.use([])
    base = [world.images(p, [seed])[0] for p in prompts]
    world.use([adapter])
    tuned = [world.images(p, [seed])[0] for p in prompts]
    cell, label_w, text_h = 64 * scale, 150, 30
    columns = max(len(photos), len(prompts))
    sheet = Image.new("RGB", (label_w + columns * cell, 3 * cell + text_h), "white")
    draw = ImageDraw.Draw(sheet)
    rows = (("subject photos", photos, None), ("base model", base, prompts), ("after HRA", tuned, None))
    y = 0
    for label, images, captions in rows:
        if captions:  # the prompts above the two generated rows
            for c, text in enumerate(captions):
                words = text.split()
                half = (len(words) + 1) // 2
                draw.multiline_text((label_w + c * cell + 2, y), " ".join(words[:half]) + "\n" +
                                    " ".join(words[half:]), fill="black", spacing=1)
            y += text_h
        draw.text((4, y + cell // 2 - 6), label, fill="black")
        for c, image in enumerate(images):
            sheet.paste(image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST), (label_w + c * cell, y))
        y += cell
    return sheet


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.demo_world", description=__doc__.split("\n\n")[0],
                                     formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("base", help="does the base model draw what prompts say")
    s = sub.add_parser("subject", help="subject fidelity of an adapter against the base model")
    s.add_argument("--subject", required=True, help="a demo subject's name (assets/demo_world/subjects)")
    s.add_argument("--adapter", type=Path, required=True, help="the subject's HRA adapter file")
    s.add_argument("--seeds", type=int, default=2, help="images per prompt")
    c = sub.add_parser("control", help="edge IoU/F1 with and without a control adapter")
    c.add_argument("--adapter", type=Path, required=True, help="the control adapter file")
    c.add_argument("--n", type=int, default=12, help="held-out world pictures")
    c.add_argument("--scales", type=float, nargs="+", default=[1.0], help="control scales to generate with")
    c.add_argument("--figure", type=Path, help="also write a PNG of the first 6 pictures, their maps and images")
    f = sub.add_parser("figure", help="photos, base model and adapter side by side (the README's picture)")
    f.add_argument("--subject", required=True)
    f.add_argument("--adapter", type=Path, required=True)
    f.add_argument("--out", type=Path, required=True, help="PNG file to write")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    try:
        world = World.load()
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "base":
        report = prompt_following(world)
    elif args.command == "subject":
        subject = load_benchmark(world.paths.subjects, UNIQUE_TOKEN, [args.subject])[0]
        seeds = range(args.seeds)
        report = {"base": subject_fidelity(world, subject, None, seeds),
                  "adapter": subject_fidelity(world, subject, args.adapter, seeds),
                  "class_prompt": class_preservation(world, subject, args.adapter)}
    elif args.command == "control":
        rows = control_rows(world, args.adapter, args.n, scales=args.scales)
        report = control_scores(rows, args.scales)
        if args.figure:
            args.figure.parent.mkdir(parents=True, exist_ok=True)
            control_figure(rows[:FIGURE_ROWS], args.scales).save(args.figure)
            report["figure"] = str(args.figure)
    else:
        subject = load_benchmark(world.paths.subjects, UNIQUE_TOKEN, [args.subject])[0]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        figure(world, subject, args.adapter).save(args.out)
        report = {"figure": str(args.out)}
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
