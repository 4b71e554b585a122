"""The Paint tab: a concept (by name: its SAEmnesia neuron, or its footprint) or any latent (by number) painted into a
masked region of the block's token grid, or out of it with a negative strength; original and painted image from one
seed, with the painted latent's heatmap after."""

from __future__ import annotations

import time

import gradio as gr
import numpy as np
import torch
from PIL import Image, ImageDraw

from saemnesia.erase import PAINT_STRENGTH_RANGE
from saemnesia.heatmaps import mask_overlay, overlay, upscale
from saemnesia.studio import Studio
from ui.neurons import SAE_CHOICES
from ui.shared import DISPLAY, PIXELS, captioned, whole_as_int

CANVAS = 256
"""Side in pixels of the mask-drawing canvas."""
PRESETS = ("middle", "left half", "right half", "top half", "bottom half", "all", "none")
SOURCES = {"neuron": 20.0, "footprint": 2.0}
"""What Paint moves the tokens along, with the strength the tab starts at for it."""


def preset_mask(name: str, height: int, width: int) -> np.ndarray:
    """[h, w] 0/1: the middle half of the grid, one of its halves, all or none of it."""
    mask = np.zeros((height, width), np.uint8)
    rows, columns = slice(None), slice(None)
    if name == "middle":
        rows, columns = slice(height // 4, 3 * height // 4), slice(width // 4, 3 * width // 4)
    elif name in ("left half", "right half"):
        columns = slice(0, width // 2) if name == "left half" else slice(width // 2, width)
    elif name in ("top half", "bottom half"):
        rows = slice(0, height // 2) if name == "top half" else slice(height // 2, height)
    if name != "none":
        mask[rows, columns] = 1
    return mask


def mask_text(mask: np.ndarray) -> str:
    """Rows of 0 and 1, one line each: the form the `/paint` endpoint takes."""
    return "\n".join("".join(str(int(value)) for value in row) for row in mask)


def parse_mask(text: object) -> list[list[int]]:
    """The text's rows of 0 and 1 as lists (the Studio checks the grid's size and values)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("mask must be rows of 0 and 1, one line per token row, e.g. '0110\\n0110'.")
    rows = [line.strip() for line in text.strip().splitlines() if line.strip()]
    if any(set(row) - {"0", "1"} for row in rows):
        raise ValueError("mask must hold only 0 and 1, one line per token row.")
    return [[int(value) for value in row] for row in rows]


def grid_canvas(height: int, width: int) -> Image.Image:
    """A blank canvas with the token grid drawn on it, to paint the mask over."""
    canvas = Image.new("RGB", (CANVAS, CANVAS), "white")
    draw = ImageDraw.Draw(canvas)
    for row in range(1, height):
        draw.line([(0, row * CANVAS / height), (CANVAS, row * CANVAS / height)], fill=(190, 190, 190))
    for column in range(1, width):
        draw.line([(column * CANVAS / width, 0), (column * CANVAS / width, CANVAS)], fill=(190, 190, 190))
    return canvas


def drawn_mask(editor: dict | None, height: int, width: int) -> np.ndarray:
    """[h, w] 0/1: the tokens whose cell the brush covered by at least a third."""
    layers = (editor or {}).get("layers") or []
    if not layers:
        return np.zeros((height, width), np.uint8)
    alpha = np.max([np.asarray(layer)[..., 3] for layer in layers], axis=0).astype(np.float32) / 255
    cells = torch.nn.functional.adaptive_avg_pool2d(torch.from_numpy(alpha)[None, None], (height, width))[0, 0]
    return (cells.numpy() >= 1 / 3).astype(np.uint8)


def paint_tab(studio: Studio, classifier) -> None:
    world = studio.world
    height, width = studio.token_grid("object") if studio.bundles else (1, 1)
    gr.Markdown(
        "Paint a concept where you want it: choose it by name (its SAEmnesia neuron) or any latent by number, mark "
        "tokens of the block's grid, and the latent is added along its decoder direction on those tokens only, at "
        "the chosen steps. A positive strength paints the concept in; a negative one erases it inside the mask "
        "only. Strength is in units of the concept's mean activation, as the erasure's is. A neuron says *that* "
        "an object is there more than it draws one: to draw an object into another's prompt, paint its "
        "**footprint** (its mean reconstruction, token by token, minus the other objects'; strength in footprints)."
    )
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=world.examples[-1] if world.examples else "", max_lines=2)
            with gr.Row():
                target = gr.Textbox(
                    value=world.objects[1] if len(world.objects) > 1 else "", label="Concept or latent number"
                )
                kind = gr.Radio(["object", "style"], value="object", label="Block (for a number)")
                method = gr.Radio(SAE_CHOICES, value="saemnesia", label="SAE")
            with gr.Row():
                source = gr.Radio(list(SOURCES), value="neuron", label="Paint with")
                strength = gr.Slider(
                    *PAINT_STRENGTH_RANGE, value=SOURCES["neuron"], step=0.5, label="Strength (negative erases)"
                )
            with gr.Row():
                first_step = gr.Slider(0, world.steps - 1, value=0, step=1, label="First painted step")
                last_step = gr.Slider(0, world.steps - 1, value=world.steps - 1, step=1, label="Last painted step")
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
            gr.Markdown(f"**Mask**: draw on the {height} × {width} token grid, or pick a region.")
            with gr.Row():
                editor = gr.ImageEditor(
                    value={"background": grid_canvas(height, width), "layers": [], "composite": None},
                    type="numpy",
                    image_mode="RGBA",
                    sources=(),
                    transforms=(),
                    fixed_canvas=True,
                    canvas_size=(CANVAS, CANVAS),
                    brush=gr.Brush(colors=["#ff00ff"], color_mode="fixed", default_size=24),
                    label="Draw the mask",
                    height=CANVAS + 90,
                )
                with gr.Column():
                    region = gr.Radio(list(PRESETS), value="middle", label="Region")
                    mask = gr.Textbox(
                        value=mask_text(preset_mask("middle", height, width)),
                        lines=min(height, 16),
                        label="Mask (rows of 0/1; what is painted)",
                    )
            run = gr.Button("Paint", variant="primary")
        with gr.Column(scale=3):
            slider = gr.ImageSlider(label="Original / painted (drag)", max_height=DISPLAY, elem_classes=PIXELS)
            panes = gr.Gallery(
                label="Original, painted, the painted latent's activation after painting, and the mask",
                columns=4,
                height="auto",
                elem_classes=PIXELS,
            )
            status = gr.Markdown()

    region.change(lambda name: mask_text(preset_mask(name, height, width)), region, mask, api_name=False)
    source.change(lambda name: SOURCES.get(name, SOURCES["neuron"]), source, strength, api_name=False)
    editor.change(lambda drawing: mask_text(drawn_mask(drawing, height, width)), editor, mask, api_name=False)

    def paint(prompt, target, kind, method, strength, mask, first_step, last_step, seed, source="neuron"):
        """The pair; settings go to the Studio as they came, so its messages name the field."""
        started = time.perf_counter()
        try:
            if source not in SOURCES:
                raise ValueError(f"source must be one of {', '.join(SOURCES)}, got {source!r}.")
            result = studio.paint(
                prompt,
                whole_as_int(target),
                parse_mask(mask),
                strength,
                kind=kind,
                steps_painted=(whole_as_int(first_step), whole_as_int(last_step)),
                seed=whole_as_int(seed),
                method=method,
                footprint=source == "footprint",
            )
        except (ValueError, KeyError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        elapsed = time.perf_counter() - started
        painted = result.settings["paints"][0]
        trace = result.traces[painted["block"]]
        latent, last = painted["latent"], len(trace.timesteps) - 1
        after = trace.latent_map(latent, last, 1)
        scale = max(float(trace.latent_map(latent, last, 0).max()), float(after.max()), 1e-6)
        gallery = captioned(classifier, {"original": result.originals[0], "painted": result.erased[0]})
        gallery.append(
            (overlay(result.erased[0], after, scale, 0.6, DISPLAY), f"latent {latent} after painting, last step")
        )
        gallery.append((mask_overlay(result.erased[0], trace.edit_mask(painted["steps"][0], 1), DISPLAY), "mask"))
        what = f"The footprint of **{target}** (latent {latent})" if painted["footprint"] else f"Latent **{latent}**"
        text = (
            f"{what} at `{painted['block']}` on {painted['tokens']} tokens, steps "
            f"{painted['steps'][0]} – {painted['steps'][1]} · 2 images in {elapsed:.1f} s · seed {int(seed)}"
        )
        return (upscale(result.originals[0], DISPLAY), upscale(result.erased[0], DISPLAY)), gallery, text

    run.click(
        paint,
        [prompt, target, kind, method, strength, mask, first_step, last_step, seed, source],
        [slider, panes, status],
        api_name="paint",
        preprocess=False,  # raw values reach the Studio, whose checks name the field
    )
