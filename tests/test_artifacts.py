"""The artifact detector: checkpoints, corruptions, training, the shipped weights and the CLI, on tiny runs."""

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import MINICANVAS_32
from PIL import Image

from saemnesia.cli import main
from saemnesia.minicanvas import artifacts
from saemnesia.minicanvas.artifacts import (
    ARTIFACT_THRESHOLD,
    ArtifactDetector,
    ArtifactDetectorConfig,
    ArtifactDetectorLoadError,
    artifact_probabilities,
    artifact_rate,
    rate_summary,
    tensor_to_pil,
    train_detector,
    untouched_generations,
)
from saemnesia.minicanvas.corruptions import CORRUPTIONS, MIN_CHANGE, colour_noise, corrupt
from saemnesia.minicanvas.data import CANVAS_32 as canvas
from saemnesia.worlds import MINICANVAS

SHIPPED = MINICANVAS.assets / "artifact-detector"
TINY = ArtifactDetectorConfig(channels=(4, 8, 8))


def tiny_detector(seed: int = 0) -> ArtifactDetector:
    torch.manual_seed(seed)
    return ArtifactDetector(TINY).eval()


def drawing(object_name: str | None = "star", style: str = "sunset", seed: int = 1) -> torch.Tensor:
    return torch.from_numpy(canvas.draw(object_name, style, seed)).permute(2, 0, 1)


def clean_drawings() -> list[Image.Image]:
    """One drawing of every object and every style (the ten pairs on the diagonal), plus bare backgrounds."""
    pairs = [(canvas.objects[i], canvas.styles[i]) for i in range(10)] + [(None, "mosaic"), (None, "zebra")]
    return [canvas.draw_pil(object_name, style, 7 + index) for index, (object_name, style) in enumerate(pairs)]


def test_save_and_load_round_trip(tmp_path):
    detector = tiny_detector()
    detector.save(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text()) == {"channels": [4, 8, 8], "image_size": 32}
    loaded = ArtifactDetector.load(tmp_path)
    assert loaded.config == TINY and not loaded.training
    images = torch.rand(3, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(loaded(images), detector(images))


def test_wrong_or_corrupt_checkpoints_are_refused_with_the_fix(tmp_path):
    with pytest.raises(ArtifactDetectorLoadError, match="does not exist.*train-artifact-detector"):
        ArtifactDetector.load(tmp_path / "missing")
    tiny_detector().save(tmp_path)

    (tmp_path / "model.safetensors").write_bytes(b"these bytes are not a safetensors file")
    with pytest.raises(ArtifactDetectorLoadError, match="not a readable safetensors file"):
        ArtifactDetector.load(tmp_path)

    tiny_detector().save(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"channels": [4, 8, 16]}))
    with pytest.raises(ArtifactDetectorLoadError, match="different detectors"):
        ArtifactDetector.load(tmp_path)

    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ArtifactDetectorLoadError, match="not valid JSON"):
        ArtifactDetector.load(tmp_path)

    (tmp_path / "config.json").write_text(json.dumps({"channels": [4, 8]}))
    with pytest.raises(ArtifactDetectorLoadError, match="three positive integers"):
        ArtifactDetector.load(tmp_path)


def test_a_classifier_checkpoint_is_not_taken_for_a_detector():
    with pytest.raises(ArtifactDetectorLoadError, match="not an artifact detector"):
        ArtifactDetector.load(MINICANVAS.assets / "classifier")


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_every_corruption_changes_a_drawing(name):
    image = drawing("house", "checker")
    for seed in range(5):
        corrupted = CORRUPTIONS[name](image, torch.Generator().manual_seed(seed))
        assert corrupted.shape == image.shape
        assert 0 <= corrupted.min() and corrupted.max() <= 1
        assert (corrupted - image).abs().mean() > MIN_CHANGE


def test_corrupt_keeps_named_corruptions_and_replaces_invisible_ones():
    images = torch.stack([drawing("star", "sunset"), drawing("moon", "zebra"), drawing(None, "pastel")])
    names = ["smear", "stripes", "patch_shuffle"]
    corrupted = corrupt(images, torch.Generator().manual_seed(0), names)
    # A plain background's shuffled patches look the same, so that image gets colour noise instead.
    assert corrupted.names == ["smear", "stripes", "colour_noise"]
    assert ((corrupted.images - images).abs().mean(dim=(1, 2, 3)) >= MIN_CHANGE).all()
    with pytest.raises(ValueError, match="Unknown corruptions"):
        corrupt(images[:1], torch.Generator(), ["jpeg"])


def test_a_tiny_detector_learns_to_tell_flat_images_from_noisy_ones():
    def hand_made(count: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        colours = torch.rand(count, 3, 1, 1, generator=generator)
        ramp = torch.linspace(0, 1, 32).view(1, 1, 1, 32) * torch.rand(count, 3, 1, 1, generator=generator)
        clean = (0.7 * colours + 0.3 * ramp).expand(count, 3, 32, 32).clone()
        clean[1::2] = torch.stack([colour_noise(image, generator) for image in clean[1::2]])
        return clean, (torch.arange(count) % 2).float()

    detector = tiny_detector()
    train_detector(detector, lambda step: hand_made(32, torch.Generator().manual_seed(step)), steps=60, log_every=100)
    images, labels = hand_made(40, torch.Generator().manual_seed(10_000))
    called = torch.tensor(artifact_probabilities(detector, images)) >= ARTIFACT_THRESHOLD
    assert (called == labels.bool()).float().mean() >= 0.95


def test_shipped_detector_calls_noise_artifacts_and_drawings_clean():
    detector = ArtifactDetector.load(SHIPPED)
    generator = torch.Generator().manual_seed(0)
    noisy = [tensor_to_pil(torch.rand(3, 32, 32, generator=generator)) for _ in range(4)]
    noisy += [tensor_to_pil((torch.rand(3, 32, 32, generator=generator) < 0.5).float()) for _ in range(4)]
    noisy += [
        tensor_to_pil((drawing("heart", "pastel") + 0.6 * torch.randn(3, 32, 32, generator=generator)).clamp(0, 1))
    ]
    assert artifact_rate(detector, noisy) == 100
    assert artifact_rate(detector, clean_drawings()) == 0
    assert all(0 <= p <= 1 for p in artifact_probabilities(detector, noisy + clean_drawings()))
    with pytest.raises(ValueError, match="at least one image"):
        artifact_rate(detector, [])


def test_shipped_metrics_meet_the_targets():
    metrics = json.loads((SHIPPED / "metrics.json").read_text())
    assert metrics["clean_called_clean"] >= 0.95
    assert metrics["corrupted_called_artifact"] >= 0.95
    assert metrics["untouched_floor"]["rate"] <= 10
    assert metrics["untouched_floor"]["seeds"] == list(artifacts.FLOOR_SEEDS)


def test_rate_summary_counts_images_at_the_threshold():
    labels = ["star/neon/90000", "star/ocean/90000", "heart/neon/90000", "heart/ocean/90000"]
    summary = rate_summary([0.9, 0.1, ARTIFACT_THRESHOLD, 0.2], labels)
    assert summary["rate"] == 50 and summary["images"] == 4
    assert summary["per_style"] == {"neon": 100, "ocean": 0}
    assert summary["per_object"] == {"star": 50, "heart": 50}
    assert summary["called_artifact"] == ["star/neon/90000 (0.90)", "heart/neon/90000 (0.50)"]


def fake_studio(calls: list) -> SimpleNamespace:
    """A studio whose model draws each prompt's object in its style: enough for the code around generation."""

    def generate(prompts, hooks, seed, include_originals=True):
        calls.append((prompts, hooks, seed, include_originals))
        images = []
        for prompt in prompts:
            object_name = next(name for name in canvas.objects if name in prompt)
            style = next(name for name in canvas.styles if name in prompt)
            images.append(canvas.draw_pil(object_name, style, seed))
        return SimpleNamespace(erased=images)

    return SimpleNamespace(world=MINICANVAS_32, generate=generate)


def test_untouched_generations_cover_every_pair_at_every_seed():
    calls = []
    images, labels = untouched_generations(fake_studio(calls), [90_000, 90_001], cycle_templates=True)
    assert len(images) == len(labels) == 200
    assert labels[0] == "circle/sunset/90000" and labels[-1] == "arrow/mosaic/90001"
    assert [call[2] for call in calls] == [90_000, 90_001]
    assert all(call[1] == [] and call[3] is False for call in calls)
    assert calls[0][0][0] == "a circle in sunset style" and calls[1][0][0] == "sunset picture of a circle"


def test_train_command_writes_a_checkpoint_and_metrics(tmp_path):
    out = tmp_path / "detector"
    command = ["train-artifact-detector", "--out", str(out), "--steps", "2", "--batch-size", "8", "--eval-images", "10"]
    main(command + ["--drawings", "20", "--generated-seeds", "0", "--floor-seeds"])
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "metrics.json", "model.safetensors"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["clean_called_clean"] <= 1 and metrics["eval_images"] == 10
    assert set(metrics["corrupted_called_artifact_by_corruption"]) == set(CORRUPTIONS)
    assert "untouched_floor" not in metrics and metrics["train_generation_seeds"] == []
    assert metrics["train_drawings"] == 20
    assert metrics["command"].startswith("python -m saemnesia train-artifact-detector")
    ArtifactDetector.load(out)


def test_grid_command_prints_the_floor_and_writes_the_grid(tmp_path, monkeypatch, capsys):
    from saemnesia.studio import Studio

    calls = []
    monkeypatch.setattr(Studio, "load", classmethod(lambda cls, world, device=None, model=None: fake_studio(calls)))
    noise = tmp_path / "noise.png"
    tensor_to_pil(torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(0))).resize((64, 64)).save(noise)
    grid = tmp_path / "grid.png"
    main(["artifact-grid", str(noise), "--out", str(grid), "--seeds", "90000", "--drawings", "10", "--device", "cpu"])
    lines = capsys.readouterr().out.strip().split("\n", 1)
    assert json.loads(lines[0])["path"] == str(noise) and json.loads(lines[0])["artifact_probability"] >= 0.5
    report = json.loads(lines[1])
    assert report["untouched_floor"]["images"] == 100 and report["untouched_floor"]["seeds"] == [90_000]
    assert report["grid"] == str(grid)
    with Image.open(grid) as sheet:
        cell = 3 * MINICANVAS.width  # the world's drawings, enlarged 3 times
        assert sheet.width == 10 * cell and sheet.height > 2 * cell


def test_grid_command_refuses_an_unreadable_image(tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("text")
    with pytest.raises(SystemExit):
        main(["artifact-grid", str(bad), "--out", str(tmp_path / "grid.png")])
