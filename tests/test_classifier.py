"""The MiniCanvas classifier: training, checkpoints, verdicts, the CLI and world quality, on tiny runs."""

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import MINICANVAS_32
from PIL import Image
from safetensors.torch import load_file, save_file

from saemnesia import worlds
from saemnesia.cli import main
from saemnesia.minicanvas.classifier import (
    NO_OBJECT,
    ClassifierConfig,
    ClassifierLoadError,
    MiniCanvasClassifier,
    _training_batch,
    augment,
    classify,
    load_classifier,
    train_classifier,
    world_quality,
)
from saemnesia.minicanvas.data import CANVAS_32 as canvas


@pytest.fixture(scope="module")
def trained_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("classifier")
    train_classifier(folder, steps=3, batch_size=8, seed=0, eval_images=20)
    return folder


def drawn_images() -> list[Image.Image]:
    return [
        canvas.draw_pil("star", "neon", 1),
        canvas.draw_pil("house", "ocean", 2),
        canvas.draw_pil("tree", "polka", 3),
    ]


def test_short_training_writes_a_loadable_checkpoint_and_metrics(trained_folder):
    assert sorted(p.name for p in trained_folder.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    metrics = json.loads((trained_folder / "metrics.json").read_text())
    for key in ("object_accuracy", "style_accuracy", "noisy_object_accuracy", "augmented_style_accuracy"):
        assert 0 <= metrics[key] <= 1
    assert metrics["eval_images"] == 20 and metrics["steps"] == 3
    assert metrics["command"].startswith("python -m saemnesia train-classifier")
    assert "no GPU" in metrics["machine"]

    verdicts = classify(load_classifier(trained_folder), drawn_images())
    assert len(verdicts) == 3
    for verdict in verdicts:
        assert verdict.object in canvas.objects and verdict.style in canvas.styles
        assert verdict.object_probs.shape == (10,) and verdict.style_probs.shape == (10,)
        assert verdict.object_prob == pytest.approx(verdict.object_probs.max().item())
        assert verdict.style_probs.sum().item() == pytest.approx(1, abs=1e-5)


def test_training_is_deterministic_from_seed(tmp_path):
    train_classifier(tmp_path / "a", steps=2, batch_size=4, seed=3, eval_images=10)
    train_classifier(tmp_path / "b", steps=2, batch_size=4, seed=3, eval_images=10)
    first, second = load_file(tmp_path / "a" / "model.safetensors"), load_file(tmp_path / "b" / "model.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)


def test_a_bare_background_is_the_style_without_its_object():
    bare, drawn = canvas.draw(None, "pastel", 4), canvas.draw("circle", "pastel", 4)
    assert np.array_equal(bare, canvas.draw(None, "pastel", 4))
    # Pastel paints one flat colour behind a filled object: with no object the canvas is that colour alone.
    assert bare.std(axis=(0, 1)).max() < 1e-4 and drawn.std(axis=(0, 1)).max() > 0.1


def test_training_batches_hold_bare_backgrounds_only_when_asked():
    images, object_ids, _ = _training_batch(canvas, 64, seed=5)
    assert int(object_ids.max()) < len(canvas.objects)
    again, with_none, _ = _training_batch(canvas, 64, seed=5, no_object_share=0.5)
    bare = with_none == len(canvas.objects)
    assert 0 < int(bare.sum()) < 64
    assert not torch.equal(images, again)


def test_a_no_object_class_is_an_eleventh_label_that_round_trips(tmp_path):
    metrics = train_classifier(tmp_path, steps=2, batch_size=8, seed=0, eval_images=22, no_object_share=0.1)
    classifier = load_classifier(tmp_path)
    assert classifier.config.objects == (*canvas.objects, NO_OBJECT) and metrics["objects"][-1] == NO_OBJECT
    assert metrics["command"].endswith("--no-object-share 0.1")
    assert classify(classifier, [canvas.draw_pil(None, "neon", 0)])[0].object_probs.shape == (11,)
    with pytest.raises(ValueError, match=r"no_object_share must be in \[0, 1\), got 1"):
        train_classifier(tmp_path, steps=1, no_object_share=1)


def test_save_load_round_trip_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    classifier = MiniCanvasClassifier(ClassifierConfig(channels=(4, 8, 8))).eval()
    classifier.save(tmp_path / "clf")
    loaded = load_classifier(tmp_path / "clf")
    images = torch.rand(5, 3, 32, 32)
    assert loaded.config == classifier.config
    assert torch.equal(loaded(images).object_logits, classifier(images).object_logits)
    assert torch.equal(loaded(images).style_logits, classifier(images).style_logits)


def test_classify_takes_pil_of_any_size_and_tensors_alike(trained_folder):
    classifier = load_classifier(trained_folder)
    small = drawn_images()
    large = [image.resize((128, 128), Image.NEAREST) for image in small]
    for a, b in zip(classify(classifier, small), classify(classifier, large)):
        assert torch.allclose(a.object_probs, b.object_probs) and torch.allclose(a.style_probs, b.style_probs)
    tensor = torch.stack([torch.from_numpy(np.asarray(image, np.float32) / 255).permute(2, 0, 1) for image in small])
    for a, b in zip(classify(classifier, small), classify(classifier, tensor)):
        assert torch.allclose(a.object_probs, b.object_probs, atol=1e-6)
        assert torch.allclose(a.style_probs, b.style_probs, atol=1e-6)


def test_augment_is_deterministic_and_stays_in_range():
    images = torch.rand(6, 3, 32, 32)
    first = augment(images, torch.Generator().manual_seed(0))
    assert first.shape == images.shape and first.min() >= 0 and first.max() <= 1
    assert torch.equal(first, augment(images, torch.Generator().manual_seed(0)))
    assert not torch.equal(first, images)


def _break_weights(folder, change):
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda folder: (folder / "model.safetensors").unlink(), "No model.safetensors"),
        (lambda folder: (folder / "config.json").unlink(), "No config.json"),
        (lambda folder: (folder / "model.safetensors").write_bytes(b"not safetensors"), "not a readable safetensors"),
        (lambda folder: (folder / "config.json").write_text("{"), "not valid JSON"),
        (lambda folder: (folder / "config.json").write_text('{"objects": []}'), "non-empty list"),
        (lambda folder: _break_weights(folder, lambda t: t.pop("style_head.bias")), "missing tensors"),
        (lambda folder: _break_weights(folder, lambda t: t.update(extra=torch.zeros(1))), "unexpected tensors"),
        (
            lambda folder: _break_weights(folder, lambda t: t.update({"object_head.bias": torch.zeros(3)})),
            "different classifiers",
        ),
    ],
)
def test_corrupt_or_missing_checkpoint_is_refused_with_reason(tmp_path, damage, message):
    MiniCanvasClassifier(ClassifierConfig(channels=(4, 8, 8))).save(tmp_path / "clf")
    damage(tmp_path / "clf")
    with pytest.raises(ClassifierLoadError, match=message):
        load_classifier(tmp_path / "clf")


def test_missing_folder_names_the_training_command(tmp_path):
    with pytest.raises(ClassifierLoadError, match="train-classifier"):
        load_classifier(tmp_path / "nowhere")


def test_classify_command_prints_one_json_line_per_image(tmp_path, trained_folder, capsys):
    paths = [tmp_path / "star.png", tmp_path / "big.png"]
    canvas.draw_pil("star", "neon", 0).save(paths[0])
    canvas.draw_pil("moon", "sketch", 0).resize((64, 64)).save(paths[1])
    main(["classify", str(paths[0]), str(paths[1]), "--classifier", str(trained_folder)])
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    for path, line in zip(paths, lines):
        verdict = json.loads(line)
        assert verdict["path"] == str(path)
        assert verdict["object"] in canvas.objects and verdict["style"] in canvas.styles
        assert 0 < verdict["object_prob"] <= 1 and 0 < verdict["style_prob"] <= 1


@pytest.mark.parametrize("write, message", [(None, "does not exist"), (b"not an image", "Cannot read")])
def test_classify_command_refuses_missing_or_unreadable_images(tmp_path, trained_folder, capsys, write, message):
    path = tmp_path / "image.png"
    if write is not None:
        path.write_bytes(write)
    with pytest.raises(SystemExit) as exit_info:
        main(["classify", str(path), "--classifier", str(trained_folder)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert message in error and str(path) in error


def tiny_world(**changes):
    """MiniCanvas cut to 2 objects x 2 styles and 2 sampling steps."""
    return dataclasses.replace(
        MINICANVAS_32, **{"objects": ("star", "circle"), "styles": ("neon", "sketch"), "steps": 2, **changes}
    )


def test_world_quality_scores_every_pair_and_saves_a_grid(tmp_path, tiny_pipeline, trained_folder):
    grid = tmp_path / "samples.png"
    quality = world_quality(tiny_pipeline, load_classifier(trained_folder), tiny_world(), seeds=(0, 1), grid=grid)
    assert quality["images"] == 8 and quality["steps"] == 2 and quality["seeds"] == [0, 1]
    for key in ("object_accuracy", "style_accuracy", "both_accuracy"):
        assert 0 <= quality[key] <= 1
    assert set(quality["per_object"]) == {"star", "circle"} and set(quality["per_style"]) == {"neon", "sketch"}
    assert all(0 <= value <= 1 for value in [*quality["per_object"].values(), *quality["per_style"].values()])
    assert quality["object_accuracy"] == pytest.approx(sum(quality["per_object"].values()) / 2)
    with Image.open(grid) as sheet:
        assert sheet.size == (2 * 32 * 4, 2 * 32 * 4)


def test_world_quality_refuses_concepts_the_classifier_does_not_know(tiny_pipeline, trained_folder):
    with pytest.raises(ValueError, match="dragon"):
        world_quality(tiny_pipeline, load_classifier(trained_folder), tiny_world(objects=("dragon",)), seeds=(0,))


def test_world_quality_command_runs_on_a_saved_tiny_model(tmp_path, tiny_pipeline, trained_folder, capsys, monkeypatch):
    monkeypatch.setitem(worlds.WORLDS, "minicanvas", MINICANVAS_32)  # the tiny classifier knows the first world's
    tiny_pipeline.save_pretrained(tmp_path / "model")
    out, grid = tmp_path / "quality.json", tmp_path / "samples.png"
    main(
        ["world-quality", "--model", str(tmp_path / "model"), "--classifier", str(trained_folder)]
        + ["--seeds", "0", "--steps", "1", "--out", str(out), "--grid", str(grid)]
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    quality = json.loads(out.read_text())
    assert quality["images"] == 100 and summary["object_accuracy"] == quality["object_accuracy"]
    assert set(quality["per_style"]) == set(canvas.styles)
    with Image.open(grid) as sheet:
        assert sheet.size == (10 * 32 * 4, 10 * 32 * 4)
