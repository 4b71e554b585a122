"""The Neurons tab: the concept-to-neuron dictionary, the concepts that drive any neuron, a concept's score over every
latent (supervised: one spike; unsupervised: several peaks), and the feature-centralisation tables."""

from __future__ import annotations

import gradio as gr
import pandas as pd

from saemnesia.studio import Studio


def neurons_tab(studio: Studio, results: dict) -> None:
    """The Neurons tab; `results` holds the centralisation reports the CLI cached."""
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
