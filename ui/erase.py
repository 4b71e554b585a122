"""The Erase tab: a prompt, the concepts to erase, method, intervention and strengths; original and erased images
from one seed, each with the classifier's verdict, then the same erasure on neighbour prompts."""

from __future__ import annotations

import time

import gradio as gr
import torch

from saemnesia.erase import STRENGTH_RANGE
from saemnesia.evaluate import DEFAULT_STRENGTH, pipeline_key, pipeline_label
from saemnesia.heatmaps import upscale
from saemnesia.studio import Studio
from ui.shared import (
    DISPLAY,
    PIXELS,
    captioned,
    default_concept,
    example_concept,
    tuned_settings,
    verdict_rows,
    whole_as_int,
)

METHOD_CHOICES = {"SAEmnesia": ["saemnesia"], "SAeUron (baseline)": ["saeuron"], "Both": ["saemnesia", "saeuron"]}
INTERVENTION_CHOICES = {
    "Replace (PER)": ["replace"],
    "Steer": ["steer"],
    "Compare: steer and replace": ["steer", "replace"],
}
DEFAULT_INTERVENTION = "Compare: steer and replace"


def erase_tab(studio: Studio, classifier, last_run: gr.State, benchmark: dict | None) -> None:
    """The Erase tab; each run's images and recorded codes go to `last_run`, for Inspect."""
    world = studio.world
    ours, theirs, theirs_features = tuned_settings(benchmark, [default_concept(world)])
    with gr.Row():
        with gr.Column(scale=2):
            prompt = gr.Textbox(label="Prompt", value=world.examples[0], max_lines=2)
            concepts = gr.Dropdown(
                choices=list(world.concepts),
                value=[default_concept(world)],
                multiselect=True,
                label="Concepts to erase",
                info="Objects and styles, by name; several at once.",
            )
            gr.Examples(
                [[e, [example_concept(world, e)]] for e in world.examples],
                inputs=[prompt, concepts],
                label="Example prompts (each sets the concept it erases)",
            )
            method = gr.Radio(list(METHOD_CHOICES), value="SAEmnesia", label="Method (whose SAE detects the concept)")
            intervention = gr.Radio(
                list(INTERVENTION_CHOICES),
                value=DEFAULT_INTERVENTION,
                label="Intervention",
                info="Steer scales the concept's neuron by γ; replace (PER) uses it only to find the concept's "
                "tokens and overwrites them with the nearest untouched ones, so γ plays no part.",
            )
            with gr.Row():
                strength = gr.Slider(
                    STRENGTH_RANGE[0], 0, value=ours, step=0.01, label="SAEmnesia strength γ (negative erases)"
                )
                saeuron_strength = gr.Slider(STRENGTH_RANGE[0], 0, value=theirs, step=0.01, label="SAeUron strength γ")
            gr.Markdown(
                "Each strength starts at the value the benchmark tuned for the chosen concepts (`python -m "
                "saemnesia evaluate`), so *Both* compares each method at its best. γ multiplies the latent's "
                "mean activation, which differs by method."
            )
            with gr.Accordion("Sampling", open=False):
                seed = gr.Number(value=0, precision=0, minimum=0, label="Seed")
                steps = gr.Slider(1, 50, value=world.steps, step=1, label="Steps")
                guidance = gr.Slider(0, 15, value=world.guidance, step=0.5, label="Guidance")
                start_step = gr.Slider(0, 49, value=0, step=1, label="Start step (edit from this step on)")
                features = gr.Slider(
                    1, 3, value=theirs_features, step=1, label="SAeUron: latents per step (its percentile)"
                )
            run = gr.Button("Erase", variant="primary")
        with gr.Column(scale=3):
            slider = gr.ImageSlider(
                label="Before / after (drag): the original and the last erased image",
                max_height=DISPLAY,
                elem_classes=PIXELS,
            )
            panes = gr.Gallery(
                label="Original and erased, same seed: under each, what the classifier sees",
                columns=3,
                height="auto",
                elem_classes=PIXELS,
            )
            neighbours = gr.Gallery(
                label="Neighbours: the same erasure on other concepts (should survive)",
                columns=3,
                height="auto",
                elem_classes=PIXELS,
            )
            status = gr.Markdown()
    concepts.change(
        lambda chosen: tuned_settings(benchmark, chosen),
        concepts,
        [strength, saeuron_strength, features],
        api_name=False,
    )

    def run_method(name, prompts, concepts, settings, record=False, include_originals=True, intervention="steer"):
        """One method's images for `prompts` at the shared settings, errors as messages for the visitor."""
        strength, seed, steps, guidance, start_step, features, saeuron_strength = settings
        try:
            return studio.erase(
                prompts,
                concepts,
                method=name,
                strength=saeuron_strength if name == "saeuron" else strength,
                seed=whole_as_int(seed),
                steps=whole_as_int(steps),
                guidance=guidance,
                start_step=whole_as_int(start_step),
                features_per_step=whole_as_int(features),
                record=record,
                include_originals=include_originals,
                intervention=intervention,
            )
        except (ValueError, KeyError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        except torch.OutOfMemoryError:
            raise gr.Error("The server ran out of memory for this request: try again, or with fewer steps.") from None

    def checked(prompt, concepts, method, intervention):
        methods = METHOD_CHOICES.get(method) if isinstance(method, str) else None
        if methods is None:
            raise gr.Error(f"method must be one of {', '.join(METHOD_CHOICES)}, got {method!r}.", print_exception=False)
        interventions = INTERVENTION_CHOICES.get(intervention) if isinstance(intervention, str) else None
        if interventions is None:
            raise gr.Error(
                f"intervention must be one of {', '.join(INTERVENTION_CHOICES)}, got {intervention!r}.",
                print_exception=False,
            )
        try:
            prompt, prompt_warning = studio.check_prompt(prompt)
            runs = [(name, each) for name in methods for each in interventions]
            return prompt, prompt_warning, studio.check_concepts(concepts or []), runs
        except (ValueError, KeyError) as error:
            raise gr.Error(str(error), print_exception=False) from None

    def erase(
        prompt,
        concepts,
        method,
        strength,
        seed,
        steps,
        guidance,
        start_step,
        features,
        saeuron_strength=DEFAULT_STRENGTH,
        intervention=DEFAULT_INTERVENTION,
        progress=gr.Progress(),
    ):
        """The pair, and with several methods or interventions each one's erased image, codes recorded for
        Inspect. `strength` is SAEmnesia's and `saeuron_strength` SAeUron's; both come after the older inputs
        (so gradio_client scripts that predate them keep working, the client filling in the default)."""
        prompt, prompt_warning, concepts, pipelines = checked(prompt, concepts, method, intervention)
        settings = (strength, seed, steps, guidance, start_step, features, saeuron_strength)
        started, runs = time.perf_counter(), {}
        for index, (name, each) in enumerate(pipelines):
            key = pipeline_key(name, each)
            progress(index / len(pipelines), desc=f"Generating: {pipeline_label(key)}")
            runs[key] = run_method(name, [prompt], concepts, settings, record=True, intervention=each)
        elapsed = time.perf_counter() - started
        first = next(iter(runs.values()))
        original = first.originals[0]
        shown = {"original": original} | {
            f"erased: {pipeline_label(key)}": result.erased[0] for key, result in runs.items()
        }
        gallery = captioned(classifier, shown)
        notes = [f"{len(pipelines) * 2} images in {elapsed:.1f} s · seed {int(seed)}"]
        notes += [f"⚠️ {prompt_warning}"] if prompt_warning else []
        notes.append(verdict_rows(classifier, shown))
        last_method, last_intervention = pipelines[-1]
        state = {
            "runs": runs,
            "request": (prompt, concepts, last_method, settings, last_intervention),
            "last": pipeline_key(last_method, last_intervention),
        }
        shown_erased = runs[state["last"]].erased[0]
        return (upscale(original, DISPLAY), upscale(shown_erased, DISPLAY)), gallery, "\n\n".join(notes), state

    def erase_neighbours(state, progress=gr.Progress()):
        """The last pair's erasure (the one the slider shows, same settings) on its prompt with the erased concept
        swapped for others: what must survive. Its own event, after the pair, so the pair never waits."""
        if not state:
            raise gr.Error("No erasure yet: press Erase first.", print_exception=False)
        prompt, concepts, method, settings, intervention = state["request"]
        prompts = studio.neighbour_prompts(prompt, concepts)
        if not prompts:
            return []
        progress(0, desc="Erasing from the neighbours")
        erased = run_method(method, prompts, concepts, settings, include_originals=False, intervention=intervention)
        return captioned(classifier, {f"“{text}” erased": image for text, image in zip(prompts, erased.erased)})

    first_inputs = [prompt, concepts, method, strength, seed, steps, guidance, start_step, features]
    run.click(
        erase,
        [*first_inputs, saeuron_strength, intervention],  # inputs added later go last: older API scripts still work
        [slider, panes, status, last_run],
        api_name="erase",
        preprocess=False,  # raw values reach the Studio, whose checks name the field (gradio's do not)
    ).success(erase_neighbours, last_run, neighbours, api_name="neighbours")
