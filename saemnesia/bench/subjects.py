"""The pipelines and SAEs the pair and share benchmarks run, and those two measurements (1-3): the hooked
pair against plain diffusers and the reference's two generations, and the SAE's share of a UNet call."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from saemnesia.bench.timing import SEED, Row, Skipped, median_ratio, multiply_adds, time_in_turn
from saemnesia.concepts import ConceptStats, build_dictionary
from saemnesia.erase import EditEncoder, saemnesia_erasure
from saemnesia.generate import SaeHook, _block_edit, generate_pairs, initial_noise, sampler_timesteps
from saemnesia.hooks import block_width, hooked_block
from saemnesia.sae import Sae, SaeConfig
from saemnesia.studio import DICTIONARY_FILE, STATS_FILE, SaeBundle
from saemnesia.worlds import MINICANVAS, SD_V14_UNET_CONFIG, World, load_pipeline, portable_name, random_pipeline

STRENGTH = -10.0
PAIR_TARGET = 1.10
"""Hooked pair over plain diffusers making the same two images in one batch."""
SHARE_TARGET = 1.5
"""The SAE's measured share of a UNet call over the share its encoder's multiply-adds set."""


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
