"""GPU smoke run: the paired generation at Stable Diffusion's full scale, timed against plain diffusers.

`python -m saemnesia gpu-smoke` loads an SD-architecture pipeline (`--model`: a folder, a hub id, sd14 or
sd15; random weights of SD-1.4's shapes if none is given) and an SAE of the paper's size on the object
hook point (`--sae`: a folder or hub id; random 1280 -> 20,480, k = 32 if none), then, after a warm-up
of each, times in alternation:
- plain: diffusers making the two images of a pair (one prompt twice, from the same noise, one batch);
- paired: `generate_pairs` making the original and the erased image in one batched pass, the SAE
  encoding every erased token at every step and editing one latent;
and prints both, their ratio (what the hooked pair costs over plain diffusers), the SAE's own time per
UNet call, and how far the paired original is from the plain image (0 when the hook is private to the
erased rows). The SAE computes in the UNet's dtype, as `Studio.load` has it. On a CPU it runs as a smoke
test at a tiny size (`--architecture tiny --size 64 --steps 2`); only a GPU's figures say anything about
speed (the README's Speed section holds an H100's).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from diffusers import StableDiffusionPipeline

from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.erase import EditEncoder, PreparedEdit, rank_counted_changes, saemnesia_erasure
from saemnesia.generate import SaeHook, generate_pairs, initial_noise, sampler_timesteps
from saemnesia.hooks import block_width
from saemnesia.sae import Sae, SaeConfig

PAPER_EXPANSION = 16
PAPER_K = 32


def random_sae(d_in: int, expansion_factor: int = PAPER_EXPANSION, k: int = PAPER_K, seed: int = 0) -> Sae:
    """An SAE of the paper's shape with random weights: its cost is the trained one's."""
    torch.manual_seed(seed)
    return Sae(SaeConfig(d_in=d_in, num_latents=d_in * expansion_factor, k=k, expansion_factor=expansion_factor))


def one_latent_hook(sae: Sae, block: str, timesteps: list[int], latent: int = 0, strength: float = -10.0) -> SaeHook:
    """A hook erasing one latent wherever it fires, at every step: SAEmnesia's edit on a made-up concept."""
    mean_acts = torch.zeros(2, len(timesteps), sae.num_latents)
    mean_acts[0, :, latent] = 1.0
    stats = ConceptStats(["probe", "rest"], ["object", "object"], torch.tensor(timesteps), mean_acts)
    dictionary = ConceptDictionary({"probe": latent}, {"probe": "object"})
    return SaeHook(block, sae, saemnesia_erasure(stats, dictionary, ["probe"], strength))


def _timed(run: Callable[[], object], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


@torch.no_grad()
def gpu_smoke(
    pipeline: StableDiffusionPipeline,
    sae: Sae,
    block: str = "up_blocks.1.attentions.1",
    prompt: str = "A Cats image in Van Gogh style.",
    size: int = 512,
    steps: int = 50,
    guidance: float = 9.0,
    repeats: int = 3,
    seed: int = 0,
) -> dict:
    """Median seconds of the plain and the paired generation, their ratio, and the SAE's time per call."""
    device = pipeline.device
    sae = sae.to(device, pipeline.unet.dtype)
    hook = one_latent_hook(sae, block, sampler_timesteps(pipeline, steps))
    noise = initial_noise(pipeline, seed, size, size).to(device, pipeline.unet.dtype)
    settings = dict(num_inference_steps=steps, guidance_scale=guidance, height=size, width=size)
    outputs: dict[str, object] = {}

    def plain() -> None:
        outputs["plain"] = pipeline(prompt=[prompt, prompt], latents=noise.repeat(2, 1, 1, 1), **settings).images

    def paired() -> None:
        outputs["paired"] = generate_pairs(pipeline, [prompt], [hook], seed, steps, guidance, size, size)

    # The SAE's share of a UNet call: encode and edit the erased rows' tokens (both guidance halves),
    # on the token grid of SD's up_blocks.1 (a quarter of the latent's side: 16 x 16 at 512 pixels).
    grid = size // pipeline.vae_scale_factor // 4
    rows = 2 if guidance > 1 else 1
    tokens = torch.randn(rows * grid * grid, block_width(pipeline.unet, block), device=device)
    tokens = tokens.to(pipeline.unet.dtype)
    step_edit = PreparedEdit.of(sae, hook.erasure.at(0, hook.erasure.timesteps[0]))
    encoder = EditEncoder.of(sae)

    def sae_call() -> None:
        rank_counted_changes(encoder, tokens, step_edit)

    for run in (plain, paired, sae_call):
        _timed(run, device)
    times: dict[str, list[float]] = {"plain": [], "paired": [], "sae_call": []}
    for _ in range(repeats):
        for name, run in (("plain", plain), ("paired", paired), ("sae_call", sae_call)):
            times[name].append(_timed(run, device))
    median = {name: statistics.median(values) for name, values in times.items()}
    original = np.asarray(outputs["paired"].originals[0], dtype=np.int16)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
        "dtype": str(pipeline.unet.dtype),
        "size": size,
        "steps": steps,
        "guidance": guidance,
        "block": block,
        "sae": {"d_in": sae.d_in, "num_latents": sae.num_latents, "k": sae.cfg.k},
        "plain_seconds": median["plain"],
        "paired_seconds": median["paired"],
        "overhead_ratio": median["paired"] / median["plain"],
        "sae_seconds_per_unet_call": median["sae_call"],
        "unet_calls": steps,
        "original_max_pixel_difference": int(np.abs(original - np.asarray(outputs["plain"][0], dtype=np.int16)).max()),
        "repeats": repeats,
        "all_seconds": times,
    }
