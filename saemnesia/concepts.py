"""Concept statistics, the concept score, and the concept dictionary (concept -> latent).

`mean_acts[c, t, i]` is latent i's mean activation on concept c's prompts at sampler step t, averaged
over the image's tokens and the prompts. The score of latent i for c at step t is its share of c's
activation minus its mean share on every other concept (SAeUron's score, used by both methods).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

if TYPE_CHECKING:
    from saemnesia.sae import Sae


class UnknownConceptError(KeyError):
    """A concept name the statistics or the dictionary does not know."""

    def __str__(self) -> str:
        return str(self.args[0])


def check_concepts(requested: list[str], known: list[str]) -> None:
    unknown = [name for name in requested if name not in known]
    if unknown:
        raise UnknownConceptError(
            f"Unknown concept(s) {', '.join(map(repr, unknown))}; known concepts: {', '.join(known)}."
        )


@dataclass
class ConceptStats:
    """Per-concept, per-step mean latent activations, with the timesteps they were taken at."""

    concepts: list[str]
    kinds: list[str]
    timesteps: Tensor
    """[T] the scheduler timesteps of the sampler steps the statistics were collected at."""
    mean_acts: Tensor
    """[C, T, L] mean activation of each latent."""

    def index(self, concept: str) -> int:
        check_concepts([concept], self.concepts)
        return self.concepts.index(concept)

    def others_mean(self) -> Tensor:
        """[C, T, L] mean activation over all the other concepts (the edit's firing threshold)."""
        count = len(self.concepts)
        return (self.mean_acts.sum(0, keepdim=True) - self.mean_acts) / max(1, count - 1)

    def scores(self) -> Tensor:
        """[C, T, L] share of activation on the concept minus the mean share on the others."""
        shares = self.mean_acts / self.mean_acts.sum(-1, keepdim=True).clamp_min(1e-12)
        count = len(self.concepts)
        others = (shares.sum(0, keepdim=True) - shares) / max(1, count - 1)
        return shares - others

    def concepts_driving(self, latent: int, count: int = 5) -> list[tuple[str, float]]:
        """The concepts on which a latent fires most (time-averaged mean activation), strongest first."""
        if not 0 <= latent < self.mean_acts.shape[-1]:
            raise ValueError(f"neuron must be in [0, {self.mean_acts.shape[-1] - 1}], got {latent}.")
        activation = self.mean_acts[:, :, latent].mean(1)
        order = torch.argsort(activation, descending=True)[:count].tolist()
        return [(self.concepts[i], float(activation[i])) for i in order]

    def score_profile(self, concept: str) -> Tensor:
        """[L] a concept's time-averaged score over every latent (one spike, or many peaks)."""
        return self.scores()[self.index(concept)].mean(0)

    def step_for_timestep(self, timestep: float) -> int:
        """The statistics step nearest to a sampler timestep (so any step count can use them)."""
        return int(torch.argmin((self.timesteps.float() - float(timestep)).abs()))

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        metadata = {"concepts": json.dumps(self.concepts), "kinds": json.dumps(self.kinds)}
        tensors = {"timesteps": self.timesteps.contiguous(), "mean_acts": self.mean_acts.contiguous()}
        save_file(tensors, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> ConceptStats:
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No concept statistics at '{path}': make them with `python -m saemnesia stats`.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
            tensors = load_file(path)
            concepts, kinds = json.loads(metadata["concepts"]), json.loads(metadata["kinds"])
            stats = cls(concepts, kinds, tensors["timesteps"], tensors["mean_acts"])
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"'{path}' is not a concept statistics file ({error!r}).") from error
        if stats.mean_acts.shape[:2] != (len(concepts), len(stats.timesteps)):
            raise ValueError(
                f"'{path}': mean_acts has shape {tuple(stats.mean_acts.shape)}, not [concepts, steps, latents]."
            )
        return stats


@dataclass
class ConceptDictionary:
    """Each concept's own latent (SAEmnesia binds one concept to exactly one latent)."""

    latents: dict[str, int]
    kinds: dict[str, str]

    def latent(self, concept: str) -> int:
        check_concepts([concept], list(self.latents))
        return self.latents[concept]

    def concepts_of(self, latent: int) -> list[str]:
        return [concept for concept, index in self.latents.items() if index == latent]

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        entries = [{"concept": c, "kind": self.kinds[c], "latent": i} for c, i in self.latents.items()]
        Path(path).write_text(json.dumps({"concepts": entries}, indent=1) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> ConceptDictionary:
        try:
            entries = json.loads(Path(path).read_text())["concepts"]
            return cls({e["concept"]: int(e["latent"]) for e in entries}, {e["concept"]: e["kind"] for e in entries})
        except FileNotFoundError:
            raise FileNotFoundError(
                f"No concept dictionary at '{path}': make one with `python -m saemnesia stats`."
            ) from None
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"'{path}' is not a concept dictionary ({error!r}).") from error


def build_dictionary(stats: ConceptStats, kind_order: tuple[str, ...] = ("object", "style")) -> ConceptDictionary:
    """Greedy assignment: kind by kind (objects first), each concept takes its best free latent.

    "Best" is the highest time-averaged score; a latent once taken is never given to another concept.
    """
    mean_scores = stats.scores().mean(1)
    taken: set[int] = set()
    latents: dict[str, int] = {}
    order = [c for kind in kind_order for c, k in zip(stats.concepts, stats.kinds) if k == kind]
    order += [c for c in stats.concepts if c not in order]
    for concept in order:
        ranking = torch.argsort(mean_scores[stats.concepts.index(concept)], descending=True).tolist()
        latents[concept] = next(index for index in ranking if index not in taken)
        taken.add(latents[concept])
    return ConceptDictionary(latents, dict(zip(stats.concepts, stats.kinds)))


@torch.no_grad()
def concept_stats_from_activations(
    sae: Sae,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    concepts: list[str],
    kinds: list[str],
    timesteps: Tensor,
) -> ConceptStats:
    """Statistics from labelled block outputs: the mean of every latent's activation per concept and step.

    Each batch is `(tokens [n, d], concept_ids [n, m], steps [n])`: a token counts for all m of its
    concepts (e.g. its prompt's object and its style). The mean runs over tokens, which is the mean
    over each image's tokens and then over prompts, as every image has the same number of tokens.
    """
    device = sae.W_dec.device
    num_latents, num_steps = sae.num_latents, len(timesteps)
    sums = torch.zeros(len(concepts) * num_steps, num_latents, device=device)
    counts = torch.zeros(len(concepts) * num_steps, device=device)
    for tokens, concept_ids, steps in batches:
        codes = sae.encode(tokens.to(device))
        concept_ids, steps = concept_ids.to(device), steps.to(device)
        for column in range(concept_ids.shape[1]):
            rows = concept_ids[:, column] * num_steps + steps
            cells = rows[:, None] * num_latents + codes.top_indices
            sums.view(-1).index_add_(0, cells.flatten(), codes.top_acts.flatten().float())
            counts.index_add_(0, rows, torch.ones_like(rows, dtype=counts.dtype))
    mean_acts = (sums / counts.clamp_min(1)[:, None]).view(len(concepts), num_steps, num_latents)
    return ConceptStats(list(concepts), list(kinds), timesteps.clone(), mean_acts.cpu())


@dataclass
class ConceptFootprints:
    """Per concept, what naming it changes at each token of the block: the SAE's mean reconstruction of the
    concept's images, token by token at each sampler step, minus the mean over the other concepts of its kind.

    Paint adds a footprint to draw a concept where none was asked for. One latent's decoder row, the same on every
    token, cannot do that: on MiniCanvas painting a supervised object latent never made the classifier see the
    painted object, while its footprint, which holds the object's shape, does (docs/neurons.md, "A concept's
    footprint")."""

    concepts: list[str]
    timesteps: Tensor
    """[T] the timesteps of the sampler steps, as in `ConceptStats`."""
    footprints: Tensor
    """[C, T, h*w, d]."""

    def of(self, concept: str) -> Tensor:
        """[T, h*w, d] the concept's footprint."""
        check_concepts([concept], self.concepts)
        return self.footprints[self.concepts.index(concept)]

    def save(self, path: str | Path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        tensors = {"timesteps": self.timesteps.contiguous(), "footprints": self.footprints.half().contiguous()}
        save_file(tensors, str(path), metadata={"concepts": json.dumps(self.concepts)})

    @classmethod
    def load(cls, path: str | Path) -> ConceptFootprints:
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as handle:
                concepts = json.loads((handle.metadata() or {})["concepts"])
            tensors = load_file(path)
            footprints = cls(concepts, tensors["timesteps"], tensors["footprints"].float())
        except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
            raise ValueError(f"'{path}' is not a concept footprints file ({error!r}).") from error
        shape = tuple(footprints.footprints.shape)
        if len(shape) != 4 or shape[:2] != (len(concepts), len(footprints.timesteps)):
            raise ValueError(f"'{path}': footprints has shape {shape}, not [concepts, steps, tokens, d].")
        return footprints
