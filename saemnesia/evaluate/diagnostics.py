"""Looks at one erasure or one block outside the benchmark: a live check on a few seeds (the app's), which blocks
the image needs (`ablate-blocks`), the chance ceiling of UA (which the benchmark reports too), and where a tuned
erasure fails (`edit-coverage`)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from saemnesia.concepts import check_concepts
from saemnesia.evaluate.cache import UNTOUCHED
from saemnesia.evaluate.metrics import (
    KINDS,
    Judged,
    accuracy,
    concept_accuracies,
    erasure_metrics,
    mean_of_known,
    rounded,
)
from saemnesia.evaluate.protocol import PromptSpec, erasure_prompts, grid_prompts
from saemnesia.evaluate.search import pipeline_key
from saemnesia.generate import model_lock
from saemnesia.hooks import hook_points, hooked_block
from saemnesia.minicanvas.classifier import MiniCanvasClassifier, Verdict, classify
from saemnesia.minicanvas.data import PLAIN_TEMPLATE
from saemnesia.studio import Studio


def live_check(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    concept: str,
    method: str,
    strength: float,
    seeds: int = 2,
    features_per_step: int = 1,
    prompts_per_group: int = 4,
    progress=None,
) -> dict[str, float | None]:
    """UA / IRA / CRA of one erasure on a handful of seeds: a quick look, not the benchmark.

    Uses prompts naming the concept and prompts naming others of its kind, originals and erased
    copies from the same seeds, so the untouched accuracies come for free.
    """
    check_concepts([concept], list(studio.world.concepts))
    kind = studio.world.kind_of(concept)
    specs = erasure_prompts(studio.world, concept, prompts_per_group, prompts_per_group)
    erased, untouched = [], []
    for seed in range(seeds):
        if progress is not None:
            progress(seed / seeds, desc=f"seed {seed + 1} of {seeds}")
        result = studio.erase(
            [spec.text for spec in specs], [concept], method, strength, seed=seed, features_per_step=features_per_step
        )
        for images, judged in ((result.erased, erased), (result.originals, untouched)):
            for spec, verdict in zip(specs, classify(classifier, images)):
                judged.append(Judged(spec.text, seed, spec.object, spec.style, verdict.object, verdict.style))
    kind_size = len(studio.world.concepts_of(kind))
    metrics = erasure_metrics(erased, [concept], kind, kind_size)
    ceiling_metrics = erasure_metrics(untouched, [concept], kind, kind_size)
    return {
        "UA": rounded(metrics.ua),
        "IRA": rounded(metrics.ira),
        "CRA": rounded(metrics.cra),
        "UA untouched": rounded(ceiling_metrics.ua),
        "IRA untouched": rounded(ceiling_metrics.ira),
        "CRA untouched": rounded(ceiling_metrics.cra),
    }


def _unconditional(hidden: Tensor, step: int) -> Tensor:
    half = hidden.shape[0] // 2
    return torch.cat([hidden[:half], hidden[:half]])


@contextmanager
def unconditional_blocks(studio: Studio, blocks: Sequence[str]) -> Iterator[None]:
    """Within the `with`, each of `blocks` passes on its unconditional output in both halves of classifier-free
    guidance at every step: nothing of the prompt goes through them. Holds the model's lock throughout."""
    if studio.world.guidance <= 1:
        raise ValueError("Ablation swaps the conditional half for the unconditional one: it needs guidance > 1.")
    pipeline = studio.pipeline
    with model_lock(pipeline), ExitStack() as stack:
        for block in blocks:
            stack.enter_context(hooked_block(pipeline.unet, block, _unconditional))
        yield


def _ablated_verdicts(
    studio: Studio, classifier: MiniCanvasClassifier, specs: Sequence[PromptSpec], seed: int, blocks: Sequence[str]
) -> list[Judged]:
    """The classifier's verdicts on `specs` made from `seed` with `blocks` ablated (`unconditional_blocks`)."""
    with unconditional_blocks(studio, blocks):
        images = studio.generate([spec.text for spec in specs], [], seed, include_originals=False).erased
    return [
        Judged(spec.text, seed, spec.object, spec.style, verdict.object, verdict.style)
        for spec, verdict in zip(specs, classify(classifier, images))
    ]


@torch.no_grad()
def ablate_blocks(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    blocks: Sequence[str] | None = None,
    styles_per_object: int = 4,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Which blocks the image needs for its object and its style: the causal half of choosing hook points.

    For each block, every step's conditional output is replaced by the unconditional one, so the block
    passes on nothing of the prompt, and the classifier says whether the prompt's object and style
    survive (% of images; "none" is the untouched model). An erasure at a block can only remove what
    ablating the whole block removes, and should leave the other kind standing; `probe-blocks` says
    where a concept can be read, this says where it is needed. Every object with its first styles,
    first template, one seed.
    """
    world = studio.world
    blocks = list(blocks or hook_points(studio.pipeline.unet))
    specs = [
        PromptSpec(world.prompt(obj, style, world.templates[0]), obj, style)
        for obj in world.objects
        for style in world.styles[:styles_per_object]
    ]
    report = {}
    for block in [None, *blocks]:
        judged = _ablated_verdicts(studio, classifier, specs, seed, [] if block is None else [block])
        report[block or UNTOUCHED] = {kind: rounded(accuracy(judged, kind)) for kind in KINDS}
    return report


def chance_blocks(studio: Studio) -> list[str]:
    """Every cross-attention block of the UNet but the world's style block: ablated together, nothing of the
    prompt's object passes while its style still can."""
    return [block for block in hook_points(studio.pipeline.unet) if block != studio.world.style_block]


def chance_survival(judged: Sequence[Judged], blocks: Sequence[str]) -> dict:
    """UA's chance ceiling from verdicts on images made with `blocks` ablated: the share (%) still named as the
    prompt's object, per object (each grid cell weighing the same, as UA counts) and its mean over objects, and
    `ua_ceiling` = 100 - that mean. An erasure that leaves a clean picture of some other object is named the
    erased one about this often by chance, so it can score no better UA than the ceiling; noise the classifier
    never calls the object can."""
    per_object = concept_accuracies(judged, "object")
    survival = mean_of_known(list(per_object.values()))
    return {
        "blocks": list(blocks),
        "survival": rounded(survival),
        "per_object": {name: rounded(value) for name, value in per_object.items()},
        "ua_ceiling": None if survival is None else rounded(100 - survival),
        "images": len(judged),
    }


@torch.no_grad()
def chance_ceiling(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    specs: Sequence[PromptSpec],
    seeds: Sequence[int],
    blocks: Sequence[str] | None = None,
) -> dict:
    """`chance_survival` of `specs` made from each of `seeds` with `blocks` (default `chance_blocks`) ablated
    together (METHOD section 10: 10% on the first MiniCanvas's 10 objects with all seven blocks, exactly chance)."""
    blocks = list(blocks or chance_blocks(studio))
    judged = [j for seed in seeds for j in _ablated_verdicts(studio, classifier, specs, seed, blocks)]
    return chance_survival(judged, blocks)


CONFIDENT = 0.9
"""A survivor the classifier names with at least this probability (originals: 0.95-1.0) is counted as
confident; below it, the label is more likely the forced choice of a classifier without a "none" class."""


@torch.no_grad()
def edit_coverage(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    results: Mapping,
    method: str = "saemnesia",
    kind: str = "object",
    grid: Path | None = None,
    intervention: str = "steer",
) -> dict[str, dict]:
    """Where an erasure fails: for each concept the benchmark tuned, at its tuned setting, the share of
    the hooked block's tokens the edit changed (over steps, conditional rows) on the images where the
    concept survived and on those where it was erased, how sure the classifier is of the survivors, and
    what it names the erased images instead.

    If the survivors had markedly fewer edited tokens, the concept would be slipping past the edit's
    threshold (for replace: past its detection); as many means it reaches the image through other blocks. The
    first step's share is reported apart, since the first steps lay the picture out.
    A classifier without a no-object class must name one of the world's concepts, so an image left with no
    object at all is still given one: its probability on survivors against that on the originals tells a
    concept that stayed from a forced choice, and `grid` (a PNG of original | erased pairs, one survivor a
    row) lets one look. The benchmark's held-out grid cells naming the concept, at
    its held-out seeds, each image made beside its original (results from before the grid: the whole grid).
    """
    protocol, report, pairs = results["protocol"], {}, []
    block = studio.world.block_for(kind)
    cells = grid_prompts(
        studio.world,
        protocol.get("grid_objects"),
        protocol.get("grid_styles"),
        protocol.get("plain_template", PLAIN_TEMPLATE),
        protocol.get("grid_templates"),
    )
    for concept, entry in results["methods"][pipeline_key(method, intervention)]["concepts"].items():
        if entry["kind"] != kind:
            continue
        chosen = entry["chosen"]
        specs = [spec for spec in cells if concept in (spec.object, spec.style)]
        shares: dict[str, list[float]] = {"survived": [], "erased": []}
        first_step_shares: dict[str, list[float]] = {"survived": [], "erased": []}
        survivor_probs, original_probs, named_instead = [], [], Counter()
        for seed in protocol["heldout_seeds"]:
            result = studio.erase(
                [spec.text for spec in specs],
                [concept],
                method,
                chosen["strength"],
                seed=seed,
                features_per_step=chosen["features_per_step"],
                record=True,
                intervention=intervention,
            )
            edited = result.traces[block].edited[:, len(specs) :].float().mean(2)  # [steps, images]
            originals, erased = classify(classifier, result.originals), classify(classifier, result.erased)
            images = zip(result.originals, result.erased)
            for share, first, original, verdict, pair in zip(
                edited.mean(0).tolist(), edited[0].tolist(), originals, erased, images
            ):
                original_probs.append(_probability(classifier, original, concept, kind))
                seen = verdict.object if kind == "object" else verdict.style
                group = "survived" if seen == concept else "erased"
                shares[group].append(share)
                first_step_shares[group].append(first)
                if seen == concept:
                    survivor_probs.append(_probability(classifier, verdict, concept, kind))
                    pairs.append(pair)
                else:
                    named_instead[seen] += 1
        report[concept] = {
            "images": sum(map(len, shares.values())),
            "survived": len(shares["survived"]),
            "confident_survivors": sum(prob >= CONFIDENT for prob in survivor_probs),
            **{f"edited_share_{group}": rounded(mean_of_known(values)) for group, values in shares.items()},
            **{
                f"first_step_edited_share_{group}": rounded(mean_of_known(values))
                for group, values in first_step_shares.items()
            },
            "probability_survivors": rounded(mean_of_known(survivor_probs)),
            "probability_originals": rounded(mean_of_known(original_probs)),
            "named_instead": dict(named_instead.most_common()),
        }
    if grid is not None:
        _pair_grid(pairs).save(grid)
    return report


def _probability(classifier: MiniCanvasClassifier, verdict: Verdict, concept: str, kind: str) -> float:
    """The classifier's probability of `concept` in the image of `verdict`."""
    if kind == "object":
        return float(verdict.object_probs[classifier.config.objects.index(concept)])
    return float(verdict.style_probs[classifier.config.styles.index(concept)])


def _pair_grid(pairs: Sequence[tuple[Image.Image, Image.Image]], scale: int = 3) -> Image.Image:
    """Original | erased, one pair a row, enlarged `scale` times without smoothing."""
    if not pairs:
        return Image.new("RGB", (1, 1), "white")
    width, height = (side * scale for side in pairs[0][0].size)
    grid = Image.new("RGB", (2 * width + scale * 2, height * len(pairs)), "white")
    for row, (original, erased) in enumerate(pairs):
        grid.paste(original.resize((width, height), Image.NEAREST), (0, row * height))
        grid.paste(erased.resize((width, height), Image.NEAREST), (width + scale * 2, row * height))
    return grid
