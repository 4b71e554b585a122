"""Activation maps painted over images: a latent's per-token activation, upsampled, in jet colours.

Maps of one comparison share one colour scale (`scale`), so a weaker activation on the erased run
looks weaker, unlike per-map min-max normalisation which would stretch it back to full colour.
"""

from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw
from torch import Tensor


def jet(values: np.ndarray) -> np.ndarray:
    """The jet colour map on [0, 1] (blue -> cyan -> yellow -> red), as uint8 RGB."""
    v = np.clip(values, 0, 1)[..., None]
    red = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    green = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    blue = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return (np.concatenate([red, green, blue], -1) * 255).round().astype(np.uint8)


def upscale(image: Image.Image, size: int) -> Image.Image:
    """Enlarge for display without blurring (pixel art stays crisp)."""
    return image.resize((size, size), Image.NEAREST)


def overlay(
    image: Image.Image, activation: Tensor | np.ndarray, scale: float, alpha: float = 0.6, size: int = 256
) -> Image.Image:
    """The image with `activation / scale` painted over it in jet colours at opacity `alpha`."""
    values = np.asarray(activation, dtype=np.float32) / max(float(scale), 1e-12)
    heat = Image.fromarray(jet(values)).resize((size, size), Image.BILINEAR)
    return Image.blend(upscale(image.convert("RGB"), size), heat, float(np.clip(alpha, 0, 1)))


def mask_overlay(image: Image.Image, mask: Tensor | np.ndarray, size: int = 256, color=(255, 0, 255)) -> Image.Image:
    """The image with the tokens the edit changed outlined by a translucent colour."""
    mask_image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255).resize((size, size), Image.NEAREST)
    tint = Image.new("RGB", (size, size), color)
    base = upscale(image.convert("RGB"), size)
    return Image.composite(Image.blend(base, tint, 0.55), base, mask_image)


def source_arrows(
    image: Image.Image, sources: Tensor | np.ndarray, size: int = 256, color=(255, 0, 255)
) -> Image.Image:
    """`mask_overlay` of the replaced tokens, with an arrow from each one's source token (`replace`): where
    the value it now holds came from. `sources` `[h, w]` holds token indices, row-major; a token that kept
    its own value is left clear, and one whose map had nothing undetected (-1) is crossed out: it took the
    unconditional half's token at its place (the `unconditional` fallback) or kept its own."""
    sources = np.asarray(sources)
    height, width = sources.shape
    own = np.arange(height * width).reshape(height, width)
    canvas = mask_overlay(image, sources != own, size, color)
    draw = ImageDraw.Draw(canvas)
    cell_w, cell_h = size / width, size / height

    def centre(index: int) -> tuple[float, float]:
        row, column = divmod(int(index), width)
        return (column + 0.5) * cell_w, (row + 0.5) * cell_h

    for target, source in enumerate(sources.flatten()):
        if source == target:
            continue
        x, y = centre(target)
        if source < 0:
            r = min(cell_w, cell_h) / 4
            draw.line([(x - r, y - r), (x + r, y + r)], fill="white", width=3)
            draw.line([(x - r, y + r), (x + r, y - r)], fill="white", width=3)
            continue
        start = centre(source)
        draw.line([start, (x, y)], fill="white", width=3)
        draw.ellipse([x - 5, y - 5, x + 5, y + 5], fill="white")
        draw.ellipse([start[0] - 3, start[1] - 3, start[0] + 3, start[1] + 3], outline="white", width=2)
    return canvas
