"""Patch replacement (PER): the SAE detects the concept's tokens, undetected ones of the same map replace them."""

import numpy as np
import pytest
import torch
from conftest import BLOCK

from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.erase import (
    PreparedEdit,
    ReplaceRule,
    StepEdit,
    detected_tokens,
    grid_distances,
    replace_tokens,
    replacement_sources,
    saemnesia_erasure,
    saeuron_erasure,
)
from saemnesia.generate import SaeHook, _replace_erased_rows, generate_pairs


def one_latent_edit(sae, latent: int, threshold: float) -> PreparedEdit:
    return PreparedEdit.of(sae, StepEdit(torch.tensor([latent]), torch.tensor([-1.0]), torch.tensor([threshold])))


def pre_activations(sae, tokens: torch.Tensor, latent: int) -> torch.Tensor:
    with torch.no_grad():
        return sae.encode(tokens, return_pre_acts=True).pre_acts[:, latent]


def between_two_values(values: torch.Tensor, quantile: float) -> float:
    """A threshold halfway between two neighbouring values, so float rounding cannot flip a token."""
    ordered = values.flatten().sort().values
    index = int(quantile * (len(ordered) - 1))
    return float(ordered[index : index + 2].mean())


def test_detection_reads_the_pre_activation_above_the_threshold(tiny_sae):
    """Above the threshold, and never at or below zero: a latent that does not fire detects nothing, so a
    negative threshold (a concept whose latent is silent on the others) detects where the latent fires."""
    tokens = torch.randn(40, tiny_sae.d_in, generator=torch.Generator().manual_seed(0))
    pre_acts = pre_activations(tiny_sae, tokens, 7)
    threshold = between_two_values(pre_acts[pre_acts > 0], 0.5)
    detected = detected_tokens(tokens, one_latent_edit(tiny_sae, 7, threshold))
    assert torch.equal(detected, pre_acts > threshold) and 0 < detected.sum() < (pre_acts > 0).sum()
    below_zero = between_two_values(pre_acts[pre_acts < 0], 0.5)
    assert torch.equal(detected_tokens(tokens, one_latent_edit(tiny_sae, 7, below_zero)), pre_acts > 0)


def test_each_detected_token_takes_the_nearest_undetected_one():
    detected = torch.tensor([[True, False, False, True], [False, False, False, False], [True, True, True, True]])
    sources = replacement_sources(detected, grid_distances(2, 2))
    # 2 x 2 map, row-major: token 0 is next to 1 and 2 (tie: the first); token 3 is next to 1 and 2 as well.
    assert sources.tolist() == [[1, 1, 2, 1], [0, 1, 2, 3], [-1, -1, -1, -1]]
    maps = torch.randn(3, 4, 5)
    replaced = replace_tokens(maps, sources)
    assert torch.equal(replaced[0, [0, 3]], maps[0, [1, 1]]) and torch.equal(replaced[0, 1:3], maps[0, 1:3])
    assert torch.equal(replaced[1:], maps[1:]), "nothing detected, or nothing to take from: left as it is"
    fallback = torch.randn(3, 4, 5)
    assert torch.equal(replace_tokens(maps, sources, fallback)[2], fallback[2])


def test_replace_with_nothing_detected_returns_the_block_output_exactly(tiny_sae):
    hidden = torch.randn(4, tiny_sae.d_in, 3, 3)
    edited, sources, detected = _replace_erased_rows(hidden, 2, 1, one_latent_edit(tiny_sae, 7, 1e9))
    assert not detected.any()
    assert torch.equal(edited, hidden) and torch.equal(sources, torch.arange(9).repeat(2, 1, 1))


def test_replace_changes_only_detected_tokens_of_erased_rows_each_half_on_its_own(tiny_sae):
    torch.manual_seed(0)
    hidden = torch.randn(4, tiny_sae.d_in, 3, 3)  # [uncond original, uncond erased, cond original, cond erased]
    tokens = hidden.permute(0, 2, 3, 1).reshape(4, 9, -1)
    pre_acts = pre_activations(tiny_sae, tokens.reshape(36, -1), 7).view(4, 9)
    threshold = between_two_values(pre_acts, 0.6)
    as_written = ReplaceRule(sticky=False, fallback="none")
    edited, sources, _ = _replace_erased_rows(hidden, 2, 1, one_latent_edit(tiny_sae, 7, threshold), as_written)
    assert torch.equal(edited[[0, 2]], hidden[[0, 2]]), "originals untouched"
    new_tokens = edited.permute(0, 2, 3, 1).reshape(4, 9, -1)
    for half, row in enumerate((1, 3)):
        detected = pre_acts[row] > threshold
        assert torch.equal(sources[half, 0] != torch.arange(9), detected)
        assert torch.equal(new_tokens[row, ~detected], tokens[row, ~detected])
        for token in detected.nonzero().flatten().tolist():
            source = int(sources[half, 0, token])
            assert not detected[source], "a value always comes from an undetected token of the same map"
            assert torch.equal(new_tokens[row, token], tokens[row, source])
    assert (sources[:, 0] != torch.arange(9)).any()


def planted_stats(sae, pipeline) -> tuple[ConceptStats, ConceptDictionary, int]:
    """Statistics where the latent firing most on a plain run's star image is the star's, threshold 0."""
    plain = generate_pairs(pipeline, ["a star"], [SaeHook(BLOCK, sae, record=True)], seed=1, steps=2)
    latent = int(torch.mode(plain.traces[BLOCK].top_indices[0, 0].flatten()).values)
    mean_acts = torch.zeros(4, 2, sae.num_latents)
    mean_acts[0, :, latent] = 5.0
    stats = ConceptStats(
        ["star", "circle", "neon", "sketch"], ["object", "object", "style", "style"], torch.tensor([999, 0]), mean_acts
    )
    return stats, ConceptDictionary({"star": latent}, {"star": "object"}), latent


@pytest.mark.parametrize("method", ["saemnesia", "saeuron"])
def test_replace_pair_keeps_the_original_and_records_detections_and_sources(tiny_pipeline, tiny_sae, method):
    stats, dictionary, latent = planted_stats(tiny_sae, tiny_pipeline)
    erasure = (
        saemnesia_erasure(stats, dictionary, ["star"], -1.0, intervention="replace")
        if method == "saemnesia"
        else saeuron_erasure(stats, ["star"], -1.0, 1, intervention="replace")
    )
    plain = generate_pairs(tiny_pipeline, ["a star"], seed=1, steps=2)
    result = generate_pairs(
        tiny_pipeline, ["a star"], [SaeHook(BLOCK, tiny_sae, erasure, record=True)], seed=1, steps=2
    )
    quiet = generate_pairs(tiny_pipeline, ["a star"], [SaeHook(BLOCK, tiny_sae, erasure)], seed=1, steps=2)
    assert np.array_equal(np.asarray(result.originals[0]), np.asarray(plain.originals[0]))
    assert np.array_equal(np.asarray(quiet.erased[0]), np.asarray(result.erased[0])), "recording changes nothing"
    trace = result.traces[BLOCK]
    assert trace.edited[:, 1].any() and not trace.edited[:, 0].any()
    positions = torch.arange(trace.sources.shape[-1])
    assert torch.equal(trace.sources[:, 0], positions.expand_as(trace.sources[:, 0]))
    assert torch.equal(trace.sources[:, 1] != positions, trace.edited[:, 1])
    assert result.settings["erasures"][0]["intervention"] == "replace"
    if not trace.edited[:, 1].all():
        assert not np.array_equal(np.asarray(result.erased[0]), np.asarray(plain.erased[0]))


def test_unknown_intervention_is_refused():
    stats = ConceptStats(["star"], ["object"], torch.tensor([999]), torch.ones(1, 1, 8))
    with pytest.raises(ValueError, match="intervention must be one of steer, replace"):
        saeuron_erasure(stats, ["star"], -1.0, intervention="scrub")


def test_drift_calls_steered_tokens_out_of_range_and_copied_tokens_in_range():
    from saemnesia.drift import drift_of_pair

    torch.manual_seed(0)
    steps, prompts, channels = 3, 4, 16
    untouched = torch.randn(steps, prompts, channels, 4, 4)
    edited = torch.zeros(steps, 2 * prompts, 16, dtype=torch.bool)
    edited[:, prompts:, :5] = True
    steered = untouched.clone()
    steered[..., 0, :] *= -20  # the first row of tokens (5 of them edited) pushed far out
    copied = untouched.clone()
    copied[..., 0, :] = untouched[..., 3, :]  # the same tokens copied from the last row of the same map

    def outputs(erased: torch.Tensor) -> torch.Tensor:  # halves x (originals, erased), unconditional first
        return torch.cat([untouched, untouched, untouched, erased], dim=1)

    far = drift_of_pair(outputs(steered), edited, prompts)
    near = drift_of_pair(outputs(copied), edited, prompts)
    assert far["edited_norm_outside"].view(steps, prompts, 5)[..., :4].all(), "the four steered tokens"
    assert near["edited_norm_outside"].float().mean() < 0.2
    assert len(far["edited_norms"]) == steps * prompts * 5


def test_a_fully_detected_conditional_map_takes_the_unconditional_one_only_under_the_fallback(tiny_sae):
    hidden = torch.randn(4, tiny_sae.d_in, 2, 2)  # [uncond original, uncond erased, cond original, cond erased]
    nothing, everything = one_latent_edit(tiny_sae, 7, 1e9), torch.ones(2, 4, dtype=torch.bool)  # sticky from before
    kept, sources, detected = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(fallback="none"), everything)
    assert torch.equal(kept, hidden) and (sources == -1).all() and detected.all()
    fallen, *_ = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(fallback="unconditional"), everything)
    assert torch.equal(fallen[3], hidden[1]), "the conditional erased map takes its unconditional twin"
    assert torch.equal(fallen[[0, 1, 2]], hidden[[0, 1, 2]])


def test_one_detected_token_hands_the_whole_map_to_the_fallback_under_the_map_scope(tiny_sae):
    hidden = torch.randn(4, tiny_sae.d_in, 2, 2)  # [uncond original, uncond erased, cond original, cond erased]
    nothing, one = one_latent_edit(tiny_sae, 7, 1e9), torch.tensor([[False] * 4, [True, False, False, False]])
    tokens, *_ = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(), one)
    assert torch.equal(tokens[3, :, 0, 1:], hidden[3, :, 0, 1:]), "the token scope keeps the undetected tokens"
    whole, _, detected = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(scope="map"), one)
    assert torch.equal(whole[3], hidden[1]) and torch.equal(whole[[0, 1, 2]], hidden[[0, 1, 2]])
    assert torch.equal(detected, one), "the detection itself stays token by token"
    spared, *_ = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(scope="map", map_share=0.25), one)
    assert torch.equal(spared, tokens), "a quarter detected is not more than a quarter: only the token goes"
    with pytest.raises(ValueError, match=r"map_share must be in \[0, 1\)"):
        ReplaceRule(scope="map", map_share=1.0)
    with pytest.raises(ValueError, match="needs the 'unconditional' fallback"):
        ReplaceRule(scope="map", fallback="none")
    with pytest.raises(ValueError, match="scope must be one of tokens, map"):
        ReplaceRule(scope="image")


def test_the_sticky_mask_keeps_earlier_detections_and_the_mean_source_averages(tiny_sae):
    hidden = torch.randn(2, tiny_sae.d_in, 2, 2)  # no guidance: [original, erased]
    earlier = torch.tensor([[True, False, False, False]])
    nothing = one_latent_edit(tiny_sae, 7, 1e9)
    out, sources, detected = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(), earlier)
    assert detected.tolist() == earlier.tolist() and sources[0, 0].tolist() == [1, 1, 2, 3]
    tokens = hidden.permute(0, 2, 3, 1).reshape(2, 4, -1)
    out, *_ = _replace_erased_rows(hidden, 2, 1, nothing, ReplaceRule(source="mean"), earlier)
    new_tokens = out.permute(0, 2, 3, 1).reshape(2, 4, -1)
    torch.testing.assert_close(new_tokens[1, 0], tokens[1, 1:].mean(0))
    assert torch.equal(new_tokens[1, 1:], tokens[1, 1:]) and torch.equal(out[0], hidden[0])
    with pytest.raises(ValueError, match="fallback must be one of none, unconditional"):
        ReplaceRule(fallback="nearest")
