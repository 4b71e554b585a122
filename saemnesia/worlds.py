"""Worlds: a model, where its SAEs sit, its concepts and prompts, and its sampling defaults.

Nothing else in the package knows which world it runs in. MiniCanvas is the embedded default (all
its weights ship in assets/); Stable Diffusion v1.x loads from a local folder or a hub id, and its
statistics are made on first use by `python -m saemnesia prepare` (saemnesia/prepare.py), one folder
per model.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from safetensors import SafetensorError

from saemnesia.erase import PER_RULE, ReplaceRule
from saemnesia.minicanvas import data as minicanvas_data
from saemnesia.minicanvas import model as minicanvas_model

ASSETS = Path(__file__).resolve().parent.parent / "assets"

COMPONENT_CODE = {minicanvas_model.AUTOENCODER_MODULE: minicanvas_model.autoencoder_code}
"""The code a model folder may carry for a component (diffusers' custom-component layout: `<component>/<module>.py`,
which plain diffusers loads with `trust_remote_code=True`), by module: the package's own, so that loading a folder
runs no code but ours."""

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

# UnlearnCanvas's 20 objects and 50 styles, spelled as its code spells them (the names its classifiers,
# SAeUron's and SAEmnesia's lists use); prompts read an underscore as a space ("Artist Sketch").
UNLEARNCANVAS_OBJECTS = (
    "Architectures", "Bears", "Birds", "Butterfly", "Cats", "Dogs", "Fishes", "Flame", "Flowers", "Frogs",
    "Horses", "Human", "Jellyfish", "Rabbits", "Sandwiches", "Sea", "Statues", "Towers", "Trees", "Waterfalls",
)  # fmt: skip
UNLEARNCANVAS_STYLES = (
    "Abstractionism", "Artist_Sketch", "Blossom_Season", "Bricks", "Byzantine", "Cartoon", "Cold_Warm",
    "Color_Fantasy", "Comic_Etch", "Crayon", "Cubism", "Dadaism", "Dapple", "Defoliation", "Early_Autumn",
    "Expressionism", "Fauvism", "French", "Glowing_Sunset", "Gorgeous_Love", "Greenfield", "Impressionism",
    "Ink_Art", "Joy", "Liquid_Dreams", "Magic_Cube", "Meta_Physics", "Meteor_Shower", "Monet", "Mosaic",
    "Neon_Lines", "On_Fire", "Pastel", "Pencil_Drawing", "Picasso", "Pop_Art", "Red_Blue_Ink", "Rust", "Sketch",
    "Sponge_Dabbed", "Structuralism", "Superstring", "Surrealism", "Ukiyoe", "Van_Gogh", "Vibrant_Flow",
    "Warm_Love", "Warm_Smear", "Watercolor", "Winter",
)  # fmt: skip
UNLEARNCANVAS_TEMPLATE = "A {object} image in {style} style."

SD_MODELS = {"sd14": "CompVis/stable-diffusion-v1-4", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
"""Short names for the published Stable Diffusion v1.x checkpoints. The UnlearnCanvas fine-tune
("style50") is not on the hub in diffusers form: give its local folder."""
SD_PUBLISHED_SAES = (
    ("unsupervised", "object", "bcywinski/SAeUron"),
    ("unsupervised", "style", "bcywinski/SAeUron"),
    ("supervised", "object", "leno3003/SAEmnesia"),
)
"""(variant, kind, hub id) of the SAEs the papers published for SD's hook points: SAeUron's unsupervised ones at
both, SAEmnesia's supervised one for objects (its dictionary ships only as a pickle: ours is rebuilt from the
statistics)."""
SD_EVAL_STEPS = 100
"""The paper's evaluation sampling (UnlearnCanvas protocol); the world's `steps` (50) are for demos and
for collecting activations, as SAeUron collects them."""


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
    published_saes: tuple[tuple[str, str, str], ...] = ()
    """(variant, kind, hub id or folder) of the SAEs `prepare` fetches. A world that has them is prepared on
    first use, into a folder per model, instead of shipping its assets."""
    canvas: minicanvas_data.Canvas | None = None
    """The procedural drawings a MiniCanvas world's model, classifier and artifact detector learn from."""
    replace_rule: ReplaceRule = PER_RULE
    """How `replace` erases in this world, chosen on its tuning seed (`compare-replacements`, docs/per.md)."""

    @property
    def concepts(self) -> tuple[str, ...]:
        return self.objects + self.styles

    def kind_of(self, concept: str) -> str:
        return "object" if concept in self.objects else "style"

    def concepts_of(self, kind: str) -> tuple[str, ...]:
        return self.objects if kind == "object" else self.styles

    def block_for(self, kind: str) -> str:
        return self.object_block if kind == "object" else self.style_block

    def sae_folder(self, variant: str, kind: str, block: str | None = None) -> Path:
        """`assets/<world>/sae/<supervised|unsupervised>/<hook point>/`, sparsify's layout per hook point
        (the world's hook point for `kind` unless `block` names another)."""
        return self.assets / "sae" / variant / (block or self.block_for(kind))

    def prompt(self, object_name: str, style: str, template: str | None = None) -> str:
        """Concept names with underscores read with spaces, as UnlearnCanvas writes `Artist_Sketch`."""
        return (template or self.templates[0]).format(
            object=object_name.replace("_", " "), style=style.replace("_", " ")
        )

    def on_model(self, model: str) -> World:
        """This world on another model. A prepared world's folder follows the model, since statistics and
        dictionaries belong to the model they were taken on; shipped assets stay."""
        assets = prepared_folder(self.name, model) if self.published_saes else self.assets
        return replace(self, model=model, assets=assets)


def minicanvas_world(
    canvas: minicanvas_data.Canvas,
    folder: str,
    object_block: str,
    style_block: str,
    examples: tuple[str, ...],
    replace_rule: ReplaceRule = PER_RULE,
) -> World:
    """A MiniCanvas world: its concepts, prompts and size from the canvas, its assets in `assets/<folder>`."""
    return World(
        name=canvas.name,
        model=str(ASSETS / folder / "model"),
        object_block=object_block,
        style_block=style_block,
        objects=canvas.objects,
        styles=canvas.styles,
        templates=canvas.templates,
        steps=20,
        guidance=5.0,
        height=canvas.image_size,
        width=canvas.image_size,
        assets=ASSETS / folder,
        examples=examples,
        canvas=canvas,
        replace_rule=replace_rule,
    )


MINICANVAS = minicanvas_world(
    minicanvas_data.CANVAS,
    # The folder is named for the images' size, as it was while the first MiniCanvas (32 pixels) shipped beside it.
    folder="minicanvas-64",
    # Chosen by measurement (docs/training.md, "Hook points"): the object is read from 99.5% of held-out images at
    # up_blocks.1.attentions.0 (8 x 8 tokens) and the images need it there (7.5% survive its ablation), while
    # their style needs it least of the up blocks (61% survive); the style needs up_blocks.2.attentions.1
    # (16 x 16 tokens) most: no image keeps its style without it.
    object_block="up_blocks.1.attentions.0",
    style_block="up_blocks.2.attentions.1",
    examples=("a fish in neon style", "zebra picture of a butterfly", "a house in ocean style", "a polka cat"),
    # An object fills most of the 8 x 8 map, and the detector misses the tokens around it: a map past a fifth
    # detected goes whole to the unconditional tokens. The share is the one with the best tuning score, mean of
    # UA and IRA on the tuning seed, of 0, 1/8, 1/5, 1/4 and 1/2 (docs/per.md, "On MiniCanvas (64 x 64 ...)").
    replace_rule=ReplaceRule(scope="map", map_share=0.2),
)


def cache_folder() -> Path:
    """Where worlds are prepared: $SAEMNESIA_CACHE, else ~/.cache/saemnesia (on a Space, point it at persistent
    storage, /data, so a restart does not prepare again)."""
    return Path(os.environ.get("SAEMNESIA_CACHE") or Path.home() / ".cache" / "saemnesia")


def prepared_folder(world_name: str, model: str) -> Path:
    """The folder `prepare` fills for a world on a model: named after the hub id, or after a local folder's
    name and a hash of its full path (two folders of the same name keep apart)."""
    source = SD_MODELS.get(model, model)
    local = Path(source)
    if local.exists():
        resolved = local.resolve()
        name = f"{resolved.name}-{hashlib.sha256(str(resolved).encode()).hexdigest()[:8]}"
    else:
        name = source.replace("/", "--")
    return cache_folder() / world_name / name


def stable_diffusion_world(model: str = SD_MODELS["sd14"], assets: Path | None = None) -> World:
    """SD v1.x (1.4, 1.5 or the UnlearnCanvas fine-tune) with UnlearnCanvas's concepts and prompt, the paper's
    hook points (objects at up.1.1, styles at up.1.2) and its demo sampling (DDIM, 50 steps, guidance 9).
    Its SAEs are the published ones, with statistics `prepare` takes into `assets` (default: the model's
    `prepared_folder`)."""
    return World(
        name="sd",
        model=model,
        object_block="up_blocks.1.attentions.1",
        style_block="up_blocks.1.attentions.2",
        objects=UNLEARNCANVAS_OBJECTS,
        styles=UNLEARNCANVAS_STYLES,
        templates=(UNLEARNCANVAS_TEMPLATE,),
        steps=50,
        guidance=9.0,
        height=512,
        width=512,
        assets=assets or prepared_folder("sd", model),
        examples=("A Cats image in Van Gogh style.", "A Horses image in Watercolor style.", "A photo of a dog."),
        published_saes=SD_PUBLISHED_SAES,
    )


WORLDS = {"minicanvas": MINICANVAS, "sd": stable_diffusion_world()}


def random_pipeline(
    unet_config: dict,
    text_layers: int = 2,
    vae_widths: Sequence[int] = (8,),
    vae_layers: int = 1,
    seed: int = 0,
) -> StableDiffusionPipeline:
    """A Stable-Diffusion-architecture pipeline with random weights, built on CPU in float32.

    The UNet is `unet_config`; the CLIP text encoder is as wide as its cross-attention; the VAE has one
    level per width in `vae_widths` (its scale factor is 2 ** (levels - 1)). No CLIP vocabulary ships
    offline, so the text side uses MiniCanvas's tokenizer. One builder for tests, benchmarks and the SD
    path's offline runs, which differ only in sizes.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    tokenizer = minicanvas_model.build_tokenizer(minicanvas_data.CANVAS_32)
    unet = UNet2DConditionModel(**unet_config)
    text_width = unet.config.cross_attention_dim
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=text_width,
            intermediate_size=4 * text_width,
            num_attention_heads=text_width // 64 if text_width % 64 == 0 else 4,
            num_hidden_layers=text_layers,
            max_position_embeddings=tokenizer.model_max_length,
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    vae = AutoencoderKL(
        block_out_channels=list(vae_widths),
        down_block_types=["DownEncoderBlock2D"] * len(vae_widths),
        up_block_types=["UpDecoderBlock2D"] * len(vae_widths),
        latent_channels=unet.config.in_channels,
        layers_per_block=vae_layers,
        norm_num_groups=min(32, vae_widths[0]),
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def random_sd_pipeline(size: str = "full", seed: int = 0) -> StableDiffusionPipeline:
    """A Stable Diffusion v1.4-architecture pipeline with random weights, for runs without the published ones.

    "full" has SD-1.4's exact shapes (UNet, ViT-L text encoder, 8x VAE: the block widths and token grids
    the paper's SAEs fit); "tiny" keeps the layout (4 levels, 2 layers, 3 attentions per up block, so the
    same hook points exist) at small widths, for CPU tests.
    """
    if size == "full":
        return random_pipeline(
            SD_V14_UNET_CONFIG, text_layers=12, vae_widths=(128, 256, 512, 512), vae_layers=2, seed=seed
        )
    if size == "tiny":
        tiny = dict(SD_V14_UNET_CONFIG, block_out_channels=[32, 32, 64, 64], norm_num_groups=8, sample_size=8)
        return random_pipeline(dict(tiny, cross_attention_dim=32), vae_widths=(8, 8, 8, 8), seed=seed)
    raise ValueError(f"size must be 'full' or 'tiny', got {size!r}.")


def portable_name(source: str | None) -> str | None:
    """A model source as results files record it: relative to the repository when inside it, so no
    machine's folder layout leaks into shipped JSON (None for a pipeline built in memory)."""
    if not source:
        return source
    try:
        return str(Path(source).resolve().relative_to(ASSETS.parent))
    except ValueError:
        return source


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _names_a_module(entry: object) -> bool:
    """Whether a `model_index.json` entry is [module, class] (not [null, null], not a setting)."""
    return isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], str)


def _carries_our_code(folder: Path) -> bool:
    """Whether the folder's components carry code (see `COMPONENT_CODE`); code that is not ours is refused."""
    index = json.loads((folder / "model_index.json").read_text())
    entries = index.items() if isinstance(index, dict) else ()
    modules = [Path(name) / f"{entry[0]}.py" for name, entry in entries if _names_a_module(entry)]
    carried = [folder / module for module in modules if (folder / module).is_file()]
    for path in carried:
        ours = COMPONENT_CODE.get(path.stem)
        if ours is None or path.read_text().replace("\r\n", "\n") != ours():
            raise ValueError(
                f"'{folder}' carries code of its own ({path.relative_to(folder)}), and SAEmnesia runs no code from a "
                "model folder but its own: give a folder of standard diffusers and transformers components."
            )
    return bool(carried)


def load_pipeline(source: str, device: str | None = None, dtype: torch.dtype | None = None) -> StableDiffusionPipeline:
    """Load a Stable-Diffusion-architecture pipeline from a folder, a hub id or a `SD_MODELS` short name
    (sd14, sd15): fp16 on CUDA, fp32 on CPU, with a DDIM sampler.

    Hub ids need a network; nothing is downloaded for a local folder. Weights load from safetensors only, and
    a folder's code only where it is the package's own (see `COMPONENT_CODE`).
    """
    source = SD_MODELS.get(source, source)
    device = device or default_device()
    dtype = dtype or (torch.float16 if device.startswith("cuda") else torch.float32)
    path = Path(source)
    if not path.exists() and (source.startswith((".", "/")) or source.count("/") != 1):
        raise FileNotFoundError(f"Model folder '{source}' does not exist: give a diffusers folder or a hub id.")
    if path.exists() and not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"'{source}' has no model_index.json: it is not a diffusers pipeline folder.")
    try:
        pipeline = StableDiffusionPipeline.from_pretrained(
            source,
            dtype=dtype,
            use_safetensors=True,
            safety_checker=None,
            requires_safety_checker=False,
            trust_remote_code=path.exists() and _carries_our_code(path),
        )
    except (OSError, ValueError, SafetensorError) as error:
        raise ValueError(
            f"Cannot load a diffusers pipeline from '{source}' (only safetensors weights are read): {error}"
        ) from error
    if not isinstance(pipeline.scheduler, DDIMScheduler):
        pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline.to(device)
