"""The benchmark itself: `evaluate` searches each method's setting per concept, reports it on the held-out grid,
erases objects sequentially, measures UA's chance ceiling and returns the results JSON.

The JSON `write_results` writes (`evaluation.json`, or `evaluation-quick.json`); metrics in % with
2 decimals, null where undefined (e.g. IRA with no concept left):
    schema: 2; world; protocol: the `Protocol` fields and `rules` (how settings were chosen)
    settings: {steps, guidance, height, width, model, object_block, style_block, extra_blocks, fingerprint,
               replace_rule (the fields of the rule `replace` used), artifact_detector, no_object_label}
    ceiling: {object_accuracy, style_accuracy, images, per_concept: {concept: accuracy on its kind}}
        (the untouched model on the grid at every seed it was made at, pooled)
    chance: {blocks, survival, per_object: {object: survival}, ua_ceiling, images} or null with no object erased
        (`diagnostics.chance_survival`: the erased objects' grid prompts at the held-out seeds, every block but
        the style block ablated)
    methods: {"saemnesia" | "saeuron" | "saemnesia+replace" | "saeuron+replace": {method, intervention,
        concepts: {concept: {kind, chosen: {strength, features_per_step, tuning_score},
                             tuning: [{strength, features_per_step, ua, ira, cra, cra_erased, ar, ar_others,
                                       cra_styled: null, nothing_rate: null, score}, ...],
                             heldout: {ua, ira, cra, cra_erased, ar, ar_others, cra_styled, nothing_rate, images},
                             untouched: {...}}},
        summary: {"object" | "style": {ua, ira, cra, cra_erased, ar, ar_others, cra_styled, nothing_rate, mean,
                                       concepts, untouched: {...}}},
        sequential: [{erased: [objects], strength, features_per_step, ua, ira, cra, ..., images,
                      untouched: {...}}, ...]}}
    Tuning rows pool their sampled images (`erasure_metrics`); held-out, sequential and untouched rows count the
    grid as the authors' scripts do (`grid_metrics`). `nothing_rate` is set for objects scored by a classifier
    with a no-object label (`settings.no_object_label`), null otherwise.
    search: {<pipeline>: {strengths: {kind: grid}, features_per_step, trials_per_concept, trials, images,
             seconds, seconds_per_trial}, paper_grid: {trials_per_concept: 210, trials, estimated_seconds},
             trials_saved: 1 - ours/theirs per concept, vs our SAeUron grid and vs the paper's}
    paper: Table 1 (steer) and PER's object table (replace) by pipeline and kind
    images: {planned, generated (made by this run), from_cache (earlier runs, or reused within this one)}
    generation_seconds (this run's image making); wall_time_s; created (UTC, ISO 8601)
Search seconds add up the stored time of every image a search used, so a resumed run reports the same.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path

from tqdm.auto import tqdm

from saemnesia.erase import METHODS
from saemnesia.evaluate.cache import UNTOUCHED, Judge, VerdictCache, fingerprint
from saemnesia.evaluate.diagnostics import chance_blocks, chance_survival, unconditional_blocks
from saemnesia.evaluate.metrics import (
    KINDS,
    METRICS,
    PAPER_TABLE,
    TABLE1_METRICS,
    Judged,
    ceiling,
    grid_metrics,
    mean_of_known,
    metrics_dict,
    rounded,
)
from saemnesia.evaluate.protocol import FULL, Plan, PromptSpec, Protocol, make_plan, trials_of
from saemnesia.evaluate.search import (
    PAPER_GRID_TRIALS,
    SELECTION_RULES,
    SEQUENTIAL_RULE,
    Setting,
    choose_setting,
    joint_setting,
    pipeline_key,
    search_grid,
)
from saemnesia.generate import PairResult
from saemnesia.minicanvas.artifacts import ArtifactDetector
from saemnesia.minicanvas.classifier import NO_OBJECT, MiniCanvasClassifier
from saemnesia.studio import Studio
from saemnesia.worlds import portable_name

logger = logging.getLogger(__name__)

CHANCE = "chance"
"""The method name, in the cache, of the images made for UA's chance ceiling (the untouched model's fingerprint)."""


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
    part: tuple[int, int] | None = None,
    nothing_classifier: MiniCanvasClassifier | None = None,
    sequential: bool = False,
) -> dict:
    """Run the benchmark (strength search, held-out report, sequential erasure) and return the results JSON.

    `cache` is a JSONL file of verdicts (created if missing); a rerun with the same model finds its
    images there and makes only what is missing. With an `artifact_detector` every image is also judged
    for artifacts and each row gains AR. A `classifier` with a no-object label gives each erased object's
    rows `nothing_rate`, and so does a `nothing_classifier` with that label judging every image beside the
    `classifier`, which still scores UA, IRA and CRA. The chance ceiling ablates blocks with classifier-free
    guidance: guidance > 1.
    With `part` (index, count) it makes only that share of the images (`make_plan`) into its own file beside
    `cache` and returns what it did, not results: run it in as many processes as cores, then once without
    `part`, which finds every part's verdicts and makes the rest. With `sequential` too, the part is a share of
    the sequential erasure steps instead, for after the concepts' parts (`make_plan`).
    """
    began = time.time()
    world = studio.world
    plan = make_plan(world, protocol, part, sequential)
    _check_ready(studio, classifier, plan.concepts)
    if protocol.start_step >= world.steps:
        raise ValueError(
            f"start_step must be below the world's {world.steps} sampler steps, got {protocol.start_step}."
        )
    kinds = {concept: world.kind_of(concept) for concept in plan.concepts}
    if nothing_classifier is not None and _nothing(nothing_classifier) is None:
        raise ValueError(f"The nothing classifier must have the '{NO_OBJECT}' label: train it with --no-object-share.")
    judges = {"artifact_detector": artifact_detector, "nothing_classifier": nothing_classifier}
    tag = fingerprint(studio, classifier, **judges)
    tags = {method: fingerprint(studio, classifier, method, **judges) for method in (UNTOUCHED, *METHODS)}
    if protocol.start_step:  # it decides the erased images: their verdicts are apart from those of step 0
        tags |= {method: f"{tags[method]}-from-step-{protocol.start_step}" for method in METHODS}
    tags[CHANCE] = tags[UNTOUCHED]
    logger.info("%d images planned (%s protocol)", plan.images, protocol.name)
    share = "sequential part" if sequential else "part"
    name = protocol.name if part is None else f"{protocol.name}, {share} {part[0]} of {part[1]}"
    bar = tqdm(total=plan.images, desc=f"evaluate ({name})", unit="image", disable=not progress)
    judge = Judge(studio, classifier, VerdictCache(cache, tags, part, sequential), bar, protocol, **judges)
    chance = _chance(judge, protocol, plan)
    untouched = {(j.seed, j.prompt): j for j in judge.images(None, (), plan.untouched_seeds, plan.grid)}

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
    if part is not None:
        if plan.sequential:
            for key in keys:
                _sequential(judge, protocol, plan, untouched, chosen[key])
        bar.close()
        return {
            "world": world.name,
            "protocol": protocol.name,
            "part": list(part),
            "concepts": plan.concepts,
            "sequential_steps": [len(erased) for erased in plan.sequential],
            "images": {"planned": plan.images, "generated": judge.generated, "from_cache": judge.from_cache},
            "wall_time_s": round(time.time() - began, 2),
        }
    for key in keys:
        methods[key]["summary"] = _summary(methods[key]["concepts"])
        methods[key]["sequential"] = _sequential(judge, protocol, plan, untouched, chosen[key])
    bar.close()
    return {
        "schema": 2,
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
            "replace_rule": asdict(judge.replace_rule),
            "artifact_detector": artifact_detector is not None,
            "no_object_label": _nothing(classifier),
            "nothing_classifier": nothing_classifier is not None,
        },
        "ceiling": ceiling(list(untouched.values()), kinds),
        "chance": chance,
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


def _nothing(classifier: MiniCanvasClassifier) -> str | None:
    """The classifier's label for an image with no object, if it has one."""
    return NO_OBJECT if NO_OBJECT in classifier.config.objects else None


class _AblatedStudio:
    """The studio as a `Judge` uses it, every image made with `blocks` ablated and no erasure hook: so the chance
    ceiling's verdicts are cached, counted and resumed like every other image."""

    def __init__(self, studio: Studio, blocks: Sequence[str]):
        self.studio, self.blocks, self.world = studio, blocks, studio.world

    def hooks(self, *args, **kwargs) -> list:
        return []

    def generate(self, prompts: list[str], hooks: list, seed: int, include_originals: bool = True) -> PairResult:
        with unconditional_blocks(self.studio, self.blocks):
            return self.studio.generate(prompts, hooks, seed, include_originals=include_originals)


def _chance(judge: Judge, protocol: Protocol, plan: Plan) -> dict | None:
    """UA's chance ceiling on the erased objects' grid prompts at the held-out seeds (`chance_survival`)."""
    if not plan.chance:
        return None
    blocks = chance_blocks(judge.studio)
    ablated = Judge(_AblatedStudio(judge.studio, blocks), judge.classifier, judge.cache, judge.bar, protocol)
    judged = ablated.images(Setting(CHANCE, 0.0, 0, "ablate"), blocks, protocol.heldout_seeds, plan.chance)
    judge.generated += ablated.generated
    judge.from_cache += ablated.from_cache
    judge.generation_seconds += ablated.generation_seconds
    return chance_survival(judged, blocks)


def _untouched_of(
    untouched: Mapping[tuple[int, str], Judged], seeds: Sequence[int], specs: Sequence[PromptSpec]
) -> list[Judged]:
    return [untouched[seed, spec.text] for seed in seeds for spec in specs]


def _erase_concept(
    judge: Judge,
    protocol: Protocol,
    plan: Plan,
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
    heldout = judge.images(best, [concept], protocol.heldout_seeds, plan.grid)
    metrics = grid_metrics(heldout, [concept], kind, _nothing(judge.classifier))
    logger.info(
        "%s %s: strength %g, %d latent(s)/step: %s",
        best.key,
        concept,
        best.strength,
        best.features_per_step,
        metrics_dict(metrics),
    )
    reference = _untouched_of(untouched, protocol.heldout_seeds, plan.grid)
    return best, {
        "kind": kind,
        "chosen": {
            "strength": best.strength,
            "features_per_step": best.features_per_step,
            "tuning_score": rounded(tuning[best].score) if tuning else None,
        },
        "tuning": [
            {
                "strength": s.strength,
                "features_per_step": s.features_per_step,
                **metrics_dict(m),
                "score": rounded(m.score),
            }
            for s, m in tuning.items()
        ],
        "heldout": {**metrics_dict(metrics), "images": len(heldout)},
        "untouched": metrics_dict(grid_metrics(reference, [concept], kind, _nothing(judge.classifier))),
    }


def _sequential(
    judge: Judge,
    protocol: Protocol,
    plan: Plan,
    untouched: Mapping[tuple[int, str], Judged],
    chosen: Mapping[str, Setting],
) -> list[dict]:
    """UA / IRA / CRA with the first 1, 2, ... objects erased together, at the lower median of their tuned settings."""
    reference = _untouched_of(untouched, protocol.sequential_seeds, plan.grid)
    nothing = _nothing(judge.classifier)
    steps = []
    for erased in plan.sequential:
        first = chosen[erased[0]]
        setting = joint_setting(first.method, [chosen[c] for c in erased], first.intervention)
        judged = judge.images(setting, erased, protocol.sequential_seeds, plan.grid)
        steps.append(
            {
                "erased": erased,
                "strength": setting.strength,
                "features_per_step": setting.features_per_step,
                **metrics_dict(grid_metrics(judged, erased, "object", nothing)),
                "images": len(judged),
                "untouched": metrics_dict(grid_metrics(reference, erased, "object", nothing)),
            }
        )
    return steps


def _search_report(protocol: Protocol, plan: Plan, kinds: Mapping[str, str], seconds: Mapping[str, float]) -> dict:
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
            {name: mean_of_known([row[part][name] for row in rows]) for name in METRICS}
            for part in ("heldout", "untouched")
        )
        summary[kind] = {
            **{name: rounded(value) for name, value in heldout.items()},
            "mean": rounded(mean_of_known([heldout[name] for name in TABLE1_METRICS])),
            "concepts": len(rows),
            "untouched": {
                **{name: rounded(value) for name, value in untouched.items()},
                "mean": rounded(mean_of_known([untouched[name] for name in TABLE1_METRICS])),
            },
        }
    return summary
