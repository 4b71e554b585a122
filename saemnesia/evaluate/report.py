"""The benchmark's results as people read them: the markdown table, the strength and sequential plots, the
files `write_results` writes and the cached result sets the app lists."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from saemnesia.erase import METHODS
from saemnesia.evaluate.metrics import KINDS, PAPER_AR, PAPER_TABLE, TABLE1_METRICS, mean_of_known
from saemnesia.evaluate.protocol import PROTOCOLS, Protocol
from saemnesia.evaluate.search import METHOD_NAMES, pipeline_label
from saemnesia.worlds import World

BENCHMARK_PROTOCOLS = ("full", "standard", "quick")


def result_sets(world: World) -> dict[str, Path]:
    """The world's cached `evaluate` results files by protocol name: the benchmark's protocols first (in
    `BENCHMARK_PROTOCOLS` order), then the variants (another block, classifier or tuning set) by name."""
    if world.assets is None:
        return {}
    found = {
        path.stem.removeprefix("evaluation").removeprefix("-") or "full": path
        for path in (world.assets / "results").glob("evaluation*.json")
    }
    names = [name for name in BENCHMARK_PROTOCOLS if name in found]
    return {name: found[name] for name in names + sorted(set(found) - set(names))}


def benchmark_results(world: World) -> dict | None:
    """The world's cached `evaluate` results: the full protocol's, else the standard's, else the quick one's."""
    sets = result_sets(world)
    benchmark = next((sets[name] for name in BENCHMARK_PROTOCOLS if name in sets), None)
    return None if benchmark is None else json.loads(benchmark.read_text())


PROTOCOL_ROLES = {"full": "the benchmark", "standard": "a lighter search", "quick": "a smoke test"}
"""What each protocol's results are for, in a few words (`result_set_label`)."""


def _seed_span(seeds: tuple[int, ...]) -> str:
    return f"seed {seeds[0]}" if len(seeds) == 1 else f"seeds {seeds[0]}-{seeds[-1]}"


def _scope(protocol: Protocol) -> str:
    if protocol.objects_erased is None and protocol.styles_erased is None:
        return "every object and style"
    objects = "every object" if protocol.objects_erased is None else f"{protocol.objects_erased} objects"
    styles = "every style" if protocol.styles_erased is None else f"{protocol.styles_erased} styles"
    return f"{objects} and {styles}"


def _heldout_words(seed: str, protocol: Protocol) -> str:
    offset = int(seed) - protocol.heldout_seeds[0]
    return f"the same tuning, reported on {_seed_span(tuple(s + offset for s in protocol.heldout_seeds))}"


VARIANTS = (
    (r"tuned-on-(\d+)-seeds", lambda match, protocol: f"tuned on {match[1]} seeds"),
    (r"from-step-(\d+)", lambda match, protocol: f"edits from step {match[1]} on"),
    (r"heldout-from-(\d+)", lambda match, protocol: _heldout_words(match[1], protocol)),
    (r"held-out-templates", lambda match, protocol: "reported on prompts in templates the model never saw"),
    (r"ties-to-(\w+)", lambda match, protocol: f"ties go to the {match[1]}"),
    (
        r"plus-(.+?)(?=-(?:steer|replace|no-object-class)(?:-|$)|$)",
        lambda match, protocol: f"objects erased at {', '.join(match[1].split('-'))} too",
    ),
    (r"(steer|replace)(?:-(steer|replace))?", lambda match, protocol: f"{match[0].replace('-', ' and ')} only"),
    (r"no-object-class", lambda match, protocol: "scored by the classifier that can answer 'nothing'"),
)
"""Each name part the `evaluate` command (`cli.benchmark`) appends to a protocol's name for a variant, in its
order, with what it means in plain words."""


def result_set_label(name: str, heldout_seeds: Sequence[int] | None = None) -> str:
    """A result set's name and what it is in plain words, read from the parts `evaluate` built the name of: its
    protocol, then each way it differs (`full-heldout-from-70000`: the same tuning, reported on seed 70000).
    `heldout_seeds` are those the run recorded, where the protocol has changed since. A name it cannot read is
    returned as it is."""
    base, _, rest = name.partition("-")
    protocol = PROTOCOLS.get(base)
    if protocol is None:
        return name
    if heldout_seeds:
        protocol = replace(protocol, heldout_seeds=tuple(heldout_seeds))
    if not rest:
        return f"{name}: {PROTOCOL_ROLES.get(base, base)}, {_scope(protocol)}, {_seed_span(protocol.heldout_seeds)}"
    words = []
    while rest:
        found = next(
            ((match, describe) for pattern, describe in VARIANTS if (match := re.match(f"{pattern}(?=-|$)", rest))),
            None,
        )
        if found is None:
            return name
        match, describe = found
        words.append(describe(match, protocol))
        rest = rest[match.end() :].removeprefix("-")
    return f"{name}: {'; '.join(words)}"


def _cell(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pipelines(results: dict) -> list[str]:
    """The results' pipeline keys in the order they were measured (steer first)."""
    return list(results["methods"])


def _row(summary: dict, ua_ceiling: float | None) -> list[float | None]:
    """A summary's cells of the table: UA, its chance ceiling, IRA, CRA, mean, AR, CRA on the erased concept's."""
    return [summary.get("ua"), ua_ceiling, *(summary.get(name) for name in ("ira", "cra", "mean", "ar", "cra_erased"))]


def results_table(results: dict) -> str:
    """Markdown: our held-out UA (beside its chance ceiling) / IRA / CRA and AR next to the papers', the share of
    erased objects called "nothing" where the classifier can say so, the search cost, sequential erasure."""
    pipelines = _pipelines(results)
    chance = results.get("chance") or {}  # results from before the chance ceiling have none
    lines = [
        f"Erasure on {results['world']} ({results['protocol']['name']} protocol; paper: UnlearnCanvas, Table 1 of "
        "SAEmnesia for steer, PER's object table for replace; different worlds and artifact judges, so compare the "
        "gaps, not the levels). AR: artifact rate on the erased concept's own images. UA ceiling: 100 - the share "
        "of the erased objects' prompts still named the object with every block but the style block ablated, the "
        "best UA an erasure that leaves a clean picture of another object can score.",
        "",
        "| method | erased | UA | UA ceiling | IRA | CRA | mean | AR | CRA on the erased concept's images "
        "| paper UA | paper IRA | paper CRA | paper mean | paper AR |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    nothing = []
    for kind in KINDS:
        ua_ceiling = chance.get("ua_ceiling") if kind == "object" else None
        for key in pipelines:
            summary = results["methods"][key]["summary"].get(kind)
            if summary is None:
                continue
            paper = PAPER_TABLE.get(key, {}).get(kind)
            paper_cells = [*paper, sum(paper) / 3] if paper else [None] * 4
            paper_ar = PAPER_AR.get(key) if kind == "object" else None
            cells = [*_row(summary, ua_ceiling), *paper_cells, paper_ar]
            lines.append(f"| {pipeline_label(key)} | {kind}s | " + " | ".join(map(_cell, cells)) + " |")
            if summary.get("nothing_rate") is not None:
                nothing.append(f"{pipeline_label(key)} {summary['nothing_rate']:.2f}")
        summary = results["methods"][pipelines[0]]["summary"].get(kind)
        if summary is not None:
            untouched = summary["untouched"]
            cells = _row(untouched, ua_ceiling)
            lines.append(f"| untouched model | {kind}s | " + " | ".join(map(_cell, cells)) + " | | | | | |")
            if untouched.get("nothing_rate") is not None:
                nothing.append(f"untouched model {untouched['nothing_rate']:.2f}")
    if nothing:
        lines += ["", "Erased objects' held-out images the classifier calls 'nothing' (%): " + "; ".join(nothing) + "."]
    search = results["search"]
    lines += ["", "Search (per concept, on tuning seeds):", ""]
    for key in pipelines:
        entry = search[key]
        grid = entry["strengths"]["object"]
        what = "strengths" if grid else "latent counts; replace scales nothing"
        lines.append(
            f"- {pipeline_label(key)}: {entry['trials_per_concept']:g} trials a concept ({what}), "
            f"{entry['trials']} in all, {entry['images']} images, {entry['seconds']:.0f} s"
        )
    grids = search[pipelines[0]]["strengths"]
    if any(grids.values()):
        lines.append(
            "- strengths, both methods: "
            + "; ".join(f"{kind}s {', '.join(f'{value:g}' for value in grids[kind])}" for kind in KINDS)
        )
    estimate = search["paper_grid"]["estimated_seconds"]
    if "trials_saved" in search:
        lines.append(
            f"- the paper's SAeUron grid (30 x 7): {search['paper_grid']['trials']} trials, about "
            f"{'-' if estimate is None else f'{estimate:.0f}'} s at SAeUron's measured time per trial; SAEmnesia "
            f"searches {100 * search['trials_saved']['vs_paper_grid']:.2f}% fewer trials than that grid"
        )
    first = results["methods"][pipelines[0]]["sequential"]
    if first:
        header = " | ".join(f"{pipeline_label(key)} UA / IRA / CRA" for key in pipelines)
        lines += [
            "",
            "Sequential erasure (held-out seeds; UA on the erased objects, IRA on the rest):",
            "",
            f"| objects erased | {header} | untouched UA / IRA / CRA |",
            "|---:|" + "---|" * (len(pipelines) + 1),
        ]
        for index, step in enumerate(first):
            rows = [results["methods"][key]["sequential"][index] for key in pipelines]
            cells = [" / ".join(_cell(row[name]) for name in TABLE1_METRICS) for row in rows]
            cells.append(" / ".join(_cell(step["untouched"][name]) for name in TABLE1_METRICS))
            lines.append(f"| {len(step['erased'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _nan(value: float | None) -> float:
    return math.nan if value is None else value


METRIC_COLOURS = {"ua": "tab:red", "ira": "tab:blue", "cra": "tab:green", "ar": "tab:purple"}


def plot_strength_curves(results: dict, path: Path) -> None:
    """UA, IRA, CRA against strength, averaged over each kind's erased concepts, one panel per method and kind.

    These are tuning-seed numbers (the search itself); SAeUron's feature counts are line styles. AR (the
    artifact rate on the erased concept's images) shows what the stronger steer costs the picture.
    """
    steered = [key for key in METHODS if key in results["methods"]]
    kinds = [kind for kind in KINDS if kind in results["methods"][steered[0]]["summary"]]
    figure = Figure(figsize=(11, 3.4 * max(1, len(kinds))), layout="constrained")
    axes = figure.subplots(max(1, len(kinds)), len(steered), squeeze=False)
    line_styles = ["-", "--", ":", "-."]
    for row, kind in enumerate(kinds):
        for column, method in enumerate(steered):
            axis = axes[row][column]
            concepts = [entry for entry in results["methods"][method]["concepts"].values() if entry["kind"] == kind]
            trials: dict[tuple[int, float], list[dict]] = {}
            for entry in concepts:
                for trial in entry["tuning"]:
                    trials.setdefault((trial["features_per_step"], trial["strength"]), []).append(trial)
            feature_counts = sorted({features for features, _ in trials})
            for index, features in enumerate(feature_counts):
                strengths = sorted(strength for count, strength in trials if count == features)
                for name, colour in METRIC_COLOURS.items():
                    values = [_nan(mean_of_known([t.get(name) for t in trials[features, s]])) for s in strengths]
                    axis.plot(strengths, values, line_styles[index % 4], color=colour, marker="o", markersize=3)
            handles = [Line2D([], [], color=colour, label=name.upper()) for name, colour in METRIC_COLOURS.items()]
            if len(feature_counts) > 1:
                handles += [
                    Line2D([], [], color="grey", linestyle=line_styles[index % 4], label=f"{features} latent(s)/step")
                    for index, features in enumerate(feature_counts)
                ]
            axis.legend(handles=handles, fontsize=7)
            axis.set_title(f"{METHOD_NAMES[method]}: erasing {kind}s ({len(concepts)})")
            axis.set_xscale("symlog", linthresh=0.01)  # the grid is log-spaced from -0.03 to -30
            axis.set_xlabel("strength (gamma), log scale")
            axis.set_ylabel("% (tuning seeds, mean over concepts)")
            axis.set_ylim(-2, 102)
            axis.grid(alpha=0.3)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def plot_sequential(results: dict, path: Path) -> None:
    """UA, IRA, CRA after each sequential step, every pipeline and the untouched model."""
    figure = Figure(figsize=(12, 3.4), layout="constrained")
    axes = figure.subplots(1, 3)
    pipelines = _pipelines(results)
    for axis, name in zip(axes, TABLE1_METRICS):
        for key, style in zip(pipelines, ("o-", "s--", "o-", "s--")):
            steps = results["methods"][key]["sequential"]
            colour = "tab:orange" if "+" in key else "tab:blue"
            axis.plot(
                [len(s["erased"]) for s in steps], [_nan(s[name]) for s in steps], style, color=colour,
                label=pipeline_label(key), alpha=0.9 if key.startswith("saemnesia") else 0.6,
            )  # fmt: skip
        steps = results["methods"][pipelines[0]]["sequential"]
        axis.plot(
            [len(s["erased"]) for s in steps],
            [_nan(s["untouched"][name]) for s in steps],
            ":",
            color="grey",
            label="untouched",
        )
        axis.set_title(name.upper())
        axis.set_xlabel("objects erased")
        axis.xaxis.get_major_locator().set_params(integer=True)
        axis.set_ylim(-2, 102)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)


def result_paths(out: Path, protocol_name: str) -> dict[str, Path]:
    """Where `write_results` puts each file; the quick protocol's names end in `-quick`."""
    suffix = "" if protocol_name == "full" else f"-{protocol_name}"
    return {
        "json": out / f"evaluation{suffix}.json",
        "table": out / f"table{suffix}.md",
        "strength_curves": out / f"strength-curves{suffix}.png",
        "sequential": out / f"sequential{suffix}.png",
    }


def write_results(results: dict, out: Path) -> dict[str, Path]:
    """The JSON (written atomically, for the app), the markdown table and the two plots, under `out`; the
    strength curves only where a method searched strengths (not for `replace` alone)."""
    paths = result_paths(out, results["protocol"]["name"])
    out.mkdir(parents=True, exist_ok=True)
    temporary = paths["json"].with_name(paths["json"].name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, paths["json"])
    paths["table"].write_text(results_table(results))
    if any(method in results["methods"] for method in METHODS):
        plot_strength_curves(results, paths["strength_curves"])
    else:
        del paths["strength_curves"]
    plot_sequential(results, paths["sequential"])
    return paths
