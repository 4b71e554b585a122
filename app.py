"""SAEmnesia Studio: the web app. Layout and callbacks only; every computation is in `saemnesia`.

    python app.py [--host 127.0.0.1] [--port 7860] [--world minicanvas] [--model PATH] [--device auto]

Every event has an `api_name`, so each action is also an HTTP / `gradio_client` endpoint.
"""

from __future__ import annotations

import argparse
import inspect
import json
import math
import os
import time
from dataclasses import replace
from functools import partial

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

try:  # ZeroGPU wants `spaces` imported before anything touches CUDA; without it the app runs the same
    import spaces
except ImportError:
    spaces = None

import gradio as gr  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from saemnesia.erase import INTERVENTIONS, STRENGTH_RANGE  # noqa: E402
from saemnesia.evaluate import (  # noqa: E402
    DEFAULT_STRENGTH,
    benchmark_results,
    pipeline_key,
    pipeline_label,
    result_paths,
    result_sets,
    results_table,
    setting_or_default,
)
from saemnesia.heatmaps import mask_overlay, overlay, source_arrows, upscale  # noqa: E402
from saemnesia.prepare import assets_folder, is_prepared, prepare  # noqa: E402
from saemnesia.studio import LIMITS, Studio  # noqa: E402
from saemnesia.worlds import WORLDS  # noqa: E402

DISPLAY = 256
METHOD_CHOICES = {"SAEmnesia": ["saemnesia"], "SAeUron (baseline)": ["saeuron"], "Both": ["saemnesia", "saeuron"]}
INTERVENTION_CHOICES = {
    "Replace (PER)": ["replace"],
    "Steer": ["steer"],
    "Compare: steer and replace": ["steer", "replace"],
}
DEFAULT_INTERVENTION = "Compare: steer and replace"
RUN_CHOICES = [pipeline_key(m, i) for i in ("replace", "steer") for m in ("saemnesia", "saeuron")]

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

**This world.** MiniCanvas is our small world in the image of UnlearnCanvas: procedurally drawn objects in
styles, a text-to-image model of Stable Diffusion's exact architecture trained from scratch on it, and a
classifier that tells objects and styles apart. Everything runs on a CPU, offline.
"""


def whole_as_int(value: object) -> object:
    """A JSON number such as 20.0 as the integer 20; anything else as it came, for the Studio to check."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


def example_concept(world, prompt: str) -> str:
    """The concept an example prompt is there to erase: the first object it names, else the first style it
    names, else the world's first object."""
    words = prompt.lower().replace(",", " ").split()
    named = [c for c in (*world.objects, *world.styles) if all(w in words for w in c.lower().replace("_", " ").split())]
    return named[0] if named else world.objects[0]


def default_concept(world) -> str:
    """The concept the page opens on: the one the first example erases."""
    return example_concept(world, world.examples[0]) if world.examples else world.objects[0]


def verdicts(classifier, images: list) -> list | None:
    """The MiniCanvas classifier's verdict on each image (None without a classifier)."""
    if classifier is None or not images:
        return None
    from saemnesia.minicanvas.classifier import classify

    return classify(classifier, images)


def verdict_rows(classifier, images: dict) -> str:
    """A markdown table of the classifier's verdict on each named image (empty without a classifier)."""
    seen = verdicts(classifier, list(images.values()))
    if seen is None:
        return ""
    lines = ["| image | object seen | style seen |", "|---|---|---|"]
    for name, verdict in zip(images, seen):
        lines.append(
            f"| {name} | {verdict.object} ({verdict.object_prob:.0%}) | {verdict.style} ({verdict.style_prob:.0%}) |"
        )
    return "\n".join(lines)


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
                neurons_tab(studio, results)
            with gr.Tab("Metrics"):
                metrics_tab(studio, classifier, results)
            with gr.Tab("About"):
                gr.Markdown(ABOUT)
    return app


def tuned_settings(benchmark: dict | None, concepts: list[str]) -> tuple[float, float, int]:
    """SAEmnesia's strength, SAeUron's strength and SAeUron's latents per step, as the benchmark tuned them
    for erasing `concepts`: the two methods work at different scales, so a fair side by side needs both."""
    ours, theirs = (setting_or_default(benchmark, method, concepts or []) for method in ("saemnesia", "saeuron"))
    return ours.strength, theirs.strength, theirs.features_per_step


def erase_tab(studio: Studio, classifier, last_run: gr.State, benchmark: dict | None) -> None:
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
            slider = gr.ImageSlider(label="Before / after (drag; the first method chosen)", max_height=DISPLAY)
            panes = gr.Gallery(label="Original and erased, same seed", columns=3, height=DISPLAY + 60)
            neighbours = gr.Gallery(label="Neighbours: the same erasure on other concepts (should survive)", columns=3)
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
        gallery = [(upscale(image, DISPLAY), name) for name, image in shown.items()]
        notes = [f"{len(pipelines) * 2} images in {elapsed:.1f} s · seed {int(seed)}"]
        notes += [f"⚠️ {prompt_warning}"] if prompt_warning else []
        notes.append(verdict_rows(classifier, shown))
        first_method, first_intervention = pipelines[-1] if len(pipelines) > 1 else pipelines[0]
        state = {
            "runs": runs,
            "request": (prompt, concepts, first_method, settings, first_intervention),
            "last": pipeline_key(first_method, first_intervention),
        }
        shown_erased = runs[state["last"]].erased[0]
        return (upscale(original, DISPLAY), upscale(shown_erased, DISPLAY)), gallery, "\n\n".join(notes), state

    def erase_neighbours(state, progress=gr.Progress()):
        """The last pair's erasure (its first method, same settings) on its prompt with the erased concept
        swapped for others: what must survive. Its own event, after the pair, so the pair never waits."""
        if not state:
            raise gr.Error("No erasure yet: press Erase first.", print_exception=False)
        prompt, concepts, method, settings, intervention = state["request"]
        prompts = studio.neighbour_prompts(prompt, concepts)
        if not prompts:
            return []
        progress(0, desc="Erasing from the neighbours")
        erased = run_method(method, prompts, concepts, settings, include_originals=False, intervention=intervention)
        erased = erased.erased
        captions = [f"“{text}” erased" for text in prompts]
        seen = verdicts(classifier, erased)
        if seen is not None:  # the kind the neighbours differ in: the erased concept's
            kind = studio.world.kind_of(concepts[0])
            captions = [
                f"{caption} · seen: {getattr(v, kind)} ({getattr(v, f'{kind}_prob'):.0%})"
                for caption, v in zip(captions, seen)
            ]
        return [(upscale(image, DISPLAY), caption) for image, caption in zip(erased, captions)]

    run.click(
        erase,
        [
            prompt,
            concepts,
            method,
            strength,
            seed,
            steps,
            guidance,
            start_step,
            features,
            saeuron_strength,
            intervention,
        ],
        [slider, panes, status, last_run],
        api_name="erase",
        preprocess=False,  # raw values reach the Studio, whose checks name the field (gradio's do not)
    ).success(erase_neighbours, last_run, neighbours, api_name="neighbours")


def inspect_tab(studio: Studio, last_run: gr.State) -> None:
    world = studio.world
    gr.Markdown(
        "Where does a neuron fire? Run **Erase** first; its activations are kept, so moving the sliders here "
        "needs no new generation. One colour scale for both runs. The mask shows the tokens the edit changed: "
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
        original_map = gr.Image(label="Original run", height=DISPLAY)
        erased_map = gr.Image(label="Erased run", height=DISPLAY)
        mask = gr.Image(label="Edit mask (replace: detected tokens and where each took its value)", height=DISPLAY)
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

    last_run.change(follow_last_run, last_run, [concept, method, step, waiting], api_name=False)

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
            overlay(result.originals[0], maps[0], scale, opacity, DISPLAY),
            overlay(result.erased[0], maps[1], scale, opacity, DISPLAY),
        ]
        sources = trace.source_map(step, count)
        if sources is None:
            edit = mask_overlay(result.erased[0], trace.edit_mask(step, count), DISPLAY)
        else:
            edit = source_arrows(result.erased[0], sources, DISPLAY)
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
    for control in (step, opacity):
        control.release(inspect, inputs, outputs, api_name=False)


def neurons_tab(studio: Studio, results: dict) -> None:
    world = studio.world

    def concept_table() -> pd.DataFrame:
        rows = []
        for kind in ("object", "style"):
            bundle = studio.bundles.get(("saemnesia", kind))
            if bundle is None or bundle.dictionary is None:
                continue
            for concept, latent in bundle.dictionary.latents.items():
                if world.kind_of(concept) == kind:
                    rows.append({"concept": concept, "kind": kind, "neuron": latent, "block": bundle.block})
        return pd.DataFrame(rows, columns=["concept", "kind", "neuron", "block"])

    def neuron_concepts(neuron, kind, variant):
        bundle = studio.bundles.get((variant, kind))
        if bundle is None:
            raise gr.Error(f"No {variant} SAE for {kind}s in this world.")
        try:
            pairs = bundle.stats.concepts_driving(int(neuron or 0))
        except (TypeError, ValueError) as error:
            raise gr.Error(str(error)) from None
        return pd.DataFrame(pairs, columns=["concept", "mean activation"]).round(4)

    def score_profile(concept):
        if concept not in world.concepts:
            raise gr.Error(f"Unknown concept {concept!r}; known: {', '.join(world.concepts)}.")
        frames = []
        for variant, label in (("saemnesia", "supervised (SAEmnesia)"), ("saeuron", "unsupervised (SAeUron)")):
            bundle = studio.bundles.get((variant, world.kind_of(concept)))
            if bundle is not None:
                scores = bundle.stats.score_profile(concept).numpy()
                frames.append(pd.DataFrame({"latent": range(len(scores)), "score": scores, "SAE": label}))
        return pd.concat(frames) if frames else pd.DataFrame({"latent": [], "score": [], "SAE": []})

    first_neuron = int(concept_table()["neuron"].iloc[0]) if studio.bundles else 0
    with gr.Row():
        with gr.Column():
            gr.Markdown("### Concept → neuron (the SAEmnesia dictionary)")
            table = gr.Dataframe(concept_table(), interactive=False, max_height=420)
            gr.Button("Refresh table", size="sm").click(concept_table, None, table, api_name="concept_table")
        with gr.Column():
            gr.Markdown("### A concept's score over every latent\nSupervised: one spike. Unsupervised: several peaks.")
            concept = gr.Dropdown(list(world.concepts), value=world.objects[0], label="Concept")
            profile = gr.LinePlot(
                score_profile(world.objects[0]) if studio.bundles else None,
                x="latent",
                y="score",
                color="SAE",
                height=300,
            )
    gr.Markdown("### Which concepts drive a neuron?")
    with gr.Row():
        neuron = gr.Number(value=first_neuron, precision=0, label="Neuron")
        kind = gr.Radio(["object", "style"], value="object", label="Block (object or style SAE)")
        variant = gr.Radio(["saemnesia", "saeuron"], value="saemnesia", label="SAE")
        find = gr.Button("Find concepts", variant="primary")
    drivers = gr.Dataframe(headers=["concept", "mean activation"], interactive=False)
    find.click(neuron_concepts, [neuron, kind, variant], drivers, api_name="neuron_concepts")
    concept.change(score_profile, concept, profile, api_name="score_profile")
    for kind_name in ("object", "style"):
        report = results.get(f"centralisation_{kind_name}")
        if report:
            gr.Markdown(
                f"### Feature centralisation at `{report['block']}`\nShare of each concept's positive score held by "
                "its single best latent, and whether that latent is its dictionary neuron."
            )
            rows = [
                {"concept": row["concept"], "kind": row["kind"]}
                | {
                    f"{variant} share": round(row[variant]["best_share"], 3)
                    for variant in report["variants"]
                    if row[variant]
                }
                | {
                    f"{variant} best = own": row[variant]["best_is_dictionary"]
                    for variant in report["variants"]
                    if row[variant]
                }
                for row in report["concepts"]
                if row["kind"] == kind_name
            ]
            gr.Dataframe(pd.DataFrame(rows), interactive=False)


def result_set_view(world, name: str) -> tuple[str, list[str]]:
    """One cached `evaluate` result set of `world` (by protocol name) as a markdown table and its plots."""
    sets = result_sets(world)
    if name not in sets:
        raise gr.Error(f"No result set {name!r}: the cached ones are {', '.join(sets) or 'none'}.")
    results = json.loads(sets[name].read_text())
    paths = result_paths(sets[name].parent, name)
    plots = [str(paths[plot]) for plot in ("strength_curves", "sequential") if paths[plot].is_file()]
    return results_table(results), plots


def metrics_tab(studio: Studio, classifier, results: dict) -> None:
    gr.Markdown("### Benchmark (cached; `python -m saemnesia evaluate` makes it)")
    benchmark = results.get("benchmark")
    if benchmark:
        shown = gr.Dropdown(
            list(result_sets(studio.world)),
            value=benchmark["protocol"]["name"],
            label="Result set (the benchmark first; variants: another block, classifier or tuning set)",
        )
        table_markdown, plots = result_set_view(studio.world, shown.value)
        table = gr.Markdown(table_markdown)
        gallery = gr.Gallery(plots, columns=2, label="Strength and sequential curves")
        shown.change(partial(result_set_view, studio.world), shown, [table, gallery], api_name="result_set")
    else:
        gr.Markdown("No cached benchmark yet.")
    drift = studio.world.assets / "results" / "drift.md" if studio.world.assets else None
    if drift is not None and drift.is_file():
        gr.Markdown(
            "### Where each intervention moves the activations (`python -m saemnesia drift`)\nSteering scales a "
            "latent and can push the block's tokens outside anything the UNet saw it produce; replacement copies "
            "tokens the block produced itself (PER, Figure 2).\n\n" + drift.read_text()
        )
        gr.Image(str(drift.with_suffix(".png")), label="Token norms and per-channel values", show_label=True)
    if "quality" in results:
        quality = results["quality"]
        gr.Markdown(
            f"**World quality:** the classifier recognises the object in {quality['object_accuracy']:.1%} and the "
            f"style in {quality['style_accuracy']:.1%} of the model's own images ({quality['images']} images)."
        )
    gr.Markdown("### Live check of an erasure (a handful of seeds)")
    with gr.Row():
        concept = gr.Dropdown(list(studio.world.concepts), value=studio.world.objects[0], label="Concept")
        method = gr.Radio(["saemnesia", "saeuron"], value="saemnesia", label="Method")
        strength = gr.Slider(
            STRENGTH_RANGE[0],
            0,
            value=tuned_settings(benchmark, [concept.value])[0],
            step=0.01,
            label="Strength (tuned by default)",
        )
        seeds = gr.Slider(1, 8, value=2, step=1, label="Seeds")
    check = gr.Dataframe(headers=["metric", "value (%)"], interactive=False)

    def tuned_strength(concept, method):
        return tuned_settings(benchmark, [concept])[0 if method == "saemnesia" else 1]

    gr.on([concept.change, method.change], tuned_strength, [concept, method], strength, api_name=False)

    def quick_check(concept, method, strength, seeds, progress=gr.Progress()):
        if classifier is None:
            raise gr.Error("No classifier in this world: live checks need one.")
        from saemnesia.evaluate import live_check

        try:
            scores = live_check(studio, classifier, concept, method, float(strength), int(seeds), progress=progress)
        except (ValueError, KeyError) as error:
            raise gr.Error(str(error)) from None
        return pd.DataFrame(list(scores.items()), columns=["metric", "value (%)"]).round(1)

    gr.Button("Check").click(quick_check, [concept, method, strength, seeds], check, api_name="quick_check")
    attack_section(studio, results)


def attack_section(studio: Studio, results: dict) -> None:
    """The adversarial prompt found for an erased concept, and what it gives with and without erasure."""
    attack = results.get("attack")
    if not attack:
        return
    from saemnesia.attack import AttackResult, attack_table, best_prefix_images

    gr.Markdown("### Does the erasure hold under attack?\n" + attack_table(attack))
    methods = [m for m in attack["methods"] if m != "none"]
    concepts = sorted({c for m in methods for c in attack["methods"][m]["concepts"]})
    if not methods or not concepts:
        return
    with gr.Row():
        concept = gr.Dropdown(concepts, value=concepts[0], label="Erased concept")
        method = gr.Radio(methods, value=methods[-1], label="Erasure")
        seed_index = gr.Slider(0, len(attack["settings"]["seeds"]) - 1, value=0, step=1, label="Seed (index)")
        show = gr.Button("Show the attack")
    prompt = gr.Markdown()
    images = gr.Gallery(columns=3, height=DISPLAY + 60, label="Adversarial prompt vs plain prompt")

    def show_attack(concept, method, seed_index):
        entry = attack["methods"].get(method, {}).get("concepts", {}).get(concept)
        if entry is None:
            raise gr.Error(f"No {method} attack on {concept!r} in the cached results.")
        result = AttackResult.from_dict(entry)
        seed = result.seeds[min(int(seed_index), len(result.seeds) - 1)]
        shown = best_prefix_images(studio, result, seed)
        before, after = result.target_probability_before, result.target_probability_after
        text = f"Best prompt: **“{result.prompt}”** (the classifier's belief in {concept}: {before:.2f} → {after:.2f})"
        return text, [
            (upscale(shown.erased_plain, DISPLAY), "plain prompt, erased"),
            (upscale(shown.erased, DISPLAY), "adversarial prompt, erased"),
            (upscale(shown.original, DISPLAY), "adversarial prompt, no erasure"),
        ]

    show.click(show_attack, [concept, method, seed_index], [prompt, images], api_name="attack_images")


ZERO_GPU_EVENTS = ("erase", "neighbours", "quick_check", "attack_images")
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
    app.launch(server_name=args.host, server_port=args.port, theme=gr.themes.Soft(), show_error=True)


if __name__ == "__main__":
    main()
