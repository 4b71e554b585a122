"""The Inspect tab: where a neuron fires over the image at any step of the last run, original against erased on
one colour scale, with the tokens the edit changed. It follows the last erasure and needs no new generation."""

from __future__ import annotations

import gradio as gr

from saemnesia.evaluate import pipeline_key, pipeline_label
from saemnesia.heatmaps import mask_overlay, overlay, source_arrows
from saemnesia.studio import Studio
from ui.shared import PIXELS, default_concept

RUN_CHOICES = [pipeline_key(m, i) for i in ("replace", "steer") for m in ("saemnesia", "saeuron")]
MAP_SIZE = 384
"""Side in pixels of a map: a 64-pixel image enlarged 6 times, about a third of a 1280-pixel page."""


def inspect_tab(studio: Studio, last_run: gr.State) -> None:
    """The Inspect tab, reading the runs the Erase tab keeps in `last_run`."""
    world = studio.world
    gr.Markdown(
        "Where does a neuron fire? Each erasure's activations are kept: this tab opens on the last one (its concept, "
        "run and steps, its maps drawn), and moving the sliders needs no new generation. One colour scale for both "
        "runs. The mask shows the tokens the edit changed: "
        "under *steer* where the neuron was scaled, under *replace* the detected tokens, each with an arrow from "
        "the token whose value it took (a cross: the whole map was detected, so the token took the unconditional "
        "half's token at its place)."
    )
    waiting = gr.Markdown("No erasure has run yet: press **Erase** on the Erase tab, then come back.")
    with gr.Row():
        concept = gr.Dropdown(
            list(world.concepts), value=default_concept(world), label="Concept (its SAEmnesia neuron)"
        )
        neuron = gr.Number(value=-1, precision=0, label="…or a neuron number (−1: the concept's own)")
        method = gr.Radio(
            [(pipeline_label(key), key) for key in RUN_CHOICES], value=RUN_CHOICES[0], label="Whose run and SAE"
        )
    with gr.Row():
        step = gr.Slider(0, world.steps - 1, value=world.steps // 2, step=1, label="Step (of the last run)")
        opacity = gr.Slider(0, 1, value=0.6, step=0.05, label="Heatmap opacity")
    with gr.Row():
        original_map = gr.Image(label="Original run", height=MAP_SIZE, elem_classes=PIXELS)
        erased_map = gr.Image(label="Erased run", height=MAP_SIZE, elem_classes=PIXELS)
        mask = gr.Image(label="Edit mask: the tokens the edit changed", height=MAP_SIZE, elem_classes=PIXELS)
    info = gr.Markdown()

    def follow_last_run(state):
        """Inspect opens on the last run: its erased concept, its method and intervention, its steps."""
        if not state:
            return gr.update(), gr.update(), gr.update(), gr.update(visible=True)
        steps = len(next(iter(next(iter(state["runs"].values())).traces.values())).timesteps)
        concepts = state["request"][1]
        return (
            gr.update(value=concepts[0]) if concepts else gr.update(),
            gr.update(value=state["last"]),
            gr.update(
                maximum=steps - 1, value=min(steps - 1, steps // 2), label=f"Step (0 – {steps - 1}, of the last run)"
            ),
            gr.update(visible=False),
        )

    def inspect(state, concept, neuron, method, step, opacity):
        if not state or method not in state["runs"]:
            label = pipeline_label(method) if method in RUN_CHOICES else method
            raise gr.Error(
                f"No {label} run to inspect yet: press Erase on the Erase tab with that method and intervention."
            )
        kind = world.kind_of(concept) if concept in world.concepts else "object"
        bundle = studio.bundles.get((method.partition("+")[0], kind))
        result = state["runs"][method]
        trace = result.traces.get(bundle.block) if bundle else None
        if trace is None:
            raise gr.Error(f"The last run recorded no {kind} activations for {method}.")
        if neuron is not None and int(neuron) >= 0:
            latent = int(neuron)
            if not 0 <= latent < bundle.sae.num_latents:
                raise gr.Error(f"neuron must be in [0, {bundle.sae.num_latents - 1}], got {latent}.")
        elif bundle.dictionary is not None:
            latent = bundle.dictionary.latent(concept)
        else:
            latent = int(bundle.stats.score_profile(concept).argmax())
        step = min(int(step), len(trace.timesteps) - 1)
        count = len(result.prompts)
        maps = [trace.latent_map(latent, step, row) for row in (0, count)]
        scale = max(
            float(trace.latent_map(latent, s, r).max()) for s in range(len(trace.timesteps)) for r in (0, count)
        )
        scale = scale or 1.0
        images = [
            overlay(result.originals[0], maps[0], scale, opacity, MAP_SIZE),
            overlay(result.erased[0], maps[1], scale, opacity, MAP_SIZE),
        ]
        sources = trace.source_map(step, count)
        if sources is None:
            edit = mask_overlay(result.erased[0], trace.edit_mask(step, count), MAP_SIZE)
        else:
            edit = source_arrows(result.erased[0], sources, MAP_SIZE)
        edited = int(trace.edit_mask(step, count).sum())
        text = (
            f"Neuron **{latent}** at `{bundle.block}`, step {step} (t = {trace.timesteps[step]}). "
            f"Peak activation: original {float(maps[0].max()):.2f}, erased {float(maps[1].max()):.2f} "
            f"(colour scale 0 – {scale:.2f}). "
            + (f"Tokens edited: {edited}." if sources is None else f"Tokens detected and replaced: {edited}.")
        )
        return *images, edit, text

    inputs = [last_run, concept, neuron, method, step, opacity]
    outputs = [original_map, erased_map, mask, info]
    gr.Button("Show", variant="primary").click(inspect, inputs, outputs, api_name="inspect")

    def inspect_new_run(state, *settings):
        """The maps of a run just made, at the settings it set here, so that they are ready when Inspect opens;
        what cannot be shown is said in the text, not raised over the Erase tab."""
        if not state:
            return gr.update(), gr.update(), gr.update(), gr.update()
        try:
            return inspect(state, *settings)
        except gr.Error as error:
            return gr.update(), gr.update(), gr.update(), error.message

    last_run.change(follow_last_run, last_run, [concept, method, step, waiting], api_name=False).then(
        inspect_new_run, inputs, outputs, api_name=False
    )
    for control in (step, opacity):
        control.release(inspect, inputs, outputs, api_name=False)
