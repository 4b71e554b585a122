"""Paint: a latent moved along its decoder row on the masked tokens only, at its steps; an empty mask changes
nothing; every bad setting is refused by name."""

import json
import math

import pytest
import torch
from conftest import make_tiny_studio

from saemnesia.concepts import ConceptFootprints
from saemnesia.erase import footprint_edit, paint_edit
from saemnesia.generate import SaeHook
from saemnesia.studio import SettingsError

PROMPT = "a star in neon style"


@pytest.fixture(scope="module")
def studio():
    return make_tiny_studio()


def centre_mask(studio, kind: str = "object") -> torch.Tensor:
    height, width = studio.token_grid(kind)
    mask = torch.zeros(height, width)
    mask[height // 4 : 3 * height // 4, width // 4 : 3 * width // 4] = 1
    return mask


def test_an_empty_mask_gives_the_original_exactly(studio):
    empty = torch.zeros(studio.token_grid("object")).tolist()
    result = studio.paint(PROMPT, "star", empty, strength=50.0)
    assert torch.equal(
        torch.tensor(list(result.originals[0].getdata())), torch.tensor(list(result.erased[0].getdata()))
    )
    latent = studio.resolve_latent("star", "object")[1]
    assert result.settings["paints"] == [
        {"block": studio.world.object_block, "latent": latent, "footprint": False, "tokens": 0, "steps": [0, 1]}
    ]


def test_paint_moves_only_the_masked_tokens_of_the_hooked_block_at_its_steps(studio):
    bundle, latent, concept = studio.resolve_latent("star", "object")
    mask = centre_mask(studio).flatten().bool()
    paint = paint_edit(bundle.stats, concept, latent, 20.0, mask, (1, 1))
    hook = SaeHook(bundle.block, bundle.sae, None, keep_outputs=True, paint=paint)
    result = studio.generate([PROMPT], [hook], seed=3)
    outputs = result.block_outputs[bundle.block]  # [steps, rows, C, h, w]: [uncond orig, uncond painted, cond ...]
    original, painted = outputs[:, 0::2], outputs[:, 1::2]
    assert torch.equal(original[0], painted[0])  # step 0 is not painted
    change = (painted[1] - original[1]).flatten(2).transpose(1, 2)  # [halves, h*w, C]
    assert torch.equal(change[:, ~mask], torch.zeros_like(change[:, ~mask]))
    step_amount = float(paint.amounts[1])  # the tiny world's statistics have one step per sampler step
    direction = bundle.sae.W_dec.detach()[latent]
    assert step_amount != 0
    assert torch.allclose(change[:, mask], (step_amount * direction).expand_as(change[:, mask]), atol=1e-5)
    assert result.erased[0] != result.originals[0]


def test_the_trace_marks_the_painted_tokens_of_the_painted_image_only(studio):
    result = studio.paint(PROMPT, "heart", centre_mask(studio).tolist(), strength=30.0)
    trace = result.traces[studio.world.object_block]
    assert bool(trace.edited[-1, 1].any()) and not bool(trace.edited[-1, 0].any())
    assert torch.equal(trace.edit_mask(0, 1).float(), centre_mask(studio))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"mask": [[1, 0], [0, 1]]}, "mask must be a 8 x 8 grid"),
        ({"mask": "everywhere"}, "mask must be a 8 x 8 grid"),
        ({"mask": [[2] * 8] * 8}, "holds other values"),
        ({"target": 10_000}, "latent must be a concept name or an integer in [0, 255]"),
        ({"target": -1}, "latent must be a concept name or an integer"),
        ({"target": "unicorn"}, "Unknown concept"),
        ({"strength": math.nan}, "strength must be a finite number"),
        ({"strength": math.inf}, "strength must be a finite number"),
        ({"strength": 1e6}, "strength must be in [-100, 100]"),
        ({"steps_painted": (0, 2)}, "last painted step must be an integer in [0, 1]"),
        ({"steps_painted": (1, 0)}, "is after the last"),
        ({"kind": "colour", "target": 3}, "kind must be 'object' or 'style'"),
        ({"seed": -4}, "seed must be in"),
        ({"prompt": " "}, "prompt must be a non-empty text"),
    ],
)
def test_bad_paint_settings_are_refused_by_name_and_leave_the_model_alone(studio, changes, message):
    settings = {"prompt": PROMPT, "target": "star", "mask": centre_mask(studio).tolist(), "strength": 10.0, **changes}
    with pytest.raises((SettingsError, KeyError), match=message.replace("[", r"\[").replace("]", r"\]")):
        studio.paint(**settings)
    assert not any(module._forward_hooks for module in studio.pipeline.unet.modules())


def test_the_object_region_is_where_minicanvas_draws_its_object():
    from saemnesia.evaluate.painting import object_region

    region = object_region(8, 8).view(8, 8)
    assert region[1:7, 1:7].all() and int(region.sum()) == 36
    assert int(object_region(4, 4).sum()) == 4


def test_paint_benchmark_tunes_on_the_tuning_seed_and_reports_held_out_rates(studio, with_footprints):
    from saemnesia.evaluate.painting import FOOTPRINT_STRENGTHS, HELDOUT_SEEDS, INSERTION_STRENGTHS, measure_paint
    from saemnesia.minicanvas.classifier import ClassifierConfig, MiniCanvasClassifier

    torch.manual_seed(0)
    world = studio.world
    judge = MiniCanvasClassifier(ClassifierConfig(world.objects, world.styles, image_size=world.height)).eval()
    report = measure_paint(studio, judge, None, objects=["star"], prompts=2)
    star = report["objects"]["star"]
    tuning = star["insertion"]["tuning"]
    assert list(tuning) == [str(s) for s in INSERTION_STRENGTHS]
    score = {s: (trial["rate"] + trial["style_kept"]) / 2 for s, trial in tuning.items()}
    assert score[str(star["insertion"]["strength"])] == max(score.values())
    assert star["local_erasure"]["strength"] < 0 and set(star["full_erasure"]) == {"steer", "replace"}
    assert report["mean"]["insertion"]["rate"] == round(star["insertion"]["heldout"]["rate"], 2)
    assert report["mean"]["insertion"]["ar"] is None  # no detector, no artifact rate
    assert report["settings"]["heldout_seeds"] == list(HELDOUT_SEEDS)
    footprint = star["footprint_insertion"]
    assert list(footprint["tuning"]) == [str(s) for s in FOOTPRINT_STRENGTHS]
    assert report["mean"]["footprint_insertion"]["rate"] == round(footprint["heldout"]["rate"], 2)


def test_cli_paints_a_box_and_refuses_bad_settings_by_name(studio, tmp_path, monkeypatch, capsys):
    from saemnesia import cli

    monkeypatch.setattr(cli, "_load_studio", lambda args: studio)
    base = ["paint", "--prompt", PROMPT, "--concept", "heart", "--strength", "20", "--out", str(tmp_path)]
    cli.main([*base, "--box", "2", "2", "5", "5", "--steps-painted", "0", "1"])
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert settings["paints"][0]["tokens"] == 16 and sum(map(sum, settings["mask"])) == 16
    assert (tmp_path / "original.png").is_file() and (tmp_path / "painted.png").is_file()
    for extra, message in (
        (["--steps-painted", "0", "7"], "last painted step must be an integer in [0, 1]"),
        (["--box", "0", "0", "1", "1", "--strength", "nan"], "strength must be a finite number"),
    ):
        with pytest.raises(SystemExit):
            cli.main([*base, *extra])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["paint", "--prompt", PROMPT, "--latent", "9999", "--strength", "5", "--out", str(tmp_path)])
    assert "latent must be a concept name or an integer in [0, 255]" in capsys.readouterr().err


@pytest.fixture
def with_footprints(studio):
    """The object SAE with random footprints, for the length of one test."""
    bundle = studio.bundle("saemnesia", "object")
    height, width = studio.token_grid("object")
    generator = torch.Generator().manual_seed(5)
    shape = (len(studio.world.objects), len(bundle.stats.timesteps), height * width, bundle.sae.cfg.d_in)
    bundle.footprints = ConceptFootprints(
        list(studio.world.objects), bundle.stats.timesteps, torch.randn(shape, generator=generator)
    )
    yield bundle
    bundle.footprints = None


def test_a_footprint_moves_the_masked_tokens_of_the_conditional_half_only_token_by_token(studio, with_footprints):
    bundle = with_footprints
    latent = bundle.dictionary.latent("heart")
    mask = centre_mask(studio).flatten().bool()
    paint = footprint_edit(bundle.footprints, "heart", latent, 1.5, mask, (1, 1))
    hook = SaeHook(bundle.block, bundle.sae, None, keep_outputs=True, paint=paint)
    outputs = studio.generate([PROMPT], [hook], seed=3).block_outputs[bundle.block]
    original, painted = outputs[:, 0::2], outputs[:, 1::2]  # [steps, halves, C, h, w]
    assert torch.equal(original[:, 0], painted[:, 0])  # the unconditional half is left alone
    change = (painted[1, 1] - original[1, 1]).flatten(1).T  # [h*w, C], step 1
    assert torch.equal(change[~mask], torch.zeros_like(change[~mask]))
    expected = 1.5 * bundle.footprints.of("heart")[1][mask]
    assert torch.allclose(change[mask], expected, atol=1e-5)


def test_footprint_paint_through_the_studio_records_it_and_refuses_what_has_none(studio, with_footprints):
    empty = torch.zeros(studio.token_grid("object")).tolist()
    result = studio.paint(PROMPT, "heart", empty, strength=2.0, footprint=True)
    assert result.erased[0].tobytes() == result.originals[0].tobytes()
    assert result.settings["paints"][0]["footprint"] is True
    with pytest.raises(SettingsError, match="a footprint is a concept's: give a concept name, not 3"):
        studio.paint(PROMPT, 3, empty, strength=2.0, footprint=True)
    with pytest.raises(SettingsError, match="has no footprints: make them with"):
        studio.paint(PROMPT, "neon", empty, strength=2.0, kind="style", footprint=True)


def test_footprints_round_trip_and_a_wrong_file_is_named(tmp_path):
    footprints = ConceptFootprints(["star", "heart"], torch.tensor([900, 400]), torch.randn(2, 2, 4, 3))
    footprints.save(tmp_path / "footprints.safetensors")
    loaded = ConceptFootprints.load(tmp_path / "footprints.safetensors")
    assert loaded.concepts == ["star", "heart"]
    assert torch.allclose(loaded.of("heart"), footprints.of("heart"), atol=1e-2)  # stored as float16
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="is not a concept footprints file"):
        ConceptFootprints.load(tmp_path / "bad.safetensors")


def test_footprints_are_each_concepts_mean_reconstruction_minus_the_mean_of_its_kinds_others(studio, tmp_path):
    from saemnesia.train import collect, compute_footprints
    from saemnesia.train.activations import OBJECT, STEP

    bundle = studio.bundle("saemnesia", "object")
    activations = collect(
        studio.world, studio.pipeline, tmp_path, seeds_per_prompt=1, images_per_shard=4, progress=False
    )
    footprints = compute_footprints(bundle.sae, activations, bundle.block, "object", batch_size=3, progress=False)
    parts = [activations.load(shard, bundle.block) for shard in range(activations.num_shards)]
    tokens, labels = torch.cat([p[0] for p in parts]).float(), torch.cat([p[1] for p in parts])
    with torch.no_grad():
        rebuilt = bundle.sae(tokens)
    objects = list(activations.objects)

    def mean(name: str, step: int) -> torch.Tensor:
        rows = (labels[:, OBJECT] == objects.index(name)) & (labels[:, STEP] == step)
        return rebuilt[rows].mean(0)

    for step in range(len(activations.timesteps)):
        others = torch.stack([mean(o, step) for o in objects if o != "star"]).mean(0)
        assert torch.allclose(footprints.of("star")[step], mean("star", step) - others, atol=1e-5)
    assert footprints.concepts == objects
