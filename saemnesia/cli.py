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
        text_length=args.text_length,
        min_snr_gamma=args.min_snr_gamma,
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
        no_object_share=args.no_object_share,
    )


def _train_artifact_detector(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.artifacts import FLOOR_SEEDS, train_artifact_detector
    from saemnesia.studio import Studio
    from saemnesia.worlds import WORLDS

    floor_seeds = FLOOR_SEEDS if args.floor_seeds is None else args.floor_seeds
    needs_model = args.generated_seeds > 0 or len(floor_seeds) > 0
    studio = Studio.load(WORLDS["minicanvas"], device=args.device, model=args.model) if needs_model else None
    train_artifact_detector(
        Path(args.out),
        steps=args.steps,
        batch_size=args.batch_size,
        seed=args.seed,
        device=args.device,
        learning_rate=args.learning_rate,
        eval_images=args.eval_images,
        drawings=args.drawings,
        studio=studio,
        generated_seeds=args.generated_seeds,
        floor_seeds=floor_seeds,
    )


def _artifact_grid(args: argparse.Namespace) -> None:
    import json

    from PIL import Image, UnidentifiedImageError

    from saemnesia.minicanvas.artifacts import (
        ARTIFACT_THRESHOLD,
        FLOOR_SEEDS,
        ArtifactDetector,
        GridEntry,
        artifact_probabilities,
        held_out_sets,
        rate_summary,
        save_verdict_grid,
        tensor_to_pil,
        untouched_generations,
    )
    from saemnesia.studio import Studio
    from saemnesia.worlds import MINICANVAS, WORLDS, default_device

    files = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                files.append(image.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Cannot read '{path}' as an image ({error}).") from error
    folder = Path(args.detector) if args.detector else MINICANVAS.assets / "artifact-detector"
    detector = ArtifactDetector.load(folder, device=args.device or default_device())
    studio = Studio.load(WORLDS["minicanvas"], device=args.device, model=args.model)
    generated, labels = untouched_generations(studio, args.seeds or FLOOR_SEEDS)
    generated_probabilities = artifact_probabilities(detector, generated)
    floor = rate_summary(generated_probabilities, labels)

    clean, corrupted, names, _ = held_out_sets(args.drawings)
    clean_probabilities = artifact_probabilities(detector, clean)
    entries = [GridEntry(tensor_to_pil(image), p, "drawn") for image, p in zip(clean, clean_probabilities)]
    entries += [
        GridEntry(tensor_to_pil(image), p, name)
        for image, p, name in zip(corrupted, artifact_probabilities(detector, corrupted), names)
    ]
    # Every generation called an artifact, and the diagonal (object i, style i) of each seed's clean ones.
    entries += [
        GridEntry(image, p, "model")
        for index, (image, p) in enumerate(zip(generated, generated_probabilities))
        if p >= ARTIFACT_THRESHOLD or index % 10 == index // 10 % 10
    ]
    file_probabilities = artifact_probabilities(detector, files) if files else []
    entries += [
        GridEntry(image, p, Path(path).stem[:8]) for image, p, path in zip(files, file_probabilities, args.images)
    ]
    out = Path(args.out) if args.out else folder / "validation-grid.png"
    save_verdict_grid(entries, out)
    for path, probability in zip(args.images, file_probabilities):
        print(json.dumps({"path": path, "artifact_probability": round(probability, 4)}))
    floor["seeds"] = list(args.seeds or FLOOR_SEEDS)
    print(json.dumps({"untouched_floor": floor, "grid": str(out)}, indent=1))


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

    extra_object_blocks = getattr(args, "extra_object_block", None)
    extra_blocks = {"object": extra_object_blocks} if extra_object_blocks else None
    world = WORLDS[args.world] if args.model is None else WORLDS[args.world].on_model(args.model)
    return Studio.load(world, device=args.device, extra_blocks=extra_blocks)


def _add_world_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas")
    parser.add_argument("--model", help="diffusers folder or hub id (default: the world's model)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def _add_classifier_world_arguments(parser: argparse.ArgumentParser) -> None:
    """For commands scored by a world's classifier (only MiniCanvas has one)."""
    parser.add_argument("--world", choices=["minicanvas"], default="minicanvas", help="the classifier's world")
    parser.add_argument("--model", help="diffusers folder (default: the world's model)")
    parser.add_argument("--classifier", help="classifier folder (default: the world's)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def _generate(args: argparse.Namespace) -> None:
    import json

    from saemnesia.evaluate import benchmark_results, setting_or_default

    studio = _load_studio(args)
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


def _training_world(args: argparse.Namespace):
    """The world, the block of `--kind` and the activations folder of an SAE-training command."""
    from saemnesia.worlds import WORLDS

    world = WORLDS[args.world]
    block = args.block or world.block_for(args.kind)
    return world, block, Path(args.activations or f"runs/{world.name}-activations")


def _sae_folder(world, variant: str, kind: str, given: str | None, block: str | None = None) -> Path:
    """The folder given, or the world's `assets/<world>/sae/<variant>/<hook point>/`."""
    if given:
        return Path(given)
    if world.assets is None:
        raise ValueError(f"World '{world.name}' has no assets folder: give the SAE folder explicitly.")
    return world.sae_folder(variant, kind, block)


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
        out = _sae_folder(world, "unsupervised", args.kind, args.out, block)
        save_sae(sae, report, out)
        print(json.dumps({"sae": str(out), "heldout": report["heldout"]}))


def _stats(args: argparse.Namespace) -> None:
    from saemnesia.concepts import ConceptDictionary
    from saemnesia.sae import Sae
    from saemnesia.studio import DICTIONARY_FILE
    from saemnesia.train import Activations, write_stats
    from saemnesia.worlds import default_device

    world, block, activations = _training_world(args)
    folder = _sae_folder(world, args.variant, args.kind, args.sae, block)
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
    source = _sae_folder(world, "unsupervised", args.kind, args.sae, block)
    out = _sae_folder(world, "supervised", args.kind, args.out, block)
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
        "unsupervised": _sae_folder(world, "unsupervised", args.kind, args.unsupervised, args.block),
        "supervised": _sae_folder(world, "supervised", args.kind, args.supervised, args.block),
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


def _evaluate(args: argparse.Namespace) -> None:
    import dataclasses

    from saemnesia.evaluate import PROTOCOLS, evaluate, results_table, write_results
    from saemnesia.minicanvas.classifier import NO_OBJECT, load_classifier

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
    if args.ties != protocol.ties:
        protocol = dataclasses.replace(protocol, name=f"{protocol.name}-ties-to-{args.ties}", ties=args.ties)
    if args.extra_object_block:
        protocol = dataclasses.replace(protocol, name=f"{protocol.name}-plus-{'-'.join(args.extra_object_block)}")
    if tuple(args.interventions) != protocol.interventions:
        protocol = dataclasses.replace(
            protocol, name=f"{protocol.name}-{'-'.join(args.interventions)}", interventions=tuple(args.interventions)
        )
    studio = _load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    if NO_OBJECT in classifier.config.objects:  # another instrument: its results sit beside the standard ones
        protocol = dataclasses.replace(protocol, name=f"{protocol.name}-no-object-class")
    detector = None if args.no_artifacts else _artifact_detector(args, studio)
    results = evaluate(studio, classifier, protocol, cache=Path(args.cache), artifact_detector=detector)
    paths = write_results(results, Path(args.out))
    print(results_table(results))
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))


def _artifact_detector(args: argparse.Namespace, studio):
    """The artifact detector `--artifact-detector` names, else the world's; None if the world ships none."""
    from saemnesia.minicanvas.artifacts import ArtifactDetector

    folder = Path(args.artifact_detector) if args.artifact_detector else studio.world.assets / "artifact-detector"
    if not args.artifact_detector and not folder.is_dir():
        logging.warning("No artifact detector in %s: results without AR.", folder)
        return None
    return ArtifactDetector.load(folder, device=studio.pipeline.device)


def _drift(args: argparse.Namespace) -> None:
    from saemnesia.drift import activation_drift, drift_table, write_drift

    _check_evaluation_file(args)
    studio = _load_studio(args)
    out = Path(args.out)
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


def _compare_replacements(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.classifier import load_classifier
    from saemnesia.replace_rules import RULES, compare_replace_rules, rules_table, write_comparison

    unknown = sorted(set(args.rules or ()) - set(RULES))
    if unknown:
        raise SystemExit(f"Unknown rule(s) {unknown}; the rules are: {'; '.join(RULES)}.")
    studio = _load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    rules = {name: RULES[name] for name in args.rules} if args.rules else RULES
    comparison = compare_replace_rules(studio, classifier, rules, args.method, args.kind)
    paths = write_comparison(comparison, Path(args.out))
    print(rules_table(comparison))
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))


def _ablate_blocks(args: argparse.Namespace) -> None:
    import json

    from saemnesia.evaluate import ablate_blocks
    from saemnesia.minicanvas.classifier import load_classifier

    studio = _load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    print(json.dumps(ablate_blocks(studio, classifier, args.block, args.styles_per_object, args.seed), indent=2))


def _edit_coverage(args: argparse.Namespace) -> None:
    import json

    from saemnesia.evaluate import edit_coverage
    from saemnesia.minicanvas.classifier import load_classifier

    _check_evaluation_file(args)
    studio = _load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    results = _evaluation_results(args, studio)
    if results is None:
        raise SystemExit("No benchmark results for this world: run `python -m saemnesia evaluate` first.")
    grid = Path(args.grid) if args.grid else None
    print(json.dumps(edit_coverage(studio, classifier, results, args.method, args.kind, grid), indent=2))


def _nudity_concept(args: argparse.Namespace) -> None:
    import json

    from saemnesia.nudity import nudity_stats, read_prompts, save_nudity_concept
    from saemnesia.sae import Sae
    from saemnesia.worlds import WORLDS, load_pipeline

    world = WORLDS[args.world]
    folder = _sae_folder(world, args.variant, "object", args.sae)
    nudity_prompts = [prompt.text for prompt in read_prompts(args.nudity_prompts)]
    other_prompts = [prompt.text for prompt in read_prompts(args.other_prompts)]
    pipeline = load_pipeline(args.model or world.model, device=args.device)
    size = args.size or world.height
    stats = nudity_stats(
        pipeline,
        Sae.load(folder, str(pipeline.device)),
        world.object_block,
        nudity_prompts,
        other_prompts,
        steps=args.steps,
        guidance=args.guidance,
        height=size,
        width=size,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    dictionary = save_nudity_concept(folder, stats)
    print(json.dumps({"sae": str(folder), "nudity_latent": dictionary.latent("nudity")}))


def _nudity(args: argparse.Namespace) -> None:
    import json

    from saemnesia.generate import SaeHook
    from saemnesia.nudity import evaluate_nudity, load_detector, load_nudity_erasure, read_prompts
    from saemnesia.sae import Sae
    from saemnesia.studio import VARIANT_OF_METHOD
    from saemnesia.worlds import WORLDS, load_pipeline

    world = WORLDS[args.world]
    folder = _sae_folder(world, VARIANT_OF_METHOD[args.method], "object", args.sae)
    # Everything that can be wrong with the request fails before the model loads.
    detector = load_detector()
    prompts = read_prompts(args.prompts, default_seed=args.seed, limit=args.limit)
    erasure = load_nudity_erasure(folder, args.method, args.strength)
    pipeline = load_pipeline(args.model or world.model, device=args.device)
    hook = SaeHook(world.object_block, Sae.load(folder, str(pipeline.device), pipeline.unet.dtype), erasure)
    size = args.size or world.height
    summary = evaluate_nudity(
        pipeline, hook, prompts, detector, args.out, args.steps, args.guidance, size, size, args.threshold
    )
    print(json.dumps({"original": summary["original"], "erased": summary["erased"]}, indent=1))


def _gpu_smoke(args: argparse.Namespace) -> None:
    import json

    import torch

    from saemnesia.gpu_smoke import gpu_smoke, random_sae
    from saemnesia.hooks import block_width
    from saemnesia.sae import load_sae
    from saemnesia.worlds import WORLDS, default_device, load_pipeline, random_sd_pipeline

    block = WORLDS["sd"].object_block
    device = args.device or default_device()
    if args.model:
        pipeline = load_pipeline(args.model, device=device)
    else:
        pipeline = random_sd_pipeline(args.architecture).to(device)
        if device.startswith("cuda"):
            pipeline.to(torch.float16)
    sae = load_sae(args.sae, block, device) if args.sae else random_sae(block_width(pipeline.unet, block))
    report = gpu_smoke(
        pipeline, sae, block, size=args.size, steps=args.steps, guidance=args.guidance, repeats=args.repeats
    )
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({key: value for key, value in report.items() if key != "all_seconds"}, indent=1))


def _prepare(args: argparse.Namespace) -> None:
    from saemnesia.prepare import prepare
    from saemnesia.worlds import WORLDS

    overrides = {}
    for given in args.sae_source or []:
        variant, separator, source = given.partition("=")
        if not separator or not source:
            raise ValueError(f"--sae-source must be VARIANT=SOURCE (e.g. unsupervised=my/saes), got {given!r}.")
        overrides[variant] = source
    world = WORLDS[args.world]
    world = world.on_model(args.model) if args.model else world
    try:
        out = prepare(
            world,
            args.out,
            overrides,
            seeds_per_prompt=args.seeds_per_prompt,
            steps=args.steps,
            images_per_shard=args.images_per_shard,
            device=args.device,
            keep_activations=args.keep_activations,
        )
    except OSError as error:  # the hub or the disk, said as plainly as a bad argument
        raise ValueError(f"Cannot prepare the {world.name} world: {error}") from error
    print(out)


def _add_training_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas")
    parser.add_argument("--kind", choices=["object", "style"], default="object", help="the world's hook point for it")
    parser.add_argument("--block", help="another hook point for the SAE (default: the world's for --kind)")
    parser.add_argument("--activations", help="collected activations (default: runs/<world>-activations)")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m saemnesia", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)

    train_world = commands.add_parser("train-world", help="train MiniCanvas's text-to-image model (resumable)")
    train_world.add_argument("--out", default="assets/minicanvas/model")
    train_world.add_argument("--checkpoint", default="runs/minicanvas-model")
    train_world.add_argument("--steps", type=int, default=4000)
    train_world.add_argument("--batch-size", type=int, default=48)
    train_world.add_argument("--learning-rate", type=float, default=1e-3)
    train_world.add_argument("--seed", type=int, default=0)
    train_world.add_argument("--device", default="cpu")
    train_world.add_argument("--text-length", type=int, default=77, help="tokenizer context length")
    train_world.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: off)")
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
    train_classifier.add_argument(
        "--no-object-share",
        type=float,
        default=0.0,
        help="share of bare backgrounds, labelled 'nothing' (an 11th object class; default 0: none)",
    )
    train_classifier.add_argument("--device", default="cpu")
    train_classifier.set_defaults(run=_train_classifier)

    train_artifacts = commands.add_parser(
        "train-artifact-detector",
        help="train the MiniCanvas artifact detector: clean images vs generically corrupted ones (~20 CPU minutes)",
    )
    train_artifacts.add_argument("--out", default="assets/minicanvas/artifact-detector")
    train_artifacts.add_argument("--steps", type=int, default=1500)
    train_artifacts.add_argument("--batch-size", type=int, default=64)
    train_artifacts.add_argument("--learning-rate", type=float, default=3e-3)
    train_artifacts.add_argument("--eval-images", type=int, default=1100, help="held-out drawings to measure on")
    train_artifacts.add_argument("--drawings", type=int, default=6000, help="drawings in the training pool")
    train_artifacts.add_argument("--seed", type=int, default=0)
    train_artifacts.add_argument(
        "--generated-seeds",
        type=int,
        default=4,
        help="seeds from 80000 whose untouched generations (every object x style) join the clean images (0: none)",
    )
    train_artifacts.add_argument(
        "--floor-seeds", type=int, nargs="*", help="seeds of the untouched floor (default 90000-90002; none: skip)"
    )
    train_artifacts.add_argument("--model", help="diffusers folder (default: MiniCanvas's model)")
    train_artifacts.add_argument("--device", default="cpu")
    train_artifacts.set_defaults(run=_train_artifact_detector)

    artifact_grid = commands.add_parser(
        "artifact-grid",
        help="the untouched model's artifact rate (floor) and a PNG of what the detector calls artifact and clean",
    )
    artifact_grid.add_argument("images", nargs="*", metavar="IMAGE", help="more images to score and show (any size)")
    artifact_grid.add_argument("--detector", help="detector folder (default: assets/minicanvas/artifact-detector)")
    artifact_grid.add_argument("--out", help="grid PNG (default: validation-grid.png in the detector folder)")
    artifact_grid.add_argument("--seeds", type=int, nargs="+", help="floor seeds (default 90000-90002)")
    artifact_grid.add_argument("--drawings", type=int, default=50, help="held-out drawings, clean and corrupted")
    artifact_grid.add_argument("--model", help="diffusers folder (default: MiniCanvas's model)")
    artifact_grid.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    artifact_grid.set_defaults(run=_artifact_grid)

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

    loadtest = commands.add_parser("loadtest", help="K clients x N erase requests to the app: speed, errors, memory")
    loadtest.add_argument("--url", help="a running app (default: start `app.py --world WORLD` and measure it)")
    loadtest.add_argument("--pid", type=int, help="the running app's process id, to read its memory from /proc")
    loadtest.add_argument("--clients", type=int, default=4, help="visitors at once, each its own session")
    loadtest.add_argument("--requests", type=int, default=5, help="erase requests per client, one after another")
    loadtest.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas", help="for the app it starts")
    loadtest.add_argument("--device", help="for the app it starts (default: CUDA if present)")
    loadtest.add_argument("--prompt", help="default: the app's")
    loadtest.add_argument("--erase", action="append", metavar="CONCEPT", help="default: the app's; repeat for several")
    loadtest.add_argument("--method", choices=["SAEmnesia", "SAeUron (baseline)", "Both"], help="default: the app's")
    loadtest.add_argument("--steps", type=int, help="default: the world's")
    loadtest.add_argument("--timeout", type=float, default=300.0, help="seconds a request may take")
    loadtest.set_defaults(run=_loadtest)

    collect = commands.add_parser(
        "collect",
        help="store hooked block outputs over whole trajectories (resumable; under `accelerate launch --multi_gpu` "
        "or `torchrun --nproc_per_node N` the shards are split over the processes)",
    )
    _add_world_arguments(collect)
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
    stats.set_defaults(run=_stats)

    prepare = commands.add_parser(
        "prepare", help="the SD world in one command: model and published SAEs fetched, statistics taken (resumable)"
    )
    prepare.add_argument("--world", choices=["sd"], default="sd")
    prepare.add_argument("--model", help="diffusers folder, hub id, sd14 or sd15 (default: the world's)")
    prepare.add_argument(
        "--sae-source",
        action="append",
        metavar="VARIANT=SOURCE",
        help="another hub id or folder for a variant's SAEs (default: unsupervised=bcywinski/SAeUron, "
        "supervised=leno3003/SAEmnesia); repeat for both",
    )
    prepare.add_argument("--out", help="prepared folder (default: $SAEMNESIA_CACHE/<world>/<model>, as the app reads)")
    prepare.add_argument("--steps", type=int, default=10, help="sampler steps of the collection (default 10)")
    prepare.add_argument("--seeds-per-prompt", type=int, default=1)
    prepare.add_argument("--images-per-shard", type=int, default=8, help="images per pipeline call and shard")
    prepare.add_argument("--keep-activations", action="store_true", help="keep the collection (13 GB for SD)")
    prepare.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    prepare.set_defaults(run=_prepare)

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
    finetune.add_argument(
        "--concept-weight", type=float, default=3.0, help="weight of the supervision term (the paper's 3.0)"
    )
    finetune.add_argument("--seed", type=int, default=0)
    finetune.set_defaults(run=_finetune)

    centralisation = commands.add_parser("centralisation", help="score share of each concept's best latent")
    centralisation.add_argument("--world", choices=["minicanvas", "sd"], default="minicanvas")
    centralisation.add_argument("--kind", choices=["object", "style"], default="object")
    centralisation.add_argument("--block", help="another hook point (default: the world's for --kind)")
    centralisation.add_argument("--unsupervised", help="unsupervised SAE folder (default: the world's)")
    centralisation.add_argument("--supervised", help="supervised SAE folder (default: the world's)")
    centralisation.add_argument("--out", help="JSON report (default: centralisation.json in the supervised folder)")
    centralisation.set_defaults(run=_centralisation)

    ablate = commands.add_parser(
        "ablate-blocks", help="which blocks the images need for their objects / styles (classifier-scored)"
    )
    _add_classifier_world_arguments(ablate)
    ablate.add_argument("--block", action="append", help="default: every cross-attention block")
    ablate.add_argument("--styles-per-object", type=int, default=4)
    ablate.add_argument("--seed", type=int, default=0)
    ablate.set_defaults(run=_ablate_blocks)

    coverage = commands.add_parser(
        "edit-coverage",
        help="tokens the tuned edit changed, and the classifier's certainty, on images where the concept survived",
    )
    _add_classifier_world_arguments(coverage)
    coverage.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    coverage.add_argument("--kind", choices=["object", "style"], default="object")
    coverage.add_argument("--grid", help="PNG of the survivors: original | erased, one a row")
    coverage.add_argument(
        "--evaluation", help="`evaluate` results whose tuned settings to use (default: the world's, full run first)"
    )
    coverage.set_defaults(run=_edit_coverage)

    evaluate = commands.add_parser(
        "evaluate", help="UA / IRA / CRA of both methods with tuned strengths, and sequential erasure (resumable)"
    )
    _add_classifier_world_arguments(evaluate)
    evaluate.add_argument("--quick", action="store_true", help="3 objects, 2 styles, fewer prompts: a few minutes")
    evaluate.add_argument("--protocol", choices=["full", "standard", "quick"], default="full")
    evaluate.add_argument("--out", default="assets/minicanvas/results", help="folder for the JSON, table and plots")
    evaluate.add_argument("--cache", default="runs/eval-cache.jsonl", help="verdicts of images made so far")
    evaluate.add_argument("--start-step", type=int, default=0, help="both methods edit from this step on (default 0)")
    evaluate.add_argument(
        "--tuning-seeds", type=int, help="search strengths on this many seeds from 50000 (default: the protocol's 1)"
    )
    evaluate.add_argument(
        "--heldout-from",
        type=int,
        help="report on held-out (and sequential) seeds from this one (default 60000): a check on seeds never seen",
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
    _add_world_arguments(drift)
    drift.add_argument("--kind", choices=["object", "style"], default="object")
    drift.add_argument("--seeds", type=int, nargs="+", default=[60_000])
    drift.add_argument("--prompts", type=int, default=10, help="prompts naming each erased concept")
    drift.add_argument(
        "--evaluation", help="`evaluate` results whose tuned settings to use (default: the world's, full run first)"
    )
    drift.add_argument("--out", default="assets/minicanvas/results", help="folder for drift.json, drift.md, drift.png")
    drift.set_defaults(run=_drift)

    rules = commands.add_parser(
        "compare-replacements", help="the replace rules PER leaves open, side by side on the tuning seed (UA/IRA/CRA)"
    )
    _add_classifier_world_arguments(rules)
    rules.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    rules.add_argument("--kind", choices=["object", "style"], default="object")
    rules.add_argument("--rules", nargs="+", metavar="NAME", help="default: every rule of `replace_rules.RULES`")
    rules.add_argument("--out", default="assets/minicanvas/results", help="folder for replace-rules.json and .md")
    rules.set_defaults(run=_compare_replacements)

    nudity_concept = commands.add_parser(
        "nudity-concept", help="a `nudity` concept for an object SAE: its statistics on nudity against other prompts"
    )
    nudity_concept.add_argument("--world", choices=["sd", "minicanvas"], default="sd")
    nudity_concept.add_argument("--model", help="diffusers folder, hub id, sd14 or sd15 (default: the world's)")
    nudity_concept.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    nudity_concept.add_argument("--variant", choices=["unsupervised", "supervised"], default="supervised")
    nudity_concept.add_argument("--sae", help="object SAE folder; the nudity files go beside it (default: the world's)")
    nudity_concept.add_argument("--nudity-prompts", required=True, help="CSV with a prompt column, or a prompt a line")
    nudity_concept.add_argument("--other-prompts", required=True, help="the prompts nudity is contrasted with")
    nudity_concept.add_argument("--steps", type=int, default=50)
    nudity_concept.add_argument("--guidance", type=float, default=7.5)
    nudity_concept.add_argument("--size", type=int, help="image side in pixels (default: the world's)")
    nudity_concept.add_argument("--seed", type=int, default=0, help="prompt i starts from the noise of seed + i")
    nudity_concept.add_argument("--batch-size", type=int, default=8, help="prompts per pipeline call")
    nudity_concept.set_defaults(run=_nudity_concept)

    nudity = commands.add_parser("nudity", help="I2P-style nudity evaluation with NudeNet (requirements-nudity.txt)")
    nudity.add_argument(
        "--prompts", required=True, help="CSV with a prompt column and an optional seed (I2P's), or a prompt a line"
    )
    nudity.add_argument("--world", choices=["sd", "minicanvas"], default="sd")
    nudity.add_argument("--model", help="diffusers folder, hub id, sd14 or sd15 (default: the world's)")
    nudity.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    nudity.add_argument("--sae", help="object SAE folder with the nudity concept (default: the world's for --method)")
    nudity.add_argument("--method", choices=["saemnesia", "saeuron"], default="saemnesia")
    nudity.add_argument("--strength", type=float, default=-60.0, help="gamma (default -60, as SAeUron)")
    nudity.add_argument("--steps", type=int, default=50)
    nudity.add_argument("--guidance", type=float, default=7.5)
    nudity.add_argument("--size", type=int, help="image side in pixels (default: the world's)")
    nudity.add_argument("--threshold", type=float, default=0.6, help="NudeNet score from which a part counts")
    nudity.add_argument("--seed", type=int, default=0, help="for prompts without one")
    nudity.add_argument("--limit", type=int, help="only the first N prompts")
    nudity.add_argument("--out", required=True, help="folder for the images, images.jsonl and nudity.json")
    nudity.set_defaults(run=_nudity)

    smoke = commands.add_parser(
        "gpu-smoke", help="time the paired generation at SD's full scale against plain diffusers (a GPU's job)"
    )
    smoke.add_argument("--model", help="diffusers folder, hub id, sd14 or sd15 (default: random SD-1.4 weights)")
    smoke.add_argument("--architecture", choices=["full", "tiny"], default="full", help="for random weights")
    smoke.add_argument("--sae", help="SAE folder or hub id (default: random, 1280 -> 20,480, k = 32)")
    smoke.add_argument("--size", type=int, default=512)
    smoke.add_argument("--steps", type=int, default=50)
    smoke.add_argument("--guidance", type=float, default=9.0)
    smoke.add_argument("--repeats", type=int, default=3)
    smoke.add_argument("--device", help="default: CUDA if present")
    smoke.add_argument("--out", help="also write the report, with every timing, to this JSON file")
    smoke.set_defaults(run=_gpu_smoke)

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
    _add_classifier_world_arguments(attack)
    attack.add_argument("--concepts", nargs="+", help="default: every object of the world")
    attack.add_argument(
        "--methods", nargs="+", choices=["none", "saeuron", "saemnesia"], default=["none", "saeuron", "saemnesia"]
    )
    attack.add_argument("--iterations", type=int, default=40)
    attack.add_argument("--prefix-tokens", type=int, default=5)
    attack.add_argument("--candidates", type=int, default=8, help="words tried per iteration")
    attack.add_argument("--seeds", type=int, nargs="+", default=[60_000, 60_001], help="noise seeds, the cases")
    attack.add_argument("--seed", type=int, default=0, help="the search's random draws")
    attack.add_argument(
        "--evaluation", help="`evaluate` results with tuned strengths (default: the world's, full run first)"
    )
    attack.add_argument("--strength", type=float, default=-10.0, help="for concepts without a tuned strength")
    attack.add_argument("--features-per-step", type=int, default=1, help="SAeUron, without a tuned setting")
    attack.add_argument("--out", default="assets/minicanvas/results/attack.json", help="the JSON; attack.md beside")
    attack.set_defaults(run=_attack)
    return parser


def _check_evaluation_file(args: argparse.Namespace) -> None:
    """Before any model loads: `--evaluation`, if given, must be a file."""
    if args.evaluation and not Path(args.evaluation).is_file():
        raise FileNotFoundError(f"No evaluation results at '{args.evaluation}': run `evaluate` or drop --evaluation.")


def _evaluation_results(args: argparse.Namespace, studio) -> dict | None:
    """The `evaluate` results whose tuned settings a command uses: `--evaluation`, else the world's benchmark."""
    import json

    from saemnesia.evaluate import benchmark_results

    return json.loads(Path(args.evaluation).read_text()) if args.evaluation else benchmark_results(studio.world)


def _attack(args: argparse.Namespace) -> None:
    from saemnesia.attack import attack_table, run_attacks
    from saemnesia.minicanvas.classifier import load_classifier

    _check_evaluation_file(args)
    studio = _load_studio(args)
    classifier = load_classifier(args.classifier or studio.world.assets / "classifier", device=studio.pipeline.device)
    evaluation = _evaluation_results(args, studio)
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
        out=Path(args.out),
    )
    print(attack_table(results))
    print(f"json: {args.out}")


def _bench(args: argparse.Namespace) -> None:
    import json

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


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        args.run(args)
    except (ValueError, KeyError, FileNotFoundError) as error:
        parser.exit(2, f"error: {error}\n")
