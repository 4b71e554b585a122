"""The paint benchmark: does painting a concept's latent into a region put the concept there, and does painting it
out of a region erase it as well as a full erasure does?

- Insertion: each object is painted (positive strength) into prompts of the other objects, on the tokens where
  MiniCanvas draws its object (`object_region`); the INSERTION RATE is the share of images the classifier then
  calls the painted object, beside the style kept (the prompt's style still seen) and the artifact rate. It is
  measured twice: painting the object's latent, and painting its footprint (`ConceptFootprints`), where the
  SAE has footprints.
- Local erasure: each object is painted out (negative strength) of the same region of its own prompts; the share
  no longer called that object is set beside a full erasure of the same object (SAEmnesia, steer at the strength
  the benchmark tuned, and replace) on the same prompts and seeds.

Strengths are chosen per object on the tuning seed only, maximising (rate + style kept) / 2, and reported on the
held-out seeds, as `evaluate` does for erasures.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

import torch
from PIL import Image

from saemnesia.evaluate.metrics import mean_of_known, rounded
from saemnesia.evaluate.protocol import PromptSpec
from saemnesia.generate import SaeHook
from saemnesia.minicanvas.artifacts import ARTIFACT_THRESHOLD, ArtifactDetector, artifact_probabilities
from saemnesia.minicanvas.classifier import MiniCanvasClassifier, classify
from saemnesia.studio import Studio

INSERTION_STRENGTHS = (5.0, 10.0, 20.0, 40.0, 80.0)
FOOTPRINT_STRENGTHS = (0.5, 1.0, 1.5, 2.0, 3.0)
LOCAL_ERASURE_STRENGTHS = (-5.0, -10.0, -20.0, -40.0, -80.0)
TUNING_SEEDS = (50_000,)
HELDOUT_SEEDS = (60_000, 60_001)


def object_region(height: int, width: int) -> torch.Tensor:
    """[h*w] bool: the tokens whose cell centre lies in the middle 70% of the image, where MiniCanvas draws its
    object (centred, jittered by 8%, 62-82% of the image wide)."""
    rows = ((torch.arange(height) + 0.5) / height - 0.5).abs() <= 0.35
    columns = ((torch.arange(width) + 0.5) / width - 0.5).abs() <= 0.35
    return (rows[:, None] & columns[None, :]).flatten()


def _prompts(studio: Studio, objects: Sequence[str], count: int, shift: int) -> list[PromptSpec]:
    """`count` prompts of `objects` in turn, styles and templates rotating from `shift`."""
    world = studio.world
    specs = []
    for index in range(count):
        object_name = objects[index % len(objects)]
        style = world.styles[(index + shift) % len(world.styles)]
        template = world.templates[(index + shift) % len(world.templates)]
        specs.append(PromptSpec(world.prompt(object_name, style, template), object_name, style))
    return specs


class _Judged:
    """Verdicts and artifact calls of one batch of generated images."""

    def __init__(self, images: list[Image.Image], classifier, detector):
        self.verdicts = classify(classifier, images)
        self.artifacts = (
            [p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(detector, images)] if detector else None
        )

    def rates(self, specs: Sequence[PromptSpec], painted: str | None) -> dict:
        """`rate`: the share called `painted` (insertion) or, with None, no longer called the prompt's object."""
        count = len(specs)
        hits = [v.object == painted if painted else v.object != s.object for v, s in zip(self.verdicts, specs)]
        return {
            "rate": 100 * sum(hits) / count,
            "style_kept": 100 * sum(v.style == s.style for v, s in zip(self.verdicts, specs)) / count,
            "ar": None if self.artifacts is None else 100 * sum(self.artifacts) / count,
        }


def _generate(studio: Studio, specs: list[PromptSpec], hooks: list[SaeHook], seeds: Sequence[int]) -> list:
    images = []
    for seed in seeds:
        images += studio.generate([s.text for s in specs], hooks, seed, include_originals=False).erased
    return images


def _pooled(parts: list[dict]) -> dict:
    """Rates of several equal-sized batches, as one."""
    return {name: mean_of_known([part[name] for part in parts]) for name in ("rate", "style_kept", "ar")}


def measure_paint(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    detector: ArtifactDetector | None,
    objects: Sequence[str] | None = None,
    prompts: int = 10,
    full_erasure_strengths: dict[str, float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """The paint benchmark on `objects` (default: all), `prompts` prompts per object and seed. Returns per object
    the chosen strengths with their tuning rates, held-out rates, and the full erasures' rates; and the means."""
    began = time.time()
    world = studio.world
    objects = list(objects or world.objects)
    bundle = studio.bundle("saemnesia", "object")
    height, width = studio.token_grid("object")
    region = object_region(height, width)
    steps = (0, world.steps - 1)
    full_erasure_strengths = full_erasure_strengths or {}
    report: dict[str, dict] = {}

    def painted(
        concept: str, strength: float, specs: list[PromptSpec], seeds: Sequence[int], footprint: bool = False
    ) -> dict:
        paint = bundle.paint(concept, bundle.dictionary.latent(concept), strength, region, steps, footprint)
        images = _generate(studio, specs, [SaeHook(bundle.block, bundle.sae, paint=paint)], seeds)
        return _Judged(images, classifier, detector).rates(specs * len(seeds), concept if strength > 0 else None)

    def tuned(concept: str, strengths: Sequence[float], specs: list[PromptSpec], footprint: bool = False) -> dict:
        trials = {strength: painted(concept, strength, specs, TUNING_SEEDS, footprint) for strength in strengths}
        best = max(trials, key=lambda s: (trials[s]["rate"] + trials[s]["style_kept"]) / 2)
        heldout = painted(concept, best, specs, HELDOUT_SEEDS, footprint)
        return {"strength": best, "tuning": {str(s): trials[s] for s in strengths}, "heldout": heldout}

    for index, concept in enumerate(objects):
        if progress:
            progress(f"{concept} ({index + 1} of {len(objects)})")
        others = [o for o in world.objects if o != concept]
        into_others = _prompts(studio, others, prompts, shift=index)
        own = _prompts(studio, [concept], prompts, shift=index)
        insertion = tuned(concept, INSERTION_STRENGTHS, into_others)
        footprint = tuned(concept, FOOTPRINT_STRENGTHS, into_others, footprint=True) if bundle.footprints else None
        local = tuned(concept, LOCAL_ERASURE_STRENGTHS, own)
        full = {}
        for intervention in ("steer", "replace"):
            strength = full_erasure_strengths.get(concept, -10.0)
            hooks = studio.hooks([concept], "saemnesia", strength, intervention=intervention)
            images = _generate(studio, own, hooks, HELDOUT_SEEDS)
            full[intervention] = {
                "strength": strength if intervention == "steer" else None,
                **_Judged(images, classifier, detector).rates(own * len(HELDOUT_SEEDS), None),
            }
        report[concept] = {
            "insertion": insertion,
            "footprint_insertion": footprint,
            "local_erasure": local,
            "full_erasure": full,
        }

    def mean(path: Callable[[dict], dict]) -> dict:
        return {name: rounded(value) for name, value in _pooled([path(entry) for entry in report.values()]).items()}

    return {
        "objects": report,
        "mean": {
            "insertion": mean(lambda e: e["insertion"]["heldout"]),
            "footprint_insertion": mean(lambda e: e["footprint_insertion"]["heldout"]) if bundle.footprints else None,
            "local_erasure": mean(lambda e: e["local_erasure"]["heldout"]),
            "full_erasure_steer": mean(lambda e: e["full_erasure"]["steer"]),
            "full_erasure_replace": mean(lambda e: e["full_erasure"]["replace"]),
        },
        "settings": {
            "block": bundle.block,
            "region_tokens": int(region.sum()),
            "grid": [height, width],
            "prompts_per_object": prompts,
            "tuning_seeds": list(TUNING_SEEDS),
            "heldout_seeds": list(HELDOUT_SEEDS),
            "insertion_strengths": list(INSERTION_STRENGTHS),
            "footprint_strengths": list(FOOTPRINT_STRENGTHS),
            "local_erasure_strengths": list(LOCAL_ERASURE_STRENGTHS),
            "steps": world.steps,
            "guidance": world.guidance,
        },
        "wall_time_s": round(time.time() - began, 1),
    }
