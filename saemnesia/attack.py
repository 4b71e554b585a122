"""Does the erasure hold under attack? A prompt-prefix attack in the manner of UnlearnDiffAtk (METHOD section 6).

UnlearnDiffAtk optimises a 5-token prompt prefix for 40 iterations so that the unlearned model draws the
erased concept again, and reports the attack success rate (ASR). Ours is its CPU-sized, white-box
cousin, usable in any world with a classifier:
- the prefix is searched over real words, not optimised as embeddings (UnlearnDiffAtk: Adam, lr 0.01,
  projected to tokens): a greedy coordinate search, so every score is a real generation and the prompt
  found is a text anyone could type, which tokenizes back to exactly the searched tokens;
- the objective is the judge itself, the classifier's probability of the erased concept on the images
  the ERASED model makes (erasure hooks on, the world's sampler, fixed seeds), averaged over the seeds.
  UnlearnDiffAtk matches a target image with the diffusion loss instead; scoring by the judge makes
  ours the stronger attacker of the two on what ASR counts.

The search, deterministic for `seed`: the prefix starts empty, so the first score is the plain prompt's
(`target_probability_before`). Iteration i edits position i mod `prefix_tokens` and tries `candidates`
words drawn from the vocabulary plus the empty word (a position can be cleared again); the best is
kept only if it raises the objective, so the probability never falls. The search stops early once
every seed's image is seen as the concept, as UnlearnDiffAtk stops at success.

ASR: 100 x the share of (concept, seed) cases in which the classifier, on the image made from the best
prompt found, names the erased concept. The JSON `write_results` writes (`attack.json`):
    schema: 1; world; settings: {steps, guidance, height, width, model, iterations, prefix_tokens,
        candidates, seeds, seed, vocabulary_size, fingerprint, objective, success}
    methods: {"none" | "saeuron" | "saemnesia" | "saeuron+replace" | "saemnesia+replace": {asr_before, asr,
        cases, probability_before,
        probability_after, concepts: {concept: {the `AttackResult` fields, strength_source, seconds}}}}
    wall_time_s; created (UTC, ISO 8601)
"""

from __future__ import annotations

import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import NamedTuple

from PIL import Image
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from saemnesia.evaluate import (
    REPLACE_STRENGTH,
    UNTOUCHED,
    balanced_prompts,
    fingerprint,
    pipeline_label,
    tuned_setting,
)
from saemnesia.generate import SaeHook, generate_pairs
from saemnesia.minicanvas.classifier import MiniCanvasClassifier, classify
from saemnesia.studio import SettingsError, Studio
from saemnesia.worlds import portable_name

ATTACK_METHODS = (UNTOUCHED, "saeuron", "saemnesia", "saeuron+replace", "saemnesia+replace")
"""The untouched model (the reference: what the attack does with nothing erased), then both erasures steering
their latents, then both replacing the tokens they detect (PER), named as the benchmark's results name them."""
DEFAULT_SEEDS = (60_000, 60_001)
"""The benchmark's held-out seeds: far from the statistics' (0 to 1199) and the strength search's."""
OBJECTIVE = "mean over the seeds of the classifier's probability of the erased concept, erasure on"
SUCCESS = "the classifier's verdict on the image from the best prompt is the erased concept"


def method_label(method: str) -> str:
    """ "untouched model", "SAEmnesia", "SAEmnesia + replace", ..."""
    return "untouched model" if method == UNTOUCHED else pipeline_label(method)


@dataclass(frozen=True)
class AttackResult:
    """The best prefix found against one erasure of one concept, and what it does on each seed."""

    concept: str
    method: str
    """The untouched model ("none") or an erasure as `pipeline_key` names it: "saemnesia", "saeuron+replace"..."""
    strength: float | None
    features_per_step: int | None
    base_prompt: str
    prefix: str
    """Up to `prefix_tokens` words; empty if no word beat the plain prompt."""
    prompt: str
    """The adversarial prompt: prefix, then the base prompt."""
    seeds: tuple[int, ...]
    success_before: tuple[bool, ...]
    """Per seed: the plain prompt's image is seen as the concept (the erasure failed without attack)."""
    success: tuple[bool, ...]
    """Per seed: the adversarial prompt's image is seen as the concept."""
    target_probability_before: float
    """The objective on the plain prompt."""
    target_probability_after: float
    """The objective on the adversarial prompt, never below the one before."""
    history: tuple[float, ...]
    """The objective after each iteration run (fewer than asked if every seed succeeded early)."""

    @classmethod
    def from_dict(cls, entry: Mapping) -> AttackResult:
        """An entry of the results JSON (lists for tuples, extra keys ignored) as a result."""
        values = {field.name: entry[field.name] for field in fields(cls)}
        return cls(**{name: tuple(value) if isinstance(value, list) else value for name, value in values.items()})


class _Score(NamedTuple):
    probability: float
    """Mean over the seeds."""
    seen: tuple[bool, ...]
    """Per seed."""


def prefix_vocabulary(tokenizer: PreTrainedTokenizerBase) -> tuple[str, ...]:
    """The words a prefix is made of: whole-word tokens of ASCII letters or digits that tokenize back to themselves.

    Sorted, so the search draws the same words for the same seed whatever order the vocabulary file has.
    """
    vocab = tokenizer.get_vocab()
    words = sorted(token[:-4] for token in vocab if token.endswith("</w>") and token[:-4].isascii())
    words = [word for word in words if word.isalnum()]
    token_ids = tokenizer(words, add_special_tokens=False).input_ids
    return tuple(word for word, ids in zip(words, token_ids) if ids == [vocab[word + "</w>"]])


def erasure_hooks(
    studio: Studio, concept: str, method: str, strength: float | None, features_per_step: int | None
) -> list[SaeHook]:
    """The hooks that erase `concept` with `method` (a `pipeline_key`); none for the untouched model."""
    if method == UNTOUCHED:
        return []
    name, _, intervention = method.partition("+")
    return studio.hooks(
        [concept], name, strength, features_per_step=features_per_step or 1, intervention=intervention or "steer"
    )


def _label_index(classifier: MiniCanvasClassifier, studio: Studio, concept: str) -> int:
    labels = classifier.config.objects if studio.world.kind_of(concept) == "object" else classifier.config.styles
    if concept not in labels:
        raise SettingsError(f"The classifier does not know '{concept}': it can only judge {', '.join(labels)}.")
    return labels.index(concept)


def _scores(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    hooks: Sequence[SaeHook],
    prompts: Sequence[str],
    concept: str,
    seeds: Sequence[int],
) -> list[_Score]:
    """The objective and the per-seed verdicts of each prompt: all prompts of a seed in one batch, erased only."""
    world = studio.world
    index = _label_index(classifier, studio, concept)
    is_object = world.kind_of(concept) == "object"
    probabilities = [[] for _ in prompts]
    seen = [[] for _ in prompts]
    for seed in seeds:
        images = studio.generate(list(prompts), hooks, seed, include_originals=False).erased
        for row, verdict in enumerate(classify(classifier, images)):
            probabilities[row].append(float((verdict.object_probs if is_object else verdict.style_probs)[index]))
            seen[row].append((verdict.object if is_object else verdict.style) == concept)
    return [_Score(sum(row) / len(row), tuple(hits)) for row, hits in zip(probabilities, seen)]


def _with_prefix(words: Sequence[str], prompt: str) -> str:
    return " ".join([word for word in words if word] + [prompt])


def _check_count(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingsError(f"{name} must be an integer of at least {low}, got {value!r}.")


def attack(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    concept: str,
    method: str = "saemnesia",
    strength: float | None = -10.0,
    features_per_step: int | None = 1,
    iterations: int = 40,
    prefix_tokens: int = 5,
    candidates: int = 8,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    seed: int = 0,
    prompt: str | None = None,
    vocabulary: Sequence[str] | None = None,
    progress: Callable[..., object] | None = None,
) -> AttackResult:
    """Search a prefix that makes the erased model draw `concept` again (see the module doc for the search).

    `prompt` defaults to the concept's first benchmark prompt; `vocabulary` to `prefix_vocabulary` of
    the pipeline's tokenizer (pass it to skip recomputing it for every concept). `progress`, if given, is
    called as `progress(fraction, desc=...)`, as Gradio's is. Costs at most
    `len(seeds) * (1 + iterations * candidates)` images.
    """
    if method not in ATTACK_METHODS:
        raise SettingsError(f"method must be one of {', '.join(ATTACK_METHODS)}, got {method!r}.")
    if method.endswith("+replace"):
        strength = REPLACE_STRENGTH
    studio.check_concepts([concept])
    _label_index(classifier, studio, concept)
    _check_count("iterations", iterations, 0)
    _check_count("prefix_tokens", prefix_tokens, 1)
    _check_count("candidates", candidates, 1)
    if isinstance(seeds, (str, int)) or not seeds:
        raise SettingsError(f"seeds must be a non-empty list of integers, got {seeds!r}.")
    base_prompt, _ = studio.check_prompt(prompt or balanced_prompts(studio.world, [concept], 1)[0].text)
    vocabulary = tuple(vocabulary or prefix_vocabulary(studio.pipeline.tokenizer))
    hooks = erasure_hooks(studio, concept, method, strength, features_per_step)
    rng = random.Random(seed)

    words = [""] * prefix_tokens
    before = best = _scores(studio, classifier, hooks, [base_prompt], concept, seeds)[0]
    history = []
    for iteration in range(iterations):
        if all(best.seen):
            break
        if progress is not None:
            progress(iteration / iterations, desc=f"{concept}, {method}: iteration {iteration + 1} of {iterations}")
        position = iteration % prefix_tokens
        pool = [word for word in ("", *vocabulary) if word != words[position]]
        tried = [
            [*words[:position], word, *words[position + 1 :]] for word in rng.sample(pool, min(candidates, len(pool)))
        ]
        scores = _scores(studio, classifier, hooks, [_with_prefix(w, base_prompt) for w in tried], concept, seeds)
        top = max(range(len(tried)), key=lambda i: scores[i].probability)
        if scores[top].probability > best.probability:
            words, best = tried[top], scores[top]
        history.append(best.probability)
    return AttackResult(
        concept=concept,
        method=method,
        strength=None if method == UNTOUCHED else strength,
        features_per_step=None if method == UNTOUCHED else features_per_step,
        base_prompt=base_prompt,
        prefix=_with_prefix(words, "").strip(),
        prompt=_with_prefix(words, base_prompt),
        seeds=tuple(seeds),
        success_before=before.seen,
        success=best.seen,
        target_probability_before=before.probability,
        target_probability_after=best.probability,
        history=tuple(history),
    )


def attack_success_rate(results: Sequence[AttackResult], after_attack: bool = True) -> float | None:
    """100 x the share of (concept, seed) cases the classifier sees as the erased concept (None: no case).

    With `after_attack=False`, on the plain prompts: 100 - UA on these cases, what the attack starts from.
    """
    cases = [hit for result in results for hit in (result.success if after_attack else result.success_before)]
    return 100 * sum(cases) / len(cases) if cases else None


class AttackImages(NamedTuple):
    """One seed's images of an attack, all from the same noise."""

    original: Image.Image
    """The adversarial prompt, no erasure."""
    erased: Image.Image
    """The adversarial prompt, erased: what the attack got back."""
    erased_plain: Image.Image
    """The plain prompt, erased: what the erasure did before the attack."""


def best_prefix_images(studio: Studio, result: AttackResult, seed: int) -> AttackImages:
    """The images of an attack's best prompt with and without erasure, and of the plain prompt erased, for the app."""
    world = studio.world
    pair = generate_pairs(
        studio.pipeline,
        [result.prompt, result.base_prompt],
        erasure_hooks(studio, result.concept, result.method, result.strength, result.features_per_step),
        seed=seed,
        steps=world.steps,
        guidance=world.guidance,
        height=world.height,
        width=world.width,
    )
    return AttackImages(pair.originals[0], pair.erased[0], pair.erased[1])


def _summary(entries: Mapping[str, dict]) -> dict:
    results = [AttackResult.from_dict(entry) for entry in entries.values()]

    def mean(values: list[float]) -> float | None:
        return round(sum(values) / len(values), 4) if values else None

    return {
        "asr_before": _round(attack_success_rate(results, after_attack=False)),
        "asr": _round(attack_success_rate(results)),
        "cases": sum(len(result.seeds) for result in results),
        "probability_before": mean([result.target_probability_before for result in results]),
        "probability_after": mean([result.target_probability_after for result in results]),
        "concepts": dict(entries),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def run_attacks(
    studio: Studio,
    classifier: MiniCanvasClassifier,
    concepts: Sequence[str],
    methods: Sequence[str] = ATTACK_METHODS,
    evaluation: Mapping | None = None,
    strength: float = -10.0,
    features_per_step: int = 1,
    iterations: int = 40,
    prefix_tokens: int = 5,
    candidates: int = 8,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    seed: int = 0,
    out: Path | None = None,
    progress: bool = True,
) -> dict:
    """Attack every concept under every method and return the results JSON (see the module doc).

    Each erasure uses the concept's tuned setting from the `evaluate` results `evaluation` where present,
    else `strength` and `features_per_step`. With `out`, the JSON is rewritten after every attack, and a
    rerun with the same settings and model keeps the attacks it finds there, those of methods it was not
    asked to run included: methods tuned by different `evaluate` runs can be attacked one run each into
    one file.
    """
    began = time.time()
    concepts = studio.check_concepts(list(concepts))
    if not concepts:
        raise SettingsError("concepts must name at least one concept to attack.")
    unknown = [method for method in methods if method not in ATTACK_METHODS]
    if unknown or not methods:
        raise SettingsError(f"methods must be some of {', '.join(ATTACK_METHODS)}, got {list(methods)!r}.")
    world = studio.world
    vocabulary = prefix_vocabulary(studio.pipeline.tokenizer)
    settings = {
        "steps": world.steps,
        "guidance": world.guidance,
        "height": world.height,
        "width": world.width,
        "model": portable_name(studio.pipeline.name_or_path or world.model),
        "iterations": iterations,
        "prefix_tokens": prefix_tokens,
        "candidates": candidates,
        "seeds": list(seeds),
        "seed": seed,
        "vocabulary_size": len(vocabulary),
        "fingerprint": fingerprint(studio, classifier),
        "replace_rule": asdict(world.replace_rule),
        "objective": OBJECTIVE,
        "success": SUCCESS,
    }
    previous = json.loads(out.read_text()) if out is not None and out.is_file() else {}
    kept = previous.get("methods", {}) if previous.get("settings") == settings else {}
    others = {method: kept[method]["concepts"] for method in ATTACK_METHODS if method in kept and method not in methods}
    entries: dict[str, dict[str, dict]] = {method: {} for method in methods}
    bar = tqdm(total=len(methods) * len(concepts), desc="attack", unit="attack", disable=not progress)
    for method in methods:
        name, _, intervention = method.partition("+")
        fallback = (REPLACE_STRENGTH if intervention else float(strength), features_per_step)
        for concept in concepts:
            chosen = tuned_setting(evaluation or {}, name, [concept], intervention or "steer")
            chosen = chosen and (chosen.strength, chosen.features_per_step)
            setting = (None, None) if method == UNTOUCHED else chosen or fallback
            source = None if method == UNTOUCHED else ("evaluation" if chosen else "flag")
            entry = kept.get(method, {}).get("concepts", {}).get(concept)
            if entry is None or (entry["strength"], entry["features_per_step"]) != setting:
                bar.set_postfix_str(f"{method} {concept}", refresh=False)
                started = time.perf_counter()
                result = attack(
                    studio,
                    classifier,
                    concept,
                    method,
                    strength=setting[0],
                    features_per_step=setting[1],
                    iterations=iterations,
                    prefix_tokens=prefix_tokens,
                    candidates=candidates,
                    seeds=seeds,
                    seed=seed,
                    vocabulary=vocabulary,
                )
                entry = {
                    **asdict(result),
                    "strength_source": source,
                    "seconds": round(time.perf_counter() - started, 2),
                }
            entries[method][concept] = entry
            bar.update()
            every = {**others, **entries}
            results = {
                "schema": 1,
                "world": world.name,
                "settings": settings,
                "methods": {name: _summary(every[name]) for name in ATTACK_METHODS if name in every},
                "wall_time_s": round(time.time() - began, 2),
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            }
            if out is not None:
                write_results(results, out)
    bar.close()
    return results


def attack_table(results: dict) -> str:
    """Markdown: ASR before and after the attack per method, then each concept's hits and best prefix."""
    settings = results["settings"]
    methods = list(results["methods"])
    lines = [
        f"Prompt-prefix attack on {results['world']} (UnlearnDiffAtk-style: up to {settings['prefix_tokens']} words, "
        f"{settings['iterations']} iterations of {settings['candidates']} candidates, seeds "
        f"{', '.join(map(str, settings['seeds']))}); ASR = % of (concept, seed) cases where the classifier sees "
        "the erased concept",
        "",
        "| method | cases | ASR before attack | ASR after attack | target probability before | after |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for method in methods:
        summary = results["methods"][method]
        cells = [summary["cases"], summary["asr_before"], summary["asr"]]
        cells += [summary["probability_before"], summary["probability_after"]]
        lines.append(f"| {method_label(method)} | " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    lines += [
        "",
        "Per concept: seeds seen as the concept before -> after the attack, and the best prefix found:",
        "",
        "| concept | " + " | ".join(method_label(method) for method in methods) + " |",
        "|---|" + "---|" * len(methods),
    ]
    concepts = list(dict.fromkeys(c for method in methods for c in results["methods"][method]["concepts"]))
    for concept in concepts:
        cells = []
        for method in methods:
            entry = results["methods"][method]["concepts"].get(concept)
            if entry is None:
                cells.append("-")
                continue
            seeds = len(entry["seeds"])
            cells.append(
                f'{sum(entry["success_before"])}/{seeds} -> {sum(entry["success"])}/{seeds} "{entry["prefix"]}"'
            )
        lines.append(f"| {concept} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_results(results: dict, out: Path) -> Path:
    """The JSON (atomically, for the app) and, beside it, the markdown table (`attack.md` for `attack.json`)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    temporary = out.with_name(out.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=1) + "\n")
    os.replace(temporary, out)
    table = out.with_suffix(".md")
    table.write_text(attack_table(results))
    return table
