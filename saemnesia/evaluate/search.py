"""The strength search: each method's grid of settings, how the best one is chosen on the tuning seeds, and the
tuned settings that sequential erasure, the app and `generate` read back from the results."""

from __future__ import annotations

import statistics
from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

from saemnesia.erase import features_for_percentile
from saemnesia.evaluate.metrics import Judged, Metrics, erasure_metrics

SAEURON_PERCENTILES = (99.999, 99.995, 99.99)
PAPER_LATENTS = 20_480
SAEURON_FEATURES = tuple(features_for_percentile(p, PAPER_LATENTS) for p in SAEURON_PERCENTILES)
PAPER_GRID_TRIALS = 30 * 7
OBJECT_STRENGTHS = (-1.0, -3.0, -10.0, -30.0, -100.0, -300.0, -1000.0)
STYLE_STRENGTHS = (-0.03, -0.1, -0.3, -1.0, -3.0, -10.0, -30.0)
"""The 7 strengths both methods search per concept, one grid per kind, log-spaced (x sqrt(10)).

The edit multiplies a latent by gamma * mu, its mean activation on the concept, so where a method's
optimum lies depends on its latents' scale. On the first MiniCanvas's object block an unsupervised latent's mu is
~10x smaller than a supervised one's (0.2-0.8 against 1.2-5.3): with the earlier shared grid, -0.03 to
-30, SAeUron took the strongest -30 for 8 of its 10 objects and, given -100, all 10 there, so the grid
was capping the baseline. The object grid therefore reaches -1000 (SAeUron now settles at -100 to
-1000, SAEmnesia at -10 to -300; neither needs anything milder than -1, where both erase nothing). On
the style block both methods' choices lie inside -0.03 to -30 but for SAEmnesia's strongest, so that
grid stays. Each keeps the paper's count of 7 strengths.
"""
DEFAULT_STRENGTH = -10.0
"""For an erasure the benchmark tuned nothing for (the SD world, a world without cached results)."""
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
