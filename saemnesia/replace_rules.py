"""Which `replace` rule: the choices PER leaves open (source, mask, what a fully detected map does),
measured side by side on the benchmark's tuning prompts and seed, so the choice never sees a held-out image.

For each rule, every concept of a kind is erased on its tuning prompts (those naming it, for UA and the
other kind kept, then those naming others of its kind, for IRA); the conditional half's detection is
recorded to say how often a map detects nothing, everything, and how much of it on average. With an
artifact detector, each rule's artifact rate on the erased concepts' own images (AR) is measured as well,
so a rule that erases more by damaging the picture shows it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict
from pathlib import Path

import torch

from saemnesia.erase import PER_RULE, ReplaceRule
from saemnesia.evaluate import FULL, Judged, Protocol, erasure_metrics, erasure_prompts
from saemnesia.evaluate.metrics import mean_of_known
from saemnesia.minicanvas.artifacts import ARTIFACT_THRESHOLD, ArtifactDetector, artifact_probabilities
from saemnesia.minicanvas.classifier import MiniCanvasClassifier, classify
from saemnesia.studio import Studio

RULES = {
    "nearest (PER as written)": ReplaceRule(sticky=False, fallback="none"),
    "mean of the undetected": ReplaceRule(sticky=False, fallback="none", source="mean"),
    "nearest, mask dilated by one": ReplaceRule(sticky=False, fallback="none", dilate=True),
    "nearest + unconditional fallback": ReplaceRule(sticky=False),
    "nearest + sticky mask": ReplaceRule(fallback="none"),
    "nearest + sticky + unconditional fallback": PER_RULE,
    "sticky + fallback, mask dilated": ReplaceRule(dilate=True),
    "sticky + fallback, whole map once detected": ReplaceRule(scope="map"),
    "sticky + fallback, whole map once an eighth is detected": ReplaceRule(scope="map", map_share=0.125),
    "sticky + fallback, whole map once a fifth is detected": ReplaceRule(scope="map", map_share=0.2),
    "sticky + fallback, whole map once a quarter is detected": ReplaceRule(scope="map", map_share=0.25),
    "sticky + fallback, whole map once half is detected": ReplaceRule(scope="map", map_share=0.5),
}
"""Named rules to compare; a world that names no rule of its own replaces by `erase.PER_RULE`."""
RULE_METRICS = ("ua", "ira", "cra", "cra_erased", "ar", "ar_others")
DETECTION_SHARES = ("maps_detecting_nothing", "maps_detecting_everything", "tokens_detected")


@torch.no_grad()
def compare_replace_rules(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    rules: Mapping[str, ReplaceRule] = RULES,
    method: str = "saemnesia",
    kind: str = "object",
    protocol: Protocol = FULL,
    artifact_detector: ArtifactDetector | None = None,
) -> dict:
    """UA / IRA / CRA (and CRA on the erased concept's own images) of each rule, over every concept of `kind`,
    with the conditional half's detection shares, on `protocol`'s tuning seeds and prompts; with
    `artifact_detector`, AR on the erased concept's images and on the others' too (else None)."""
    world = studio.world
    concepts = world.concepts_of(kind)
    report = {}
    for name, rule in rules.items():
        metrics, nothing, everything, shares = [], [], [], []
        for concept in concepts:
            specs = erasure_prompts(world, concept, protocol.tuning_concept_prompts, protocol.tuning_other_prompts)
            hooks = studio.hooks([concept], method, 0.0, 0, 1, True, "replace", rule)
            judged = []
            for seed in protocol.tuning_seeds:
                result = studio.generate([spec.text for spec in specs], hooks, seed, include_originals=False)
                detected = result.traces[world.block_for(kind)].edited  # [steps, rows, tokens]
                nothing.append(float((~detected.any(-1)).float().mean()))
                everything.append(float(detected.all(-1).float().mean()))
                shares.append(float(detected.float().mean()))
                verdicts = classify(classifier, result.erased)
                artifacts = [None] * len(specs)
                if artifact_detector is not None:
                    probabilities = artifact_probabilities(artifact_detector, result.erased)
                    artifacts = [p >= ARTIFACT_THRESHOLD for p in probabilities]
                judged += [
                    Judged(spec.text, seed, spec.object, spec.style, v.object, v.style, artifact)
                    for spec, v, artifact in zip(specs, verdicts, artifacts)
                ]
            metrics.append(erasure_metrics(judged, [concept], kind, len(concepts)))
        report[name] = {
            "rule": asdict(rule),
            **{metric: _mean([getattr(m, metric) for m in metrics]) for metric in RULE_METRICS},
            "maps_detecting_nothing": round(100 * sum(nothing) / len(nothing), 1),
            "maps_detecting_everything": round(100 * sum(everything) / len(everything), 1),
            "tokens_detected": round(100 * sum(shares) / len(shares), 1),
        }
    return {
        "world": world.name,
        "method": method,
        "kind": kind,
        "block": world.block_for(kind),
        "seeds": list(protocol.tuning_seeds),
        "prompts_per_concept": protocol.tuning_concept_prompts + protocol.tuning_other_prompts,
        "world_rule": asdict(world.replace_rule),
        "rules": report,
    }


def _mean(values: list[float | None]) -> float | None:
    mean = mean_of_known(values)
    return None if mean is None else round(mean, 2)


def rules_table(comparison: Mapping) -> str:
    """Markdown: one row per rule."""
    lines = [
        f"Replace rules, {comparison['method']} erasing {comparison['kind']}s at {comparison['block']} (tuning seeds "
        f"{', '.join(map(str, comparison['seeds']))}; detection on the conditional half, every step)",
        "",
        "| rule | UA | IRA | CRA | CRA on the erased concept's images | AR | AR on the others' images "
        "| maps detecting nothing (%) | maps detecting every token (%) | tokens detected (%) |",
        "|---|" + "---:|" * 9,
    ]
    for name, row in comparison["rules"].items():
        cells = [row.get(key) for key in (*RULE_METRICS, *DETECTION_SHARES)]
        name += " (the world's rule)" if row["rule"] == comparison.get("world_rule") else ""
        lines.append(f"| {name} | " + " | ".join("-" if value is None else f"{value:.1f}" for value in cells) + " |")
    return "\n".join(lines) + "\n"


def write_comparison(comparison: dict, out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "replace-rules.json", "table": out / "replace-rules.md"}
    paths["json"].write_text(json.dumps(comparison, indent=1) + "\n")
    paths["table"].write_text(rules_table(comparison))
    return paths
