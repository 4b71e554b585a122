"""Measuring erasure: the benchmark (`evaluate`), its diagnostics (drift, replace rules, block ablation,
edit coverage), the attack and the speed benchmark."""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

from saemnesia.cli.common import add_classifier_world_arguments, add_world_arguments, load_studio


def _evaluate(args: argparse.Namespace) -> None:
    import dataclasses

    from saemnesia.evaluate import PROTOCOLS, evaluate, results_table, write_results
    from saemnesia.minicanvas.classifier import NO_OBJECT, load_classifier

    if args.sequential and not args.part:
        raise SystemExit("--sequential shares the sequential erasure between processes: give --part I/N too.")
    protocol = PROTOCOLS["quick" if args.quick else args.protocol]
    # Variants get their own names, so their files sit beside the protocol's results instead of replacing them.
    if args.tuning_seeds is not None:
        if args.tuning_seeds < 1:
            raise SystemExit(f"--tuning-seeds must be at least 1, got {args.tuning_seeds}.")
        first = protocol.tuning_seeds[0]
        protocol = dataclasses.replace(
            protocol,
            name=f"{protocol.name}-tuned-on-{args.tuning_seeds}-seeds",
            tuning_seeds=tuple(range(first, first + args.tuning_seeds)),
        )
    if args.start_step:
        protocol = dataclasses.replace(
            protocol, name=f"{protocol.name}-from-step-{args.start_step}", start_step=args.start_step
        )
    if args.heldout_from is not None:
        if args.heldout_from < 0:
            raise SystemExit(f"--heldout-from must be a seed >= 0, got {args.heldout_from}.")
        offset = args.heldout_from - protocol.heldout_seeds[0]
        protocol = dataclasses.replace(
            protocol,
            name=f"{protocol.name}-heldout-from-{args.heldout_from}",
            heldout_seeds=tuple(seed + offset for seed in protocol.heldout_seeds),
            sequential_seeds=tuple(seed + offset for seed in protocol.sequential_seeds),
        )
    if args.held_out_templates:
        from saemnesia.worlds import WORLDS

        canvas = WORLDS[args.world].canvas
        if canvas is None or not canvas.held_out_templates:
            raise SystemExit(f"World '{args.world}' has no held-out templates: only a MiniCanvas world with some has.")
        protocol = dataclasses.replace(
            protocol, name=f"{protocol.name}-held-out-templates", grid_templates=canvas.held_out_templates
        )
    if args.ties != protocol.ties:
        protocol = dataclasses.replace(protocol, name=f"{protocol.name}-ties-to-{args.ties}", ties=args.ties)
    if args.extra_object_block:
        protocol = dataclasses.replace(protocol, name=f"{protocol.name}-plus-{'-'.join(args.extra_object_block)}")
    if tuple(args.interventions) != protocol.interventions:
        protocol = dataclasses.replace(
            protocol, name=f"{protocol.name}-{'-'.join(args.interventions)}", interventions=tuple(args.interventions)
        )
    studio = load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    if NO_OBJECT in classifier.config.objects:  # another instrument: its results sit beside the standard ones
        protocol = dataclasses.replace(protocol, name=f"{protocol.name}-no-object-class")
    detector = None if args.no_artifacts else _artifact_detector(args, studio)
    nothing = None
    if NO_OBJECT not in classifier.config.objects and not args.no_nothing_classifier:
        folder = args.nothing_classifier or _shipped(studio, "classifier-no-object")
        nothing = load_classifier(folder, device=studio.pipeline.device) if folder else None
    cache = Path(args.cache or f"runs/{studio.world.name}-eval-cache.jsonl")
    results = evaluate(
        studio,
        classifier,
        protocol,
        cache,
        artifact_detector=detector,
        part=args.part,
        nothing_classifier=nothing,
        sequential=args.sequential,
    )
    if args.part:
        print(json.dumps(results, indent=1))
        print("When every part is done, the same command without --part writes the results from their verdicts.")
        return
    paths = write_results(results, _out(args, studio))
    print(results_table(results))
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))


def _part(text: str) -> tuple[int, int]:
    """`--part I/N`, checked: N shares of the work, I from 1 to N."""
    index, _, count = text.partition("/")
    if not (index.isdigit() and count.isdigit() and 1 <= int(index) <= int(count)):
        raise argparse.ArgumentTypeError(f"--part must be I/N with 1 <= I <= N (e.g. 1/2), got {text!r}")
    return int(index), int(count)


def _out(args: argparse.Namespace, studio, file: str | None = None) -> Path:
    """`--out`, else the world's results folder (or `file` in it): each world's results beside its assets."""
    if args.out:
        return Path(args.out)
    folder = studio.world.assets / "results"
    return folder / file if file else folder


def _artifact_detector(args: argparse.Namespace, studio):
    """The artifact detector `--artifact-detector` names, else the world's; None if the world ships none."""
    from saemnesia.minicanvas.artifacts import ArtifactDetector

    folder = args.artifact_detector or _shipped(studio, "artifact-detector")
    if folder is None:
        logging.warning("No artifact detector in this world's assets: results without AR.")
        return None
    return ArtifactDetector.load(folder, device=studio.pipeline.device)


def _shipped(studio, name: str) -> Path | None:
    """The world's asset folder `name`, if it ships one."""
    assets = studio.world.assets
    return None if assets is None or not (assets / name).is_dir() else assets / name


def _add_evaluation_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--evaluation", help="`evaluate` results whose tuned settings to use (default: the world's, full run first)"
    )


def _check_evaluation_file(args: argparse.Namespace) -> None:
    """Before any model loads: `--evaluation`, if given, must be a file."""
    if args.evaluation and not Path(args.evaluation).is_file():
        raise FileNotFoundError(f"No evaluation results at '{args.evaluation}': run `evaluate` or drop --evaluation.")


def _evaluation_results(args: argparse.Namespace, studio) -> dict | None:
    """The `evaluate` results whose tuned settings a command uses: `--evaluation`, else the world's benchmark."""
    from saemnesia.evaluate import benchmark_results

    return json.loads(Path(args.evaluation).read_text()) if args.evaluation else benchmark_results(studio.world)


def _drift(args: argparse.Namespace) -> None:
    from saemnesia.drift import activation_drift, drift_table, write_drift

    _check_evaluation_file(args)
    studio = load_studio(args)
    out = _out(args, studio)
    drift = activation_drift(
        studio,
        _evaluation_results(args, studio),
        kind=args.kind,
        seeds=args.seeds,
        prompts_per_concept=args.prompts,
        plot=out / "drift.png",
    )
    paths = write_drift(drift, out)
    print(drift_table(drift))
    print("\n".join(f"{name}: {path}" for name, path in {**paths, "plot": out / "drift.png"}.items()))


def _artifact_rates(args: argparse.Namespace) -> None:
    from saemnesia.drift import heldout_artifact_rates

    _check_evaluation_file(args)
    studio = load_studio(args)
    detector = _artifact_detector(args, studio)
    if detector is None:
        raise SystemExit("artifact-rates needs an artifact detector: train one (`train-artifact-detector`).")
    rates = heldout_artifact_rates(studio, detector, _evaluation_results(args, studio), args.interventions, args.kind)
    out = _out(args, studio, "artifact-rates.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rates, indent=1) + "\n")
    print(json.dumps(rates, indent=1))


def _compare_replacements(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.classifier import load_classifier
    from saemnesia.replace_rules import RULES, compare_replace_rules, rules_table, write_comparison

    unknown = sorted(set(args.rules or ()) - set(RULES))
    if unknown:
        raise SystemExit(f"Unknown rule(s) {unknown}; the rules are: {'; '.join(RULES)}.")
    studio = load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    rules = {name: RULES[name] for name in args.rules} if args.rules else RULES
    detector = None if args.no_artifacts else _artifact_detector(args, studio)
    comparison = compare_replace_rules(studio, classifier, rules, args.method, args.kind, artifact_detector=detector)
    paths = write_comparison(comparison, _out(args, studio))
    print(rules_table(comparison))
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))


def _paint_benchmark(args: argparse.Namespace) -> None:
    from saemnesia.evaluate import setting_or_default
    from saemnesia.evaluate.painting import measure_paint
    from saemnesia.minicanvas.classifier import load_classifier

    _check_evaluation_file(args)
    studio = load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    detector = None if args.no_artifacts else _artifact_detector(args, studio)
    results = _evaluation_results(args, studio)
    objects = args.objects or list(studio.world.objects)
    strengths = {name: setting_or_default(results, "saemnesia", [name]).strength for name in objects}
    report = measure_paint(
        studio, classifier, detector, objects, args.prompts, strengths, progress=lambda text: logging.info(text)
    )
    out = _out(args, studio, "paint.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps(report["mean"], indent=1))
    print(out)


def _ablate_blocks(args: argparse.Namespace) -> None:
    from saemnesia.evaluate import ablate_blocks
    from saemnesia.minicanvas.classifier import load_classifier

    studio = load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    print(json.dumps(ablate_blocks(studio, classifier, args.block, args.styles_per_object, args.seed), indent=2))


def _edit_coverage(args: argparse.Namespace) -> None:
    from saemnesia.evaluate import edit_coverage
    from saemnesia.minicanvas.classifier import load_classifier

    _check_evaluation_file(args)
    studio = load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    results = _evaluation_results(args, studio)
    if results is None:
        raise SystemExit("No benchmark results for this world: run `python -m saemnesia evaluate` first.")
    grid = Path(args.grid) if args.grid else None
    report = edit_coverage(studio, classifier, results, args.method, args.kind, grid, args.intervention)
    print(json.dumps(report, indent=2))


def _attack(args: argparse.Namespace) -> None:
    from saemnesia.attack import attack_table, run_attacks
    from saemnesia.minicanvas.classifier import load_classifier

    _check_evaluation_file(args)
    studio = load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    evaluation = _evaluation_results(args, studio)
    out = _out(args, studio, "attack.json")
    results = run_attacks(
        studio,
        classifier,
        args.concepts or list(studio.world.objects),
        args.methods,
        evaluation,
        strength=args.strength,
        features_per_step=args.features_per_step,
        iterations=args.iterations,
        prefix_tokens=args.prefix_tokens,
        candidates=args.candidates,
        seeds=args.seeds,
        seed=args.seed,
        out=out,
    )
    print(attack_table(results))
    print(f"json: {out}")


def _bench(args: argparse.Namespace) -> None:
    from saemnesia.bench import BenchOptions, format_report, run_bench
    from saemnesia.worlds import default_device

    options = BenchOptions(
        quick=args.quick,
        repeats=args.repeats,
        sd_latent=args.sd_latent,
        steps=args.steps,
        device=args.device or default_device(),
        skip=tuple(args.skip),
    )
    report = run_bench(options)
    print(format_report(report))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The measuring commands, in the order `--help` lists them."""
    ablate = commands.add_parser(
        "ablate-blocks", help="which blocks the images need for their objects / styles (classifier-scored)"
    )
    add_classifier_world_arguments(ablate)
    ablate.add_argument("--block", action="append", help="default: every cross-attention block")
    ablate.add_argument("--styles-per-object", type=int, default=4)
    ablate.add_argument("--seed", type=int, default=0)
    ablate.set_defaults(run=_ablate_blocks)

    coverage = commands.add_parser(
        "edit-coverage",
        help="tokens the tuned edit changed, and the classifier's certainty, on images where the concept survived",
    )
    add_classifier_world_arguments(coverage)
    coverage.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    coverage.add_argument("--kind", choices=["object", "style"], default="object")
    coverage.add_argument("--intervention", choices=["steer", "replace"], default="steer")
    coverage.add_argument("--grid", help="PNG of the survivors: original | erased, one a row")
    _add_evaluation_argument(coverage)
    coverage.set_defaults(run=_edit_coverage)

    evaluate = commands.add_parser(
        "evaluate", help="UA / IRA / CRA of both methods with tuned strengths, and sequential erasure (resumable)"
    )
    add_classifier_world_arguments(evaluate)
    evaluate.add_argument(
        "--quick", action="store_true", help="3 objects and 2 styles, on their 3 x 2 grid, fewer prompts: a few minutes"
    )
    evaluate.add_argument("--protocol", choices=["full", "standard", "quick"], default="full")
    evaluate.add_argument("--out", help="folder for the JSON, table and plots (default: the world's results)")
    evaluate.add_argument("--cache", help="verdicts of images made so far (default: runs/<world>-eval-cache.jsonl)")
    evaluate.add_argument("--start-step", type=int, default=0, help="both methods edit from this step on (default 0)")
    evaluate.add_argument(
        "--nothing-classifier",
        help="a classifier with a no-object label that judges every image beside the scoring one, for the 'nothing'"
        " rate (default: the world's classifier-no-object, if it ships one)",
    )
    evaluate.add_argument("--no-nothing-classifier", action="store_true", help="no 'nothing' rate")
    evaluate.add_argument(
        "--part",
        type=_part,
        metavar="I/N",
        help="make only the I-th of N shares of the images, into a file of its own beside the cache (run N at once,"
        " one torch thread each, then once without --part for the results)",
    )
    evaluate.add_argument(
        "--sequential",
        action="store_true",
        help="with --part, a share of the sequential erasure steps instead of the concepts: for after the concepts'"
        " parts, so that the run without --part has only the results left to write",
    )
    evaluate.add_argument(
        "--tuning-seeds", type=int, help="search strengths on this many seeds from 50000 (default: the protocol's 1)"
    )
    evaluate.add_argument(
        "--heldout-from",
        type=int,
        help="report on held-out (and sequential) seeds from this one (default 60000): a check on seeds never seen",
    )
    evaluate.add_argument(
        "--held-out-templates",
        action="store_true",
        help="report on the grid written with the world's held-out templates, which its model never saw in training",
    )
    evaluate.add_argument(
        "--ties",
        choices=["mildest", "centre"],
        default="mildest",
        help="which of tied settings the strength search takes: the mildest (default) or the centre of the best run",
    )
    evaluate.add_argument(
        "--extra-object-block",
        action="append",
        help="erase objects at this block too, with its SAEs in assets (train-sae --block); repeat for several",
    )
    evaluate.add_argument(
        "--interventions",
        nargs="+",
        choices=["steer", "replace"],
        default=["steer", "replace"],
        help="measure each method steering its latents, replacing the tokens they detect (PER), or both (default)",
    )
    evaluate.add_argument(
        "--artifact-detector", help="folder of the detector that gives AR (default: the world's artifact-detector)"
    )
    evaluate.add_argument("--no-artifacts", action="store_true", help="judge no image for artifacts (no AR)")
    evaluate.set_defaults(run=_evaluate)

    drift = commands.add_parser(
        "drift", help="how far steer and replace move the hooked block's tokens from the untouched range (PER, Fig. 2)"
    )
    add_world_arguments(drift)
    drift.add_argument("--kind", choices=["object", "style"], default="object")
    drift.add_argument("--seeds", type=int, nargs="+", default=[60_000])
    drift.add_argument("--prompts", type=int, default=10, help="prompts naming each erased concept")
    _add_evaluation_argument(drift)
    drift.add_argument("--out", help="folder for drift.json, drift.md, drift.png (default: the world's results)")
    drift.set_defaults(run=_drift)

    rates = commands.add_parser(
        "artifact-rates", help="AR on each concept's own held-out images at the tuned settings, beside the untouched"
    )
    add_world_arguments(rates)
    rates.add_argument("--kind", choices=["object", "style"], default="object")
    rates.add_argument("--interventions", nargs="+", choices=["steer", "replace"], default=["steer"])
    rates.add_argument("--artifact-detector", help="detector folder (default: the world's artifact-detector)")
    _add_evaluation_argument(rates)
    rates.add_argument("--out", help="default: the world's results/artifact-rates.json")
    rates.set_defaults(run=_artifact_rates)

    rules = commands.add_parser(
        "compare-replacements", help="the replace rules PER leaves open, side by side on the tuning seed (UA to AR)"
    )
    add_classifier_world_arguments(rules)
    rules.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    rules.add_argument("--kind", choices=["object", "style"], default="object")
    rules.add_argument("--rules", nargs="+", metavar="NAME", help="default: every rule of `replace_rules.RULES`")
    rules.add_argument("--artifact-detector", help="detector folder for AR (default: the world's artifact-detector)")
    rules.add_argument("--no-artifacts", action="store_true", help="judge no image for artifacts (no AR)")
    rules.add_argument("--out", help="folder for replace-rules.json and .md (default: the world's results)")
    rules.set_defaults(run=_compare_replacements)

    paint = commands.add_parser(
        "paint-benchmark",
        help="paint each object into the others' prompts (insertion rate) and out of its own (local erasure)",
    )
    add_classifier_world_arguments(paint)
    paint.add_argument("--objects", nargs="+", metavar="OBJECT", help="default: every object")
    paint.add_argument("--prompts", type=int, default=10, help="prompts per object and seed")
    paint.add_argument("--artifact-detector", help="detector folder for AR (default: the world's artifact-detector)")
    paint.add_argument("--no-artifacts", action="store_true", help="judge no image for artifacts (no AR)")
    _add_evaluation_argument(paint)
    paint.add_argument("--out", help="default: the world's results/paint.json")
    paint.set_defaults(run=_paint_benchmark)

    bench = commands.add_parser(
        "bench", help="time the hooked pair, the SAE's share of a UNet call, the app's start and the SAE trainer"
    )
    bench.add_argument("--quick", action="store_true", help="tiny sizes, for CI (about 30 s)")
    bench.add_argument("--repeats", type=int, help="timed rounds after a warm-up (default 5; 2 with --quick)")
    bench.add_argument("--sd-latent", type=int, help="latent side of the random SD-1.4 model (default 16; 8 quick)")
    bench.add_argument("--steps", type=int, help="sampler steps of the pairs (default: MiniCanvas's, 4 on SD; 2 quick)")
    bench.add_argument(
        "--skip", action="append", default=[], choices=["minicanvas", "sd", "app", "train"], help="repeat for several"
    )
    bench.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    bench.add_argument("--json", metavar="OUT", help="also write every number, and the machine, to this JSON file")
    bench.set_defaults(run=_bench)

    attack = commands.add_parser(
        "attack", help="UnlearnDiffAtk-style prompt-prefix attack on each erasure: attack success rate (resumable)"
    )
    add_classifier_world_arguments(attack)
    attack.add_argument("--concepts", nargs="+", help="default: every object of the world")
    methods = ["none", "saeuron", "saemnesia", "saeuron+replace", "saemnesia+replace"]
    attack.add_argument("--methods", nargs="+", choices=methods, default=methods, help="erasures as results name them")
    attack.add_argument("--iterations", type=int, default=40)
    attack.add_argument("--prefix-tokens", type=int, default=5)
    attack.add_argument("--candidates", type=int, default=8, help="words tried per iteration")
    attack.add_argument("--seeds", type=int, nargs="+", default=[60_000, 60_001], help="noise seeds, the cases")
    attack.add_argument("--seed", type=int, default=0, help="the search's random draws")
    _add_evaluation_argument(attack)
    attack.add_argument("--strength", type=float, default=-10.0, help="for concepts without a tuned strength")
    attack.add_argument("--features-per-step", type=int, default=1, help="SAeUron, without a tuned setting")
    attack.add_argument("--out", help="the JSON, attack.md beside (default: the world's results/attack.json)")
    attack.set_defaults(run=_attack)
