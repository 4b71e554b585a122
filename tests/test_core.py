"""The spine: SAE, hooks, the erasure edit and paired generation, on tiny models."""

import json

import numpy as np
import pytest
import torch
from conftest import BLOCK, make_tiny_pipeline, make_tiny_sae
from diffusers import UNet2DConditionModel

from saemnesia.concepts import ConceptDictionary, ConceptStats, UnknownConceptError, build_dictionary
from saemnesia.erase import (
    PreparedEdit,
    StepEdit,
    apply_step_edit,
    features_for_percentile,
    saemnesia_erasure,
    saeuron_erasure,
)
from saemnesia.generate import SaeHook, SaeMismatchError, generate_pairs, initial_noise
from saemnesia.hooks import HookPointError, hooked_block
from saemnesia.sae import Sae, SaeLoadError
from saemnesia.worlds import SD_V14_UNET_CONFIG


def make_stats(num_latents: int = 256, steps: int = 2) -> ConceptStats:
    generator = torch.Generator().manual_seed(0)
    mean_acts = torch.rand(4, steps, num_latents, generator=generator) * 0.1
    for concept, latent in enumerate((10, 20, 30, 40)):
        mean_acts[concept, :, latent] += 5.0
    timesteps = torch.linspace(999, 0, steps).round()
    return ConceptStats(
        ["star", "circle", "neon", "sketch"], ["object", "object", "style", "style"], timesteps, mean_acts
    )


def test_sae_round_trip_in_sparsify_layout(tmp_path, tiny_sae):
    tiny_sae.save(tmp_path / "sae")
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae.safetensors"]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert {"d_in", "k", "num_latents", "expansion_factor", "normalize_decoder"} <= set(cfg)
    loaded = Sae.load(tmp_path / "sae")
    x = torch.randn(5, tiny_sae.d_in)
    assert torch.equal(loaded(x), tiny_sae(x))


def test_encode_returns_topk_of_relu_and_pre_acts(tiny_sae):
    x = torch.randn(3, tiny_sae.d_in)
    codes = tiny_sae.encode(x, return_pre_acts=True)
    assert codes.top_acts.shape == (3, tiny_sae.cfg.k)
    expected = torch.relu(codes.pre_acts).topk(tiny_sae.cfg.k).values.sort(-1).values
    assert torch.allclose(codes.top_acts.sort(-1).values, expected)
    dense = torch.zeros(3, tiny_sae.num_latents).scatter(-1, codes.top_indices, codes.top_acts)
    assert torch.allclose(tiny_sae(x), dense @ tiny_sae.W_dec + tiny_sae.b_dec, atol=1e-5)


@pytest.mark.parametrize(
    "cfg, message",
    [
        ({"k": 4}, "lacks d_in"),
        ({"d_in": 32, "num_latents": 8, "k": 16}, "exceeds num_latents"),
        ({"d_in": 32, "num_latents": 64, "k": 4, "activation": "groupmax"}, "only plain TopK"),
        ({"d_in": 32, "num_latents": 64, "k": -1}, "positive integer"),
    ],
)
def test_bad_sae_config_is_refused_with_reason(tmp_path, tiny_sae, cfg, message):
    tiny_sae.save(tmp_path)
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(SaeLoadError, match=message):
        Sae.load(tmp_path)


def test_corrupt_or_missing_sae_files_are_refused(tmp_path, tiny_sae):
    with pytest.raises(SaeLoadError, match="No cfg.json"):
        Sae.load(tmp_path)
    tiny_sae.save(tmp_path)
    (tmp_path / "sae.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(SaeLoadError, match="not a readable safetensors"):
        Sae.load(tmp_path)


def test_sae_wider_than_block_is_refused_naming_both_widths(tiny_pipeline):
    with pytest.raises(SaeMismatchError, match="64-wide.*outputs 32 channels"):
        generate_pairs(tiny_pipeline, ["a star"], [SaeHook(BLOCK, make_tiny_sae(d_in=64))], steps=1)


def test_unknown_hook_point_lists_the_real_ones(tiny_pipeline):
    with pytest.raises(HookPointError, match="up_blocks.1.attentions.1"):
        with hooked_block(tiny_pipeline.unet, "up_blocks.7.attentions.0"):
            pass


def test_empty_edit_returns_block_output_exactly(tiny_sae):
    tokens = torch.randn(10, tiny_sae.d_in)
    nothing = StepEdit(torch.tensor([3]), torch.tensor([-5.0]), torch.tensor([1e9]))
    out, mask = apply_step_edit(tokens, tiny_sae.encode(tokens), PreparedEdit.of(tiny_sae, nothing))
    assert torch.equal(out, tokens) and not mask.any()


def test_edit_changes_only_tokens_where_latent_fires(tiny_sae):
    tokens = torch.randn(50, tiny_sae.d_in)
    codes = tiny_sae.encode(tokens)
    latent = int(codes.top_indices[0, codes.top_acts[0].argmax()])
    edit = StepEdit(torch.tensor([latent]), torch.tensor([-3.0]), torch.tensor([0.0]))
    out, mask = apply_step_edit(tokens, codes, PreparedEdit.of(tiny_sae, edit))
    activation = (codes.top_acts * (codes.top_indices == latent)).sum(-1)
    assert torch.equal(mask, activation > 0) and mask.any()
    assert torch.equal(out[~mask], tokens[~mask])
    expected = tokens[mask] + (activation[mask] * -4.0)[:, None] * tiny_sae.W_dec[latent]
    assert torch.allclose(out[mask], expected, atol=1e-5)


def test_paired_generation_without_erasure_equals_plain_diffusers(tiny_pipeline, tiny_sae):
    hooks = [SaeHook(BLOCK, tiny_sae, record=True)]
    result = generate_pairs(tiny_pipeline, ["a star", "a neon moon"], hooks, seed=3, steps=2)
    noise = initial_noise(tiny_pipeline, 3, 16, 16)
    plain_batch = tiny_pipeline(
        ["a star", "a neon moon"] * 2, latents=noise.repeat(4, 1, 1, 1), num_inference_steps=2, guidance_scale=5.0
    ).images
    for index in range(2):
        assert np.array_equal(np.asarray(result.originals[index]), np.asarray(plain_batch[index]))
        assert np.array_equal(np.asarray(result.erased[index]), np.asarray(plain_batch[index]))
    single = tiny_pipeline(
        "a star",
        generator=torch.Generator().manual_seed(3),
        num_inference_steps=2,
        output_type="np",
        guidance_scale=5.0,
    ).images[0]
    assert np.abs(np.asarray(result.originals[0], np.float32) / 255 - single).max() <= 1 / 255


def test_erasure_changes_only_the_erased_rows(tiny_pipeline, tiny_sae):
    stats = make_stats(num_latents=tiny_sae.num_latents)
    plain = generate_pairs(tiny_pipeline, ["a star"], [SaeHook(BLOCK, tiny_sae, record=True)], seed=1, steps=2)
    latent = int(torch.mode(plain.traces[BLOCK].top_indices[0, 0].flatten()).values)
    dictionary = ConceptDictionary({"star": latent}, {"star": "object"})
    stats.mean_acts[:, :, latent] = torch.tensor([[5.0], [0.0], [0.0], [0.0]])
    erasure = saemnesia_erasure(stats, dictionary, ["star"], strength=-20.0)
    erased = generate_pairs(
        tiny_pipeline, ["a star"], [SaeHook(BLOCK, tiny_sae, erasure, record=True)], seed=1, steps=2
    )
    assert np.array_equal(np.asarray(erased.originals[0]), np.asarray(plain.originals[0]))
    assert not np.array_equal(np.asarray(erased.erased[0]), np.asarray(plain.erased[0]))
    assert erased.traces[BLOCK].edited[:, 1].any() and not erased.traces[BLOCK].edited[:, 0].any()


def test_a_float16_unet_is_edited_by_the_sae_in_float16(tmp_path, tiny_sae):
    pipeline = make_tiny_pipeline().to(torch.float16)
    tiny_sae.save(tmp_path / "sae")
    sae = Sae.load(tmp_path / "sae", dtype=torch.float16)
    assert {parameter.dtype for parameter in sae.parameters()} == {torch.float16}
    plain = generate_pairs(pipeline, ["a star"], [SaeHook(BLOCK, sae, record=True)], seed=1, steps=2)
    assert plain.traces[BLOCK].top_acts.dtype == torch.float32
    latent = int(torch.mode(plain.traces[BLOCK].top_indices[0, 0].flatten()).values)
    stats = make_stats(num_latents=sae.num_latents)
    stats.mean_acts[:, :, latent] = torch.tensor([[5.0], [0.0], [0.0], [0.0]])
    erasure = saemnesia_erasure(stats, ConceptDictionary({"star": latent}, {"star": "object"}), ["star"], -20.0)
    erased = generate_pairs(pipeline, ["a star"], [SaeHook(BLOCK, sae, erasure)], seed=1, steps=2)
    assert np.array_equal(np.asarray(erased.originals[0]), np.asarray(plain.originals[0]))
    assert not np.array_equal(np.asarray(erased.erased[0]), np.asarray(plain.erased[0]))


def test_hook_is_removed_when_generation_raises(tiny_pipeline, tiny_sae):
    before = generate_pairs(tiny_pipeline, ["a star"], seed=2, steps=2).originals[0]

    def explode(hidden, step):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with hooked_block(tiny_pipeline.unet, BLOCK, explode):
            tiny_pipeline("a star", num_inference_steps=2)
    after = generate_pairs(tiny_pipeline, ["a star"], seed=2, steps=2).originals[0]
    assert np.array_equal(np.asarray(before), np.asarray(after))
    assert not tiny_pipeline.unet.get_submodule(BLOCK)._forward_hooks


def test_steps_are_counted_per_generation(tiny_pipeline):
    for _ in range(2):
        with hooked_block(tiny_pipeline.unet, BLOCK, record=True) as hook:
            tiny_pipeline("a star", num_inference_steps=3)
        assert hook.step == 3 and hook.outputs[0].shape[0] == 2


def test_stable_diffusion_v14_unet_gives_1280_wide_block():
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(SD_V14_UNET_CONFIG)
    with hooked_block(unet, BLOCK, record=True) as hook, torch.no_grad():
        unet(torch.randn(2, 4, 16, 16), 10, torch.randn(2, 3, 768))
    assert hook.outputs[0].shape == (2, 1280, 4, 4)


def test_saeuron_picks_top_latents_and_saemnesia_the_dictionary_latent():
    stats = make_stats()
    dictionary = build_dictionary(stats)
    assert dictionary.latents == {"star": 10, "circle": 20, "neon": 30, "sketch": 40}
    saemnesia = saemnesia_erasure(stats, dictionary, ["star", "neon"], strength=-5.0)
    assert saemnesia.steps[0].latents.tolist() == [10, 30]
    assert torch.allclose(saemnesia.steps[0].multipliers, -5.0 * stats.mean_acts[[0, 2], 0, [10, 30]])
    saeuron = saeuron_erasure(stats, ["star"], strength=-5.0, features_per_step=3)
    assert saeuron.steps[1].latents[0] == 10 and len(saeuron.steps[1].latents) == 3
    assert [features_for_percentile(p, 20480) for p in (99.999, 99.995, 99.99)] == [1, 2, 3]


@pytest.mark.parametrize("strength", [float("nan"), float("inf"), 5.0, -1e6])
def test_bad_strength_is_refused(strength):
    stats = make_stats()
    with pytest.raises(ValueError, match="strength must be a finite number"):
        saemnesia_erasure(stats, build_dictionary(stats), ["star"], strength)


def test_unknown_concept_is_named():
    stats = make_stats()
    with pytest.raises(UnknownConceptError, match="'unicorn'.*known concepts: star"):
        saemnesia_erasure(stats, build_dictionary(stats), ["unicorn"], -5.0)


def test_stats_and_dictionary_round_trip(tmp_path):
    stats = make_stats()
    stats.save(tmp_path / "stats.safetensors")
    loaded = ConceptStats.load(tmp_path / "stats.safetensors")
    assert loaded.concepts == stats.concepts and torch.equal(loaded.mean_acts, stats.mean_acts)
    dictionary = build_dictionary(stats)
    dictionary.save(tmp_path / "dictionary.json")
    assert ConceptDictionary.load(tmp_path / "dictionary.json") == dictionary
