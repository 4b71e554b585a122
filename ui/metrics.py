"""The Metrics tab: the cached benchmark (a table and its plots for each result set), where each intervention moves
the activations, the world's quality, a live check of one erasure, and whether erasures hold under attack."""

from __future__ import annotations

import json
from functools import partial

import gradio as gr
import pandas as pd

from saemnesia.erase import STRENGTH_RANGE
from saemnesia.evaluate import result_paths, result_set_label, result_sets, results_table
from saemnesia.studio import Studio
from ui.shared import PIXELS, captioned, tuned_settings

PLOTS = ("strength_curves", "sequential")
"""The plots `write_results` makes for a result set, each shown at the page's full width."""


def plot_image(path: str | None) -> gr.Image:
    """A saved plot at the page's full width, titled by the heading above it: a label would cover its top."""
    return gr.Image(path, show_label=False, interactive=False)


def result_set_view(world, name: str) -> tuple[str, str | None, str | None]:
    """One cached `evaluate` result set of `world` (by protocol name): its markdown table, its strength curves and
    its sequential plot (None where a plot is missing)."""
    sets = result_sets(world)
    if name not in sets:
        raise gr.Error(f"No result set {name!r}: the cached ones are {', '.join(sets) or 'none'}.")
    results = json.loads(sets[name].read_text())
    paths = result_paths(sets[name].parent, name)
    curves, sequential = (str(paths[figure]) if paths[figure].is_file() else None for figure in PLOTS)
    return results_table(results), curves, sequential


def metrics_tab(studio: Studio, classifier, results: dict) -> None:
    """The Metrics tab, from the results the CLI cached (`results`) and live checks with `classifier`."""
    gr.Markdown("### Benchmark (cached; `python -m saemnesia evaluate` makes it)")
    benchmark = results.get("benchmark")
    if benchmark:
        shown = gr.Dropdown(
            [
                (result_set_label(name, json.loads(path.read_text())["protocol"].get("heldout_seeds")), name)
                for name, path in result_sets(studio.world).items()
            ],
            value=benchmark["protocol"]["name"],
            label="Result set: the benchmark first, then runs that change one thing (seeds, block, classifier, ...)",
        )
        table_markdown, curves, sequential = result_set_view(studio.world, shown.value)
        table = gr.Markdown(table_markdown)
        gr.Markdown("#### Strength curves: UA, IRA, CRA and AR against the strength, on the tuning seeds")
        curves_plot = plot_image(curves)
        gr.Markdown("#### Sequential erasure: the first 1, 2, ... objects erased together")
        sequential_plot = plot_image(sequential)
        shown.change(
            partial(result_set_view, studio.world), shown, [table, curves_plot, sequential_plot], api_name="result_set"
        )
    else:
        gr.Markdown("No cached benchmark yet.")
    drift = studio.world.assets / "results" / "drift.md" if studio.world.assets else None
    if drift is not None and drift.is_file():
        gr.Markdown(
            "### Where each intervention moves the activations (`python -m saemnesia drift`)\nSteering scales a "
            "latent and can push the block's tokens outside anything the UNet saw it produce; replacement copies "
            "tokens the block produced itself (PER, Figure 2).\n\n" + drift.read_text()
        )
        gr.Markdown("#### Token norms and per-channel values")
        plot_image(str(drift.with_suffix(".png")))
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
    attack_section(studio, classifier, results)


def attack_section(studio: Studio, classifier, results: dict) -> None:
    """The adversarial prompt found for an erased concept, and what it gives with and without erasure."""
    attack = results.get("attack")
    if not attack:
        return
    from saemnesia.attack import AttackResult, attack_table, best_prefix_images, method_label

    gr.Markdown("### Does the erasure hold under attack?\n" + attack_table(attack))
    methods = [m for m in attack["methods"] if m != "none"]
    concepts = sorted({c for m in methods for c in attack["methods"][m]["concepts"]})
    if not methods or not concepts:
        return
    with gr.Row():
        concept = gr.Dropdown(concepts, value=concepts[0], label="Erased concept")
        shown = "saemnesia+replace" if "saemnesia+replace" in methods else methods[-1]
        method = gr.Radio([(method_label(m), m) for m in methods], value=shown, label="Erasure")
        seeds = len(attack["settings"]["seeds"])  # a slider needs two values at least: one seed has nothing to pick
        seed_index = gr.Slider(0, seeds - 1, value=0, step=1, label="Seed (index)") if seeds > 1 else gr.State(0)
        show = gr.Button("Show the attack")
    prompt = gr.Markdown()
    images = gr.Gallery(columns=3, height="auto", label="Adversarial prompt vs plain prompt", elem_classes=PIXELS)

    def show_attack(concept, method, seed_index):
        entry = attack["methods"].get(method, {}).get("concepts", {}).get(concept)
        if entry is None:
            raise gr.Error(f"No {method} attack on {concept!r} in the cached results.")
        result = AttackResult.from_dict(entry)
        seed = result.seeds[min(int(seed_index), len(result.seeds) - 1)]
        shown = best_prefix_images(studio, result, seed)
        before, after = result.target_probability_before, result.target_probability_after
        text = f"Best prompt: **“{result.prompt}”** (the classifier's belief in {concept}: {before:.2f} → {after:.2f})"
        return text, captioned(
            classifier,
            {
                "plain prompt, erased": shown.erased_plain,
                "adversarial prompt, erased": shown.erased,
                "adversarial prompt, no erasure": shown.original,
            },
        )

    show.click(show_attack, [concept, method, seed_index], [prompt, images], api_name="attack_images")
