"""Where each intervention moves the hooked block's activations: PER's Figure 2, measured in our world.

Steering multiplies a latent by a large negative factor, and the token it edits can land far outside
anything the UNet saw that block produce in training; replacement copies a value the block itself
produced on the same image. For each method at its tuned setting, the pair generator keeps the block's
output after the edit (`SaeHook.keep_outputs`) and the tokens the edit changed (`Trace.edited`), on the
conditional half; the untouched images of the same pairs give, step by step, the range of ordinary
values: the 1st-99th percentile of per-token L2 norms, and of each channel's values. Reported: the share
of edited tokens whose norm falls outside that range, the mean share of their channels that do, and the
norms themselves (log2, as the paper plots them).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from matplotlib.figure import Figure
from torch import Tensor

from saemnesia.erase import INTERVENTIONS, METHODS
from saemnesia.evaluate import balanced_prompts, pipeline_key, pipeline_label, setting_or_default
from saemnesia.minicanvas.artifacts import ARTIFACT_THRESHOLD, ArtifactDetector, artifact_probabilities
from saemnesia.studio import Studio

SEEDS = (60_000,)
"""A held-out seed of the benchmark: nothing is chosen here, only measured."""
PROMPTS_PER_CONCEPT = 10
HELDOUT_SEEDS = (60_000, 60_001)
HELDOUT_PROMPTS = 20
"""The full benchmark's held-out seeds and prompts naming the erased concept."""
LOW, HIGH = 0.01, 0.99


def _tokens(outputs: Tensor, rows: slice) -> Tensor:
    """[steps, rows, tokens, channels] from kept block outputs `[steps, rows, C, h, w]`."""
    return outputs[:, rows].flatten(3).transpose(2, 3).float()


def _outside(values: Tensor, low: Tensor, high: Tensor) -> Tensor:
    return (values < low) | (values > high)


def drift_of_pair(outputs: Tensor, edited: Tensor, prompts: int) -> dict[str, Tensor]:
    """Norms and out-of-range shares for one generation's kept outputs and conditional edit mask.

    `outputs` `[steps, 2 * 2 * prompts, C, h, w]` (guidance halves, each originals then erased copies),
    `edited` `[steps, 2 * prompts, tokens]` for the conditional rows.
    """
    conditional = slice(2 * prompts, 4 * prompts)
    tokens = _tokens(outputs, conditional)  # [steps, 2P, T, C]
    untouched, erased = tokens[:, :prompts], tokens[:, prompts:]
    mask = edited[:, prompts:]  # [steps, P, T]
    flat = untouched.flatten(1, 2)  # [steps, P*T, C]
    norms = flat.norm(dim=-1)
    norm_low, norm_high = norms.quantile(LOW, dim=1), norms.quantile(HIGH, dim=1)  # [steps]
    channel_low, channel_high = flat.quantile(LOW, dim=1), flat.quantile(HIGH, dim=1)  # [steps, C]
    erased_norms = erased.norm(dim=-1)  # [steps, P, T]
    norm_outside = _outside(erased_norms, norm_low[:, None, None], norm_high[:, None, None])
    channels_outside = _outside(erased, channel_low[:, None, None], channel_high[:, None, None]).float().mean(-1)
    return {
        "untouched_norms": norms.flatten(),
        "edited_norms": erased_norms[mask],
        "edited_norm_outside": norm_outside[mask],
        "edited_channels_outside": channels_outside[mask],
        "edited_values": erased[mask],
        "untouched_values": flat.flatten(0, 1),
        "edited_share": mask.float().flatten(),
    }


def _summary(parts: Sequence[dict[str, Tensor]]) -> dict:
    joined = {name: torch.cat([part[name].float() for part in parts]) for name in parts[0]}
    edited = len(joined["edited_norms"])
    untouched_log2 = joined["untouched_norms"].log2()
    edited_log2 = joined["edited_norms"].log2()
    return {
        "edited_tokens": edited,
        "edited_share": round(100 * float(joined["edited_share"].mean()), 2),
        "norm_outside": round(100 * float(joined["edited_norm_outside"].mean()), 2) if edited else None,
        "channels_outside": round(100 * float(joined["edited_channels_outside"].mean()), 2) if edited else None,
        "log2_norm_untouched": [round(float(q), 3) for q in untouched_log2.quantile(torch.tensor([0.01, 0.5, 0.99]))],
        "log2_norm_edited": (
            [round(float(q), 3) for q in edited_log2.quantile(torch.tensor([0.01, 0.5, 0.99]))] if edited else None
        ),
    }, joined


@torch.no_grad()
def activation_drift(
    studio: Studio,
    results: Mapping | None,
    kind: str = "object",
    seeds: Sequence[int] = SEEDS,
    prompts_per_concept: int = PROMPTS_PER_CONCEPT,
    plot: Path | None = None,
) -> dict:
    """For each method and intervention at its tuned setting (`results`, else the defaults), erase each
    concept of `kind` on prompts naming it and report how far the edited tokens stray (module docstring).
    `plot`, if given, gets the log2-norm histograms and the per-channel ranges, one row per method."""
    world = studio.world
    if world.guidance <= 1:
        raise ValueError("The drift is measured on the conditional half: it needs guidance > 1.")
    block = world.block_for(kind)
    report: dict[str, dict] = {}
    samples: dict[str, dict[str, Tensor]] = {}
    for method in METHODS:
        for intervention in INTERVENTIONS:
            key = pipeline_key(method, intervention)
            parts = []
            for concept in world.concepts_of(kind):
                setting = setting_or_default(results, method, [concept], intervention)
                prompts = [spec.text for spec in balanced_prompts(world, [concept], prompts_per_concept)]
                hooks = studio.hooks(
                    [concept], method, setting.strength, 0, setting.features_per_step, True, intervention
                )
                hooks = [hook for hook in hooks if hook.block == block]
                for hook in hooks:
                    hook.keep_outputs = True
                for seed in seeds:
                    result = studio.generate(prompts, hooks, seed)
                    parts.append(drift_of_pair(result.block_outputs[block], result.traces[block].edited, len(prompts)))
            report[key], samples[key] = _summary(parts)
    if plot is not None:
        plot_drift(report, samples, plot)
    return {"world": world.name, "kind": kind, "block": block, "seeds": list(seeds), "pipelines": report}


def plot_drift(report: Mapping[str, dict], samples: Mapping[str, dict[str, Tensor]], path: Path) -> None:
    """Per method: histograms of log2 token norms (untouched, steer-edited, replace-edited tokens) and, per
    channel, the untouched 1st-99th percentile band with the edited tokens' mean values over it."""
    figure = Figure(figsize=(12, 3.6 * len(METHODS)), layout="constrained")
    axes = figure.subplots(len(METHODS), 2, squeeze=False)
    colours = {"steer": "tab:red", "replace": "tab:green"}
    for row, method in enumerate(METHODS):
        norms_axis, channels_axis = axes[row]
        untouched = samples[pipeline_key(method, "steer")]
        untouched_log2 = untouched["untouched_norms"].log2()
        values = untouched["untouched_values"]
        low, high = values.quantile(LOW, dim=0), values.quantile(HIGH, dim=0)
        order = torch.argsort((low + high) / 2)
        channels = range(len(order))
        norms_axis.hist(untouched_log2.tolist(), bins=60, density=True, color="grey", alpha=0.5, label="untouched")
        channels_axis.fill_between(channels, low[order], high[order], color="grey", alpha=0.35, label="untouched 1-99%")
        for intervention in INTERVENTIONS:
            key = pipeline_key(method, intervention)
            entry, sample = report[key], samples[key]
            if not entry["edited_tokens"]:
                continue
            label = f"{pipeline_label(key)}: {entry['norm_outside']:.0f}% of edited tokens outside"
            norms_axis.hist(
                sample["edited_norms"].log2().tolist(),
                bins=60,
                density=True,
                histtype="step",
                linewidth=1.5,
                color=colours[intervention],
                label=label,
            )
            channels_axis.plot(
                channels, sample["edited_values"].mean(0)[order], color=colours[intervention], linewidth=1, label=key
            )
        norms_axis.set_title(f"{method}: log2 L2 norm of the block's tokens")
        norms_axis.set_xlabel("log2 norm")
        norms_axis.legend(fontsize=7)
        channels_axis.set_title(f"{method}: per-channel value, edited tokens' mean over the untouched range")
        channels_axis.set_xlabel("channel (sorted by untouched midpoint)")
        channels_axis.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


@torch.no_grad()
def heldout_artifact_rates(
    studio: Studio,
    detector: ArtifactDetector,
    results: Mapping | None,
    interventions: Sequence[str] = ("steer",),
    kind: str = "object",
    seeds: Sequence[int] = HELDOUT_SEEDS,
    prompts_per_concept: int = HELDOUT_PROMPTS,
) -> dict:
    """AR on each concept's own held-out images, for each method at its tuned setting, beside the untouched
    images of the same prompts and seeds (the floor): the benchmark's `ar` for result sets made before it
    judged artifacts, on the same prompts and seeds as its held-out images of the erased concept."""
    world = studio.world
    counts: dict[str, list[int]] = {}
    for concept in world.concepts_of(kind):
        specs = balanced_prompts(world, [concept], prompts_per_concept)
        for seed in seeds:
            pipelines = [(method, intervention) for intervention in interventions for method in METHODS]
            for index, (method, intervention) in enumerate(pipelines):
                setting = setting_or_default(results, method, [concept], intervention)
                hooks = studio.hooks(
                    [concept], method, setting.strength, 0, setting.features_per_step, intervention=intervention
                )
                result = studio.generate([spec.text for spec in specs], hooks, seed, include_originals=index == 0)
                groups = {pipeline_key(method, intervention): result.erased}
                groups |= {"untouched": result.originals} if index == 0 else {}
                for key, images in groups.items():
                    called = [p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(detector, images)]
                    tally = counts.setdefault(key, [0, 0])
                    tally[0] += sum(called)
                    tally[1] += len(called)
    return {
        "world": world.name,
        "kind": kind,
        "seeds": list(seeds),
        "prompts_per_concept": prompts_per_concept,
        "ar": {key: round(100 * called / total, 2) for key, (called, total) in counts.items()},
        "images": {key: total for key, (_, total) in counts.items()},
    }


def _cells(values: list[float] | None) -> str:
    return "-" if values is None else " / ".join(f"{value:.2f}" for value in values)


def drift_table(drift: Mapping) -> str:
    """Markdown: per pipeline, the edited share and how many edited tokens leave the untouched range."""
    lines = [
        f"Activation drift at {drift['block']} ({drift['kind']}s erased; conditional half, every step; seeds "
        f"{', '.join(map(str, drift['seeds']))})",
        "",
        "| pipeline | tokens edited (%) | edited tokens' norm outside untouched 1-99% | channels outside, mean "
        "| log2 norm 1/50/99%, untouched | log2 norm 1/50/99%, edited |",
        "|---|---:|---:|---:|---|---|",
    ]
    for key, entry in drift["pipelines"].items():
        outside = "-" if entry["norm_outside"] is None else f"{entry['norm_outside']:.2f}"
        channels = "-" if entry["channels_outside"] is None else f"{entry['channels_outside']:.2f}"
        lines.append(
            f"| {pipeline_label(key)} | {entry['edited_share']:.2f} | {outside} | {channels} "
            f"| {_cells(entry['log2_norm_untouched'])} | {_cells(entry['log2_norm_edited'])} |"
        )
    return "\n".join(lines) + "\n"


def write_drift(drift: dict, out: Path) -> dict[str, Path]:
    """`drift.json` and `drift.md` under `out` (the plot is written by `activation_drift`)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "drift.json", "table": out / "drift.md"}
    paths["json"].write_text(json.dumps(drift, indent=1) + "\n")
    paths["table"].write_text(drift_table(drift))
    return paths
