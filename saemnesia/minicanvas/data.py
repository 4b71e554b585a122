"""MiniCanvas images: objects x styles drawn procedurally, deterministic from a seed.

A `Canvas` is one such world of drawings: its size, objects, styles and caption templates. `CANVAS`
(64 x 64, 20 objects) is MiniCanvas's; `CANVAS_32` (32 x 32, the first ten objects) is the first world's,
kept for tests, which draw it at a quarter of the cost. Every image is drawn at 4x resolution with PIL and
box-downsampled, so edges are anti-aliased. Nothing is stored: the same (object, style, seed) always gives
the same picture.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

_SUPERSAMPLING = 4

OBJECTS = (
    "circle", "square", "triangle", "star", "heart", "cross", "moon", "house", "tree", "arrow",
    "fish", "flower", "bird", "butterfly", "tower", "flame", "jellyfish", "rabbit", "cat", "human",
)  # fmt: skip
"""Every object the drawing code knows: the first ten geometric icons, then ten named after UnlearnCanvas's
object classes where a silhouette can carry them (fish, flowers, birds, butterfly, towers, flame, jellyfish,
rabbits, cats, human)."""
STYLES = ("sunset", "ocean", "neon", "checker", "zebra", "polka", "pastel", "sketch", "forest", "mosaic")

TEMPLATES = (
    "a {object} in {style} style",
    "{style} picture of a {object}",
    "a {style} {object}",
    "a drawing of a {object}, {style}",
    "{object} in the {style} style",
)
"""The captions the model is trained on."""
HELD_OUT_TEMPLATES = ("a {object} image in {style} style.", "a painting of a {object} with {style} style")
"""Captions the model never sees in training (the first is UnlearnCanvas's): their words are in the tokenizer,
so an evaluation can ask whether an erasure holds on prompts written otherwise."""
PLAIN_TEMPLATE = "a {object}"


def prompt_for(object_name: str, style: str, template: str = TEMPLATES[0]) -> str:
    """The caption of an (object, style) pair under one of the templates."""
    return template.format(object=object_name, style=style)


# ---- shapes, in unit coordinates [-1, 1] (y down) --------------------------------------------------------------

Polygon = list[tuple[float, float]]


def _ellipse(cx: float, cy: float, rx: float, ry: float, start: float = 0.0, end: float = 2 * math.pi) -> Polygon:
    """An ellipse (or an arc of it, closed by its chord) as a polygon, so that it rotates with the object."""
    count = 48
    return [
        (cx + rx * math.cos(start + (end - start) * i / count), cy + ry * math.sin(start + (end - start) * i / count))
        for i in range(count + (end - start < 2 * math.pi))
    ]


def _rect(x0: float, y0: float, x1: float, y1: float) -> Polygon:
    return [(x0, y0), (x1, y0), (x1, y1), (x0, y1)]


def _star(points: int = 5, outer: float = 0.95, inner: float = 0.4) -> Polygon:
    corners = []
    for i in range(points * 2):
        radius = outer if i % 2 == 0 else inner
        angle = math.pi * i / points - math.pi / 2
        corners.append((radius * math.cos(angle), radius * math.sin(angle)))
    return corners


def _heart() -> Polygon:
    corners = []
    for i in range(48):
        t = 2 * math.pi * i / 48
        x = 16 * math.sin(t) ** 3
        y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
        corners.append((x / 17, -y / 17 - 0.05))
    return corners


def _flame() -> Polygon:
    """A teardrop whose sides ripple, tip up."""
    corners = []
    for i in range(64):
        t = 2 * math.pi * i / 64
        height = 1 - math.sin(t)  # 0 at the bottom, 2 at the tip
        width = 0.62 * math.cos(t) * (1 - 0.42 * height) * (1 + 0.12 * math.sin(5 * t))
        corners.append((width, 0.55 - 0.72 * height + 0.1 * math.sin(t)))
    return corners


def _bird() -> Polygon:
    """A gull in flight: two swept wings meeting at a small body."""
    return [(-0.95, -0.15), (-0.55, -0.6), (-0.15, -0.3), (0.0, -0.05), (0.15, -0.3), (0.55, -0.6), (0.95, -0.15),
            (0.55, -0.32), (0.2, 0.0), (0.08, 0.35), (-0.08, 0.35), (-0.2, 0.0), (-0.55, -0.32)]  # fmt: skip


# Each object is a list of (polygon, fill) parts; fill 0 cuts a hole (the house's door, the moon's bite).
_SHAPES: dict[str, list[tuple[Polygon, int]]] = {
    "circle": [(_ellipse(0, 0, 0.85, 0.85), 255)],
    "square": [(_rect(-0.8, -0.8, 0.8, 0.8), 255)],
    "triangle": [([(0.0, -0.9), (0.95, 0.8), (-0.95, 0.8)], 255)],
    "star": [(_star(), 255)],
    "heart": [(_heart(), 255)],
    "cross": [(_rect(-0.3, -0.9, 0.3, 0.9), 255), (_rect(-0.9, -0.3, 0.9, 0.3), 255)],
    "moon": [(_ellipse(0, 0, 0.85, 0.85), 255), (_ellipse(0.45, -0.25, 0.8, 0.8), 0)],
    "house": [
        ([(-0.75, 0.9), (-0.75, -0.05), (0.0, -0.9), (0.75, -0.05), (0.75, 0.9)], 255),
        (_rect(-0.18, 0.35, 0.18, 0.9), 0),
    ],
    "tree": [
        ([(0.0, -0.95), (0.55, -0.2), (-0.55, -0.2)], 255),
        ([(0.0, -0.5), (0.8, 0.45), (-0.8, 0.45)], 255),
        (_rect(-0.17, 0.4, 0.17, 0.95), 255),
    ],
    "arrow": [
        ([(-0.9, -0.22), (0.15, -0.22), (0.15, -0.6), (0.92, 0.0), (0.15, 0.6), (0.15, 0.22), (-0.9, 0.22)], 255)
    ],
    "fish": [
        (_ellipse(-0.2, 0.0, 0.62, 0.4), 255),
        ([(0.3, 0.0), (0.95, -0.48), (0.8, 0.0), (0.95, 0.48)], 255),
        (_ellipse(-0.5, -0.08, 0.09, 0.09), 0),
    ],
    "flower": [
        *[(_ellipse(0.55 * math.cos(a), 0.55 * math.sin(a), 0.32, 0.32), 255) for a in np.arange(6) * math.pi / 3],
        (_ellipse(0, 0, 0.2, 0.2), 0),
    ],
    "bird": [(_bird(), 255)],
    "butterfly": [
        (_ellipse(-0.45, -0.32, 0.45, 0.4), 255),
        (_ellipse(0.45, -0.32, 0.45, 0.4), 255),
        (_ellipse(-0.32, 0.42, 0.3, 0.3), 255),
        (_ellipse(0.32, 0.42, 0.3, 0.3), 255),
        (_rect(-0.07, -0.6, 0.07, 0.75), 255),
    ],
    "tower": [
        (_rect(-0.32, -0.55, 0.32, 0.95), 255),
        *[(_rect(x, -0.85, x + 0.18, -0.55), 255) for x in (-0.32, -0.09, 0.14)],
        (_rect(-0.1, -0.3, 0.1, 0.0), 0),
    ],
    "flame": [(_flame(), 255)],
    "jellyfish": [
        (_ellipse(0, 0.05, 0.78, 0.75, math.pi, 2 * math.pi), 255),
        *[(_rect(x - 0.06, 0.0, x + 0.06, 0.95 - 0.15 * abs(x)), 255) for x in (-0.5, -0.17, 0.17, 0.5)],
    ],
    "rabbit": [
        (_ellipse(0, 0.4, 0.5, 0.48), 255),
        (_ellipse(-0.22, -0.4, 0.14, 0.5), 255),
        (_ellipse(0.22, -0.4, 0.14, 0.5), 255),
    ],
    "cat": [
        (_ellipse(0, 0.2, 0.7, 0.6), 255),
        ([(-0.68, 0.0), (-0.62, -0.9), (-0.12, -0.35)], 255),
        ([(0.68, 0.0), (0.62, -0.9), (0.12, -0.35)], 255),
        (_ellipse(-0.28, 0.1, 0.1, 0.1), 0),
        (_ellipse(0.28, 0.1, 0.1, 0.1), 0),
    ],
    "human": [
        (_ellipse(0, -0.7, 0.22, 0.22), 255),
        ([(-0.3, -0.42), (0.3, -0.42), (0.24, 0.3), (-0.24, 0.3)], 255),
        (_rect(-0.75, -0.42, 0.75, -0.26), 255),
        (_rect(-0.24, 0.25, -0.06, 0.95), 255),
        (_rect(0.06, 0.25, 0.24, 0.95), 255),
    ],
}


def _erode(mask: np.ndarray, radius: int) -> np.ndarray:
    """A square minimum filter of side 2 * radius + 1, one axis at a time (PIL's MinFilter, faster)."""
    for axis in (0, 1):
        padded = np.pad(mask, [(radius, radius) if a == axis else (0, 0) for a in (0, 1)], mode="edge")
        mask = np.lib.stride_tricks.sliding_window_view(padded, 2 * radius + 1, axis=axis).min(axis=-1)
    return mask


# ---- styles ----------------------------------------------------------------------------------------------------

Painter = Callable[[np.ndarray, np.ndarray, random.Random], np.ndarray]


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel coordinates in units of a 32-pixel canvas, so that every style's pattern keeps its look at any size."""
    return np.mgrid[0:size, 0:size].astype(np.float32) * (32 / size)


def _solid(color: Sequence[float], size: int) -> np.ndarray:
    return np.broadcast_to(np.array(color, np.float32) / 255, (size, size, 3)).copy()


def _jitter(color: tuple[int, int, int], rng: random.Random, amount: int = 18) -> tuple[float, float, float]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in color)


def _mix(background: np.ndarray, foreground: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return background * (1 - mask[..., None]) + foreground * mask[..., None]


def _sunset(fill, outline, rng):
    size = len(fill)
    y, _ = _grid(size)
    top, bottom = np.array(_jitter((255, 150, 40), rng), np.float32), np.array(_jitter((120, 40, 140), rng), np.float32)
    t = (y / 31)[..., None]
    background = (top * (1 - t) + bottom * t) / 255
    return _mix(background, _solid(_jitter((25, 15, 35), rng, 10), size), fill)


def _ocean(fill, outline, rng):
    size = len(fill)
    y, x = _grid(size)
    phase, period = rng.uniform(0, 2 * math.pi), rng.uniform(5, 7)
    waves = (np.sin(2 * math.pi * (y + 1.5 * np.sin(x / 3 + phase)) / period) > 0.75).astype(np.float32)
    background = _mix(_solid(_jitter((20, 60, 160), rng), size), _solid((110, 170, 240), size), waves)
    return _mix(background, _solid((250, 250, 250), size), fill)


def _neon(fill, outline, rng):
    size = len(fill)
    color = rng.choice([(255, 40, 220), (40, 240, 255)])
    return _mix(_solid(_jitter((10, 10, 20), rng, 8), size), _solid(color, size), np.clip(outline * 1.6, 0, 1))


def _checker(fill, outline, rng):
    size = len(fill)
    y, x = _grid(size)
    offset = rng.randint(0, 3)
    cells = (((y + offset) // 4 + (x + offset) // 4) % 2).astype(np.float32)
    background = _mix(_solid((235, 235, 235), size), _solid((150, 150, 150), size), cells)
    return _mix(background, _solid(_jitter((220, 30, 30), rng), size), fill)


def _zebra(fill, outline, rng):
    size = len(fill)
    y, x = _grid(size)
    offset = rng.uniform(0, 4)
    stripes = (((x + y + offset) % 4) < 2).astype(np.float32)
    foreground = _mix(_solid((245, 245, 245), size), _solid((10, 10, 10), size), stripes)
    background = _solid(_jitter((200, 235, 200), rng, 10), size)
    return _mix(_mix(background, _solid((10, 10, 10), size), np.clip(outline, 0, 1)), foreground, fill)


def _polka(fill, outline, rng):
    size = len(fill)
    y, x = _grid(size)
    ox, oy = rng.uniform(0, 6), rng.uniform(0, 6)
    dots = ((((x + ox) % 6) - 3) ** 2 + (((y + oy) % 6) - 3) ** 2 < 2.5).astype(np.float32)
    background = _mix(_solid(_jitter((250, 220, 60), rng), size), _solid((240, 120, 30), size), dots)
    return _mix(background, _solid(_jitter((30, 60, 200), rng), size), fill)


def _pastel(fill, outline, rng):
    size = len(fill)
    background = _solid(_jitter((250, 205, 220), rng, 10), size)
    return _mix(background, _solid(_jitter((160, 230, 200), rng, 10), size), fill)


def _sketch(fill, outline, rng):
    size = len(fill)
    background = _solid(_jitter((250, 248, 240), rng, 5), size)
    return _mix(background, _solid((20, 20, 20), size), np.clip(outline * 0.9, 0, 1))


def _forest(fill, outline, rng):
    size = len(fill)
    noise = np.random.default_rng(rng.randint(0, 2**31)).uniform(-0.12, 0.12, (size, size, 1))
    background = np.clip(_solid(_jitter((30, 110, 40), rng), size) + noise.astype(np.float32), 0, 1)
    return _mix(background, _solid(_jitter((150, 90, 40), rng), size), fill)


def _mosaic(fill, outline, rng):
    size = len(fill)
    tile = size // 8
    tiles = np.random.default_rng(rng.randint(0, 2**31)).uniform(0.15, 0.85, (8, 8, 3))
    background = np.repeat(np.repeat(tiles, tile, axis=0), tile, axis=1).astype(np.float32)
    return _mix(background, _solid((255, 255, 255), size), fill)


_STYLE_PAINTERS: dict[str, Painter] = {
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


# ---- a canvas: one world of drawings --------------------------------------------------------------------------


@dataclass(frozen=True)
class Canvas:
    """A world of drawings: image size, the objects and styles it draws, and its captions."""

    name: str
    image_size: int
    objects: tuple[str, ...]
    styles: tuple[str, ...] = STYLES
    templates: tuple[str, ...] = TEMPLATES
    held_out_templates: tuple[str, ...] = HELD_OUT_TEMPLATES

    def object_mask(self, object_name: str, rng: random.Random) -> tuple[np.ndarray, np.ndarray]:
        """The object's fill and outline as float masks in [0, 1], jittered in place, size and angle."""
        canvas = self.image_size * _SUPERSAMPLING
        size = rng.uniform(0.62, 0.82) * canvas / 2
        centre_x = canvas / 2 + rng.uniform(-0.08, 0.08) * canvas
        centre_y = canvas / 2 + rng.uniform(-0.08, 0.08) * canvas
        angle = math.radians(rng.uniform(-12, 12))
        cos_a, sin_a = math.cos(angle), math.sin(angle)

        def place(x: float, y: float) -> tuple[float, float]:
            return (centre_x + size * (x * cos_a - y * sin_a), centre_y + size * (x * sin_a + y * cos_a))

        mask = Image.new("L", (canvas, canvas), 0)
        drawing = ImageDraw.Draw(mask)
        for polygon, fill in _SHAPES[object_name]:
            drawing.polygon([place(x, y) for x, y in polygon], fill=fill)
        # An outline about one 32-pixel canvas's pixel wide, whatever the size: the mask less its erosion.
        filled = np.asarray(mask, np.float32)
        outline = filled - _erode(filled, radius=4 * self.image_size // 32)
        small = (self.image_size, self.image_size)
        fill_mask = np.asarray(mask.resize(small, Image.BOX), np.float32) / 255
        outline_mask = np.asarray(Image.fromarray(outline.astype(np.uint8)).resize(small, Image.BOX), np.float32) / 255
        return fill_mask, outline_mask

    def draw(self, object_name: str | None, style: str, seed: int) -> np.ndarray:
        """One image as a float32 array [size, size, 3] in [0, 1]; the same arguments give the same image.

        `object_name=None` paints the style's bare background: what a canvas with its object gone looks like.
        """
        rng = random.Random(f"{object_name}/{style}/{seed}")
        if object_name is None:
            fill = outline = np.zeros((self.image_size, self.image_size), np.float32)
        else:
            fill, outline = self.object_mask(object_name, rng)
        return np.clip(_STYLE_PAINTERS[style](fill, outline, rng), 0, 1).astype(np.float32)

    def draw_pil(self, object_name: str | None, style: str, seed: int) -> Image.Image:
        return Image.fromarray((self.draw(object_name, style, seed) * 255).round().astype(np.uint8))

    def sample_batch(
        self, batch_size: int, seed: int, empty_prompt_share: float = 0.1, plain_prompt_share: float = 0.1
    ):
        """A training batch: images [B, 3, size, size] in [-1, 1], captions, object and style indices.

        Captions cycle through the training templates; a share of them is the bare object ("a star", any style)
        and a share is empty, which teaches the unconditional branch that classifier-free guidance needs.
        """
        rng = random.Random(seed)
        images, captions, object_ids, style_ids = [], [], [], []
        for _ in range(batch_size):
            object_id, style_id = rng.randrange(len(self.objects)), rng.randrange(len(self.styles))
            roll = rng.random()
            if roll < empty_prompt_share:
                caption = ""
            elif roll < empty_prompt_share + plain_prompt_share:
                caption = PLAIN_TEMPLATE.format(object=self.objects[object_id])
            else:
                caption = prompt_for(self.objects[object_id], self.styles[style_id], rng.choice(self.templates))
            images.append(self.draw(self.objects[object_id], self.styles[style_id], rng.randrange(2**31)))
            captions.append(caption)
            object_ids.append(object_id)
            style_ids.append(style_id)
        pixels = np.stack(images).transpose(0, 3, 1, 2) * 2 - 1
        return pixels, captions, np.array(object_ids), np.array(style_ids)

    def caption_corpus(self) -> list[str]:
        """Every caption the world uses, held-out templates included, to build the tokenizer's vocabulary from."""
        captions = [PLAIN_TEMPLATE.format(object=o) for o in self.objects]
        templates = self.templates + self.held_out_templates
        captions += [prompt_for(o, s, t) for o in self.objects for s in self.styles for t in templates]
        return captions


CANVAS = Canvas("minicanvas", image_size=64, objects=OBJECTS)
"""MiniCanvas: 20 objects x 10 styles at 64 x 64."""
CANVAS_32 = Canvas("minicanvas-32", image_size=32, objects=OBJECTS[:10], templates=TEMPLATES[:3], held_out_templates=())
"""The first MiniCanvas's drawings: 10 objects x 10 styles at 32 x 32, three templates; tests draw them."""
