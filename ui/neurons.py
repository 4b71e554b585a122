"""The Neurons tab: an explorer of every latent (found by number or by the concept it holds: its top images with its
heatmap, its density, its concept and nearest latents), the top latents of the last generated image, the
concept-to-neuron dictionary, a concept's score over every latent (supervised: one spike; unsupervised: several
peaks), and the feature-centralisation tables."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from saemnesia.evaluate import pipeline_label
from saemnesia.heatmaps import overlay
from saemnesia.latent_index import latent_page
from saemnesia.studio import Studio
from ui.shared import PIXELS, default_concept

SAE_CHOICES = [("SAEmnesia (supervised)", "saemnesia"), ("SAeUron (unsupervised)", "saeuron")]
THUMBNAIL = 192
"""Side in pixels of an image in the explorer's galleries."""


def explorer(studio: Studio, last_run: gr.State) -> None:
    """Find a latent by number or concept and see what makes it fire; or see which latents fire on the last image."""
    world = studio.world
    gr.Markdown(
        "### Explore a latent\nBy number, or by a concept's name (SAEmnesia: the neuron the concept is bound to; "
        "SAeUron: its best-scoring latent). Its top images come from the latent index (`python -m saemnesia "
        "index-latents`): those it fires on most all along the sampling, each with the latent's activation painted "
        "over it, averaged over the steps."
    )
    with gr.Row():
        query = gr.Textbox(value=default_concept(world), label="Concept or latent number", scale=2)
        kind = gr.Radio(["object", "style"], value="object", label="Block (for a number)")
        method = gr.Radio(SAE_CHOICES, value="saemnesia", label="SAE")
        show = gr.Button("Show latent", variant="primary")
    info = gr.Markdown(elem_id="latent-info")
    top_images = gr.Gallery(label="Top activating images", columns=4, height="auto", elem_classes=PIXELS)
    with gr.Row():
        histogram = gr.BarPlot(x="activation from", y="tokens", height=240, label="Activation density (log bins)")
        nearest = gr.Dataframe(
            headers=["latent", "cosine", "concept"],
            interactive=False,
            label="Nearest latents by decoder (click one)",
            elem_id="nearest-latents",
        )

    def page(query, kind, method):
        try:
            bundle, latent, _ = studio.resolve_latent(query, kind, method)
        except (ValueError, KeyError) as error:
            raise gr.Error(str(error), print_exception=False) from None
        if bundle.index is None or studio.images is None:
            raise gr.Error(
                f"No latent index for {method}'s SAE on {bundle.block}: make one with `python -m saemnesia "
                "index-latents`.",
                print_exception=False,
            )
        shown = latent_page(bundle.index, studio.images, latent)
        scale = max([float(image.activation_map.max()) for image in shown.images] + [1e-6])  # one scale, all shown
        gallery = [
            (
                overlay(image.thumbnail, image.activation_map, scale, 0.55, THUMBNAIL),
                f"{image.prompt} · seed {image.seed} · {image.activation:.2f}, peak at step {image.step}",
            )
            for image in shown.images
        ]
        concept = shown.concept
        bound = f"bound to **{concept['bound']}** by the dictionary; " if concept.get("bound") else ""
        text = (
            f"**Latent {latent}** at `{shown.block}` ({pipeline_label(method)}): {bound}highest score for "
            f"**{concept['concept']}** ({concept['score']:.3f}). Fires on {shown.density:.2%} of tokens; mean "
            f"activation where it fires {shown.mean_activation:.3f}, largest {shown.max_activation:.3f}."
            + ("" if gallery else " It never fired on the indexed images.")
        )
        bars = pd.DataFrame(
            [(f"{edge:.3g}", count) for edge, count in shown.histogram], columns=["activation from", "tokens"]
        )
        table = pd.DataFrame(shown.nearest, columns=["latent", "cosine", "concept"]).round(3)
        return text, gallery, bars, table

    outputs = [info, top_images, histogram, nearest]
    show.click(page, [query, kind, method], outputs, api_name="latent_page")
    query.submit(page, [query, kind, method], outputs, api_name=False)

    def open_nearest(table, kind, method, selected: gr.SelectData):
        latent = str(int(table.iloc[selected.index[0]]["latent"]))
        return latent, *page(latent, kind, method)

    nearest.select(open_nearest, [nearest, kind, method], [query, *outputs], api_name=False)

    gr.Markdown(
        "### Explore this image\nThe latents that fire most on the last image of the Erase tab, at a step of its "
        "run: each with its heatmap. Click one to open its page."
    )
    with gr.Row():
        image_kind = gr.Radio(["object", "style"], value="object", label="Block")
        which = gr.Radio(["original", "erased"], value="original", label="Image")
        step = gr.Slider(0, world.steps - 1, value=world.steps // 2, step=1, label="Step")
        explore = gr.Button("Top latents of the last image")
    image_latents = gr.Gallery(label="Its top latents", columns=4, height="auto", elem_classes=PIXELS)
    shown_latents = gr.State([])

    def explore_image(state, image_kind, which, step):
        if not state:
            raise gr.Error("No image yet: erase something on the Erase tab first.", print_exception=False)
        key = state["last"]
        method = key.partition("+")[0]
        bundle = studio.bundles.get((method, image_kind))
        result = state["runs"][key]
        trace = result.traces.get(bundle.block) if bundle else None
        if trace is None:
            raise gr.Error(f"The last run recorded no {image_kind} activations.", print_exception=False)
        step = min(int(step), len(trace.timesteps) - 1)
        row, image = (0, result.originals[0]) if which == "original" else (len(result.prompts), result.erased[0])
        latents = trace.top_latents(step, row)
        scale = max((peak for _, peak in latents), default=1.0)
        concepts = bundle.index.concepts if bundle.index is not None else None
        gallery = [
            (
                overlay(image, trace.latent_map(latent, step, row), scale, 0.55, THUMBNAIL),
                f"latent {latent} · peak {peak:.2f}" + (f" · {concepts[latent]['concept']}" if concepts else ""),
            )
            for latent, peak in latents
        ]
        return gallery, [[latent, image_kind, method] for latent, _ in latents]

    explore.click(
        explore_image, [last_run, image_kind, which, step], [image_latents, shown_latents], api_name="explore_image"
    )

    def open_image_latent(shown, selected: gr.SelectData):
        latent, latent_kind, latent_method = shown[selected.index]
        return str(latent), latent_kind, latent_method, *page(str(latent), latent_kind, latent_method)

    image_latents.select(open_image_latent, shown_latents, [query, kind, method, *outputs], api_name=False)


def neurons_tab(studio: Studio, results: dict, last_run: gr.State) -> None:
    """The Neurons tab; `results` holds the centralisation reports the CLI cached, `last_run` the Erase tab's runs."""
    world = studio.world
    explorer(studio, last_run)

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
