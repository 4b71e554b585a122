"""Each image judged once: the verdict cache (one JSON line an image), the fingerprint that tells a stale verdict,
and the judge that makes the images the cache lacks and classifies them.

Verdicts are cached one JSON line per image (`VerdictCache`), keyed by method, intervention (and for `replace` its
rule), erased concepts, strength, features per step, seed and prompt, and tagged with a fingerprint of what decides
the verdict: the model, classifier and artifact detector, and the SAEs and statistics of the image's own method
(none for the untouched model). An interrupted or repeated run redoes nothing, a retrained model never
reuses stale verdicts, and retraining one method's SAE remakes only that method's images.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from tqdm.auto import tqdm

from saemnesia.erase import ReplaceRule
from saemnesia.evaluate.metrics import Judged
from saemnesia.evaluate.protocol import PromptSpec, Protocol
from saemnesia.evaluate.search import Setting
from saemnesia.minicanvas.artifacts import ARTIFACT_THRESHOLD, ArtifactDetector, artifact_probabilities
from saemnesia.minicanvas.classifier import NO_OBJECT, MiniCanvasClassifier, classify
from saemnesia.studio import Studio

UNTOUCHED = "none"
"""The method name of images made without erasure, in the cache."""


def _image_key(setting: Setting, concepts: Sequence[str], seed: int, prompt: str, rule: dict | None) -> tuple:
    """`rule`: the replace rule's fields (`rule_fields`), None for an image made otherwise."""
    method, strength, features, intervention = setting
    rule_key = None if rule is None else tuple(sorted(rule.items()))
    return method, intervention, rule_key, tuple(concepts), float(strength), int(features), int(seed), prompt


def _record_key(record: dict) -> tuple:
    setting = Setting(record["method"], record["strength"], record["features_per_step"], record["intervention"])
    return _image_key(setting, record["concepts"], record["seed"], record["prompt"], record.get("rule"))


def rule_fields(setting: Setting, rule: ReplaceRule) -> dict | None:
    """What a record keeps of the replace rule an image was made with: its fields, or None for a steered image."""
    return asdict(rule) if setting.intervention == "replace" else None


class VerdictCache:
    """The classifier's verdict on every generated image, one JSON line each, so reruns skip done work.

    `fingerprints` holds this run's fingerprint per method; only records carrying their method's count.
    A line cut short by an interrupted write (or otherwise unreadable) is skipped. It reads `path` and every
    part's file beside it (`part_path`) and writes to `path`, or with `part` to that part's own file, so
    processes that share the work never write to one file.
    """

    def __init__(
        self,
        path: Path | None,
        fingerprints: dict[str, str],
        part: tuple[int, int] | None = None,
        sequential: bool = False,
    ):
        self.path = path if path is None or part is None else part_path(path, part, sequential)
        self.fingerprints = fingerprints
        self.records: dict[tuple, dict] = {}
        if path is None:
            return
        for source in [path, *sorted(path.parent.glob(f"{path.stem}.part-*{path.suffix}"))]:
            text = source.read_text() if source.is_file() else ""
            for line in text.splitlines():
                try:
                    record = json.loads(line)
                    if record.get("fingerprint") == fingerprints.get(record["method"]):
                        self.records[_record_key(record)] = record
                except (json.JSONDecodeError, AttributeError, KeyError, TypeError, ValueError):
                    continue
            if source == self.path and text and not text.endswith("\n"):
                with source.open("a") as handle:
                    handle.write("\n")

    def get(self, key: tuple) -> dict | None:
        return self.records.get(key)

    def add(self, records: list[dict]) -> None:
        for record in records:
            record["fingerprint"] = self.fingerprints[record["method"]]
            self.records[_record_key(record)] = record
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as handle:
                handle.write("".join(json.dumps(record) + "\n" for record in records))


def part_path(cache: Path, part: tuple[int, int], sequential: bool = False) -> Path:
    """The file one part of a shared run writes its verdicts to, beside the cache every part reads; a part of the
    sequential erasure has a file of its own, so it may run beside the concepts' part of the same number."""
    index, count = part
    share = "sequential-" if sequential else ""
    return cache.with_name(f"{cache.stem}.part-{share}{index}-of-{count}{cache.suffix}")


def fingerprint(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    method: str | None = None,
    artifact_detector: ArtifactDetector | None = None,
    nothing_classifier: MiniCanvasClassifier | None = None,
) -> str:
    """A short hash of what decides a verdict: sampling settings, model, SAEs, statistics, classifiers and
    artifact detector.

    Hashes the first and last tensor of every network (any training changes both) and all statistics;
    with `method`, only that method's SAEs and statistics (none for `UNTOUCHED`). The world's name is left out,
    so a world renamed with the same weights keeps its verdicts.
    """
    world = studio.world
    digest = hashlib.sha256(json.dumps([world.steps, world.guidance, world.height, world.width]).encode())
    pipeline = studio.pipeline
    networks = [pipeline.unet, pipeline.text_encoder, pipeline.vae, classifier]
    networks += [network for network in (artifact_detector, nothing_classifier) if network is not None]
    for key in sorted(key for key in studio.bundles if method in (None, key[0])):
        for bundle in (studio.bundles[key], *studio.extra_bundles.get(key, ())):
            networks.append(bundle.sae)
            digest.update(json.dumps([key, bundle.block, bundle.stats.concepts]).encode())
            digest.update(bundle.stats.mean_acts.float().contiguous().numpy().tobytes())
            if bundle.dictionary is not None:
                digest.update(json.dumps(bundle.dictionary.latents, sort_keys=True).encode())
    for network in networks:
        tensors = list(network.state_dict().values())
        for tensor in tensors[:1] + tensors[-1:]:
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


class Judge:
    """Makes (or finds in the cache) erased images and the classifier's verdicts on them."""

    def __init__(
        self,
        studio: Studio,
        classifier: MiniCanvasClassifier,
        cache: VerdictCache,
        bar: tqdm,
        protocol: Protocol,
        artifact_detector: ArtifactDetector | None = None,
        nothing_classifier: MiniCanvasClassifier | None = None,
    ):
        self.studio, self.classifier, self.cache, self.bar = studio, classifier, cache, bar
        self.artifact_detector, self.nothing_classifier = artifact_detector, nothing_classifier
        self.batch, self.start_step = protocol.batch_size, protocol.start_step
        self.replace_rule = studio.world.replace_rule
        self.generated = self.from_cache = 0
        self.seconds = 0.0
        """Generation and classification seconds of every image served, cached ones included."""
        self.generation_seconds = 0.0
        """Seconds spent making images in this run."""

    def images(
        self, setting: Setting | None, concepts: Sequence[str], seeds: Sequence[int], specs: Sequence[PromptSpec]
    ) -> list[Judged]:
        """Verdicts on `specs` from every seed with `concepts` erased by `setting` (None: no erasure)."""
        setting = setting or Setting(UNTOUCHED, 0.0, 0)
        concepts = list(concepts) if setting.method != UNTOUCHED else []
        judged, rule = [], rule_fields(setting, self.replace_rule)
        for seed in seeds:
            keys = [_image_key(setting, concepts, seed, spec.text, rule) for spec in specs]
            missing = [spec for key, spec in zip(keys, specs) if self.cache.get(key) is None]
            self.from_cache += len(specs) - len(missing)
            self.bar.update(len(specs) - len(missing))
            for start in range(0, len(missing), self.batch):
                self._generate(setting, concepts, seed, missing[start : start + self.batch])
            for key, spec in zip(keys, specs):
                record = self.cache.get(key)
                self.seconds += record["seconds"]
                judged.append(
                    Judged(
                        spec.text,
                        seed,
                        spec.object,
                        spec.style,
                        record["object"],
                        record["style"],
                        record["artifact"],
                        record.get("nothing"),
                    )
                )
        return judged

    def _generate(self, setting: Setting, concepts: list[str], seed: int, specs: list[PromptSpec]) -> None:
        studio = self.studio
        method, strength, features, intervention = setting
        self.bar.set_postfix_str(
            f"{setting.key} {'+'.join(concepts) or '-'} {strength:g} x{features} seed {seed}", refresh=False
        )
        began = time.perf_counter()
        hooks = (
            studio.hooks(concepts, method, strength, self.start_step, features, False, intervention, self.replace_rule)
            if method != UNTOUCHED
            else []
        )
        result = studio.generate([spec.text for spec in specs], hooks, seed, include_originals=False)
        verdicts = classify(self.classifier, result.erased)
        artifacts = (
            [None] * len(specs)
            if self.artifact_detector is None
            else [p >= ARTIFACT_THRESHOLD for p in artifact_probabilities(self.artifact_detector, result.erased)]
        )
        nothing = (
            [None] * len(specs)
            if self.nothing_classifier is None
            else [verdict.object == NO_OBJECT for verdict in classify(self.nothing_classifier, result.erased)]
        )
        seconds = time.perf_counter() - began
        rule = rule_fields(setting, self.replace_rule)
        self.cache.add(
            [
                {
                    "method": method,
                    "intervention": intervention,
                    **({} if rule is None else {"rule": rule}),
                    "concepts": concepts,
                    "strength": strength,
                    "features_per_step": features,
                    "seed": seed,
                    "prompt": spec.text,
                    "object": verdict.object,
                    "style": verdict.style,
                    "artifact": artifact,
                    "nothing": called_nothing,
                    "seconds": seconds / len(specs),
                }
                for spec, verdict, artifact, called_nothing in zip(specs, verdicts, artifacts, nothing)
            ]
        )
        self.generated += len(specs)
        self.generation_seconds += seconds
        self.bar.update(len(specs))
