"""Where a concept can be read: a nearest-class-mean probe on each collected block (`probe-blocks`)."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from saemnesia.train.activations import IMAGE, OBJECT, STYLE, Activations, heldout_images


def probe_blocks(activations: Activations, blocks: Sequence[str], holdout: float = 0.2) -> dict[str, dict]:
    """How well each block's output tells objects and styles apart: the measurement behind hook points.

    Each image becomes its block output map (every token, averaged over steps); a nearest-class-mean
    classifier fitted on the other images predicts the held-out images' object and style. The object
    SAE goes where object accuracy is highest, the style SAE where style accuracy is highest.
    """
    heldout = heldout_images(activations.num_images, holdout)
    report = {}
    for block in blocks:
        features = torch.zeros(activations.num_images, activations.tokens_per_image(block) * activations.width(block))
        counts = torch.zeros(activations.num_images)
        labels = torch.zeros(activations.num_images, 2, dtype=torch.long)
        for shard in range(activations.num_shards):
            tokens, rows = activations.load(shard, block)
            images = rows[:, IMAGE]
            features.index_add_(0, images, tokens.float().flatten(1))
            counts.index_add_(0, images, torch.ones(len(images)))
            labels[images] = rows[:, [OBJECT, STYLE]]
        features /= counts.clamp_min(1)[:, None]
        features = (features - features[~heldout].mean(0)) / features[~heldout].std(0).clamp_min(1e-6)
        accuracy = {}
        for column, kind in enumerate(("object", "style")):
            classes = labels[:, column]
            means = torch.stack([features[~heldout & (classes == c)].mean(0) for c in range(int(classes.max()) + 1)])
            predicted = torch.cdist(features[heldout], means.nan_to_num()).argmin(1)
            accuracy[kind] = round(float((predicted == classes[heldout]).float().mean()), 4)
        report[block] = accuracy
    return report
