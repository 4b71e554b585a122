"""Concept statistics of a trained SAE on the collection (METHOD section 3), and its concept dictionary."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.concepts import ConceptDictionary, ConceptStats, build_dictionary, concept_stats_from_activations
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
