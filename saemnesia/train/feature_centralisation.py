"""Feature centralisation: how much of each concept's score its single best latent holds, and how far
apart the concepts' decoder rows are (the `centralisation` command, `centralisation.json`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch.nn.functional as F

from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.sae import Sae
from saemnesia.train.activations import write_json

CENTRALISATION_FILE = "centralisation.json"


def centralisation(stats: ConceptStats, dictionary: ConceptDictionary) -> list[dict]:
    """For every concept, the share of its positive time-averaged score mass held by its best latent,
    and whether that latent is the concept's dictionary latent."""
    scores = stats.scores().mean(1)
    rows = []
    for index, (concept, kind) in enumerate(zip(stats.concepts, stats.kinds)):
        positive = scores[index].clamp_min(0)
        mass = float(positive.sum())
        best = int(scores[index].argmax())
        own = dictionary.latents.get(concept)
        rows.append(
            {
                "concept": concept,
                "kind": kind,
                "best_latent": best,
                "best_share": float(positive[best]) / mass if mass > 0 else 0.0,
                "dictionary_latent": own,
                "dictionary_share": float(positive[own]) / mass if mass > 0 and own is not None else 0.0,
                "best_is_dictionary": best == own,
            }
        )
    return rows


def decoder_overlap(sae: Sae, dictionary: ConceptDictionary) -> float:
    """Mean |cosine| between the decoder rows of distinct dictionary latents: near 0 when pushing one
    concept's latent moves only its own direction, near 1 when it moves every concept's."""
    rows = F.normalize(sae.W_dec.detach()[list(dictionary.latents.values())], dim=-1)
    cosines = (rows @ rows.T).abs()
    pairs = max(len(rows) * (len(rows) - 1), 1)
    return float((cosines.sum() - cosines.diagonal().sum()) / pairs)


def centralisation_report(
    variants: Mapping[str, tuple[ConceptStats, ConceptDictionary]],
    block: str | None = None,
    overlaps: Mapping[str, float] | None = None,
) -> dict:
    """Side by side, per concept, for each SAE variant (e.g. "unsupervised" and "supervised"), with a summary
    (and each variant's `decoder_overlap`, where given)."""
    per_variant = {variant: centralisation(stats, dictionary) for variant, (stats, dictionary) in variants.items()}
    concepts = next(iter(variants.values()))[0].concepts
    rows = []
    for index, concept in enumerate(concepts):
        row = {"concept": concept, "kind": next(iter(per_variant.values()))[index]["kind"]}
        for variant, entries in per_variant.items():
            entry = next((e for e in entries if e["concept"] == concept), None)
            row[variant] = (
                {key: value for key, value in entry.items() if key not in ("concept", "kind")} if entry else None
            )
        rows.append(row)
    summary = {
        variant: {
            "mean_best_share": sum(e["best_share"] for e in entries) / max(len(entries), 1),
            "best_is_dictionary": sum(e["best_is_dictionary"] for e in entries),
            "concepts": len(entries),
            "decoder_overlap": (overlaps or {}).get(variant),
        }
        for variant, entries in per_variant.items()
    }
    return {"block": block, "variants": list(variants), "concepts": rows, "summary": summary}


def write_centralisation(report: dict, path: str | Path) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    write_json(Path(path), report)


def centralisation_table(report: dict) -> str:
    """The report as a markdown table: best latent's share of the score, and whether it is the dictionary's."""
    variants = report["variants"]
    header = "| concept | kind | " + " | ".join(f"{v} share | {v} = dictionary" for v in variants) + " |"
    lines = [header, "|" + "---|" * (2 + 2 * len(variants))]
    for row in report["concepts"]:
        cells = [row["concept"], row["kind"]]
        for variant in variants:
            entry = row[variant]
            cells += (
                [f"{entry['best_share']:.2f}", "yes" if entry["best_is_dictionary"] else "no"] if entry else ["", ""]
            )
        lines.append("| " + " | ".join(cells) + " |")
    for variant, summary in report["summary"].items():
        lines.append(
            f"\n{variant}: mean share {summary['mean_best_share']:.2f}, "
            f"best latent is the dictionary latent for {summary['best_is_dictionary']}/{summary['concepts']} concepts"
            + (
                ""
                if summary.get("decoder_overlap") is None
                else f", dictionary latents' decoder rows mean |cos| {summary['decoder_overlap']:.2f}"
            )
        )
    return "\n".join(lines)
