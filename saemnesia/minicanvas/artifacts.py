"""An artifact detector for MiniCanvas images: how often an erasure turns a picture into noise or mush.

The ARTIFACT RATE (AR) is the share of images a small binary CNN calls corrupted. The CNN is an
instrument no erasure method was tuned on: it never sees an erasure's output. It learns CLEAN from

- MiniCanvas drawings at training seeds, with and without an object (a bare background is what a perfect
  object erasure leaves, so it must count as clean), under the classifier's augmentation (shifts, blur,
  colour jitter, noise: the softness of a small diffusion model's images), and
- untouched generations of the MiniCanvas model at training-only seeds (80000 onwards, one template per
  seed in turn; the benchmark uses 50000, 60000-60001 and 70000-70001, the floor below 90000 onwards),
  so that what the model itself draws is the reference of clean,

and CORRUPTED from the same sources under the generic corruptions of `corruptions` (which says why each),
applied before the augmentation so both labels share it. Bare backgrounds never get `patch_shuffle`
(`NEEDS_AN_OBJECT`), so that no corrupted label sits on a clean-looking image. A checkpoint is a folder
with `config.json` and `model.safetensors` (and the training's `metrics.json`); never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saemnesia.minicanvas.classifier import EVAL_SEED_OFFSET, augment, images_to_tensor
from saemnesia.minicanvas.corruptions import CORRUPTIONS, corrupt
from saemnesia.minicanvas.data import CANVAS_32, Canvas
from saemnesia.worlds import portable_name

if TYPE_CHECKING:
    from saemnesia.studio import Studio

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"

ARTIFACT_THRESHOLD = 0.5
"""An image is called an artifact when its probability is at least this."""
GENERATION_TRAIN_SEED = 80_000
"""Untouched generations for training come from this seed onwards, seen by nothing else."""
FLOOR_SEEDS = (90_000, 90_001, 90_002)
"""Seeds of the untouched model's floor: no erasure is tuned or held out on them."""
BARE_SHARE = 0.2
"""Share of drawn clean images with no object (a perfect object erasure's output)."""
GENERATED_SHARE = 0.5
"""Share of clean images taken from untouched generations, when there are any."""


class ArtifactDetectorLoadError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


@dataclass
class ArtifactDetectorConfig:
    """The widths of the three conv stages; round-trips to JSON."""

    channels: tuple[int, int, int] = (24, 48, 96)
    image_size: int = CANVAS_32.image_size

    @classmethod
    def from_json_dict(cls, raw: object, source: str = CONFIG_FILE) -> ArtifactDetectorConfig:
        if not isinstance(raw, dict):
            raise ArtifactDetectorLoadError(f"{source} must hold a JSON object, found {type(raw).__name__}.")
        channels = raw.get("channels")
        if not (
            isinstance(channels, list) and len(channels) == 3 and all(isinstance(c, int) and c > 0 for c in channels)
        ):
            raise ArtifactDetectorLoadError(
                f"{source}: 'channels' must be three positive integers, found {channels!r}."
            )
        image_size = raw.get("image_size", CANVAS_32.image_size)
        if not (isinstance(image_size, int) and image_size > 0 and image_size % 8 == 0):
            raise ArtifactDetectorLoadError(
                f"{source}: 'image_size' must be a positive multiple of 8, found {image_size!r}."
            )
        return cls(tuple(channels), image_size)


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


class ArtifactDetector(nn.Module):
    """The classifier's five 3x3 conv layers, then average and max pooling (an artifact may fill the
    image or one corner of it) and one logit: corrupted versus clean."""

    def __init__(self, config: ArtifactDetectorConfig):
        super().__init__()
        self.config = config
        small, medium, large = config.channels
        self.features = nn.Sequential(
            _conv(3, small),
            _conv(small, small),
            nn.MaxPool2d(2),
            _conv(small, medium),
            _conv(medium, medium),
            nn.MaxPool2d(2),
            _conv(medium, large),
        )
        self.head = nn.Linear(2 * large, 1)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: Tensor) -> Tensor:
        """`images` [B, 3, size, size] in [0, 1], at the config's `image_size` -> artifact logits [B]."""
        features = self.features(images * 2 - 1)
        pooled = torch.cat([features.mean(dim=(2, 3)), features.amax(dim=(2, 3))], dim=1)
        return self.head(pooled).squeeze(1)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")

    @classmethod
    def load(cls, folder: str | Path, device: str | torch.device = "cpu") -> ArtifactDetector:
        """A checkpoint folder in eval mode, each file, key and shape checked with a clear error."""
        folder = Path(folder)
        retrain = "retrain with `python -m saemnesia train-artifact-detector`"
        if not folder.is_dir():
            raise ArtifactDetectorLoadError(f"Artifact detector folder '{folder}' does not exist: {retrain}.")
        config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ArtifactDetectorLoadError(
                    f"No {path.name} in artifact detector folder '{folder}': it needs {CONFIG_FILE} and "
                    f"{WEIGHTS_FILE}; {retrain}."
                )
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ArtifactDetectorLoadError(f"{config_path} is not valid JSON ({error}).") from error
        detector = cls(ArtifactDetectorConfig.from_json_dict(raw, str(config_path)))
        try:
            tensors = load_file(weights_path)
        except (SafetensorError, OSError, ValueError) as error:
            raise ArtifactDetectorLoadError(
                f"{weights_path} is not a readable safetensors file ({error}); {retrain} or restore it."
            ) from error
        expected = detector.state_dict()
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise ArtifactDetectorLoadError(
                f"{weights_path} is not an artifact detector matching {CONFIG_FILE}: missing tensors {missing}, "
                f"unexpected tensors {unexpected}."
            )
        for name, tensor in expected.items():
            if tensors[name].shape != tensor.shape:
                raise ArtifactDetectorLoadError(
                    f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)} but {CONFIG_FILE} implies "
                    f"{tuple(tensor.shape)}; the two files come from different detectors."
                )
        detector.load_state_dict(tensors)
        return detector.to(device).eval()


@torch.no_grad()
def artifact_probabilities(
    detector: ArtifactDetector, images: Sequence[Image.Image] | Tensor, batch_size: int = 256
) -> list[float]:
    """The probability that each image is corrupted (eval mode, which it sets); PIL images of any size
    or a [B, 3, H, W] tensor in [0, 1], resized to the detector's size by area."""
    detector.eval()
    batch = images_to_tensor(images, detector.config.image_size)
    probabilities: list[float] = []
    for start in range(0, len(batch), batch_size):
        logits = detector(batch[start : start + batch_size].to(detector.device))
        probabilities += torch.sigmoid(logits).cpu().tolist()
    return probabilities


def artifact_rate(detector: ArtifactDetector, images: Sequence[Image.Image] | Tensor) -> float:
    """The ARTIFACT RATE: the percentage of images whose probability reaches `ARTIFACT_THRESHOLD`."""
    if len(images) == 0:
        raise ValueError("artifact_rate needs at least one image.")
    probabilities = artifact_probabilities(detector, images)
    return 100 * sum(p >= ARTIFACT_THRESHOLD for p in probabilities) / len(probabilities)


NEEDS_AN_OBJECT = ("patch_shuffle",)
"""Corruptions not applied to bare backgrounds: a bare mosaic's or checker's shuffled patches make another
clean background, which would teach the detector that clean backgrounds are corrupted."""


def _allowed_corruptions(bare: bool) -> list[str]:
    return [name for name in CORRUPTIONS if not (bare and name in NEEDS_AN_OBJECT)]


def _drawn(canvas: Canvas, object_name: str | None, style: str, seed: int) -> Tensor:
    return torch.from_numpy(canvas.draw(object_name, style, seed)).permute(2, 0, 1)


def drawing_pool(canvas: Canvas, count: int, seed: int) -> tuple[Tensor, list[bool]]:
    """`count` drawings [N, 3, size, size] at training seeds (below `EVAL_SEED_OFFSET`), a `BARE_SHARE` of them
    without an object, and which are bare. Drawn once and reused under fresh corruption and augmentation:
    drawing would otherwise take most of each step's time."""
    rng = random.Random(seed)
    images, bare = [], []
    for _ in range(count):
        object_name = None if rng.random() < BARE_SHARE else rng.choice(canvas.objects)
        images.append(_drawn(canvas, object_name, rng.choice(canvas.styles), rng.randrange(EVAL_SEED_OFFSET)))
        bare.append(object_name is None)
    return torch.stack(images), bare


def _training_batch(
    batch_size: int, seed: int, drawings: Tensor, bare: Sequence[bool], generated: Tensor | None
) -> tuple[Tensor, Tensor]:
    """Images [B, 3, size, size], every second one corrupted, all then augmented, and labels (1: corrupted).

    Sources: the drawing pool and, when given, untouched generations (`GENERATED_SHARE`). Corrupting
    before augmenting gives both labels the same softness and noise, and lets `MIN_CHANGE` judge the
    corruption rather than the noise. Deterministic from `seed`."""
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    sources, source_bare = [], []
    for _ in range(batch_size):
        if generated is not None and rng.random() < GENERATED_SHARE:
            sources.append(generated[rng.randrange(len(generated))])
            source_bare.append(False)
        else:
            index = rng.randrange(len(drawings))
            sources.append(drawings[index])
            source_bare.append(bare[index])
    images = torch.stack(sources)
    names = [rng.choice(_allowed_corruptions(is_bare)) for is_bare in source_bare[1::2]]
    images[1::2] = corrupt(images[1::2], generator, names).images
    return augment(images, generator), (torch.arange(batch_size) % 2).float()


def train_detector(
    detector: ArtifactDetector,
    batches: Callable[[int], tuple[Tensor, Tensor]],
    steps: int,
    learning_rate: float = 3e-3,
    log_every: int = 50,
) -> float:
    """Fit `detector` (on its device) to `batches(step)` -> (images, labels 1 = corrupted) with AdamW,
    a short warm-up and cosine decay; returns the last loss. Leaves it in eval mode."""
    optimizer = torch.optim.AdamW(detector.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    detector.train()
    began, loss = time.time(), torch.tensor(float("nan"))
    for step in range(steps):
        images, labels = batches(step)
        logits = detector(images.to(detector.device))
        loss = F.binary_cross_entropy_with_logits(logits, labels.to(detector.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % log_every == 0 or step == steps - 1:
            accuracy = ((logits.detach().cpu() > 0).float() == labels).float().mean().item()
            logger.info(
                "step %d/%d loss %.4f batch accuracy %.3f %.0f s",
                step + 1,
                steps,
                loss.item(),
                accuracy,
                time.time() - began,
            )
    detector.eval()
    return loss.item()


def untouched_generations(
    studio: Studio, seeds: Sequence[int], cycle_templates: bool = False
) -> tuple[list[Image.Image], list[str]]:
    """The untouched model's image of every object x style at each seed, and a label for each
    ("object/style/seed"). The first template, or with `cycle_templates` the seed's turn of them."""
    world = studio.world
    images, labels = [], []
    for turn, seed in enumerate(seeds):
        template = world.templates[turn % len(world.templates)] if cycle_templates else world.templates[0]
        pairs = [(object_name, style) for object_name in world.objects for style in world.styles]
        prompts = [world.prompt(object_name, style, template) for object_name, style in pairs]
        images += studio.generate(prompts, [], seed, include_originals=False).erased
        labels += [f"{object_name}/{style}/{seed}" for object_name, style in pairs]
        logger.info("generated %d untouched images at seed %d", len(prompts), seed)
    return images, labels


def rate_summary(probabilities: Sequence[float], labels: Sequence[str]) -> dict:
    """The artifact rate (%) of labelled untouched generations, per style and per object, and which were
    called artifacts."""
    called = [p >= ARTIFACT_THRESHOLD for p in probabilities]
    parts = [label.split("/") for label in labels]

    def rate_by(position: int) -> dict[str, float]:
        names = dict.fromkeys(part[position] for part in parts)
        return {
            name: round(100 * np.mean([c for c, part in zip(called, parts) if part[position] == name]), 2)
            for name in names
        }

    return {
        "rate": round(100 * sum(called) / len(called), 2),
        "images": len(called),
        "per_style": rate_by(1),
        "per_object": rate_by(0),
        "called_artifact": [f"{label} ({p:.2f})" for label, p, c in zip(labels, probabilities, called) if c],
    }


def evaluation_images(canvas: Canvas, count: int) -> tuple[Tensor, list[bool]]:
    """`count` drawings cycling through every (object or none, style) pair, from seeds training never
    draws, and whether each is a bare background."""
    objects = (*canvas.objects, None)
    images, bare = [], []
    for index in range(count):
        object_id, style_id = divmod(index % (len(objects) * len(canvas.styles)), len(canvas.styles))
        images.append(_drawn(canvas, objects[object_id], canvas.styles[style_id], EVAL_SEED_OFFSET + index))
        bare.append(objects[object_id] is None)
    return torch.stack(images), bare


def held_out_sets(canvas: Canvas, count: int) -> tuple[Tensor, Tensor, list[str], list[bool]]:
    """Held-out drawings, clean and corrupted, each pair under the same augmentation, the corruption names
    and the bare-background flags: fixed generators, so every run measures the same images. The corruption
    turns with each run of ten styles, so every corruption meets every style and, over 550 images, every
    object (bare backgrounds skip `NEEDS_AN_OBJECT`)."""
    drawings, bare = evaluation_images(canvas, count)
    names = []
    for index, is_bare in enumerate(bare):
        allowed = _allowed_corruptions(is_bare)
        names.append(allowed[index // len(canvas.styles) % len(allowed)])
    corrupted = corrupt(drawings, torch.Generator().manual_seed(1), names)
    clean = augment(drawings, torch.Generator().manual_seed(0))
    return clean, augment(corrupted.images, torch.Generator().manual_seed(0)), corrupted.names, bare


def train_artifact_detector(
    out: Path,
    canvas: Canvas = CANVAS_32,
    steps: int = 1500,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    learning_rate: float = 3e-3,
    eval_images: int = 1100,
    drawings: int = 6000,
    studio: Studio | None = None,
    generated_seeds: int = 4,
    floor_seeds: Sequence[int] = FLOOR_SEEDS,
    config: ArtifactDetectorConfig | None = None,
) -> dict:
    """Train the detector, save it to `out` and measure it; writes `metrics.json` there and returns it.

    The clean images are `drawings` drawings (`drawing_pool`) and, with a `studio`, untouched generations
    at `generated_seeds` seeds from `GENERATION_TRAIN_SEED`; with a `studio` the untouched floor is
    measured at `floor_seeds` too. Batches come from `seed` and the step, so a rerun gives the same
    detector. Not resumable: about 20 minutes on a shared 2-core CPU, a third of them generating.
    """
    began = time.time()
    torch.manual_seed(seed)
    generated = None
    generation_seeds = list(range(GENERATION_TRAIN_SEED, GENERATION_TRAIN_SEED + generated_seeds))
    if studio is not None and generation_seeds:
        generations = untouched_generations(studio, generation_seeds, cycle_templates=True)[0]
        generated = images_to_tensor(generations, canvas.image_size)
    logger.info("drawing %d training images", drawings)
    pool, bare = drawing_pool(canvas, drawings, seed)
    detector = ArtifactDetector(config or ArtifactDetectorConfig(image_size=canvas.image_size)).to(device)
    final_loss = train_detector(
        detector,
        lambda step: _training_batch(batch_size, seed * 1_000_003 + step, pool, bare, generated),
        steps,
        learning_rate,
    )
    detector.save(out)
    train_time = time.time() - began

    logger.info("measuring on %d held-out drawings, clean and corrupted", eval_images)
    clean, corrupted, names, bare = held_out_sets(canvas, eval_images)
    clean_called = [p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(detector, clean)]
    corrupted_called = [p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(detector, corrupted)]
    raw_called = [
        p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(detector, evaluation_images(canvas, eval_images)[0])
    ]
    metrics: dict = {
        "clean_called_clean": 1 - sum(clean_called) / eval_images,
        "corrupted_called_artifact": sum(corrupted_called) / eval_images,
        "corrupted_called_artifact_by_corruption": {
            name: sum(c for c, n in zip(corrupted_called, names) if n == name) / max(1, names.count(name))
            for name in CORRUPTIONS
        },
        "bare_backgrounds_called_clean": 1 - sum(c for c, b in zip(clean_called, bare) if b) / max(1, sum(bare)),
        "unaugmented_drawings_called_clean": 1 - sum(raw_called) / eval_images,
        "threshold": ARTIFACT_THRESHOLD,
        "eval_images": eval_images,
        "eval_seeds": f"{EVAL_SEED_OFFSET} to {EVAL_SEED_OFFSET + eval_images - 1}, every (object or none, style) "
        "in turn; corrupted with generator seed 1 (the corruption turning every ten images), then clean and "
        "corrupted augmented alike with generator seed 0",
        "train_drawings": drawings,
        "train_drawing_seeds": f"below {EVAL_SEED_OFFSET}",
        "train_generation_seeds": generation_seeds if generated is not None else [],
    }
    if studio is not None and floor_seeds:
        images, labels = untouched_generations(studio, floor_seeds)
        metrics["untouched_floor"] = {
            **rate_summary(artifact_probabilities(detector, images), labels),
            "seeds": list(floor_seeds),
            "template": studio.world.templates[0],
        }
    metrics.update(
        {
            "command": (
                f"python -m saemnesia train-artifact-detector --world {canvas.name} --out {portable_name(str(out))} "
                f"--steps {steps} "
                f"--batch-size {batch_size} "
                f"--seed {seed} --learning-rate {learning_rate} --eval-images {eval_images} --drawings {drawings} "
                f"--generated-seeds {generated_seeds if studio is not None else 0} "
                f"--floor-seeds {' '.join(map(str, floor_seeds))}"
            ),
            "channels": list(detector.config.channels),
            "seed": seed,
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": learning_rate,
            "final_loss": final_loss,
            "parameters": sum(p.numel() for p in detector.parameters()),
            "train_time_s": round(train_time, 1),
            "wall_time_s": round(time.time() - began, 1),
            "machine": f"{os.cpu_count()}-core CPU, {torch.get_num_threads()} torch thread(s), device {device}",
            "torch": torch.__version__,
        }
    )
    (Path(out) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info(
        "clean called clean %.4f, corrupted called artifact %.4f, floor %s",
        metrics["clean_called_clean"],
        metrics["corrupted_called_artifact"],
        metrics.get("untouched_floor", {}).get("rate", "not measured"),
    )
    return metrics


class GridEntry(NamedTuple):
    image: Image.Image
    probability: float
    tag: str
    """A few characters saying where the image comes from."""


def save_verdict_grid(entries: Sequence[GridEntry], path: Path, columns: int = 10, scale: int = 3) -> None:
    """Two panels, images called artifact then images called clean, each captioned `tag probability`."""
    cell, caption, header = entries[0].image.width * scale, 12, 16
    panels = [
        ("called artifact", [e for e in entries if e.probability >= ARTIFACT_THRESHOLD]),
        ("called clean", [e for e in entries if e.probability < ARTIFACT_THRESHOLD]),
    ]
    heights = [header + math.ceil(max(1, len(items)) / columns) * (cell + caption) for _, items in panels]
    sheet = Image.new("RGB", (columns * cell, sum(heights)), "white")
    draw = ImageDraw.Draw(sheet)
    top = 0
    for (title, items), height in zip(panels, heights):
        draw.text((4, top + 2), f"{title} (p >= {ARTIFACT_THRESHOLD} is artifact): {len(items)}", fill="black")
        for index, entry in enumerate(items):
            row, column = divmod(index, columns)
            x, y = column * cell, top + header + row * (cell + caption)
            sheet.paste(entry.image.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            draw.text((x + 2, y + cell), f"{entry.tag} {entry.probability:.2f}", fill="black")
        top += height
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)


def tensor_to_pil(image: Tensor) -> Image.Image:
    """[3, H, W] in [0, 1] as an RGB image."""
    return Image.fromarray((image.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8))
