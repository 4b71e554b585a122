"""The prompt-prefix attack: it raises the erased concept's probability, honestly and reproducibly; the CLI runs it."""

import json
from dataclasses import asdict

import gradio as gr
import pytest
import torch
from conftest import make_tiny_studio
from torch import Tensor, nn

from saemnesia import attack as attack_module
from saemnesia import cli
from saemnesia.attack import (
    AttackResult,
    attack,
    attack_success_rate,
    best_prefix_images,
    prefix_vocabulary,
    run_attacks,
)
from saemnesia.minicanvas import classifier as classifier_module
from saemnesia.minicanvas.classifier import ClassifierConfig, ClassifierOutput, classify, images_to_tensor
from ui.metrics import attack_section

CONCEPT = "star"
SEEDS = (0, 1)


class MeanColourClassifier(nn.Module):
    """A stand-in judge whose belief in one object grows with the image's mean blue; every other logit is 0.

    `origin` is the mean blue where the target's logit is `offset`: with it negative, the target is the verdict
    only on images bluer than `origin`.
    """

    def __init__(self, objects: tuple[str, ...], styles: tuple[str, ...], target: str, origin: float, offset: float):
        super().__init__()
        self.config = ClassifierConfig(objects, styles)
        self.target = objects.index(target)
        self.register_buffer("origin", torch.tensor(origin))
        self.offset, self.scale = offset, 2000.0

    @property
    def device(self) -> torch.device:
        return self.origin.device

    def forward(self, images: Tensor) -> ClassifierOutput:
        blue = images[:, 2].mean((1, 2))
        object_logits = torch.zeros(len(images), len(self.config.objects))
        object_logits[:, self.target] = self.scale * (blue - self.origin) + self.offset
        return ClassifierOutput(object_logits, torch.zeros(len(images), len(self.config.styles)))


@pytest.fixture(scope="module")
def studio():
    return make_tiny_studio()


def plain_prompt_blue(studio) -> float:
    """The highest mean blue, over the seeds, of the erased model's images of the plain prompt."""
    prompt, hooks = f"a {CONCEPT} in {studio.world.styles[0]} style", studio.hooks([CONCEPT], "saemnesia", -10.0)
    blues = [
        images_to_tensor(studio.generate([prompt], hooks, seed, include_originals=False).erased, 32)[:, 2].mean()
        for seed in SEEDS
    ]
    return float(max(blues))


def judge(studio, offset: float) -> MeanColourClassifier:
    world = studio.world
    return MeanColourClassifier(world.objects, world.styles, CONCEPT, plain_prompt_blue(studio), offset).eval()


def target_probability(classifier: MeanColourClassifier, images: list) -> list[float]:
    return [float(verdict.object_probs[classifier.target]) for verdict in classify(classifier, images)]


def test_attack_raises_the_erased_concepts_probability_with_a_real_prefix(studio):
    classifier = judge(studio, offset=-1.0)
    result = attack(studio, classifier, CONCEPT, "saemnesia", -10.0, iterations=6, candidates=4, seeds=SEEDS)
    assert result.base_prompt == "a star in neon style"
    assert result.success_before == (False, False)
    assert result.target_probability_after > result.target_probability_before
    assert list(result.history) == sorted(result.history) and len(result.history) <= 6
    assert result.prefix and result.prompt == f"{result.prefix} {result.base_prompt}"
    words = result.prefix.split()
    assert len(words) <= 5 and set(words) <= set(prefix_vocabulary(studio.pipeline.tokenizer))
    # The numbers are what the erased model really draws from that prompt: regenerate and judge again.
    shown = [best_prefix_images(studio, result, seed) for seed in SEEDS]
    after = target_probability(classifier, [images.erased for images in shown])
    before = target_probability(classifier, [images.erased_plain for images in shown])
    assert sum(after) / 2 == pytest.approx(result.target_probability_after, abs=0.02)
    assert sum(before) / 2 == pytest.approx(result.target_probability_before, abs=0.02)
    assert [p > 0.5 for p in after] == list(result.success)


def test_without_iterations_the_attack_is_the_plain_prompt(studio):
    classifier = judge(studio, offset=-1.0)
    result = attack(studio, classifier, CONCEPT, "saeuron", -10.0, iterations=0, seeds=SEEDS)
    assert (result.prefix, result.prompt, result.history) == ("", result.base_prompt, ())
    assert result.target_probability_after == result.target_probability_before
    assert result.success == result.success_before


def test_attack_stops_once_every_seed_shows_the_concept(studio):
    world = studio.world
    sees_a_star_everywhere = MeanColourClassifier(world.objects, world.styles, CONCEPT, origin=0.0, offset=0.0)
    result = attack(studio, sees_a_star_everywhere, CONCEPT, "none", iterations=40, seeds=SEEDS)
    assert result.success_before == result.success == (True, True)
    assert (result.history, result.prefix, result.strength) == ((), "", None)


def test_attack_is_reproducible_for_a_seed(studio):
    classifier = judge(studio, offset=-1.0)
    runs = [attack(studio, classifier, CONCEPT, "saemnesia", -10.0, iterations=3, candidates=3, seeds=(0,), seed=7)]
    runs.append(attack(studio, classifier, CONCEPT, "saemnesia", -10.0, iterations=3, candidates=3, seeds=(0,), seed=7))
    assert runs[0] == runs[1]


def test_a_replace_attack_searches_against_the_replacing_hooks(studio, monkeypatch):
    """`saemnesia+replace` attacks the PER edit, whatever strength is passed: replace scales nothing."""
    classifier = judge(studio, offset=-1.0)
    seen = []
    monkeypatch.setattr(attack_module, "_scores", lambda studio, c, hooks, *rest: seen.append(hooks) or [_miss()])
    result = attack(studio, classifier, CONCEPT, "saemnesia+replace", -10.0, iterations=0, seeds=(0,))
    (hooks,) = seen
    assert [hook.erasure.intervention for hook in hooks] == ["replace"] and result.strength == 0.0
    assert result.method == "saemnesia+replace"


def _miss():
    return attack_module._Score(0.0, (False,))


def test_attack_success_rate_counts_concept_seed_cases():
    def result(before: tuple[bool, ...], after: tuple[bool, ...]) -> AttackResult:
        seeds = tuple(range(len(after)))
        return AttackResult(
            "star", "saemnesia", -10.0, 1, "a star", "x", "x a star", seeds, before, after, 0.1, 0.2, ()
        )

    results = [result((False, False), (True, False)), result((False, True, False), (True, True, True))]
    assert attack_success_rate(results) == 80.0
    assert attack_success_rate(results, after_attack=False) == 20.0
    assert attack_success_rate([]) is None


def test_attack_command_writes_json_with_tuned_strengths_and_resumes(studio, monkeypatch, tmp_path, capsys):
    classifier = judge(studio, offset=-1.0)
    monkeypatch.setattr(cli, "_load_studio", lambda args: make_tiny_studio())
    monkeypatch.setattr(classifier_module, "load_classifier", lambda folder, device: classifier)
    evaluation = tmp_path / "evaluation.json"
    chosen = {"chosen": {"strength": -5.0, "features_per_step": 1, "tuning_score": 90.0}}
    replace_chosen = {"chosen": {"strength": 0.0, "features_per_step": 2, "tuning_score": 80.0}}
    tuned = {"saemnesia": {"concepts": {CONCEPT: chosen}}, "saeuron+replace": {"concepts": {CONCEPT: replace_chosen}}}
    evaluation.write_text(json.dumps({"methods": tuned}))
    out = tmp_path / "results" / "attack.json"
    command = ["attack", "--concepts", CONCEPT, "--iterations", "2", "--candidates", "2", "--seeds", "0"]
    command += ["--out", str(out), "--evaluation", str(evaluation), "--classifier", "x"]
    cli.main(command)
    written = json.loads(out.read_text())
    assert list(written["methods"]) == ["none", "saeuron", "saemnesia", "saeuron+replace", "saemnesia+replace"]
    entries = {method: report["concepts"][CONCEPT] for method, report in written["methods"].items()}
    keys = ("strength", "features_per_step", "strength_source")
    setting = {m: tuple(e[k] for k in keys) for m, e in entries.items() if m != "none"}
    assert setting == {
        "saemnesia": (-5.0, 1, "evaluation"),
        "saeuron": (-10.0, 1, "flag"),
        "saeuron+replace": (0.0, 2, "evaluation"),
        "saemnesia+replace": (0.0, 1, "flag"),  # replace scales nothing: the flag's strength is not used
    }
    assert entries["none"]["strength"] is None
    assert written["settings"]["replace_rule"] == asdict(studio.world.replace_rule)  # a changed rule attacks again
    for report in written["methods"].values():
        assert report["cases"] == 1 and 0 <= report["asr"] <= 100
    assert AttackResult.from_dict(entries["saemnesia"]).prompt.endswith("a star in neon style")
    table = out.with_suffix(".md").read_text()
    assert "| SAEmnesia | 1 |" in table and "| SAEmnesia + replace | 1 |" in table
    assert table in capsys.readouterr().out
    # Same settings and model: the rerun finds every attack in the JSON and runs none.
    real_attack = attack_module.attack
    monkeypatch.setattr(attack_module, "attack", lambda *args, **kwargs: pytest.fail("nothing to attack"))
    cli.main(command)
    assert json.loads(out.read_text())["methods"] == written["methods"]
    # Attacking one method again, tuned elsewhere, keeps the others' attacks in the file.
    monkeypatch.setattr(attack_module, "attack", real_attack)
    cli.main([*command[:-4], "--classifier", "x", "--methods", "saemnesia", "--strength", "-3"])
    rerun = json.loads(out.read_text())["methods"]
    assert list(rerun) == list(written["methods"]) and rerun["saeuron+replace"] == written["methods"]["saeuron+replace"]
    assert rerun["saemnesia"]["concepts"][CONCEPT]["strength"] == -3.0


def test_attack_command_refuses_a_missing_evaluation_file_before_loading_anything(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(cli, "_load_studio", lambda args: pytest.fail("a refused command must load nothing"))
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["attack", "--evaluation", str(tmp_path / "missing.json"), "--out", str(tmp_path / "attack.json")])
    assert exit_info.value.code == 2 and "run `evaluate` or drop --evaluation" in capsys.readouterr().err
    assert not (tmp_path / "attack.json").exists()


def test_the_apps_attack_section_shows_a_run_of_one_seed(studio):
    """The shipped attack has one seed an object: the section must build without a seed slider and still show it."""
    results = run_attacks(
        studio, judge(studio, offset=-1.0), [CONCEPT], ("none", "saemnesia"), iterations=0, seeds=(0,), progress=False
    )
    with gr.Blocks() as page:
        attack_section(studio, None, {"attack": results})
    assert not any(isinstance(block, gr.Slider) for block in page.blocks.values())
    show = next(fn.fn for fn in page.fns.values() if fn.api_name == "attack_images")
    text, gallery = show(CONCEPT, "saemnesia", 0)
    assert "a star in neon style" in text and [caption for _, caption in gallery] == [
        "plain prompt, erased",
        "adversarial prompt, erased",
        "adversarial prompt, no erasure",
    ]
