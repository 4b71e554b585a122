"""SAEmnesia Studio: the web app. Layout and callbacks only (one module a tab in `ui/`); every computation is in
`saemnesia`.

    python app.py [--host 127.0.0.1] [--port 7860] [--world minicanvas] [--model PATH] [--device auto]

Every event has an `api_name`, so each action is also an HTTP / `gradio_client` endpoint.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
from dataclasses import replace
from functools import partial

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU wants `spaces` imported before anything touches CUDA; without it the app runs the same
    import spaces
except ImportError:
    spaces = None

import gradio as gr  # noqa: E402

from saemnesia.erase import INTERVENTIONS  # noqa: E402
from saemnesia.evaluate import benchmark_results  # noqa: E402
from saemnesia.prepare import assets_folder, is_prepared, prepare  # noqa: E402
from saemnesia.studio import LIMITS, Studio  # noqa: E402
from saemnesia.worlds import WORLDS  # noqa: E402
from ui.erase import DEFAULT_INTERVENTION, INTERVENTION_CHOICES, METHOD_CHOICES, erase_tab  # noqa: E402
from ui.inspect import inspect_tab  # noqa: E402
from ui.metrics import metrics_tab  # noqa: E402
from ui.neurons import neurons_tab  # noqa: E402
from ui.paint import paint_tab  # noqa: E402
from ui.shared import PIXELS, whole_as_int  # noqa: E402

ABOUT = """
**SAEmnesia** ([Cassano et al., ICML 2026, arXiv 2509.21379](https://arxiv.org/abs/2509.21379)) erases a
concept from a text-to-image diffusion model by switching down **one neuron** of a *supervised* sparse
autoencoder (SAE) that reads a cross-attention block of the UNet. The SAE is first trained without labels,
as in **SAeUron** ([Cywiński & Deja, ICML 2025, arXiv 2501.18052](https://arxiv.org/abs/2501.18052)); then
it is fine-tuned with the prompt's labels so that every concept (an object, a style) lands on exactly one
latent. At inference a hook encodes each image token, multiplies the concept's latent by
`strength × its mean activation` wherever it fires above its mean on other concepts, and adds back only
the change, `x + (z_edit − z) W_dec`. No weight of the diffusion model changes; turning the hook off undoes
the erasure; the only knob is the strength. SAeUron instead edits, at every step, the few latents of an
unsupervised SAE that score highest for the concept, and must search how many.

**Steer or replace.** That multiplication is *steering*, and it can push the block's activations far from
anything the UNet saw, which shows as noise. **Replace** (PER, [Cassano et al., ECCV 2026, arXiv
2606.31699](https://arxiv.org/abs/2606.31699)) uses the same neuron only to *detect* the concept's tokens
and overwrites them with values the block itself produced: the nearest tokens where it did not fire, or, on
MiniCanvas, where an object fills most of the 8 × 8 map, the whole map as the block made it without the prompt
once a fifth of it is detected. The picture stays clean where steer leaves noise, and there is no strength at
all; the Metrics tab has the numbers.

**This world.** MiniCanvas is our small world in the image of UnlearnCanvas: procedurally drawn objects in
styles, a text-to-image model of Stable Diffusion's exact architecture trained from scratch on it, and a
classifier that tells objects and styles apart. Everything runs on a CPU, offline.
"""


CSS = f"""
.prose {{ overflow-x: auto; }}
.prose th, .prose td {{ word-break: normal; overflow-wrap: normal; hyphens: none; }}
.prose td {{ white-space: nowrap; }}
.{PIXELS} img {{ image-rendering: pixelated; }}
.{PIXELS} .grid-wrap.fixed-height {{ min-height: 0; max-height: none; }}
.{PIXELS} .thumbnail-item.thumbnail-lg {{ aspect-ratio: auto; height: auto; display: flex; flex-direction: column; }}
.{PIXELS} .thumbnail-item.thumbnail-lg > img {{ aspect-ratio: 1; height: auto; }}
.{PIXELS} .thumbnail-item .caption-label {{
    position: static; max-width: none; white-space: normal; text-align: center; border: none; border-radius: 0;
}}
"""
"""Markdown tables scroll sideways instead of breaking words over lines; enlarged pixel images stay crisp however
the browser scales them; a gallery's captions (what the classifier sees) sit whole under their images. Gradio 6
takes CSS at `launch()`."""
THEME = gr.themes.Soft()


def load_results(world) -> dict:
    """The cached outputs of the CLI's benchmark commands (missing ones are simply absent)."""
    results = {}
    if world.assets is None:
        return results
    benchmark = benchmark_results(world)
    if benchmark is not None:
        results["benchmark"] = benchmark
    for name, path in {
        "quality": world.assets / "quality.json",
        "attack": world.assets / "results" / "attack.json",
        "centralisation_object": world.sae_folder("supervised", "object") / "centralisation.json",
        "centralisation_style": world.sae_folder("supervised", "style") / "centralisation.json",
    }.items():
        if path.is_file():
            results[name] = json.loads(path.read_text())
    return results


def build_app(studio: Studio, classifier=None) -> gr.Blocks:
    """The whole page for `studio`'s world; `classifier` (MiniCanvas's) gives the verdicts and the live checks."""
    world = studio.world
    results = load_results(world)
    with gr.Blocks(title="SAEmnesia Studio") as app:
        gr.Markdown(
            f"# SAEmnesia Studio\nErase a concept from a diffusion model by switching off **one neuron**. "
            f"World: **{world.name}** ({len(world.objects)} objects × {len(world.styles)} styles)."
        )
        last_run = gr.State(None)
        with gr.Tabs():
            with gr.Tab("Erase"):
                erase_tab(studio, classifier, last_run, results.get("benchmark"))
            with gr.Tab("Inspect"):
                inspect_tab(studio, last_run)
            with gr.Tab("Neurons"):
                neurons_tab(studio, results, last_run)
            with gr.Tab("Paint"):
                paint_tab(studio, classifier)
            with gr.Tab("Metrics"):
                metrics_tab(studio, classifier, results)
            with gr.Tab("About"):
                gr.Markdown(ABOUT)
    return app


ZERO_GPU_EVENTS = ("erase", "neighbours", "quick_check", "attack_images", "paint")
"""The events that generate images: on ZeroGPU each runs under `spaces.GPU`, the rest on the CPU."""
ZERO_GPU_START_SECONDS = 15
"""A ZeroGPU call's cost before its first step (its worker's start, the model's move to the GPU): an estimate."""
ZERO_GPU_SECONDS_PER_IMAGE_STEP = 0.05
"""One 512-pixel SD-1.x image through one guided sampler step on ZeroGPU (a slice of an H200): 2.5 times the
0.019 s measured on a whole H100 (README, "On a GPU"), an estimate until measured there; smaller worlds are faster."""


def on_zero_gpu() -> bool:
    """Whether the app runs on ZeroGPU, where a GPU is lent per decorated call and never held."""
    return spaces is not None and spaces.config.Config.zero_gpu


def gpu_image_steps(world, api_name: str, arguments: dict) -> int:
    """Images times sampler steps an event's request makes, at most: its GPU work. A setting that does not read
    (the Studio will refuse it) counts as the most the Studio allows, so no request is cut short."""
    most = LIMITS["steps"][1]

    def steps(value: object) -> int:
        value = whole_as_int(value)
        valid = isinstance(value, int) and not isinstance(value, bool) and 0 < value <= most
        return value if valid else most

    if api_name == "erase":  # a pair for each method and intervention
        method, intervention = arguments.get("method"), arguments.get("intervention", DEFAULT_INTERVENTION)
        methods = len(METHOD_CHOICES.get(method, METHOD_CHOICES["Both"])) if isinstance(method, str) else 2
        interventions = (
            len(INTERVENTION_CHOICES.get(intervention, INTERVENTIONS)) if isinstance(intervention, str) else 2
        )
        return 2 * methods * interventions * steps(arguments.get("steps"))
    if api_name == "neighbours":  # the last pair's erasure on three neighbour prompts, erased images only
        try:
            return 3 * steps(arguments["state"]["request"][3][2])
        except (KeyError, IndexError, TypeError):
            return 3 * most
    if api_name == "quick_check":  # per seed, eight prompts' originals and erased copies
        seeds = whole_as_int(arguments.get("seeds"))
        return 16 * (seeds if isinstance(seeds, int) and 0 < seeds <= 8 else 8) * world.steps
    if api_name == "paint":  # one pair at the world's steps
        return 2 * world.steps
    return 4 * world.steps  # attack_images: two prompts' pairs


def gpu_seconds(world, api_name: str, signature: inspect.Signature, *args, **kwargs) -> int:
    """ZeroGPU's `duration` for one request of an event: what its images cost, plus the call's start."""
    try:
        arguments = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        arguments = {}
    work = ZERO_GPU_SECONDS_PER_IMAGE_STEP * gpu_image_steps(world, api_name, arguments)
    return math.ceil(ZERO_GPU_START_SECONDS + work)


def run_on_zero_gpu(app: gr.Blocks, world) -> None:
    """Wrap each generating event's function in `spaces.GPU`, asking for as long as its request needs. Off
    ZeroGPU `spaces.GPU` returns the function as it is, and without `spaces` nothing is wrapped."""
    if spaces is None:
        return
    for block_fn in app.fns.values():
        if block_fn.api_name in ZERO_GPU_EVENTS:
            duration = partial(gpu_seconds, world, block_fn.api_name, inspect.signature(block_fn.fn))
            block_fn.fn = spaces.GPU(block_fn.fn, duration=duration)


def main(argv: list[str] | None = None) -> None:
    """Serve the app. On a Space, where `python app.py` takes no arguments, the SAEMNESIA_* variables choose."""
    parser = argparse.ArgumentParser(description="SAEmnesia Studio")
    parser.add_argument("--host", default=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    parser.add_argument("--world", choices=sorted(WORLDS), default=os.environ.get("SAEMNESIA_WORLD", "minicanvas"))
    parser.add_argument(
        "--model", default=os.environ.get("SAEMNESIA_MODEL"), help="diffusers folder or hub id (default: the world's)"
    )
    parser.add_argument(
        "--assets",
        default=os.environ.get("SAEMNESIA_ASSETS"),
        help="folder of SAEs, statistics and results, or a hub repository holding a prepared one (default: world's)",
    )
    parser.add_argument("--device", help="cpu, cuda, … (default: CUDA if present)")
    args = parser.parse_args(argv)
    if args.world not in WORLDS:
        parser.error(f"SAEMNESIA_WORLD must be one of {', '.join(sorted(WORLDS))}, got {args.world!r}.")
    world = WORLDS[args.world].on_model(args.model) if args.model else WORLDS[args.world]
    if args.assets:
        world = replace(world, assets=assets_folder(args.assets))
    if world.published_saes and not is_prepared(world.assets):
        if on_zero_gpu():
            raise SystemExit(
                f"The {world.name} world is not prepared in {world.assets}, and ZeroGPU lends a GPU per request only: "
                "prepare it on a GPU machine (`python -m saemnesia prepare`), upload the folder to a hub repository "
                "and give that as SAEMNESIA_ASSETS (docs/space.md)."
            )
        try:
            prepare(world, device=args.device)
        except (ValueError, OSError) as error:  # a bad model or SAE, the hub, the disk: said, not traced
            raise SystemExit(f"Cannot prepare the {world.name} world in {world.assets}: {error}") from None
    studio = Studio.load(world, device=args.device)
    classifier = None
    if world.assets is not None and (world.assets / "classifier").is_dir():
        from saemnesia.minicanvas.classifier import load_classifier

        classifier = load_classifier(world.assets / "classifier")
    app = build_app(studio, classifier)
    run_on_zero_gpu(app, world)
    app.queue(default_concurrency_limit=1, max_size=32)
    app.launch(server_name=args.host, server_port=args.port, theme=THEME, css=CSS, show_error=True)


if __name__ == "__main__":
    main()
