"""Collecting activations (METHOD section 2): every labelled prompt of a world, over whole trajectories.

Every (object, style, template) prompt of a world, over the whole sampling trajectory and several seeds;
the hooked blocks' conditional outputs are stored as float16 tokens in safetensors shards (the layout
is activations.py's). Resumable: a rerun skips finished shards and remakes the rest identically, and
several processes can share the work.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from saemnesia.generate import initial_noise, model_lock, sampler_timesteps
from saemnesia.hooks import get_block, hooked_block
from saemnesia.train.activations import LABELS, MANIFEST_FILE, Activations, write_json
from saemnesia.worlds import World

if TYPE_CHECKING:
    from accelerate import PartialState


@dataclass(frozen=True)
class LabelledPrompt:
    text: str
    object: int
    style: int
    template: int


def labelled_prompts(world: World) -> list[LabelledPrompt]:
    """Every object x style x template prompt of the world, with the indices of its object and style."""
    return [
        LabelledPrompt(world.prompt(object_name, style, template), o, s, t)
        for o, object_name in enumerate(world.objects)
        for s, style in enumerate(world.styles)
        for t, template in enumerate(world.templates)
    ]


THUMBNAIL_SIZE = 128
"""The largest side a collection keeps of its images: MiniCanvas's whole, a Stable Diffusion image at 128 px."""


def thumbnails(images: Tensor) -> Tensor:
    """[B, h, w, 3] uint8 from the pipeline's [B, 3, H, W] in [0, 1], shrunk by area to at most `THUMBNAIL_SIZE`."""
    scale = max(1, -(-max(images.shape[-2:]) // THUMBNAIL_SIZE))
    small = torch.nn.functional.avg_pool2d(images.float(), scale) if scale > 1 else images.float()
    return (small.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().contiguous()


@torch.no_grad()
def _generate_shard(
    pipeline: StableDiffusionPipeline,
    world: World,
    prompts: list[LabelledPrompt],
    images: range,
    blocks: list[str],
    timesteps: list[int],
    first_seed: int,
) -> dict[str, Tensor]:
    """One pipeline call on a batch of images: each block's conditional tokens, the labels and the images.

    Image i has prompt i mod P and starts from the noise of seed `first_seed + i`. Tokens are ordered
    by image, then step, then position; `labels` holds one row per image and step; `images` each image's
    thumbnail (`thumbnails`), for the latent index to show.
    """
    batch = [prompts[image % len(prompts)] for image in images]
    noise = torch.cat([initial_noise(pipeline, first_seed + image, world.height, world.width) for image in images])
    with model_lock(pipeline), ExitStack() as stack:
        hooks = {block: stack.enter_context(hooked_block(pipeline.unet, block, record=True)) for block in blocks}
        pictures = pipeline(
            prompt=[prompt.text for prompt in batch],
            latents=noise.to(pipeline.device, pipeline.unet.dtype),
            num_inference_steps=world.steps,
            guidance_scale=world.guidance,
            height=world.height,
            width=world.width,
            output_type="pt",
        ).images
    tensors = {"images": thumbnails(pictures)}
    for block, hook in hooks.items():
        if len(hook.outputs) != len(timesteps):
            raise RuntimeError(f"Block '{block}' ran {len(hook.outputs)} times for {len(timesteps)} sampler steps.")
        # With classifier-free guidance the batch is [unconditional; conditional]: keep the last rows.
        outputs = torch.stack([output[-len(batch) :] for output in hook.outputs])  # [T, B, C, H, W]
        channels = outputs.shape[2]
        tokens = outputs.permute(1, 0, 3, 4, 2).reshape(-1, channels)
        tensors[block] = tokens.to("cpu", torch.float16).contiguous()
    labels = [
        [prompt.object, prompt.style, image % len(prompts), step, timestep, image]
        for image, prompt in zip(images, batch)
        for step, timestep in enumerate(timesteps)
    ]
    tensors["labels"] = torch.tensor(labels, dtype=torch.int32)
    return tensors


def process_shards(shard_count: int, process_index: int, num_processes: int) -> list[int]:
    """The shards one of `num_processes` processes makes: every `num_processes`-th from its own index.

    The slices are disjoint, cover every shard, and depend on the counts alone, so a run resumed with
    another number of processes still makes each missing shard exactly once.
    """
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index must be in [0, {num_processes - 1}], got {process_index}.")
    return list(range(process_index, shard_count, num_processes))


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


def _blocks_info(shard: Path, blocks: Sequence[str]) -> dict[str, dict[str, int]]:
    """Each block's token width and tokens per image, read from a shard's header."""
    with safe_open(str(shard), framework="pt") as handle:
        groups = handle.get_slice("labels").get_shape()[0]
        shapes = {block: handle.get_slice(block).get_shape() for block in blocks}
    return {block: {"width": shape[1], "tokens_per_image": shape[0] // groups} for block, shape in shapes.items()}


def collect(
    world: World,
    pipeline: StableDiffusionPipeline,
    out: str | Path,
    blocks: Sequence[str] | None = None,
    seeds_per_prompt: int = 4,
    first_seed: int = 0,
    images_per_shard: int = 32,
    progress: bool = True,
    processes: PartialState | None = None,
) -> Activations:
    """Store the hooked blocks' conditional outputs over whole trajectories of every labelled prompt.

    Each shard is one pipeline call of `images_per_shard` images (all blocks at once) and holds, per
    block, tokens `[N, d]` as float16 and the `labels` (see `LABELS`). The manifest lists finished
    shards; a rerun with the same settings skips them and remakes any other shard identically.

    Launched as several processes (`accelerate launch --multi_gpu`, or `torchrun`), pass accelerate's
    `PartialState` (made with `cpu=True` on CPUs) as `processes`: each process makes its slice of the
    shards (`process_shards`) and the main process alone writes the manifest, listing the shards in
    index order once every process is done. A shard's content depends on its index alone, so the
    collection is the same whichever process made each shard.
    """
    out = Path(out)
    blocks = list(dict.fromkeys(blocks or (world.object_block, world.style_block)))
    for block in blocks:
        get_block(pipeline.unet, block)
    prompts = labelled_prompts(world)
    if not prompts:
        raise ValueError(f"World '{world.name}' has no object x style prompts to collect.")
    if seeds_per_prompt < 1 or images_per_shard < 1:
        raise ValueError("seeds_per_prompt and images_per_shard must be at least 1.")
    num_images = len(prompts) * seeds_per_prompt
    settings = {
        "world": world.name,
        "model": getattr(pipeline, "name_or_path", None) or world.model,
        "dtype": str(pipeline.unet.dtype),
        "blocks": blocks,
        "objects": list(world.objects),
        "styles": list(world.styles),
        "prompts": [asdict(prompt) for prompt in prompts],
        "steps": world.steps,
        "guidance": world.guidance,
        "height": world.height,
        "width": world.width,
        "timesteps": sampler_timesteps(pipeline, world.steps),
        "seeds_per_prompt": seeds_per_prompt,
        "first_seed": first_seed,
        "images_per_shard": images_per_shard,
        "num_images": num_images,
        "labels": list(LABELS),
    }
    distributed = processes is not None and processes.num_processes > 1
    is_main = not distributed or processes.is_main_process
    manifest_path = out / MANIFEST_FILE
    shard_count = math.ceil(num_images / images_per_shard)
    if manifest_path.is_file():
        manifest = json.loads(manifest_path.read_text())
        if manifest["settings"] != settings:
            changed = sorted(key for key in settings if manifest["settings"].get(key) != settings[key])
            raise ValueError(
                f"'{out}' holds activations collected with other settings ({', '.join(changed)}): "
                "give another folder, or delete this one to start over."
            )
        # Shards are written whole (through a temporary file) after the manifest recorded their
        # settings, so a shard file present is a finished one, whichever process wrote it.
        finished = {_shard_name(index) for index in range(shard_count) if (out / _shard_name(index)).is_file()}
    else:
        manifest = {"settings": settings, "blocks": {}, "shards": [], "complete": False}
        finished = set()
        if is_main:
            out.mkdir(parents=True, exist_ok=True)
            write_json(manifest_path, manifest)
    if distributed:
        processes.wait_for_everyone()
    manifest["shards"] = sorted(finished)
    process_index, num_processes = (processes.process_index, processes.num_processes) if distributed else (0, 1)
    mine = process_shards(shard_count, process_index, num_processes)
    done = sum(_shard_name(index) in finished for index in mine)
    bar = tqdm(total=len(mine), initial=done, desc="collect", unit="shard", disable=not (progress and is_main))
    for index in mine:
        name = _shard_name(index)
        if name in finished:
            continue
        images = range(index * images_per_shard, min(num_images, (index + 1) * images_per_shard))
        tensors = _generate_shard(pipeline, world, prompts, images, blocks, settings["timesteps"], first_seed)
        temporary = out / (name + ".tmp")
        save_file(tensors, str(temporary))
        os.replace(temporary, out / name)
        if not distributed:
            manifest["shards"] = sorted([*manifest["shards"], name])
            write_json(manifest_path, manifest)
        bar.update()
    bar.close()
    if distributed:
        processes.wait_for_everyone()
    if is_main:
        manifest["shards"] = [_shard_name(index) for index in range(shard_count)]
        manifest["blocks"] = _blocks_info(out / manifest["shards"][0], blocks)
        manifest["complete"] = True
        write_json(manifest_path, manifest)
    if distributed:
        processes.wait_for_everyone()
    return Activations.open(out)
