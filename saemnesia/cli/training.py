"""Training the SAEs: collecting activations, probing blocks, the unsupervised SAE, its statistics, the
supervised fine-tuning and the centralisation report."""

from __future__ import annotations

import argparse
from pathlib import Path

from saemnesia.cli.common import WORLD_NAMES, add_world_arguments, sae_folder


def _training_world(args: argparse.Namespace):
    """The world, the block of `--kind` and the activations folder of an SAE-training command."""
    from saemnesia.worlds import WORLDS

    world = WORLDS[args.world]
    block = args.block or world.block_for(args.kind)
    return world, block, Path(args.activations or f"runs/{world.name}-activations")


def _processes(args: argparse.Namespace):
    """Accelerate's process state and this process's device.

    Launched as several processes (`accelerate launch` or `torchrun`), each works on its own device;
    accelerate joins CPU processes only when told they are CPU.
    """
    from accelerate import PartialState

    from saemnesia.worlds import default_device

    requested = args.device or default_device()
    processes = PartialState(cpu=requested == "cpu")
    return processes, str(processes.device) if processes.num_processes > 1 else requested


def _collect(args: argparse.Namespace) -> None:
    from saemnesia.train import collect
    from saemnesia.worlds import WORLDS, load_pipeline

    processes, device = _processes(args)
    world = WORLDS[args.world]
    activations = collect(
        world,
        load_pipeline(args.model or world.model, device=device),
        args.out or f"runs/{world.name}-activations",
        blocks=args.block,
        seeds_per_prompt=args.seeds_per_prompt,
        first_seed=args.first_seed,
        images_per_shard=args.images_per_shard,
        processes=processes,
    )
    if processes.is_main_process:
        print(f"{activations.num_images} images in {activations.num_shards} shards in {activations.folder}")


def _probe_blocks(args: argparse.Namespace) -> None:
    import json

    from saemnesia.train import Activations, probe_blocks

    activations = Activations.open(args.activations)
    report = probe_blocks(activations, args.block or activations.settings["blocks"])
    print(json.dumps(report, indent=2))


def _train_sae(args: argparse.Namespace) -> None:
    import json

    from saemnesia.train import Activations, SaeTrainConfig, save_sae, train_sae

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
    processes, device = _processes(args)
    parallel = processes if processes.num_processes > 1 else None
    sae, report = train_sae(Activations.open(activations), block, config, device=device, processes=parallel)
    if processes.is_main_process:
        out = sae_folder(world, "unsupervised", args.kind, args.out, block)
        save_sae(sae, report, out)
        print(json.dumps({"sae": str(out), "heldout": report["heldout"]}))


def _stats(args: argparse.Namespace) -> None:
    from saemnesia.concepts import ConceptDictionary
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE, FOOTPRINTS_FILE
    from saemnesia.train import Activations, compute_footprints, write_stats
    from saemnesia.worlds import default_device

    world, block, activations = _training_world(args)
    folder = sae_folder(world, args.variant, args.kind, args.sae, block)
    if args.sae_source:
        # A published SAE (hub id or download) is copied into the folder its statistics go to.
        from saemnesia.sae import load_sae

        load_sae(args.sae_source, block).save(folder)
    # A supervised SAE keeps the dictionary it was trained to; an unsupervised one (or a published
    # supervised one, whose dictionary ships only as a pickle) gets a fresh greedy one.
    dictionary_path = folder / DICTIONARY_FILE
    keep_dictionary = args.variant == "supervised" and dictionary_path.is_file()
    dictionary = ConceptDictionary.load(dictionary_path) if keep_dictionary else None
    sae = Sae.load(folder, args.device or default_device())
    collection = Activations.open(activations)
    write_stats(sae, collection, block, folder, dictionary)
    print(f"statistics and dictionary written to {folder}")
    if args.footprints:
        compute_footprints(sae, collection, block, args.kind).save(folder / FOOTPRINTS_FILE)
        print(f"footprints of the {args.kind}s written to {folder / FOOTPRINTS_FILE}")


def _finetune(args: argparse.Namespace) -> None:
    import json

    from saemnesia.concepts import ConceptDictionary
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE
    from saemnesia.train import Activations, FinetuneConfig, finetune, save_sae, write_stats
    from saemnesia.worlds import default_device

    world, block, folder = _training_world(args)
    source = sae_folder(world, "unsupervised", args.kind, args.sae, block)
    out = sae_folder(world, "supervised", args.kind, args.out, block)
    dictionary = ConceptDictionary.load(source / DICTIONARY_FILE)
    activations = Activations.open(folder)
    config = FinetuneConfig(
        supervision=args.supervision,
        lr=args.learning_rate,
        epochs=args.epochs,
        batch_size=args.batch_size,
        patience=args.patience,
        holdout=args.holdout,
        concept_weight=args.concept_weight,
        seed=args.seed,
    )
    sae, report = finetune(Sae.load(source, args.device or default_device()), activations, block, dictionary, config)
    save_sae(sae, report, out)
    write_stats(sae, activations, block, out, dictionary)
    print(json.dumps({"sae": str(out), "best_epoch": report["best_epoch"], "heldout": report["heldout_after"]}))


def _centralisation(args: argparse.Namespace) -> None:
    from saemnesia.concepts import ConceptDictionary, ConceptStats
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE, STATS_FILE
    from saemnesia.train import (
        CENTRALISATION_FILE,
        centralisation_report,
        centralisation_table,
        decoder_overlap,
        write_centralisation,
    )
    from saemnesia.worlds import WORLDS

    world = WORLDS[args.world]
    folders = {
        "unsupervised": sae_folder(world, "unsupervised", args.kind, args.unsupervised, args.block),
        "supervised": sae_folder(world, "supervised", args.kind, args.supervised, args.block),
    }
    variants = {
        variant: (ConceptStats.load(folder / STATS_FILE), ConceptDictionary.load(folder / DICTIONARY_FILE))
        for variant, folder in folders.items()
        if (folder / STATS_FILE).is_file()
    }
    if not variants:
        raise FileNotFoundError(f"No statistics in {', '.join(map(str, folders.values()))}: run `stats` first.")
    overlaps = {
        variant: decoder_overlap(Sae.load(folders[variant]), dictionary)
        for variant, (_, dictionary) in variants.items()
    }
    report = centralisation_report(variants, args.block or world.block_for(args.kind), overlaps)
    out = Path(args.out) if args.out else folders[list(variants)[-1]] / CENTRALISATION_FILE
    write_centralisation(report, out)
    print(centralisation_table(report))


def _index_latents(args: argparse.Namespace) -> None:
    import json

    from saemnesia.concepts import ConceptDictionary, ConceptStats
    from saemnesia.latent_index import index_latents
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE, LATENTS_FOLDER, STATS_FILE
    from saemnesia.train import Activations
    from saemnesia.worlds import WORLDS

    world = WORLDS[args.world]
    activations = Activations.open(args.activations or f"runs/{world.name}-activations")
    saes = []
    for variant in ("supervised", "unsupervised"):
        for kind in ("object", "style"):
            folder, block = world.sae_folder(variant, kind), world.block_for(kind)
            if not (folder / STATS_FILE).is_file() or block not in activations.settings["blocks"]:
                continue
            dictionary = ConceptDictionary.load(folder / DICTIONARY_FILE) if variant == "supervised" else None
            saes.append((variant, block, Sae.load(folder), ConceptStats.load(folder / STATS_FILE), dictionary))
    if not saes:
        raise ValueError(f"No SAE with statistics in {world.assets / 'sae'} reads a block of {activations.folder}.")
    summary = index_latents(activations, saes, Path(args.out or world.assets / LATENTS_FOLDER), top=args.top)
    print(json.dumps(summary, indent=1))


def _latent(args: argparse.Namespace) -> None:
    import json

    from saemnesia.cli.common import load_studio
    from saemnesia.latent_index import latent_page

    studio = load_studio(args)
    bundle, latent, _ = studio.resolve_latent(args.latent, args.kind, args.method)
    if bundle.index is None:
        raise ValueError(f"No latent index for {args.method}'s {args.kind} SAE: make one with `index-latents`.")
    print(json.dumps(latent_page(bundle.index, studio.images, latent).summary(), indent=1))


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=WORLD_NAMES, default="minicanvas")
    parser.add_argument("--kind", choices=["object", "style"], default="object", help="the world's hook point for it")
    parser.add_argument("--block", help="another hook point for the SAE (default: the world's for --kind)")
    parser.add_argument("--activations", help="collected activations (default: runs/<world>-activations)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The SAE-training commands, in the order `--help` lists them."""
    collect = commands.add_parser(
        "collect",
        help="store hooked block outputs over whole trajectories (resumable; under `accelerate launch --multi_gpu` "
        "or `torchrun --nproc_per_node N` the shards are split over the processes)",
    )
    add_world_arguments(collect)
    collect.add_argument("--out", help="activations folder (default: runs/<world>-activations)")
    collect.add_argument("--block", action="append", help="hook point, repeat for several (default: object and style)")
    collect.add_argument("--seeds-per-prompt", type=int, default=4)
    collect.add_argument("--first-seed", type=int, default=0)
    collect.add_argument("--images-per-shard", type=int, default=32, help="images per pipeline call and shard")
    collect.set_defaults(run=_collect)

    probe = commands.add_parser("probe-blocks", help="which collected block tells objects / styles apart best")
    probe.add_argument("--activations", default="runs/minicanvas-activations")
    probe.add_argument("--block", action="append", help="default: every collected block")
    probe.set_defaults(run=_probe_blocks)

    train_sae = commands.add_parser(
        "train-sae",
        help="train an unsupervised TopK SAE (SAeUron) on collected tokens (data-parallel under `accelerate launch`)",
    )
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
    stats.add_argument(
        "--sae-source",
        help="published SAE to copy into --sae first: hub id or folder (bcywinski/SAeUron, leno3003/SAEmnesia)",
    )
    stats.add_argument(
        "--footprints", action="store_true", help="also the footprints of the kind's concepts, which Paint draws with"
    )
    stats.set_defaults(run=_stats)

    finetune = commands.add_parser("finetune", help="SAEmnesia: bind each concept to its dictionary latent")
    _add_training_arguments(finetune)
    finetune.add_argument("--sae", help="unsupervised SAE folder with dictionary.json (default: the world's)")
    finetune.add_argument("--out", help="supervised SAE folder (default: assets/<world>/sae/supervised/<hook point>)")
    finetune.add_argument("--supervision", choices=["bce", "bce-balanced", "ce"], default="bce")
    finetune.add_argument("--learning-rate", type=float, default=5e-6)
    finetune.add_argument("--epochs", type=int, default=150)
    finetune.add_argument("--batch-size", type=int, default=128, help="images (one step each) per batch")
    finetune.add_argument("--patience", type=int, default=5)
    finetune.add_argument("--holdout", type=float, default=0.2, help="share of images held out for early stopping")
    finetune.add_argument(
        "--concept-weight", type=float, default=3.0, help="weight of the supervision term (the paper's 3.0)"
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(run=_finetune)

    index = commands.add_parser(
        "index-latents", help="every SAE latent's top images, density and neighbours, from a collection (resumable)"
    )
    index.add_argument("--world", choices=WORLD_NAMES, default="minicanvas")
    index.add_argument("--activations", help="a collection of both SAE blocks (default: runs/<world>-activations)")
    index.add_argument("--out", help="default: assets/<world>/latents")
    index.add_argument("--top", type=int, default=8, help="images kept per latent")
    index.set_defaults(run=_index_latents)

    latent = commands.add_parser("latent", help="one latent's page from the index, as JSON")
    add_world_arguments(latent)
    latent.add_argument("latent", help="a concept name (its latent) or a latent index")
    latent.add_argument("--kind", choices=["object", "style"], default="object", help="whose SAE, for an index")
    latent.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    latent.set_defaults(run=_latent)

    centralisation = commands.add_parser("centralisation", help="score share of each concept's best latent")
    centralisation.add_argument("--world", choices=WORLD_NAMES, default="minicanvas")
    centralisation.add_argument("--kind", choices=["object", "style"], default="object")
    centralisation.add_argument("--block", help="another hook point (default: the world's for --kind)")
    centralisation.add_argument("--unsupervised", help="unsupervised SAE folder (default: the world's)")
    centralisation.add_argument("--supervised", help="supervised SAE folder (default: the world's)")
    centralisation.add_argument("--out", help="JSON report (default: centralisation.json in the supervised folder)")
    centralisation.set_defaults(run=_centralisation)
