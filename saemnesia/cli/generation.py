"""Making images: one original and erased pair (`generate`), one original and painted pair (`paint`), and many
through the app (`loadtest`)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from saemnesia.cli.common import WORLD_NAMES, add_world_arguments, load_studio


def _generate(args: argparse.Namespace) -> None:
    import json

    from saemnesia.evaluate import benchmark_results, setting_or_default

    studio = load_studio(args)
    tuned = setting_or_default(benchmark_results(studio.world), args.method, args.erase, args.intervention)
    result = studio.erase(
        [args.prompt],
        args.erase,
        method=args.method,
        strength=tuned.strength if args.strength is None else args.strength,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        start_step=args.start_step,
        features_per_step=tuned.features_per_step if args.features_per_step is None else args.features_per_step,
        intervention=args.intervention,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.originals[0].save(out / "original.png")
    result.erased[0].save(out / "erased.png")
    (out / "settings.json").write_text(json.dumps(result.settings, indent=2) + "\n")
    for warning in result.settings["warnings"]:
        logging.warning(warning)
    print(json.dumps({"original": str(out / "original.png"), "erased": str(out / "erased.png")}))


def _paint(args: argparse.Namespace) -> None:
    import json

    studio = load_studio(args)
    target = args.concept if args.concept is not None else args.latent
    kind = studio.world.kind_of(target) if isinstance(target, str) else args.kind
    height, width = studio.token_grid(kind)
    top, left, bottom, right = args.box or (height // 4, width // 4, 3 * height // 4 - 1, 3 * width // 4 - 1)
    mask = [[int(top <= row <= bottom and left <= column <= right) for column in range(width)] for row in range(height)]
    steps = tuple(args.steps_painted) if args.steps_painted else None
    result = studio.paint(
        args.prompt,
        target,
        mask,
        args.strength,
        kind=kind,
        steps_painted=steps,
        seed=args.seed,
        method=args.method,
        footprint=args.footprint,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.originals[0].save(out / "original.png")
    result.erased[0].save(out / "painted.png")
    (out / "settings.json").write_text(json.dumps({**result.settings, "mask": mask}, indent=2) + "\n")
    print(json.dumps({"original": str(out / "original.png"), "painted": str(out / "painted.png")}))


def _loadtest(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from saemnesia.loadtest import load_test

    logging.getLogger("httpx").setLevel(logging.WARNING)  # else one log line per HTTP request of every client
    settings = {"prompt": args.prompt, "concepts": args.erase or None, "method": args.method, "steps": args.steps}
    request = {name: value for name, value in settings.items() if value is not None}  # the rest: the app's defaults
    report = load_test(
        args.url,
        args.clients,
        args.requests,
        request,
        pid=args.pid,
        world=args.world,
        device=args.device,
        timeout=args.timeout,
    )
    print(json.dumps(dataclasses.asdict(report), indent=2))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The image-making commands, in the order `--help` lists them."""
    generate = commands.add_parser("generate", help="original and erased image from one seed")
    add_world_arguments(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--erase", action="append", default=[], metavar="CONCEPT", help="repeat for several")
    generate.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    generate.add_argument(
        "--intervention",
        choices=["steer", "replace"],
        default="replace",
        help="steer the concept's latents, or replace the tokens they detect (PER; the strength then plays no part)",
    )
    generate.add_argument(
        "--strength",
        type=float,
        help="gamma, negative (default: the benchmark's tuned one for these concepts, else -10)",
    )
    generate.add_argument(
        "--features-per-step", type=int, help="SAeUron only: latents per step (default: tuned, else 1)"
    )
    generate.add_argument("--start-step", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, help="default: the world's")
    generate.add_argument("--guidance", type=float, help="default: the world's")
    generate.add_argument("--out", required=True, help="folder for original.png, erased.png, settings.json")
    generate.set_defaults(run=_generate)

    paint = commands.add_parser("paint", help="paint a concept's latent into (or out of) a box of the block's tokens")
    add_world_arguments(paint)
    paint.add_argument("--prompt", required=True)
    target = paint.add_mutually_exclusive_group(required=True)
    target.add_argument("--concept", help="paint this concept's latent (SAEmnesia: its dictionary latent)")
    target.add_argument("--latent", type=int, help="or any latent of the --kind block's SAE, by index")
    paint.add_argument("--kind", choices=["object", "style"], default="object", help="the block, for --latent")
    paint.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia", help="whose SAE")
    paint.add_argument(
        "--footprint", action="store_true", help="paint the --concept's footprint instead of its latent (draws it)"
    )
    paint.add_argument(
        "--strength",
        type=float,
        required=True,
        help="times the concept's mean activation (with --footprint: times its footprint); negative erases",
    )
    paint.add_argument(
        "--box", type=int, nargs=4, metavar=("TOP", "LEFT", "BOTTOM", "RIGHT"),
        help="painted tokens, inclusive, on the block's grid (default: the middle half)",
    )  # fmt: skip
    paint.add_argument("--steps-painted", type=int, nargs=2, metavar=("FIRST", "LAST"), help="default: every step")
    paint.add_argument("--seed", type=int, default=0)
    paint.add_argument("--out", required=True, help="folder for original.png, painted.png, settings.json")
    paint.set_defaults(run=_paint)

    loadtest = commands.add_parser("loadtest", help="K clients x N erase requests to the app: speed, errors, memory")
    loadtest.add_argument("--url", help="a running app (default: start `app.py --world WORLD` and measure it)")
    loadtest.add_argument("--pid", type=int, help="the running app's process id, to read its memory from /proc")
    loadtest.add_argument("--clients", type=int, default=4, help="visitors at once, each its own session")
    loadtest.add_argument("--requests", type=int, default=5, help="erase requests per client, one after another")
    loadtest.add_argument("--world", choices=WORLD_NAMES, default="minicanvas", help="for the app it starts")
    loadtest.add_argument("--device", help="for the app it starts (default: CUDA if present)")
    loadtest.add_argument("--prompt", help="default: the app's")
    loadtest.add_argument("--erase", action="append", metavar="CONCEPT", help="default: the app's; repeat for several")
    loadtest.add_argument("--method", choices=["SAEmnesia", "SAeUron (baseline)", "Both"], help="default: the app's")
    loadtest.add_argument("--steps", type=int, help="default: the world's")
    loadtest.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    loadtest.set_defaults(run=_loadtest)
