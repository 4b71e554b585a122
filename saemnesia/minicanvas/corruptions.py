"""Generic corruptions of MiniCanvas images: the CORRUPTED examples the artifact detector learns from.

Each corruption takes one image [3, H, W] in [0, 1] and a generator and corrupts all of it; `corrupt`
confines the result to a region (the whole image, a rectangle or a soft blob of at least a quarter of
it) and blends it in at 70-100%. Why each:

- `colour_noise`: strong per-pixel colour noise (gaussian of std 0.3-0.8, random primaries in short
  horizontal runs, or uniform colours). The commonest failure: a latent pushed far off its range turns
  the image into saturated pixel snow. MiniCanvas's own textures (forest's grain, augmentation noise)
  stay below std 0.15, and mosaic's colours come in 4 x 4 tiles, never per pixel.
- `stripes`: one-pixel lines every two or three pixels (horizontal, vertical or diagonal: a pixel
  checkerboard), in two saturated colours or modulating the image: the aliased banding of a sampler
  driven off the data. Zebra's stripes (period 4, black and white, diagonal) and checker's cells
  (4 pixels) are coarser.
- `patch_shuffle`: the image's 4 x 4 or 8 x 8 patches permuted: every local patch is plausible but the
  layout is incoherent, as in fragmented erasures.
- `colour_blobs`: three to eight soft ellipses of saturated random colours, flat or grainy: saturated mush.
- `smear`: a strong smooth warp, streaks along a direction and a saturation boost: melted, smeared mush.

Not used: channel swaps and posterisation. They change the palette, not the structure, and a style
erasure may rightly repaint an image in other colours; an artifact measure must not count that.

A corruption that barely changes an image (a shuffle of a plain background) is replaced by full-image
colour noise, so that no corrupted label sits on a clean-looking image.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

MIN_CHANGE = 0.04
"""Mean absolute pixel change a corruption must make to keep its label (else full colour noise)."""


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * torch.rand(1, generator=generator).item()


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high]."""
    return int(torch.randint(low, high + 1, (1,), generator=generator))


def _saturated_colours(count: int, generator: torch.Generator) -> Tensor:
    """[count, 3] colours of random hue at full saturation and a high value."""
    hue = torch.rand(count, 1, generator=generator)
    value = 0.7 + 0.3 * torch.rand(count, 1, generator=generator)
    return ((hue * 6 + torch.tensor([0.0, 4.0, 2.0])) % 6 - 3).abs().sub(1).clamp(0, 1) * value


def _pixel_grid(height: int, width: int) -> tuple[Tensor, Tensor]:
    return torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )


def colour_noise(image: Tensor, generator: torch.Generator) -> Tensor:
    """Strong per-pixel colour noise: gaussian, random primaries in short horizontal runs, or uniform."""
    _, height, width = image.shape
    mode = _integer(generator, 0, 2)
    if mode == 0:
        noisy = image + _uniform(generator, 0.3, 0.8) * torch.randn(image.shape, generator=generator)
    elif mode == 1:
        run = _integer(generator, 1, 4)
        bits = (torch.rand(3, height, math.ceil(width / run), generator=generator) < 0.5).float()
        noisy = bits.repeat_interleave(run, dim=2)[:, :, :width]
    else:
        noisy = torch.rand(image.shape, generator=generator)
    return noisy.clamp(0, 1)


def stripes(image: Tensor, generator: torch.Generator) -> Tensor:
    """One-pixel lines every two or three pixels (horizontal, vertical, diagonal: a pixel checkerboard at
    period 2), in two saturated colours or added to the image."""
    _, height, width = image.shape
    y, x = _pixel_grid(height, width)
    coordinate = (y, x, x + y)[_integer(generator, 0, 2)]
    on = (coordinate % _integer(generator, 2, 3) == 0).float()
    if torch.rand(1, generator=generator).item() < 0.5:
        first, second = _saturated_colours(2, generator)
        return first[:, None, None] * on + second[:, None, None] * (1 - on)
    amplitude = _uniform(generator, 0.25, 0.5) * (torch.rand(3, 1, 1, generator=generator) * 2 - 1).sign()
    return (image + amplitude * (2 * on - 1)).clamp(0, 1)


def _scale(height: int) -> int:
    """Shapes are drawn for a 32-pixel image and grow with the image, as MiniCanvas's drawings do."""
    return max(1, height // 32)


def patch_shuffle(image: Tensor, generator: torch.Generator) -> Tensor:
    """The image's 4 x 4 or 8 x 8 patches (of a 32-pixel image; larger in proportion) in a random order."""
    channels, height, width = image.shape
    size = (4, 8)[_integer(generator, 0, 1)] * _scale(height)
    rows, columns = height // size, width // size
    patches = (
        image.reshape(channels, rows, size, columns, size).permute(1, 3, 0, 2, 4).reshape(-1, channels, size, size)
    )
    shuffled = patches[torch.randperm(len(patches), generator=generator)]
    return shuffled.reshape(rows, columns, channels, size, size).permute(2, 0, 3, 1, 4).reshape(channels, height, width)


def colour_blobs(image: Tensor, generator: torch.Generator) -> Tensor:
    """Three to eight soft ellipses of saturated random colours, half of them grainy."""
    _, height, width = image.shape
    y, x = _pixel_grid(height, width)
    out = image.clone()
    count = _integer(generator, 3, 8)
    for colour in _saturated_colours(count, generator):
        centre_y, centre_x = _uniform(generator, 0, height), _uniform(generator, 0, width)
        radius_y, radius_x = (_uniform(generator, 2.5, 9) * _scale(height) for _ in range(2))
        distance = (((y - centre_y) / radius_y) ** 2 + ((x - centre_x) / radius_x) ** 2).sqrt()
        mask = torch.sigmoid((1 - distance) * _uniform(generator, 3, 10))
        fill = colour[:, None, None].expand_as(image)
        if torch.rand(1, generator=generator).item() < 0.5:
            fill = (fill + 0.25 * torch.randn(image.shape, generator=generator)).clamp(0, 1)
        out = out * (1 - mask) + fill * mask
    return out


def smear(image: Tensor, generator: torch.Generator) -> Tensor:
    """A strong smooth warp, streaks along one direction and a saturation boost."""
    _, height, width = image.shape
    knots = _integer(generator, 3, 5)
    offsets = (torch.rand(1, 2, knots, knots, generator=generator) * 2 - 1) * _uniform(generator, 0.15, 0.35)
    offsets = F.interpolate(offsets, size=(height, width), mode="bicubic", align_corners=True).permute(0, 2, 3, 1)
    y, x = torch.meshgrid(torch.linspace(-1, 1, height), torch.linspace(-1, 1, width), indexing="ij")
    grid = torch.stack([x, y], dim=-1)[None] + offsets
    out = F.grid_sample(image[None], grid, mode="bilinear", padding_mode="reflection", align_corners=True)[0]
    step_y, step_x = ((0, 1), (1, 0), (1, 1), (1, -1))[_integer(generator, 0, 3)]
    length = _integer(generator, 3, 7) * _scale(height)
    out = torch.stack([out.roll((k * step_y, k * step_x), dims=(1, 2)) for k in range(length)]).mean(0)
    grey = out.mean(0, keepdim=True)
    return (grey + (out - grey) * _uniform(generator, 1.5, 3)).clamp(0, 1)


CORRUPTIONS: dict[str, Callable[[Tensor, torch.Generator], Tensor]] = {
    "colour_noise": colour_noise,
    "stripes": stripes,
    "patch_shuffle": patch_shuffle,
    "colour_blobs": colour_blobs,
    "smear": smear,
}


def _region(height: int, width: int, generator: torch.Generator) -> Tensor:
    """[1, H, W] in [0, 1]: the whole image (40%), a rectangle of at least a quarter of it (30%), or a
    soft blob over 30-80% of it (30%)."""
    roll = torch.rand(1, generator=generator).item()
    if roll < 0.4:
        return torch.ones(1, height, width)
    if roll < 0.7:
        box_height, box_width = _integer(generator, height // 2, height), _integer(generator, width // 2, width)
        top, left = _integer(generator, 0, height - box_height), _integer(generator, 0, width - box_width)
        mask = torch.zeros(1, height, width)
        mask[:, top : top + box_height, left : left + box_width] = 1
        return mask
    field = F.interpolate(torch.rand(1, 1, 4, 4, generator=generator), size=(height, width), mode="bilinear")[0]
    level = torch.quantile(field.flatten(), 1 - _uniform(generator, 0.3, 0.8))
    return torch.sigmoid((field - level) * 40)


class Corrupted(NamedTuple):
    images: Tensor
    """[B, 3, H, W] in [0, 1]"""
    names: list[str]
    """The corruption each image got (`colour_noise` where the chosen one changed too little)."""


def corrupt(images: Tensor, generator: torch.Generator, names: Sequence[str] | None = None) -> Corrupted:
    """Each image corrupted by one of `CORRUPTIONS` (random, or `names[i]`) over a region, blended at 70-100%."""
    unknown = sorted(set(names or ()) - set(CORRUPTIONS))
    if unknown:
        raise ValueError(f"Unknown corruptions {unknown}; choose from {', '.join(CORRUPTIONS)}.")
    choices = list(CORRUPTIONS)
    out, used = [], []
    for index, image in enumerate(images):
        name = names[index] if names else choices[_integer(generator, 0, len(choices) - 1)]
        mask = _region(image.shape[1], image.shape[2], generator)
        changed = image + _uniform(generator, 0.7, 1) * mask * (CORRUPTIONS[name](image, generator) - image)
        if (changed - image).abs().mean() < MIN_CHANGE:
            name, changed = "colour_noise", colour_noise(image, generator)
        out.append(changed.clamp(0, 1))
        used.append(name)
    return Corrupted(torch.stack(out), used)
