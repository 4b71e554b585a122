"""The command line: `python -m saemnesia COMMAND ...`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path


def _train_world(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.model import train_model

    train_model(
        Path(args.out),
        Path(args.checkpoint),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device,
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saemnesia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_world = commands.add_parser("train-world", help="train MiniCanvas's text-to-image model (resumable)")
    train_world.add_argument("--out", default="assets/minicanvas/model")
    train_world.add_argument("--checkpoint", default="runs/minicanvas-model")
    train_world.add_argument("--steps", type=int, default=5000)
    train_world.add_argument("--batch-size", type=int, default=48)
    train_world.add_argument("--learning-rate", type=float, default=1e-3)
    train_world.add_argument("--seed", type=int, default=0)
    train_world.add_argument("--device", default="cpu")
    train_world.set_defaults(run=_train_world)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args = build_parser().parse_args(argv)
    args.run(args)
