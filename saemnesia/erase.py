"""The erasure edit (METHOD section 4): scale chosen latents on the tokens where they fire, or (PER)
overwrite those tokens with undetected ones of the same feature map.

On every token, a selected latent i of concept c that fires above its mean on the other concepts is
multiplied by `strength * mean_acts[c, t, i]` (strength negative: it multiplies, it does not clamp).
The block output keeps the SAE's reconstruction error, `x_out = x + (z_edit - z) W_dec`, so an empty
edit returns `x` exactly and only the edited latents' decoder rows are ever read.

SAEmnesia edits one latent per concept, its dictionary latent, at every step. The SAeUron baseline
edits, at every step, the concept's top-scoring latents (a percentile of the scores).

Two interventions share those latents and thresholds (`INTERVENTIONS`):
- `steer`, the papers' edit above. Strong negative multipliers push the block's output out of the
  distribution the UNet was trained on (PER, arXiv 2606.31699, Figure 2), hence artifacts.
- `replace`, patch replacement (PER): the SAE only *detects* the concept's tokens, those where one of its
  latents has a pre-activation above its mean on the other concepts, and each detected token's block
  output is overwritten with the raw output at the nearest undetected token of the same feature map (same
  image, same guidance half). Nothing is scaled, so the strength plays no part. `ReplaceRule` holds the
  choices PER leaves open, three of them ours; docs/per.md has the measurements that chose them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from saemnesia.concepts import ConceptDictionary, ConceptFootprints, ConceptStats, check_concepts
from saemnesia.sae import EncoderOutput, Sae

METHODS = ("saemnesia", "saeuron")
INTERVENTIONS = ("steer", "replace")
FALLBACKS = ("none", "unconditional")
SOURCES = ("nearest", "mean")
SCOPES = ("tokens", "map")


@dataclass(frozen=True)
class ReplaceRule:
    """What `replace` overwrites and with what. Each world names its rule (`World.replace_rule`), measured best on
    its tuning seed (`python -m saemnesia compare-replacements`, docs/per.md); the rest stay so that anyone can
    measure again."""

    sticky: bool = True
    """Ours: a token detected at one step stays detected for the rest of the generation. On a coarse block
    the detection flickers, and a token let go returns the concept to the next steps."""
    fallback: str = "unconditional"
    """A map whose every token is detected has nothing of its own to sample from. `none` leaves it as it is
    (PER gives no rule); `unconditional` (ours) gives the conditional map the unconditional half's tokens at
    the same places: what the block made of the same image without the prompt, in distribution too."""
    dilate: bool = False
    """Grow the mask by one token (its 8 neighbours) before replacing."""
    source: str = "nearest"
    """`nearest`: each detected token takes the nearest undetected one (ties to the first, row-major);
    `mean`: the mean of all undetected tokens of the map."""
    scope: str = "tokens"
    """`tokens`: only the detected tokens are replaced. `map` (ours): a map with more than `map_share` of its tokens
    detected goes whole to the fallback, for a world whose objects fill most of the block's grid, so that the
    tokens the detector misses around a detected object go too."""
    map_share: float = 0.0
    """With scope `map`, the share of a map's tokens that must be detected before the whole map goes (0: any one
    token); a higher share spares the maps where the detector fires on a few tokens of another concept."""

    def __post_init__(self) -> None:
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback must be one of {', '.join(FALLBACKS)}, got {self.fallback!r}.")
        if self.source not in SOURCES:
            raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {self.source!r}.")
        if self.scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {self.scope!r}.")
        if not 0 <= self.map_share < 1:
            raise ValueError(f"map_share must be in [0, 1), got {self.map_share}.")
        if self.scope == "map" and self.fallback == "none":
            raise ValueError("scope 'map' leaves no token to take from: it needs the 'unconditional' fallback.")


PER_RULE = ReplaceRule()
"""PER's nearest-token rule, made sticky and given a fallback: the rule of a world that names none."""


STRENGTH_RANGE = (-1000.0, 0.0)
"""Down to the benchmark's strongest object strength: unsupervised latents, whose mean activation is
small, need -100 to -1000 to erase an object (`evaluate.OBJECT_STRENGTHS`)."""
PAPER_STRENGTHS = (-1.0, -5.0, -10.0, -15.0, -20.0, -25.0, -30.0)


@dataclass(frozen=True)
class StepEdit:
    """The edit at one sampler step: which latents, their multipliers and firing thresholds."""

    latents: Tensor
    """[n] latent indices, distinct."""
    multipliers: Tensor
    """[n] strength * mean activation on the erased concept."""
    thresholds: Tensor
    """[n] mean activation on the other concepts: the latent is edited only where it fires above."""


@dataclass(frozen=True)
class Erasure:
    """A full erasure: one `StepEdit` per statistics step, and the sampler step it starts at."""

    concepts: tuple[str, ...]
    method: str
    strength: float
    steps: tuple[StepEdit, ...]
    timesteps: Tensor
    """[T] the timesteps of the statistics steps, used to map any sampler's steps onto them."""
    start_step: int = 0
    intervention: str = "steer"
    """`steer` the latents, or `replace` the tokens they detect (`INTERVENTIONS`)."""
    replace_rule: ReplaceRule = PER_RULE
    """How `replace` works; steer ignores it."""

    def at(self, step: int, timestep: float) -> StepEdit | None:
        """The edit for sampler step `step` at `timestep`, or None before the start step."""
        if step < self.start_step:
            return None
        return self.steps[int(torch.argmin((self.timesteps.float() - float(timestep)).abs()))]


def check_strength(strength: float) -> float:
    low, high = STRENGTH_RANGE
    if not isinstance(strength, (int, float)) or not math.isfinite(strength) or not low <= strength <= high:
        raise ValueError(
            f"strength must be a finite number in [{low:g}, {high:g}] (negative erases), got {strength!r}."
        )
    return float(strength)


def check_intervention(intervention: object) -> str:
    if intervention not in INTERVENTIONS:
        raise ValueError(f"intervention must be one of {', '.join(INTERVENTIONS)}, got {intervention!r}.")
    return intervention


def features_for_percentile(percentile: float, num_latents: int) -> int:
    """SAeUron's percentile as a count of latents per step: 99.999 / 99.995 / 99.99 of 20,480 -> 1 / 2 / 3."""
    return max(1, math.ceil(num_latents * (100 - percentile) / 100 - 1e-9))


def _merge(edits: list[tuple[Tensor, Tensor, Tensor]]) -> StepEdit:
    """Join several concepts' edits at one step; a latent claimed twice keeps its first edit."""
    latents, multipliers, thresholds = (torch.cat(parts) for parts in zip(*edits))
    seen: set[int] = set()
    keep = [i for i, latent in enumerate(latents.tolist()) if not (latent in seen or seen.add(latent))]
    keep_index = torch.tensor(keep, dtype=torch.long)
    return StepEdit(latents[keep_index], multipliers[keep_index], thresholds[keep_index])


def saemnesia_erasure(
    stats: ConceptStats,
    dictionary: ConceptDictionary,
    concepts: list[str],
    strength: float,
    start_step: int = 0,
    intervention: str = "steer",
    replace_rule: ReplaceRule = PER_RULE,
) -> Erasure:
    """SAEmnesia: each concept's own dictionary latent, at every step."""
    strength = check_strength(strength)
    intervention = check_intervention(intervention)
    check_concepts(concepts, stats.concepts)
    latent_of = {concept: dictionary.latent(concept) for concept in concepts}
    others = stats.others_mean()
    steps = []
    for step in range(len(stats.timesteps)):
        parts = []
        for concept in concepts:
            c, latent = stats.index(concept), torch.tensor([latent_of[concept]])
            parts.append((latent, strength * stats.mean_acts[c, step, latent], others[c, step, latent]))
        steps.append(_merge(parts))
    return Erasure(
        tuple(concepts), "saemnesia", strength, tuple(steps), stats.timesteps, start_step, intervention, replace_rule
    )


def saeuron_erasure(
    stats: ConceptStats,
    concepts: list[str],
    strength: float,
    features_per_step: int = 1,
    start_step: int = 0,
    intervention: str = "steer",
    replace_rule: ReplaceRule = PER_RULE,
) -> Erasure:
    """SAeUron: at every step, the concept's `features_per_step` highest-scoring latents."""
    strength = check_strength(strength)
    intervention = check_intervention(intervention)
    check_concepts(concepts, stats.concepts)
    if not 1 <= features_per_step <= stats.mean_acts.shape[-1]:
        raise ValueError(f"features_per_step must be in [1, {stats.mean_acts.shape[-1]}], got {features_per_step}.")
    scores, others = stats.scores(), stats.others_mean()
    steps = []
    for step in range(len(stats.timesteps)):
        parts = []
        for concept in concepts:
            c = stats.index(concept)
            latents = torch.topk(scores[c, step], features_per_step).indices
            parts.append((latents, strength * stats.mean_acts[c, step, latents], others[c, step, latents]))
        steps.append(_merge(parts))
    return Erasure(
        tuple(concepts), "saeuron", strength, tuple(steps), stats.timesteps, start_step, intervention, replace_rule
    )


@dataclass(frozen=True)
class PreparedEdit:
    """A `StepEdit` made ready for one SAE: on its device, with the edited latents' decoder rows
    gathered, so each UNet call does only the arithmetic."""

    latents: Tensor
    """[n] latent indices."""
    decoder_rows: Tensor
    """[n, d] their rows of `W_dec`: the only ones the edit reads."""
    gains: Tensor
    """[n] multiplier - 1: the token moves by activation * gain along the latent's decoder row."""
    thresholds: Tensor
    """[n], at least 0: a ReLU code below zero never fires."""
    encoder_rows: Tensor
    """[n, d] their rows of `W_enc`, and below their biases with `b_dec` folded in: all that detection reads."""
    encoder_bias: Tensor
    """[n] `b_enc - W_enc b_dec` at the edited latents."""

    @classmethod
    def of(cls, sae: Sae, edit: StepEdit) -> PreparedEdit:
        W_dec = sae.W_dec.detach()
        latents = edit.latents.to(W_dec.device)
        encoder_rows = sae.encoder.weight.detach()[latents]
        return cls(
            latents,
            W_dec[latents],
            (edit.multipliers - 1).to(W_dec.device, W_dec.dtype),
            edit.thresholds.to(W_dec.device, W_dec.dtype).clamp_min(0),
            encoder_rows,
            sae.encoder.bias.detach()[latents] - encoder_rows @ sae.b_dec.detach(),
        )


def token_changes(activation: Tensor, edit: PreparedEdit) -> tuple[Tensor, Tensor]:
    """What the edit adds to each token, `(z_edit - z) W_dec`, given the edited latents' codes `[N, n]`;
    and where each latent fired above its threshold `[N, n]`."""
    fires = activation > edit.thresholds
    return torch.where(fires, activation * edit.gains, 0.0) @ edit.decoder_rows, fires


def apply_step_edit(tokens: Tensor, codes: EncoderOutput, edit: PreparedEdit) -> tuple[Tensor, Tensor]:
    """Edit tokens `[N, d]` given their SAE codes; returns the new tokens and the edited-token mask `[N]`.

    Only the edited latents' activations are read from the top-k codes and only their decoder rows
    are used: `x + (z_edit - z) W_dec[latents]`.
    """
    matches = codes.top_indices.unsqueeze(-1) == edit.latents  # [N, k, n]
    activation = (codes.top_acts.unsqueeze(-1) * matches).sum(-2)  # [N, n]
    change, fires = token_changes(activation, edit)
    return (tokens + change).to(tokens.dtype), fires.any(-1)


@dataclass(frozen=True)
class EditEncoder:
    """The SAE's encoder made ready for the edit once per generation: `b_dec` folded into the bias,
    `W_enc (x - b_dec) + b_enc = W_enc x + (b_enc - W_enc b_dec)`, so encoding a call's tokens is one addmm."""

    weight: Tensor
    """[L, d] W_enc."""
    bias: Tensor
    """[L, 1] b_enc - W_enc b_dec, a column: the edit encodes latents-first."""
    k: int

    @classmethod
    def of(cls, sae: Sae) -> EditEncoder:
        weight = sae.encoder.weight.detach()
        return cls(weight, (sae.encoder.bias.detach() - weight @ sae.b_dec.detach()).unsqueeze(-1), sae.cfg.k)

    def pre_activations(self, tokens: Tensor) -> Tensor:
        """[L, N] for tokens `[N, d]`, latents first: with few tokens a call, a CPU's matmul runs `W_enc x^T`
        much faster than `x W_enc^T` at SD's width (`bench`'s note: 0.88x the floor against 1.38-1.79x)."""
        return torch.addmm(self.bias, self.weight, tokens.to(self.weight.dtype).t())


def rank_counted_changes(encoder: EditEncoder, tokens: Tensor, edit: PreparedEdit) -> Tensor:
    """`token_changes` for tokens `[N, d]` without their top-k codes, for an edit that records none.

    An edited latent's code is its pre-activation where that ranks among the k largest and is above
    zero; it is edited where it also exceeds its threshold (never below zero), so one comparison of
    the pre-activation with the threshold stands for both. The rank is found by counting the larger
    pre-activations instead of a top-k over the whole dictionary, which on a CPU costs more than the
    encoder's matmul for small SAEs. The same change as the top-k codes give but for float rounding.
    """
    pre_acts = encoder.pre_activations(tokens)  # [L, N]
    values = pre_acts.index_select(0, edit.latents)  # [n, N]
    # Counted in a float 0/1 mask, as large as `pre_acts` per edited latent: on CPUs several times faster
    # to fill and sum than a bool one.
    mask = pre_acts.new_empty((len(values), *pre_acts.shape))
    larger = torch.gt(pre_acts.unsqueeze(0), values.unsqueeze(1), out=mask).sum(1)  # [n, N]
    fires = (larger < encoder.k) & (values > edit.thresholds.unsqueeze(-1))
    return torch.where(fires, values * edit.gains.unsqueeze(-1), 0.0).t() @ edit.decoder_rows


def detected_tokens(tokens: Tensor, edit: PreparedEdit) -> Tensor:
    """[N] bool: the tokens `[N, d]` where one of the edit's latents has a pre-activation above its
    threshold, the concept's detection mask for `replace`.

    Unlike the steer's mask it does not ask the latent to rank among the top k: a concept's latent can be
    outranked on a token that plainly shows the concept (measured in docs/per.md: ignoring the rank
    detects more of the concept and spares the others as well). So it reads only the edited latents'
    encoder rows, `n` dot products a token instead of the whole dictionary.
    """
    pre_acts = torch.addmm(edit.encoder_bias, tokens.to(edit.encoder_rows.dtype), edit.encoder_rows.t())  # [N, n]
    return (pre_acts > edit.thresholds).any(-1)


def grid_distances(height: int, width: int, device: torch.device | str = "cpu") -> Tensor:
    """[h*w, h*w] squared distances between the token positions of a feature map, row-major."""
    rows, columns = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    positions = torch.stack([rows.flatten(), columns.flatten()], -1).float()
    return torch.cdist(positions, positions).square().to(device)


def replacement_sources(detected: Tensor, distances: Tensor) -> Tensor:
    """[M, h*w] for each token of each of `M` maps, the token whose value it takes under `replace`.

    An undetected token keeps its own value; a detected one takes the nearest undetected token of the
    same map (ties to the first in row-major order), so every replaced value is one the block itself
    produced on this image: in distribution by construction. A map whose every token is detected has
    nothing to sample from and is left as it is: its sources are -1 where detected.
    """
    positions = torch.arange(detected.shape[-1], device=detected.device)
    far = torch.where(detected.unsqueeze(1), torch.inf, distances)  # [M, to, from]: detected sources are out
    nearest = far.argmin(-1)
    nearest = torch.where(torch.isinf(far.amin(-1)), -1, nearest)
    return torch.where(detected, nearest, positions)


def dilated(detected: Tensor, height: int, width: int) -> Tensor:
    """[M, h*w] the mask grown by one token in every direction (diagonals included)."""
    grid = detected.view(-1, 1, height, width).float()
    return (torch.nn.functional.max_pool2d(grid, 3, stride=1, padding=1) > 0).view(detected.shape)


def undetected_means(maps: Tensor, detected: Tensor) -> Tensor:
    """[M, d] each map's mean over its undetected tokens (zero where every token is detected)."""
    keep = (~detected).unsqueeze(-1).to(maps.dtype)
    return (maps * keep).sum(1) / keep.sum(1).clamp_min(1)


def replace_tokens(maps: Tensor, sources: Tensor, fallback: Tensor | None = None, source: str = "nearest") -> Tensor:
    """`maps` `[M, h*w, d]` with every replaced token (`replacement_sources`) set to its source's value, or with
    `source="mean"` to the mean of its map's undetected tokens; where the source is -1 (nothing undetected) the
    token takes `fallback`'s value at the same place, or keeps its own."""
    replaced = sources != torch.arange(sources.shape[-1], device=sources.device)
    if source == "mean":
        taken = torch.where(replaced.unsqueeze(-1), undetected_means(maps, replaced).unsqueeze(1), maps)
    else:
        taken = maps.gather(1, sources.clamp_min(0).unsqueeze(-1).expand_as(maps))
    stranded = (sources < 0).unsqueeze(-1)
    return torch.where(stranded, maps if fallback is None else fallback, taken)


PAINT_STRENGTH_RANGE = (-100.0, 100.0)
"""Paint's strength: for a latent, in multiples of the concept's mean activation at each step (the erasure's
unit); for a footprint, in multiples of the footprint."""


@dataclass(frozen=True)
class Paint:
    """Paint one latent, or a concept's footprint, into (strength > 0) or out of (strength < 0) the masked tokens
    of a block, at a range of sampler steps. A latent moves each masked token by `strength * mean_acts[c, t,
    latent]` along its decoder row (`c` the concept the latent holds), in both guidance halves; a footprint moves
    each masked token by `strength` times the footprint at that token, in the conditional half only, as if the
    prompt had named the concept there. The other tokens, and every token outside the steps, are left exactly as
    they are."""

    latent: int
    mask: Tensor
    """[h*w] bool, row-major over the block's token grid."""
    amounts: Tensor
    """[T] how far the masked tokens move, per statistics step."""
    timesteps: Tensor
    """[T] the statistics steps' timesteps, to map any sampler's steps onto them."""
    steps: tuple[int, int]
    """[first, last] sampler steps painted, inclusive."""
    footprint: Tensor | None = None
    """[T, h*w, d] the concept's footprint (`ConceptFootprints`), painted instead of the latent's decoder row."""

    def at(self, step: int, timestep: float) -> tuple[float, int]:
        """How far the masked tokens move at sampler step `step` (0 outside the step range), and the statistics
        step it maps to."""
        index = int(torch.argmin((self.timesteps.float() - float(timestep)).abs()))
        inside = self.steps[0] <= step <= self.steps[1]
        return (float(self.amounts[index]) if inside else 0.0), index


def _check_paint_strength(strength: object) -> float:
    low, high = PAINT_STRENGTH_RANGE
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number in [{low:g}, {high:g}], got {strength!r}.")
    if not low <= strength <= high:
        raise ValueError(f"strength must be in [{low:g}, {high:g}], got {strength!r}.")
    return float(strength)


def paint_edit(stats: ConceptStats, concept: str, latent: int, strength: float, mask: Tensor, steps: tuple[int, int]):
    """The `Paint` of `latent` at `strength` times `concept`'s mean activation on it, step by step."""
    amounts = _check_paint_strength(strength) * stats.mean_acts[stats.index(concept), :, latent]
    return Paint(latent, mask, amounts, stats.timesteps, steps)


def footprint_edit(
    footprints: ConceptFootprints, concept: str, latent: int, strength: float, mask: Tensor, steps: tuple[int, int]
) -> Paint:
    """The `Paint` of `concept`'s footprint at `strength`; `latent` is the concept's, whose heatmap shows after."""
    footprint = footprints.of(concept)
    amounts = torch.full((len(footprints.timesteps),), _check_paint_strength(strength))
    return Paint(latent, mask, amounts, footprints.timesteps, steps, footprint)


def paint_tokens(tokens: Tensor, mask: Tensor, direction: Tensor, amount: float) -> Tensor:
    """`tokens` [M, h*w, d] with `amount * direction` (`[d]`, or `[h*w, d]` token by token) added on the masked
    positions `[h*w]` only."""
    return tokens + (amount * mask.to(tokens.dtype)).view(1, -1, 1) * direction.to(tokens.dtype)
