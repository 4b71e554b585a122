"""SAeUron's unsupervised TopK SAE, trained with sparsify's recipe (METHOD section 2).

`train_sae` fits it to one block's collected tokens (AuxK for dead latents, a unit-norm decoder,
`b_dec` from the geometric median, optionally data-parallel over processes); `evaluate_sae` reports the
held-out fraction of variance unexplained; `save_sae` writes sparsify's layout with the report beside it.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.sae import Sae, SaeConfig
from saemnesia.train.activations import Activations, heldout_images, image_buffers, shuffled_batches, write_json

if TYPE_CHECKING:
    from accelerate import PartialState

logger = logging.getLogger(__name__)

TRAINING_FILE = "training.json"


@dataclass
class SaeTrainConfig:
    """SAeUron's unsupervised training, as sparsify runs it (METHOD section 2)."""

    expansion_factor: int = 16
    k: int = 32
    batch_size: int = 4096
    """Tokens per batch."""
    epochs: int = 5
    lr: float | None = None
    """None: sparsify's default, 2e-4 / sqrt(num_latents / 2**14), decayed linearly to 0."""
    auxk_alpha: float = 1 / 32
    dead_tokens: int | None = None
    """A latent that has not fired for this many tokens is dead, and AuxK trains it. sparsify uses 10M
    tokens on datasets of billions; None takes a tenth of an epoch's training tokens."""
    holdout: float = 0.1
    """Share of the images held out for the FVU and dead-latent report."""
    median_iterations: int = 10
    shards_in_memory: int = 8
    """Shards shuffled together: more mixes batches better and costs memory."""
    seed: int = 0


def geometric_median(points: Tensor, iterations: int = 10) -> Tensor:
    """Weiszfeld's iterations from the mean: the point minimising the summed distance to `points` [n, d]."""
    median = points.mean(0)
    for _ in range(iterations):
        weights = 1 / (points - median).norm(dim=1).clamp_min(1e-8)
        median = (weights[:, None] * points).sum(0) / weights.sum()
    return median


@torch.no_grad()
def remove_decoder_parallel_gradient(sae: Sae) -> None:
    """Drop the part of each decoder row's gradient along the row: it would only change the norm we fix."""
    # Row-wise dot products, then one in-place update: two passes over the matrix and no temporaries of its size.
    parallel = torch.einsum("ld,ld->l", sae.W_dec.grad, sae.W_dec.data).unsqueeze(1)
    sae.W_dec.grad.addcmul_(parallel, sae.W_dec.data, value=-1)


def train_sae(
    activations: Activations,
    block: str,
    config: SaeTrainConfig | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    processes: PartialState | None = None,
) -> tuple[Sae, dict]:
    """Train a TopK SAE on one block's tokens; returns it and a report with held-out FVU and dead share.

    Launched as several processes (`accelerate launch`, or `torchrun`), pass accelerate's `PartialState`
    as `processes` for data parallelism: every process draws the same shuffled batches and trains on
    its share of them (batch i goes to process i mod n), gradients and fired latents are averaged and
    joined across processes, so all processes hold the same SAE after every step; the effective batch is
    n x `batch_size`, and `b_dec` starts from batch 0 everywhere.
    """
    from accelerate.utils import reduce

    config = config or SaeTrainConfig()
    num_processes = processes.num_processes if processes is not None else 1
    rank = processes.process_index if processes is not None else 0
    d_in = activations.width(block)
    num_latents = d_in * config.expansion_factor
    heldout = heldout_images(activations.num_images, config.holdout, config.seed)
    train_tokens = activations.num_tokens(block, ~heldout)
    batches_per_epoch = max(1, train_tokens // config.batch_size) // num_processes * num_processes
    if batches_per_epoch == 0:
        raise ValueError(f"{num_processes} processes need at least as many batches: lower batch_size.")
    steps_per_epoch = batches_per_epoch // num_processes
    total_steps = steps_per_epoch * config.epochs
    lr = config.lr or 2e-4 / math.sqrt(num_latents / 2**14)
    dead_tokens = config.dead_tokens or max(config.batch_size, train_tokens // 10)
    k_aux = d_in // 2

    torch.manual_seed(config.seed)
    sae_config = SaeConfig(d_in=d_in, num_latents=num_latents, k=config.k, expansion_factor=config.expansion_factor)
    sae = Sae(sae_config).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / total_steps)
    tokens_since_fired = torch.zeros(num_latents, dtype=torch.long, device=device)
    generator = torch.Generator().manual_seed(config.seed)
    history = []
    bar = tqdm(total=total_steps, desc=f"train SAE on {block}", unit="batch", disable=not progress or rank > 0)
    step = 0
    for epoch in range(config.epochs):
        fvu_sum, auxk_sum, batches = 0.0, 0.0, 0
        buffers = image_buffers(activations, block, ~heldout, generator, config.shards_in_memory)
        all_batches = shuffled_batches(
            ((tokens.flatten(0, 1).to(device),) for tokens, _ in buffers), config.batch_size, generator
        )
        for index, (x,) in enumerate(all_batches):
            x = x.float()
            if step == 0 and index == 0:
                sae.b_dec.data.copy_(geometric_median(x, config.median_iterations))
            if index >= batches_per_epoch or index % num_processes != rank:
                continue

            # Encode, keep the top k, decode; the loss is the fraction of variance unexplained.
            pre_acts = torch.relu(sae.pre_activations(x))
            top_acts, top_indices = pre_acts.topk(config.k, dim=-1, sorted=False)
            residual = x - sae.decode(top_acts, top_indices)
            total_variance = (x - x.mean(0)).pow(2).sum()
            fvu = residual.pow(2).sum() / total_variance

            # AuxK: the top k_aux dead latents reconstruct what the live ones missed.
            dead = tokens_since_fired >= dead_tokens
            num_dead = int(dead.sum())
            auxk = x.new_zeros(())
            if num_dead > 0:
                aux_acts, aux_indices = torch.where(dead, pre_acts, -torch.inf).topk(min(k_aux, num_dead), dim=-1)
                # Sums only the k_aux chosen decoder rows, as sparsify's decoder does: never the whole dictionary.
                aux_decoded = F.embedding_bag(aux_indices, sae.W_dec, per_sample_weights=aux_acts, mode="sum")
                auxk = min(num_dead / k_aux, 1.0) * (aux_decoded - residual.detach()).pow(2).sum()
                auxk = auxk / total_variance
            loss = fvu + config.auxk_alpha * auxk

            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if num_processes > 1:
                for parameter in sae.parameters():
                    parameter.grad = reduce(parameter.grad, "mean")
            remove_decoder_parallel_gradient(sae)
            optimizer.step()
            schedule.step()
            sae.normalize_decoder()

            fired = torch.zeros(num_latents, device=device)
            fired[top_indices[top_acts > 0]] = 1.0
            if num_processes > 1:
                fired = reduce(fired, "sum")
            tokens_since_fired += len(x) * num_processes
            fired = fired > 0
            tokens_since_fired[fired] = 0
            fvu_sum, auxk_sum, batches, step = fvu_sum + fvu.item(), auxk_sum + auxk.item(), batches + 1, step + 1
            bar.update()
            bar.set_postfix(fvu=f"{fvu.item():.3f}", dead=num_dead)
        history.append({"epoch": epoch + 1, "train_fvu": fvu_sum / batches, "train_auxk": auxk_sum / batches})
        logger.info("epoch %d/%d: train FVU %.4f", epoch + 1, config.epochs, fvu_sum / batches)
    bar.close()
    report = {
        "block": block,
        "config": asdict(config),
        "lr": lr,
        "dead_tokens": dead_tokens,
        "steps": step,
        "processes": num_processes,
        "train_tokens": train_tokens,
        "heldout_images": int(heldout.sum()),
        "history": history,
        "heldout": evaluate_sae(sae, activations, block, heldout) if heldout.any() else None,
    }
    return sae, report


@torch.no_grad()
def evaluate_sae(
    sae: Sae, activations: Activations, block: str, images: Tensor, batch_size: int = 4096
) -> dict[str, float]:
    """FVU (over all the selected images' tokens) and the share of latents that never fire on them."""
    device = sae.W_dec.device
    count, residual = 0, torch.zeros((), dtype=torch.float64, device=device)
    sum_x = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    sum_x2 = torch.zeros(sae.d_in, dtype=torch.float64, device=device)
    fired = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
    for tokens, _ in image_buffers(activations, block, images):
        for x in tokens.flatten(0, 1).split(batch_size):
            x = x.to(device, torch.float32)
            codes = sae.encode(x)
            residual += (x - sae.decode(codes.top_acts, codes.top_indices)).double().pow(2).sum()
            sum_x += x.double().sum(0)
            sum_x2 += x.double().pow(2).sum(0)
            fired[codes.top_indices[codes.top_acts > 0]] = True
            count += len(x)
    total_variance = (sum_x2 - sum_x.pow(2) / max(count, 1)).sum()
    return {
        "fvu": float(residual / total_variance.clamp_min(1e-12)),
        "dead_share": 1 - float(fired.float().mean()),
        "tokens": count,
    }


def save_sae(sae: Sae, report: dict, folder: str | Path) -> None:
    """The SAE in sparsify's layout, with its training report as `training.json` beside it."""
    sae.save(folder)
    write_json(Path(folder) / TRAINING_FILE, report)
