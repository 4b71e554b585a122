"""The MiniCanvas world and its judges: training its model, classifier and artifact detector, and
classifying or grading images."""

from __future__ import annotations

import argparse
from pathlib import Path

from saemnesia.cli.common import add_canvas_world_argument


def _train_world(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.model import DESIGNS, train_model

    train_model(
        Path(args.out or _world(args).model),
        Path(args.checkpoint or f"runs/{args.world}-model"),
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        seed=args.seed,
        device=args.device,
        text_length=args.text_length,
        min_snr_gamma=args.min_snr_gamma,
        design=DESIGNS[args.world],
        workers=args.workers,
    )


def _world(args: argparse.Namespace):
    from saemnesia.worlds import WORLDS

    return WORLDS[args.world]


def _world_step_cost(args: argparse.Namespace) -> None:
    import json

    import torch

    from saemnesia.minicanvas.model import CANDIDATE_DESIGNS, step_seconds

    torch.set_num_threads(args.threads)
    for name, design in CANDIDATE_DESIGNS.items():
        print(json.dumps({"design": name, **step_seconds(design, args.batch_size, args.repeats)}), flush=True)


def _train_classifier(args: argparse.Namespace) -> None:
    from saemnesia.minicanvas.classifier import NO_OBJECT_FOLDER, train_classifier

    world = _world(args)
    default = world.assets / (NO_OBJECT_FOLDER if args.no_object_share else "classifier")
    train_classifier(
        Path(args.out or default),
        world.canvas,
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

    world = _world(args)
    floor_seeds = FLOOR_SEEDS if args.floor_seeds is None else args.floor_seeds
    needs_model = args.generated_seeds > 0 or len(floor_seeds) > 0
    studio = Studio.load(world, device=args.device, model=args.model) if needs_model else None
    train_artifact_detector(
        Path(args.out or world.assets / "artifact-detector"),
        world.canvas,
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
    from saemnesia.worlds import default_device, portable_name

    files = []
    for path in args.images:
        try:
            with Image.open(path) as image:
                files.append(image.convert("RGB"))
        except (FileNotFoundError, UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Cannot read '{path}' as an image ({error}).") from error
    world = _world(args)
    folder = Path(args.detector) if args.detector else world.assets / "artifact-detector"
    detector = ArtifactDetector.load(folder, device=args.device or default_device())
    studio = Studio.load(world, device=args.device, model=args.model)
    generated, labels = untouched_generations(studio, args.seeds or FLOOR_SEEDS)
    generated_probabilities = artifact_probabilities(detector, generated)
    floor = rate_summary(generated_probabilities, labels)

    clean, corrupted, names, _ = held_out_sets(world.canvas, args.drawings)
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
    print(json.dumps({"untouched_floor": floor, "grid": portable_name(str(out))}, indent=1))


def _classify(args: argparse.Namespace) -> None:
    import json

    from PIL import Image, UnidentifiedImageError

    from saemnesia.minicanvas.classifier import classify, load_classifier

    images = []
    for path in args.images:
        if not Path(path).is_file():
            raise FileNotFoundError(f"Image '{path}' does not exist.")
        try:
            with Image.open(path) as image:
                images.append(image.convert("RGB"))
        except (UnidentifiedImageError, OSError) as error:
            raise ValueError(f"Cannot read '{path}' as an image ({error}).") from error
    classifier = load_classifier(args.classifier or _world(args).assets / "classifier", device=args.device)
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
    from saemnesia.worlds import load_pipeline

    world = _world(args)
    world = dataclasses.replace(world, model=args.model) if args.model else world
    classifier = load_classifier(args.classifier or world.assets / "classifier", device=args.device)
    pipeline = load_pipeline(world.model, device=args.device)
    quality = world_quality(
        pipeline,
        classifier,
        world,
        seeds=args.seeds,
        steps=args.steps,
        guidance=args.guidance,
        grid=Path(args.grid or world.assets / "samples.png"),
    )
    out = Path(args.out or world.assets / "quality.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(quality, indent=2) + "\n")
    print(json.dumps({key: quality[key] for key in ("object_accuracy", "style_accuracy", "both_accuracy")}))


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The MiniCanvas commands, in the order `--help` lists them."""
    train_world = commands.add_parser("train-world", help="train MiniCanvas's text-to-image model (resumable)")
    add_canvas_world_argument(train_world)
    train_world.add_argument("--out", help="the model folder (default: the world's)")
    train_world.add_argument("--checkpoint", help="resumable training state (default: runs/<world>-model)")
    train_world.add_argument("--steps", type=int, help="default: the world's (10,000)")
    train_world.add_argument("--batch-size", type=int, default=48)
    train_world.add_argument("--learning-rate", type=float, default=1e-3)
    train_world.add_argument("--seed", type=int, default=0)
    train_world.add_argument("--device", default="cpu")
    train_world.add_argument("--text-length", type=int, default=77, help="tokenizer context length")
    train_world.add_argument("--min-snr-gamma", type=float, default=5.0, help="Min-SNR loss weighting (0: off)")
    train_world.add_argument(
        "--workers", type=int, default=0, help="processes drawing batches ahead (on a GPU machine, its spare cores)"
    )
    train_world.set_defaults(run=_train_world)

    step_cost = commands.add_parser(
        "world-step-cost", help="seconds per training step of MiniCanvas's design and the candidates beside it"
    )
    step_cost.add_argument("--batch-size", type=int, default=48)
    step_cost.add_argument("--repeats", type=int, default=5)
    step_cost.add_argument("--threads", type=int, default=1, help="torch threads (training runs on one)")
    step_cost.set_defaults(run=_world_step_cost)

    train_classifier = commands.add_parser(
        "train-classifier", help="train the MiniCanvas object and style classifier (a few CPU minutes)"
    )
    add_canvas_world_argument(train_classifier)
    train_classifier.add_argument("--out", help="default: the world's classifier (or classifier-no-object) folder")
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
    add_canvas_world_argument(train_artifacts)
    train_artifacts.add_argument("--out", help="default: the world's artifact-detector folder")
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
    add_canvas_world_argument(artifact_grid)
    artifact_grid.add_argument("--detector", help="detector folder (default: the world's artifact-detector)")
    artifact_grid.add_argument("--out", help="grid PNG (default: validation-grid.png in the detector folder)")
    artifact_grid.add_argument("--seeds", type=int, nargs="+", help="floor seeds (default 90000-90002)")
    artifact_grid.add_argument("--drawings", type=int, default=50, help="held-out drawings, clean and corrupted")
    artifact_grid.add_argument("--model", help="diffusers folder (default: MiniCanvas's model)")
    artifact_grid.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: CUDA if present)")
    artifact_grid.set_defaults(run=_artifact_grid)

    classify = commands.add_parser("classify", help="object and style of MiniCanvas images, one JSON line each")
    classify.add_argument("images", nargs="+", metavar="IMAGE", help="any size; resized to the classifier's")
    add_canvas_world_argument(classify)
    classify.add_argument("--classifier", help="classifier folder (default: the world's)")
    classify.add_argument("--device", default="cpu")
    classify.set_defaults(run=_classify)

    world_quality = commands.add_parser(
        "world-quality", help="how often the MiniCanvas model draws the asked object and style"
    )
    add_canvas_world_argument(world_quality)
    world_quality.add_argument("--model", help="diffusers folder (default: the world's model)")
    world_quality.add_argument("--classifier", help="classifier folder (default: the world's)")
    world_quality.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    world_quality.add_argument("--steps", type=int, help="default: the world's")
    world_quality.add_argument("--guidance", type=float, help="default: the world's")
    world_quality.add_argument("--out", help="default: the world's quality.json")
    world_quality.add_argument("--grid", help="first seed's images, PNG (default: the world's samples.png)")
    world_quality.add_argument("--device", default="cpu")
    world_quality.set_defaults(run=_world_quality)
