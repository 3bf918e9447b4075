"""The DreamBooth benchmark (google/dreambooth layout): subjects, their classes, their 25 prompts, and work sharding.

The dataset folder holds one folder of photos per subject and `prompts_and_classes.txt`, a text file (not code)
with a `subject_name,class` table and two Python-looking prompt lists, "Object Prompts" and "Live Subject Prompts",
whose entries read `'a {0} {1} in the jungle'.format(unique_token, class_token),`. Live subjects are the dogs and
cats; every other subject gets the object list, all 25 prompts of it (the reference code scored objects against
the live list for prompts 10-19).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from eval.images import list_images

PROMPTS_FILE = "prompts_and_classes.txt"
DEFAULT_TOKEN = "qwe"
LIVE_CLASSES = frozenset({"dog", "cat"})

T = TypeVar("T")

_HEADER = re.compile(r"^[A-Za-z][A-Za-z ]*:?$")
_TEMPLATE = re.compile(r"""^('(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")\s*\.format""")


@dataclass(frozen=True)
class PromptTable:
    """The contents of prompts_and_classes.txt: subject -> class, and the two prompt templates lists."""

    classes: dict[str, str]
    object_templates: tuple[str, ...]
    live_templates: tuple[str, ...]


@dataclass(frozen=True)
class Subject:
    """One benchmark subject with its reference photos and its prompts, already formatted with token and class."""

    name: str
    class_name: str
    is_live: bool
    image_paths: tuple[Path, ...]
    prompts: tuple[str, ...]


def parse_prompts_and_classes(path: str | Path) -> PromptTable:
    """Parse the dataset's prompts_and_classes.txt, tolerating blank lines, CRLF and either quote style."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"DreamBooth prompt file not found: {path}")
    classes: dict[str, str] = {}
    templates: dict[str, list[str]] = {"object": [], "live": []}
    section = None
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if _HEADER.match(line):
            words = line.lower()
            section = ("live" if "live" in words else "object" if "object" in words
                       else "classes" if "class" in words else None)
        elif section == "classes" and "," in line:
            name, class_name = (part.strip() for part in line.split(",", 1))
            if name != "subject_name":
                classes[name] = class_name
        elif section in templates and (match := _TEMPLATE.match(line)):
            template = ast.literal_eval(match.group(1))
            if "{0}" not in template or "{1}" not in template:
                raise ValueError(f"{path}: prompt template without {{0}} (token) and {{1}} (class): {template!r}")
            templates[section].append(template)
    for what, found in (("subject_name,class table", classes), ("Object Prompts list", templates["object"]),
                        ("Live Subject Prompts list", templates["live"])):
        if not found:
            raise ValueError(f"{path}: no {what} found; expected google/dreambooth's {PROMPTS_FILE} format")
    return PromptTable(classes, tuple(templates["object"]), tuple(templates["live"]))


def subject_prompts(table: PromptTable, class_name: str, token: str = DEFAULT_TOKEN) -> tuple[str, ...]:
    """The prompts of a subject of `class_name`: the live list for dogs and cats, the object list otherwise."""
    templates = table.live_templates if class_name in LIVE_CLASSES else table.object_templates
    return tuple(template.format(token, class_name) for template in templates)


def load_benchmark(dataset_dir: str | Path, token: str = DEFAULT_TOKEN,
                   subjects: Sequence[str] | None = None) -> list[Subject]:
    """Subjects of a DreamBooth-format folder, in the table's order.

    `subjects=None` loads every subject of the table whose folder is present, so a partial copy of the dataset
    works; naming a subject makes its absence (from the table or from disk) an error.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise FileNotFoundError(f"DreamBooth dataset folder not found: {dataset_dir}")
    table = parse_prompts_and_classes(dataset_dir / PROMPTS_FILE)
    if subjects is None:
        names = [name for name in table.classes if (dataset_dir / name).is_dir()]
        if not names:
            raise FileNotFoundError(f"none of the {len(table.classes)} subject folders of {PROMPTS_FILE} "
                                    f"is in {dataset_dir}")
    else:
        unknown = [name for name in subjects if name not in table.classes]
        if unknown:
            raise ValueError(f"unknown subject(s) {unknown}; {PROMPTS_FILE} lists {sorted(table.classes)}")
        names = list(subjects)
    return [Subject(name=name, class_name=table.classes[name], is_live=table.classes[name] in LIVE_CLASSES,
                    image_paths=tuple(list_images(dataset_dir / name)),
                    prompts=subject_prompts(table, table.classes[name], token))
            for name in names]


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items of process `rank` out of `world_size`: round robin, so every item goes to exactly one process and
    consecutive items (e.g. one subject's prompts) spread over all of them."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return list(items[rank::world_size])
