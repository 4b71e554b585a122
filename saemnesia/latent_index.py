"""The latent index: for every latent of an SAE, what makes it fire, read once off a collection.

Per latent: its top activating images (collection image, the step it peaks at, and its token map averaged over
the steps, so a page shows each image with its heatmap without generating anything), how often it fires, its
mean and largest activation, a histogram of its activations, the concept its score ties it to (and the
dictionary's binding, for a supervised SAE) and its nearest latents by decoder direction. The collection's images
are kept as thumbnails beside the indexes (`ImageTable`), once for every SAE of the world.

A world's indexes live in `assets/<world>/latents/`: `images.safetensors` + `images.json`, and per SAE
`<variant>--<block>.safetensors` + `.json`. Made by `python -m saemnesia index-latents`, resumable shard by
shard; safetensors and JSON only.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.sae import Sae
from saemnesia.train.activations import IMAGE, Activations, write_json
from saemnesia.worlds import portable_name

TOP_IMAGES = 8
"""Images kept per latent."""
NEAREST = 6
"""Nearest latents kept per latent, by the cosine of their decoder rows."""
HISTOGRAM_EDGES = torch.logspace(-3, 3, 49)
"""Activation bins, log-spaced over six decades: a latent's activations, wherever it fires, counted in them."""
IMAGES_FILE = "images"
CHECKPOINT_EVERY = 8
"""Shards between saves of a run's partial state."""


def index_name(variant: str, block: str) -> str:
    return f"{variant}--{block}"


@dataclass
class LatentIndex:
    """One SAE's index (see the module's docstring); tensors are indexed by latent."""

    block: str
    variant: str
    grid: tuple[int, int]
    """The block's token grid, (height, width)."""
    top_images: Tensor
    """[L, M] collection image ids, best first; -1 where the latent fired on fewer than M images."""
    top_activations: Tensor
    """[L, M] each image's score: the latent's largest activation over the image's tokens, averaged over the
    sampling steps."""
    top_steps: Tensor
    """[L, M] the sampler step where that largest activation peaks."""
    top_maps: Tensor
    """[L, M, h*w] float16: the latent's activation on every token of the image, averaged over the steps."""
    fire_counts: Tensor
    """[L] tokens (over every image and step) where the latent is among the top k and above zero."""
    activation_sums: Tensor
    """[L] the sum of its activations there."""
    max_activations: Tensor
    """[L]"""
    histogram: Tensor
    """[L, len(HISTOGRAM_EDGES) - 1] counts of its activations in `HISTOGRAM_EDGES`' bins."""
    nearest: Tensor
    """[L, NEAREST] latents whose decoder rows point the most the same way, nearest first."""
    nearest_cosine: Tensor
    """[L, NEAREST]"""
    concepts: list[dict]
    """Per latent: `{"concept", "score"}`, the concept of the highest time-averaged score, and `"bound"`: the
    concept the SAEmnesia dictionary binds to this latent, if any."""
    tokens: int
    """Tokens read: the denominator of `fire_counts`."""
    about: dict
    """How it was made: collection, settings, time."""

    @property
    def num_latents(self) -> int:
        return len(self.fire_counts)

    def density(self) -> Tensor:
        """[L] the share of tokens on which each latent fires."""
        return self.fire_counts.double() / max(1, self.tokens)

    def mean_activation(self) -> Tensor:
        """[L] each latent's mean activation where it fires (0 where it never does)."""
        return (self.activation_sums / self.fire_counts.clamp_min(1)).float()

    def check_latent(self, latent: object) -> int:
        if isinstance(latent, bool) or not isinstance(latent, int) or not 0 <= latent < self.num_latents:
            raise ValueError(f"latent must be an integer in [0, {self.num_latents - 1}], got {latent!r}.")
        return latent

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = index_name(self.variant, self.block)
        tensors = {
            field: getattr(self, field).contiguous()
            for field in (
                "top_images", "top_activations", "top_steps", "top_maps", "fire_counts", "activation_sums",
                "max_activations", "histogram", "nearest", "nearest_cosine",
            )
        }  # fmt: skip
        save_file(tensors, str(folder / f"{name}.safetensors"))
        meta = {
            "block": self.block,
            "variant": self.variant,
            "grid": list(self.grid),
            "tokens": self.tokens,
            "histogram_edges": HISTOGRAM_EDGES.tolist(),
            "concepts": self.concepts,
            "about": self.about,
        }
        write_json(folder / f"{name}.json", meta)

    @classmethod
    def load(cls, folder: Path, variant: str, block: str) -> LatentIndex:
        name = index_name(variant, block)
        remake = f"make it with `python -m saemnesia index-latents` (SAE {variant}, block {block})"
        paths = [folder / f"{name}.safetensors", folder / f"{name}.json"]
        if not all(path.is_file() for path in paths):
            raise FileNotFoundError(f"No latent index for the {variant} SAE on {block} in '{folder}': {remake}.")
        try:
            tensors = load_file(paths[0])
            meta = json.loads(paths[1].read_text())
            return cls(
                meta["block"],
                meta["variant"],
                tuple(meta["grid"]),
                **tensors,
                concepts=meta["concepts"],
                tokens=meta["tokens"],
                about=meta["about"],
            )
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(f"'{paths[0]}' is not a readable latent index ({error!r}): {remake}.") from error


@dataclass
class ImageTable:
    """The collection's images an index shows: thumbnails and what made them."""

    ids: Tensor
    """[N] collection image ids, ascending."""
    thumbnails: Tensor
    """[N, h, w, 3] uint8"""
    prompts: list[str]
    seeds: list[int]

    def row(self, image_id: int) -> int:
        position = int(torch.searchsorted(self.ids, image_id))
        if position >= len(self.ids) or int(self.ids[position]) != image_id:
            raise KeyError(f"Image {image_id} is not in the index's image table.")
        return position

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        save_file({"ids": self.ids, "thumbnails": self.thumbnails}, str(folder / f"{IMAGES_FILE}.safetensors"))
        write_json(folder / f"{IMAGES_FILE}.json", {"prompts": self.prompts, "seeds": self.seeds})

    @classmethod
    def load(cls, folder: Path) -> ImageTable:
        try:
            tensors = load_file(folder / f"{IMAGES_FILE}.safetensors")
            meta = json.loads((folder / f"{IMAGES_FILE}.json").read_text())
            return cls(tensors["ids"], tensors["thumbnails"], meta["prompts"], meta["seeds"])
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as error:
            raise ValueError(
                f"'{folder}' holds no readable image table of a latent index ({error!r}): make it again with "
                "`python -m saemnesia index-latents`."
            ) from error


class PageImage(NamedTuple):
    """One of a latent's top images: its thumbnail, the latent's token map there and where it came from."""

    thumbnail: Image.Image
    activation_map: Tensor
    """[h, w]"""
    activation: float
    prompt: str
    seed: int
    step: int


class LatentPage(NamedTuple):
    """What the explorer shows of one latent."""

    latent: int
    block: str
    concept: dict
    density: float
    mean_activation: float
    max_activation: float
    histogram: list[tuple[float, int]]
    """(lower bin edge, count) of the bins it fired in."""
    nearest: list[tuple[int, float, str]]
    """(latent, decoder cosine, the concept it is tied to)"""
    images: list[PageImage]

    def summary(self) -> dict:
        """The page as JSON-ready data, images by prompt and seed."""
        return {
            "latent": self.latent,
            "block": self.block,
            "concept": self.concept,
            "density": self.density,
            "mean_activation": round(self.mean_activation, 4),
            "max_activation": round(self.max_activation, 4),
            "nearest": [{"latent": n, "cosine": round(c, 3), "concept": name} for n, c, name in self.nearest],
            "top_images": [
                {"prompt": i.prompt, "seed": i.seed, "step": i.step, "activation": round(i.activation, 4)}
                for i in self.images
            ],
        }


def latent_page(index: LatentIndex, images: ImageTable, latent: int) -> LatentPage:
    """The latent's page, from the index alone (nothing is generated)."""
    latent = index.check_latent(latent)
    height, width = index.grid
    shown = []
    for slot, image in enumerate(index.top_images[latent].tolist()):
        if image < 0:
            continue
        row = images.row(image)
        shown.append(
            PageImage(
                Image.fromarray(images.thumbnails[row].numpy()),
                index.top_maps[latent, slot].float().view(height, width),
                float(index.top_activations[latent, slot]),
                images.prompts[row],
                images.seeds[row],
                int(index.top_steps[latent, slot]),
            )
        )
    counts = index.histogram[latent].tolist()
    return LatentPage(
        latent,
        index.block,
        index.concepts[latent],
        float(index.density()[latent]),
        float(index.mean_activation()[latent]),
        float(index.max_activations[latent]),
        [(float(HISTOGRAM_EDGES[b]), count) for b, count in enumerate(counts) if count],
        [
            (n, float(c), index.concepts[n]["concept"])
            for n, c in zip(index.nearest[latent].tolist(), index.nearest_cosine[latent].tolist())
        ],
        shown,
    )


class _Accumulator:
    """The running totals of one SAE's pass over the collection, saved between shards to resume."""

    FIELDS = (
        "top_images", "top_activations", "top_steps", "top_maps", "fire_counts", "activation_sums",
        "max_activations", "histogram",
    )  # fmt: skip

    def __init__(self, num_latents: int, tokens_per_image: int, top: int):
        self.top_images = torch.full((num_latents, top), -1, dtype=torch.long)
        self.top_activations = torch.full((num_latents, top), -1.0)
        self.top_steps = torch.zeros(num_latents, top, dtype=torch.long)
        self.top_maps = torch.zeros(num_latents, top, tokens_per_image, dtype=torch.float16)
        self.fire_counts = torch.zeros(num_latents, dtype=torch.long)
        self.activation_sums = torch.zeros(num_latents, dtype=torch.float64)
        self.max_activations = torch.zeros(num_latents)
        self.histogram = torch.zeros(num_latents, len(HISTOGRAM_EDGES) - 1, dtype=torch.long)
        self.tokens = 0

    def state(self) -> dict[str, Tensor]:
        return {name: getattr(self, name).contiguous() for name in self.FIELDS}

    def restore(self, tensors: dict[str, Tensor], tokens: int) -> None:
        for name in self.FIELDS:
            setattr(self, name, tensors[name])
        self.tokens = tokens

    @torch.no_grad()
    def add(self, sae: Sae, tokens: Tensor, labels: Tensor, chunk: int = 8192) -> None:
        """Read one shard: `tokens` [images x steps, h*w, d] and their labels (image-major, then step)."""
        rows, per_image, _ = tokens.shape
        num_latents, top = self.top_images.shape
        acts, indices = [], []
        flat = tokens.reshape(-1, tokens.shape[-1])
        for start in range(0, len(flat), chunk):
            encoded = sae.encode(flat[start : start + chunk].float())
            acts.append(encoded.top_acts.float())
            indices.append(encoded.top_indices)
        acts, indices = torch.cat(acts), torch.cat(indices)  # [rows * h*w, k]
        fired = acts > 0
        fired_latents, fired_acts = indices[fired], acts[fired]
        self.fire_counts += torch.bincount(fired_latents, minlength=num_latents)
        self.activation_sums.index_add_(0, fired_latents, fired_acts.double())
        self.max_activations = torch.maximum(
            self.max_activations,
            torch.zeros(num_latents).scatter_reduce(0, fired_latents, fired_acts, "amax"),
        )
        bins = (torch.bucketize(fired_acts, HISTOGRAM_EDGES) - 1).clamp(0, len(HISTOGRAM_EDGES) - 2)
        self.histogram += torch.bincount(
            fired_latents * (len(HISTOGRAM_EDGES) - 1) + bins, minlength=self.histogram.numel()
        ).view_as(self.histogram)
        self.tokens += len(flat)

        # Each latent's largest activation over each image's tokens at each step; an image's score is its mean over
        # the steps, so the top images are those it fires on all along the trajectory, not only in the first steps.
        row_of_token = torch.arange(rows).repeat_interleave(per_image * acts.shape[-1]).view_as(acts)
        per_row = torch.zeros(rows * num_latents).scatter_reduce(
            0, (row_of_token * num_latents + indices).flatten(), acts.flatten(), "amax"
        )
        images, image_rows = torch.unique_consecutive(labels[:, IMAGE], return_counts=True)
        steps = int(image_rows[0])
        per_step = per_row.view(len(images), steps, num_latents)
        score, peak_step = per_step.mean(1), per_step.argmax(1)  # [images, L]
        candidates = torch.cat([self.top_activations, score.t()], 1)  # [L, M + images]
        values, order = candidates.topk(top, dim=1)
        from_shard = order >= top
        image_position = (order - top).clamp_min(0)
        new_images = images[image_position]
        new_steps = peak_step.t().gather(1, image_position)
        # The token maps, averaged over the steps, of the entries from this shard, in vectorised chunks.
        latent_ids = torch.arange(num_latents).unsqueeze(1).expand(-1, top)[from_shard]
        image_rows = image_position[from_shard].unsqueeze(1) * steps + torch.arange(steps)  # [entries, steps]
        token_acts, token_indices = acts.view(rows, per_image, -1), indices.view(rows, per_image, -1)
        new_maps = torch.empty(len(latent_ids), per_image)
        chunk = max(1, 2**22 // (steps * per_image * acts.shape[-1]))
        for start in range(0, len(latent_ids), chunk):
            part = slice(start, start + chunk)
            hits = token_indices[image_rows[part]] == latent_ids[part, None, None, None]
            new_maps[part] = (token_acts[image_rows[part]] * hits).sum(-1).mean(1)
        kept_maps = self.top_maps.gather(1, order.clamp_max(top - 1).unsqueeze(-1).expand(-1, -1, per_image))
        kept_maps[from_shard] = new_maps.half()
        self.top_maps = kept_maps
        self.top_images = torch.where(from_shard, new_images, self.top_images.gather(1, order.clamp_max(top - 1)))
        self.top_steps = torch.where(from_shard, new_steps, self.top_steps.gather(1, order.clamp_max(top - 1)))
        self.top_activations = values


def nearest_latents(sae: Sae, count: int = NEAREST, chunk: int = 2048) -> tuple[Tensor, Tensor]:
    """[L, count] each latent's nearest others by the cosine of their decoder rows, and those cosines."""
    rows = torch.nn.functional.normalize(sae.W_dec.detach().float(), dim=1)
    count = min(count, len(rows) - 1)
    nearest, cosines = [], []
    for start in range(0, len(rows), chunk):
        similarity = rows[start : start + chunk] @ rows.t()
        similarity[torch.arange(len(similarity)), torch.arange(start, start + len(similarity))] = -2.0
        values, indices = similarity.topk(count, dim=1)
        nearest.append(indices)
        cosines.append(values)
    return torch.cat(nearest), torch.cat(cosines)


def concept_ties(stats: ConceptStats, dictionary: ConceptDictionary | None) -> list[dict]:
    """Per latent, the concept whose time-averaged score is highest there, and the dictionary's binding."""
    scores = stats.scores().mean(1)  # [C, L]
    best, which = scores.max(0)
    bound = {latent: concept for concept, latent in (dictionary.latents.items() if dictionary else ())}
    return [
        {"concept": stats.concepts[int(c)], "score": round(float(s), 6), "bound": bound.get(latent)}
        for latent, (s, c) in enumerate(zip(best, which))
    ]


def _image_table(activations: Activations, wanted: Tensor) -> ImageTable:
    """The thumbnails and prompts of the collection images in `wanted` (ids)."""
    wanted = torch.unique(wanted[wanted >= 0])
    settings = activations.settings
    prompts = [prompt["text"] for prompt in settings["prompts"]]
    thumbnails = []
    for shard in range(activations.num_shards):
        ids, images = activations.load_images(shard)
        keep = torch.isin(ids, wanted)
        thumbnails.append(images[keep])
    return ImageTable(
        wanted,
        torch.cat(thumbnails),
        [prompts[int(i) % len(prompts)] for i in wanted],
        [settings["first_seed"] + int(i) for i in wanted],
    )


def _partial_paths(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.partial.safetensors", folder / f"{name}.partial.json"


def index_latents(
    activations: Activations,
    saes: Sequence[tuple[str, str, Sae, ConceptStats, ConceptDictionary | None]],
    out: Path,
    top: int = TOP_IMAGES,
    progress: bool = True,
) -> dict:
    """Index every SAE in `saes` — (variant, block, SAE, statistics, dictionary or None) — on one pass per SAE
    over the collection, and save the indexes and the image table in `out`. Returns a summary with the time.

    Resumable: every `CHECKPOINT_EVERY` shards an SAE's running totals are saved beside the output, and a rerun
    continues from them (a finished index is kept and skipped).
    """
    began = time.time()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if not activations.has_images:
        raise ValueError(
            f"The collection in '{activations.folder}' keeps no images, which the index shows: collect it again "
            "(`python -m saemnesia collect` now stores each image's thumbnail)."
        )
    wanted, summary = [], {}
    for variant, block, sae, stats, dictionary in saes:
        name = index_name(variant, block)
        if (out / f"{name}.json").is_file():
            index = LatentIndex.load(out, variant, block)
            wanted.append(index.top_images.flatten())
            summary[name] = {"skipped": "already indexed"}
            continue
        per_image = activations.tokens_per_image(block)
        side = int(round(per_image**0.5))
        accumulator = _Accumulator(sae.num_latents, per_image, top)
        tensors_path, state_path = _partial_paths(out, name)
        done = 0
        if state_path.is_file():
            state = json.loads(state_path.read_text())
            accumulator.restore(load_file(tensors_path), state["tokens"])
            done = state["shards"]
        bar = tqdm(total=activations.num_shards, initial=done, desc=name, unit="shard", disable=not progress)
        for shard in range(done, activations.num_shards):
            tokens, labels = activations.load(shard, block)
            accumulator.add(sae, tokens, labels)
            bar.update()
            if (shard + 1) % CHECKPOINT_EVERY == 0 and shard + 1 < activations.num_shards:
                save_file(accumulator.state(), str(tensors_path))
                write_json(state_path, {"shards": shard + 1, "tokens": accumulator.tokens})
        bar.close()
        empty = accumulator.top_activations <= 0
        accumulator.top_images[empty] = -1
        nearest, cosines = nearest_latents(sae)
        index = LatentIndex(
            block,
            variant,
            (side, per_image // side),
            **accumulator.state(),
            nearest=nearest,
            nearest_cosine=cosines,
            concepts=concept_ties(stats, dictionary),
            tokens=accumulator.tokens,
            about={
                "collection_images": activations.num_images,
                "steps": activations.settings["steps"],
                "model": portable_name(activations.settings["model"]),
            },
        )
        index.save(out)
        for path in (tensors_path, state_path):
            path.unlink(missing_ok=True)
        wanted.append(index.top_images.flatten())
        summary[name] = {"latents": index.num_latents, "firing": int((index.fire_counts > 0).sum())}
    table = _image_table(activations, torch.cat(wanted))
    table.save(out)
    return {"indexes": summary, "images": len(table.ids), "seconds": round(time.time() - began, 1)}
