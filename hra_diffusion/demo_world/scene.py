"""The demo world's pictures: one object (ball, cube, cup, toy, house, dog) with a color, a pattern, a size, a place
and sometimes a hat, in one of eight scenes, with a caption in the DreamBooth prompts' style.

Everything is drawn with PIL at twice the output size and downsampled, so edges are smooth and Canny finds them.
`render` draws a `Scene`; `sample_scene` draws one at random from a seeded generator, so the world is the same on
every machine. The subjects (subjects.py) use the same drawing code with looks the world never samples.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image, ImageChops, ImageDraw

RGB = tuple[int, int, int]

COLORS: dict[str, RGB] = {
    "red": (215, 35, 35),
    "green": (40, 165, 55),
    "blue": (35, 75, 215),
    "yellow": (245, 210, 30),
    "white": (245, 245, 240),
    "black": (25, 25, 28),
    "orange": (245, 130, 25),
    "purple": (135, 50, 175),
}
CLASSES = ("ball", "cube", "cup", "toy", "house", "dog")
PATTERNS = ("plain", "striped", "dotted", "checkered")
SIZES = {"small": 0.34, "medium": 0.5, "large": 0.68}  # object height as a share of the picture
POSITIONS = {"left": 0.3, "center": 0.5, "right": 0.7}  # object center, share of the width
SCENES = {  # scene -> caption phrase
    "grass": "on the grass",
    "beach": "on the beach",
    "snow": "in the snow",
    "water": "on the water",
    "sky": "in the sky",
    "room": "in a room",
    "city": "in the city",
    "forest": "in the forest",
}
PATTERN_WORDS = {"striped": "stripes", "dotted": "dots", "checkered": "checks"}


@dataclass(frozen=True)
class Look:
    """How an object's surface is painted: a base color, a pattern and the pattern's color (RGB, jitter applied)."""

    color: RGB
    pattern: str = "plain"
    pattern_color: RGB = (245, 245, 240)


@dataclass(frozen=True)
class Scene:
    """One picture: what is drawn and where, plus the words a caption may use for it."""

    cls: str
    look: Look
    color_name: str | None
    pattern_color_name: str | None
    size: str = "medium"
    position: str = "center"
    scene: str = "grass"
    hat: str | None = None  # color name of a party hat on top
    seed: int = 0  # texture noise of the background


# ---------------------------------------------------------------- backgrounds


def _vertical(draw: ImageDraw.ImageDraw, box: tuple[int, int, int, int], top: RGB, bottom: RGB) -> None:
    x0, y0, x1, y1 = box
    for y in range(y0, y1):
        t = (y - y0) / max(1, y1 - y0 - 1)
        draw.line([(x0, y), (x1, y)], fill=tuple(round(a + (b - a) * t) for a, b in zip(top, bottom)))


def _background(scene: str, s: int, rng: random.Random) -> tuple[Image.Image, float]:
    """The scene at side `s`, and the height (share of s) where objects stand."""
    image = Image.new("RGB", (s, s))
    d = ImageDraw.Draw(image)
    horizon = rng.uniform(0.45, 0.6)
    h = round(horizon * s)
    sky = ((120, 180, 235), (200, 225, 245))
    if scene == "grass":
        _vertical(d, (0, 0, s, h), *sky)
        _vertical(d, (0, h, s, s), (95, 175, 70), (55, 130, 40))
        for _ in range(140):
            x, y = rng.uniform(0, s), rng.uniform(h, s)
            d.line([(x, y), (x + rng.uniform(-2, 2), y - rng.uniform(3, 7))], fill=(40, 110, 35), width=1)
        ground = rng.uniform(0.78, 0.86)
    elif scene == "beach":
        _vertical(d, (0, 0, s, h), *sky)
        sea = h + round(0.12 * s)
        _vertical(d, (0, h, s, sea), (40, 110, 190), (70, 150, 205))
        _vertical(d, (0, sea, s, s), (235, 215, 160), (215, 190, 130))
        for _ in range(80):
            x, y = rng.uniform(0, s), rng.uniform(sea, s)
            d.point((x, y), fill=(190, 165, 110))
        ground = rng.uniform(0.8, 0.88)
    elif scene == "snow":
        _vertical(d, (0, 0, s, h), (175, 190, 210), (215, 225, 235))
        _vertical(d, (0, h, s, s), (235, 240, 248), (210, 220, 238))
        for _ in range(60):
            x, y = rng.uniform(0, s), rng.uniform(0, s)
            d.ellipse((x - 1, y - 1, x + 1, y + 1), fill=(250, 250, 255))
        ground = rng.uniform(0.8, 0.88)
    elif scene == "water":
        _vertical(d, (0, 0, s, h), *sky)
        _vertical(d, (0, h, s, s), (30, 95, 170), (15, 60, 130))
        for _ in range(40):
            x, y = rng.uniform(0, s), rng.uniform(h + 4, s)
            w = rng.uniform(6, 16)
            d.arc((x, y, x + w, y + 5), 200, 340, fill=(120, 170, 225), width=1)
        ground = rng.uniform(0.74, 0.84)
    elif scene == "sky":
        _vertical(d, (0, 0, s, s), (70, 140, 230), (165, 205, 245))
        for _ in range(rng.randint(2, 4)):
            x, y, w = rng.uniform(0, s), rng.uniform(0.05 * s, 0.9 * s), rng.uniform(0.15, 0.3) * s
            for k in range(4):
                dx, r = w * k / 4, w * rng.uniform(0.12, 0.22)
                d.ellipse((x + dx - r, y - r, x + dx + r, y + r), fill=(250, 250, 252))
        ground = rng.uniform(0.62, 0.75)
    elif scene == "room":
        wall = rng.choice([(225, 210, 185), (200, 205, 215), (215, 195, 200)])
        _vertical(d, (0, 0, s, h), wall, tuple(c - 20 for c in wall))
        _vertical(d, (0, h, s, s), (150, 100, 60), (120, 75, 45))
        for k in range(1, 6):
            y = h + (s - h) * k / 6
            d.line([(0, y), (s, y)], fill=(105, 65, 38), width=1)
        wx = rng.uniform(0.1, 0.7) * s
        d.rectangle((wx, 0.12 * s, wx + 0.2 * s, 0.32 * s), fill=(170, 210, 240), outline=(250, 250, 250), width=2)
        ground = rng.uniform(0.8, 0.88)
    elif scene == "city":
        _vertical(d, (0, 0, s, h), (150, 175, 205), (195, 210, 225))
        x = 0.0
        while x < s:
            w, top = rng.uniform(0.1, 0.2) * s, rng.uniform(0.12, 0.4) * s
            gray = rng.randint(90, 150)
            d.rectangle((x, top, x + w, h), fill=(gray, gray, gray + 10))
            for wy in np.arange(top + 4, h - 4, 8):
                for wx in np.arange(x + 3, x + w - 4, 7):
                    d.rectangle((wx, wy, wx + 3, wy + 4), fill=(235, 225, 150))
            x += w + rng.uniform(0, 4)
        _vertical(d, (0, h, s, s), (95, 95, 100), (70, 70, 75))
        d.line([(0, (h + s) / 2), (s, (h + s) / 2)], fill=(230, 230, 230), width=2)
        ground = rng.uniform(0.82, 0.9)
    elif scene == "forest":
        _vertical(d, (0, 0, s, s), (60, 110, 60), (30, 70, 35))
        for _ in range(7):
            x, w = rng.uniform(0, s), rng.uniform(4, 10)
            d.rectangle((x, 0, x + w, s), fill=(85, 60, 35))
        for _ in range(30):
            x, y, r = rng.uniform(0, s), rng.uniform(0, 0.5 * s), rng.uniform(6, 14)
            d.ellipse((x - r, y - r, x + r, y + r), fill=(35, rng.randint(100, 140), 40))
        _vertical(d, (0, h + 10, s, s), (70, 95, 45), (50, 70, 30))
        ground = rng.uniform(0.82, 0.9)
    else:
        raise ValueError(f"unknown scene {scene!r}; choose one of {sorted(SCENES)}")
    return image, ground


# ---------------------------------------------------------------- surfaces


def paint(look: Look, s: int, scale: float) -> Image.Image:
    """The look as a full s x s texture; the object's mask cuts it out. `scale` is the object's size in pixels."""
    texture = Image.new("RGB", (s, s), look.color)
    d = ImageDraw.Draw(texture)
    step = max(4, round(scale / 4.5))
    c = look.pattern_color
    if look.pattern == "striped":
        for y in range(0, s, 2 * step):
            d.rectangle((0, y, s, y + step - 1), fill=c)
    elif look.pattern == "dotted":
        r = step * 0.45
        for row, y in enumerate(range(0, s + step, step * 2)):
            for x in range((row % 2) * step, s + step, step * 2):
                d.ellipse((x - r, y - r, x + r, y + r), fill=c)
    elif look.pattern == "checkered":
        for y in range(0, s, step):
            for x in range(0, s, step):
                if (x // step + y // step) % 2:
                    d.rectangle((x, y, x + step - 1, y + step - 1), fill=c)
    elif look.pattern in EXTRA_PATTERNS:
        EXTRA_PATTERNS[look.pattern](d, s, step, c)
    elif look.pattern != "plain":
        raise ValueError(f"unknown pattern {look.pattern!r}")
    return texture


def _zigzag(d: ImageDraw.ImageDraw, s: int, step: int, c: RGB) -> None:
    for y0 in range(0, s + step, 3 * step):
        points = [(x, y0 + (step if (x // step) % 2 else 0)) for x in range(0, s + step, step)]
        d.line(points, fill=c, width=max(2, step // 2))


def _halves(d: ImageDraw.ImageDraw, s: int, step: int, c: RGB) -> None:
    d.polygon([(0, 0), (s, 0), (0, s)], fill=c)


def _rings(d: ImageDraw.ImageDraw, s: int, step: int, c: RGB) -> None:
    for r in range(step, s, 2 * step):
        d.ellipse((s / 2 - r, s / 2 - r, s / 2 + r, s / 2 + r), outline=c, width=max(2, step // 2))


def _stars(d: ImageDraw.ImageDraw, s: int, step: int, c: RGB) -> None:
    r = step * 1.2
    for y in range(step, s, 3 * step):
        for x in range(step, s, 3 * step):
            points = [(x + (r if k % 2 == 0 else r / 2.3) * math.cos(math.pi * k / 5 - math.pi / 2),
                       y + (r if k % 2 == 0 else r / 2.3) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)]
            d.polygon(points, fill=c)


# Patterns only the subjects wear: the base model never sees them, so only fine-tuning can teach them.
EXTRA_PATTERNS: dict[str, Callable[[ImageDraw.ImageDraw, int, int, RGB], None]] = {
    "zigzag": _zigzag,
    "halves": _halves,
    "rings": _rings,
    "stars": _stars,
}


# ---------------------------------------------------------------- objects: masks (white = object) at side s


def _shape_mask(cls: str, s: int, cx: float, base: float, h: float) -> tuple[Image.Image, float]:
    """The object's silhouette standing on `base` (y), centered at cx, height h; returns (mask, top y)."""
    mask = Image.new("L", (s, s), 0)
    d = ImageDraw.Draw(mask)
    if cls == "ball":
        d.ellipse((cx - h / 2, base - h, cx + h / 2, base), fill=255)
        top = base - h
    elif cls == "cube":
        w = h * 0.8
        depth = h * 0.2
        d.rectangle((cx - w / 2, base - w, cx + w / 2, base), fill=255)
        d.polygon([(cx - w / 2, base - w), (cx - w / 2 + depth, base - w - depth),
                   (cx + w / 2 + depth, base - w - depth), (cx + w / 2 + depth, base - depth), (cx + w / 2, base)],
                  fill=255)
        top = base - w - depth
    elif cls == "cup":
        w = h * 0.75
        d.polygon([(cx - w / 2, base - h), (cx + w / 2, base - h), (cx + w * 0.38, base), (cx - w * 0.38, base)],
                  fill=255)
        hw = h * 0.28
        d.ellipse((cx + w * 0.32, base - h * 0.8, cx + w * 0.32 + hw * 1.3, base - h * 0.25), outline=255,
                  width=max(2, round(h * 0.09)))
        top = base - h
    elif cls == "toy":  # a teddy bear: body, head, ears, arms, feet
        r_head, r_body = h * 0.22, h * 0.3
        body_c = base - r_body
        head_c = body_c - r_body - r_head * 0.7
        d.ellipse((cx - r_body, body_c - r_body, cx + r_body, body_c + r_body), fill=255)
        d.ellipse((cx - r_head, head_c - r_head, cx + r_head, head_c + r_head), fill=255)
        for side in (-1, 1):
            ex, ey, er = cx + side * r_head * 0.8, head_c - r_head * 0.8, r_head * 0.42
            d.ellipse((ex - er, ey - er, ex + er, ey + er), fill=255)
            ax, ay, ar = cx + side * r_body * 0.95, body_c - r_body * 0.3, r_body * 0.38
            d.ellipse((ax - ar, ay - ar, ax + ar, ay + ar), fill=255)
        top = head_c - r_head * 1.2
    elif cls == "house":
        w = h * 0.85
        wall = h * 0.55
        d.rectangle((cx - w / 2, base - wall, cx + w / 2, base), fill=255)
        d.polygon([(cx - w * 0.6, base - wall), (cx, base - h), (cx + w * 0.6, base - wall)], fill=255)
        top = base - h
    elif cls == "dog":  # side view: body, head, snout, ear, legs, tail
        w = h * 1.2
        body_h = h * 0.38
        by = base - h * 0.28
        d.ellipse((cx - w * 0.4, by - body_h, cx + w * 0.3, by), fill=255)
        hx, hy, hr = cx + w * 0.33, by - body_h - h * 0.12, h * 0.2
        d.ellipse((hx - hr, hy - hr, hx + hr, hy + hr), fill=255)
        d.ellipse((hx + hr * 0.4, hy - hr * 0.2, hx + hr * 1.6, hy + hr * 0.6), fill=255)
        leg = max(2, h * 0.09)
        for lx in (cx - w * 0.3, cx - w * 0.15, cx + w * 0.1, cx + w * 0.22):
            d.rectangle((lx, by - body_h * 0.4, lx + leg, base), fill=255)
        d.line([(cx - w * 0.38, by - body_h * 0.7), (cx - w * 0.55, by - body_h * 1.5)], fill=255,
               width=max(2, round(h * 0.06)))
        top = hy - hr
    else:
        raise ValueError(f"unknown object class {cls!r}; choose one of {list(CLASSES)}")
    return mask, top


def _details(draw: ImageDraw.ImageDraw, cls: str, cx: float, base: float, h: float, dark: RGB) -> None:
    """Fixed features drawn over the surface: eyes, doors, windows, a cube's edges."""
    if cls == "toy":
        r_head, r_body = h * 0.22, h * 0.3
        head_c = base - r_body - r_body - r_head * 0.7
        for side in (-1, 1):
            ex, ey = cx + side * r_head * 0.4, head_c - r_head * 0.15
            draw.ellipse((ex - 1.6, ey - 1.6, ex + 1.6, ey + 1.6), fill=dark)
        draw.ellipse((cx - 2, head_c + r_head * 0.25, cx + 2, head_c + r_head * 0.25 + 3), fill=dark)
    elif cls == "house":
        w, wall = h * 0.85, h * 0.55
        draw.rectangle((cx - w * 0.1, base - wall * 0.5, cx + w * 0.1, base), fill=dark)
        draw.rectangle((cx + w * 0.2, base - wall * 0.8, cx + w * 0.38, base - wall * 0.55), fill=(170, 210, 240))
    elif cls == "dog":
        w, body_h = h * 1.2, h * 0.38
        hx, hy, hr = cx + w * 0.33, base - h * 0.28 - body_h - h * 0.12, h * 0.2
        draw.ellipse((hx + 0.5, hy - hr * 0.45, hx + 3.5, hy - hr * 0.45 + 3), fill=dark)
        draw.ellipse((hx - hr * 0.6, hy - hr * 0.9, hx + hr * 0.1, hy + hr * 0.4), fill=dark)
    elif cls == "cube":
        w, depth = h * 0.8, h * 0.2
        draw.line([(cx - w / 2, base - w), (cx + w / 2, base - w), (cx + w / 2, base)], fill=dark, width=1)
        draw.line([(cx + w / 2, base - w), (cx + w / 2 + depth, base - w - depth)], fill=dark, width=1)


def _shade(image: Image.Image, mask: Image.Image, cls: str) -> Image.Image:
    """Soft light from the upper left on round things, a darker side face on cubes: depth cues for the model."""
    s = image.size[0]
    if cls not in ("ball", "cube"):
        return image
    arr = np.asarray(image, dtype=np.float32)
    m = np.asarray(mask, dtype=np.float32) / 255
    ys, xs = np.nonzero(m > 0.5)
    if len(xs) == 0:
        return image
    cx, cy, r = xs.mean(), ys.mean(), max(np.ptp(xs), np.ptp(ys)) / 2 + 1
    yy, xx = np.mgrid[0:s, 0:s]
    if cls == "ball":
        dist = np.hypot(xx - (cx - 0.35 * r), yy - (cy - 0.35 * r)) / (1.6 * r)
        light = 1.15 - 0.55 * np.clip(dist, 0, 1)
    else:
        light = np.where(xx > cx + 0.25 * r, 0.72, np.where(yy < cy - 0.45 * r, 1.12, 1.0))
    arr = np.where(m[..., None] > 0, np.clip(arr * light[..., None], 0, 255), arr)
    return Image.fromarray(arr.astype(np.uint8))


def render(scene: Scene, size: int = 64) -> Image.Image:
    """The scene as an RGB picture of `size` x `size` pixels (drawn at twice the size, then downsampled)."""
    s = 2 * size
    rng = random.Random(scene.seed)
    image, ground = _background(scene.scene, s, rng)
    h = SIZES[scene.size] * s
    cx = POSITIONS[scene.position] * s + rng.uniform(-0.04, 0.04) * s
    base = min(ground * s + rng.uniform(-0.03, 0.03) * s, s - 2)
    if scene.cls == "dog":
        h *= 0.8
    if scene.hat:  # keep the hat inside the picture
        base = max(base, h * 1.45)
    mask, top = _shape_mask(scene.cls, s, cx, base, h)
    # The pattern is centered on the object, so a subject looks the same wherever it stands.
    texture = ImageChops.offset(paint(scene.look, s, h), round(cx - s / 2), round((top + base) / 2 - s / 2))
    surface = _shade(texture, mask, scene.cls)
    image.paste(surface, (0, 0), mask)
    draw = ImageDraw.Draw(image)
    dark = (20, 20, 20) if sum(scene.look.color) > 150 else (235, 235, 235)
    _details(draw, scene.cls, cx, base, h, dark)
    if scene.hat:
        hat = _jitter(COLORS[scene.hat], rng, 0)
        hw, hh = h * 0.22, h * 0.32
        hx = cx + (h * 0.33 * 1.2 * 0.8 if scene.cls == "dog" else 0)  # on the dog's head
        draw.polygon([(hx - hw, top + 2), (hx, top - hh), (hx + hw, top + 2)], fill=hat)
        draw.ellipse((hx - 3, top - hh - 3, hx + 3, top - hh + 3), fill=(250, 250, 250))
    return image.resize((size, size), Image.Resampling.LANCZOS)


# ---------------------------------------------------------------- sampling and captions


def _jitter(color: RGB, rng: random.Random, amount: int = 18) -> RGB:
    return tuple(int(min(255, max(0, c + rng.randint(-amount, amount)))) for c in color)


def sample_scene(rng: random.Random) -> Scene:
    """A random world scene: every class, color, pattern, size, place and scene equally likely."""
    color, pattern_color = rng.sample(sorted(COLORS), 2)
    pattern = rng.choice(PATTERNS)
    look = Look(_jitter(COLORS[color], rng), pattern, _jitter(COLORS[pattern_color], rng))
    return Scene(
        cls=rng.choice(CLASSES),
        look=look,
        color_name=color,
        pattern_color_name=pattern_color if pattern != "plain" else None,
        size=rng.choice(list(SIZES)),
        position=rng.choice(list(POSITIONS)),
        scene=rng.choice(list(SCENES)),
        hat=rng.choice(sorted(COLORS)) if rng.random() < 0.15 else None,
        seed=rng.getrandbits(32),
    )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, rng: random.Random | None = None) -> str:
    """A DreamBooth-style caption. With `rng`, some details are left out at random (as people's captions do), so the
    model also learns short prompts; without it, the full caption."""
    keep = (lambda p: rng.random() < p) if rng is not None else (lambda p: True)
    words = []
    if scene.size != "medium" and keep(0.6):
        words.append(scene.size)
    if scene.color_name and keep(0.9):
        words.append(scene.color_name)
    words.append(scene.cls)
    if scene.look.pattern in PATTERN_WORDS and scene.pattern_color_name and keep(0.85):
        words.append(f"with {scene.pattern_color_name} {PATTERN_WORDS[scene.look.pattern]}")
    if scene.hat and keep(0.9):
        words.append(f"wearing {_article(scene.hat)} {scene.hat} hat")
    if keep(0.85):
        words.append(SCENES[scene.scene])
    if scene.position != "center" and keep(0.6):
        words.append(f"on the {scene.position}")
    prefix = rng.choice(["a photo of ", "", "a picture of "]) if rng is not None else "a photo of "
    return f"{prefix}{_article(words[0])} {' '.join(words)}"


def world_sample(index: int, seed: int = 0, size: int = 64) -> tuple[Image.Image, str, Scene]:
    """Picture number `index` of the world with `seed`: the same on every machine, independent of the others."""
    rng = random.Random(f"{seed}:{index}")
    scene = sample_scene(rng)
    return render(scene, size), caption(scene, rng), scene


def with_look(scene: Scene, **changes) -> Scene:
    return replace(scene, **changes)
