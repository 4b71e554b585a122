"""The SAE trainer's cost (5): `train_sae` against a plain PyTorch loop on the same synthetic tokens."""

from __future__ import annotations

import json
import tempfile
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import save_file

from saemnesia.bench.timing import SEED, Row, median_ratio, time_in_turn
from saemnesia.sae import Sae, SaeConfig
from saemnesia.train import LABELS, Activations, SaeTrainConfig, train_sae

TRAINING_BLOCK = "up_blocks.1.attentions.1"
"""The block name the synthetic activations are stored under."""
TRAIN_TARGET = 1.10
"""Our trainer's time over a plain PyTorch loop's, for the same model and batches."""


def write_synthetic_activations(folder: Path, width: int, tokens_per_image: int, images: int) -> Path:
    """Random float16 tokens in `collect`'s on-disk layout (one block, one step per image, one shard)."""
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randn(images * tokens_per_image, width, generator=generator).half()
    labels = torch.tensor([[0, 0, 0, 0, 999, image] for image in range(images)], dtype=torch.int32)
    save_file({TRAINING_BLOCK: tokens, "labels": labels}, str(folder / "shard-00000.safetensors"))
    settings = {
        "objects": ["object"],
        "styles": ["style"],
        "blocks": [TRAINING_BLOCK],
        "timesteps": [999],
        "num_images": images,
        "labels": list(LABELS),
    }
    blocks = {TRAINING_BLOCK: {"width": width, "tokens_per_image": tokens_per_image}}
    manifest = {"settings": settings, "blocks": blocks, "shards": ["shard-00000.safetensors"], "complete": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def plain_training(batches: list[torch.Tensor], config: SaeConfig, lr: float, device: torch.device) -> Sae:
    """The textbook loop: TopK SAE forward, MSE, Adam step; the same model and batches as our trainer's."""
    torch.manual_seed(SEED)
    sae = Sae(config).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for x in batches:
        loss = (sae(x) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sae


def training_rows(quick: bool, repeats: int, device: torch.device) -> list[Row]:
    """Tokens per second of a plain loop and of `train_sae`, without and with its AuxK term.

    Without AuxK (no latent is ever counted dead) the trainer does the plain loop's work plus its own:
    reading shards, the decoder's unit-norm upkeep, bookkeeping; that is its overhead. With AuxK it
    runs SAeUron's full recipe, whose extra term costs what it costs.
    """
    if quick:
        width, batch_size, batches = 64, 256, 4
    elif device.type == "cuda":
        width, batch_size, batches = 1280, 4096, 16  # SAeUron's batch: smaller ones leave a GPU idle
    else:
        width, batch_size, batches = 1280, 256, 4
    tokens_per_image = 64
    images = batch_size * batches // tokens_per_image
    recipe = SaeTrainConfig(expansion_factor=16, k=32, batch_size=batch_size, epochs=1, holdout=0.0)
    without_auxk = replace(recipe, dead_tokens=2**62)
    sae_config = SaeConfig(d_in=width, num_latents=16 * width, k=32, expansion_factor=16)
    lr = 2e-4 / (sae_config.num_latents / 2**14) ** 0.5
    tokens = batch_size * batches
    with tempfile.TemporaryDirectory() as scratch:
        activations = Activations.open(write_synthetic_activations(Path(scratch), width, tokens_per_image, images))
        data = activations.load(0, TRAINING_BLOCK)[0].flatten(0, 1).to(device, torch.float32)
        plain_batches = list(data.split(batch_size))
        with torch.enable_grad():
            times = time_in_turn(
                {
                    "plain": lambda: plain_training(plain_batches, sae_config, lr, device),
                    "ours": lambda: train_sae(activations, TRAINING_BLOCK, without_auxk, device=device, progress=False),
                    "recipe": lambda: train_sae(activations, TRAINING_BLOCK, recipe, device=device, progress=False),
                },
                repeats,
                device,
            )
    shape = (
        f"SAE {width} -> {sae_config.num_latents}, k 32, {batches} batches of {batch_size} tokens, built in each run"
    )
    return [
        Row("train", "plain loop: TopK SAE + MSE + Adam", "tokens/s", [tokens / t for t in times["plain"]], note=shape),
        Row(
            "train",
            "train_sae without AuxK: time / plain loop's",
            "tokens/s",
            [tokens / t for t in times["ours"]],
            median_ratio(times["ours"], times["plain"]),
            None if quick else TRAIN_TARGET,
            "the trainer's overhead: shards from disk, decoder unit-norm upkeep, bookkeeping",
        ),
        Row(
            "train",
            "train_sae, full recipe (AuxK): time / plain loop's",
            "tokens/s",
            [tokens / t for t in times["recipe"]],
            median_ratio(times["recipe"], times["plain"]),
            note="adds SAeUron's AuxK term (on this small set, a latent unfired for one batch counts as dead)",
        ),
    ]
