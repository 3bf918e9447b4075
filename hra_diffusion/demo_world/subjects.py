"""The demo subjects: five objects the base model has never seen, in the DreamBooth dataset's folder layout.

Each wears a pattern the world never samples (EXTRA_PATTERNS) in a combination of the world's colors, so the base
model cannot draw it from a prompt and only fine-tuning can teach it. The colors stay inside the world's palette
on purpose: the VAE, trained on that palette only, cannot reproduce others (a teal subject decoded as purple), and
no adapter on the UNet can fix what the VAE cannot draw. Five "photos" each, in varied scenes, places
and sizes, and `prompts_and_classes.txt` in google/dreambooth's format with toy versions of its prompt list.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .scene import Look, Scene, render


@dataclass(frozen=True)
class DemoSubject:
    name: str
    cls: str
    look: Look
    description: str  # for people: what makes it unique


SUBJECTS = (
    DemoSubject("star_toy", "toy", Look((40, 165, 55), "stars", (245, 210, 30)), "a green teddy with yellow stars"),
    DemoSubject("zigzag_cup", "cup", Look((35, 75, 215), "zigzag", (245, 130, 25)), "a blue cup with an orange zigzag"),
    DemoSubject("ring_ball", "ball", Look((135, 50, 175), "rings", (245, 210, 30)), "a purple ball with yellow rings"),
    DemoSubject("split_cube", "cube", Look((215, 35, 35), "halves", (245, 245, 240)), "a cube, half red, half white"),
    DemoSubject("zigzag_dog", "dog", Look((245, 130, 25), "zigzag", (25, 25, 28)), "an orange dog with black zigzags"),
)
# Where each of the five photos is taken: (scene, position, size); varied as DreamBooth's photos are.
PHOTOS = (
    ("grass", "center", "large"),
    ("room", "left", "medium"),
    ("beach", "right", "medium"),
    ("snow", "center", "medium"),
    ("city", "left", "large"),
)
OBJECT_PROMPTS = (
    "a {0} {1} on the grass",
    "a {0} {1} on the beach",
    "a {0} {1} in the snow",
    "a {0} {1} on the water",
    "a {0} {1} in the sky",
    "a {0} {1} in a room",
    "a {0} {1} in the city",
    "a {0} {1} in the forest",
    "a {0} {1} wearing a red hat",
    "a {0} {1} wearing a yellow hat on the beach",
    "a small {0} {1} on the left",
    "a large {0} {1} on the right",
    "a red {0} {1}",
    "a green {0} {1} in the snow",
    "a {0} {1} with white stripes",
)
LIVE_PROMPTS = OBJECT_PROMPTS[:12] + (
    "a {0} {1} wearing a black hat in the forest",
    "a small {0} {1} on the grass on the right",
    "a {0} {1} in the water",
)


def subject_photos(subject: DemoSubject, size: int = 64) -> list:
    """The subject's five photos as PIL images."""
    index = {s.name: i for i, s in enumerate(SUBJECTS)}.get(subject.name, 0)
    return [
        render(Scene(subject.cls, subject.look, None, None, size_name, position, scene, None, seed=1000 * index + k),
               size)
        for k, (scene, position, size_name) in enumerate(PHOTOS)
    ]


def prompts_file_text() -> str:
    """prompts_and_classes.txt in google/dreambooth's format (what eval.prompts parses)."""
    def block(prompts: tuple[str, ...]) -> str:
        return "prompt_list = [\n" + "".join(f"'{p}'.format(unique_token, class_token),\n" for p in prompts) + "]\n"

    table = "".join(f"{s.name},{s.cls}\n" for s in SUBJECTS)
    return (f"Classes\n\nsubject_name,class\n{table}\n"
            f"Prompts\n\nObject Prompts\n\n{block(OBJECT_PROMPTS)}\nLive Subject Prompts\n\n{block(LIVE_PROMPTS)}")


def write_subjects(out_dir: Path, size: int = 64) -> None:
    """The subjects in DreamBooth layout: out_dir/<name>/0k.png and out_dir/prompts_and_classes.txt."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for subject in SUBJECTS:
        folder = out_dir / subject.name
        folder.mkdir(exist_ok=True)
        for k, photo in enumerate(subject_photos(subject, size)):
            photo.save(folder / f"{k:02d}.png")
    (out_dir / "prompts_and_classes.txt").write_text(prompts_file_text(), encoding="utf-8")
