"""The benchmark's measures on judged images: UA, IRA and CRA (UnlearnCanvas's), the artifact rate, the
untouched model's ceiling, and the papers' numbers ours are set beside."""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from typing import NamedTuple

KINDS = ("object", "style")
TABLE1_METRICS = ("ua", "ira", "cra")
METRICS = (*TABLE1_METRICS, "cra_erased", "ar", "ar_others")

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
