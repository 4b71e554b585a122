"""Tiny Stable-Diffusion-architecture pipelines built in a few lines, as diffusers' own tests do."""

import dataclasses
import os
from pathlib import Path

import pytest
import torch
from diffusers import StableDiffusionPipeline

from saemnesia.minicanvas.data import CANVAS_32
from saemnesia.sae import Sae, SaeConfig
from saemnesia.worlds import MINICANVAS, World, random_pipeline

torch.set_num_threads(1)

BLOCK = "up_blocks.1.attentions.1"

MINICANVAS_32 = dataclasses.replace(
    MINICANVAS,
    name="minicanvas-32",
    model="no-model",
    objects=CANVAS_32.objects,
    styles=CANVAS_32.styles,
    templates=CANVAS_32.templates,
    height=32,
    width=32,
    assets=None,
    examples=("a star in neon style", "zebra picture of a heart", "a house in ocean style", "a polka tree"),
    canvas=CANVAS_32,
)
"""The first MiniCanvas's drawings as a world without assets: 10 objects x 10 styles at a quarter of the cost."""


def two_process_environment() -> dict[str, str]:
    """For `torch.distributed.run` children: this repository first on the path (keeping the caller's),
    one thread each."""
    search_path = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parent.parent), os.environ.get("PYTHONPATH")])
    )
    return {**os.environ, "PYTHONPATH": search_path, "OMP_NUM_THREADS": "1"}


def make_tiny_pipeline() -> StableDiffusionPipeline:
    unet_config = dict(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=16,
    )
    return random_pipeline(unet_config, vae_widths=(16, 32))


def make_tiny_sae(d_in: int = 32, num_latents: int = 256, k: int = 8) -> Sae:
    torch.manual_seed(1)
    return Sae(SaeConfig(d_in=d_in, num_latents=num_latents, k=k))


@pytest.fixture(scope="session")
def tiny_pipeline() -> StableDiffusionPipeline:
    return make_tiny_pipeline()


@pytest.fixture(scope="session")
def tiny_sae() -> Sae:
    return make_tiny_sae()


def make_tiny_world(**changes) -> World:
    """MiniCanvas cut down for the tiny pipeline: 3 objects x 2 styles, 2 steps at 16 x 16, no assets."""
    settings = {
        "name": "tiny",
        "model": "tiny-in-memory",
        "object_block": "up_blocks.1.attentions.0",
        "style_block": "up_blocks.1.attentions.1",
        "objects": ("circle", "square", "star"),
        "styles": ("sunset", "ocean"),
        "steps": 2,
        "height": 16,
        "width": 16,
        "assets": None,
    }
    return dataclasses.replace(MINICANVAS_32, **{**settings, **changes})


def make_tiny_studio():
    """A Studio on the tiny pipeline: 3 objects x 2 styles, SAEs on two blocks with synthetic statistics."""
    from saemnesia.concepts import ConceptStats, build_dictionary
    from saemnesia.generate import sampler_timesteps
    from saemnesia.studio import SaeBundle, Studio

    world = make_tiny_world(
        objects=("star", "circle", "heart"),
        styles=("neon", "sketch"),
        object_block="up_blocks.1.attentions.1",
        style_block="up_blocks.1.attentions.0",
    )
    pipeline = make_tiny_pipeline()
    timesteps = torch.tensor(sampler_timesteps(pipeline, world.steps))
    bundles = {}
    for seed, (method, kind) in enumerate([(m, k) for m in ("saemnesia", "saeuron") for k in ("object", "style")]):
        sae = make_tiny_sae()
        generator = torch.Generator().manual_seed(seed)
        mean_acts = torch.rand(len(world.concepts), len(timesteps), sae.num_latents, generator=generator)
        kinds = [world.kind_of(c) for c in world.concepts]
        stats = ConceptStats(list(world.concepts), kinds, timesteps, mean_acts)
        dictionary = build_dictionary(stats) if method == "saemnesia" else None
        bundles[method, kind] = SaeBundle(sae, world.block_for(kind), stats, dictionary)
    return Studio(world, pipeline, bundles)


@pytest.fixture(scope="session")
def tiny_studio():
    return make_tiny_studio()


def index_tiny_studio(studio, folder: Path) -> None:
    """Collect the tiny studio's world (one seed per prompt) and index its SAEs, as `index-latents` does."""
    from saemnesia.latent_index import ImageTable, LatentIndex, index_latents
    from saemnesia.studio import VARIANT_OF_METHOD
    from saemnesia.train import collect

    activations = collect(
        studio.world, studio.pipeline, folder / "activations", seeds_per_prompt=1, images_per_shard=4, progress=False
    )
    saes = [
        (VARIANT_OF_METHOD[method], bundle.block, bundle.sae, bundle.stats, bundle.dictionary)
        for (method, _), bundle in studio.bundles.items()
    ]
    index_latents(activations, saes, folder / "latents", top=4, progress=False)
    studio.images = ImageTable.load(folder / "latents")
    for (method, _), bundle in studio.bundles.items():
        bundle.index = LatentIndex.load(folder / "latents", VARIANT_OF_METHOD[method], bundle.block)
