"""The command line: `python -m saemnesia COMMAND ...`.

One module per group of commands, each with its commands and their arguments:
- `minicanvas`: train-world, train-classifier, train-artifact-detector, artifact-grid, classify, world-quality;
- `generation`: generate, loadtest;
- `training`: collect, probe-blocks, train-sae, stats, finetune, centralisation;
- `benchmark`: ablate-blocks, edit-coverage, evaluate, drift, compare-replacements, bench, attack;
- `sd`: prepare, nudity-concept, nudity, gpu-smoke;
- `common`: the arguments and helpers several groups share.
"""

from __future__ import annotations

import argparse
import logging

from saemnesia.cli import benchmark, generation, minicanvas, sd, training

COMMAND_GROUPS = (minicanvas, generation, training, benchmark, sd)


def _load_studio(args: argparse.Namespace):
    """The Studio of `--world`, `--model` and `--device` (with any `--extra-object-block`). Every command reaches it
    through `common.load_studio`, so tests swap this one function for a tiny model."""
    from saemnesia.studio import Studio
    from saemnesia.worlds import WORLDS

    extra_object_blocks = getattr(args, "extra_object_block", None)
    extra_blocks = {"object": extra_object_blocks} if extra_object_blocks else None
    world = WORLDS[args.world] if args.model is None else WORLDS[args.world].on_model(args.model)
    return Studio.load(world, device=args.device, extra_blocks=extra_blocks)


def build_parser() -> argparse.ArgumentParser:
    """Every command of every group, each with its `run` function as a default."""
    parser = argparse.ArgumentParser(prog="python -m saemnesia", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        group.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
