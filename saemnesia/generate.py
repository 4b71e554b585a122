"""Original and erased images from one seed, in one batched pass, with the block's sparse codes.

The batch holds the originals first and the erased copies second, all starting from the same initial
noise; the edit touches only the erased rows (both guidance halves), so each original is exactly what
the plain pipeline makes from that noise. One generation runs at a time per model: the hook sits on
the shared UNet, and the lock keeps it private to the request that set it.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field

import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from torch import Tensor

from saemnesia.erase import (
    PER_RULE,
    EditEncoder,
    Erasure,
    Paint,
    PreparedEdit,
    ReplaceRule,
    apply_step_edit,
    detected_tokens,
    dilated,
    grid_distances,
    paint_tokens,
    rank_counted_changes,
    replace_tokens,
    replacement_sources,
)
from saemnesia.hooks import block_width, hooked_block
from saemnesia.sae import Sae

_model_locks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_locks_guard = threading.Lock()


def model_lock(pipeline: StableDiffusionPipeline) -> threading.RLock:
    """The lock that serialises generations on this pipeline's UNet; re-entrant, so a caller that puts its
    own hook on the UNet can hold it around a generation that takes it again."""
    with _locks_guard:
        return _model_locks.setdefault(pipeline.unet, threading.RLock())


class SaeMismatchError(ValueError):
    """An SAE whose width does not match the hooked block."""


def check_sae_fits(pipeline: StableDiffusionPipeline, sae: Sae, block: str) -> None:
    width = block_width(pipeline.unet, block)
    if width != sae.d_in:
        raise SaeMismatchError(
            f"The SAE reads {sae.d_in}-wide activations but block '{block}' outputs {width} channels: "
            "use an SAE trained on this block of this model."
        )


@dataclass
class Trace:
    """The hooked block's sparse codes on the conditional rows, every step, for activation maps.

    Rows are ordered like the images: originals first, then erased copies. Codes are of the block
    output as it arrived (before the edit); `edited` marks the tokens the edit changed (for `replace`,
    the detected ones) and `sources` says, under `replace`, whose value each token took.
    """

    top_acts: Tensor
    """[steps, rows, tokens, k]"""
    top_indices: Tensor
    """[steps, rows, tokens, k]"""
    edited: Tensor
    """[steps, rows, tokens] bool"""
    height: int
    width: int
    timesteps: list[int]
    sources: Tensor | None = None
    """[steps, rows, tokens] long, under `replace`: the token whose value each token took (itself if
    untouched, -1 if it was detected but its map had nothing undetected to take from)."""

    def latent_map(self, latent: int, step: int, row: int) -> Tensor:
        """[height, width] activation of one latent at one step on one image."""
        hits = self.top_indices[step, row] == latent
        return (self.top_acts[step, row] * hits).sum(-1).reshape(self.height, self.width)

    def top_latents(self, step: int, row: int, count: int = 8) -> list[tuple[int, float]]:
        """The latents that fire most on one image at one step, by their largest activation over its tokens."""
        acts, indices = self.top_acts[step, row].flatten(), self.top_indices[step, row].flatten()
        peaks: dict[int, float] = {}
        for latent, activation in zip(indices.tolist(), acts.tolist()):
            if activation > 0 and activation > peaks.get(latent, 0.0):
                peaks[latent] = activation
        return sorted(peaks.items(), key=lambda item: -item[1])[:count]

    def edit_mask(self, step: int, row: int) -> Tensor:
        return self.edited[step, row].reshape(self.height, self.width)

    def source_map(self, step: int, row: int) -> Tensor | None:
        """[height, width] the token index each token took its value from (`replace` only)."""
        return None if self.sources is None else self.sources[step, row].reshape(self.height, self.width)


@dataclass
class PairResult:
    originals: list[Image.Image]
    erased: list[Image.Image]
    prompts: list[str]
    settings: dict
    traces: dict[str, Trace] = field(default_factory=dict, repr=False)
    """Recorded codes, by block."""
    block_outputs: dict[str, Tensor] = field(default_factory=dict, repr=False)
    """By block, for hooks that `keep_outputs`: `[steps, rows, channels, h, w]`, rows as the pipeline's batch
    (with guidance the unconditional half first; in each half originals first, then erased copies)."""


def sampler_timesteps(pipeline: StableDiffusionPipeline, steps: int) -> list[int]:
    """The timesteps the pipeline's sampler will visit for `steps` steps (without touching its state)."""
    scheduler = type(pipeline.scheduler).from_config(pipeline.scheduler.config)
    scheduler.set_timesteps(steps)
    return [int(t) for t in scheduler.timesteps]


def initial_noise(pipeline: StableDiffusionPipeline, seed: int, height: int, width: int) -> Tensor:
    """The noise the plain pipeline starts from for this seed (a CPU generator, so any device agrees)."""
    scale = pipeline.vae_scale_factor
    shape = (1, pipeline.unet.config.in_channels, height // scale, width // scale)
    return randn_tensor(shape, generator=torch.Generator("cpu").manual_seed(seed), device=torch.device("cpu"))


@dataclass
class SaeHook:
    """An SAE on one block of the UNet: what it erases (if anything) and whether to record its codes."""

    block: str
    sae: Sae
    erasure: Erasure | None = None
    record: bool = False
    keep_outputs: bool = False
    """Keep the block's output after the edit, every step, all rows (`PairResult.block_outputs`): to see
    where the edit moves the activations (`drift`)."""
    paint: Paint | None = None
    """A latent painted into the erased rows' masked tokens (after any erasure), at its steps."""


def _block_edit(
    hook: SaeHook, batch: int, originals: int, timesteps: list[int], codes: list
) -> Callable[[Tensor, int], Tensor]:
    """The function the block hook runs: edit the erased rows, record the conditional rows' codes.

    The pipeline's batch is `originals` unedited rows then the erased ones (`batch` in all); with
    guidance the block sees it twice, unconditional half first.
    """
    erasure = hook.erasure
    step_edits = [erasure.at(step, t) if erasure is not None else None for step, t in enumerate(timesteps)]
    step_edits = [None if e is None else PreparedEdit.of(hook.sae, e) for e in step_edits]
    replacing = erasure is not None and erasure.intervention == "replace"
    encoder = EditEncoder.of(hook.sae) if erasure is not None and not replacing and not hook.record else None
    detected_so_far: Tensor | None = None  # replace: this generation's detections, for a sticky rule

    def replace(hidden: Tensor, step_edit: PreparedEdit) -> tuple[Tensor, Tensor]:
        nonlocal detected_so_far
        rule = erasure.replace_rule
        hidden, sources, detected_so_far = _replace_erased_rows(
            hidden, batch, originals, step_edit, rule, detected_so_far if rule.sticky else None
        )
        return hidden, sources

    def erase_and_record(hidden: Tensor, step: int) -> Tensor:
        step_edit = step_edits[step]
        if step_edit is None and not hook.record:
            return hidden
        if not hook.record:
            if replacing:
                return replace(hidden, step_edit)[0]
            return _edit_erased_rows(encoder, hidden, batch, originals, step_edit)
        rows, channels, h, w = hidden.shape
        tokens = hidden.permute(0, 2, 3, 1).reshape(rows, h * w, channels)
        conditional_rows = list(range(rows - batch, rows))
        encoded = hook.sae.encode(tokens[conditional_rows])
        edited = torch.zeros(batch, h * w, dtype=torch.bool, device=hidden.device)
        positions = torch.arange(h * w, device=hidden.device)
        sources = positions.repeat(batch, 1)
        if step_edit is not None and replacing:
            hidden, replaced = replace(hidden, step_edit)
            sources[originals:] = replaced[-1]
            edited[originals:] = replaced[-1] != positions
        elif step_edit is not None:
            erased_rows = [r for r in range(rows) if r % batch >= originals]
            new_tokens, erased_edited = apply_step_edit(
                tokens[erased_rows], hook.sae.encode(tokens[erased_rows]), step_edit
            )
            edited[originals:] = erased_edited.view(len(erased_rows), h * w)[-(batch - originals) :]
            tokens = tokens.clone()
            tokens[erased_rows] = new_tokens
            hidden = tokens.reshape(rows, h, w, channels).permute(0, 3, 1, 2).contiguous()
        codes.append(
            (
                encoded.top_acts.float().cpu(),
                encoded.top_indices.cpu(),
                edited.cpu(),
                sources.cpu() if replacing else None,
            )
        )
        return hidden

    paint = hook.paint
    direction = None if paint is None else hook.sae.W_dec.detach()[paint.latent]

    def edit(hidden: Tensor, step: int) -> Tensor:
        hidden = erase_and_record(hidden, step)
        amount, index = (0.0, 0) if paint is None else paint.at(step, timesteps[step])
        if not amount:
            return hidden
        if hook.record:  # the trace's mask: the painted tokens of the painted rows
            codes[-1][2][originals:] |= paint.mask.cpu()
        channels, h, w = hidden.shape[1:]
        painted = hidden.clone()
        rows = _erased_view(painted, batch, originals)
        if paint.footprint is not None:  # the conditional half (the last), as if the prompt named the concept
            rows = rows[-1:]
        vector = direction if paint.footprint is None else paint.footprint[index].to(hidden.device)
        tokens = rows.permute(0, 1, 3, 4, 2).reshape(-1, h * w, channels)
        new_tokens = paint_tokens(tokens, paint.mask.to(hidden.device), vector, amount)
        rows.copy_(new_tokens.view(*rows.shape[:2], h, w, channels).permute(0, 1, 4, 2, 3))
        return painted

    return edit


def _erased_view(hidden: Tensor, batch: int, originals: int) -> Tensor:
    """[guidance halves, erased rows, C, h, w]: a view of the erased rows of the block output `hidden`."""
    return hidden.unflatten(0, (hidden.shape[0] // batch, batch))[:, originals:]


def _edit_erased_rows(
    encoder: EditEncoder, hidden: Tensor, batch: int, originals: int, step_edit: PreparedEdit
) -> Tensor:
    """The steer edit with nothing recorded, at the least work per step.

    Only the erased rows' tokens are gathered and encoded, and only the edited latents' codes are
    computed: no top-k over the dictionary. The change is added in place to a copy of the block output.
    """
    channels, h, w = hidden.shape[1:]
    edited = hidden.clone()
    erased = _erased_view(edited, batch, originals)
    tokens = erased.permute(0, 1, 3, 4, 2).reshape(-1, channels)
    change = rank_counted_changes(encoder, tokens, step_edit)
    erased += change.view(*erased.shape[:2], h, w, channels).permute(0, 1, 4, 2, 3)
    return edited


def _replace_erased_rows(
    hidden: Tensor,
    batch: int,
    originals: int,
    step_edit: PreparedEdit,
    rule: ReplaceRule = PER_RULE,
    detected_before: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """The replace edit: in each erased row's feature map, each guidance half on its own, detected tokens
    (with `detected_before`, the sticky mask, added) take the value `rule` gives them (`replace_tokens`).

    Returns the new block output, the sources `[halves, erased rows, h*w]` and the detection `[halves *
    erased rows, h*w]`. With guidance and the `unconditional` fallback, a conditional map with nothing
    undetected takes the unconditional map of the same image at the same places.
    """
    channels, h, w = hidden.shape[1:]
    edited = hidden.clone()
    erased = _erased_view(edited, batch, originals)
    halves, rows = erased.shape[:2]
    maps = erased.permute(0, 1, 3, 4, 2).reshape(-1, h * w, channels)  # [halves * erased rows, h*w, C]
    detected = detected_tokens(maps.reshape(-1, channels), step_edit).view(maps.shape[:2])
    if detected_before is not None:
        detected |= detected_before
    mask = dilated(detected, h, w) if rule.dilate else detected
    if rule.scope == "map":
        mask = mask | (mask.float().mean(-1, keepdim=True) > rule.map_share)
    sources = replacement_sources(mask, grid_distances(h, w, hidden.device))
    if mask.any():
        fallback = None
        if rule.fallback == "unconditional" and halves == 2:
            fallback = maps[:rows].repeat(2, 1, 1)  # the unconditional half's maps, for either half
        replaced = replace_tokens(maps, sources, fallback, rule.source)
        erased.copy_(replaced.view(halves, rows, h, w, channels).permute(0, 1, 4, 2, 3))
    return edited, sources.view(halves, rows, h * w), detected


@torch.no_grad()
def generate_pairs(
    pipeline: StableDiffusionPipeline,
    prompts: list[str],
    hooks: Sequence[SaeHook] = (),
    seed: int = 0,
    steps: int = 20,
    guidance: float = 5.0,
    height: int | None = None,
    width: int | None = None,
    include_originals: bool = True,
) -> PairResult:
    """For every prompt, the original image and the erased one, from the same seed and noise.

    With `include_originals=False` only the erased images are made (half the work, for benchmarks
    that need no originals); `originals` is then empty.

    `hooks` put SAEs on blocks (several blocks at once, e.g. an object SAE and a style SAE); their
    erasures apply to the erased copies only, and recorded codes come back as one `Trace` per block.
    """
    height = height or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    width = width or pipeline.unet.config.sample_size * pipeline.vae_scale_factor
    count = len(prompts)
    timesteps = sampler_timesteps(pipeline, steps)
    for hook in hooks:
        check_sae_fits(pipeline, hook.sae, hook.block)
    codes: dict[str, list] = {hook.block: [] for hook in hooks}
    originals = count if include_originals else 0
    batch = originals + count
    noise = initial_noise(pipeline, seed, height, width).repeat(batch, 1, 1, 1)
    with model_lock(pipeline), ExitStack() as stack:
        block_hooks = {
            hook.block: stack.enter_context(
                hooked_block(
                    pipeline.unet,
                    hook.block,
                    _block_edit(hook, batch, originals, timesteps, codes[hook.block]),
                    record=hook.keep_outputs,
                )
            )
            for hook in hooks
        }
        images = pipeline(
            prompt=list(prompts) * (2 if include_originals else 1),
            latents=noise.to(pipeline.device, pipeline.unet.dtype),
            num_inference_steps=steps,
            guidance_scale=guidance,
            height=height,
            width=width,
        ).images
    traces = {}
    for block, block_codes in codes.items():
        if block_codes:
            acts, indices, edited, sources = zip(*block_codes)
            acts, indices, edited = torch.stack(acts), torch.stack(indices), torch.stack(edited)
            side = int(round(acts.shape[2] ** 0.5))
            sources = None if sources[0] is None else torch.stack(sources)
            traces[block] = Trace(acts, indices, edited, side, acts.shape[2] // side, timesteps, sources)
    block_outputs = {
        hook.block: torch.stack(block_hooks[hook.block].outputs).cpu() for hook in hooks if hook.keep_outputs
    }
    settings = {
        "prompts": list(prompts),
        "seed": seed,
        "steps": steps,
        "guidance": guidance,
        "height": height,
        "width": width,
        "erasures": [
            {"block": hook.block, "concepts": list(hook.erasure.concepts), "method": hook.erasure.method,
             "strength": hook.erasure.strength, "start_step": hook.erasure.start_step,
             "intervention": hook.erasure.intervention}
            for hook in hooks if hook.erasure is not None
        ],
        "paints": [
            {"block": hook.block, "latent": hook.paint.latent, "footprint": hook.paint.footprint is not None,
             "tokens": int(hook.paint.mask.sum()), "steps": list(hook.paint.steps)}
            for hook in hooks if hook.paint is not None
        ],
    }  # fmt: skip
    return PairResult(images[:originals], images[originals:], list(prompts), settings, traces, block_outputs)
