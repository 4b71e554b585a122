"""A world, loaded: its pipeline, SAEs, concept statistics and dictionaries, ready to erase by name.

This is the one object the CLI and the app hold. Every request's settings are checked here, where
they enter, so bad input gets one clear message whichever door it came through.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline

from saemnesia.concepts import ConceptDictionary, ConceptFootprints, ConceptStats, check_concepts
from saemnesia.erase import (
    INTERVENTIONS,
    METHODS,
    Paint,
    ReplaceRule,
    check_strength,
    footprint_edit,
    paint_edit,
    saemnesia_erasure,
    saeuron_erasure,
)
from saemnesia.generate import PairResult, SaeHook, check_sae_fits, generate_pairs
from saemnesia.hooks import block_grid
from saemnesia.sae import Sae
from saemnesia.worlds import World, load_pipeline

if TYPE_CHECKING:  # the index module reads collections, whose package imports this one
    from saemnesia.latent_index import ImageTable, LatentIndex

VARIANT_OF_METHOD = {"saemnesia": "supervised", "saeuron": "unsupervised"}
LATENTS_FOLDER = "latents"
"""Where a world's assets keep its latent indexes and their images (`index-latents`)."""
STATS_FILE = "stats.safetensors"
DICTIONARY_FILE = "dictionary.json"
FOOTPRINTS_FILE = "footprints.safetensors"
"""Written by `stats --footprints`; shipped beside the supervised SAEs, which Paint draws concepts with."""
LIMITS = {"steps": (1, 150), "guidance": (0.0, 30.0), "seed": (0, 2**32 - 1), "features_per_step": (1, 64)}
MAX_PROMPT_CHARACTERS = 1000
"""Far past what the tokenizer keeps; a cap so a hostile prompt cannot make tokenizing itself the work."""


class SettingsError(ValueError):
    """A request setting out of range or of the wrong type; the message names field, value and range."""


def _check_number(name: str, value: object, integer: bool) -> None:
    low, high = LIMITS[name]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or (not integer and not math.isfinite(value)):
        raise SettingsError(
            f"{name} must be {'an integer' if integer else 'a finite number'} in [{low}, {high}], got {value!r}."
        )
    if not low <= value <= high:
        raise SettingsError(f"{name} must be in [{low}, {high}], got {value!r}.")


@dataclass
class SaeBundle:
    """One SAE on one block, with the statistics (and dictionary) made with it."""

    sae: Sae
    block: str
    stats: ConceptStats
    dictionary: ConceptDictionary | None = None
    index: LatentIndex | None = None
    """The SAE's latent index (`index-latents`), where the world's assets hold one."""
    footprints: ConceptFootprints | None = None
    """Its kind's concept footprints (`stats --footprints`), which Paint can draw a concept with."""

    @classmethod
    def load(cls, folder: Path, block: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> SaeBundle:
        dictionary_path, footprints_path = folder / DICTIONARY_FILE, folder / FOOTPRINTS_FILE
        dictionary = ConceptDictionary.load(dictionary_path) if dictionary_path.is_file() else None
        footprints = ConceptFootprints.load(footprints_path) if footprints_path.is_file() else None
        stats = ConceptStats.load(folder / STATS_FILE)
        return cls(Sae.load(folder, device, dtype), block, stats, dictionary, footprints=footprints)

    def paint(
        self, concept: str, latent: int, strength: float, mask: torch.Tensor, steps: tuple[int, int], footprint: bool
    ) -> Paint:
        """The `Paint` of `latent` in `concept`'s units, or with `footprint` of `concept`'s footprint."""
        if footprint:
            return footprint_edit(self.footprints, concept, latent, strength, mask, steps)
        return paint_edit(self.stats, concept, latent, strength, mask, steps)


def _load_fitted(pipeline: StableDiffusionPipeline, folder: Path, block: str) -> SaeBundle:
    """The bundle in `folder`, on the pipeline's device and dtype, refused if it does not fit `block`."""
    bundle = SaeBundle.load(folder, block, str(pipeline.device), pipeline.unet.dtype)
    check_sae_fits(pipeline, bundle.sae, block)
    if bundle.footprints is not None and bundle.footprints.footprints.shape[-1] != bundle.sae.cfg.d_in:
        raise ValueError(
            f"The footprints in {folder} are {bundle.footprints.footprints.shape[-1]} wide, the SAE "
            f"{bundle.sae.cfg.d_in}: make them again with `python -m saemnesia stats --footprints`."
        )
    return bundle


def _load_extra(pipeline: StableDiffusionPipeline, folder: Path, block: str) -> SaeBundle:
    """An extra hook point's bundle, which unlike the world's own must be there."""
    if not (folder / STATS_FILE).is_file():
        raise FileNotFoundError(
            f"No SAE statistics in {folder}: train an SAE on {block} first "
            f"(`python -m saemnesia train-sae --block {block}`, then `stats` and `finetune` with the same --block)."
        )
    return _load_fitted(pipeline, folder, block)


@dataclass
class Studio:
    world: World
    pipeline: StableDiffusionPipeline
    bundles: dict[tuple[str, str], SaeBundle] = field(default_factory=dict)
    """By (method, kind), e.g. ("saemnesia", "object"): the SAEs on the world's hook points."""
    extra_bundles: dict[tuple[str, str], tuple[SaeBundle, ...]] = field(default_factory=dict)
    """SAEs on further blocks that erase the same kind alongside (`load`'s `extra_blocks`)."""
    images: ImageTable | None = None
    """The thumbnails the latent indexes show."""

    @classmethod
    def load(
        cls,
        world: World,
        device: str | None = None,
        model: str | None = None,
        extra_blocks: Mapping[str, Sequence[str]] | None = None,
    ) -> Studio:
        """Load the world's pipeline and every SAE bundle its assets hold (missing ones are skipped).

        `extra_blocks` (by kind) adds hook points where that kind is erased too, each with its own SAEs
        and statistics in `assets/<world>/sae/<variant>/<block>/` (both methods' are required): a concept
        that also reaches the image through another block can be erased there as well.

        The SAEs compute in the UNet's dtype (float16 on CUDA): in float32 beside a float16 UNet their
        matmul alone would cost twice what its multiply-adds are worth, on a GPU. The codes are the same
        but for near-ties at the k-th place."""
        pipeline = load_pipeline(model or world.model, device=device)
        bundles = {}
        for method, variant in VARIANT_OF_METHOD.items():
            for kind in ("object", "style"):
                folder = world.sae_folder(variant, kind) if world.assets else None
                if folder is not None and (folder / STATS_FILE).is_file():
                    bundles[method, kind] = _load_fitted(pipeline, folder, world.block_for(kind))
        extra_bundles = {}
        for kind, blocks in (extra_blocks or {}).items():
            for method, variant in VARIANT_OF_METHOD.items():
                extra_bundles[method, kind] = tuple(
                    _load_extra(pipeline, world.sae_folder(variant, kind, block), block) for block in blocks
                )
        from saemnesia.latent_index import ImageTable, LatentIndex, index_name

        images = None
        indexes = world.assets / LATENTS_FOLDER if world.assets else None
        if indexes is not None and (indexes / "images.json").is_file():
            images = ImageTable.load(indexes)
            for (method, _), bundle in bundles.items():
                variant = VARIANT_OF_METHOD[method]
                if (indexes / f"{index_name(variant, bundle.block)}.json").is_file():
                    bundle.index = LatentIndex.load(indexes, variant, bundle.block)
                    if bundle.index.num_latents != bundle.sae.num_latents:
                        raise ValueError(
                            f"The latent index of the {variant} SAE on {bundle.block} in '{indexes}' has "
                            f"{bundle.index.num_latents} latents but the SAE {bundle.sae.num_latents}: it was made "
                            "for another SAE; make it again with `python -m saemnesia index-latents`."
                        )
        return cls(world, pipeline, bundles, extra_bundles, images)

    def check_prompt(self, prompt: object) -> tuple[str, str | None]:
        """The prompt, and a warning if the tokenizer will truncate it."""
        if not isinstance(prompt, str) or not prompt.strip():
            raise SettingsError(f"prompt must be a non-empty text, e.g. {self.world.examples[0]!r}, got {prompt!r}.")
        if len(prompt) > MAX_PROMPT_CHARACTERS:
            raise SettingsError(f"prompt must be at most {MAX_PROMPT_CHARACTERS} characters, got {len(prompt)}.")
        tokenizer = self.pipeline.tokenizer
        length = len(tokenizer(prompt).input_ids)
        if length > tokenizer.model_max_length:
            return prompt, f"The prompt is {length} tokens long; only the first {tokenizer.model_max_length} are used."
        return prompt, None

    def check_concepts(self, concepts: object) -> list[str]:
        """The concept names as a list, if they are a list of this world's concepts."""
        if isinstance(concepts, str) or not isinstance(concepts, (list, tuple)):
            raise SettingsError(f"concepts must be a list of concept names, got {concepts!r}.")
        check_concepts(list(concepts), list(self.world.concepts))
        return list(concepts)

    def neighbour_prompts(self, prompt: str, concepts: list[str], count: int = 3) -> list[str]:
        """The prompt with an erased concept swapped for others of its kind: what the erasure must spare."""
        if not concepts:
            return []
        erased = concepts[0]
        kind = self.world.kind_of(erased)
        pool = [c for c in (self.world.objects if kind == "object" else self.world.styles) if c not in concepts]
        if erased in prompt:
            return [prompt.replace(erased, other) for other in pool[:count]]
        template = self.world.templates[0]
        default_style = self.world.styles[0] if self.world.styles else ""
        return [
            self.world.prompt(other, default_style, template)
            if kind == "object"
            else self.world.prompt(self.world.objects[0], other, template)
            for other in pool[:count]
        ]

    def hooks(
        self,
        concepts: list[str],
        method: str = "saemnesia",
        strength: float = -10.0,
        start_step: int = 0,
        features_per_step: int = 1,
        record: bool = False,
        intervention: str = "steer",
        replace_rule: ReplaceRule | None = None,
    ) -> list[SaeHook]:
        """The SAE hooks that erase `concepts` (objects at the object block, styles at the style block, and
        each kind at its extra blocks), by steering their latents or replacing the tokens they detect (by
        `replace_rule`, default the world's)."""
        replace_rule = replace_rule or self.world.replace_rule
        if method not in METHODS:
            raise SettingsError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
        if intervention not in INTERVENTIONS:
            raise SettingsError(f"intervention must be one of {', '.join(INTERVENTIONS)}, got {intervention!r}.")
        check_strength(strength)
        _check_number("features_per_step", features_per_step, integer=True)
        concepts = self.check_concepts(concepts)
        hooks = []
        for kind in ("object", "style"):
            chosen = [c for c in concepts if self.world.kind_of(c) == kind]
            bundle = self.bundles.get((method, kind))
            if bundle is None:
                if chosen:
                    raise SettingsError(
                        f"No {method} SAE for {kind}s in this world: train one (`python -m saemnesia finetune`)."
                    )
                continue
            for each in (bundle, *self.extra_bundles.get((method, kind), ())):
                erasure = None
                if chosen and method == "saemnesia":
                    erasure = saemnesia_erasure(
                        each.stats, each.dictionary, chosen, strength, start_step, intervention, replace_rule
                    )
                elif chosen:
                    erasure = saeuron_erasure(
                        each.stats, chosen, strength, features_per_step, start_step, intervention, replace_rule
                    )
                if erasure is not None or record:
                    hooks.append(SaeHook(each.block, each.sae, erasure, record))
        return hooks

    def generate(
        self, prompts: list[str], hooks: list[SaeHook], seed: int, include_originals: bool = True
    ) -> PairResult:
        """`generate_pairs` at the world's sampling settings, for callers that built their own hooks."""
        world = self.world
        return generate_pairs(
            self.pipeline,
            prompts,
            hooks,
            seed=seed,
            steps=world.steps,
            guidance=world.guidance,
            height=world.height,
            width=world.width,
            include_originals=include_originals,
        )

    def erase(
        self,
        prompts: list[str],
        concepts: list[str],
        method: str = "saemnesia",
        strength: float = -10.0,
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        start_step: int = 0,
        features_per_step: int = 1,
        record: bool = False,
        include_originals: bool = True,
        intervention: str = "steer",
    ) -> PairResult:
        """Original and erased images for each prompt, all from `seed`; settings checked first.
        Without `include_originals` only the erased images are made (`originals` is then empty).
        Under `intervention="replace"` the strength plays no part."""
        steps = self.world.steps if steps is None else steps
        guidance = self.world.guidance if guidance is None else guidance
        _check_number("steps", steps, integer=True)
        _check_number("guidance", guidance, integer=False)
        _check_number("seed", seed, integer=True)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or not 0 <= start_step < steps:
            raise SettingsError(f"start_step must be an integer in [0, {steps - 1}], got {start_step!r}.")
        if isinstance(prompts, str) or not prompts:
            raise SettingsError(f"prompts must be a non-empty list of texts, got {prompts!r}.")
        warnings = [warning for prompt in prompts if (warning := self.check_prompt(prompt)[1])]
        hooks = self.hooks(concepts, method, strength, start_step, features_per_step, record, intervention)
        result = generate_pairs(
            self.pipeline,
            prompts,
            hooks,
            seed=seed,
            steps=steps,
            guidance=guidance,
            height=self.world.height,
            width=self.world.width,
            include_originals=include_originals,
        )
        result.settings["warnings"] = warnings
        return result

    def token_grid(self, kind: str) -> tuple[int, int]:
        """The (height, width) token grid of the kind's block at the world's image size."""
        scale = self.pipeline.vae_scale_factor
        block = self.world.block_for(kind)
        return block_grid(self.pipeline.unet, block, self.world.height // scale, self.world.width // scale)

    def bundle(self, method: str, kind: str) -> SaeBundle:
        if method not in METHODS:
            raise SettingsError(f"method must be one of {', '.join(METHODS)}, got {method!r}.")
        if kind not in ("object", "style"):
            raise SettingsError(f"kind must be 'object' or 'style', got {kind!r}.")
        bundle = self.bundles.get((method, kind))
        if bundle is None:
            raise SettingsError(
                f"No {method} SAE for {kind}s in this world: train one (`python -m saemnesia finetune`)."
            )
        return bundle

    def resolve_latent(self, target: object, kind: str, method: str = "saemnesia") -> tuple[SaeBundle, int, str]:
        """A latent named by a concept (SAEmnesia: its dictionary latent; SAeUron: its best-scoring one) or by
        its index, with its SAE and the concept it holds (for an index: the concept the dictionary binds to it, else
        the one its score ties it to)."""
        if isinstance(target, str) and target.strip().lstrip("-").isdigit():
            target = int(target)
        if isinstance(target, str):
            check_concepts([target], list(self.world.concepts))
            bundle = self.bundle(method, self.world.kind_of(target))
            if bundle.dictionary is not None:
                return bundle, bundle.dictionary.latent(target), target
            return bundle, int(bundle.stats.score_profile(target).argmax()), target
        bundle = self.bundle(method, kind)
        latents = bundle.sae.num_latents
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < latents:
            raise SettingsError(f"latent must be a concept name or an integer in [0, {latents - 1}], got {target!r}.")
        bound = [
            name
            for name, latent in (bundle.dictionary.latents.items() if bundle.dictionary else ())
            if latent == target
        ]
        concept = bound[0] if bound else bundle.stats.concepts[int(bundle.stats.scores().mean(1)[:, target].argmax())]
        return bundle, target, concept

    def check_mask(self, mask: object, kind: str) -> torch.Tensor:
        """A token mask for the kind's block: rows of 0/1 (or booleans), as many as its grid; returned flat."""
        height, width = self.token_grid(kind)
        expected = f"mask must be a {height} x {width} grid of 0 and 1 (the {kind} block's tokens)"
        try:
            grid = torch.as_tensor(mask, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise SettingsError(f"{expected}, got {type(mask).__name__}.") from None
        if tuple(grid.shape) != (height, width):
            raise SettingsError(f"{expected}, got shape {tuple(grid.shape)}.")
        if not bool(((grid == 0) | (grid == 1)).all()):
            raise SettingsError(f"{expected}; it holds other values.")
        return grid.flatten().bool()

    def paint(
        self,
        prompt: str,
        target: object,
        mask: object,
        strength: float,
        kind: str = "object",
        steps_painted: tuple[int, int] | None = None,
        seed: int = 0,
        method: str = "saemnesia",
        record: bool = True,
        footprint: bool = False,
    ) -> PairResult:
        """Original and painted image of `prompt` from `seed`: the latent `target` (a concept's, or an index on
        the `kind` block) moved by `strength` times its concept's mean activation on the masked tokens, at the
        sampler steps `steps_painted` (first, last; default all); with `footprint`, the concept `target`'s
        footprint at `strength` instead (`ConceptFootprints`). Settings are checked first."""
        prompt = self.check_prompt(prompt)[0]
        _check_number("seed", seed, integer=True)
        bundle, latent, concept = self.resolve_latent(target, kind, method)
        if footprint and not (isinstance(target, str) and target in self.world.concepts):
            raise SettingsError(f"a footprint is a concept's: give a concept name, not {target!r}.")
        if footprint and bundle.footprints is None:
            raise SettingsError(
                f"The {method} SAE on {bundle.block} has no footprints: make them with `python -m saemnesia stats "
                f"--variant {VARIANT_OF_METHOD[method]} --kind {self.world.kind_of(target)} --footprints`."
            )
        kind = self.world.kind_of(target) if isinstance(target, str) and target in self.world.concepts else kind
        token_mask = self.check_mask(mask, kind)
        last = self.world.steps - 1
        first_step, last_step = (0, last) if steps_painted is None else steps_painted
        for name, value in (("first painted step", first_step), ("last painted step", last_step)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= last:
                raise SettingsError(f"{name} must be an integer in [0, {last}], got {value!r}.")
        if first_step > last_step:
            raise SettingsError(f"the first painted step ({first_step}) is after the last ({last_step}).")
        try:
            paint = bundle.paint(concept, latent, strength, token_mask, (first_step, last_step), footprint)
        except ValueError as error:
            raise SettingsError(str(error)) from None
        return self.generate([prompt], [SaeHook(bundle.block, bundle.sae, None, record, paint=paint)], seed)
