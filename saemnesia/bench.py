"""`python -m saemnesia bench`: what the SAE hook, the app and the SAE trainer cost, as ratios from one run.

Each comparison takes its candidates in turn, round after round (A B A B ...), after one warm-up call
of each, so load from other processes falls on all of them alike; a ratio is the median of the
per-round ratios. Generation runs under `torch.no_grad`. Two models: MiniCanvas (the world's pipeline
from assets) and a random-weight Stable Diffusion v1.4 UNet at a small latent size, each with an SAE
at `up_blocks.1.attentions.1` (the paper's shape on SD: 1280 -> 20480, k = 32).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline
from safetensors.torch import save_file
from torch.utils.flop_counter import FlopCounterMode

from saemnesia.concepts import ConceptStats, build_dictionary
from saemnesia.erase import EditEncoder, saemnesia_erasure
from saemnesia.generate import SaeHook, _block_edit, generate_pairs, initial_noise, sampler_timesteps
from saemnesia.hooks import block_width, hooked_block
from saemnesia.sae import Sae, SaeConfig
from saemnesia.studio import DICTIONARY_FILE, STATS_FILE, SaeBundle
from saemnesia.train import LABELS, Activations, SaeTrainConfig, train_sae
from saemnesia.worlds import (
    MINICANVAS,
    SD_V14_UNET_CONFIG,
    WORLDS,
    World,
    load_pipeline,
    portable_name,
    random_pipeline,
)

ROOT = Path(__file__).resolve().parent.parent
TRAINING_BLOCK = "up_blocks.1.attentions.1"
"""The block name the synthetic activations are stored under."""
SECTIONS = ("minicanvas", "sd", "app", "train")
SEED = 0
STRENGTH = -10.0
PAIR_TARGET = 1.10
"""Hooked pair over plain diffusers making the same two images in one batch."""
SHARE_TARGET = 1.5
"""The SAE's measured share of a UNet call over the share its encoder's multiply-adds set."""
TRAIN_TARGET = 1.10
"""Our trainer's time over a plain PyTorch loop's, for the same model and batches."""


class Skipped(Exception):
    """A section that cannot run here; the message says why."""


@dataclass
class BenchOptions:
    """What to run; None picks the default of the mode (full, or `quick`)."""

    quick: bool = False
    """Tiny sizes, for CI: a narrow SD-layout UNet at 8x8 latents, 2 sampler steps, a small SAE to train."""
    repeats: int | None = None
    """Timed rounds after the warm-up: 5, or 2 with `quick`."""
    sd_latent: int | None = None
    """Latent side of the random SD model: 16, or 8 with `quick`."""
    steps: int | None = None
    """Sampler steps of the pairs: the world's for MiniCanvas and 4 for SD, or 2 with `quick`."""
    device: str = "cpu"
    skip: tuple[str, ...] = ()
    """Sections not to run, of `SECTIONS`."""


@dataclass
class Row:
    """One measured quantity: its samples, and its ratio to a baseline with the target the ratio must meet."""

    section: str
    name: str
    unit: str
    samples: list[float] = field(default_factory=list)
    ratio: float | None = None
    target: float | None = None
    note: str = ""

    @property
    def median(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def passed(self) -> bool | None:
        return None if self.ratio is None or self.target is None else self.ratio <= self.target

    def as_dict(self) -> dict:
        extremes = {"min": min(self.samples), "max": max(self.samples)} if self.samples else {"min": None, "max": None}
        return {**asdict(self), "median": self.median, **extremes, "passed": self.passed}


@dataclass
class Subject:
    """A pipeline and an SAE hook erasing one concept: what the pair and share benchmarks run."""

    name: str
    pipeline: StableDiffusionPipeline
    hook: SaeHook
    prompt: str
    steps: int
    guidance: float
    height: int
    width: int
    sae_source: str
    replace_hook: SaeHook | None = None
    """The same SAE and concept with the `replace` intervention (PER)."""
    judged: bool = True
    """Whether the targets apply: not to the narrow `quick` stand-in of SD, whose shares are not SD's."""


# ---------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_in_turn(
    candidates: dict[str, Callable[[], object]], repeats: int, device: torch.device
) -> dict[str, list[float]]:
    """Seconds per call of each candidate: one warm-up call each, then `repeats` rounds taking them in turn."""
    for run in candidates.values():
        run()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            _synchronize(device)
            start = time.perf_counter()
            run()
            _synchronize(device)
            times[name].append(time.perf_counter() - start)
    return times


def median_ratio(numerators: list[float], denominators: list[float]) -> float:
    return statistics.median(a / b for a, b in zip(numerators, denominators))


def multiply_adds(run: Callable[[], object]) -> float:
    """Multiply-adds of one call, from torch's FLOP counter (matmuls, convolutions, attention)."""
    counter = FlopCounterMode(display=False)
    with counter:
        run()
    return counter.get_total_flops() / 2


# ---------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------


def synthetic_bundle(world: World, pipeline: StableDiffusionPipeline, block: str, steps: int) -> SaeBundle:
    """A random SAE (16x the block's width, k = 32) with random concept statistics and their dictionary.

    What the world would hold after training, for timing only: the edit costs the same whatever it erases.
    """
    generator = torch.Generator().manual_seed(SEED)
    width = block_width(pipeline.unet, block)
    torch.manual_seed(SEED)
    sae = Sae(SaeConfig(d_in=width, num_latents=16 * width, k=32, expansion_factor=16))
    sae = sae.to(pipeline.device, pipeline.unet.dtype)
    timesteps = torch.tensor(sampler_timesteps(pipeline, steps))
    mean_acts = torch.rand(len(world.concepts), len(timesteps), sae.num_latents, generator=generator)
    kinds = [world.kind_of(concept) for concept in world.concepts]
    stats = ConceptStats(list(world.concepts), kinds, timesteps, mean_acts)
    return SaeBundle(sae, block, stats, build_dictionary(stats))


def trained_sae_folder(world: World) -> Path | None:
    """The world's supervised object SAE folder, if its assets hold one with statistics and dictionary."""
    folder = world.sae_folder("supervised", "object") if world.assets else None
    if folder is not None and (folder / STATS_FILE).is_file() and (folder / DICTIONARY_FILE).is_file():
        return folder
    return None


def world_bundle(world: World, pipeline: StableDiffusionPipeline, steps: int) -> tuple[SaeBundle, str]:
    """The world's trained object SAE, else a synthetic stand-in; and which it is, in words."""
    folder = trained_sae_folder(world)
    if folder is not None:
        bundle = SaeBundle.load(folder, world.object_block, str(pipeline.device), pipeline.unet.dtype)
        return bundle, f"the world's SAE ({portable_name(str(folder))})"
    return synthetic_bundle(world, pipeline, world.object_block, steps), "a random SAE (no trained SAE in assets)"


def subject_for(
    name: str,
    world: World,
    pipeline: StableDiffusionPipeline,
    bundle: SaeBundle,
    source: str,
    steps: int,
    height: int,
    width: int,
) -> Subject:
    """Erase the world's first object from a prompt of it, with the bundle's SAE."""
    concept = world.objects[0]
    erasure = saemnesia_erasure(bundle.stats, bundle.dictionary, [concept], STRENGTH)
    replacement = saemnesia_erasure(bundle.stats, bundle.dictionary, [concept], STRENGTH, intervention="replace")
    prompt = world.prompt(concept, world.styles[0] if world.styles else "photo")
    hook, replace_hook = SaeHook(bundle.block, bundle.sae, erasure), SaeHook(bundle.block, bundle.sae, replacement)
    return Subject(name, pipeline, hook, prompt, steps, world.guidance, height, width, source, replace_hook)


def minicanvas_pipeline(device: str) -> StableDiffusionPipeline:
    if not (Path(MINICANVAS.model) / "model_index.json").is_file():
        raise Skipped(f"MiniCanvas's model is not in {MINICANVAS.model} (train it with `train-world`).")
    return load_pipeline(MINICANVAS.model, device=device)


def sd_layout_pipeline(latent: int, quick: bool, device: str) -> StableDiffusionPipeline:
    """Stable Diffusion v1.4's UNet with random weights (narrow with `quick`), a one-level random VAE
    (images the size of the latents) and a one-layer random text encoder: only the UNet's cost matters."""
    unet_config = {**SD_V14_UNET_CONFIG, "sample_size": latent}
    if quick:
        unet_config.update(block_out_channels=[32, 64, 64, 64], cross_attention_dim=32)
    pipeline = random_pipeline(unet_config, text_layers=1, vae_widths=(32,), seed=SEED)
    return pipeline.to(device, torch.float16) if device.startswith("cuda") else pipeline.to(device)


# ---------------------------------------------------------------------------------------------------
# 1-3. The hooked pair, the reference's two generations, the SAE's share of a UNet call
# ---------------------------------------------------------------------------------------------------


def pair_rows(subject: Subject, repeats: int, device: torch.device) -> list[Row]:
    """The hooked pair against plain diffusers making the same two images in one batch, and against
    the reference code's way: a plain generation, then a hooked one."""
    pipeline, prompt = subject.pipeline, subject.prompt
    noise = initial_noise(pipeline, SEED, subject.height, subject.width).to(pipeline.device, pipeline.unet.dtype)
    sampling = {
        "num_inference_steps": subject.steps,
        "guidance_scale": subject.guidance,
        "height": subject.height,
        "width": subject.width,
    }
    generation = {
        "seed": SEED,
        "steps": subject.steps,
        "guidance": subject.guidance,
        "height": subject.height,
        "width": subject.width,
    }
    times = time_in_turn(
        {
            "plain pair": lambda: pipeline(prompt=[prompt, prompt], latents=noise.repeat(2, 1, 1, 1), **sampling),
            "hooked pair": lambda: generate_pairs(pipeline, [prompt], [subject.hook], **generation),
            "replace pair": lambda: generate_pairs(pipeline, [prompt], [subject.replace_hook], **generation),
            "plain single": lambda: pipeline(prompt=prompt, latents=noise, **sampling),
            "hooked single": lambda: generate_pairs(
                pipeline, [prompt], [subject.hook], include_originals=False, **generation
            ),
        },
        repeats,
        device,
    )
    reference = [plain + hooked for plain, hooked in zip(times["plain single"], times["hooked single"])]
    section = subject.name
    return [
        Row(section, "plain diffusers pair (2 images, one batch)", "s", times["plain pair"]),
        Row(section, "reference: plain + hooked generation", "s", reference),
        Row(
            section,
            "hooked pair / plain diffusers pair",
            "s",
            times["hooked pair"],
            median_ratio(times["hooked pair"], times["plain pair"]),
            PAIR_TARGET if subject.judged else None,
            f"{subject.steps} steps, {subject.height}x{subject.width}, edit on; {subject.sae_source}",
        ),
        Row(
            section,
            "hooked pair / reference",
            "s",
            times["hooked pair"],
            median_ratio(times["hooked pair"], reference),
        ),
        Row(
            section,
            "hooked pair, replace (PER) / plain diffusers pair",
            "s",
            times["replace pair"],
            median_ratio(times["replace pair"], times["plain pair"]),
            PAIR_TARGET if subject.judged else None,
            "the same erasure replacing the detected tokens instead of steering",
        ),
    ]


def sae_share_rows(subject: Subject, repeats: int, device: torch.device) -> list[Row]:
    """The hook's per-step work (encode, top-k codes, edit) as a share of the UNet call it rides on,
    over the floor the arithmetic sets: the encoder's multiply-adds on the erased rows over the UNet's."""
    pipeline, hook = subject.pipeline, subject.hook
    images, originals = 2, 1
    conditional, unconditional = pipeline.encode_prompt(subject.prompt, pipeline.device, images, True)
    text = torch.cat([unconditional, conditional])
    timesteps = sampler_timesteps(pipeline, subject.steps)
    noise = initial_noise(pipeline, SEED, subject.height, subject.width).repeat(len(text), 1, 1, 1)
    latents = noise.to(pipeline.device, pipeline.unet.dtype)
    timestep = torch.tensor(timesteps[0], device=pipeline.device)

    def unet_call() -> object:
        return pipeline.unet(latents, timestep, encoder_hidden_states=text, return_dict=False)

    with torch.no_grad():
        with hooked_block(pipeline.unet, hook.block, record=True) as recorder:
            unet_call()
        block_output = recorder.outputs[0]
        edit = _block_edit(hook, images, originals, timesteps, [])
        replace = _block_edit(subject.replace_hook, images, originals, timesteps, [])
        times = time_in_turn(
            {"unet": unet_call, "edit": lambda: edit(block_output, 0), "replace": lambda: replace(block_output, 0)},
            repeats,
            device,
        )
        unet_macs, edit_macs = multiply_adds(unet_call), multiply_adds(lambda: edit(block_output, 0))
        # The encoder's matmul alone, each right after a UNet call as in inference: how much of the
        # share is the arithmetic the floor counts, and how much the per-call work around it.
        rows, channels = block_output.shape[:2]
        erased_rows = block_output.unflatten(0, (rows // images, images))[:, originals:]
        tokens = erased_rows.permute(0, 1, 3, 4, 2).reshape(-1, channels)
        encoder = EditEncoder.of(hook.sae)
        encoder_times = time_in_turn(
            {"unet": unet_call, "encoder": lambda: encoder.pre_activations(tokens)}, repeats, device
        )
    erased_tokens = len(tokens)
    encoder_macs = erased_tokens * hook.sae.d_in * hook.sae.num_latents
    floor = encoder_macs / unet_macs
    share = median_ratio(times["edit"], times["unet"])
    encoder_share = median_ratio(encoder_times["encoder"], encoder_times["unet"])
    note = (
        f"share {share:.2%} of the call, floor {floor:.2%} (encoder {encoder_macs / 1e6:.1f} M / "
        f"UNet {unet_macs / 1e9:.2f} G MACs); the encoder's matmul alone {encoder_share / floor:.2f}x the floor; "
        f"edit MACs {edit_macs / encoder_macs:.4f}x the encoder's; "
        f"SAE {hook.sae.d_in} -> {hook.sae.num_latents}, k {hook.sae.cfg.k}, {erased_tokens} tokens edited"
    )
    # Replace reads only the concept's latents: its floor is their dot products with the erased tokens.
    detected_latents = len(subject.replace_hook.erasure.steps[0].latents)
    replace_floor = erased_tokens * hook.sae.d_in * detected_latents / unet_macs
    replace_share = median_ratio(times["replace"], times["unet"])
    replace_note = (
        f"share {replace_share:.2%} of the call, floor {replace_floor:.4%} ({detected_latents} latent(s) x "
        f"{erased_tokens} tokens x {hook.sae.d_in}); steer's share {share:.2%}: replace / steer "
        f"{replace_share / share:.2f}"
    )
    return [
        Row(subject.name, f"UNet call (batch {rows})", "s", times["unet"]),
        Row(
            subject.name,
            "SAE per UNet call: share / floor",
            "s",
            times["edit"],
            share / floor,
            SHARE_TARGET if subject.judged else None,
            note,
        ),
        Row(
            subject.name,
            "replace (PER) per UNet call: share / its floor",
            "s",
            times["replace"],
            replace_share / replace_floor,
            None,
            replace_note,
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# 4. The app
# ---------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s.")


def app_rows(pipeline: StableDiffusionPipeline, steps: int, repeats: int, device: str) -> list[Row]:
    """Start `python app.py` to HTTP 200, then one `/erase` through gradio_client: what a user waits for."""
    from gradio_client import Client

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    app = ROOT / "app.py"
    if not app.is_file():
        raise Skipped(f"No app.py in {ROOT}.")
    world = MINICANVAS
    concept = world.objects[0]
    prompt = world.prompt(concept, world.styles[0])
    started, first_pair, neighbours = [], [], []
    with tempfile.TemporaryDirectory() as scratch:
        arguments, source = ["--device", device], "the world's SAE"
        if trained_sae_folder(world) is None:
            # The app erases only with an SAE in its assets: give it assets with a random one and the classifier.
            bundle, source = world_bundle(world, pipeline, steps)
            assets = Path(scratch) / "assets"
            folder = assets / "sae" / "supervised" / world.object_block
            bundle.sae.save(folder)
            bundle.stats.save(folder / STATS_FILE)
            bundle.dictionary.save(folder / DICTIONARY_FILE)
            if (world.assets / "classifier").is_dir():
                (assets / "classifier").symlink_to(world.assets / "classifier")
            arguments += ["--assets", str(assets)]
        log = Path(scratch) / "app.log"
        environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        for _ in range(repeats):
            port = _free_port()
            url = f"http://127.0.0.1:{port}/"
            start = time.perf_counter()
            with log.open("w") as output:
                process = subprocess.Popen(
                    [sys.executable, str(app), "--port", str(port), *arguments],
                    cwd=ROOT,
                    env=environment,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_until_ready(url, process, log)
                started.append(time.perf_counter() - start)
                client = Client(url, verbose=False)
                start = time.perf_counter()
                client.predict(
                    prompt, [concept], "SAEmnesia", STRENGTH, SEED, steps, world.guidance, 0, 1, api_name="/erase"
                )
                first_pair.append(time.perf_counter() - start)
                start = time.perf_counter()
                client.predict(api_name="/neighbours")  # what the page asks for once the pair is shown
                neighbours.append(time.perf_counter() - start)
            finally:
                process.terminate()
                try:
                    process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
    note = f"'{prompt}', erase {concept}, {steps} steps, codes recorded for Inspect; {source}"
    return [
        Row("app", "app start to ready (HTTP 200)", "s", started),
        Row("app", "first pair via gradio_client /erase", "s", first_pair, note=note),
        Row("app", "then the neighbours via /neighbours", "s", neighbours, note="erased images only"),
    ]


# ---------------------------------------------------------------------------------------------------
# 5. SAE training
# ---------------------------------------------------------------------------------------------------


def write_synthetic_activations(folder: Path, width: int, tokens_per_image: int, images: int) -> Path:
    """Random float16 tokens in `collect`'s on-disk layout (one block, one step per image, one shard)."""
    generator = torch.Generator().manual_seed(SEED)
    tokens = torch.randn(images * tokens_per_image, width, generator=generator).half()
    labels = torch.tensor([[0, 0, 0, 0, 999, image] for image in range(images)], dtype=torch.int32)
    save_file({TRAINING_BLOCK: tokens, "labels": labels}, str(folder / "shard-00000.safetensors"))
    settings = {
        "objects": ["object"],
        "styles": ["style"],
        "blocks": [TRAINING_BLOCK],
        "timesteps": [999],
        "num_images": images,
        "labels": list(LABELS),
    }
    blocks = {TRAINING_BLOCK: {"width": width, "tokens_per_image": tokens_per_image}}
    manifest = {"settings": settings, "blocks": blocks, "shards": ["shard-00000.safetensors"], "complete": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


def plain_training(batches: list[torch.Tensor], config: SaeConfig, lr: float, device: torch.device) -> Sae:
    """The textbook loop: TopK SAE forward, MSE, Adam step; the same model and batches as our trainer's."""
    torch.manual_seed(SEED)
    sae = Sae(config).to(device)
    optimizer = torch.optim.Adam(sae.parameters(), lr=lr)
    for x in batches:
        loss = (sae(x) - x).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return sae


def training_rows(quick: bool, repeats: int, device: torch.device) -> list[Row]:
    """Tokens per second of a plain loop and of `train_sae`, without and with its AuxK term.

    Without AuxK (no latent is ever counted dead) the trainer does the plain loop's work plus its own:
    reading shards, the decoder's unit-norm upkeep, bookkeeping; that is its overhead. With AuxK it
    runs SAeUron's full recipe, whose extra term costs what it costs.
    """
    if quick:
        width, batch_size, batches = 64, 256, 4
    elif device.type == "cuda":
        width, batch_size, batches = 1280, 4096, 16  # SAeUron's batch: smaller ones leave a GPU idle
    else:
        width, batch_size, batches = 1280, 256, 4
    tokens_per_image = 64
    images = batch_size * batches // tokens_per_image
    recipe = SaeTrainConfig(expansion_factor=16, k=32, batch_size=batch_size, epochs=1, holdout=0.0)
    without_auxk = replace(recipe, dead_tokens=2**62)
    sae_config = SaeConfig(d_in=width, num_latents=16 * width, k=32, expansion_factor=16)
    lr = 2e-4 / (sae_config.num_latents / 2**14) ** 0.5
    tokens = batch_size * batches
    with tempfile.TemporaryDirectory() as scratch:
        activations = Activations.open(write_synthetic_activations(Path(scratch), width, tokens_per_image, images))
        data = activations.load(0, TRAINING_BLOCK)[0].flatten(0, 1).to(device, torch.float32)
        plain_batches = list(data.split(batch_size))
        with torch.enable_grad():
            times = time_in_turn(
                {
                    "plain": lambda: plain_training(plain_batches, sae_config, lr, device),
                    "ours": lambda: train_sae(activations, TRAINING_BLOCK, without_auxk, device=device, progress=False),
                    "recipe": lambda: train_sae(activations, TRAINING_BLOCK, recipe, device=device, progress=False),
                },
                repeats,
                device,
            )
    shape = (
        f"SAE {width} -> {sae_config.num_latents}, k 32, {batches} batches of {batch_size} tokens, built in each run"
    )
    return [
        Row("train", "plain loop: TopK SAE + MSE + Adam", "tokens/s", [tokens / t for t in times["plain"]], note=shape),
        Row(
            "train",
            "train_sae without AuxK: time / plain loop's",
            "tokens/s",
            [tokens / t for t in times["ours"]],
            median_ratio(times["ours"], times["plain"]),
            None if quick else TRAIN_TARGET,
            "the trainer's overhead: shards from disk, decoder unit-norm upkeep, bookkeeping",
        ),
        Row(
            "train",
            "train_sae, full recipe (AuxK): time / plain loop's",
            "tokens/s",
            [tokens / t for t in times["recipe"]],
            median_ratio(times["recipe"], times["plain"]),
            note="adds SAeUron's AuxK term (on this small set, a latent unfired for one batch counts as dead)",
        ),
    ]


# ---------------------------------------------------------------------------------------------------
# The run and its report
# ---------------------------------------------------------------------------------------------------


def machine(device: torch.device) -> dict:
    """What the numbers were measured on, and how busy it was."""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if "model name" in line]
        cpu = names[0] if names else cpu
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def resolved(options: BenchOptions) -> BenchOptions:
    """The mode's defaults where the options leave them open."""
    quick = options.quick
    return replace(
        options,
        repeats=options.repeats or (2 if quick else 5),
        sd_latent=options.sd_latent or (8 if quick else 16),
        steps=options.steps or (2 if quick else None),
    )


def run_bench(options: BenchOptions) -> dict:
    """Every section not skipped; a section that cannot run becomes one row saying why."""
    options = resolved(options)
    if options.repeats < 1:
        raise ValueError(f"repeats must be at least 1, got {options.repeats}.")
    if options.sd_latent < 8 or options.sd_latent % 8:
        raise ValueError(
            f"sd_latent must be a multiple of 8 (the UNet halves it three times), got {options.sd_latent}."
        )
    if unknown := set(options.skip) - set(SECTIONS):
        raise ValueError(f"unknown sections to skip: {sorted(unknown)}; sections are {', '.join(SECTIONS)}.")
    device = torch.device(options.device)
    report = {"machine": machine(device), "options": asdict(options), "rows": []}
    rows: list[Row] = []
    minicanvas: StableDiffusionPipeline | None = None
    minicanvas_error: Skipped | None = None
    if {"minicanvas", "app"} - set(options.skip):
        try:
            minicanvas = minicanvas_pipeline(options.device)
        except Skipped as error:
            minicanvas_error = error

    def section(name: str, measure: Callable[[], list[Row]], failures: tuple[type[Exception], ...] = ()) -> None:
        """Run one section; a skip, or one of the `failures` it may meet, becomes a row saying so."""
        if name in options.skip:
            rows.append(Row(name, "skipped", "", note="--skip"))
            return
        try:
            rows.extend(measure())
        except Skipped as error:
            rows.append(Row(name, "skipped", "", note=str(error)))
        except failures as error:
            rows.append(Row(name, "failed", "", note=f"{type(error).__name__}: {error}"))

    def measure_minicanvas() -> list[Row]:
        if minicanvas is None:
            raise minicanvas_error
        world = MINICANVAS
        steps = options.steps or world.steps
        bundle, source = world_bundle(world, minicanvas, steps)
        subject = subject_for("minicanvas", world, minicanvas, bundle, source, steps, world.height, world.width)
        return pair_rows(subject, options.repeats, device) + sae_share_rows(subject, options.repeats, device)

    def measure_sd() -> list[Row]:
        world, steps = WORLDS["sd"], options.steps or 4
        pipeline = sd_layout_pipeline(options.sd_latent, options.quick, options.device)
        bundle = synthetic_bundle(world, pipeline, world.object_block, steps)
        model = "narrow SD-1.4-layout UNet (--quick)" if options.quick else "SD-1.4 UNet"
        source = f"random {model}, random SAE"
        size = options.sd_latent * pipeline.vae_scale_factor
        subject = subject_for("sd", world, pipeline, bundle, source, steps, size, size)
        subject.judged = not options.quick
        return pair_rows(subject, options.repeats, device) + sae_share_rows(subject, options.repeats, device)

    def measure_app() -> list[Row]:
        if minicanvas is None:
            raise minicanvas_error
        return app_rows(minicanvas, options.steps or MINICANVAS.steps, options.repeats, options.device)

    section("minicanvas", measure_minicanvas)
    section("sd", measure_sd)
    section("app", measure_app, failures=(Exception,))  # a separate process, reached over HTTP
    section("train", lambda: training_rows(options.quick, options.repeats, device))
    report["machine"]["load_average_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    report["rows"] = [row.as_dict() for row in rows]
    return report


def _format(value: float | None, unit: str) -> str:
    if value is None:
        return "-"
    if unit == "s":
        return f"{value * 1e3:.2f} ms" if value < 1 else f"{value:.3f} s"
    if unit == "tokens/s":
        return f"{value:,.0f} tok/s"
    return f"{value:.4g}"


def _verdict(row: dict) -> str:
    if row["name"] in ("skipped", "failed"):
        return "skipped" if row["name"] == "skipped" else "ERROR"
    return {True: "pass", False: "FAIL", None: "-"}[row["passed"]]


def format_report(report: dict) -> str:
    """The machine, then one line per row: name, median, min, max, ratio, target, pass/fail; then notes."""
    host = report["machine"]
    header = (
        f"machine: {host['cpu']}; {host['cores']} cores ({host['usable_cores']} usable), torch {host['torch']} with "
        f"{host['torch_threads']} thread(s), device {host['device']}{' (' + host['gpu'] + ')' if host['gpu'] else ''}"
    )
    if host["load_average"]:
        header += f"; load average {host['load_average'][0]:.2f} at start, {host['load_average_after'][0]:.2f} at end"
    columns = ("section", "measurement", "median", "min", "max", "ratio", "target", "result")
    lines = [
        (
            row["section"],
            row["name"],
            _format(row["median"], row["unit"]),
            _format(row["min"], row["unit"]),
            _format(row["max"], row["unit"]),
            "-" if row["ratio"] is None else f"{row['ratio']:.3f}",
            "-" if row["target"] is None else f"<= {row['target']:.2f}",
            _verdict(row),
        )
        for row in report["rows"]
    ]
    widths = [max(len(text) for text in column) for column in zip(columns, *lines)]
    table = [
        "  ".join(
            text.ljust(width) if index < 2 else text.rjust(width)
            for index, (text, width) in enumerate(zip(line, widths))
        )
        for line in (columns, *lines)
    ]
    notes = [f"- {row['section']}: {row['name']}: {row['note']}" for row in report["rows"] if row["note"]]
    return "\n".join([header, "", *table, "", "notes:", *notes])
