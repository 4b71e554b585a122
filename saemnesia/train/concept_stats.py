"""Concept statistics of a trained SAE on the collection (METHOD section 3), and its concept dictionary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.concepts import (
    ConceptDictionary,
    ConceptFootprints,
    ConceptStats,
    build_dictionary,
    concept_stats_from_activations,
)
from saemnesia.sae import Sae
from saemnesia.studio import DICTIONARY_FILE, STATS_FILE
from saemnesia.train.activations import OBJECT, STEP, STYLE, Activations, image_buffers


@torch.no_grad()
def compute_stats(
    sae: Sae, activations: Activations, block: str, batch_size: int = 4096, progress: bool = True
) -> ConceptStats:
    """ConceptStats of an SAE on every collected image: objects and styles are both concepts."""
    everything = torch.ones(activations.num_images, dtype=torch.bool)
    num_objects = len(activations.objects)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        buffers = image_buffers(activations, block, everything)
        for tokens, labels in tqdm(buffers, total=activations.num_shards, desc="stats", disable=not progress):
            labels = labels.repeat_interleave(tokens.shape[1], 0)
            tokens = tokens.flatten(0, 1)
            concept_ids = torch.stack([labels[:, OBJECT], num_objects + labels[:, STYLE]], 1)
            for start in range(0, len(labels), batch_size):
                rows = slice(start, start + batch_size)
                yield tokens[rows].float(), concept_ids[rows], labels[rows, STEP]

    return concept_stats_from_activations(
        sae, batches(), activations.concepts, activations.kinds, activations.timesteps
    )


@torch.no_grad()
def compute_footprints(
    sae: Sae, activations: Activations, block: str, kind: str, batch_size: int = 64, progress: bool = True
) -> ConceptFootprints:
    """ConceptFootprints of the `kind`'s concepts (object or style), from the SAE's reconstruction of every
    collected image. Each concept's mean runs over its images at each step; the mean it is set against gives
    every other concept of its kind equal weight."""
    names = activations.objects if kind == "object" else activations.styles
    column = OBJECT if kind == "object" else STYLE
    num_steps = len(activations.timesteps)
    sums = torch.zeros(len(names) * num_steps, activations.tokens_per_image(block), activations.width(block))
    counts = torch.zeros(len(names) * num_steps)
    everything = torch.ones(activations.num_images, dtype=torch.bool)
    buffers = image_buffers(activations, block, everything)
    for tokens, labels in tqdm(buffers, total=activations.num_shards, desc="footprints", disable=not progress):
        rows = labels[:, column] * num_steps + labels[:, STEP]
        for start in range(0, len(rows), batch_size):
            part = slice(start, start + batch_size)
            sums.index_add_(0, rows[part], sae(tokens[part].to(sae.W_dec.device).float()).float().cpu())
        counts.index_add_(0, rows, torch.ones(len(rows)))
    means = (sums / counts.clamp_min(1)[:, None, None]).unflatten(0, (len(names), num_steps))
    others = (means.sum(0, keepdim=True) - means) / max(1, len(names) - 1)
    return ConceptFootprints(list(names), activations.timesteps.clone(), means - others)


def write_stats(
    sae: Sae,
    activations: Activations,
    block: str,
    folder: str | Path,
    dictionary: ConceptDictionary | None = None,
    progress: bool = True,
) -> tuple[ConceptStats, ConceptDictionary]:
    """Compute and save an SAE's statistics in `folder`, with its concept dictionary.

    The dictionary is the one given (a supervised SAE's is fixed by its training), or else built
    greedily from these statistics, objects first.
    """
    folder = Path(folder)
    stats = compute_stats(sae, activations, block, progress=progress)
    dictionary = dictionary or build_dictionary(stats)
    stats.save(folder / STATS_FILE)
    dictionary.save(folder / DICTIONARY_FILE)
    return stats, dictionary
