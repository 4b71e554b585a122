"""Making the SAEs: collect activations, train SAeUron's SAE, take statistics, fine-tune SAEmnesia's SAE.

One function per stage, each a CLI command (METHOD sections 2, 3 and 5):
1. `collect`: every labelled (object, style, template) prompt of a world, over the whole sampling
   trajectory and several seeds; the hooked blocks' conditional outputs are stored as float16 tokens
   in safetensors shards. Resumable: a rerun skips finished shards and remakes the rest identically.
2. `train_sae`: an unsupervised TopK SAE trained as SAeUron trains it with sparsify.
3. `compute_stats`: mean activation of every latent per concept and step; then `build_dictionary`.
4. `finetune`: SAEmnesia's supervised fine-tuning, binding each concept to its dictionary latent.
5. `centralisation_report`: how much of each concept's score its single best latent holds, and how far
   apart the concepts' decoder rows are.

Images are the unit of the held-out splits: all steps and tokens of an image fall on the same side.
A fine-tuning sample is one image at one step: all its tokens together, as the supervision needs.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.concepts import ConceptDictionary, ConceptStats, build_dictionary, concept_stats_from_activations
from saemnesia.generate import initial_noise, model_lock, sampler_timesteps
from saemnesia.hooks import get_block, hooked_block
from saemnesia.sae import Sae, SaeConfig
from saemnesia.studio import DICTIONARY_FILE, STATS_FILE
from saemnesia.worlds import World

if TYPE_CHECKING:
    from accelerate import PartialState

logger = logging.getLogger(__name__)

MANIFEST_FILE = "manifest.json"
TRAINING_FILE = "training.json"
CENTRALISATION_FILE = "centralisation.json"
LABELS = ("object", "style", "prompt", "step", "timestep", "image")
"""The columns of a shard's `labels`, one row per image and step."""
OBJECT, STYLE, PROMPT, STEP, TIMESTEP, IMAGE = range(len(LABELS))


# ---------------------------------------------------------------------------------------------------
# 1. Activations
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    object: int
    style: int
    template: int


def labelled_prompts(world: World) -> list[LabelledPrompt]:
    """Every object x style x template prompt of the world, with the indices of its object and style."""
    return [
        LabelledPrompt(world.prompt(object_name, style, template), o, s, t)
        for o, object_name in enumerate(world.objects)
        for s, style in enumerate(world.styles)
        for t, template in enumerate(world.templates)
    ]


def _write_json(path: Path, content: dict) -> None:
    """Write through a temporary file, so an interrupted write never leaves half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(content, indent=1) + "\n")
    os.replace(temporary, path)


@torch.no_grad()
def _generate_shard(
    pipeline: StableDiffusionPipeline,
    world: World,
    prompts: list[LabelledPrompt],
    images: range,
    blocks: list[str],
    timesteps: list[int],
    first_seed: int,
) -> dict[str, Tensor]:
    """One pipeline call on a batch of images: each block's conditional tokens and the labels.

    Image i has prompt i mod P and starts from the noise of seed `first_seed + i`. Tokens are ordered
    by image, then step, then position; `labels` holds one row per image and step.
    """
    batch = [prompts[image % len(prompts)] for image in images]
    noise = torch.cat([initial_noise(pipeline, first_seed + image, world.height, world.width) for image in images])
    with model_lock(pipeline), ExitStack() as stack:
        hooks = {block: stack.enter_context(hooked_block(pipeline.unet, block, record=True)) for block in blocks}
        pipeline(
            prompt=[prompt.text for prompt in batch],
            latents=noise.to(pipeline.device, pipeline.unet.dtype),
            num_inference_steps=world.steps,
            guidance_scale=world.guidance,
            height=world.height,
            width=world.width,
            output_type="latent",
        )
    tensors = {}
    for block, hook in hooks.items():
        if len(hook.outputs) != len(timesteps):
            raise RuntimeError(f"Block '{block}' ran {len(hook.outputs)} times for {len(timesteps)} sampler steps.")
        # With classifier-free guidance the batch is [unconditional; conditional]: keep the last rows.
        outputs = torch.stack([output[-len(batch) :] for output in hook.outputs])  # [T, B, C, H, W]
        channels = outputs.shape[2]
        tokens = outputs.permute(1, 0, 3, 4, 2).reshape(-1, channels)
        tensors[block] = tokens.to("cpu", torch.float16).contiguous()
    labels = [
        [prompt.object, prompt.style, image % len(prompts), step, timestep, image]
        for image, prompt in zip(images, batch)
        for step, timestep in enumerate(timesteps)
    ]
    tensors["labels"] = torch.tensor(labels, dtype=torch.int32)
    return tensors


def process_shards(shard_count: int, process_index: int, num_processes: int) -> list[int]:
    """The shards one of `num_processes` processes makes: every `num_processes`-th from its own index.

    The slices are disjoint, cover every shard, and depend on the counts alone, so a run resumed with
    another number of processes still makes each missing shard exactly once.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes - 1}], got {process_index}.")
    return list(range(process_index, shard_count, num_processes))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _blocks_info(shard: Path, blocks: Sequence[str]) -> dict[str, dict[str, int]]:
    """Each block's token width and tokens per image, read from a shard's header."""
    with safe_open(str(shard), framework="pt") as handle:
        groups = handle.get_slice("labels").get_shape()[0]
        shapes = {block: handle.get_slice(block).get_shape() for block in blocks}
    return {block: {"width": shape[1], "tokens_per_image": shape[0] // groups} for block, shape in shapes.items()}


def collect(
    world: World,
    pipeline: StableDiffusionPipeline,
    out: str | Path,
    blocks: Sequence[str] | None = None,
    seeds_per_prompt: int = 4,
    first_seed: int = 0,
    images_per_shard: int = 32,
    progress: bool = True,
    processes: PartialState | None = None,
) -> Activations:
    """Store the hooked blocks' conditional outputs over whole trajectories of every labelled prompt.

    Each shard is one pipeline call of `images_per_shard` images (all blocks at once) and holds, per
    block, tokens `[N, d]` as float16 and the `labels` (see `LABELS`). The manifest lists finished
    shards; a rerun with the same settings skips them and remakes any other shard identically.

    Launched as several processes (`accelerate launch --multi_gpu`, or `torchrun`), pass accelerate's
    `PartialState` (made with `cpu=True` on CPUs) as `processes`: each process makes its slice of the
    shards (`process_shards`) and the main process alone writes the manifest, listing the shards in
    index order once every process is done. A shard's content depends on its index alone, so the
    collection is the same whichever process made each shard.
    """
    out = Path(out)
    blocks = list(dict.fromkeys(blocks or (world.object_block, world.style_block)))
    for block in blocks:
        get_block(pipeline.unet, block)
    prompts = labelled_prompts(world)
    if not prompts:
        raise ValueError(f"World '{world.name}' has no object x style prompts to collect.")
    if seeds_per_prompt < 1 or images_per_shard < 1:
        raise ValueError("seeds_per_prompt and images_per_shard must be at least 1.")
    num_images = len(prompts) * seeds_per_prompt
    settings = {
        "world": world.name,
        "model": getattr(pipeline, "name_or_path", None) or world.model,
        "dtype": str(pipeline.unet.dtype),
        "blocks": blocks,
        "objects": list(world.objects),
        "styles": list(world.styles),
        "prompts": [asdict(prompt) for prompt in prompts],
        "steps": world.steps,
        "guidance": world.guidance,
        "height": world.height,
        "width": world.width,
        "timesteps": sampler_timesteps(pipeline, world.steps),
        "seeds_per_prompt": seeds_per_prompt,
        "first_seed": first_seed,
        "images_per_shard": images_per_shard,
        "num_images": num_images,
        "labels": list(LABELS),
    }
    distributed = processes is not None and processes.num_processes > 1
    is_main = not distributed or processes.is_main_process
    manifest_path = out / MANIFEST_FILE
    shard_count = math.ceil(num_images / images_per_shard)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["settings"] != settings:
            changed = sorted(key for key in settings if manifest["settings"].get(key) != settings[key])
            raise ValueError(
                f"'{out}' holds activations collected with other settings ({', '.join(changed)}): "
                "give another folder, or delete this one to start over."
            )
        # Shards are written whole (through a temporary file) after the manifest recorded their
        # settings, so a shard file present is a finished one, whichever process wrote it.
        finished = {_shard_name(index) for index in range(shard_count) if (out / _shard_name(index)).is_file()}
    else:
        manifest = {"settings": settings, "blocks": {}, "shards": [], "complete": False}
        finished = set()
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            _write_json(manifest_path, manifest)
    if distributed:
        processes.wait_for_everyone()
    manifest["shards"] = sorted(finished)
    process_index, num_processes = (processes.process_index, processes.num_processes) if distributed else (0, 1)
    mine = process_shards(shard_count, process_index, num_processes)
    done = sum(_shard_name(index) in finished for index in mine)
    bar = tqdm(total=len(mine), initial=done, desc="collect", unit="shard", disable=not (progress and is_main))
    for index in mine:
        name = _shard_name(index)
        if name in finished:
            continue
        images = range(index * images_per_shard, min(num_images, (index + 1) * images_per_shard))
        tensors = _generate_shard(pipeline, world, prompts, images, blocks, settings["timesteps"], first_seed)
        temporary = out / (name + ".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, out / name)
        if not distributed:
            manifest["shards"] = sorted([*manifest["shards"], name])
            _write_json(manifest_path, manifest)
        bar.update()
    bar.close()
    if distributed:
        processes.wait_for_everyone()
    if is_main:
        manifest["shards"] = [_shard_name(index) for index in range(shard_count)]
        manifest["blocks"] = _blocks_info(out / manifest["shards"][0], blocks)
        manifest["complete"] = True
        _write_json(manifest_path, manifest)
    if distributed:
        processes.wait_for_everyone()
    return Activations.open(out)


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

    def _check_block(self, block: str) -> None:
        if block not in self.settings["blocks"]:
            raise ValueError(f"No activations of block '{block}' in '{self.folder}' (has {self.settings['blocks']}).")


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


def heldout_images(num_images: int, fraction: float, seed: int = 0) -> Tensor:
    """[num_images] bool, True on a random `fraction` of the images (at least one if fraction > 0).

    The same seed nests the splits: the images held out at 10% are among those held out at 20%.
    """
    order = torch.randperm(num_images, generator=torch.Generator().manual_seed(seed))
    count = min(num_images - 1, max(1, round(fraction * num_images))) if fraction > 0 else 0
    heldout = torch.zeros(num_images, dtype=torch.bool)
    heldout[order[:count]] = True
    return heldout


def _buffers(
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


def _batches(
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


# ---------------------------------------------------------------------------------------------------
# 2. Unsupervised TopK SAE (SAeUron, trained with sparsify's recipe)
# ---------------------------------------------------------------------------------------------------


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
def _remove_decoder_parallel_gradient(sae: Sae) -> None:
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
        buffers = _buffers(activations, block, ~heldout, generator, config.shards_in_memory)
        all_batches = _batches(
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
            _remove_decoder_parallel_gradient(sae)
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
    for tokens, _ in _buffers(activations, block, images):
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
    _write_json(Path(folder) / TRAINING_FILE, report)


# ---------------------------------------------------------------------------------------------------
# 3. Concept statistics
# ---------------------------------------------------------------------------------------------------


@torch.no_grad()
def compute_stats(
    sae: Sae, activations: Activations, block: str, batch_size: int = 4096, progress: bool = True
) -> ConceptStats:
    """ConceptStats of an SAE on every collected image: objects and styles are both concepts."""
    everything = torch.ones(activations.num_images, dtype=torch.bool)
    num_objects = len(activations.objects)

    def batches() -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        buffers = _buffers(activations, block, everything)
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


# ---------------------------------------------------------------------------------------------------
# 4. SAEmnesia's supervised fine-tuning
# ---------------------------------------------------------------------------------------------------

SUPERVISIONS = ("bce", "ce")


@dataclass
class FinetuneConfig:
    """SAEmnesia's supervised fine-tuning (METHOD section 5)."""

    supervision: str = "bce"
    """"bce": the authors' code, BCE-with-logits at every assigned latent (1 for the image's object and
    style, 0 for the rest). "ce": softmax cross-entropy over the object latents for the object, and
    over the style latents for the style, averaged."""
    lr: float = 5e-6
    epochs: int = 150
    batch_size: int = 128
    """Samples per batch; a sample is one image at one step, with all its tokens."""
    patience: int = 5
    holdout: float = 0.2
    concept_weight: float = 3.0
    decorrelation_weight: float = 0.1
    sparsity_weight: float = 0.01
    max_grad_norm: float = 1.0
    shards_in_memory: int = 8
    seed: int = 0


class SupervisedLoss(NamedTuple):
    total: Tensor
    reconstruction: Tensor
    """MSE of the reconstruction."""
    supervision: Tensor
    """BCE (or cross-entropy) of the image-averaged ReLU'd pre-activations at the assigned latents."""
    decorrelation: Tensor
    """Mean squared Pearson correlation, across the batch, between object and style latents."""
    sparsity: Tensor
    """Mean ReLU'd pre-activation (its L1 norm per latent)."""
    object_hits: Tensor
    """How many samples have their object's latent highest among the object latents."""
    style_hits: Tensor


def _pearson(a: Tensor, b: Tensor) -> Tensor:
    """[n_a, n_b] correlation across the batch (dim 0) between every column of `a` and every column of `b`."""
    a, b = a - a.mean(0), b - b.mean(0)
    norms = a.pow(2).sum(0).add(1e-8).sqrt()[:, None] * b.pow(2).sum(0).add(1e-8).sqrt()[None, :]
    return (a.T @ b) / norms


def supervised_loss(
    sae: Sae,
    tokens: Tensor,
    object_ids: Tensor,
    style_ids: Tensor,
    object_latents: Tensor,
    style_latents: Tensor,
    config: FinetuneConfig,
) -> SupervisedLoss:
    """SAEmnesia's loss on a batch of samples `tokens [B, tokens, d]` with their object and style indices.

    `L = MSE + concept_weight * (supervision + decorrelation_weight * decorrelation) + sparsity_weight * mean|pre|`

    `pre` is sparsify's `pre_acts`, the encoder output after ReLU, as in the authors' code. Without the ReLU
    the supervision is met by pushing the other latents far below zero while the concept's own latent
    barely fires (measured on MiniCanvas: 99.6% held-out accuracy, yet the latent in the top-k on 15% of
    the object's tokens and its erasure weak); with it, the concept's latent must fire on its images.
    """
    samples, positions, _ = tokens.shape
    x = tokens.flatten(0, 1)
    pre_acts = torch.relu(sae.pre_activations(x))  # sparsify's `pre_acts`: the encoder's output after ReLU
    top_acts, top_indices = pre_acts.topk(sae.cfg.k, dim=-1, sorted=False)
    reconstruction = F.mse_loss(sae.decode(top_acts, top_indices), x)

    logits = pre_acts.view(samples, positions, -1).mean(1)
    object_logits, style_logits = logits[:, object_latents], logits[:, style_latents]
    if config.supervision == "bce":
        targets = torch.cat(
            [F.one_hot(object_ids, len(object_latents)), F.one_hot(style_ids, len(style_latents))], 1
        ).to(logits.dtype)
        supervision = F.binary_cross_entropy_with_logits(torch.cat([object_logits, style_logits], 1), targets)
    elif config.supervision == "ce":
        supervision = (F.cross_entropy(object_logits, object_ids) + F.cross_entropy(style_logits, style_ids)) / 2
    else:
        raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {config.supervision!r}.")
    decorrelation = _pearson(object_logits, style_logits).pow(2).mean()
    sparsity = pre_acts.mean()
    total = (
        reconstruction
        + config.concept_weight * (supervision + config.decorrelation_weight * decorrelation)
        + config.sparsity_weight * sparsity
    )
    object_hits = (object_logits.argmax(1) == object_ids).sum()
    style_hits = (style_logits.argmax(1) == style_ids).sum()
    return SupervisedLoss(total, reconstruction, supervision, decorrelation, sparsity, object_hits, style_hits)


def _assigned_latents(activations: Activations, dictionary: ConceptDictionary) -> tuple[Tensor, Tensor]:
    """The dictionary latents of the collection's objects and styles, in label order."""
    object_latents = torch.tensor([dictionary.latent(name) for name in activations.objects])
    style_latents = torch.tensor([dictionary.latent(name) for name in activations.styles])
    return object_latents, style_latents


@torch.no_grad()
def evaluate_supervised(
    sae: Sae,
    activations: Activations,
    block: str,
    dictionary: ConceptDictionary,
    images: Tensor,
    config: FinetuneConfig,
) -> dict[str, float]:
    """The loss terms, averaged over batches of the selected images, and the share of samples whose
    object (style) latent is the highest of the object (style) latents."""
    device = sae.W_dec.device
    object_latents, style_latents = (latents.to(device) for latents in _assigned_latents(activations, dictionary))
    sums = dict.fromkeys(SupervisedLoss._fields, 0.0)
    count = 0
    for tokens, labels in _buffers(activations, block, images):
        for start in range(0, len(labels), config.batch_size):
            batch_tokens = tokens[start : start + config.batch_size].to(device, torch.float32)
            batch_labels = labels[start : start + config.batch_size].to(device)
            loss = supervised_loss(
                sae,
                batch_tokens,
                batch_labels[:, OBJECT],
                batch_labels[:, STYLE],
                object_latents,
                style_latents,
                config,
            )
            for name, value in loss._asdict().items():
                sums[name] += float(value) if name.endswith("hits") else float(value) * len(batch_labels)
            count += len(batch_labels)
    result = {name: value / max(count, 1) for name, value in sums.items() if not name.endswith("hits")}
    result["object_accuracy"] = sums["object_hits"] / max(count, 1)
    result["style_accuracy"] = sums["style_hits"] / max(count, 1)
    return result


def finetune(
    sae: Sae,
    activations: Activations,
    block: str,
    dictionary: ConceptDictionary,
    config: FinetuneConfig | None = None,
    progress: bool = True,
) -> tuple[Sae, dict]:
    """Fine-tune a copy of `sae` so each concept lives in its dictionary latent; keeps the epoch with the
    lowest held-out loss, stopping after `patience` epochs without improvement.

    The decoder stays unit-norm as in unsupervised training, so the supervision cannot be met by
    growing pre-activations while shrinking decoder rows.
    """
    config = config or FinetuneConfig()
    if config.supervision not in SUPERVISIONS:
        raise ValueError(f"supervision must be one of {SUPERVISIONS}, got {config.supervision!r}.")
    if config.concept_weight < 0:
        raise ValueError(f"concept_weight must be >= 0 (the paper's is 3.0), got {config.concept_weight}.")
    original, sae = sae, copy.deepcopy(sae)
    device = sae.W_dec.device
    object_latents, style_latents = (latents.to(device) for latents in _assigned_latents(activations, dictionary))
    heldout = heldout_images(activations.num_images, config.holdout, config.seed)
    if not heldout.any():
        raise ValueError("Fine-tuning needs held-out images for early stopping: raise holdout or collect more.")
    optimizer = torch.optim.Adam(sae.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)

    before = evaluate_supervised(sae, activations, block, dictionary, heldout, config)
    history = [{"epoch": 0, "heldout": before}]
    best_loss, best_epoch, best_state = before["total"], 0, copy.deepcopy(sae.state_dict())
    bar = tqdm(range(1, config.epochs + 1), desc=f"fine-tune SAE on {block}", unit="epoch", disable=not progress)
    for epoch in bar:
        train_sums, batches = dict.fromkeys(("total", "reconstruction", "supervision", "decorrelation"), 0.0), 0
        buffers = _buffers(activations, block, ~heldout, generator, config.shards_in_memory)
        on_device = ((tokens.to(device), labels.to(device)) for tokens, labels in buffers)
        for tokens, labels in _batches(on_device, config.batch_size, generator):
            tokens = tokens.float()
            loss = supervised_loss(
                sae, tokens, labels[:, OBJECT], labels[:, STYLE], object_latents, style_latents, config
            )
            optimizer.zero_grad(set_to_none=True)
            loss.total.backward()
            _remove_decoder_parallel_gradient(sae)
            torch.nn.utils.clip_grad_norm_(sae.parameters(), config.max_grad_norm)
            optimizer.step()
            sae.normalize_decoder()
            for name in train_sums:
                train_sums[name] += getattr(loss, name).item()
            batches += 1
        heldout_result = evaluate_supervised(sae, activations, block, dictionary, heldout, config)
        history.append(
            {"epoch": epoch, "train": {k: v / batches for k, v in train_sums.items()}, "heldout": heldout_result}
        )
        bar.set_postfix(heldout=f"{heldout_result['total']:.4f}", best=f"{best_loss:.4f}")
        if heldout_result["total"] < best_loss:
            best_loss, best_epoch, best_state = heldout_result["total"], epoch, copy.deepcopy(sae.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    sae.load_state_dict(best_state)
    report = {
        "block": block,
        "config": asdict(config),
        "dictionary": dictionary.latents,
        "best_epoch": best_epoch,
        "epochs_run": len(history) - 1,
        "heldout_images": int(heldout.sum()),
        "heldout_before": before,
        "heldout_after": history[best_epoch]["heldout"],
        "heldout_fvu_before": evaluate_sae(original, activations, block, heldout)["fvu"],
        "heldout_fvu_after": evaluate_sae(sae, activations, block, heldout)["fvu"],
        "history": history,
    }
    return sae, report


# ---------------------------------------------------------------------------------------------------
# 5. Feature centralisation
# ---------------------------------------------------------------------------------------------------


def centralisation(stats: ConceptStats, dictionary: ConceptDictionary) -> list[dict]:
    """For every concept, the share of its positive time-averaged score mass held by its best latent,
    and whether that latent is the concept's dictionary latent."""
    scores = stats.scores().mean(1)
    rows = []
    for index, (concept, kind) in enumerate(zip(stats.concepts, stats.kinds)):
        positive = scores[index].clamp_min(0)
        mass = float(positive.sum())
        best = int(scores[index].argmax())
        own = dictionary.latents.get(concept)
        rows.append(
            {
                "concept": concept,
                "kind": kind,
                "best_latent": best,
                "best_share": float(positive[best]) / mass if mass > 0 else 0.0,
                "dictionary_latent": own,
                "dictionary_share": float(positive[own]) / mass if mass > 0 and own is not None else 0.0,
                "best_is_dictionary": best == own,
            }
        )
    return rows


def decoder_overlap(sae: Sae, dictionary: ConceptDictionary) -> float:
    """Mean |cosine| between the decoder rows of distinct dictionary latents: near 0 when pushing one
    concept's latent moves only its own direction, near 1 when it moves every concept's."""
    rows = F.normalize(sae.W_dec.detach()[list(dictionary.latents.values())], dim=-1)
    cosines = (rows @ rows.T).abs()
    pairs = max(len(rows) * (len(rows) - 1), 1)
    return float((cosines.sum() - cosines.diagonal().sum()) / pairs)


def centralisation_report(
    variants: Mapping[str, tuple[ConceptStats, ConceptDictionary]],
    block: str | None = None,
    overlaps: Mapping[str, float] | None = None,
) -> dict:
    """Side by side, per concept, for each SAE variant (e.g. "unsupervised" and "supervised"), with a summary
    (and each variant's `decoder_overlap`, where given)."""
    per_variant = {variant: centralisation(stats, dictionary) for variant, (stats, dictionary) in variants.items()}
    concepts = next(iter(variants.values()))[0].concepts
    rows = []
    for index, concept in enumerate(concepts):
        row = {"concept": concept, "kind": next(iter(per_variant.values()))[index]["kind"]}
        for variant, entries in per_variant.items():
            entry = next((e for e in entries if e["concept"] == concept), None)
            row[variant] = (
                {key: value for key, value in entry.items() if key not in ("concept", "kind")} if entry else None
            )
        rows.append(row)
    summary = {
        variant: {
            "mean_best_share": sum(e["best_share"] for e in entries) / max(len(entries), 1),
            "best_is_dictionary": sum(e["best_is_dictionary"] for e in entries),
            "concepts": len(entries),
            "decoder_overlap": (overlaps or {}).get(variant),
        }
        for variant, entries in per_variant.items()
    }
    return {"block": block, "variants": list(variants), "concepts": rows, "summary": summary}


def write_centralisation(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write_json(Path(path), report)


def centralisation_table(report: dict) -> str:
    """The report as a markdown table: best latent's share of the score, and whether it is the dictionary's."""
    variants = report["variants"]
    header = "| concept | kind | " + " | ".join(f"{v} share | {v} = dictionary" for v in variants) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(variants))]
    for row in report["concepts"]:
        cells = [row["concept"], row["kind"]]
        for variant in variants:
            entry = row[variant]
            cells += (
                [f"{entry['best_share']:.2f}", "yes" if entry["best_is_dictionary"] else "no"] if entry else ["", ""]
            )
        lines.append("| " + " | ".join(cells) + " |")
    for variant, summary in report["summary"].items():
        lines.append(
            f"\n{variant}: mean share {summary['mean_best_share']:.2f}, "
            f"best latent is the dictionary latent for {summary['best_is_dictionary']}/{summary['concepts']} concepts"
            + (
                ""
                if summary.get("decoder_overlap") is None
                else f", dictionary latents' decoder rows mean |cos| {summary['decoder_overlap']:.2f}"
            )
        )
    return "\n".join(lines)
