"""Timing candidates in turn, counting multiply-adds, and the row every measurement ends in."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch
from torch.utils.flop_counter import FlopCounterMode

SEED = 0
"""The seed of every generation, random model and synthetic activation, so runs compare alike."""


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


@dataclass
class Row:
    """One measured quantity: its samples, and its ratio to a baseline with the target the ratio must meet."""

    section: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    ratio: float | None = None
    target: float | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def passed(self) -> bool | None:
        return None if self.ratio is None or self.target is None else self.ratio <= self.target

    def as_dict(self) -> dict:
        extremes = {"min": min(self.samples), "max": max(self.samples)} if self.samples else {"min": None, "max": None}
        return {**asdict(self), "median": self.median, **extremes, "passed": self.passed}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turn(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each candidate: one warm-up call each, then `repeats` rounds taking them in turn."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def multiply_adds(run: Callable[[], object]) -> float:
    """Multiply-adds of one call, from torch's FLOP counter (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops() / 2
