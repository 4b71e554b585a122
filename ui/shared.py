"""What several tabs share: how large images are shown, the classifier's verdict on them (as table rows and as
captions), the concept an example prompt erases, and the strengths the benchmark tuned."""

from __future__ import annotations

from PIL import Image

from saemnesia.evaluate import setting_or_default
from saemnesia.heatmaps import upscale

DISPLAY = 256
"""Side in pixels of an image as the app sends it: a 64-pixel MiniCanvas image enlarged 4 times, each pixel a
block (`heatmaps.upscale`), so it stays crisp; CSS keeps the browser from smoothing it again (`PIXELS`)."""
PIXELS = "pixels"
"""The CSS class of components that show such images (`app.CSS` renders them pixelated)."""


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


def verdict_rows(classifier, images: dict[str, Image.Image]) -> str:
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


def captioned(classifier, images: dict[str, Image.Image]) -> list[tuple[Image.Image, str]]:
    """Each named image enlarged for a gallery, its caption its name and, with a classifier, what it sees there:
    the verdict stays under the image it is about."""
    seen = verdicts(classifier, list(images.values())) or [None] * len(images)
    return [
        (
            upscale(image, DISPLAY),
            name
            if verdict is None
            else f"{name} · seen: {verdict.object} {verdict.object_prob:.0%}, {verdict.style} {verdict.style_prob:.0%}",
        )
        for (name, image), verdict in zip(images.items(), seen)
    ]


def tuned_settings(benchmark: dict | None, concepts: list[str]) -> tuple[float, float, int]:
    """SAEmnesia's strength, SAeUron's strength and SAeUron's latents per step, as the benchmark tuned them
    for erasing `concepts`: the two methods work at different scales, so a fair side by side needs both."""
    ours, theirs = (setting_or_default(benchmark, method, concepts or []) for method in ("saemnesia", "saeuron"))
    return ours.strength, theirs.strength, theirs.features_per_step
