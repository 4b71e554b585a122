"""A collection of activations on disk: its layout, and reading it back one shard at a time.

`collect` (collection.py) writes a folder of safetensors shards and a `manifest.json`; each shard holds,
per hooked block, float16 tokens `[N, d]`, the `labels` of every image and step (see `LABELS`) and each
image's thumbnail, `images` `[B, h, w, 3]` uint8.
Images are the unit of the held-out splits: all steps and tokens of an image fall on the same side.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

MANIFEST_FILE = "manifest.json"
LABELS = ("object", "style", "prompt", "step", "timestep", "image")
"""The columns of a shard's `labels`, one row per image and step."""
OBJECT, STYLE, PROMPT, STEP, TIMESTEP, IMAGE = range(len(LABELS))


def write_json(path: Path, content: dict) -> None:
    """Write through a temporary file, so an interrupted write never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(temporary, path)


@dataclass
class Activations:
    """A finished collection, read one shard at a time (memory stays bounded by the shard size)."""

    folder: Path
    manifest: dict

    @classmethod
    def open(cls, folder: str | Path) -> Activations:
        folder = Path(folder)
        path = folder / MANIFEST_FILE
        if not path.is_file():
            raise FileNotFoundError(f"No activations in '{folder}': collect them with `python -m saemnesia collect`.")
        manifest = json.loads(path.read_text())
        missing = [name for name in manifest["shards"] if not (folder / name).is_file()]
        if not manifest.get("complete") or missing:
            raise ValueError(f"The collection in '{folder}' is unfinished: rerun `collect` with the same settings.")
        return cls(folder, manifest)

    @property
    def settings(self) -> dict:
        return self.manifest["settings"]

    @property
    def objects(self) -> list[str]:
        return self.settings["objects"]

    @property
    def styles(self) -> list[str]:
        return self.settings["styles"]

    @property
    def concepts(self) -> list[str]:
        return self.objects + self.styles

    @property
    def kinds(self) -> list[str]:
        return ["object"] * len(self.objects) + ["style"] * len(self.styles)

    @property
    def timesteps(self) -> Tensor:
        return torch.tensor(self.settings["timesteps"], dtype=torch.long)

    @property
    def num_images(self) -> int:
        return self.settings["num_images"]

    @property
    def num_shards(self) -> int:
        return len(self.manifest["shards"])

    def width(self, block: str) -> int:
        self._check_block(block)
        return self.manifest["blocks"][block]["width"]

    def tokens_per_image(self, block: str) -> int:
        """Tokens of one image at one step (the block's height x width)."""
        self._check_block(block)
        return self.manifest["blocks"][block]["tokens_per_image"]

    def num_tokens(self, block: str, images: Tensor) -> int:
        """Tokens of the selected images over all steps."""
        return int(images.sum()) * len(self.settings["timesteps"]) * self.tokens_per_image(block)

    def load(self, shard: int, block: str) -> tuple[Tensor, Tensor]:
        """A shard's tokens `[images x steps, tokens, d]` (float16) and labels `[images x steps, 6]`."""
        self._check_block(block)
        with safe_open(str(self.folder / self.manifest["shards"][shard]), framework="pt") as handle:
            tokens, labels = handle.get_tensor(block), handle.get_tensor("labels").long()
        return tokens.view(len(labels), -1, tokens.shape[-1]), labels

    @property
    def has_images(self) -> bool:
        """Whether the shards keep each image's thumbnail (collections made before they did, do not)."""
        with safe_open(str(self.folder / self.manifest["shards"][0]), framework="pt") as handle:
            return "images" in handle.keys()

    def load_images(self, shard: int) -> tuple[Tensor, Tensor]:
        """A shard's image ids `[B]` and thumbnails `[B, h, w, 3]` uint8."""
        with safe_open(str(self.folder / self.manifest["shards"][shard]), framework="pt") as handle:
            labels, images = handle.get_tensor("labels").long(), handle.get_tensor("images")
        return torch.unique_consecutive(labels[:, IMAGE]), images

    def _check_block(self, block: str) -> None:
        if block not in self.settings["blocks"]:
            raise ValueError(f"No activations of block '{block}' in '{self.folder}' (has {self.settings['blocks']}).")


def heldout_images(num_images: int, fraction: float, seed: int = 0) -> Tensor:
    """[num_images] bool, True on a random `fraction` of the images (at least one if fraction > 0).

    The same seed nests the splits: the images held out at 10% are among those held out at 20%.
    """
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    count = min(num_images - 1, max(1, round(fraction * num_images))) if fraction > 0 else 0
    heldout = torch.zeros(num_images, dtype=torch.bool)
    heldout[order[:count]] = True
    return heldout


def image_buffers(
    activations: Activations,
    block: str,
    images: Tensor,
    generator: torch.Generator | None = None,
    shards_in_memory: int = 1,
) -> Iterator[tuple[Tensor, Tensor]]:
    """The selected images' (tokens, labels), a few shards at a time; shards in random order if a generator is given."""
    count = activations.num_shards
    order = torch.randperm(count, generator=generator) if generator is not None else torch.arange(count)
    for start in range(0, count, shards_in_memory):
        parts = [activations.load(int(shard), block) for shard in order[start : start + shards_in_memory]]
        tokens, labels = torch.cat([part[0] for part in parts]), torch.cat([part[1] for part in parts])
        keep = images[labels[:, IMAGE]]
        if keep.any():
            yield tokens[keep], labels[keep]


def shuffled_batches(
    buffers: Iterable[tuple[Tensor, ...]], batch_size: int, generator: torch.Generator
) -> Iterator[tuple[Tensor, ...]]:
    """Full batches of rows shuffled within each buffer; leftover rows carry over to the next buffer.

    So an epoch of R rows gives exactly max(1, R // batch_size) batches (one short batch if R < batch_size).
    Batches are gathered where the buffers are: trainers move each buffer to the device once, since on a
    GPU a gather and copy per batch would cost more than the step.
    """
    leftover: tuple[Tensor, ...] | None = None
    made_one = False
    for buffer in buffers:
        if leftover is not None:
            buffer = tuple(torch.cat([old, new]) for old, new in zip(leftover, buffer))
        order = torch.randperm(len(buffer[0]), generator=generator)
        full = len(order) // batch_size * batch_size
        for start in range(0, full, batch_size):
            made_one = True
            yield tuple(part[order[start : start + batch_size]] for part in buffer)
        leftover = tuple(part[order[full:]] for part in buffer)
    if not made_one and leftover is not None and len(leftover[0]):
        yield leftover
