"""MiniCanvas: its drawings, told apart by its classifier, and the design's measured cost."""

import json

import numpy as np
import pytest
import torch

from saemnesia.minicanvas.classifier import classify, load_classifier
from saemnesia.minicanvas.data import CANVAS, CANVAS_32
from saemnesia.minicanvas.model import Design, build_tokenizer, step_seconds
from saemnesia.worlds import MINICANVAS

TINY_DESIGN = Design(
    CANVAS_32, (16, 32), ("DownBlock2D", "CrossAttnDownBlock2D"), ("CrossAttnUpBlock2D", "UpBlock2D"), train_steps=3
)


def test_step_seconds_measures_a_design_and_names_its_grids():
    cost = step_seconds(TINY_DESIGN, batch_size=2, repeats=1)
    assert cost["train_step_s"] > 0 and cost["guided_call_of_4_s"] > 0
    assert cost["up_block_grids"] == {"up_blocks.0.attentions.0": 8, "up_blocks.0.attentions.1": 8}


def test_every_object_and_style_of_the_64_pixel_canvas_is_told_apart_by_its_classifier():
    """Fresh drawings (seeds no training drew), every object in every style: each object and each style named
    right at least 95% of the time."""
    classifier = load_classifier(MINICANVAS.assets / "classifier")
    cells = [(o, s, seed) for o in CANVAS.objects for s in CANVAS.styles for seed in (2**31 - 1, 2**31 - 2)]
    verdicts = classify(classifier, [CANVAS.draw_pil(o, s, seed) for o, s, seed in cells])
    for name, position in [(o, 0) for o in CANVAS.objects] + [(s, 1) for s in CANVAS.styles]:
        hits = [
            (v.object if position == 0 else v.style) == name
            for v, cell in zip(verdicts, cells)
            if cell[position] == name
        ]
        assert np.mean(hits) >= 0.95, (name, np.mean(hits))


def test_the_canvases_draw_at_their_size_and_hold_out_two_templates():
    assert CANVAS.draw("jellyfish", "zebra", 0).shape == (64, 64, 3)
    assert CANVAS_32.draw("star", "neon", 0).shape == (32, 32, 3)
    assert len(CANVAS.objects) == 20 and not set(CANVAS.templates) & set(CANVAS.held_out_templates)
    tokenizer = build_tokenizer(CANVAS)
    for template in CANVAS.held_out_templates:  # every word one token: none falls back to byte pieces
        words = template.format(object="jellyfish", style="zebra").replace(".", " .").split()
        assert len(tokenizer.tokenize(" ".join(words))) == len(words), template
    with pytest.raises(KeyError):
        CANVAS.draw("unicorn", "neon", 0)


def test_training_draws_the_same_batches_with_workers_and_resumes_from_weights_alone(tmp_path):
    from safetensors.torch import load_file

    from saemnesia.minicanvas.model import train_model

    def trained(name: str, **options) -> dict:
        train_model(tmp_path / name / "model", tmp_path / name / "state", batch_size=2, design=TINY_DESIGN, **options)
        return load_file(tmp_path / name / "state" / "unet.safetensors")

    alone, drawn_ahead = trained("alone", checkpoint_every=1), trained("workers", workers=2)
    assert all(torch.equal(alone[name], drawn_ahead[name]) for name in alone)
    (tmp_path / "alone" / "state" / "optimizer.safetensors").unlink()  # what a commit of the weights keeps
    train_model(tmp_path / "alone" / "model", tmp_path / "alone" / "state", steps=4, batch_size=2, design=TINY_DESIGN)
    assert json.loads((tmp_path / "alone" / "state" / "state.json").read_text())["step"] == 4
    assert not torch.equal(
        load_file(tmp_path / "alone" / "state" / "unet.safetensors")["conv_in.weight"], alone["conv_in.weight"]
    )
