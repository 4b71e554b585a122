"""A prepared world in one command: the model and the published SAEs fetched, their statistics taken.

    python -m saemnesia prepare --world sd [--model sd14] [--sae-source unsupervised=FOLDER_OR_HUB_ID] [--out DIR]

The SD world erases with the SAEs the papers published (SAeUron's and SAEmnesia's), but the edit and the
app need each SAE's concept statistics and dictionary on the model in use, which no one publishes. This
chains what `collect`, `stats` and `index-latents` do by hand, with the same library functions: fetch the model
and the SAEs from the hub, collect the hook points' activations on every object x style prompt, take each SAE's
statistics and dictionary, index its latents for the explorer, and delete the activations. It measures what one
image costs on this machine first and says how long the whole will take. Resumable: a rerun keeps the SAEs
fetched (unless given another source), the shards collected and the statistics taken, and a finished folder
(with `prepared.json`) is left as it is.

`app.py --world sd` runs it on its first start when the folder is missing.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.generate import check_sae_fits
from saemnesia.hooks import hooked_block
from saemnesia.latent_index import IMAGES_FILE, index_latents
from saemnesia.sae import WEIGHTS_FILE, Sae, load_sae
from saemnesia.studio import DICTIONARY_FILE, LATENTS_FOLDER, LIMITS, STATS_FILE
from saemnesia.train import collect, labelled_prompts, write_stats
from saemnesia.worlds import World, load_pipeline

MARKER = "prepared.json"
"""Written last, with the settings and the time taken: a folder that has it is prepared."""
ACTIVATIONS = "activations"
"""The collection's folder inside the prepared one, deleted once the statistics are taken (float16 tokens of
two hook points: about 13 GB for SD at the defaults, 1,000 images x 10 steps)."""
STEPS = 10
"""Sampler steps of the collection. Statistics are looked up by timestep, so a 50-step generation uses the
nearest of these ten; 50 here would match the paper's collection and take five times the time and disk."""
SEEDS_RANGE = (1, 64)
SOURCE_FILE = "source.txt"
"""Beside each fetched SAE: the hub id or folder it came from."""
STATS_BATCH = 4096
"""Tokens per SAE encoding when timing the statistics, as `compute_stats` batches them."""


def is_prepared(folder: str | Path) -> bool:
    """Whether `prepare` finished in `folder` (its marker is there and reads)."""
    try:
        json.loads((Path(folder) / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return True


def assets_folder(source: str) -> Path:
    """A world's assets folder from `--assets`: a local path, or a hub repository holding a prepared folder
    (uploaded from a `prepare` run; on a Space, listed in `preload_from_hub` so it is there at start)."""
    path = Path(source)
    if path.exists() or source.startswith((".", "/")) or source.count("/") != 1:
        return path
    from huggingface_hub import snapshot_download

    folder = Path(snapshot_download(source))
    if not is_prepared(folder):
        raise FileNotFoundError(
            f"The hub repository '{source}' holds no prepared world (no {MARKER}): upload the folder "
            "`python -m saemnesia prepare` made, or give a local folder."
        )
    return folder


def sae_sources(world: World, overrides: Mapping[str, str] | None = None) -> list[tuple[str, str, str]]:
    """(variant, kind, source) of the SAEs to prepare: the world's published ones, a variant's source replaced
    where `overrides` names one (`{"unsupervised": "path/to/my-saes"}`)."""
    if not world.published_saes:
        raise ValueError(f"World '{world.name}' ships its SAEs and statistics: there is nothing to prepare.")
    overrides = dict(overrides or {})
    variants = sorted({variant for variant, _, _ in world.published_saes})
    unknown = sorted(set(overrides) - set(variants))
    if unknown:
        raise ValueError(
            f"Unknown SAE variant(s) {', '.join(unknown)}: give VARIANT=SOURCE, VARIANT one of {', '.join(variants)}."
        )
    return [(variant, kind, overrides.get(variant, source)) for variant, kind, source in world.published_saes]


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def _elapsed(started: float, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


@torch.no_grad()
def seconds_per_image(
    pipeline: StableDiffusionPipeline, world: World, saes: Sequence[tuple[Sae, str]], images: int
) -> float:
    """What one collected image costs on this machine, statistics included: a batch of `images` timed at the
    world's sampling (after a one-step warm-up that also reads each hook point's token grid), then each SAE
    timed encoding as many tokens as the batch yields."""
    prompts = [prompt.text for prompt in labelled_prompts(world)[:images]]
    settings = {"guidance_scale": world.guidance, "height": world.height, "width": world.width}
    with ExitStack() as stack:
        blocks = dict.fromkeys(block for _, block in saes)
        hooks = {block: stack.enter_context(hooked_block(pipeline.unet, block, record=True)) for block in blocks}
        pipeline(prompt=prompts[:1], num_inference_steps=1, output_type="latent", **settings)
    started = time.perf_counter()
    pipeline(prompt=prompts, num_inference_steps=world.steps, output_type="latent", **settings)
    seconds = _elapsed(started, pipeline.device)
    for sae, block in saes:
        grid = hooks[block].outputs[0][-1].flatten(1).T.float()  # one image's tokens at one step
        tokens = grid.repeat(max(1, STATS_BATCH // len(grid)), 1)
        batches = -(-len(prompts) * world.steps * len(grid) // len(tokens))
        started = time.perf_counter()
        for _ in range(batches):
            sae.encode(tokens)
        seconds += _elapsed(started, sae.W_dec.device)
    return seconds / len(prompts)


def _fetched_from(folder: Path) -> str | None:
    """The source an SAE folder was fetched from, so that a rerun with another one fetches again."""
    path = folder / SOURCE_FILE
    return path.read_text().strip() if path.is_file() else None


def _done(folder: Path) -> bool:
    return (folder / STATS_FILE).is_file() and (folder / DICTIONARY_FILE).is_file()


def prepare(
    world: World,
    out: str | Path | None = None,
    overrides: Mapping[str, str] | None = None,
    seeds_per_prompt: int = 1,
    steps: int = STEPS,
    images_per_shard: int = 8,
    device: str | None = None,
    keep_activations: bool = False,
    progress: bool = True,
) -> Path:
    """Fetch `world`'s model and SAEs and take their statistics and dictionaries into `out` (default: the
    world's assets folder), where `Studio.load` finds them. `progress` shows the plan, the measured
    estimate and the bars. Returns the folder."""
    out = Path(out or world.assets)
    sources = sae_sources(world, overrides)
    for name, value, (low, high) in (
        ("steps", steps, LIMITS["steps"]),
        ("seeds_per_prompt", seeds_per_prompt, SEEDS_RANGE),
    ):
        if not low <= value <= high:
            raise ValueError(f"{name} must be in [{low}, {high}], got {value}.")
    if images_per_shard < 1:
        raise ValueError(f"images_per_shard must be at least 1, got {images_per_shard}.")
    say = _say if progress else lambda message: None
    if is_prepared(out):
        say(f"The {world.name} world is prepared in {out} already (delete its {MARKER} to prepare it again).")
        return out
    world = replace(world, assets=out)
    collection = replace(world, steps=steps)
    images = len(labelled_prompts(world)) * seeds_per_prompt
    started = time.perf_counter()
    say(
        f"The {world.name} world is not prepared for {world.model} in {out}: preparing it (once), "
        f"starting with the model and {len(sources)} SAEs."
    )
    pipeline = load_pipeline(world.model, device=device)
    saes = []
    for variant, kind, source in sources:
        block = world.block_for(kind)
        folder = world.sae_folder(variant, kind)
        if not (folder / WEIGHTS_FILE).is_file() or _fetched_from(folder) != source:
            for stale in (STATS_FILE, DICTIONARY_FILE):
                (folder / stale).unlink(missing_ok=True)
            load_sae(source, block).save(folder)
            (folder / SOURCE_FILE).write_text(source + "\n")
        sae = Sae.load(folder, str(pipeline.device))
        check_sae_fits(pipeline, sae, block)
        saes.append((sae, block, folder, variant))
    pending = [(sae, block, folder) for sae, block, folder, _ in saes if not _done(folder)]
    indexed = (out / LATENTS_FOLDER / f"{IMAGES_FILE}.json").is_file()
    per_image = None
    if pending or not indexed:
        per_image = seconds_per_image(
            pipeline, collection, [(sae, block) for sae, block, _ in pending], images_per_shard
        )
        say(
            f"Measured here: {per_image:.2f} s per image. Collecting {images} images at {steps} steps and taking "
            f"{len(pending)} SAEs' statistics will take about {_duration(per_image * images)} "
            "(less if a run before this one got part of the way)."
        )
        activations = collect(
            collection,
            pipeline,
            out / ACTIVATIONS,
            seeds_per_prompt=seeds_per_prompt,
            images_per_shard=images_per_shard,
            progress=progress,
        )
        for sae, block, folder in pending:
            write_stats(sae, activations, block, folder, progress=progress)
        index_latents(
            activations,
            [
                (
                    variant,
                    block,
                    sae,
                    ConceptStats.load(folder / STATS_FILE),
                    ConceptDictionary.load(folder / DICTIONARY_FILE) if variant == "supervised" else None,
                )
                for sae, block, folder, variant in saes
            ],
            out / LATENTS_FOLDER,
            progress=progress,
        )
    if not keep_activations:
        shutil.rmtree(out / ACTIVATIONS, ignore_errors=True)
    record = {
        "world": world.name,
        "model": world.model,
        "saes": [{"variant": v, "kind": k, "source": s, "block": world.block_for(k)} for v, k, s in sources],
        "steps": steps,
        "seeds_per_prompt": seeds_per_prompt,
        "images": images,
        "seconds_per_image": per_image,
        "seconds": round(time.perf_counter() - started, 1),
        "device": str(pipeline.device),
    }
    (out / MARKER).write_text(json.dumps(record, indent=1) + "\n")
    say(f"Prepared in {_duration(record['seconds'])}: {out}")
    return out
