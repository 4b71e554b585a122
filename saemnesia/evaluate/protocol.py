"""What the benchmark measures: its protocols (which concepts are erased, on which prompts and seeds) and the
prompts they make, planned before any image so that the total is known.

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
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from saemnesia.erase import INTERVENTIONS, METHODS
from saemnesia.evaluate.search import OBJECT_STRENGTHS, SAEURON_FEATURES, STYLE_STRENGTHS, TIES, search_grid
from saemnesia.worlds import World


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
class Plan:
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


def make_plan(world: World, protocol: Protocol) -> Plan:
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
    return Plan(
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
    return make_plan(world, protocol).images
