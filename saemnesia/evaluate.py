"""The erasure benchmark (METHOD section 6): UA, IRA and CRA per erased concept, for both methods.

For every erased concept each method gets its strength searched on TUNING seeds, choosing the setting
with the best (UA + IRA) / 2, and is then measured on separate HELD-OUT seeds. SAEmnesia searches
the 7 strengths of its kind's grid (`OBJECT_STRENGTHS`, `STYLE_STRENGTHS`) on its concept's own
latent; SAeUron searches 3 feature counts (its percentiles 99.999 / 99.995 / 99.99 at the paper's
20,480 latents: 1 / 2 / 3 latents a step) x the same 7 strengths. Sequential erasure then erases the
world's first objects together, one more each step. The classifier judges every image; the untouched
model, run once, gives the ceiling.

Each method runs with each of the protocol's interventions: `steer` (the search above) and `replace`
(PER), which scales nothing and so searches no strength: SAEmnesia's replace has nothing to choose (no
tuning images), SAeUron's chooses its latents per step (3 trials). With an artifact detector every image
is also judged clean or corrupted, and each row reports AR, the artifact rate on the erased concept's
own images (`Metrics.ar`).

Protocols (`FULL`, `QUICK`). All images are erased-only, many prompts a call, all prompts of a call
from one seed's noise; seeds are far above those `collect` uses for the statistics (0 to 1199).
- full: all 10 objects and 10 styles erased. Tuning: seed 50000, 10 prompts naming the concept and 10
  naming other concepts of its kind (partners and templates rotating), so 20 images a trial,
  28 trials a concept: 11,200 images. Held-out: seeds 60000-60001, 20 + 20 prompts, 2 methods: 3,200.
  Sequential: 1 to 9 objects, 50 prompts over all objects, seed 60000, 2 methods: 900. Untouched: every
  held-out and sequential prompt at its seeds: 532. 15,832 images with steer alone, about 34 minutes at
  the 7.8 images/s measured on a 2-core CPU; replace adds SAeUron's 3 trials a concept (1,200), held-out
  (3,200) and sequential (900) images: 21,132 in all.
- quick: the first 3 objects and 2 styles; tuning 3 + 3 prompts (840 images), held-out seed 60000 with
  6 + 6 prompts (120), sequential 1 to 3 objects on 20 prompts (120), untouched 51: 1,131 images with steer
  alone, 1,461 with replace, about 5 minutes at 5 images/s. A demo and a smoke test: too few images to
  compare methods.

Verdicts are cached one JSON line per image (`VerdictCache`), keyed by method, intervention, erased
concepts, strength, features per step, seed and prompt, and tagged with a fingerprint of what decides the
verdict: the model, classifier and artifact detector, and the SAEs and statistics of the image's own method
(none for the untouched model). An interrupted or repeated run redoes nothing, a retrained model never
reuses stale verdicts, and retraining one method's SAE remakes only that method's images.

The JSON `write_results` writes (`evaluation.json`, or `evaluation-quick.json`); metrics in % with
2 decimals, null where undefined (e.g. IRA with no concept left):
    schema: 1; world; protocol: the `Protocol` fields and `rules` (how settings were chosen)
    settings: {steps, guidance, height, width, model, object_block, style_block, extra_blocks, fingerprint}
    ceiling: {object_accuracy, style_accuracy, images, per_concept: {concept: accuracy on its kind}}
    methods: {"saemnesia" | "saeuron" | "saemnesia+replace" | "saeuron+replace": {method, intervention,
        concepts: {concept: {kind, chosen: {strength, features_per_step, tuning_score},
                             tuning: [{strength, features_per_step, ua, ira, cra, cra_erased, ar, ar_others,
                                       score}, ...],
                             heldout: {ua, ira, cra, cra_erased, ar, ar_others, images}, untouched: {...}}},
        summary: {"object" | "style": {ua, ira, cra, cra_erased, ar, ar_others, mean, concepts,
                                       untouched: {...}}},
        sequential: [{erased: [objects], strength, features_per_step, ua, ira, cra, ..., images,
                      untouched: {...}}, ...]}}
    search: {<pipeline>: {strengths: {kind: grid}, features_per_step, trials_per_concept, trials, images,
             seconds, seconds_per_trial}, paper_grid: {trials_per_concept: 210, trials, estimated_seconds},
             trials_saved: 1 - ours/theirs per concept, vs our SAeUron grid and vs the paper's}
    paper: Table 1 (steer) and PER's object table (replace) by pipeline and kind
    images: {planned, generated (made by this run), from_cache (earlier runs, or reused within this one)}
    generation_seconds (this run's image making); wall_time_s; created (UTC, ISO 8601)
Search seconds add up the stored time of every image a search used, so a resumed run reports the same.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import statistics
import time
from collections import Counter
from collections.abc import Collection, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

import torch
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.concepts import check_concepts
from saemnesia.erase import INTERVENTIONS, METHODS, features_for_percentile
from saemnesia.generate import model_lock
from saemnesia.hooks import hook_points, hooked_block
from saemnesia.minicanvas.artifacts import ARTIFACT_THRESHOLD, ArtifactDetector, artifact_probabilities
from saemnesia.minicanvas.classifier import MiniCanvasClassifier, Verdict, classify
from saemnesia.studio import Studio
from saemnesia.worlds import World, portable_name

logger = logging.getLogger(__name__)

SAEURON_PERCENTILES = (99.999, 99.995, 99.99)
PAPER_LATENTS = 20_480
SAEURON_FEATURES = tuple(features_for_percentile(p, PAPER_LATENTS) for p in SAEURON_PERCENTILES)
PAPER_GRID_TRIALS = 30 * 7
OBJECT_STRENGTHS = (-1.0, -3.0, -10.0, -30.0, -100.0, -300.0, -1000.0)
STYLE_STRENGTHS = (-0.03, -0.1, -0.3, -1.0, -3.0, -10.0, -30.0)
"""The 7 strengths both methods search per concept, one grid per kind, log-spaced (x sqrt(10)).

The edit multiplies a latent by gamma * mu, its mean activation on the concept, so where a method's
optimum lies depends on its latents' scale. On MiniCanvas's object block an unsupervised latent's mu is
~10x smaller than a supervised one's (0.2-0.8 against 1.2-5.3): with the earlier shared grid, -0.03 to
-30, SAeUron took the strongest -30 for 8 of its 10 objects and, given -100, all 10 there, so the grid
was capping the baseline. The object grid therefore reaches -1000 (SAeUron now settles at -100 to
-1000, SAEmnesia at -10 to -300; neither needs anything milder than -1, where both erase nothing). On
the style block both methods' choices lie inside -0.03 to -30 but for SAEmnesia's strongest, so that
grid stays. Each keeps the paper's count of 7 strengths.
"""
DEFAULT_STRENGTH = -10.0
"""For an erasure the benchmark tuned nothing for (the SD world, a world without cached results)."""
KINDS = ("object", "style")
TABLE1_METRICS = ("ua", "ira", "cra")
METRICS = (*TABLE1_METRICS, "cra_erased", "ar", "ar_others")
METHOD_NAMES = {"saemnesia": "SAEmnesia", "saeuron": "SAeUron"}
REPLACE_STRENGTH = 0.0
"""The strength recorded for `replace`, which scales nothing."""


def pipeline_key(method: str, intervention: str = "steer") -> str:
    """A method with its intervention, as results name it: `saemnesia` (steer) or `saemnesia+replace`."""
    return method if intervention == "steer" else f"{method}+{intervention}"


def pipeline_label(key: str) -> str:
    """`saemnesia+replace` -> "SAEmnesia + replace"."""
    method, _, intervention = key.partition("+")
    return METHOD_NAMES[method] + (f" + {intervention}" if intervention else "")


# UnlearnCanvas: Table 1 of the SAEmnesia paper (steer) and PER's object table (replace, with its artifact
# rate judged by a VLM; PER reports no styles).
PAPER_TABLE = {
    "saemnesia": {"object": (94.65, 91.39, 88.48), "style": (96.60, 98.67, 99.30)},
    "saeuron": {"object": (87.16, 85.57, 74.14), "style": (95.80, 99.10, 99.40)},
    "saemnesia+replace": {"object": (91.37, 91.92, 97.97)},
    "saeuron+replace": {"object": (85.37, 81.14, 86.55)},
}
PAPER_AR = {"saemnesia": 49.8, "saeuron": 57.0, "saemnesia+replace": 15.5, "saeuron+replace": 16.3}
"""PER's artifact rate on objects (%, a VLM's judgement): another instrument than ours, for the gap only."""
UNTOUCHED = "none"
"""The method name of images made without erasure, in the cache."""
SEQUENTIAL_RULE = (
    "each step erases the world's first n objects together at the lower median (a value of the searched "
    "grid) of the strengths, and features per step, tuned for those objects"
)
SELECTION_RULES = {
    "mildest": (
        "per concept, the setting with the best (UA + IRA) / 2 on the tuning seeds; ties go to the first tried "
        "(fewest latents per step, then the mildest strength)"
    ),
    "centre": (
        "per concept, the setting with the best (UA + IRA) / 2 on the tuning seeds; among ties, the middle of the "
        "longest run of neighbouring strengths (same latents per step) that all score best, the milder of two "
        "middles, the first tried of equally long runs"
    ),
}
TIES = tuple(SELECTION_RULES)
"""How `choose_setting` may break ties, by name."""


# --- Metrics on verdicts -------------------------------------------------------------------------


class Judged(NamedTuple):
    """One generated image: what its prompt asked for and what the classifier saw."""

    prompt: str
    seed: int
    object: str
    style: str
    seen_object: str
    seen_style: str
    artifact: bool | None = None
    """Whether the artifact detector calls the image corrupted (None: not judged)."""


class Metrics(NamedTuple):
    """Unlearning accuracy, in-domain and cross-domain retain accuracy, in %; None where no image counts."""

    ua: float | None
    ira: float | None
    cra: float | None
    cra_erased: float | None = None
    """CRA on the erased concepts' own images alone: where an erasure that takes the rest of the image
    with it shows (CRA on the others' images stays near the ceiling)."""
    ar: float | None = None
    """Artifact rate on the erased concepts' own images, where the edit acts (`judged_artifact_rate`)."""
    ar_others: float | None = None
    """Artifact rate on the other concepts' images, which the edit should leave alone."""

    @property
    def score(self) -> float | None:
        """(UA + IRA) / 2, what the strength search maximises."""
        return None if self.ua is None or self.ira is None else (self.ua + self.ira) / 2


def other_kind(kind: str) -> str:
    return "style" if kind == "object" else "object"


def _asked(judged: Judged, kind: str) -> str:
    return judged.object if kind == "object" else judged.style


def accuracy(judged: Sequence[Judged], kind: str) -> float | None:
    """100 x the share of images whose classifier verdict of `kind` is what the prompt asked for."""
    if not judged:
        return None
    seen = [j.seen_object if kind == "object" else j.seen_style for j in judged]
    return 100 * sum(s == _asked(j, kind) for s, j in zip(seen, judged)) / len(judged)


def judged_artifact_rate(judged: Sequence[Judged]) -> float | None:
    """100 x the share of images the artifact detector called corrupted; None if none was judged."""
    called = [j.artifact for j in judged if j.artifact is not None]
    return 100 * sum(called) / len(called) if called else None


def erasure_metrics(judged: Sequence[Judged], erased: Collection[str], kind: str, kind_size: int) -> Metrics:
    """UA on images naming an erased concept, IRA on those naming another of its kind, CRA on the other kind.

    `kind` is the erased concepts' kind ("object" or "style"), `kind_size` how many concepts of that kind
    the world has. CRA is accuracy on the other kind over the whole object x style grid, as UnlearnCanvas
    and SAeUron's scripts count it (every image of the grid once): the erased concepts' images weigh
    len(erased) / kind_size of it and the others' images the rest, however many of each were sampled.
    Unweighted, the protocols' equal halves of erased and other prompts would count the erased
    concepts' images 5x too much at one erased object of 10. `cra_erased` reports them alone.
    """
    if not 0 < len(erased) <= kind_size:
        raise ValueError(f"{len(erased)} erased concept(s) do not fit a world of {kind_size} {kind}s.")
    on_erased = [j for j in judged if _asked(j, kind) in erased]
    on_others = [j for j in judged if _asked(j, kind) not in erased]
    erased_accuracy = accuracy(on_erased, kind)
    cross_erased, cross_others = accuracy(on_erased, other_kind(kind)), accuracy(on_others, other_kind(kind))
    if cross_erased is None or cross_others is None:
        cross = cross_others if cross_erased is None else cross_erased
    else:
        share = len(erased) / kind_size
        cross = share * cross_erased + (1 - share) * cross_others
    return Metrics(
        None if erased_accuracy is None else 100 - erased_accuracy,
        accuracy(on_others, kind),
        cross,
        cross_erased,
        judged_artifact_rate(on_erased),
        judged_artifact_rate(on_others),
    )


def ceiling(judged: Sequence[Judged], concepts: Mapping[str, str]) -> dict:
    """The untouched model's object and style accuracy, overall and per concept (`concepts`: name -> kind)."""
    return {
        "object_accuracy": _round(accuracy(judged, "object")),
        "style_accuracy": _round(accuracy(judged, "style")),
        "images": len(judged),
        "per_concept": {
            concept: _round(accuracy([j for j in judged if _asked(j, kind) == concept], kind))
            for concept, kind in concepts.items()
        },
    }


class Setting(NamedTuple):
    """One point of a method's search grid (SAEmnesia always edits 1 latent a step)."""

    method: str
    strength: float
    features_per_step: int = 1
    intervention: str = "steer"

    @property
    def key(self) -> str:
        return pipeline_key(self.method, self.intervention)


def joint_setting(method: str, settings: Sequence[Setting], intervention: str = "steer") -> Setting:
    """One setting for several concepts erased together: the lower median (a value of the grid) of theirs."""
    return Setting(
        method,
        statistics.median_low(setting.strength for setting in settings),
        statistics.median_low(setting.features_per_step for setting in settings),
        intervention,
    )


def tuned_setting(
    results: Mapping, method: str, concepts: Sequence[str], intervention: str = "steer"
) -> Setting | None:
    """The benchmark results' setting for erasing `concepts` together with `method` and `intervention`, as
    sequential erasure picks it; None if the results tuned none of them."""
    tuned = results.get("methods", {}).get(pipeline_key(method, intervention), {}).get("concepts", {})
    settings = [
        Setting(method, tuned[c]["chosen"]["strength"], tuned[c]["chosen"]["features_per_step"], intervention)
        for c in concepts
        if c in tuned
    ]
    return joint_setting(method, settings, intervention) if settings else None


def setting_or_default(
    results: Mapping | None, method: str, concepts: Sequence[str], intervention: str = "steer"
) -> Setting:
    """`tuned_setting`, else `DEFAULT_STRENGTH` with one latent a step: what the app and `generate` use
    unless told otherwise. The two methods work at different scales (MiniCanvas's objects want -0.1 to
    -1 from SAEmnesia; -10 there leaves noise), so a tuned strength is the only sensible default."""
    default = Setting(method, REPLACE_STRENGTH if intervention == "replace" else DEFAULT_STRENGTH, 1, intervention)
    return tuned_setting(results or {}, method, concepts, intervention) or default


BENCHMARK_PROTOCOLS = ("full", "standard", "quick")


def result_sets(world: World) -> dict[str, Path]:
    """The world's cached `evaluate` results files by protocol name: the benchmark's protocols first (in
    `BENCHMARK_PROTOCOLS` order), then the variants (another block, classifier or tuning set) by name."""
    if world.assets is None:
        return {}
    found = {
        path.stem.removeprefix("evaluation").removeprefix("-") or "full": path
        for path in (world.assets / "results").glob("evaluation*.json")
    }
    names = [name for name in BENCHMARK_PROTOCOLS if name in found]
    return {name: found[name] for name in names + sorted(set(found) - set(names))}


def benchmark_results(world: World) -> dict | None:
    """The world's cached `evaluate` results: the full protocol's, else the standard's, else the quick one's."""
    sets = result_sets(world)
    benchmark = next((sets[name] for name in BENCHMARK_PROTOCOLS if name in sets), None)
    return None if benchmark is None else json.loads(benchmark.read_text())


def search_grid(
    method: str, strengths: Sequence[float], saeuron_features: Sequence[int], intervention: str = "steer"
) -> list[Setting]:
    """The settings a method tries per concept: fewest latents per step first, each over the strengths mildest
    first. `replace` scales nothing, so it has no strengths to try: SAeUron still chooses how many latents
    detect (its percentile), SAEmnesia has nothing left to choose."""
    features = saeuron_features if method == "saeuron" else (1,)
    if intervention == "replace":
        return [Setting(method, REPLACE_STRENGTH, count, intervention) for count in features]
    return [Setting(method, float(strength), count, intervention) for count in features for strength in strengths]


def choose_setting(
    trials: Mapping[Setting, Sequence[Judged]],
    concept: str,
    kind: str,
    kind_size: int,
    tuning_seeds: Collection[int],
    ties: str = "mildest",
) -> tuple[Setting, dict[Setting, Metrics]]:
    """The setting with the best (UA + IRA) / 2 on the tuning seeds' images only, and every setting's metrics.

    Images from other seeds are ignored, so the seeds the result is reported on never pick it. `trials`
    is in `search_grid` order (fewest latents, then mildest strength). With a few images a trial, scores
    tie often. `ties="mildest"` takes the first tied setting tried: the edit that changes the image least.
    `ties="centre"` takes the middle of the longest run of neighbouring best strengths, furthest from both
    the under-erasing and the over-erasing side; on MiniCanvas it trades CRA for UA about evenly (README).
    """
    if ties not in TIES:
        raise ValueError(f"ties must be one of {TIES}, got {ties!r}.")
    metrics = {
        setting: erasure_metrics([j for j in judged if j.seed in tuning_seeds], [concept], kind, kind_size)
        for setting, judged in trials.items()
    }
    scored = [setting for setting, m in metrics.items() if m.score is not None]
    if not scored:
        raise ValueError(f"No tuning image names '{concept}' and another {kind}: nothing to choose a setting on.")
    best_score = max(metrics[setting].score for setting in scored)
    if ties == "mildest":
        return next(setting for setting in trials if metrics[setting].score == best_score), metrics
    runs: list[list[Setting]] = []  # neighbours in grid order that all score best
    previous = None
    for setting in trials:
        if metrics[setting].score != best_score:
            previous = None
            continue
        if previous is not None and previous.features_per_step == setting.features_per_step:
            runs[-1].append(setting)
        else:
            runs.append([setting])
        previous = setting
    longest = max(runs, key=len)
    return longest[(len(longest) - 1) // 2], metrics


# --- Protocol and prompts ------------------------------------------------------------------------


@dataclass(frozen=True)
class Protocol:
    """Which concepts are erased, on which prompts and seeds; counts are per concept and per seed."""

    name: str
    objects_erased: int | None
    """The world's first n objects (None: all)."""
    styles_erased: int | None
    tuning_seeds: tuple[int, ...]
    heldout_seeds: tuple[int, ...]
    tuning_concept_prompts: int
    """Prompts naming the erased concept, per trial and tuning seed."""
    tuning_other_prompts: int
    """Prompts naming other concepts of its kind, per trial and tuning seed."""
    heldout_concept_prompts: int
    heldout_other_prompts: int
    sequential_steps: int
    """Up to this many objects erased together (capped at the tuned objects and all objects but one)."""
    sequential_prompts: int
    sequential_seeds: tuple[int, ...]
    object_strengths: tuple[float, ...] = OBJECT_STRENGTHS
    style_strengths: tuple[float, ...] = STYLE_STRENGTHS
    saeuron_features: tuple[int, ...] = SAEURON_FEATURES
    batch_size: int = 50
    """Prompts per generation call."""
    start_step: int = 0
    """Both methods edit from this sampler step on (METHOD's optional start step; 0: every step)."""
    ties: str = "mildest"
    """How tied settings of the strength search are broken (`choose_setting`)."""
    interventions: tuple[str, ...] = INTERVENTIONS
    """Each method is measured with each of these (`erase.INTERVENTIONS`)."""

    @property
    def pipelines(self) -> list[tuple[str, str]]:
        """Every (method, intervention) the protocol measures, steer first."""
        return [(method, intervention) for intervention in self.interventions for method in METHODS]

    def strengths(self, kind: str) -> tuple[float, ...]:
        """The strength grid searched for concepts of `kind`."""
        return self.object_strengths if kind == "object" else self.style_strengths

    def __post_init__(self) -> None:
        if set(self.tuning_seeds) & set(self.heldout_seeds):
            raise ValueError("Tuning and held-out seeds must differ, or the reported numbers chose themselves.")
        if isinstance(self.start_step, bool) or not isinstance(self.start_step, int) or self.start_step < 0:
            raise ValueError(f"start_step must be a whole number >= 0, got {self.start_step!r}.")
        if self.ties not in TIES:
            raise ValueError(f"ties must be one of {TIES}, got {self.ties!r}.")
        if not self.interventions or set(self.interventions) - set(INTERVENTIONS):
            raise ValueError(f"interventions must be some of {INTERVENTIONS}, got {self.interventions!r}.")


FULL = Protocol(
    name="full",
    objects_erased=None,
    styles_erased=None,
    tuning_seeds=(50_000,),
    heldout_seeds=(60_000, 60_001),
    tuning_concept_prompts=10,
    tuning_other_prompts=10,
    heldout_concept_prompts=20,
    heldout_other_prompts=20,
    sequential_steps=9,
    sequential_prompts=50,
    sequential_seeds=(60_000,),
)
QUICK = Protocol(
    name="quick",
    objects_erased=3,
    styles_erased=2,
    tuning_seeds=(50_000,),
    heldout_seeds=(60_000,),
    tuning_concept_prompts=3,
    tuning_other_prompts=3,
    heldout_concept_prompts=6,
    heldout_other_prompts=6,
    sequential_steps=3,
    sequential_prompts=20,
    sequential_seeds=(60_000,),
)
STANDARD = Protocol(
    name="standard",
    objects_erased=None,
    styles_erased=4,
    tuning_seeds=(50_000,),
    heldout_seeds=(60_000,),
    tuning_concept_prompts=6,
    tuning_other_prompts=6,
    heldout_concept_prompts=20,
    heldout_other_prompts=20,
    sequential_steps=9,
    sequential_prompts=30,
    sequential_seeds=(60_000,),
)
"""Every object and four styles, lighter search prompts: 6,596 images, 15.6 minutes on a 2-core CPU."""
PROTOCOLS = {"full": FULL, "standard": STANDARD, "quick": QUICK}


class PromptSpec(NamedTuple):
    text: str
    object: str
    style: str


def balanced_prompts(world: World, rows: Sequence[str], count: int) -> list[PromptSpec]:
    """`count` distinct prompts naming `rows` (concepts of one kind) in turn, partners and templates rotating.

    Every prefix spreads evenly over the rows, and each row's prompts walk through the other kind's
    concepts before a template repeats for one partner; `count` is capped at every combination.
    """
    kind = world.kind_of(rows[0])
    partners = world.styles if kind == "object" else world.objects
    templates = world.templates
    prompts = []
    for index in range(min(count, len(rows) * len(partners) * len(templates))):
        row = index % len(rows)
        turn, shift = divmod(index // len(rows), len(partners))
        partner = partners[(row + shift) % len(partners)]
        template = templates[(row + shift + turn) % len(templates)]
        object_name, style = (rows[row], partner) if kind == "object" else (partner, rows[row])
        prompts.append(PromptSpec(world.prompt(object_name, style, template), object_name, style))
    return prompts


@dataclass
class _Plan:
    """Every prompt the protocol generates, worked out before any image, so the total is known."""

    concepts: list[str]
    tuning: dict[str, list[PromptSpec]]
    heldout: dict[str, list[PromptSpec]]
    sequential: list[list[str]]
    """The objects erased together at each sequential step."""
    sequential_prompts: list[PromptSpec]
    untouched: dict[int, list[PromptSpec]]
    """By seed: every held-out and sequential prompt, made once without erasure."""
    images: int


def erasure_prompts(world: World, concept: str, concept_count: int, other_count: int) -> list[PromptSpec]:
    """Prompts naming `concept` (for UA), then prompts naming the other concepts of its kind (for IRA)."""
    others = [c for c in (world.objects if world.kind_of(concept) == "object" else world.styles) if c != concept]
    return balanced_prompts(world, [concept], concept_count) + balanced_prompts(world, others, other_count)


def _plan(world: World, protocol: Protocol) -> _Plan:
    objects = list(world.objects[: protocol.objects_erased])
    styles = list(world.styles[: protocol.styles_erased])
    tuning, heldout = {}, {}
    for concept in objects + styles:
        tuning[concept] = erasure_prompts(
            world, concept, protocol.tuning_concept_prompts, protocol.tuning_other_prompts
        )
        heldout[concept] = erasure_prompts(
            world, concept, protocol.heldout_concept_prompts, protocol.heldout_other_prompts
        )
    steps = min(protocol.sequential_steps, len(objects), len(world.objects) - 1)
    sequential = [list(world.objects[:count]) for count in range(1, steps + 1)]
    sequential_prompts = balanced_prompts(world, world.objects, protocol.sequential_prompts)
    untouched: dict[int, dict[str, PromptSpec]] = {}
    for seed in protocol.heldout_seeds:
        for specs in heldout.values():
            untouched.setdefault(seed, {}).update((spec.text, spec) for spec in specs)
    for seed in protocol.sequential_seeds if sequential else ():
        untouched.setdefault(seed, {}).update((spec.text, spec) for spec in sequential_prompts)
    images = len(protocol.tuning_seeds) * sum(
        len(specs) * trials_of(protocol, method, intervention, world.kind_of(concept))
        for concept, specs in tuning.items()
        for method, intervention in protocol.pipelines
    )
    pipelines = len(protocol.pipelines)
    images += sum(len(specs) for specs in heldout.values()) * pipelines * len(protocol.heldout_seeds)
    images += len(sequential) * len(sequential_prompts) * pipelines * len(protocol.sequential_seeds)
    images += sum(len(specs) for specs in untouched.values())
    return _Plan(
        objects + styles,
        tuning,
        heldout,
        sequential,
        sequential_prompts,
        {seed: list(specs.values()) for seed, specs in untouched.items()},
        images,
    )


def trials_of(protocol: Protocol, method: str, intervention: str, kind: str) -> int:
    """Settings searched per concept; a grid of one setting needs no search, so no tuning images."""
    grid = len(search_grid(method, protocol.strengths(kind), protocol.saeuron_features, intervention))
    return grid if grid > 1 else 0


def planned_images(world: World, protocol: Protocol) -> int:
    """How many images `evaluate` makes for `world` under `protocol` with an empty cache."""
    return _plan(world, protocol).images


# --- Generating and judging, with the cache ------------------------------------------------------


def _image_key(setting: Setting, concepts: Sequence[str], seed: int, prompt: str) -> tuple:
    method, strength, features, intervention = setting
    return method, intervention, tuple(concepts), float(strength), int(features), int(seed), prompt


KEY_FIELDS = ("method", "intervention", "concepts", "strength", "features_per_step", "seed", "prompt")


def _record_key(record: dict) -> tuple:
    setting = Setting(record["method"], record["strength"], record["features_per_step"], record["intervention"])
    return _image_key(setting, record["concepts"], record["seed"], record["prompt"])


class VerdictCache:
    """The classifier's verdict on every generated image, one JSON line each, so reruns skip done work.

    `fingerprints` holds this run's fingerprint per method; only records carrying their method's count.
    A line cut short by an interrupted write (or otherwise unreadable) is skipped.
    """

    def __init__(self, path: Path | None, fingerprints: dict[str, str]):
        self.path, self.fingerprints = path, fingerprints
        self.records: dict[tuple, dict] = {}
        if path is None or not path.is_file():
            return
        text = path.read_text()
        for line in text.splitlines():
            try:
                record = json.loads(line)
                if record.get("fingerprint") == fingerprints.get(record["method"]):
                    self.records[_record_key(record)] = record
            except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                continue
        if text and not text.endswith("\n"):
            with path.open("a") as handle:
                handle.write("\n")

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def add(self, records: list[dict]) -> None:
        for record in records:
            record["fingerprint"] = self.fingerprints[record["method"]]
            self.records[_record_key(record)] = record
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write("".join(json.dumps(record) + "\n" for record in records))


def fingerprint(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    method: str | None = None,
    artifact_detector: ArtifactDetector | None = None,
) -> str:
    """A short hash of what decides a verdict: sampling settings, model, SAEs, statistics, classifier and
    artifact detector.

    Hashes the first and last tensor of every network (any training changes both) and all statistics;
    with `method`, only that method's SAEs and statistics (none for `UNTOUCHED`).
    """
    world = studio.world
    digest = hashlib.sha256(json.dumps([world.name, world.steps, world.guidance, world.height, world.width]).encode())
    pipeline = studio.pipeline
    networks = [pipeline.unet, pipeline.text_encoder, pipeline.vae, classifier]
    networks += [] if artifact_detector is None else [artifact_detector]
    for key in sorted(key for key in studio.bundles if method in (None, key[0])):
        for bundle in (studio.bundles[key], *studio.extra_bundles.get(key, ())):
            networks.append(bundle.sae)
            digest.update(json.dumps([key, bundle.block, bundle.stats.concepts]).encode())
            digest.update(bundle.stats.mean_acts.float().contiguous().numpy().tobytes())
            if bundle.dictionary is not None:
                digest.update(json.dumps(bundle.dictionary.latents, sort_keys=True).encode())
    for network in networks:
        tensors = list(network.state_dict().values())
        for tensor in tensors[:1] + tensors[-1:]:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class _Judge:
    """Makes (or finds in the cache) erased images and the classifier's verdicts on them."""

    def __init__(
        self,
        studio: Studio,
        classifier: MiniCanvasClassifier,
        cache: VerdictCache,
        bar: tqdm,
        protocol: Protocol,
        artifact_detector: ArtifactDetector | None = None,
    ):
        self.studio, self.classifier, self.cache, self.bar = studio, classifier, cache, bar
        self.artifact_detector = artifact_detector
        self.batch, self.start_step = protocol.batch_size, protocol.start_step
        self.generated = self.from_cache = 0
        self.seconds = 0.0
        """Generation and classification seconds of every image served, cached ones included."""
        self.generation_seconds = 0.0
        """Seconds spent making images in this run."""

    def images(
        self, setting: Setting | None, concepts: Sequence[str], seeds: Sequence[int], specs: Sequence[PromptSpec]
    ) -> list[Judged]:
        """Verdicts on `specs` from every seed with `concepts` erased by `setting` (None: no erasure)."""
        setting = setting or Setting(UNTOUCHED, 0.0, 0)
        concepts = list(concepts) if setting.method != UNTOUCHED else []
        judged = []
        for seed in seeds:
            keys = [_image_key(setting, concepts, seed, spec.text) for spec in specs]
            missing = [spec for key, spec in zip(keys, specs) if self.cache.get(key) is None]
            self.from_cache += len(specs) - len(missing)
            self.bar.update(len(specs) - len(missing))
            for start in range(0, len(missing), self.batch):
                self._generate(setting, concepts, seed, missing[start : start + self.batch])
            for key, spec in zip(keys, specs):
                record = self.cache.get(key)
                self.seconds += record["seconds"]
                judged.append(
                    Judged(
                        spec.text, seed, spec.object, spec.style, record["object"], record["style"], record["artifact"]
                    )
                )
        return judged

    def _generate(self, setting: Setting, concepts: list[str], seed: int, specs: list[PromptSpec]) -> None:
        studio = self.studio
        method, strength, features, intervention = setting
        self.bar.set_postfix_str(
            f"{setting.key} {'+'.join(concepts) or '-'} {strength:g} x{features} seed {seed}", refresh=False
        )
        began = time.perf_counter()
        hooks = (
            studio.hooks(concepts, method, strength, self.start_step, features, intervention=intervention)
            if method != UNTOUCHED
            else []
        )
        result = studio.generate([spec.text for spec in specs], hooks, seed, include_originals=False)
        verdicts = classify(self.classifier, result.erased)
        artifacts = (
            [None] * len(specs)
            if self.artifact_detector is None
            else [p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(self.artifact_detector, result.erased)]
        )
        seconds = time.perf_counter() - began
        self.cache.add(
            [
                {
                    "method": method,
                    "intervention": intervention,
                    "concepts": concepts,
                    "strength": strength,
                    "features_per_step": features,
                    "seed": seed,
                    "prompt": spec.text,
                    "object": verdict.object,
                    "style": verdict.style,
                    "artifact": artifact,
                    "seconds": seconds / len(specs),
                }
                for spec, verdict, artifact in zip(specs, verdicts, artifacts)
            ]
        )
        self.generated += len(specs)
        self.generation_seconds += seconds
        self.bar.update(len(specs))


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
        "UA": _round(metrics.ua),
        "IRA": _round(metrics.ira),
        "CRA": _round(metrics.cra),
        "UA untouched": _round(ceiling_metrics.ua),
        "IRA untouched": _round(ceiling_metrics.ira),
        "CRA untouched": _round(ceiling_metrics.cra),
    }


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
    world, pipeline = studio.world, studio.pipeline
    if world.guidance <= 1:
        raise ValueError("Ablation swaps the conditional half for the unconditional one: it needs guidance > 1.")
    blocks = list(blocks or hook_points(pipeline.unet))
    specs = [
        PromptSpec(world.prompt(obj, style, world.templates[0]), obj, style)
        for obj in world.objects
        for style in world.styles[:styles_per_object]
    ]

    def unconditional(hidden: Tensor, step: int) -> Tensor:
        half = hidden.shape[0] // 2
        return torch.cat([hidden[:half], hidden[:half]])

    report = {}
    for block in [None, *blocks]:
        with model_lock(pipeline), ExitStack() as stack:
            if block is not None:
                stack.enter_context(hooked_block(pipeline.unet, block, unconditional))
            images = studio.generate([spec.text for spec in specs], [], seed, include_originals=False).erased
        judged = [
            Judged(spec.text, seed, spec.object, spec.style, verdict.object, verdict.style)
            for spec, verdict in zip(specs, classify(classifier, images))
        ]
        report[block or UNTOUCHED] = {kind: _round(accuracy(judged, kind)) for kind in KINDS}
    return report


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
) -> dict[str, dict]:
    """Where an erasure fails: for each concept the benchmark tuned, at its tuned setting, the share of
    the hooked block's tokens the edit changed (over steps, conditional rows) on the images where the
    concept survived and on those where it was erased, how sure the classifier is of the survivors, and
    what it names the erased images instead.

    If the survivors had markedly fewer edited tokens, the concept would be slipping past the edit's
    threshold. A classifier without a no-object class must name one of the world's concepts, so an image
    left with no object at all is still given one: its probability on survivors against that on the
    originals tells a concept that stayed from a forced choice, and `grid` (a PNG of original | erased
    pairs, one survivor a row) lets one look. The benchmark's held-out prompts naming the concept, at
    its held-out seeds, each image made beside its original.
    """
    protocol, report, pairs = results["protocol"], {}, []
    block = studio.world.block_for(kind)
    for concept, entry in results["methods"][method]["concepts"].items():
        if entry["kind"] != kind:
            continue
        chosen = entry["chosen"]
        specs = balanced_prompts(studio.world, [concept], protocol["heldout_concept_prompts"])
        shares: dict[str, list[float]] = {"survived": [], "erased": []}
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
            )
            edited = result.traces[block].edited[:, len(specs) :].float().mean((0, 2))
            originals, erased = classify(classifier, result.originals), classify(classifier, result.erased)
            images = zip(result.originals, result.erased)
            for share, original, verdict, pair in zip(edited.tolist(), originals, erased, images):
                original_probs.append(_probability(classifier, original, concept, kind))
                seen = verdict.object if kind == "object" else verdict.style
                shares["survived" if seen == concept else "erased"].append(share)
                if seen == concept:
                    survivor_probs.append(_probability(classifier, verdict, concept, kind))
                    pairs.append(pair)
                else:
                    named_instead[seen] += 1
        report[concept] = {
            "images": sum(map(len, shares.values())),
            "survived": len(shares["survived"]),
            "confident_survivors": sum(prob >= CONFIDENT for prob in survivor_probs),
            **{f"edited_share_{group}": _round(_mean(values)) for group, values in shares.items()},
            "probability_survivors": _round(_mean(survivor_probs)),
            "probability_originals": _round(_mean(original_probs)),
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


# --- The benchmark -------------------------------------------------------------------------------


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _metrics_dict(metrics: Metrics) -> dict:
    return {name: _round(value) for name, value in metrics._asdict().items()}


def _mean(values: Sequence[float | None]) -> float | None:
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None


def _check_ready(studio: Studio, classifier: MiniCanvasClassifier, concepts: list[str]) -> None:
    """Fail before any image if an SAE, a dictionary or a classifier label is missing."""
    world = studio.world
    for method in METHODS:
        for kind in KINDS:
            if not any(world.kind_of(c) == kind for c in concepts):
                continue
            bundles = [studio.bundles.get((method, kind)), *studio.extra_bundles.get((method, kind), ())]
            if any(bundle is None or (method == "saemnesia" and bundle.dictionary is None) for bundle in bundles):
                raise ValueError(
                    f"The benchmark needs a {method} SAE for {kind}s with statistics"
                    f"{' and a dictionary' if method == 'saemnesia' else ''}: train it first (see README)."
                )
    unknown = [c for c in world.objects if c not in classifier.config.objects]
    unknown += [c for c in world.styles if c not in classifier.config.styles]
    if unknown:
        raise ValueError(f"The classifier does not know {unknown}: it only scores the concepts it was trained on.")


def evaluate(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    protocol: Protocol = FULL,
    cache: Path | None = None,
    progress: bool = True,
    artifact_detector: ArtifactDetector | None = None,
) -> dict:
    """Run the benchmark (strength search, held-out report, sequential erasure) and return the results JSON.

    `cache` is a JSONL file of verdicts (created if missing); a rerun with the same model finds its
    images there and makes only what is missing. With an `artifact_detector` every image is also judged
    for artifacts and each row gains AR.
    """
    began = time.time()
    world = studio.world
    plan = _plan(world, protocol)
    _check_ready(studio, classifier, plan.concepts)
    if protocol.start_step >= world.steps:
        raise ValueError(
            f"start_step must be below the world's {world.steps} sampler steps, got {protocol.start_step}."
        )
    kinds = {concept: world.kind_of(concept) for concept in plan.concepts}
    tag = fingerprint(studio, classifier, artifact_detector=artifact_detector)
    tags = {method: fingerprint(studio, classifier, method, artifact_detector) for method in (UNTOUCHED, *METHODS)}
    if protocol.start_step:  # it decides the erased images: their verdicts are apart from those of step 0
        tags |= {method: f"{tags[method]}-from-step-{protocol.start_step}" for method in METHODS}
    logger.info("%d images planned (%s protocol)", plan.images, protocol.name)
    bar = tqdm(total=plan.images, desc=f"evaluate ({protocol.name})", unit="image", disable=not progress)
    judge = _Judge(studio, classifier, VerdictCache(cache, tags), bar, protocol, artifact_detector)
    untouched = {
        (j.seed, j.prompt): j for seed, specs in plan.untouched.items() for j in judge.images(None, (), [seed], specs)
    }

    keys = [pipeline_key(method, intervention) for method, intervention in protocol.pipelines]
    methods: dict[str, dict] = {
        pipeline_key(method, intervention): {"method": method, "intervention": intervention, "concepts": {}}
        for method, intervention in protocol.pipelines
    }
    chosen: dict[str, dict[str, Setting]] = {key: {} for key in keys}
    search_seconds = dict.fromkeys(keys, 0.0)
    for concept in plan.concepts:
        for method, intervention in protocol.pipelines:
            key, seconds_before = pipeline_key(method, intervention), judge.seconds
            chosen[key][concept], methods[key]["concepts"][concept] = _erase_concept(
                judge, protocol, plan, untouched, method, intervention, concept, kinds[concept]
            )
            search_seconds[key] += judge.seconds - seconds_before
    for key in keys:
        methods[key]["summary"] = _summary(methods[key]["concepts"])
        methods[key]["sequential"] = _sequential(judge, protocol, plan, untouched, chosen[key])
    bar.close()
    return {
        "schema": 1,
        "world": world.name,
        "protocol": {
            **asdict(protocol),
            "rules": {"selection": SELECTION_RULES[protocol.ties], "sequential": SEQUENTIAL_RULE},
        },
        "settings": {
            "steps": world.steps,
            "guidance": world.guidance,
            "height": world.height,
            "width": world.width,
            "model": portable_name(studio.pipeline.name_or_path or world.model),
            "object_block": world.object_block,
            "style_block": world.style_block,
            "extra_blocks": {
                kind: [bundle.block for bundle in bundles]
                for (method, kind), bundles in studio.extra_bundles.items()
                if method == "saemnesia"
            },
            "fingerprint": tag,
            "artifact_detector": artifact_detector is not None,
        },
        "ceiling": ceiling(list(untouched.values()), kinds),
        "methods": methods,
        "search": _search_report(protocol, plan, kinds, search_seconds),
        "paper": {
            key: {kind: dict(zip(TABLE1_METRICS, values)) for kind, values in table.items()}
            for key, table in PAPER_TABLE.items()
        },
        "images": {"planned": plan.images, "generated": judge.generated, "from_cache": judge.from_cache},
        "generation_seconds": round(judge.generation_seconds, 2),
        "wall_time_s": round(time.time() - began, 2),
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _untouched_of(
    untouched: Mapping[tuple[int, str], Judged], seeds: Sequence[int], specs: Sequence[PromptSpec]
) -> list[Judged]:
    return [untouched[seed, spec.text] for seed in seeds for spec in specs]


def _erase_concept(
    judge: _Judge,
    protocol: Protocol,
    plan: _Plan,
    untouched: Mapping[tuple[int, str], Judged],
    method: str,
    intervention: str,
    concept: str,
    kind: str,
) -> tuple[Setting, dict]:
    """Search `method`'s grid for `concept` on the tuning seeds, then measure the chosen setting on held-out ones.
    A grid of one setting (SAEmnesia's `replace`) is taken as it is, with no tuning images."""
    grid = search_grid(method, protocol.strengths(kind), protocol.saeuron_features, intervention)
    kind_size = len(judge.studio.world.concepts_of(kind))
    if len(grid) == 1:
        best, tuning = grid[0], {}
    else:
        trials = {
            setting: judge.images(setting, [concept], protocol.tuning_seeds, plan.tuning[concept]) for setting in grid
        }
        best, tuning = choose_setting(trials, concept, kind, kind_size, protocol.tuning_seeds, protocol.ties)
    heldout = judge.images(best, [concept], protocol.heldout_seeds, plan.heldout[concept])
    metrics = erasure_metrics(heldout, [concept], kind, kind_size)
    logger.info(
        "%s %s: strength %g, %d latent(s)/step: %s",
        best.key,
        concept,
        best.strength,
        best.features_per_step,
        _metrics_dict(metrics),
    )
    reference = _untouched_of(untouched, protocol.heldout_seeds, plan.heldout[concept])
    return best, {
        "kind": kind,
        "chosen": {
            "strength": best.strength,
            "features_per_step": best.features_per_step,
            "tuning_score": _round(tuning[best].score) if tuning else None,
        },
        "tuning": [
            {
                "strength": s.strength,
                "features_per_step": s.features_per_step,
                **_metrics_dict(m),
                "score": _round(m.score),
            }
            for s, m in tuning.items()
        ],
        "heldout": {**_metrics_dict(metrics), "images": len(heldout)},
        "untouched": _metrics_dict(erasure_metrics(reference, [concept], kind, kind_size)),
    }


def _sequential(
    judge: _Judge,
    protocol: Protocol,
    plan: _Plan,
    untouched: Mapping[tuple[int, str], Judged],
    chosen: Mapping[str, Setting],
) -> list[dict]:
    """UA / IRA / CRA with the first 1, 2, ... objects erased together, at the lower median of their tuned settings."""
    reference = _untouched_of(untouched, protocol.sequential_seeds, plan.sequential_prompts)
    objects = len(judge.studio.world.objects)
    steps = []
    for erased in plan.sequential:
        first = chosen[erased[0]]
        setting = joint_setting(first.method, [chosen[c] for c in erased], first.intervention)
        judged = judge.images(setting, erased, protocol.sequential_seeds, plan.sequential_prompts)
        steps.append(
            {
                "erased": erased,
                "strength": setting.strength,
                "features_per_step": setting.features_per_step,
                **_metrics_dict(erasure_metrics(judged, erased, "object", objects)),
                "images": len(judged),
                "untouched": _metrics_dict(erasure_metrics(reference, erased, "object", objects)),
            }
        )
    return steps


def _search_report(protocol: Protocol, plan: _Plan, kinds: Mapping[str, str], seconds: Mapping[str, float]) -> dict:
    """Trials, images and seconds of each pipeline's search, and what the paper's 30 x 7 grid would cost.
    `replace` searches no strength: SAeUron's trials are its latent counts, SAEmnesia's are none."""
    report: dict[str, dict] = {}
    for method, intervention in protocol.pipelines:
        key = pipeline_key(method, intervention)
        trials = sum(trials_of(protocol, method, intervention, kinds[concept]) for concept in plan.concepts)
        grid = search_grid(method, protocol.strengths("object"), protocol.saeuron_features, intervention)
        report[key] = {
            "strengths": {kind: [] if intervention == "replace" else list(protocol.strengths(kind)) for kind in KINDS},
            "features_per_step": sorted({setting.features_per_step for setting in grid}),
            "trials_per_concept": round(trials / len(plan.concepts), 2) if plan.concepts else None,
            "trials": trials,
            "images": len(protocol.tuning_seeds)
            * sum(
                trials_of(protocol, method, intervention, kinds[concept]) * len(specs)
                for concept, specs in plan.tuning.items()
            ),
            "seconds": round(seconds[key], 2),
            "seconds_per_trial": round(seconds[key] / trials, 3) if trials else None,
        }
    per_trial = report["saeuron"]["seconds_per_trial"] if "saeuron" in report else None
    paper_trials = PAPER_GRID_TRIALS * len(plan.concepts)
    report["paper_grid"] = {
        "trials_per_concept": PAPER_GRID_TRIALS,
        "trials": paper_trials,
        "estimated_seconds": None if per_trial is None else round(per_trial * paper_trials),
    }
    if "saemnesia" in report and "saeuron" in report:
        ours = report["saemnesia"]["trials_per_concept"]
        report["trials_saved"] = {
            "vs_saeuron": round(1 - ours / report["saeuron"]["trials_per_concept"], 4),
            "vs_paper_grid": round(1 - ours / PAPER_GRID_TRIALS, 4),
        }
    return report


def _summary(concepts: Mapping[str, dict]) -> dict:
    """Mean held-out (and untouched) UA, IRA, CRA over the erased concepts of each kind."""
    summary = {}
    for kind in KINDS:
        rows = [entry for entry in concepts.values() if entry["kind"] == kind]
        if not rows:
            continue
        heldout, untouched = (
            {name: _mean([row[part][name] for row in rows]) for name in METRICS} for part in ("heldout", "untouched")
        )
        summary[kind] = {
            **{name: _round(value) for name, value in heldout.items()},
            "mean": _round(_mean([heldout[name] for name in TABLE1_METRICS])),
            "concepts": len(rows),
            "untouched": {
                **{name: _round(value) for name, value in untouched.items()},
                "mean": _round(_mean([untouched[name] for name in TABLE1_METRICS])),
            },
        }
    return summary


# --- Reporting -----------------------------------------------------------------------------------


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pipelines(results: dict) -> list[str]:
    """The results' pipeline keys in the order they were measured (steer first)."""
    return list(results["methods"])


def results_table(results: dict) -> str:
    """Markdown: our held-out UA / IRA / CRA and AR next to the papers', the search cost, sequential erasure."""
    pipelines = _pipelines(results)
    lines = [
        f"Erasure on {results['world']} ({results['protocol']['name']} protocol; paper: UnlearnCanvas, Table 1 of "
        "SAEmnesia for steer, PER's object table for replace; different worlds and artifact judges, so compare the "
        "gaps, not the levels). AR: artifact rate on the erased concept's own images.",
        "",
        "| method | erased | UA | IRA | CRA | mean | AR | CRA on the erased concept's images "
        "| paper UA | paper IRA | paper CRA | paper mean | paper AR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for kind in KINDS:
        for key in pipelines:
            summary = results["methods"][key]["summary"].get(kind)
            if summary is None:
                continue
            paper = PAPER_TABLE.get(key, {}).get(kind)
            paper_cells = [*paper, sum(paper) / 3] if paper else [None] * 4
            paper_ar = PAPER_AR.get(key) if kind == "object" else None
            ours = [summary.get(name) for name in (*TABLE1_METRICS, "mean", "ar", "cra_erased")]
            lines.append(
                f"| {pipeline_label(key)} | {kind}s | " + " | ".join(map(_cell, [*ours, *paper_cells, paper_ar])) + " |"
            )
        summary = results["methods"][pipelines[0]]["summary"].get(kind)
        if summary is not None:
            untouched = summary["untouched"]
            cells = [untouched.get(name) for name in (*TABLE1_METRICS, "mean", "ar", "cra_erased")]
            lines.append(f"| untouched model | {kind}s | " + " | ".join(map(_cell, cells)) + " | | | | | |")
    search = results["search"]
    lines += ["", "Search (per concept, on tuning seeds):", ""]
    for key in pipelines:
        entry = search[key]
        grid = entry["strengths"]["object"]
        what = "strengths" if grid else "latent counts (replace scales nothing)"
        lines.append(
            f"- {pipeline_label(key)}: {entry['trials_per_concept']:g} trials a concept ({what}), "
            f"{entry['trials']} in all, {entry['images']} images, {entry['seconds']:.0f} s"
        )
    grids = search[pipelines[0]]["strengths"]
    if any(grids.values()):
        lines.append(
            "- strengths, both methods: "
            + "; ".join(f"{kind}s {', '.join(f'{value:g}' for value in grids[kind])}" for kind in KINDS)
        )
    estimate = search["paper_grid"]["estimated_seconds"]
    if "trials_saved" in search:
        lines.append(
            f"- the paper's SAeUron grid (30 x 7): {search['paper_grid']['trials']} trials, about "
            f"{'-' if estimate is None else f'{estimate:.0f}'} s at SAeUron's measured time per trial; SAEmnesia "
            f"searches {100 * search['trials_saved']['vs_paper_grid']:.2f}% fewer trials than that grid"
        )
    first = results["methods"][pipelines[0]]["sequential"]
    if first:
        header = " | ".join(f"{pipeline_label(key)} UA / IRA / CRA" for key in pipelines)
        lines += [
            "",
            "Sequential erasure (held-out seeds; UA on the erased objects, IRA on the rest):",
            "",
            f"| objects erased | {header} | untouched UA / IRA / CRA |",
            "|---:|" + "---|" * (len(pipelines) + 1),
        ]
        for index, step in enumerate(first):
            rows = [results["methods"][key]["sequential"][index] for key in pipelines]
            cells = [" / ".join(_cell(row[name]) for name in TABLE1_METRICS) for row in rows]
            cells.append(" / ".join(_cell(step["untouched"][name]) for name in TABLE1_METRICS))
            lines.append(f"| {len(step['erased'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


METRIC_COLOURS = {"ua": "tab:red", "ira": "tab:blue", "cra": "tab:green", "ar": "tab:purple"}


def plot_strength_curves(results: dict, path: Path) -> None:
    """UA, IRA, CRA against strength, averaged over each kind's erased concepts, one panel per method and kind.

    These are tuning-seed numbers (the search itself); SAeUron's feature counts are line styles. AR (the
    artifact rate on the erased concept's images) shows what the stronger steer costs the picture.
    """
    steered = [key for key in METHODS if key in results["methods"]]
    kinds = [kind for kind in KINDS if kind in results["methods"][steered[0]]["summary"]]
    figure = Figure(figsize=(11, 3.4 * max(1, len(kinds))), layout="constrained")
    axes = figure.subplots(max(1, len(kinds)), len(steered), squeeze=False)
    line_styles = ["-", "--", ":", "-."]
    for row, kind in enumerate(kinds):
        for column, method in enumerate(steered):
            axis = axes[row][column]
            concepts = [entry for entry in results["methods"][method]["concepts"].values() if entry["kind"] == kind]
            trials: dict[tuple[int, float], list[dict]] = {}
            for entry in concepts:
                for trial in entry["tuning"]:
                    trials.setdefault((trial["features_per_step"], trial["strength"]), []).append(trial)
            feature_counts = sorted({features for features, _ in trials})
            for index, features in enumerate(feature_counts):
                strengths = sorted(strength for count, strength in trials if count == features)
                for name, colour in METRIC_COLOURS.items():
                    values = [_nan(_mean([t.get(name) for t in trials[features, s]])) for s in strengths]
                    axis.plot(strengths, values, line_styles[index % 4], color=colour, marker="o", markersize=3)
            handles = [Line2D([], [], color=colour, label=name.upper()) for name, colour in METRIC_COLOURS.items()]
            if len(feature_counts) > 1:
                handles += [
                    Line2D([], [], color="grey", linestyle=line_styles[index % 4], label=f"{features} latent(s)/step")
                    for index, features in enumerate(feature_counts)
                ]
            axis.legend(handles=handles, fontsize=7)
            axis.set_title(f"{METHOD_NAMES[method]}: erasing {kind}s ({len(concepts)})")
            axis.set_xscale("symlog", linthresh=0.01)  # the grid is log-spaced from -0.03 to -30
            axis.set_xlabel("strength (gamma), log scale")
            axis.set_ylabel("% (tuning seeds, mean over concepts)")
            axis.set_ylim(-2, 102)
            axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def plot_sequential(results: dict, path: Path) -> None:
    """UA, IRA, CRA after each sequential step, every pipeline and the untouched model."""
    figure = Figure(figsize=(12, 3.4), layout="constrained")
    axes = figure.subplots(1, 3)
    pipelines = _pipelines(results)
    for axis, name in zip(axes, TABLE1_METRICS):
        for key, style in zip(pipelines, ("o-", "s--", "o-", "s--")):
            steps = results["methods"][key]["sequential"]
            colour = "tab:orange" if "+" in key else "tab:blue"
            axis.plot(
                [len(s["erased"]) for s in steps], [_nan(s[name]) for s in steps], style, color=colour,
                label=pipeline_label(key), alpha=0.9 if key.startswith("saemnesia") else 0.6,
            )  # fmt: skip
        steps = results["methods"][pipelines[0]]["sequential"]
        axis.plot(
            [len(s["erased"]) for s in steps],
            [_nan(s["untouched"][name]) for s in steps],
            ":",
            color="grey",
            label="untouched",
        )
        axis.set_title(name.upper())
        axis.set_xlabel("objects erased")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def result_paths(out: Path, protocol_name: str) -> dict[str, Path]:
    """Where `write_results` puts each file; the quick protocol's names end in `-quick`."""
    suffix = "" if protocol_name == "full" else f"-{protocol_name}"
    return {
        "json": out / f"evaluation{suffix}.json",
        "table": out / f"table{suffix}.md",
        "strength_curves": out / f"strength-curves{suffix}.png",
        "sequential": out / f"sequential{suffix}.png",
    }


def write_results(results: dict, out: Path) -> dict[str, Path]:
    """The JSON (written atomically, for the app), the markdown table and the two plots, under `out`."""
    paths = result_paths(out, results["protocol"]["name"])
    out.mkdir(parents=True, exist_ok=True)
    temporary = paths["json"].with_name(paths["json"].name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, paths["json"])
    paths["table"].write_text(results_table(results))
    plot_strength_curves(results, paths["strength_curves"])
    plot_sequential(results, paths["sequential"])
    return paths
