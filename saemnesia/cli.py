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


def _train_classifier(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.classifier import train_classifier

    train_classifier(
        Path(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        learning_rate=args.learning_rate,
        eval_images=args.eval_images,
    )


def _classify(args: argparse.Namespace) -> None:
    import json

    from PIL import Image, UnidentifiedImageError

    from saemnesia.minicanvas.classifier import classify, load_classifier
    from saemnesia.worlds import MINICANVAS

    images = []
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Image '{path}' does not exist.")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Cannot read '{path}' as an image ({error}).") from error
    classifier = load_classifier(args.classifier or MINICANVAS.assets / "classifier", device=args.device)
    for path, verdict in zip(args.images, classify(classifier, images)):
        print(
            json.dumps(
                {
                    "path": path,
                    "object": verdict.object,
                    "object_prob": round(verdict.object_prob, 4),
                    "style": verdict.style,
                    "style_prob": round(verdict.style_prob, 4),
                }
            )
        )


def _world_quality(args: argparse.Namespace) -> None:
    import dataclasses
    import json

    from saemnesia.minicanvas.classifier import load_classifier, world_quality
    from saemnesia.worlds import MINICANVAS, load_pipeline

    world = dataclasses.replace(MINICANVAS, model=args.model) if args.model else MINICANVAS
    classifier = load_classifier(args.classifier or world.assets / "classifier", device=args.device)
    pipeline = load_pipeline(world.model, device=args.device)
    quality = world_quality(
        pipeline, classifier, world, seeds=args.seeds, steps=args.steps, guidance=args.guidance, grid=Path(args.grid)
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps({key: quality[key] for key in ("object_accuracy", "style_accuracy", "both_accuracy")}))


def _load_studio(args: argparse.Namespace):
    from saemnesia.studio import Studio
    from saemnesia.worlds import WORLDS

    return Studio.load(WORLDS[args.world], device=args.device, model=args.model)


def _add_world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas")
    parser.add_argument("--model", help="diffusers folder or hub id (default: the world's model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def _generate(args: argparse.Namespace) -> None:
    import json

    studio = _load_studio(args)
    result = studio.erase(
        [args.prompt],
        args.erase,
        method=args.method,
        strength=args.strength,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        start_step=args.start_step,
        features_per_step=args.features_per_step,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result.originals[0].save(out / "original.png")
    result.erased[0].save(out / "erased.png")
    (out / "settings.json").write_text(json.dumps(result.settings, indent=2) + "\n")
    for warning in result.settings["warnings"]:
        logging.warning(warning)
    print(json.dumps({"original": str(out / "original.png"), "erased": str(out / "erased.png")}))


def _training_world(args: argparse.Namespace):
    """The world, the block of `--kind` and the activations folder of an SAE-training command."""
    from saemnesia.worlds import WORLDS

    world = WORLDS[args.world]
    return world, world.block_for(args.kind), Path(args.activations or f"runs/{world.name}-activations")


def _sae_folder(world, variant: str, kind: str, given: str | None) -> Path:
    """The folder given, or the world's `assets/<world>/sae/<variant>/<hook point>/`."""
    if given:
        return Path(given)
    if world.assets is None:
        raise ValueError(f"World '{world.name}' has no assets folder: give the SAE folder explicitly.")
    return world.sae_folder(variant, kind)


def _collect(args: argparse.Namespace) -> None:
    from saemnesia.train import collect
    from saemnesia.worlds import WORLDS, load_pipeline

    world = WORLDS[args.world]
    activations = collect(
        world,
        load_pipeline(args.model or world.model, device=args.device),
        args.out or f"runs/{world.name}-activations",
        blocks=args.block,
        seeds_per_prompt=args.seeds_per_prompt,
        first_seed=args.first_seed,
        images_per_shard=args.images_per_shard,
    )
    print(f"{activations.num_images} images in {activations.num_shards} shards in {activations.folder}")


def _train_sae(args: argparse.Namespace) -> None:
    import json

    from saemnesia.train import Activations, SaeTrainConfig, save_sae, train_sae
    from saemnesia.worlds import default_device

    world, block, activations = _training_world(args)
    config = SaeTrainConfig(
        expansion_factor=args.expansion_factor,
        k=args.k,
        batch_size=args.batch_size,
        epochs=args.epochs or (5 if args.kind == "object" else 10),
        lr=args.learning_rate,
        dead_tokens=args.dead_tokens,
        holdout=args.holdout,
        seed=args.seed,
    )
    sae, report = train_sae(Activations.open(activations), block, config, device=args.device or default_device())
    out = _sae_folder(world, "unsupervised", args.kind, args.out)
    save_sae(sae, report, out)
    print(json.dumps({"sae": str(out), "heldout": report["heldout"]}))


def _stats(args: argparse.Namespace) -> None:
    from saemnesia.concepts import ConceptDictionary
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE
    from saemnesia.train import Activations, write_stats
    from saemnesia.worlds import default_device

    world, block, activations = _training_world(args)
    folder = _sae_folder(world, args.variant, args.kind, args.sae)
    # A supervised SAE keeps the dictionary it was trained to; an unsupervised one gets a fresh greedy one.
    dictionary = ConceptDictionary.load(folder / DICTIONARY_FILE) if args.variant == "supervised" else None
    sae = Sae.load(folder, args.device or default_device())
    write_stats(sae, Activations.open(activations), block, folder, dictionary)
    print(f"statistics and dictionary written to {folder}")


def _finetune(args: argparse.Namespace) -> None:
    import json

    from saemnesia.concepts import ConceptDictionary
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE
    from saemnesia.train import Activations, FinetuneConfig, finetune, save_sae, write_stats
    from saemnesia.worlds import default_device

    world, block, folder = _training_world(args)
    source = _sae_folder(world, "unsupervised", args.kind, args.sae)
    out = _sae_folder(world, "supervised", args.kind, args.out)
    dictionary = ConceptDictionary.load(source / DICTIONARY_FILE)
    activations = Activations.open(folder)
    config = FinetuneConfig(
        supervision=args.supervision,
        lr=args.learning_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience,
        holdout=args.holdout,
        seed=args.seed,
    )
    sae, report = finetune(Sae.load(source, args.device or default_device()), activations, block, dictionary, config)
    save_sae(sae, report, out)
    write_stats(sae, activations, block, out, dictionary)
    print(json.dumps({"sae": str(out), "best_epoch": report["best_epoch"], "heldout": report["heldout_after"]}))


def _centralisation(args: argparse.Namespace) -> None:
    from saemnesia.concepts import ConceptDictionary, ConceptStats
    from saemnesia.studio import DICTIONARY_FILE, STATS_FILE
    from saemnesia.train import CENTRALISATION_FILE, centralisation_report, centralisation_table, write_centralisation
    from saemnesia.worlds import WORLDS

    world = WORLDS[args.world]
    folders = {
        "unsupervised": _sae_folder(world, "unsupervised", args.kind, args.unsupervised),
        "supervised": _sae_folder(world, "supervised", args.kind, args.supervised),
    }
    variants = {
        variant: (ConceptStats.load(folder / STATS_FILE), ConceptDictionary.load(folder / DICTIONARY_FILE))
        for variant, folder in folders.items()
        if (folder / STATS_FILE).is_file()
    }
    if not variants:
        raise FileNotFoundError(f"No statistics in {', '.join(map(str, folders.values()))}: run `stats` first.")
    report = centralisation_report(variants, world.block_for(args.kind))
    out = Path(args.out) if args.out else folders[list(variants)[-1]] / CENTRALISATION_FILE
    write_centralisation(report, out)
    print(centralisation_table(report))


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas")
    parser.add_argument("--kind", choices=["object", "style"], default="object", help="the world's hook point for it")
    parser.add_argument("--activations", help="collected activations (default: runs/<world>-activations)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


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

    train_classifier = commands.add_parser(
        "train-classifier", help="train the MiniCanvas object and style classifier (a few CPU minutes)"
    )
    train_classifier.add_argument("--out", default="assets/minicanvas/classifier")
    train_classifier.add_argument("--steps", type=int, default=800)
    train_classifier.add_argument("--batch-size", type=int, default=64)
    train_classifier.add_argument("--learning-rate", type=float, default=3e-3)
    train_classifier.add_argument("--eval-images", type=int, default=2000, help="fresh images to measure accuracy on")
    train_classifier.add_argument("--seed", type=int, default=0)
    train_classifier.add_argument("--device", default="cpu")
    train_classifier.set_defaults(run=_train_classifier)

    classify = commands.add_parser("classify", help="object and style of MiniCanvas images, one JSON line each")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="any size; resized to 32 x 32")
    classify.add_argument("--classifier", help="classifier folder (default: assets/minicanvas/classifier)")
    classify.add_argument("--device", default="cpu")
    classify.set_defaults(run=_classify)

    world_quality = commands.add_parser(
        "world-quality", help="how often the MiniCanvas model draws the asked object and style"
    )
    world_quality.add_argument("--model", help="diffusers folder (default: MiniCanvas's model)")
    world_quality.add_argument("--classifier", help="classifier folder (default: assets/minicanvas/classifier)")
    world_quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    world_quality.add_argument("--steps", type=int, help="default: the world's")
    world_quality.add_argument("--guidance", type=float, help="default: the world's")
    world_quality.add_argument("--out", default="assets/minicanvas/quality.json")
    world_quality.add_argument("--grid", default="assets/minicanvas/samples.png", help="first seed's images, PNG")
    world_quality.add_argument("--device", default="cpu")
    world_quality.set_defaults(run=_world_quality)

    generate = commands.add_parser("generate", help="original and erased image from one seed")
    _add_world_arguments(generate)
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--erase", action="append", default=[], metavar="CONCEPT", help="repeat for several")
    generate.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    generate.add_argument("--strength", type=float, default=-10.0, help="gamma, negative (default -10)")
    generate.add_argument("--features-per-step", type=int, default=1, help="SAeUron only: latents per step")
    generate.add_argument("--start-step", type=int, default=0)
    generate.add_argument("--seed", type=int, default=0)
    generate.add_argument("--steps", type=int, help="default: the world's")
    generate.add_argument("--guidance", type=float, help="default: the world's")
    generate.add_argument("--out", required=True, help="folder for original.png, erased.png, settings.json")
    generate.set_defaults(run=_generate)

    collect = commands.add_parser("collect", help="store hooked block outputs over whole trajectories (resumable)")
    _add_world_arguments(collect)
    collect.add_argument("--out", help="activations folder (default: runs/<world>-activations)")
    collect.add_argument("--block", action="append", help="hook point, repeat for several (default: object and style)")
    collect.add_argument("--seeds-per-prompt", type=int, default=4)
    collect.add_argument("--first-seed", type=int, default=0)
    collect.add_argument("--images-per-shard", type=int, default=32, help="images per pipeline call and shard")
    collect.set_defaults(run=_collect)

    train_sae = commands.add_parser("train-sae", help="train an unsupervised TopK SAE (SAeUron) on collected tokens")
    _add_training_arguments(train_sae)
    train_sae.add_argument("--out", help="SAE folder (default: assets/<world>/sae/unsupervised/<hook point>)")
    train_sae.add_argument("--expansion-factor", type=int, default=16)
    train_sae.add_argument("--k", type=int, default=32)
    train_sae.add_argument("--batch-size", type=int, default=4096, help="tokens per batch")
    train_sae.add_argument("--epochs", type=int, help="default: 5 for objects, 10 for styles")
    train_sae.add_argument("--learning-rate", type=float, help="default: 2e-4 / sqrt(latents / 16384)")
    train_sae.add_argument("--dead-tokens", type=int, help="tokens without firing to count as dead (default: epoch/10)")
    train_sae.add_argument("--holdout", type=float, default=0.1, help="share of images held out for FVU")
    train_sae.add_argument("--seed", type=int, default=0)
    train_sae.set_defaults(run=_train_sae)

    stats = commands.add_parser("stats", help="concept statistics of an SAE, and its concept dictionary")
    _add_training_arguments(stats)
    stats.add_argument("--variant", choices=["unsupervised", "supervised"], default="unsupervised")
    stats.add_argument("--sae", help="SAE folder, where the files go (default: the world's for variant and kind)")
    stats.set_defaults(run=_stats)

    finetune = commands.add_parser("finetune", help="SAEmnesia: bind each concept to its dictionary latent")
    _add_training_arguments(finetune)
    finetune.add_argument("--sae", help="unsupervised SAE folder with dictionary.json (default: the world's)")
    finetune.add_argument("--out", help="supervised SAE folder (default: assets/<world>/sae/supervised/<hook point>)")
    finetune.add_argument("--supervision", choices=["bce", "ce"], default="bce")
    finetune.add_argument("--learning-rate", type=float, default=5e-6)
    finetune.add_argument("--epochs", type=int, default=150)
    finetune.add_argument("--batch-size", type=int, default=128, help="images (one step each) per batch")
    finetune.add_argument("--patience", type=int, default=5)
    finetune.add_argument("--holdout", type=float, default=0.2, help="share of images held out for early stopping")
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(run=_finetune)

    centralisation = commands.add_parser("centralisation", help="score share of each concept's best latent")
    centralisation.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas")
    centralisation.add_argument("--kind", choices=["object", "style"], default="object")
    centralisation.add_argument("--unsupervised", help="unsupervised SAE folder (default: the world's)")
    centralisation.add_argument("--supervised", help="supervised SAE folder (default: the world's)")
    centralisation.add_argument("--out", help="JSON report (default: centralisation.json in the supervised folder)")
    centralisation.set_defaults(run=_centralisation)
    return parser


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
