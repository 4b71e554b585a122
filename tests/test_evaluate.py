"""The erasure benchmark: metrics on hand-made verdicts, honest strength selection, quick mode on a tiny model."""

import copy
import dataclasses
import functools
import json
import shutil

import gradio as gr
import numpy as np
import pytest
import torch
from conftest import make_tiny_pipeline, make_tiny_sae, make_tiny_world
from PIL import Image

from saemnesia import cli
from saemnesia import evaluate as evaluate_module
from saemnesia.cli import build_parser
from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.erase import ReplaceRule, check_strength
from saemnesia.evaluate import (
    DEFAULT_STRENGTH,
    FULL,
    QUICK,
    SAEURON_FEATURES,
    Judged,
    Metrics,
    Setting,
    VerdictCache,
    ablate_blocks,
    accuracy,
    balanced_prompts,
    benchmark_results,
    ceiling,
    chance_ceiling,
    chance_survival,
    choose_setting,
    diagnostics,
    edit_coverage,
    erasure_metrics,
    evaluate,
    grid_metrics,
    grid_prompts,
    planned_images,
    result_paths,
    result_set_label,
    result_sets,
    results_table,
    search_grid,
    tuned_setting,
    write_results,
)
from saemnesia.evaluate import cache as cache_module
from saemnesia.evaluate.protocol import make_plan
from saemnesia.generate import sampler_timesteps
from saemnesia.minicanvas import classifier as classifier_module
from saemnesia.minicanvas.artifacts import ArtifactDetector, ArtifactDetectorConfig
from saemnesia.minicanvas.classifier import NO_OBJECT, ClassifierConfig, MiniCanvasClassifier, Verdict
from saemnesia.minicanvas.data import CANVAS, CANVAS_32
from saemnesia.replace_rules import DETECTION_SHARES, RULE_METRICS, RULES, compare_replace_rules, write_comparison
from saemnesia.studio import SaeBundle, Studio
from saemnesia.worlds import MINICANVAS, WORLDS
from ui.metrics import result_set_view

TINY_WORLD = make_tiny_world(objects=("circle", "fish", "butterfly"), templates=CANVAS.templates, canvas=CANVAS)
"""The quick protocol's world: MiniCanvas's shapes, old and new, and its five caption templates, at the tiny size."""


def judged(asked: str, seen: str, seed: int = 0) -> Judged:
    """An image from 'object/style' asked and seen, e.g. judged('circle/sunset', 'square/sunset'); 'circle/-' asks
    for no style ("a circle")."""
    object_name, style = asked.split("/")
    seen_object, seen_style = seen.split("/")
    if style == "-":
        return Judged(f"a {object_name}", seed, object_name, None, seen_object, seen_style)
    return Judged(f"a {object_name} in {style} style", seed, object_name, style, seen_object, seen_style)


VERDICTS = [
    judged("circle/sunset", "circle/sunset"),
    judged("circle/ocean", "square/ocean"),
    judged("circle/sunset", "star/ocean"),
    judged("circle/ocean", "circle/ocean"),
    judged("square/sunset", "square/sunset"),
    judged("square/ocean", "circle/sunset"),
    judged("star/sunset", "star/sunset"),
    judged("star/ocean", "star/ocean"),
    judged("star/ocean", "star/sunset"),
    judged("square/sunset", "square/sunset"),
]


def test_object_erasure_metrics_on_hand_made_verdicts():
    metrics = erasure_metrics(VERDICTS, ["circle"], "object", kind_size=3)
    # circle images: 2 of 4 still drawn circles; others: 5 of 6 right. Styles: 3 of 4 right on circles,
    # 4 of 6 on the others; on the grid of 3 objects the circles are a third of the images.
    assert metrics == Metrics(
        ua=50.0, ira=pytest.approx(500 / 6), cra=pytest.approx(75 / 3 + 2 / 3 * 400 / 6), cra_erased=75.0
    )
    assert metrics.score == pytest.approx((50 + 500 / 6) / 2)


def test_cra_weighs_the_erased_concepts_images_by_their_share_of_the_grid():
    # The same verdicts in a world of 10 objects: the circles are a tenth of its grid, however many were sampled.
    assert erasure_metrics(VERDICTS, ["circle"], "object", kind_size=10).cra == pytest.approx(
        75 / 10 + 9 / 10 * 400 / 6
    )
    with pytest.raises(ValueError, match="do not fit a world of 1 objects"):
        erasure_metrics(VERDICTS, ["circle", "square"], "object", kind_size=1)


def test_style_erasure_metrics_use_styles_for_ua_and_ira_and_objects_for_cra():
    metrics = erasure_metrics(VERDICTS, ["ocean"], "style", kind_size=2)
    # ocean images: 3 of 5 still ocean; sunset images: 4 of 5 right; objects: 3 of 5 right on ocean, 4 of 5 on sunset.
    assert metrics == Metrics(ua=40.0, ira=80.0, cra=70.0, cra_erased=60.0)


def test_several_erased_concepts_count_together_and_empty_groups_are_none():
    # Objects: 5 of 7 right on circles and squares (two thirds of the grid), 2 of 3 on stars.
    assert erasure_metrics(VERDICTS, ["circle", "square"], "object", kind_size=3) == Metrics(
        ua=pytest.approx(100 - 400 / 7),
        ira=100.0,
        cra=pytest.approx(2 / 3 * 500 / 7 + 1 / 3 * 200 / 3),
        cra_erased=pytest.approx(500 / 7),
    )
    nothing_left = erasure_metrics(VERDICTS, ["circle", "square", "star"], "object", kind_size=3)
    assert nothing_left.ira is None and nothing_left.score is None and nothing_left.cra == 70.0
    assert erasure_metrics(VERDICTS, ["moon"], "object", kind_size=4).ua is None
    assert accuracy([], "object") is None


# A 3-object x 2-style grid with its unstyled row; cells hold 1 to 3 images (seeds), so pooling would count
# differently from the authors' equal weight per cell.
GRID_VERDICTS = [
    judged("circle/sunset", "circle/sunset", 0),
    judged("circle/sunset", "square/sunset", 1),
    judged("circle/sunset", "square/ocean", 2),  # circle/sunset: object 1 of 3, style 2 of 3
    judged("circle/ocean", "star/sunset"),  # circle/ocean: object 0 of 1, style 0 of 1
    judged("circle/-", "circle/ocean"),  # circle unstyled: object 1 of 1, no style asked
    judged("square/sunset", "square/sunset"),  # object 1 of 1, style 1 of 1
    judged("square/ocean", "circle/ocean", 0),
    judged("square/ocean", "square/ocean", 1),  # square/ocean: object 1 of 2, style 2 of 2
    judged("square/-", "square/sunset"),  # object 1 of 1
    judged("star/sunset", "star/ocean"),  # object 1 of 1, style 0 of 1
    judged("star/ocean", "star/ocean"),  # object 1 of 1, style 1 of 1
    judged("star/-", "circle/ocean"),  # object 0 of 1
]
CIRCLE, SQUARE, STAR = (100 / 3 + 0 + 100) / 3, (100 + 50 + 100) / 3, (100 + 100 + 0) / 3
"""Each object's accuracy: the mean of its cells' (styled and unstyled)."""
SUNSET, OCEAN = (200 / 3 + 100 + 0) / 3, (0 + 100 + 100) / 3
"""Each style's accuracy: the mean of its column's cells."""


def test_object_erasure_counts_every_cell_once_with_the_unstyled_row():
    metrics = grid_metrics(GRID_VERDICTS, ["circle"], "object")
    assert metrics.ua == pytest.approx(100 - CIRCLE)  # pooled, 2 of circle's 5 images: UA 60
    assert metrics.ira == pytest.approx((SQUARE + STAR) / 2)
    assert metrics.cra == pytest.approx((SUNSET + OCEAN) / 2) == metrics.cra_styled
    assert metrics.cra_erased == 50.0  # styles kept on circle's 4 styled images: 2
    assert metrics.nothing_rate is None and metrics.ar is None


def test_style_erasure_counts_columns_and_reads_cra_from_the_unstyled_prompts_alone():
    metrics = grid_metrics(GRID_VERDICTS, ["ocean"], "style")
    assert metrics.ua == pytest.approx(100 - OCEAN) and metrics.ira == pytest.approx(SUNSET)
    assert metrics.cra == pytest.approx((100 + 100 + 0) / 3)  # circle, square, star unstyled
    # The objects of the styled pictures, what CRA counted before: circle (1/3 and 0), square (1 and 1/2), star.
    assert metrics.cra_styled == pytest.approx((100 / 6 + 75 + 100) / 3)
    assert metrics.cra_erased == 50.0  # objects on ocean's 4 images: 2


def test_several_erased_objects_average_their_ua_and_leave_ira_to_the_rest():
    metrics = grid_metrics(GRID_VERDICTS, ["circle", "square"], "object")
    assert metrics.ua == pytest.approx(100 - (CIRCLE + SQUARE) / 2)
    assert metrics.ira == pytest.approx(STAR) and metrics.cra == pytest.approx((SUNSET + OCEAN) / 2)
    everything = grid_metrics(GRID_VERDICTS, ["circle", "square", "star"], "object")
    assert everything.ira is None and everything.score is None
    assert grid_metrics(GRID_VERDICTS, ["moon"], "object").ua is None


def test_nothing_rate_is_the_share_of_the_erased_objects_cells_called_nothing():
    verdicts = [
        judged("circle/sunset", f"{NO_OBJECT}/sunset", 0),
        judged("circle/sunset", "circle/sunset", 1),  # half of the cell
        judged("circle/ocean", "square/ocean"),  # turned into another object, not gone
        judged("circle/-", f"{NO_OBJECT}/ocean"),  # the whole unstyled cell
        judged("square/sunset", f"{NO_OBJECT}/sunset"),  # another object's: not counted
    ]
    assert grid_metrics(verdicts, ["circle"], "object", NO_OBJECT).nothing_rate == pytest.approx((50 + 0 + 100) / 3)
    assert grid_metrics(verdicts, ["circle"], "object").nothing_rate is None  # a classifier without the label
    assert grid_metrics(verdicts, ["sunset"], "style", NO_OBJECT).nothing_rate is None
    # a second classifier's verdict, carried by each image, counts the same way
    second = [j._replace(seen_object=j.object, nothing=j.seen_object == NO_OBJECT) for j in verdicts]
    assert grid_metrics(second, ["circle"], "object").nothing_rate == pytest.approx((50 + 0 + 100) / 3)
    assert grid_metrics(second, ["circle"], "object").ua == 0.0


def test_chance_survival_counts_each_cell_once_and_gives_ua_its_ceiling():
    verdicts = [
        judged("circle/sunset", "circle/sunset", 0),
        judged("circle/sunset", "star/sunset", 1),
        judged("circle/sunset", "star/sunset", 2),  # 1 of 3
        judged("circle/ocean", "circle/ocean"),  # 1 of 1
        judged("circle/-", "square/ocean"),  # 0 of 1
        judged("square/sunset", "square/sunset"),  # 1 of 1
        judged("square/-", f"{NO_OBJECT}/sunset"),  # 0 of 1
    ]
    circle, square = (100 / 3 + 100 + 0) / 3, (100 + 0) / 2
    assert chance_survival(verdicts, ["mid_block.attentions.0"]) == {
        "blocks": ["mid_block.attentions.0"],
        "survival": round((circle + square) / 2, 2),
        "per_object": {"circle": round(circle, 2), "square": 50.0},
        "ua_ceiling": round(100 - (circle + square) / 2, 2),
        "images": 7,
    }


def test_ceiling_is_the_untouched_accuracy_overall_and_per_concept():
    assert ceiling(VERDICTS, {"circle": "object", "ocean": "style"}) == {
        "object_accuracy": 70.0,
        "style_accuracy": 70.0,
        "images": 10,
        "per_concept": {"circle": 50.0, "ocean": 60.0},
    }


def test_strength_is_chosen_by_ua_plus_ira_on_tuning_seeds_only():
    mild, medium, strong = Setting("saemnesia", -1.0), Setting("saemnesia", -10.0), Setting("saemnesia", -30.0)
    tuning_seed, heldout_seed = 7, 8
    trials = {
        # Keeps everything: UA 0, IRA 100 -> 50.
        mild: [
            judged("circle/sunset", "circle/sunset", tuning_seed),
            judged("star/sunset", "star/sunset", tuning_seed),
        ],
        # Erases and keeps: UA 100, IRA 100 -> 100, but looks bad on the held-out seed.
        medium: [
            judged("circle/sunset", "star/sunset", tuning_seed),
            judged("star/sunset", "star/sunset", tuning_seed),
            judged("circle/sunset", "circle/sunset", heldout_seed),
            judged("star/sunset", "circle/sunset", heldout_seed),
        ],
        # Erases everything: UA 100, IRA 0 -> 50, though perfect on the held-out seed.
        strong: [
            judged("circle/sunset", "star/sunset", tuning_seed),
            judged("star/sunset", "circle/sunset", tuning_seed),
            *[judged("circle/sunset", "star/sunset", heldout_seed), judged("star/sunset", "star/sunset", heldout_seed)]
            * 5,
        ],
    }
    best, metrics = choose_setting(trials, "circle", "object", 2, tuning_seeds={tuning_seed})
    assert best == medium
    assert metrics == {
        mild: Metrics(0.0, 100.0, 100.0, 100.0),
        medium: Metrics(100.0, 100.0, 100.0, 100.0),
        strong: Metrics(100.0, 0.0, 100.0, 100.0),
    }
    # With the held-out seed counted, the strong setting would have won: it must not be seen.
    assert choose_setting(trials, "circle", "object", 2, tuning_seeds={tuning_seed, heldout_seed})[0] == strong


def test_ties_go_to_the_centre_of_the_longest_run_of_best_strengths_or_to_the_mildest():
    erased_and_kept = [judged("circle/sunset", "star/sunset"), judged("square/sunset", "square/sunset")]
    kept = [judged("circle/sunset", "circle/sunset"), judged("square/sunset", "square/sunset")]
    # In search_grid order: one latent a step -1 (best), -3, then two latents -1, -3, -10, -30 (best, but -3).
    best_at = {(1, -1.0), (2, -1.0), (2, -10.0), (2, -30.0), (2, -100.0)}
    trials = {
        Setting("saeuron", strength, count): erased_and_kept if (count, strength) in best_at else kept
        for count in (1, 2)
        for strength in (-1.0, -3.0, -10.0, -30.0, -100.0)
    }
    # The runs of best settings: [1 x -1], [2 x -1], [2 x -10, -30, -100]; the longest's middle is -30.
    assert choose_setting(trials, "circle", "object", 3, {0}, ties="centre")[0] == Setting("saeuron", -30.0, 2)
    assert choose_setting(trials, "circle", "object", 3, {0})[0] == Setting("saeuron", -1.0, 1)
    # Two middles: the milder one.
    trials[Setting("saeuron", -100.0, 2)] = kept
    trials[Setting("saeuron", -3.0, 2)] = erased_and_kept
    assert choose_setting(trials, "circle", "object", 3, {0}, ties="centre")[0] == Setting("saeuron", -3.0, 2)
    with pytest.raises(ValueError, match="ties must be one of"):
        choose_setting(trials, "circle", "object", 3, {0}, ties="strongest")


def test_search_grids_give_saeuron_three_feature_counts_of_the_seven_strengths_of_each_kind():
    assert SAEURON_FEATURES == (1, 2, 3)
    assert FULL.strengths("object") == (-1, -3, -10, -30, -100, -300, -1000)
    assert FULL.strengths("style") == (-0.03, -0.1, -0.3, -1, -3, -10, -30)
    for kind in ("object", "style"):
        ours, theirs = (search_grid(m, FULL.strengths(kind), FULL.saeuron_features) for m in ("saemnesia", "saeuron"))
        assert len(ours) == 7 and {s.features_per_step for s in ours} == {1}
        assert len(theirs) == 21 and {(s.strength, s.features_per_step) for s in theirs} == {
            (strength, count) for strength in FULL.strengths(kind) for count in (1, 2, 3)
        }
    # Every grid strength is one the erasure accepts.
    for strength in FULL.strengths("object") + FULL.strengths("style"):
        assert check_strength(strength) == strength


def test_prompts_are_balanced_and_distinct():
    prompts = balanced_prompts(MINICANVAS, MINICANVAS.objects, 200)
    assert {(p.object, p.style) for p in prompts} == {(o, s) for o in MINICANVAS.objects for s in MINICANVAS.styles}
    every = balanced_prompts(MINICANVAS, ["neon"], 1000)  # 20 objects x 5 templates
    assert len(every) == len({p.text for p in every}) == 100 and {p.style for p in every} == {"neon"}


def test_the_heldout_grid_holds_every_cell_once_its_templates_turning_and_the_unstyled_row():
    world = MINICANVAS  # 20 objects x 10 styles, 5 templates; no model is loaded
    grid = grid_prompts(world)
    cells = [(spec.object, spec.style) for spec in grid]
    assert len(cells) == len(set(cells)) == 20 * 10 + 20
    assert set(cells) == {(o, s) for o in world.objects for s in world.styles} | {(o, None) for o in world.objects}
    # One template a cell, turning one step along the row and one down the column.
    assert [spec.text for spec in grid[:3]] == [
        "a circle in sunset style",
        "ocean picture of a circle",
        "a neon circle",
    ]
    assert grid[10].text == "sunset picture of a square" and grid[-1].text == "a human"
    quick = grid_prompts(world, 3, 2)
    assert quick == [
        spec for spec in grid if spec.object in world.objects[:3] and spec.style in (None, "sunset", "ocean")
    ]
    assert len(grid_prompts(world, 3, 2, plain_template=None)) == 6


def test_protocol_image_counts_match_the_documented_budget():
    # Tuning: concepts x prompts x trials (SAEmnesia 7, SAeUron 21, SAeUron's replace 3); then the grid's cells x
    # (one erasure a concept and 9 sequential steps) x 4 pipelines, the untouched grid and the chance prompts.
    assert planned_images(MINICANVAS, FULL) == 30 * 20 * 31 + 220 * (30 + 9) * 4 + 220 + 220 == 53_360
    steer = dataclasses.replace(FULL, interventions=("steer",))
    assert planned_images(MINICANVAS, steer) == 30 * 20 * 28 + 220 * (30 + 9) * 2 + 220 + 220 == 34_400
    assert planned_images(MINICANVAS, QUICK) == 5 * 6 * 31 + 9 * (5 + 3) * 4 + 9 + 9 == 1_236
    with pytest.raises(ValueError, match="must hold every erased concept"):
        planned_images(MINICANVAS, dataclasses.replace(QUICK, grid_objects=2))
    with pytest.raises(ValueError, match="interventions must be some of"):
        dataclasses.replace(QUICK, interventions=("scrub",))
    with pytest.raises(ValueError, match="seeds must differ"):
        dataclasses.replace(QUICK, heldout_seeds=QUICK.tuning_seeds)


def test_cache_skips_broken_lines_and_other_fingerprints(tmp_path):
    path = tmp_path / "cache.jsonl"
    record = {"method": "saemnesia", "intervention": "steer", "concepts": ["circle"], "strength": -5.0}
    record |= {"features_per_step": 1, "seed": 3, "prompt": "a circle", "object": "star", "style": "neon"}
    record |= {"artifact": False, "seconds": 0.1}
    lines = [json.dumps(record | {"fingerprint": "old"}), json.dumps(record | {"fingerprint": "new", "seed": 4})]
    path.write_text("\n".join(lines) + '\n{"method": "saemn')
    cache = VerdictCache(path, {"saemnesia": "new", "none": "old"})
    assert list(cache.records) == [("saemnesia", "steer", None, ("circle",), -5.0, 1, 4, "a circle")]
    cache.add([dict(record)])
    reloaded = VerdictCache(path, {"saemnesia": "new"})
    expected = {("saemnesia", "steer", None, ("circle",), -5.0, 1, seed, "a circle") for seed in (3, 4)}
    assert set(reloaded.records) == expected


def tiny_studio() -> Studio:
    """The tiny pipeline with random SAEs and planted statistics for both methods and both kinds."""
    pipeline = make_tiny_pipeline()
    sae = make_tiny_sae()
    concepts = list(TINY_WORLD.concepts)
    kinds = [TINY_WORLD.kind_of(c) for c in concepts]
    timesteps = torch.tensor(sampler_timesteps(pipeline, TINY_WORLD.steps))
    mean_acts = torch.rand(len(concepts), len(timesteps), sae.num_latents, generator=torch.Generator().manual_seed(0))
    latents = {concept: 10 * (index + 1) for index, concept in enumerate(concepts)}
    for index, concept in enumerate(concepts):
        mean_acts[index, :, latents[concept]] += 3.0
    stats = ConceptStats(concepts, kinds, timesteps, mean_acts)
    dictionary = ConceptDictionary(latents, dict(zip(concepts, kinds)))
    bundles = {
        (method, kind): SaeBundle(sae, TINY_WORLD.block_for(kind), stats, dictionary)
        for method in ("saemnesia", "saeuron")
        for kind in ("object", "style")
    }
    return Studio(TINY_WORLD, pipeline, bundles)


def tiny_classifier() -> MiniCanvasClassifier:
    torch.manual_seed(0)
    return MiniCanvasClassifier(ClassifierConfig(TINY_WORLD.objects, TINY_WORLD.styles, channels=(4, 4, 4))).eval()


def tiny_artifact_detector() -> ArtifactDetector:
    torch.manual_seed(0)
    return ArtifactDetector(ArtifactDetectorConfig(channels=(4, 4, 4))).eval()


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("evaluate")
    studio, classifier = tiny_studio(), tiny_classifier()
    detector = tiny_artifact_detector()
    results = evaluate(
        studio, classifier, QUICK, cache=folder / "cache.jsonl", progress=False, artifact_detector=detector
    )
    return studio, classifier, folder, results


def test_quick_mode_measures_replace_with_no_strength_search_and_ar_on_every_row(quick_run):
    _, _, _, results = quick_run
    search = results["search"]
    assert search["saemnesia+replace"]["trials"] == search["saemnesia+replace"]["images"] == 0
    assert search["saeuron+replace"]["trials"] == 3 * 5 and search["saeuron+replace"]["strengths"]["object"] == []
    for key in ("saemnesia", "saeuron", "saemnesia+replace", "saeuron+replace"):
        entry = results["methods"][key]
        assert entry["intervention"] == ("replace" if "+" in key else "steer")
        for concept in entry["concepts"].values():
            assert concept["heldout"]["images"] == 3 * 2 + 3  # the tiny world's whole grid
            assert 0 <= concept["heldout"]["ar"] <= 100 and 0 <= concept["untouched"]["ar"] <= 100
            assert concept["heldout"]["nothing_rate"] is None  # a classifier that cannot say "nothing"
            if "+" in key:
                assert concept["chosen"]["strength"] == 0.0
        assert [step["erased"] for step in entry["sequential"]] == [["circle"], ["circle", "fish"]]
    table = results_table(results)
    assert "| SAEmnesia + replace | objects |" in table and "| SAeUron + replace | styles |" in table
    assert "0 trials a concept (latent counts; replace scales nothing)" in table


def test_quick_mode_tunes_on_tuning_seeds_and_reports_on_heldout_ones(quick_run):
    _, _, _, results = quick_run
    planned = planned_images(TINY_WORLD, QUICK)
    assert results["images"]["generated"] + results["images"]["from_cache"] == planned
    assert results["search"]["saemnesia"]["trials"] == 7 * 5 and results["search"]["saeuron"]["trials"] == 21 * 5
    assert results["search"]["paper_grid"]["trials"] == 210 * 5
    assert results["search"]["trials_saved"]["vs_paper_grid"] == pytest.approx(1 - 7 / 210, abs=1e-4)
    for method, trials_per_concept in (("saemnesia", 7), ("saeuron", 21)):
        concepts = results["methods"][method]["concepts"]
        assert list(concepts) == ["circle", "fish", "butterfly", "sunset", "ocean"]
        for entry in concepts.values():
            assert len(entry["tuning"]) == trials_per_concept
            best = max(entry["tuning"], key=lambda trial: trial["score"])
            assert entry["chosen"]["tuning_score"] == best["score"]
            assert entry["heldout"]["images"] == 3 * 2 + 3
        assert set(results["methods"][method]["summary"]) == {"object", "style"}
        steps = results["methods"][method]["sequential"]
        assert [step["erased"] for step in steps] == [["circle"], ["circle", "fish"]]


def test_quick_mode_reports_uas_chance_ceiling_beside_object_ua(quick_run):
    _, _, _, results = quick_run
    chance = results["chance"]
    assert chance["blocks"] == [  # every cross-attention block of the tiny UNet but its style block
        "down_blocks.1.attentions.0",
        "up_blocks.0.attentions.0",
        "up_blocks.0.attentions.1",
        "up_blocks.1.attentions.0",
        "mid_block.attentions.0",
    ]
    assert list(chance["per_object"]) == ["circle", "fish", "butterfly"] and chance["images"] == 3 * (2 + 1)
    for value in (chance["survival"], chance["ua_ceiling"], *chance["per_object"].values()):
        assert isinstance(value, float) and 0 <= value <= 100
    assert chance["ua_ceiling"] == pytest.approx(100 - chance["survival"], abs=0.01)
    ceiling_cell = f"| {chance['ua_ceiling']:.2f} |"
    object_rows = [line for line in results_table(results).splitlines() if "| objects |" in line]
    assert len(object_rows) == 5 and all(ceiling_cell in line for line in object_rows)


def test_a_classifier_that_can_say_nothing_reports_the_erased_objects_called_nothing(monkeypatch):
    judge = tiny_classifier()
    judge.config = dataclasses.replace(judge.config, objects=(*judge.config.objects, NO_OBJECT))
    # Every image called "nothing" in sunset style: all of an erased object's images are gone.
    gone = Verdict(NO_OBJECT, 1.0, "sunset", 1.0, None, None)
    monkeypatch.setattr(cache_module, "classify", lambda classifier, images: [gone] * len(images))
    protocol = dataclasses.replace(
        QUICK, objects_erased=1, styles_erased=0, sequential_steps=1, interventions=("replace",)
    )
    results = evaluate(tiny_studio(), judge, protocol, cache=None, progress=False)
    assert results["settings"]["no_object_label"] == NO_OBJECT
    entry = results["methods"]["saemnesia+replace"]
    circle = entry["concepts"]["circle"]
    assert circle["heldout"]["nothing_rate"] == circle["untouched"]["nothing_rate"] == 100.0
    assert (circle["heldout"]["ua"], circle["heldout"]["ira"], circle["heldout"]["cra"]) == (100.0, 0.0, 50.0)
    assert entry["summary"]["object"]["nothing_rate"] == 100.0 and entry["sequential"][0]["nothing_rate"] == 100.0
    assert results["chance"]["ua_ceiling"] == 100.0
    assert "calls 'nothing' (%): SAEmnesia + replace 100.00; SAeUron + replace 100.00" in results_table(results)


def test_a_second_classifier_that_can_say_nothing_judges_every_image_beside_the_scoring_one(monkeypatch, tmp_path):
    scorer, second = tiny_classifier(), tiny_classifier()
    second.config = dataclasses.replace(second.config, objects=(*second.config.objects, NO_OBJECT))
    with pytest.raises(ValueError, match="must have the 'nothing' label"):
        evaluate(tiny_studio(), scorer, QUICK, cache=None, progress=False, nothing_classifier=scorer)
    gone, kept = Verdict(NO_OBJECT, 1.0, "sunset", 1.0, None, None), Verdict("star", 1.0, "sunset", 1.0, None, None)
    monkeypatch.setattr(
        cache_module, "classify", lambda classifier, images: [gone if classifier is second else kept] * len(images)
    )
    protocol = dataclasses.replace(
        QUICK, objects_erased=1, styles_erased=0, sequential_steps=1, interventions=("replace",)
    )
    cache = tmp_path / "cache.jsonl"
    results = evaluate(tiny_studio(), scorer, protocol, cache=cache, progress=False, nothing_classifier=second)
    assert results["settings"]["nothing_classifier"] and results["settings"]["no_object_label"] is None
    circle = results["methods"]["saemnesia+replace"]["concepts"]["circle"]["heldout"]
    assert circle["nothing_rate"] == 100.0 and circle["ua"] == 100.0  # the scorer saw a star, never "nothing"
    records = [json.loads(line) for line in cache.read_text().splitlines()]
    assert {r["nothing"] for r in records if r["intervention"] != "ablate"} == {True}  # the ceiling's: not judged
    alone = evaluate(tiny_studio(), scorer, protocol, cache=cache, progress=False)
    assert alone["images"] == results["images"]  # another set of judges: every image made again
    assert alone["methods"]["saemnesia+replace"]["concepts"]["circle"]["heldout"]["nothing_rate"] is None


def test_edit_coverage_splits_the_heldout_images_as_the_benchmark_judged_them(quick_run, tmp_path):
    studio, classifier, _, results = quick_run
    coverage = edit_coverage(studio, classifier, results, grid=tmp_path / "survivors.png")
    assert list(coverage) == ["circle", "fish", "butterfly"]
    for concept, entry in coverage.items():
        heldout = results["methods"]["saemnesia"]["concepts"][concept]["heldout"]
        assert entry["images"] == 2 + 1  # its two styled cells and its unstyled one, at the one held-out seed
        # The same images the benchmark made: as many survivors as its held-out UA says.
        assert entry["survived"] == round((100 - heldout["ua"]) / 100 * entry["images"])
        assert 0 <= entry["confident_survivors"] <= entry["survived"]
        shares = [
            entry[f"{name}_{group}"]
            for name in ("edited_share", "first_step_edited_share")
            for group in ("survived", "erased")
        ]
        for value in (*shares, entry["probability_survivors"]):
            assert value is None or 0 <= value <= 1
        assert 0 < entry["probability_originals"] <= 1
        assert sum(entry["named_instead"].values()) == entry["images"] - entry["survived"]
        assert concept not in entry["named_instead"]
    survivors = sum(entry["survived"] for entry in coverage.values())
    with Image.open(tmp_path / "survivors.png") as grid:  # one row per survivor, original beside erased
        assert grid.height == max(1, survivors * 3 * TINY_WORLD.height)


def test_edit_coverage_of_replace_reads_the_replace_rows(quick_run):
    studio, classifier, _, results = quick_run
    coverage = edit_coverage(studio, classifier, results, intervention="replace")
    for concept, entry in coverage.items():
        heldout = results["methods"]["saemnesia+replace"]["concepts"][concept]["heldout"]
        assert entry["survived"] == round((100 - heldout["ua"]) / 100 * entry["images"])


def test_quick_mode_writes_json_table_and_plots_the_metrics_tab_shows(quick_run, tmp_path):
    _, _, _, results = quick_run
    paths = write_results(results, tmp_path / "results")
    assert paths == result_paths(tmp_path / "results", "quick")
    assert json.loads(paths["json"].read_text()) == json.loads(json.dumps(results))
    for name in ("strength_curves", "sequential"):
        with Image.open(paths[name]) as image:
            assert image.format == "PNG" and image.width > 400
    table = paths["table"].read_text()
    assert table == results_table(results)
    assert "| SAEmnesia | objects |" in table and "94.65 | 91.39 | 88.48 | 91.51" in table
    assert "| SAeUron | styles |" in table and "95.80 | 99.10 | 99.40" in table
    # the Metrics tab finds the set in the world's results and shows it with its plots
    world = dataclasses.replace(TINY_WORLD, assets=tmp_path)
    assert result_set_view(world, "quick") == (table, str(paths["strength_curves"]), str(paths["sequential"]))
    with pytest.raises(gr.Error, match="No result set 'fastest': the cached ones are quick"):
        result_set_view(world, "fastest")


def test_rerun_takes_every_image_from_the_cache(quick_run, monkeypatch):
    studio, classifier, folder, first = quick_run
    calls = []
    monkeypatch.setattr(Studio, "generate", lambda *args, **kwargs: calls.append(args))
    detector = tiny_artifact_detector()
    again = evaluate(
        studio, classifier, QUICK, cache=folder / "cache.jsonl", progress=False, artifact_detector=detector
    )
    assert calls == []
    assert again["images"] == {
        "planned": first["images"]["planned"],
        "generated": 0,
        "from_cache": first["images"]["planned"],
    }
    assert again["methods"] == first["methods"] and again["ceiling"] == first["ceiling"]
    assert again["search"] == first["search"] and again["chance"] == first["chance"]


def test_parts_side_by_side_then_one_run_give_the_same_results(quick_run, tmp_path):
    """Two parts share the concepts and the chance ceiling; the run after them makes only sequential erasure."""
    studio, classifier, _, first = quick_run
    cache, detector = tmp_path / "cache.jsonl", tiny_artifact_detector()
    parts = [
        evaluate(studio, classifier, QUICK, cache=cache, progress=False, artifact_detector=detector, part=(i, 2))
        for i in (1, 2)
    ]
    concepts = make_plan(studio.world, QUICK).concepts
    assert [part["concepts"] for part in parts] == [concepts[0::2], concepts[1::2]]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.part-1-of-2.jsonl", "cache.part-2-of-2.jsonl"]
    assert not make_plan(studio.world, QUICK, (2, 2)).chance and not make_plan(studio.world, QUICK, (1, 2)).sequential
    after = evaluate(studio, classifier, QUICK, cache=cache, progress=False, artifact_detector=detector)
    plan = make_plan(studio.world, QUICK)
    sequential = len(plan.sequential) * len(QUICK.sequential_seeds) * len(plan.grid) * len(QUICK.pipelines)
    # erasing the first object alone is its held-out image set, which a part already made
    assert 0 < after["images"]["generated"] < sequential and after["images"]["planned"] == first["images"]["planned"]
    assert after["methods"] == first["methods"] and after["chance"] == first["chance"]
    with pytest.raises(ValueError, match="part must be I/N"):
        make_plan(studio.world, QUICK, (3, 2))


def test_sequential_parts_after_the_concepts_parts_leave_the_last_run_nothing_to_make(quick_run, tmp_path):
    studio, classifier, _, first = quick_run
    cache, detector = tmp_path / "cache.jsonl", tiny_artifact_detector()
    run = functools.partial(
        evaluate, studio, classifier, QUICK, cache=cache, progress=False, artifact_detector=detector
    )
    for index in (1, 2):
        run(part=(index, 2))
    shares = [run(part=(index, 2), sequential=True) for index in (1, 2)]
    steps = [len(erased) for erased in make_plan(studio.world, QUICK).sequential]
    assert len(steps) > 1 and [share["sequential_steps"] for share in shares] == [steps[0::2], steps[1::2]]
    assert shares[1]["concepts"] == make_plan(studio.world, QUICK).concepts[: steps[1]]  # the objects its step erases
    # step 1 erases the first object alone, its held-out images: only step 2 has images of its own to write
    assert (tmp_path / "cache.part-sequential-2-of-2.jsonl").is_file()
    after = run()
    assert after["images"]["generated"] == 0
    assert after["methods"] == first["methods"] and after["chance"] == first["chance"]
    assert not make_plan(studio.world, QUICK, (2, 2), sequential=True).chance


def test_evaluate_command_refuses_sequential_without_a_part():
    with pytest.raises(SystemExit, match="give --part I/N too"):
        cli.main(["evaluate", "--quick", "--sequential", "--classifier", "x"])


def test_a_retrained_saemnesia_sae_remakes_only_saemnesia_images(quick_run, monkeypatch, tmp_path):
    studio, classifier, folder, first = quick_run
    shutil.copy(folder / "cache.jsonl", tmp_path / "cache.jsonl")
    key = ("saemnesia", "object")
    retrained = copy.deepcopy(studio.bundles[key].sae)
    with torch.no_grad():
        for parameter in retrained.parameters():
            parameter.add_(0.01)
    changed = Studio(
        studio.world, studio.pipeline, studio.bundles | {key: dataclasses.replace(studio.bundles[key], sae=retrained)}
    )
    methods, hooks = [], Studio.hooks
    monkeypatch.setattr(
        Studio,
        "hooks",
        lambda self, concepts, method, *a, **k: methods.append(method) or hooks(self, concepts, method, *a, **k),
    )
    detector = tiny_artifact_detector()
    again = evaluate(
        changed, classifier, QUICK, cache=tmp_path / "cache.jsonl", progress=False, artifact_detector=detector
    )
    assert set(methods) == {"saemnesia"}  # the untouched model's and SAeUron's verdicts all came from the cache
    assert again["methods"]["saeuron"] == first["methods"]["saeuron"] and again["ceiling"] == first["ceiling"]
    assert 0 < again["images"]["generated"] < again["images"]["planned"]
    assert again["settings"]["fingerprint"] != first["settings"]["fingerprint"]


def test_another_replace_rule_remakes_only_the_replaced_images(quick_run, monkeypatch, tmp_path):
    """The rule is part of a replaced image's key: a world that replaces otherwise never reads the old rule's
    verdicts, and keeps every steered one."""
    studio, classifier, folder, first = quick_run
    shutil.copy(folder / "cache.jsonl", tmp_path / "cache.jsonl")
    rule = ReplaceRule(source="mean", fallback="none")
    assert rule != studio.world.replace_rule
    changed = Studio(dataclasses.replace(studio.world, replace_rule=rule), studio.pipeline, studio.bundles)
    made, hooks = [], Studio.hooks

    def recording_hooks(self, concepts, method, strength, start_step, features, record, intervention, replace_rule):
        made.append((intervention, replace_rule))
        return hooks(self, concepts, method, strength, start_step, features, record, intervention, replace_rule)

    monkeypatch.setattr(Studio, "hooks", recording_hooks)
    again = evaluate(
        changed,
        classifier,
        QUICK,
        cache=tmp_path / "cache.jsonl",
        progress=False,
        artifact_detector=tiny_artifact_detector(),
    )
    assert made and set(made) == {("replace", rule)}
    assert again["methods"]["saemnesia"] == first["methods"]["saemnesia"] and again["ceiling"] == first["ceiling"]
    assert again["settings"]["replace_rule"] == dataclasses.asdict(rule) != first["settings"]["replace_rule"]
    records = [json.loads(line) for line in (tmp_path / "cache.jsonl").read_text().splitlines()]
    assert {r["intervention"] for r in records if "rule" in r} == {"replace"}
    assert any(r.get("rule") == dataclasses.asdict(rule) for r in records)


def test_a_later_start_step_reaches_every_edit_and_keeps_its_verdicts_apart(quick_run, monkeypatch, tmp_path):
    studio, classifier, folder, first = quick_run
    shutil.copy(folder / "cache.jsonl", tmp_path / "cache.jsonl")
    starts, hooks = [], Studio.hooks

    def recording_hooks(self, concepts, method, strength, start_step=0, *args, **kwargs):
        starts.append(start_step)
        return hooks(self, concepts, method, strength, start_step, *args, **kwargs)

    monkeypatch.setattr(Studio, "hooks", recording_hooks)
    later = evaluate(
        studio,
        classifier,
        dataclasses.replace(QUICK, start_step=1),
        cache=tmp_path / "cache.jsonl",
        artifact_detector=tiny_artifact_detector(),
    )
    assert starts and set(starts) == {1}  # no verdict of the step-0 run was taken for this one
    assert later["protocol"]["start_step"] == 1 and later["ceiling"] == first["ceiling"]
    assert 0 < later["images"]["generated"] < later["images"]["planned"]  # the untouched model's came from the cache
    with pytest.raises(ValueError, match="start_step must be below the world's 2 sampler steps"):
        evaluate(studio, classifier, dataclasses.replace(QUICK, start_step=2), cache=None)
    with pytest.raises(ValueError, match="start_step must be a whole number >= 0"):
        dataclasses.replace(QUICK, start_step=-1)


def test_evaluate_command_writes_results_from_a_warm_cache(quick_run, monkeypatch, tmp_path, capsys):
    """With no --out and no --cache, both follow the world: its results folder, and runs/<world>-eval-cache.jsonl."""
    _, _, folder, first = quick_run
    studio = tiny_studio()
    studio.world = dataclasses.replace(studio.world, assets=tmp_path / "world")
    monkeypatch.setattr(cli, "_load_studio", lambda args: studio)
    monkeypatch.setattr(classifier_module, "load_classifier", lambda folder, device: tiny_classifier())
    monkeypatch.setattr(ArtifactDetector, "load", lambda folder, device: tiny_artifact_detector())
    monkeypatch.setattr(Studio, "generate", lambda *args, **kwargs: pytest.fail("nothing to generate"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    shutil.copy(folder / "cache.jsonl", tmp_path / "runs" / f"{studio.world.name}-eval-cache.jsonl")
    cli.main(["evaluate", "--quick", "--classifier", "x", "--artifact-detector", "y"])
    written = json.loads(result_paths(tmp_path / "world" / "results", "quick")["json"].read_text())
    assert written["settings"]["fingerprint"] == first["settings"]["fingerprint"]
    assert written["methods"] == json.loads(json.dumps(first["methods"]))
    assert "| SAEmnesia | objects |" in capsys.readouterr().out


def protocols_evaluated(monkeypatch, judge=None) -> list:
    """Stub out the `evaluate` command's model, classifier and run; return the list its protocols go to."""
    seen = []
    monkeypatch.setattr(cli, "_load_studio", lambda args: tiny_studio())
    monkeypatch.setattr(classifier_module, "load_classifier", lambda folder, device: judge or tiny_classifier())
    monkeypatch.setattr(
        evaluate_module,
        "evaluate",
        lambda studio, classifier, protocol, cache, **judges: seen.append(protocol),
    )
    monkeypatch.setattr(evaluate_module, "write_results", lambda results, out: {})
    monkeypatch.setattr(evaluate_module, "results_table", lambda results: "")
    return seen


def test_evaluate_command_tunes_on_more_seeds_under_its_own_name(monkeypatch, tmp_path):
    seen = protocols_evaluated(monkeypatch)
    cli.main(["evaluate", "--quick", "--tuning-seeds", "2", "--out", str(tmp_path), "--classifier", "x"])
    assert seen[0].name == "quick-tuned-on-2-seeds" and seen[0].tuning_seeds == (50_000, 50_001)
    with pytest.raises(SystemExit, match="--tuning-seeds must be at least 1, got 0"):
        cli.main(["evaluate", "--quick", "--tuning-seeds", "0", "--out", str(tmp_path), "--classifier", "x"])


def test_evaluate_command_reports_on_other_seeds_or_tie_rule_under_its_own_name(monkeypatch, tmp_path, capsys):
    seen = protocols_evaluated(monkeypatch)
    cli.main(["evaluate", "--heldout-from", "70000", "--ties", "centre", "--out", str(tmp_path), "--classifier", "x"])
    assert seen[0].name == "full-heldout-from-70000-ties-to-centre" and seen[0].ties == "centre"
    assert (seen[0].heldout_seeds, seen[0].sequential_seeds, seen[0].tuning_seeds) == ((70_000,), (70_000,), (50_000,))
    cli.main(["evaluate", "--quick", "--ties", "mildest", "--out", str(tmp_path), "--classifier", "x"])
    assert seen[1].name == "quick" and seen[1].ties == "mildest"
    monkeypatch.setattr(cli, "_load_studio", lambda args: pytest.fail("a refused command must load nothing"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["evaluate", "--heldout-from", "50000", "--out", str(tmp_path), "--classifier", "x"])
    assert exit_info.value.code == 2 and "seeds must differ" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--heldout-from must be a seed >= 0, got -1"):
        cli.main(["evaluate", "--heldout-from", "-1", "--out", str(tmp_path), "--classifier", "x"])


def test_evaluate_command_reports_on_held_out_templates_under_its_own_name(monkeypatch, tmp_path):
    seen = protocols_evaluated(monkeypatch)
    command = ["evaluate", "--quick", "--held-out-templates", "--out", str(tmp_path), "--classifier", "x"]
    cli.main(command)
    assert seen[0].name == "quick-held-out-templates"
    assert seen[0].grid_templates == MINICANVAS.canvas.held_out_templates
    world = dataclasses.replace(MINICANVAS, assets=None)
    cells = make_plan(world, seen[0]).grid
    assert {spec.text for spec in cells} >= {
        "a circle image in sunset style.",
        "a painting of a circle with ocean style",
    }
    assert not any(spec.style and spec.text == world.prompt(spec.object, spec.style) for spec in cells)
    assert result_set_label("quick-held-out-templates") == (
        "quick-held-out-templates: reported on prompts in templates the model never saw"
    )
    monkeypatch.setitem(WORLDS, "minicanvas", dataclasses.replace(MINICANVAS, canvas=CANVAS_32))
    with pytest.raises(SystemExit, match="World 'minicanvas' has no held-out templates"):
        cli.main(command)


def test_evaluate_command_erases_at_extra_blocks_under_its_own_name(monkeypatch, tmp_path):
    loaded, seen = [], []
    monkeypatch.setattr(Studio, "load", lambda world, **kwargs: loaded.append(kwargs["extra_blocks"]) or tiny_studio())
    monkeypatch.setattr(classifier_module, "load_classifier", lambda folder, device: tiny_classifier())
    monkeypatch.setattr(
        evaluate_module,
        "evaluate",
        lambda studio, classifier, protocol, cache, **judges: seen.append(protocol),
    )
    monkeypatch.setattr(evaluate_module, "write_results", lambda results, out: {})
    monkeypatch.setattr(evaluate_module, "results_table", lambda results: "")
    extra = ["--extra-object-block", "mid_block.attentions.0", "--extra-object-block", "up_blocks.0.attentions.1"]
    cli.main(["evaluate", "--quick", *extra, "--out", str(tmp_path), "--classifier", "x"])
    assert loaded == [{"object": ["mid_block.attentions.0", "up_blocks.0.attentions.1"]}]
    assert seen[0].name == "quick-plus-mid_block.attentions.0-up_blocks.0.attentions.1"


def test_evaluate_command_names_results_of_a_classifier_with_a_no_object_class_apart(monkeypatch, tmp_path):
    judge = tiny_classifier()
    judge.config = dataclasses.replace(judge.config, objects=(*judge.config.objects, NO_OBJECT))
    seen = protocols_evaluated(monkeypatch, judge)
    cli.main(["evaluate", "--protocol", "standard", "--out", str(tmp_path), "--classifier", "x"])
    assert seen[0].name == "standard-no-object-class"


def test_result_sets_list_the_benchmark_first_then_its_variants(tmp_path):
    world = dataclasses.replace(TINY_WORLD, assets=tmp_path)
    assert result_sets(world) == {} and benchmark_results(world) is None
    names = ["standard-no-object-class", "quick", "full", "standard"]
    for name in names:
        path = result_paths(tmp_path / "results", name)["json"]
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"protocol": {"name": name}}))
    (tmp_path / "results" / "evaluation.json.tmp").write_text("{")  # a write in progress is no result set
    sets = result_sets(world)
    assert list(sets) == ["full", "standard", "quick", "standard-no-object-class"]
    assert all(sets[name] == result_paths(tmp_path / "results", name)["json"] for name in names)
    assert benchmark_results(world) == {"protocol": {"name": "full"}}


def test_edit_coverage_command_takes_the_tuned_settings_of_a_given_result_set(monkeypatch, tmp_path, capsys):
    evaluation = tmp_path / "evaluation-standard-no-object-class.json"
    evaluation.write_text(json.dumps({"methods": {"saemnesia": {"concepts": {}}}}))
    seen = []
    monkeypatch.setattr(cli, "_load_studio", lambda args: tiny_studio())
    monkeypatch.setattr(classifier_module, "load_classifier", lambda folder, device: tiny_classifier())
    monkeypatch.setattr(evaluate_module, "edit_coverage", lambda studio, judge, results, *rest: seen.append(results))
    cli.main(["edit-coverage", "--evaluation", str(evaluation), "--classifier", "x"])
    assert seen == [json.loads(evaluation.read_text())]
    monkeypatch.setattr(cli, "_load_studio", lambda args: pytest.fail("a refused command must load nothing"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["edit-coverage", "--evaluation", str(tmp_path / "missing.json")])
    assert exit_info.value.code == 2 and "run `evaluate` or drop --evaluation" in capsys.readouterr().err


def test_evaluate_command_defaults():
    args = build_parser().parse_args(["evaluate", "--quick"])
    assert (args.world, args.quick, args.out, args.cache) == ("minicanvas", True, None, None)


def test_ablate_blocks_removes_the_prompt_at_one_block_and_leaves_the_model_clean(monkeypatch):
    studio, classifier = tiny_studio(), tiny_classifier()
    seen, classify = [], diagnostics.classify

    def recording_classify(model, images):
        seen.append(np.stack([np.asarray(image) for image in images]))
        return classify(model, images)

    monkeypatch.setattr(diagnostics, "classify", recording_classify)
    blocks = ["up_blocks.1.attentions.0", "up_blocks.1.attentions.1"]
    report = ablate_blocks(studio, classifier, blocks, styles_per_object=2, seed=3)
    monkeypatch.undo()

    assert list(report) == ["none", *blocks]
    assert all(0 <= value <= 100 for row in report.values() for value in row.values())
    prompts = [
        TINY_WORLD.prompt(obj, style, TINY_WORLD.templates[0])
        for obj in TINY_WORLD.objects
        for style in TINY_WORLD.styles
    ]
    plain = studio.generate(prompts, [], seed=3, include_originals=False).erased
    np.testing.assert_array_equal(seen[0], np.stack([np.asarray(image) for image in plain]))
    assert all(not np.array_equal(seen[0], ablated) for ablated in seen[1:])
    with pytest.raises(ValueError, match="guidance > 1"):
        ablate_blocks(Studio(dataclasses.replace(TINY_WORLD, guidance=1.0), studio.pipeline), classifier, blocks)


def test_chance_ceiling_ablates_every_block_but_the_style_block_at_once(monkeypatch):
    studio, classifier = tiny_studio(), tiny_classifier()
    hooked, hooked_block = [], diagnostics.hooked_block
    monkeypatch.setattr(
        diagnostics, "hooked_block", lambda unet, block, edit: hooked.append(block) or hooked_block(unet, block, edit)
    )
    seen = Verdict("circle", 1.0, "ocean", 1.0, None, None)  # whatever the picture, the classifier says circle
    monkeypatch.setattr(diagnostics, "classify", lambda model, images: [seen] * len(images))
    specs = [spec for spec in grid_prompts(TINY_WORLD) if spec.object in ("circle", "fish")]
    report = chance_ceiling(studio, classifier, specs, seeds=[1, 2])
    # Every cross-attention block of the tiny UNet but the style block, up_blocks.1.attentions.1.
    blocks = ["down_blocks.1.attentions.0", "up_blocks.0.attentions.0", "up_blocks.0.attentions.1"]
    blocks += ["up_blocks.1.attentions.0", "mid_block.attentions.0"]
    assert hooked == blocks * 2  # together, once a seed
    assert report == {
        "blocks": blocks,
        "survival": 50.0,
        "per_object": {"circle": 100.0, "fish": 0.0},
        "ua_ceiling": 50.0,
        "images": 2 * 6,
    }
    with pytest.raises(ValueError, match="guidance > 1"):
        chance_ceiling(Studio(dataclasses.replace(TINY_WORLD, guidance=1.0), studio.pipeline), classifier, specs, [1])


def test_tuned_setting_joins_the_concepts_settings_as_sequential_erasure_does():
    def chosen(strength, features=1):
        return {"chosen": {"strength": strength, "features_per_step": features}}

    results = {
        "methods": {
            "saemnesia": {"concepts": {"circle": chosen(-0.1), "star": chosen(-10.0), "neon": chosen(-3.0)}},
            "saeuron": {"concepts": {"circle": chosen(-30.0, 3), "star": chosen(-1.0, 1)}},
        }
    }
    assert tuned_setting(results, "saemnesia", ["circle", "star", "neon"]) == Setting("saemnesia", -3.0, 1)
    assert tuned_setting(results, "saeuron", ["circle", "star", "unseen"]) == Setting("saeuron", -30.0, 1)
    assert tuned_setting(results, "saeuron", ["neon"]) is None and tuned_setting({}, "saemnesia", ["star"]) is None


def test_generate_defaults_to_the_benchmarks_tuned_strength(monkeypatch, tmp_path):
    studio = tiny_studio()
    monkeypatch.setattr(cli, "_load_studio", lambda args: studio)

    def generate_settings(*extra: str) -> dict:
        out = tmp_path / "out"
        command = ["generate", "--prompt=a fish in ocean style", "--erase=fish", "--steps=1", f"--out={out}"]
        cli.main([*command, *extra])
        return json.loads((out / "settings.json").read_text())["erasures"][0]

    assert generate_settings()["intervention"] == "replace"  # the default: no strength to tune
    assert generate_settings("--intervention=steer")["strength"] == DEFAULT_STRENGTH  # a world without results
    studio.world = dataclasses.replace(studio.world, assets=tmp_path / "assets")
    tuned = {"chosen": {"strength": -0.3, "features_per_step": 1}}
    results = {"methods": {"saemnesia": {"concepts": {"fish": tuned}}}}
    quick_results = result_paths(tmp_path / "assets" / "results", "quick")["json"]
    quick_results.parent.mkdir(parents=True)
    quick_results.write_text(json.dumps(results))
    assert generate_settings("--intervention=steer")["strength"] == -0.3
    assert generate_settings("--intervention=steer", "--strength=-2")["strength"] == -2.0


def test_compare_replacements_measures_each_rule_with_its_artifact_rate(tmp_path):
    """The rules' table on a tiny world: every metric for every rule, AR from the detector, and without one
    a table that says AR was not measured instead of inventing it."""
    studio, classifier, detector = tiny_studio(), tiny_classifier(), tiny_artifact_detector()
    quick = dataclasses.replace(QUICK, tuning_concept_prompts=2, tuning_other_prompts=2)
    names = ("nearest (PER as written)", "sticky + fallback, whole map once a fifth is detected")
    rules = {name: RULES[name] for name in names}
    measured = compare_replace_rules(studio, classifier, rules, protocol=quick, artifact_detector=detector)
    assert list(measured["rules"]) == list(rules)
    for row in measured["rules"].values():
        for key in (*RULE_METRICS, *DETECTION_SHARES):
            assert row[key] is not None and 0 <= row[key] <= 100, key
    unjudged = compare_replace_rules(studio, classifier, rules, protocol=quick)
    assert all(row["ar"] is None for row in unjudged["rules"].values())
    paths = write_comparison(unjudged, tmp_path)
    table = paths["table"].read_text()
    assert "| AR |" in table and table.count("| - | - |") == len(rules)
    assert RULES[names[1]] == studio.world.replace_rule
    assert f"| {names[1]} (the world's rule) |" in table and table.count("(the world's rule)") == 1
