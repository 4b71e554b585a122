"""Capture and edit the output of one named UNet block, as a context manager that always cleans up.

The hooked block (e.g. `up_blocks.1.attentions.1`, a `Transformer2DModel`) runs once per denoising
step, on the whole batch (both classifier-free guidance halves, unconditional first). The hook counts
those calls, so `step` is the sampler step, starting at 0 for every `with` block.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import Tensor, nn

BlockEdit = Callable[[Tensor, int], Tensor]
"""Takes the block's output `[batch, channels, height, width]` and the step; returns the new output."""


class HookPointError(ValueError):
    """A hook point the model does not have."""


def hook_points(unet: nn.Module) -> list[str]:
    """The names of the UNet's transformer (cross-attention) blocks, the places an SAE can sit."""
    return [name for name, module in unet.named_modules() if type(module).__name__ == "Transformer2DModel"]


def get_block(unet: nn.Module, name: str) -> nn.Module:
    try:
        return unet.get_submodule(name)
    except AttributeError:
        raise HookPointError(
            f"The UNet has no block '{name}'. Its cross-attention blocks are: {', '.join(hook_points(unet))}."
        ) from None


def block_width(unet: nn.Module, name: str) -> int:
    """Channels of the block's output, the width an SAE on it must have."""
    block = get_block(unet, name)
    for attribute in ("out_channels", "in_channels"):
        width = getattr(getattr(block, "config", None), attribute, None) or getattr(block, attribute, None)
        if width:
            return int(width)
    raise HookPointError(f"Cannot tell the output width of block '{name}' ({type(block).__name__}).")


def block_grid(unet: nn.Module, name: str, latent_height: int, latent_width: int) -> tuple[int, int]:
    """The token grid (height, width) a UNet block works on, for latents of the given size: a diffusers UNet
    halves the resolution after each down block but the last, and doubles it after each up block but the last."""
    get_block(unet, name)
    levels = len(unet.config.block_out_channels)
    part, _, rest = name.partition(".")
    index = int(rest.split(".")[0]) if part in ("down_blocks", "up_blocks") else 0
    factor = {"down_blocks": 2**index, "mid_block": 2 ** (levels - 1), "up_blocks": 2 ** (levels - 1 - index)}[part]
    return latent_height // factor, latent_width // factor


class BlockHook:
    """State of one hooked generation: the step counter and, if asked, every step's output."""

    def __init__(self, edit: BlockEdit | None, record: bool):
        self.edit = edit
        self.record = record
        self.step = 0
        self.outputs: list[Tensor] = []

    def __call__(self, module: nn.Module, inputs: tuple, output: Tensor | tuple) -> Tensor | tuple:
        hidden = output[0] if isinstance(output, tuple) else output
        if self.edit is not None:
            hidden = self.edit(hidden, self.step)
        if self.record:
            self.outputs.append(hidden.detach())
        self.step += 1
        if isinstance(output, tuple):
            return (hidden, *output[1:])
        if hasattr(output, "sample"):
            output.sample = hidden
            return output
        return hidden


@contextmanager
def hooked_block(
    unet: nn.Module, name: str, edit: BlockEdit | None = None, record: bool = False
) -> Iterator[BlockHook]:
    """Within the `with`, every call of block `name` goes through `edit` (and is recorded if asked).

    The hook is removed on leaving, also when generation raises, so a shared model is never left edited.
    """
    hook = BlockHook(edit, record)
    handle = get_block(unet, name).register_forward_hook(hook)
    try:
        yield hook
    finally:
        handle.remove()
