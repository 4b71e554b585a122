"""What several command groups share: the world and classifier arguments, the studio a command works on, and
where an SAE's files go."""

from __future__ import annotations

import argparse
from pathlib import Path

MINICANVAS_WORLDS = ("minicanvas",)
"""The worlds drawn procedurally, which have a model, classifier and artifact detector of their own."""


WORLD_NAMES = (*MINICANVAS_WORLDS, "sd")


def add_canvas_world_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=MINICANVAS_WORLDS, default="minicanvas", help="which MiniCanvas")


def add_world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=WORLD_NAMES, default="minicanvas")
    parser.add_argument("--model", help="diffusers folder or hub id (default: the world's model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def add_classifier_world_arguments(parser: argparse.ArgumentParser) -> None:
    """For commands scored by a world's classifier (only MiniCanvas has one)."""
    parser.add_argument("--world", choices=MINICANVAS_WORLDS, default="minicanvas", help="the classifier's world")
    parser.add_argument("--model", help="diffusers folder (default: the world's model)")
    parser.add_argument("--classifier", help="classifier folder (default: the world's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def sae_folder(world, variant: str, kind: str, given: str | None, block: str | None = None) -> Path:
    """The folder given, or the world's `assets/<world>/sae/<variant>/<hook point>/`."""
    if given:
        return Path(given)
    if world.assets is None:
        raise ValueError(f"World '{world.name}' has no assets folder: give the SAE folder explicitly.")
    return world.sae_folder(variant, kind, block)


def load_studio(args: argparse.Namespace):
    """The Studio a command works on. Calls `saemnesia.cli._load_studio`, looked up at each call, so that a test
    that swaps it for a tiny model reaches the commands of every group."""
    from saemnesia import cli

    return cli._load_studio(args)
