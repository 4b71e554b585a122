"""What the benchmark measures: its protocols (which concepts are erased, on which prompts and seeds) and the
prompts they make, planned before any image so that the total is known.

Each protocol searches every erased concept's strength on a tuning seed with sampled prompts (`erasure_prompts`),
then measures the chosen setting, and each sequential step, on every cell of the held-out grid (`grid_prompts`):
every object x every style, one training template a cell, plus the unstyled row ("a star"), as the authors'
scripts count UnlearnCanvas. The untouched model makes the grid once a seed, and with the erased objects'
prompts ablated at every block but the style block it gives UA's chance ceiling. All images are erased-only,
many prompts a call, all prompts of a call from one seed's noise; seeds are far above those `collect` uses for
the statistics (0 to 1199). Counts are for both interventions (steer alone in brackets):
- full: every object and style erased. Tuning: seed 50000, 10 prompts naming the concept and 10 naming other
  concepts of its kind (partners and templates rotating), 20 images a trial. Held-out: the whole grid at seed
  60000 for each erasure, and for sequential erasure of 1 to 9 objects. MiniCanvas (20 objects x 10 styles:
  220 cells) makes 18,600 tuning images, 26,400 held-out, 7,920 sequential, 220 untouched and 220 for the
  chance ceiling: 53,360 (34,400). A second held-out seed (60001) would make it 80,200, the held-out grid then
  2.8 times the search, so the grid gets one seed, never fewer cells.
- standard: every object and 4 styles, 6 + 6 tuning prompts, the whole grid at seed 60000: MiniCanvas 38,408
  (23,024).
- quick: the first 3 objects and 2 styles, erased and gridded (3 x 2 cells and 3 unstyled); tuning 3 + 3
  prompts, seed 60000, sequential 1 to 3 objects: 1,236 images (1,002) in any world of at least 4 objects. A
  demo and a smoke test: too few images to compare methods.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from saemnesia.erase import INTERVENTIONS, METHODS
from saemnesia.evaluate.search import OBJECT_STRENGTHS, SAEURON_FEATURES, STYLE_STRENGTHS, TIES, search_grid
from saemnesia.minicanvas.data import PLAIN_TEMPLATE
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
    sequential_steps: int
    """Up to this many objects erased together (capped at the tuned objects and all objects but one)."""
    sequential_seeds: tuple[int, ...]
    grid_objects: int | None = None
    """The held-out grid's objects: the world's first n (None: all). Every erasure, held-out and sequential, is
    measured on every cell of the grid (`grid_prompts`); it must hold the erased concepts."""
    grid_styles: int | None = None
    """The held-out grid's styles: the world's first n (None: all)."""
    plain_template: str | None = PLAIN_TEMPLATE
    """The prompt of the grid's unstyled row, one prompt an object (None: no unstyled row, for a world whose
    prompts have no unstyled form; CRA of erased styles is then undefined)."""
    grid_templates: tuple[str, ...] | None = None
    """The held-out grid's templates (None: the world's, those its model was trained on). MiniCanvas's held-out
    templates, which its model never saw, ask whether an erasure holds on prompts written otherwise."""
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
    heldout_seeds=(60_000,),
    tuning_concept_prompts=10,
    tuning_other_prompts=10,
    sequential_steps=9,
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
    sequential_steps=3,
    sequential_seeds=(60_000,),
    grid_objects=3,
    grid_styles=2,
)
STANDARD = Protocol(
    name="standard",
    objects_erased=None,
    styles_erased=4,
    tuning_seeds=(50_000,),
    heldout_seeds=(60_000,),
    tuning_concept_prompts=6,
    tuning_other_prompts=6,
    sequential_steps=9,
    sequential_seeds=(60_000,),
)
"""Every object and four styles, lighter search prompts: the module docstring counts its images."""
PROTOCOLS = {"full": FULL, "standard": STANDARD, "quick": QUICK}


class PromptSpec(NamedTuple):
    text: str
    object: str
    style: str | None
    """None: an unstyled prompt ("a star")."""


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


def grid_prompts(
    world: World,
    objects: int | None = None,
    styles: int | None = None,
    plain_template: str | None = PLAIN_TEMPLATE,
    templates: Sequence[str] | None = None,
) -> list[PromptSpec]:
    """Every cell of the grid of the world's first `objects` x first `styles` (None: all) once, then its unstyled
    row (`plain_template`, one prompt an object; none without a template).

    The authors' scripts count every cell of UnlearnCanvas's grid; ours draws each cell's template from the
    world's training templates, turning one a step along both rows and columns, so every object and every
    style meets each template (where it has as many cells) and a sub-grid's cells are the full grid's.
    `templates` replaces the world's.
    """
    templates = templates or world.templates
    cells = [
        PromptSpec(world.prompt(object_name, style, templates[(row + column) % len(templates)]), object_name, style)
        for row, object_name in enumerate(world.objects[:objects])
        for column, style in enumerate(world.styles[:styles])
    ]
    if plain_template is None:
        return cells
    return cells + [PromptSpec(world.prompt(o, "", plain_template), o, None) for o in world.objects[:objects]]


@dataclass
class Plan:
    """Every prompt the protocol generates, worked out before any image, so the total is known."""

    concepts: list[str]
    tuning: dict[str, list[PromptSpec]]
    grid: list[PromptSpec]
    """The held-out grid (`grid_prompts`): every erasure, held-out and sequential, is measured on all of it."""
    sequential: list[list[str]]
    """The objects erased together at each sequential step."""
    untouched_seeds: list[int]
    """The seeds the untouched model makes the grid at: the held-out and sequential ones."""
    chance: list[PromptSpec]
    """The grid's prompts naming an erased object, made at the held-out seeds with every block but the style
    block ablated for UA's chance ceiling (`diagnostics.chance_blocks`)."""
    images: int


def erasure_prompts(world: World, concept: str, concept_count: int, other_count: int) -> list[PromptSpec]:
    """Prompts naming `concept` (for UA), then prompts naming the other concepts of its kind (for IRA)."""
    others = [c for c in (world.objects if world.kind_of(concept) == "object" else world.styles) if c != concept]
    return balanced_prompts(world, [concept], concept_count) + balanced_prompts(world, others, other_count)


def make_plan(world: World, protocol: Protocol, part: tuple[int, int] | None = None, sequential: bool = False) -> Plan:
    """The protocol's images; with `part` (index from 1, count) one share of the work that processes run side by
    side: every count-th erased concept from the index-th, the chance ceiling in the first part only, and no
    sequential erasure (it needs every erased object's tuned setting). With `sequential` too, the share is instead
    every count-th step of sequential erasure from the index-th, with the objects those steps erase (their search
    and held-out images, which the concepts' parts have made by then). The run without `part` makes what is left."""
    objects = list(world.objects[: protocol.objects_erased])
    styles = list(world.styles[: protocol.styles_erased])
    every_step = min(protocol.sequential_steps, len(objects), len(world.objects) - 1)
    sequential_steps = [list(world.objects[:count]) for count in range(1, every_step + 1)]
    if part is not None:
        index, count = part
        if not 1 <= index <= count:
            raise ValueError(f"part must be I/N with 1 <= I <= N, got {index}/{count}.")
        if sequential:
            sequential_steps = sequential_steps[index - 1 :: count]
            objects, styles = objects[: max(map(len, sequential_steps), default=0)], []
        else:
            sequential_steps = []
            shared = (objects + styles)[index - 1 :: count]
            objects, styles = [c for c in objects if c in shared], [c for c in styles if c in shared]
    grid = grid_prompts(
        world, protocol.grid_objects, protocol.grid_styles, protocol.plain_template, protocol.grid_templates
    )
    outside = [concept for concept in objects + styles if not any(concept in (s.object, s.style) for s in grid)]
    if outside:
        raise ValueError(f"The held-out grid must hold every erased concept: {outside} lie outside it.")
    tuning = {
        concept: erasure_prompts(world, concept, protocol.tuning_concept_prompts, protocol.tuning_other_prompts)
        for concept in objects + styles
    }
    sequential_seeds = protocol.sequential_seeds if sequential_steps else ()
    untouched_seeds = list(dict.fromkeys((*protocol.heldout_seeds, *sequential_seeds)))
    chance_objects = [] if part and (part[0] > 1 or sequential) else world.objects[: protocol.objects_erased]
    chance = [spec for spec in grid if spec.object in chance_objects]
    images = len(protocol.tuning_seeds) * sum(
        len(specs) * trials_of(protocol, method, intervention, world.kind_of(concept))
        for concept, specs in tuning.items()
        for method, intervention in protocol.pipelines
    )
    erasures = len(tuning) * len(protocol.heldout_seeds) + len(sequential_steps) * len(protocol.sequential_seeds)
    images += len(grid) * (erasures * len(protocol.pipelines) + len(untouched_seeds))
    images += len(chance) * len(protocol.heldout_seeds)
    return Plan(objects + styles, tuning, grid, sequential_steps, untouched_seeds, chance, images)


def trials_of(protocol: Protocol, method: str, intervention: str, kind: str) -> int:
    """Settings searched per concept; a grid of one setting needs no search, so no tuning images."""
    grid = len(search_grid(method, protocol.strengths(kind), protocol.saeuron_features, intervention))
    return grid if grid > 1 else 0


def planned_images(world: World, protocol: Protocol) -> int:
    """How many images `evaluate` makes for `world` under `protocol` with an empty cache."""
    return make_plan(world, protocol).images
