"""The run: every section not skipped, on the machine it describes; and its report as a table."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from saemnesia.bench.startup import app_rows
from saemnesia.bench.subjects import (
    minicanvas_pipeline,
    pair_rows,
    sae_share_rows,
    sd_layout_pipeline,
    subject_for,
    synthetic_bundle,
    world_bundle,
)
from saemnesia.bench.timing import Row, Skipped
from saemnesia.bench.training import training_rows
from saemnesia.worlds import MINICANVAS, WORLDS

SECTIONS = ("minicanvas", "sd", "app", "train")


@dataclass
class BenchOptions:
    """What to run; None picks the default of the mode (full, or `quick`)."""

    quick: bool = False
    """Tiny sizes, for CI: a narrow SD-layout UNet at 8x8 latents, 2 sampler steps, a small SAE to train."""
    repeats: int | None = None
    """Timed rounds after the warm-up: 5, or 2 with `quick`."""
    sd_latent: int | None = None
    """Latent side of the random SD model: 16, or 8 with `quick`."""
    steps: int | None = None
    """Sampler steps of the pairs: the world's for MiniCanvas and 4 for SD, or 2 with `quick`."""
    device: str = "cpu"
    skip: tuple[str, ...] = ()
    """Sections not to run, of `SECTIONS`."""


def machine(device: torch.device) -> dict:
    """What the numbers were measured on, and how busy it was."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def resolved(options: BenchOptions) -> BenchOptions:
    """The mode's defaults where the options leave them open."""
    quick = options.quick
    return replace(
        options,
        repeats=options.repeats or (2 if quick else 5),
        sd_latent=options.sd_latent or (8 if quick else 16),
        steps=options.steps or (2 if quick else None),
    )


def run_bench(options: BenchOptions) -> dict:
    """Every section not skipped; a section that cannot run becomes one row saying why."""
    options = resolved(options)
    if options.repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {options.repeats}.")
    if options.sd_latent < 8 or options.sd_latent % 8:
        raise ValueError(
            f"sd_latent must be a multiple of 8 (the UNet halves it three times), got {options.sd_latent}."
        )
    if unknown := set(options.skip) - set(SECTIONS):
        raise ValueError(f"unknown sections to skip: {sorted(unknown)}; sections are {', '.join(SECTIONS)}.")
    device = torch.device(options.device)
    report = {"machine": machine(device), "options": asdict(options), "rows": []}
    rows: list[Row] = []
    minicanvas: StableDiffusionPipeline | None = None
    minicanvas_error: Skipped | None = None
    if {"minicanvas", "app"} - set(options.skip):
        try:
            minicanvas = minicanvas_pipeline(options.device)
        except Skipped as error:
            minicanvas_error = error

    def section(name: str, measure: Callable[[], list[Row]], failures: tuple[type[Exception], ...] = ()) -> None:
        """Run one section; a skip, or one of the `failures` it may meet, becomes a row saying so."""
        if name in options.skip:
            rows.append(Row(name, "skipped", "", note="--skip"))
            return
        try:
            rows.extend(measure())
        except Skipped as error:
            rows.append(Row(name, "skipped", "", note=str(error)))
        except failures as error:
            rows.append(Row(name, "failed", "", note=f"{type(error).__name__}: {error}"))

    def measure_minicanvas() -> list[Row]:
        if minicanvas is None:
            raise minicanvas_error
        world = MINICANVAS
        steps = options.steps or world.steps
        bundle, source = world_bundle(world, minicanvas, steps)
        subject = subject_for("minicanvas", world, minicanvas, bundle, source, steps, world.height, world.width)
        return pair_rows(subject, options.repeats, device) + sae_share_rows(subject, options.repeats, device)

    def measure_sd() -> list[Row]:
        world, steps = WORLDS["sd"], options.steps or 4
        pipeline = sd_layout_pipeline(options.sd_latent, options.quick, options.device)
        bundle = synthetic_bundle(world, pipeline, world.object_block, steps)
        model = "narrow SD-1.4-layout UNet (--quick)" if options.quick else "SD-1.4 UNet"
        source = f"random {model}, random SAE"
        size = options.sd_latent * pipeline.vae_scale_factor
        subject = subject_for("sd", world, pipeline, bundle, source, steps, size, size)
        subject.judged = not options.quick
        return pair_rows(subject, options.repeats, device) + sae_share_rows(subject, options.repeats, device)

    def measure_app() -> list[Row]:
        if minicanvas is None:
            raise minicanvas_error
        return app_rows(minicanvas, options.steps or MINICANVAS.steps, options.repeats, options.device)

    section("minicanvas", measure_minicanvas)
    section("sd", measure_sd)
    section("app", measure_app, failures=(Exception,))  # a separate process, reached over HTTP
    section("train", lambda: training_rows(options.quick, options.repeats, device))
    report["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["rows"] = [row.as_dict() for row in rows]
    return report


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "tokens/s":
        return f"{value:,.0f} tok/s"
    return f"{value:.4g}"


def _verdict(row: dict) -> str:
    if row["name"] in ("skipped", "failed"):
        return "skipped" if row["name"] == "skipped" else "ERROR"
    return {True: "pass", False: "FAIL", None: "-"}[row["passed"]]


def format_report(report: dict) -> str:
    """The machine, then one line per row: name, median, min, max, ratio, target, pass/fail; then notes."""
    host = report["machine"]
    header = (
        f"machine: {host['cpu']}; {host['cores']} cores ({host['usable_cores']} usable), torch {host['torch']} with "
        f"{host['torch_threads']} thread(s), device {host['device']}{' (' + host['gpu'] + ')' if host['gpu'] else ''}"
    )
    if host["load_average"]:
        header += f"; load average {host['load_average'][0]:.2f} at start, {host['load_average_after'][0]:.2f} at end"
    columns = ("section", "measurement", "median", "min", "max", "ratio", "target", "result")
    lines = [
        (
            row["section"],
            row["name"],
            _format(row["median"], row["unit"]),
            _format(row["min"], row["unit"]),
            _format(row["max"], row["unit"]),
            "-" if row["ratio"] is None else f"{row['ratio']:.3f}",
            "-" if row["target"] is None else f"<= {row['target']:.2f}",
            _verdict(row),
        )
        for row in report["rows"]
    ]
    widths = [max(len(text) for text in column) for column in zip(columns, *lines)]
    table = [
        "  ".join(
            text.ljust(width) if index < 2 else text.rjust(width)
            for index, (text, width) in enumerate(zip(line, widths))
        )
        for line in (columns, *lines)
    ]
    notes = [f"- {row['section']}: {row['name']}: {row['note']}" for row in report["rows"] if row["note"]]
    return "\n".join([header, "", *table, "", "notes:", *notes])
