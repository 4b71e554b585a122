"""A small CNN that names the object and the style of a MiniCanvas image, to score what a model draws.

It learns from freshly drawn procedural images, augmented (noise, blur, colour jitter, shifts) so that
it keeps working on the slightly noisy, soft images a small diffusion model makes. A checkpoint is a
folder with `config.json` (the label names and widths) and `model.safetensors`; never pickle.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import StableDiffusionPipeline
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from saemnesia.generate import initial_noise, model_lock
from saemnesia.minicanvas.data import CANVAS_32, Canvas
from saemnesia.worlds import World, portable_name

logger = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
METRICS_FILE = "metrics.json"

# Training draws image seeds below this value and evaluation at or above it, so the two never meet.
EVAL_SEED_OFFSET = 2**30
EVAL_NOISE_STD = 0.1
# The label of a bare background, for classifiers trained with a no-object class (`no_object_share`).
NO_OBJECT = "nothing"
NO_OBJECT_FOLDER = "classifier-no-object"
"""Where a world's assets keep its classifier with the no-object class."""


class ClassifierLoadError(ValueError):
    """A checkpoint that cannot be used; the message names the problem and the fix."""


@dataclass
class ClassifierConfig:
    """The label names (in logit order) and the widths of the three conv stages; round-trips to JSON."""

    objects: tuple[str, ...] = CANVAS_32.objects
    styles: tuple[str, ...] = CANVAS_32.styles
    channels: tuple[int, int, int] = (24, 48, 96)
    image_size: int = CANVAS_32.image_size

    @classmethod
    def from_json_dict(cls, raw: object, source: str = CONFIG_FILE) -> ClassifierConfig:
        if not isinstance(raw, dict):
            raise ClassifierLoadError(f"{source} must hold a JSON object, found {type(raw).__name__}.")
        for key in ("objects", "styles"):
            names = raw.get(key)
            if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
                raise ClassifierLoadError(f"{source}: '{key}' must be a non-empty list of names, found {names!r}.")
        channels = raw.get("channels")
        if not (
            isinstance(channels, list) and len(channels) == 3 and all(isinstance(c, int) and c > 0 for c in channels)
        ):
            raise ClassifierLoadError(f"{source}: 'channels' must be three positive integers, found {channels!r}.")
        image_size = raw.get("image_size", CANVAS_32.image_size)
        if not (isinstance(image_size, int) and image_size > 0 and image_size % 8 == 0):
            raise ClassifierLoadError(f"{source}: 'image_size' must be a positive multiple of 8, found {image_size!r}.")
        return cls(tuple(raw["objects"]), tuple(raw["styles"]), tuple(channels), image_size)


class ClassifierOutput(NamedTuple):
    object_logits: Tensor
    """[B, objects]"""
    style_logits: Tensor
    """[B, styles]"""


class Verdict(NamedTuple):
    """What the classifier sees in one image: the likeliest object and style, and all probabilities."""

    object: str
    object_prob: float
    style: str
    style_prob: float
    object_probs: Tensor
    """[objects], in `config.objects` order"""
    style_probs: Tensor
    """[styles], in `config.styles` order"""


def _conv(in_channels: int, out_channels: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False), nn.BatchNorm2d(out_channels), nn.ReLU()
    )


class MiniCanvasClassifier(nn.Module):
    """Five 3x3 conv layers down to 4 x 4, then one linear head for the object and one for the style."""

    def __init__(self, config: ClassifierConfig):
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
            nn.MaxPool2d(2),
            nn.Flatten(),
        )
        flat = large * (config.image_size // 8) ** 2
        self.object_head = nn.Linear(flat, len(config.objects))
        self.style_head = nn.Linear(flat, len(config.styles))

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def forward(self, images: Tensor) -> ClassifierOutput:
        """`images` [B, 3, size, size] in [0, 1], at the config's `image_size`."""
        features = self.features(images * 2 - 1)
        return ClassifierOutput(self.object_head(features), self.style_head(features))

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({name: t.detach().contiguous().cpu() for name, t in self.state_dict().items()}, folder / WEIGHTS_FILE)
        (folder / CONFIG_FILE).write_text(json.dumps(asdict(self.config), indent=2) + "\n")


def load_classifier(folder: str | Path, device: str | torch.device = "cpu") -> MiniCanvasClassifier:
    """Load a checkpoint folder in eval mode, checking each file, key and shape with a clear error."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ClassifierLoadError(
            f"Classifier folder '{folder}' does not exist: train one with `python -m saemnesia train-classifier`."
        )
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise ClassifierLoadError(
                f"No {path.name} in classifier folder '{folder}': it needs {CONFIG_FILE} and {WEIGHTS_FILE}; "
                "retrain with `python -m saemnesia train-classifier`."
            )
    try:
        raw = json.loads(config_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ClassifierLoadError(f"{config_path} is not valid JSON ({error}).") from error
    classifier = MiniCanvasClassifier(ClassifierConfig.from_json_dict(raw, str(config_path)))
    try:
        tensors = load_file(weights_path)
    except (SafetensorError, OSError, ValueError) as error:
        raise ClassifierLoadError(
            f"{weights_path} is not a readable safetensors file ({error}); retrain or restore it."
        ) from error
    expected = classifier.state_dict()
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ClassifierLoadError(
            f"{weights_path} does not match {CONFIG_FILE}: missing tensors {missing}, unexpected tensors {unexpected}."
        )
    for name, tensor in expected.items():
        if tensors[name].shape != tensor.shape:
            raise ClassifierLoadError(
                f"{weights_path}: '{name}' has shape {tuple(tensors[name].shape)} but {CONFIG_FILE} implies "
                f"{tuple(tensor.shape)}; the two files come from different classifiers."
            )
    classifier.load_state_dict(tensors)
    return classifier.to(device).eval()


def images_to_tensor(images: Sequence[Image.Image] | Tensor, size: int) -> Tensor:
    """PIL images (any size, any mode) or a [B, 3, H, W] tensor in [0, 1] as a [B, 3, size, size] batch.

    Resizing averages pixel areas (BOX), so a grid cell upscaled with NEAREST comes back exactly.
    """
    if isinstance(images, Tensor):
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"Expected images as [B, 3, H, W], got shape {tuple(images.shape)}.")
        batch = images.float()
        return batch if batch.shape[-2:] == (size, size) else F.interpolate(batch, size=(size, size), mode="area")
    arrays = [np.asarray(image.convert("RGB").resize((size, size), Image.BOX), np.float32) / 255 for image in images]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)


@torch.no_grad()
def classify(
    classifier: MiniCanvasClassifier, images: Sequence[Image.Image] | Tensor, batch_size: int = 256
) -> list[Verdict]:
    """One verdict per image (in eval mode, which it sets); see `images_to_tensor` for the inputs."""
    classifier.eval()
    batch = images_to_tensor(images, classifier.config.image_size)
    verdicts = []
    for start in range(0, len(batch), batch_size):
        output = classifier(batch[start : start + batch_size].to(classifier.device))
        for object_probs, style_probs in zip(
            output.object_logits.softmax(-1).cpu(), output.style_logits.softmax(-1).cpu()
        ):
            object_id, style_id = int(object_probs.argmax()), int(style_probs.argmax())
            verdicts.append(
                Verdict(
                    classifier.config.objects[object_id],
                    float(object_probs[object_id]),
                    classifier.config.styles[style_id],
                    float(style_probs[style_id]),
                    object_probs,
                    style_probs,
                )
            )
    return verdicts


def _training_batch(
    canvas: Canvas, batch_size: int, seed: int, no_object_share: float = 0.0
) -> tuple[Tensor, Tensor, Tensor]:
    """Freshly drawn images [B, 3, size, size] in [0, 1] with object and style ids, deterministic from `seed`.

    With `no_object_share` > 0 that share of the images is a bare background, labelled `NO_OBJECT`
    (id `len(canvas.objects)`); at 0 the draws are exactly those of a classifier without that class.
    """
    rng = random.Random(seed)
    images, object_ids, style_ids = [], [], []
    for _ in range(batch_size):
        object_id, style_id = rng.randrange(len(canvas.objects)), rng.randrange(len(canvas.styles))
        if no_object_share and rng.random() < no_object_share:
            object_id = len(canvas.objects)
        object_name = canvas.objects[object_id] if object_id < len(canvas.objects) else None
        images.append(canvas.draw(object_name, canvas.styles[style_id], rng.randrange(EVAL_SEED_OFFSET)))
        object_ids.append(object_id)
        style_ids.append(style_id)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(object_ids), torch.tensor(style_ids)


def _evaluation_set(canvas: Canvas, count: int, objects: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """`count` images cycling through every (object, style) pair, from seeds training never draws.

    `objects` are the classifier's labels: `NO_OBJECT` among them adds bare backgrounds to the cycle.
    """
    images, object_ids, style_ids = [], [], []
    for index in range(count):
        object_id, style_id = divmod(index % (len(objects) * len(canvas.styles)), len(canvas.styles))
        object_name = None if objects[object_id] == NO_OBJECT else objects[object_id]
        images.append(canvas.draw(object_name, canvas.styles[style_id], EVAL_SEED_OFFSET + index))
        object_ids.append(object_id)
        style_ids.append(style_id)
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2), torch.tensor(object_ids), torch.tensor(style_ids)


def augment(images: Tensor, generator: torch.Generator) -> Tensor:
    """Make clean drawings look like a small diffusion model's output: shifted, soft, off-colour, noisy."""
    count = len(images)

    def uniform(low: float, high: float, *shape: int) -> Tensor:
        return low + (high - low) * torch.rand(count, *shape, generator=generator)

    # Occasional shifts of up to 2 pixels, edges extended.
    padded = F.pad(images, (2, 2, 2, 2), mode="replicate")
    offsets = torch.randint(-2, 3, (count, 2), generator=generator) * (torch.rand(count, 1, generator=generator) < 0.3)
    images = torch.stack(
        [
            padded[i, :, 2 + dy : 2 + dy + images.shape[2], 2 + dx : 2 + dx + images.shape[3]]
            for i, (dy, dx) in enumerate(offsets.tolist())
        ]
    )
    # Slight blur in half the images: a blend towards a [1, 2, 1]^2 / 16 smoothing.
    kernel = torch.tensor([1.0, 2.0, 1.0])
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    blur_amount = uniform(0, 1, 1, 1, 1) * (torch.rand(count, 1, 1, 1, generator=generator) < 0.5)
    images = images + blur_amount * (blurred - images)
    # Colour: contrast around the image mean, per-channel gain, brightness offset.
    mean = images.mean(dim=(1, 2, 3), keepdim=True)
    images = (images - mean) * uniform(0.8, 1.2, 1, 1, 1) + mean
    images = images * uniform(0.9, 1.1, 3, 1, 1) + uniform(-0.08, 0.08, 1, 1, 1)
    # Additive gaussian noise of random strength.
    images = images + uniform(0, 0.15, 1, 1, 1) * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1)


@torch.no_grad()
def _accuracy(classifier: MiniCanvasClassifier, images: Tensor, object_ids: Tensor, style_ids: Tensor) -> dict:
    """Object and style accuracy of `classifier` on a labelled batch (ids in the classifier's label order)."""
    verdicts = classify(classifier, images)
    objects = [classifier.config.objects[i] for i in object_ids.tolist()]
    styles = [classifier.config.styles[i] for i in style_ids.tolist()]
    return {
        "object_accuracy": sum(v.object == o for v, o in zip(verdicts, objects)) / len(verdicts),
        "style_accuracy": sum(v.style == s for v, s in zip(verdicts, styles)) / len(verdicts),
    }


def train_classifier(
    out: Path,
    canvas: Canvas = CANVAS_32,
    steps: int = 800,
    batch_size: int = 64,
    seed: int = 0,
    device: str = "cpu",
    learning_rate: float = 3e-3,
    eval_images: int = 2000,
    no_object_share: float = 0.0,
) -> dict:
    """Train the classifier on fresh augmented drawings, save it to `out` and measure it on unseen seeds.

    Batches come from `seed` and the step, so a rerun gives the same classifier. A run takes a few
    minutes on one CPU core, so it is not resumable. Writes `metrics.json` next to the weights and
    returns it: accuracy on `eval_images` fresh images (clean, with gaussian noise, and with the training
    augmentation), the command, the wall time and the machine.

    `no_object_share` > 0 adds an eleventh object label, `NO_OBJECT`, learnt from that share of bare
    backgrounds. UnlearnCanvas's classifiers have no such class (an image is always named as one of the
    objects); this one is a second instrument, for asking whether an erased object left an empty canvas.
    """
    if not 0 <= no_object_share < 1:
        raise ValueError(f"no_object_share must be in [0, 1), got {no_object_share}.")
    began = time.time()
    torch.manual_seed(seed)
    objects = canvas.objects + ((NO_OBJECT,) if no_object_share else ())
    config = ClassifierConfig(objects=objects, styles=canvas.styles, image_size=canvas.image_size)
    classifier = MiniCanvasClassifier(config).to(device)
    optimizer = torch.optim.AdamW(classifier.parameters(), lr=learning_rate, weight_decay=1e-4)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    classifier.train()
    loss = torch.tensor(float("nan"))
    for step in range(steps):
        batch_seed = seed * 1_000_003 + step
        images, object_ids, style_ids = _training_batch(canvas, batch_size, batch_seed, no_object_share)
        images = augment(images, torch.Generator().manual_seed(batch_seed))
        output = classifier(images.to(device))
        loss = F.cross_entropy(output.object_logits, object_ids.to(device)) + F.cross_entropy(
            output.style_logits, style_ids.to(device)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
        if step % 50 == 0 or step == steps - 1:
            logger.info(
                "step %d/%d loss %.4f batch object acc %.3f style acc %.3f %.0f s",
                step + 1,
                steps,
                loss.item(),
                (output.object_logits.argmax(-1).cpu() == object_ids).float().mean().item(),
                (output.style_logits.argmax(-1).cpu() == style_ids).float().mean().item(),
                time.time() - began,
            )
    classifier.eval()
    classifier.save(out)
    train_time = time.time() - began

    logger.info("measuring accuracy on %d fresh images", eval_images)
    images, object_ids, style_ids = _evaluation_set(canvas, eval_images, objects)
    noisy = (images + EVAL_NOISE_STD * torch.randn(images.shape, generator=torch.Generator().manual_seed(0))).clamp(
        0, 1
    )
    augmented = augment(images, torch.Generator().manual_seed(0))
    noisy_accuracy = _accuracy(classifier, noisy, object_ids, style_ids)
    augmented_accuracy = _accuracy(classifier, augmented, object_ids, style_ids)
    metrics = {
        **_accuracy(classifier, images, object_ids, style_ids),
        "noisy_object_accuracy": noisy_accuracy["object_accuracy"],
        "noisy_style_accuracy": noisy_accuracy["style_accuracy"],
        "noise_std": EVAL_NOISE_STD,
        "augmented_object_accuracy": augmented_accuracy["object_accuracy"],
        "augmented_style_accuracy": augmented_accuracy["style_accuracy"],
        "eval_images": eval_images,
        "eval_seeds": f"{EVAL_SEED_OFFSET} to {EVAL_SEED_OFFSET + eval_images - 1}, every (object, style) pair in turn",
        "objects": list(objects),
        "train_seeds": f"below {EVAL_SEED_OFFSET}",
        "command": (
            f"python -m saemnesia train-classifier --world {canvas.name} --out {portable_name(str(out))} "
            f"--steps {steps} --batch-size {batch_size} "
            f"--seed {seed} --learning-rate {learning_rate} --eval-images {eval_images}"
            + (f" --no-object-share {no_object_share}" if no_object_share else "")
        ),
        "seed": seed,
        "steps": steps,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "final_loss": loss.item(),
        "parameters": sum(p.numel() for p in classifier.parameters()),
        "train_time_s": round(train_time, 1),
        "wall_time_s": round(time.time() - began, 1),
        "machine": _machine_description(device),
        "torch": torch.__version__,
    }
    (Path(out) / METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n")
    logger.info(
        "object accuracy %.4f, style accuracy %.4f (noisy: %.4f, %.4f)",
        metrics["object_accuracy"],
        metrics["style_accuracy"],
        metrics["noisy_object_accuracy"],
        metrics["noisy_style_accuracy"],
    )
    return metrics


def _machine_description(device: str) -> str:
    threads = f"{torch.get_num_threads()} torch thread(s)"
    if str(device).startswith("cuda"):
        return f"{os.cpu_count()}-core CPU, {threads}, GPU {torch.cuda.get_device_name(device)}"
    return f"{os.cpu_count()}-core CPU, {threads}, no GPU"


@torch.no_grad()
def world_quality(
    pipeline: StableDiffusionPipeline,
    classifier: MiniCanvasClassifier,
    world: World,
    seeds: Sequence[int] = (0, 1),
    steps: int | None = None,
    guidance: float | None = None,
    grid: Path | None = None,
) -> dict:
    """How often the model draws the object and the style it is asked for, judged by the classifier.

    Every object x style of `world`, prompted with its first template, from each seed's fixed noise
    (all styles of one object in one batch). `grid`, if given, gets the first seed's images as a PNG:
    objects as rows, styles as columns, upscaled 4x.
    """
    unknown = [name for name in world.objects if name not in classifier.config.objects]
    unknown += [name for name in world.styles if name not in classifier.config.styles]
    if unknown:
        raise ValueError(f"The classifier does not know {unknown}: it only scores the concepts it was trained on.")
    steps = steps or world.steps
    guidance = world.guidance if guidance is None else guidance
    object_hits = {name: 0 for name in world.objects}
    style_hits = {name: 0 for name in world.styles}
    both_hits = 0
    first_seed_images: list[list[Image.Image]] = []
    for object_name in world.objects:
        prompts = [world.prompt(object_name, style) for style in world.styles]
        for seed in seeds:
            noise = initial_noise(pipeline, seed, world.height, world.width).repeat(len(prompts), 1, 1, 1)
            with model_lock(pipeline):
                images = pipeline(
                    prompt=prompts,
                    latents=noise.to(pipeline.device, pipeline.unet.dtype),
                    num_inference_steps=steps,
                    guidance_scale=guidance,
                    height=world.height,
                    width=world.width,
                ).images
            if seed == seeds[0]:
                first_seed_images.append(images)
            for style, verdict in zip(world.styles, classify(classifier, images)):
                object_hits[object_name] += verdict.object == object_name
                style_hits[style] += verdict.style == style
                both_hits += verdict.object == object_name and verdict.style == style
        logger.info("%s: %d/%d objects right", object_name, object_hits[object_name], len(prompts) * len(seeds))
    per_object = {name: hits / (len(world.styles) * len(seeds)) for name, hits in object_hits.items()}
    per_style = {name: hits / (len(world.objects) * len(seeds)) for name, hits in style_hits.items()}
    if grid is not None:
        save_grid(first_seed_images, Path(grid))
    images_count = len(world.objects) * len(world.styles) * len(seeds)
    return {
        "object_accuracy": sum(object_hits.values()) / images_count,
        "style_accuracy": sum(style_hits.values()) / images_count,
        "both_accuracy": both_hits / images_count,
        "per_object": per_object,
        "per_style": per_style,
        "images": images_count,
        "model": portable_name(pipeline.name_or_path),
        "template": world.templates[0],
        "seeds": list(seeds),
        "steps": steps,
        "guidance": guidance,
    }


def save_grid(rows: list[list[Image.Image]], path: Path, scale: int = 4) -> None:
    """Images laid out row by row, each upscaled `scale` times with NEAREST so pixels stay visible."""
    cell_width, cell_height = rows[0][0].width * scale, rows[0][0].height * scale
    sheet = Image.new("RGB", (cell_width * max(len(row) for row in rows), cell_height * len(rows)), "white")
    for row_index, row in enumerate(rows):
        for column_index, image in enumerate(row):
            cell = image.convert("RGB").resize((cell_width, cell_height), Image.NEAREST)
            sheet.paste(cell, (column_index * cell_width, row_index * cell_height))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
