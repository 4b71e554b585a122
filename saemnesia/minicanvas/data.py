"""MiniCanvas images: objects x styles drawn procedurally at 32 x 32, deterministic from a seed.

Every image is drawn at 4x resolution with PIL and box-downsampled, so edges are anti-aliased.
Nothing is stored: the same (object, style, seed) always gives the same picture.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

IMAGE_SIZE = 32
_SCALE = 4
_CANVAS = IMAGE_SIZE * _SCALE

OBJECTS = ("circle", "square", "triangle", "star", "heart", "cross", "moon", "house", "tree", "arrow")
STYLES = ("sunset", "ocean", "neon", "checker", "zebra", "polka", "pastel", "sketch", "forest", "mosaic")

TEMPLATES = ("a {object} in {style} style", "{style} picture of a {object}", "a {style} {object}")
PLAIN_TEMPLATE = "a {object}"


def prompt_for(object_name: str, style: str, template: str = TEMPLATES[0]) -> str:
    """The caption of an (object, style) pair under one of the templates."""
    return template.format(object=object_name, style=style)


def _star(points: int = 5, outer: float = 0.95, inner: float = 0.4) -> list[tuple[float, float]]:
    corners = []
    for i in range(points * 2):
        radius = outer if i % 2 == 0 else inner
        angle = math.pi * i / points - math.pi / 2
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return corners


def _heart() -> list[tuple[float, float]]:
    corners = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        corners.append((x / 17, -y / 17 - 0.05))
    return corners


# Each object is a list of (polygon or "ellipse", fill value) parts in unit coordinates [-1, 1];
# fill 0 cuts a hole (the house's door, the moon's bite).
_SHAPES: dict[str, list[tuple[object, int]]] = {
    "circle": [("ellipse", 255)],
    "square": [([(-0.8, -0.8), (0.8, -0.8), (0.8, 0.8), (-0.8, 0.8)], 255)],
    "triangle": [([(0.0, -0.9), (0.95, 0.8), (-0.95, 0.8)], 255)],
    "star": [(_star(), 255)],
    "heart": [(_heart(), 255)],
    "cross": [
        ([(-0.3, -0.9), (0.3, -0.9), (0.3, 0.9), (-0.3, 0.9)], 255),
        ([(-0.9, -0.3), (0.9, -0.3), (0.9, 0.3), (-0.9, 0.3)], 255),
    ],
    "moon": [("ellipse", 255), (("ellipse_offset", 0.45, -0.25, 0.8), 0)],
    "house": [
        ([(-0.75, 0.9), (-0.75, -0.05), (0.0, -0.9), (0.75, -0.05), (0.75, 0.9)], 255),
        ([(-0.18, 0.9), (0.18, 0.9), (0.18, 0.35), (-0.18, 0.35)], 0),
    ],
    "tree": [
        ([(0.0, -0.95), (0.55, -0.2), (-0.55, -0.2)], 255),
        ([(0.0, -0.5), (0.8, 0.45), (-0.8, 0.45)], 255),
        ([(-0.17, 0.95), (0.17, 0.95), (0.17, 0.4), (-0.17, 0.4)], 255),
    ],
    "arrow": [
        ([(-0.9, -0.22), (0.15, -0.22), (0.15, -0.6), (0.92, 0.0), (0.15, 0.6), (0.15, 0.22), (-0.9, 0.22)], 255)
    ],
}


def object_mask(object_name: str, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
    """The object's fill and outline as float masks in [0, 1], jittered in place, size and angle."""
    size = rng.uniform(0.62, 0.82) * _CANVAS / 2
    centre_x = _CANVAS / 2 + rng.uniform(-0.08, 0.08) * _CANVAS
    centre_y = _CANVAS / 2 + rng.uniform(-0.08, 0.08) * _CANVAS
    angle = math.radians(rng.uniform(-12, 12))
    cos_a, sin_a = math.cos(angle), math.sin(angle)

    def place(x: float, y: float) -> tuple[float, float]:
        return (centre_x + size * (x * cos_a - y * sin_a), centre_y + size * (x * sin_a + y * cos_a))

    mask = Image.new("L", (_CANVAS, _CANVAS), 0)
    draw = ImageDraw.Draw(mask)
    for part, fill in _SHAPES[object_name]:
        if part == "ellipse":
            draw.ellipse([place(-0.85, -0.85)[0], place(0, -0.85)[1], place(0.85, 0)[0], place(0, 0.85)[1]], fill=fill)
        elif isinstance(part, tuple) and part[0] == "ellipse_offset":
            _, dx, dy, radius = part
            cx, cy = place(dx, dy)
            draw.ellipse([cx - radius * size, cy - radius * size, cx + radius * size, cy + radius * size], fill=fill)
        else:
            draw.polygon([place(x, y) for x, y in part], fill=fill)
    eroded = mask.filter(ImageFilter.MinFilter(9))
    outline = Image.fromarray(
        np.asarray(mask, np.int16).__sub__(np.asarray(eroded, np.int16)).clip(0, 255).astype(np.uint8)
    )
    small = (IMAGE_SIZE, IMAGE_SIZE)
    fill_mask = np.asarray(mask.resize(small, Image.BOX), np.float32) / 255
    outline_mask = np.asarray(outline.resize(small, Image.BOX), np.float32) / 255
    return fill_mask, outline_mask


def _grid() -> tuple[np.ndarray, np.ndarray]:
    return np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE].astype(np.float32)


def _solid(color: tuple[float, float, float]) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.float32) / 255, (IMAGE_SIZE, IMAGE_SIZE, 3)).copy()


def _jitter(color: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[float, float, float]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in color)


def _mix(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return background * (1 - mask[..., None]) + foreground * mask[..., None]


def _sunset(fill, outline, rng):
    y, _ = _grid()
    top, bottom = np.array(_jitter((255, 150, 40), rng), np.float32), np.array(_jitter((120, 40, 140), rng), np.float32)
    t = (y / (IMAGE_SIZE - 1))[..., None]
    background = (top * (1 - t) + bottom * t) / 255
    return _mix(background, _solid(_jitter((25, 15, 35), rng, 10)), fill)


def _ocean(fill, outline, rng):
    y, x = _grid()
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(5, 7)
    waves = (np.sin(2 * math.pi * (y + 1.5 * np.sin(x / 3 + phase)) / period) > 0.75).astype(np.float32)
    background = _mix(_solid(_jitter((20, 60, 160), rng)), _solid((110, 170, 240)), waves)
    return _mix(background, _solid((250, 250, 250)), fill)


def _neon(fill, outline, rng):
    color = rng.choice([(255, 40, 220), (40, 240, 255)])
    return _mix(_solid(_jitter((10, 10, 20), rng, 8)), _solid(color), np.clip(outline * 1.6, 0, 1))


def _checker(fill, outline, rng):
    y, x = _grid()
    offset = rng.randint(0, 3)
    cells = (((y + offset) // 4 + (x + offset) // 4) % 2).astype(np.float32)
    background = _mix(_solid((235, 235, 235)), _solid((150, 150, 150)), cells)
    return _mix(background, _solid(_jitter((220, 30, 30), rng)), fill)


def _zebra(fill, outline, rng):
    y, x = _grid()
    offset = rng.uniform(0, 4)
    stripes = (((x + y + offset) % 4) < 2).astype(np.float32)
    foreground = _mix(_solid((245, 245, 245)), _solid((10, 10, 10)), stripes)
    background = _solid(_jitter((200, 235, 200), rng, 10))
    return _mix(_mix(background, _solid((10, 10, 10)), np.clip(outline, 0, 1)), foreground, fill)


def _polka(fill, outline, rng):
    y, x = _grid()
    ox, oy = rng.uniform(0, 6), rng.uniform(0, 6)
    dots = ((((x + ox) % 6) - 3) ** 2 + (((y + oy) % 6) - 3) ** 2 < 2.5).astype(np.float32)
    background = _mix(_solid(_jitter((250, 220, 60), rng)), _solid((240, 120, 30)), dots)
    return _mix(background, _solid(_jitter((30, 60, 200), rng)), fill)


def _pastel(fill, outline, rng):
    background = _solid(_jitter((250, 205, 220), rng, 10))
    return _mix(background, _solid(_jitter((160, 230, 200), rng, 10)), fill)


def _sketch(fill, outline, rng):
    background = _solid(_jitter((250, 248, 240), rng, 5))
    return _mix(background, _solid((20, 20, 20)), np.clip(outline * 0.9, 0, 1))


def _forest(fill, outline, rng):
    noise = np.random.default_rng(rng.randint(0, 2**31)).uniform(-0.12, 0.12, (IMAGE_SIZE, IMAGE_SIZE, 1))
    background = np.clip(_solid(_jitter((30, 110, 40), rng)) + noise.astype(np.float32), 0, 1)
    return _mix(background, _solid(_jitter((150, 90, 40), rng)), fill)


def _mosaic(fill, outline, rng):
    tiles = np.random.default_rng(rng.randint(0, 2**31)).uniform(0.15, 0.85, (IMAGE_SIZE // 4, IMAGE_SIZE // 4, 3))
    background = np.repeat(np.repeat(tiles, 4, axis=0), 4, axis=1).astype(np.float32)
    return _mix(background, _solid((255, 255, 255)), fill)


_STYLE_PAINTERS: dict[str, Callable] = {
    "sunset": _sunset,
    "ocean": _ocean,
    "neon": _neon,
    "checker": _checker,
    "zebra": _zebra,
    "polka": _polka,
    "pastel": _pastel,
    "sketch": _sketch,
    "forest": _forest,
    "mosaic": _mosaic,
}


def draw(object_name: str | None, style: str, seed: int) -> np.ndarray:
    """One image as a float32 array [32, 32, 3] in [0, 1]; the same arguments give the same image.

    `object_name=None` paints the style's bare background: what a canvas with its object gone looks like.
    """
    rng = random.Random(f"{object_name}/{style}/{seed}")
    if object_name is None:
        fill = outline = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.float32)
    else:
        fill, outline = object_mask(object_name, rng)
    return np.clip(_STYLE_PAINTERS[style](fill, outline, rng), 0, 1).astype(np.float32)


def draw_pil(object_name: str | None, style: str, seed: int) -> Image.Image:
    return Image.fromarray((draw(object_name, style, seed) * 255).round().astype(np.uint8))


def sample_batch(batch_size: int, seed: int, empty_prompt_share: float = 0.1, plain_prompt_share: float = 0.1):
    """A training batch: images [B, 3, 32, 32] in [-1, 1], captions, object and style indices.

    Captions cycle through the templates; a share of them is the bare object ("a star", any style)
    and a share is empty, which teaches the unconditional branch that classifier-free guidance needs.
    """
    rng = random.Random(seed)
    images, captions, object_ids, style_ids = [], [], [], []
    for _ in range(batch_size):
        object_id, style_id = rng.randrange(len(OBJECTS)), rng.randrange(len(STYLES))
        roll = rng.random()
        if roll < empty_prompt_share:
            caption = ""
        elif roll < empty_prompt_share + plain_prompt_share:
            caption = PLAIN_TEMPLATE.format(object=OBJECTS[object_id])
        else:
            caption = prompt_for(OBJECTS[object_id], STYLES[style_id], rng.choice(TEMPLATES))
        images.append(draw(OBJECTS[object_id], STYLES[style_id], rng.randrange(2**31)))
        captions.append(caption)
        object_ids.append(object_id)
        style_ids.append(style_id)
    pixels = np.stack(images).transpose(0, 3, 1, 2) * 2 - 1
    return pixels, captions, np.array(object_ids), np.array(style_ids)


def caption_corpus() -> list[str]:
    """Every caption the world uses, to build the tokenizer's vocabulary from."""
    captions = [PLAIN_TEMPLATE.format(object=o) for o in OBJECTS]
    captions += [prompt_for(o, s, t) for o in OBJECTS for s in STYLES for t in TEMPLATES]
    return captions
