"""The benchmark's measures on judged images: UA, IRA and CRA (UnlearnCanvas's, counted over the object x style
grid as the authors' scripts count them, and pooled for the strength search), the artifact rate, the untouched
model's ceiling, and the papers' numbers ours are set beside."""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from typing import NamedTuple

KINDS = ("object", "style")
TABLE1_METRICS = ("ua", "ira", "cra")
METRICS = (*TABLE1_METRICS, "cra_erased", "ar", "ar_others", "cra_styled", "nothing_rate")
"""Every field of `Metrics`, as results rows name them."""

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


class Judged(NamedTuple):
    """One generated image: what its prompt asked for and what the classifier saw."""

    prompt: str
    seed: int
    object: str
    style: str | None
    """None: an unstyled prompt ("a star"), which asks for no style."""
    seen_object: str
    seen_style: str
    artifact: bool | None = None
    """Whether the artifact detector calls the image corrupted (None: not judged)."""
    nothing: bool | None = None
    """Whether a second classifier, one with a no-object label, calls the image "nothing" (None: not judged)."""


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
    cra_styled: float | None = None
    """The other kind's accuracy over the styled cells of the grid (`grid_metrics` only). For erased objects it is
    CRA; for erased styles it is what CRA meant before the authors' counting: the objects of the styled pictures,
    where a style erasure acts, where CRA reads them from the unstyled prompts only."""
    nothing_rate: float | None = None
    """The share of the erased objects' images a classifier with a no-object label calls "nothing": gone, rather
    than turned into another object (`grid_metrics` with `nothing`; None for styles or other classifiers)."""

    @property
    def score(self) -> float | None:
        """(UA + IRA) / 2, what the strength search maximises."""
        return None if self.ua is None or self.ira is None else (self.ua + self.ira) / 2


def other_kind(kind: str) -> str:
    return "style" if kind == "object" else "object"


def _asked(judged: Judged, kind: str) -> str | None:
    return judged.object if kind == "object" else judged.style


def _seen(judged: Judged, kind: str) -> str:
    return judged.seen_object if kind == "object" else judged.seen_style


def accuracy(judged: Sequence[Judged], kind: str) -> float | None:
    """100 x the share of images whose classifier verdict of `kind` is what the prompt asked for; images that
    asked for no concept of `kind` (unstyled prompts, for styles) do not count."""
    asked = [j for j in judged if _asked(j, kind) is not None]
    return 100 * sum(_seen(j, kind) == _asked(j, kind) for j in asked) / len(asked) if asked else None


def judged_artifact_rate(judged: Sequence[Judged]) -> float | None:
    """100 x the share of images the artifact detector called corrupted; None if none was judged."""
    called = [j.artifact for j in judged if j.artifact is not None]
    return 100 * sum(called) / len(called) if called else None


def _per_concept(judged: Sequence[Judged], kind: str, hit: Callable[[Judged], bool]) -> dict[str, float]:
    """100 x the share of each concept's images where `hit` holds, every grid cell (object, style) of the concept
    weighing the same however many images (seeds) it holds, as the authors' scripts count a full grid."""
    cells: dict[tuple[str, str | None], list[bool]] = {}
    for j in judged:
        if _asked(j, kind) is not None:
            cells.setdefault((j.object, j.style), []).append(hit(j))
    shares: dict[str, list[float]] = {}
    for (object_name, style), hits in cells.items():
        shares.setdefault(object_name if kind == "object" else style, []).append(100 * sum(hits) / len(hits))
    return {concept: sum(values) / len(values) for concept, values in shares.items()}


def concept_accuracies(judged: Sequence[Judged], kind: str) -> dict[str, float]:
    """Each concept of `kind`'s accuracy over its grid cells, each cell weighing the same: an object's styled
    cells and its unstyled one, a style's column."""
    return _per_concept(judged, kind, lambda j: _seen(j, kind) == _asked(j, kind))


def _our_measures(judged: Sequence[Judged], erased: Collection[str], kind: str) -> dict[str, float | None]:
    """What we measure beside UnlearnCanvas's numbers: the other kind on the erased concepts' images, the AR."""
    on_erased = [j for j in judged if _asked(j, kind) in erased]
    on_others = [j for j in judged if _asked(j, kind) not in erased]
    return {
        "cra_erased": accuracy(on_erased, other_kind(kind)),
        "ar": judged_artifact_rate(on_erased),
        "ar_others": judged_artifact_rate(on_others),
    }


def grid_metrics(judged: Sequence[Judged], erased: Collection[str], kind: str, nothing: str | None = None) -> Metrics:
    """UA, IRA and CRA as the authors' scripts count them over the object x style grid (SAeUron's, after its
    2025-10-15 fix, which SAEmnesia reuses): per concept, each grid cell weighing the same.

    Erased objects: UA = 100 - their accuracy over their cells (styled and unstyled), IRA the mean over the other
    objects of theirs, CRA the mean over styles of their accuracy down their column (every object; unstyled
    prompts ask no style). Erased styles: UA and IRA the same over the styles' columns, CRA the objects' accuracy
    on the unstyled prompts alone. Several erased concepts: UA averages theirs, IRA the rest of their kind. The
    grid is the concepts the images ask for (a sub-grid counts the same way). With `nothing`, the label of a
    classifier for an image with no object, `nothing_rate` is the share of the erased objects' images given it;
    without it, the share a second classifier called "nothing" (`Judged.nothing`), where one judged them.
    """
    own = concept_accuracies(judged, kind)
    erased_accuracy = mean_of_known([own.get(concept) for concept in erased])
    if kind == "object":
        cross = concept_accuracies(judged, "style")
    else:
        cross = concept_accuracies([j for j in judged if j.style is None], "object")
    styled = concept_accuracies([j for j in judged if j.style is not None], other_kind(kind))
    gone = None
    judged_nothing = nothing is not None or any(j.nothing is not None for j in judged)
    if kind == "object" and judged_nothing:
        called_nothing = _per_concept(
            judged, kind, lambda j: j.seen_object == nothing if nothing is not None else bool(j.nothing)
        )
        gone = mean_of_known([called_nothing.get(concept) for concept in erased])
    return Metrics(
        None if erased_accuracy is None else 100 - erased_accuracy,
        mean_of_known([value for concept, value in own.items() if concept not in erased]),
        mean_of_known(list(cross.values())),
        **_our_measures(judged, erased, kind),
        cra_styled=mean_of_known(list(styled.values())),
        nothing_rate=gone,
    )


def erasure_metrics(judged: Sequence[Judged], erased: Collection[str], kind: str, kind_size: int) -> Metrics:
    """UA on images naming an erased concept, IRA on those naming another of its kind, CRA on the other kind,
    each pooled over the images: the strength search's measure on its sampled prompts (`grid_metrics` counts
    the held-out grid as the authors do).

    `kind` is the erased concepts' kind ("object" or "style"), `kind_size` how many concepts of that kind
    the world has. CRA is accuracy on the other kind over the styled grid: the erased concepts' images weigh
    len(erased) / kind_size of it and the others' images the rest, however many of each were sampled.
    Unweighted, the protocols' equal halves of erased and other prompts would count the erased
    concepts' images 5x too much at one erased object of 10. `cra_erased` reports them alone.
    """
    if not 0 < len(erased) <= kind_size:
        raise ValueError(f"{len(erased)} erased concept(s) do not fit a world of {kind_size} {kind}s.")
    on_erased = [j for j in judged if _asked(j, kind) in erased]
    on_others = [j for j in judged if _asked(j, kind) not in erased]
    erased_accuracy = accuracy(on_erased, kind)
    ours = _our_measures(judged, erased, kind)
    cross_erased, cross_others = ours["cra_erased"], accuracy(on_others, other_kind(kind))
    if cross_erased is None or cross_others is None:
        cross = cross_others if cross_erased is None else cross_erased
    else:
        share = len(erased) / kind_size
        cross = share * cross_erased + (1 - share) * cross_others
    return Metrics(None if erased_accuracy is None else 100 - erased_accuracy, accuracy(on_others, kind), cross, **ours)


def ceiling(judged: Sequence[Judged], concepts: Mapping[str, str]) -> dict:
    """The untouched model's object and style accuracy, overall and per concept (`concepts`: name -> kind)."""
    return {
        "object_accuracy": rounded(accuracy(judged, "object")),
        "style_accuracy": rounded(accuracy(judged, "style")),
        "images": len(judged),
        "per_concept": {
            concept: rounded(accuracy([j for j in judged if _asked(j, kind) == concept], kind))
            for concept, kind in concepts.items()
        },
    }


def rounded(value: float | None) -> float | None:
    """A metric as results store it: 2 decimals, None kept."""
    return None if value is None else round(value, 2)


def metrics_dict(metrics: Metrics) -> dict:
    """`Metrics` as a results row, rounded."""
    return {name: rounded(value) for name, value in metrics._asdict().items()}


def mean_of_known(values: Sequence[float | None]) -> float | None:
    """The mean of the values that are not None; None if none is."""
    present = [value for value in values if value is not None]
    return sum(present) / len(present) if present else None
