"""Worlds: a model, where its SAEs sit, its concepts and prompts, and its sampling defaults.

Nothing else in the package knows which world it runs in. MiniCanvas is the embedded default (all
its weights ship in assets/); Stable Diffusion v1.x loads from a local folder or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from saemnesia.minicanvas import data as minicanvas_data
from saemnesia.minicanvas import model as minicanvas_model

# MiniCanvas's model_index.json names this module for its pixel-space autoencoder: diffusers loads
# a component from a module only once it is imported.
assert minicanvas_model.PixelUnshuffleAutoencoder

ASSETS = Path(__file__).resolve().parent.parent / "assets"

# The published `CompVis/stable-diffusion-v1-4` UNet config, for random-weight models of SD's shape.
SD_V14_UNET_CONFIG = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

# UnlearnCanvas's 20 objects, the concepts of the paper's object table.
UNLEARNCANVAS_OBJECTS = (
    "architectures", "bears", "birds", "butterfly", "cats", "dogs", "fishes", "flame", "flowers", "frogs",
    "horses", "human", "jellyfish", "rabbits", "sandwiches", "sea", "statues", "towers", "trees", "waters",
)  # fmt: skip


@dataclass(frozen=True)
class World:
    """Everything world-specific, as data."""

    name: str
    model: str
    """A local diffusers folder or a hub id."""
    object_block: str
    style_block: str
    objects: tuple[str, ...]
    styles: tuple[str, ...]
    templates: tuple[str, ...]
    steps: int
    guidance: float
    height: int
    width: int
    assets: Path | None = None
    """Folder of this world's SAEs, statistics, dictionaries, classifier and cached results."""
    examples: tuple[str, ...] = field(default_factory=tuple)

    @property
    def concepts(self) -> tuple[str, ...]:
        return self.objects + self.styles

    def kind_of(self, concept: str) -> str:
        return "object" if concept in self.objects else "style"

    def block_for(self, kind: str) -> str:
        return self.object_block if kind == "object" else self.style_block

    def sae_folder(self, variant: str, kind: str) -> Path:
        """`assets/<world>/sae/<supervised|unsupervised>/<hook point>/`, sparsify's layout per hook point."""
        return self.assets / "sae" / variant / self.block_for(kind)

    def prompt(self, object_name: str, style: str, template: str | None = None) -> str:
        return (template or self.templates[0]).format(object=object_name, style=style)


MINICANVAS = World(
    name="minicanvas",
    model=str(ASSETS / "minicanvas" / "model"),
    object_block="up_blocks.1.attentions.1",
    style_block="up_blocks.1.attentions.0",
    objects=minicanvas_data.OBJECTS,
    styles=minicanvas_data.STYLES,
    templates=minicanvas_data.TEMPLATES,
    steps=20,
    guidance=5.0,
    height=minicanvas_data.IMAGE_SIZE,
    width=minicanvas_data.IMAGE_SIZE,
    assets=ASSETS / "minicanvas",
    examples=("a star in neon style", "zebra picture of a heart", "a house in ocean style", "a polka tree"),
)


def stable_diffusion_world(model: str = "CompVis/stable-diffusion-v1-4", assets: Path | None = None) -> World:
    """SD v1.x with UnlearnCanvas's concepts and the paper's hook points and sampling settings."""
    return World(
        name="sd",
        model=model,
        object_block="up_blocks.1.attentions.1",
        style_block="up_blocks.1.attentions.2",
        objects=UNLEARNCANVAS_OBJECTS,
        styles=(),
        templates=("A {object} image in {style} style.", "A photo of {object}."),
        steps=50,
        guidance=9.0,
        height=512,
        width=512,
        assets=assets,
        examples=("A photo of cats.", "A painting of horses by the sea."),
    )


WORLDS = {"minicanvas": MINICANVAS, "sd": stable_diffusion_world()}


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_pipeline(source: str, device: str | None = None, dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Load a Stable-Diffusion-architecture pipeline from a folder or hub id: fp16 on CUDA, fp32 on CPU.

    Hub ids need a network; nothing is downloaded for a local folder. Weights load from safetensors only.
    """
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    path = Path(source)
    if not path.exists() and (source.startswith((".", "/")) or source.count("/") != 1):
        raise FileNotFoundError(f"Model folder '{source}' does not exist: give a diffusers folder or a hub id.")
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"'{source}' has no model_index.json: it is not a diffusers pipeline folder.")
    pipeline = StableDiffusionPipeline.from_pretrained(
        source, torch_dtype=dtype, use_safetensors=True, safety_checker=None, requires_safety_checker=False
    )
    if not isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
