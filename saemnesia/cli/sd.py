"""The Stable Diffusion world: preparing it in one command, the nudity concept and its evaluation, and the
GPU smoke test."""

from __future__ import annotations

import argparse
from pathlib import Path

from saemnesia.cli.common import sae_folder


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


def _nudity_concept(args: argparse.Namespace) -> None:
    import json

    from saemnesia.nudity import nudity_stats, read_prompts, save_nudity_concept
    from saemnesia.sae import Sae
    from saemnesia.worlds import WORLDS, load_pipeline

    world = WORLDS[args.world]
    folder = sae_folder(world, args.variant, "object", args.sae)
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
    folder = sae_folder(world, VARIANT_OF_METHOD[args.method], "object", args.sae)
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


def add_commands(commands: argparse._SubParsersAction) -> None:
    """The SD-world commands, in the order `--help` lists them."""
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
