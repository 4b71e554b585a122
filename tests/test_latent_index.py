"""The latent index on a tiny world: every figure equals a direct recomputation, and an interrupted run resumes to
the same index."""

import json

import pytest
import torch
from conftest import BLOCK, make_tiny_pipeline, make_tiny_sae, make_tiny_world

from saemnesia import latent_index
from saemnesia.concepts import build_dictionary
from saemnesia.latent_index import HISTOGRAM_EDGES, ImageTable, LatentIndex, index_latents
from saemnesia.train import collect, compute_stats
from saemnesia.train.activations import IMAGE, STEP

TINY_WORLD = make_tiny_world(objects=("circle", "square"))


@pytest.fixture(scope="module")
def activations(tmp_path_factory):
    folder = tmp_path_factory.mktemp("acts")
    return collect(TINY_WORLD, make_tiny_pipeline(), folder, seeds_per_prompt=2, images_per_shard=8, progress=False)


@pytest.fixture(scope="module")
def sae_and_stats(activations):
    sae = make_tiny_sae(num_latents=64, k=4)
    stats = compute_stats(sae, activations, BLOCK, progress=False)
    return sae, stats, build_dictionary(stats)


def dense_codes(sae, activations):
    """Every token's dense code `[images, steps, tokens, L]`, straight from the SAE."""
    parts, order = [], []
    for shard in range(activations.num_shards):
        tokens, labels = activations.load(shard, BLOCK)
        codes = sae.encode(tokens.float())
        parts.append(
            torch.zeros(*codes.top_acts.shape[:-1], sae.num_latents).scatter(-1, codes.top_indices, codes.top_acts)
        )
        order.append(labels[:, IMAGE] * 100 + labels[:, STEP])
    dense = torch.cat(parts)[torch.argsort(torch.cat(order))]
    steps = len(activations.timesteps)
    return dense.view(activations.num_images, steps, *dense.shape[1:])


def test_index_equals_a_direct_recomputation(activations, sae_and_stats, tmp_path):
    sae, stats, dictionary = sae_and_stats
    summary = index_latents(
        activations, [("supervised", BLOCK, sae, stats, dictionary)], tmp_path, top=3, progress=False
    )
    index = LatentIndex.load(tmp_path, "supervised", BLOCK)
    dense = dense_codes(sae, activations)  # [images, steps, tokens, L]
    flat = dense.flatten(0, 2)

    assert index.tokens == len(flat) and summary["seconds"] >= 0
    assert torch.equal(index.fire_counts, (flat > 0).sum(0))
    assert torch.allclose(index.activation_sums.float(), flat.sum(0), atol=1e-4)
    assert torch.allclose(index.max_activations, flat.amax(0))
    assert torch.equal(index.histogram.sum(1), index.fire_counts)
    bins = (torch.bucketize(flat[flat[:, 5] > 0, 5], HISTOGRAM_EDGES) - 1).clamp(0, len(HISTOGRAM_EDGES) - 2)
    assert torch.equal(index.histogram[5], torch.bincount(bins, minlength=len(HISTOGRAM_EDGES) - 1))

    per_step = dense.amax(dim=2)  # [images, steps, L]: the largest activation over each image's tokens
    score, peak = per_step.mean(1), per_step.argmax(1)  # [images, L]
    for latent in range(sae.num_latents):
        firing = score[:, latent] > 0
        expected = torch.argsort(score[:, latent], descending=True, stable=True)[: min(3, int(firing.sum()))]
        kept = index.top_images[latent][index.top_images[latent] >= 0]
        assert len(kept) == len(expected)
        assert torch.allclose(index.top_activations[latent, : len(kept)], score[kept, latent])
        assert torch.allclose(score[kept, latent], score[expected, latent])
        for slot, image in enumerate(kept.tolist()):
            assert int(index.top_steps[latent, slot]) == int(peak[image, latent])
            average_map = dense[image, :, :, latent].mean(0)
            assert torch.allclose(index.top_maps[latent, slot].float(), average_map, atol=1e-2)

    rows = torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)
    cosine = rows @ rows.t()
    cosine.fill_diagonal_(-2)
    assert torch.equal(index.nearest[:, 0], cosine.argmax(1))
    assert index.concepts[dictionary.latent("circle")]["bound"] == "circle"

    table = ImageTable.load(tmp_path)
    assert set(table.ids.tolist()) == set(index.top_images[index.top_images >= 0].tolist())
    assert table.thumbnails.shape[1:] == (TINY_WORLD.height, TINY_WORLD.width, 3)
    assert table.seeds[0] == activations.settings["first_seed"] + int(table.ids[0])


def test_an_interrupted_index_resumes_to_the_same_figures(activations, sae_and_stats, tmp_path, monkeypatch):
    sae, stats, dictionary = sae_and_stats
    saes = [("supervised", BLOCK, sae, stats, dictionary)]
    index_latents(activations, saes, tmp_path / "whole", top=3, progress=False)
    monkeypatch.setattr(latent_index, "CHECKPOINT_EVERY", 1)
    calls = {"count": 0}
    original_add = latent_index._Accumulator.add

    def add_then_fail(self, *args, **kwargs):
        calls["count"] += 1
        if calls["count"] == 3:
            raise KeyboardInterrupt
        original_add(self, *args, **kwargs)

    monkeypatch.setattr(latent_index._Accumulator, "add", add_then_fail)
    with pytest.raises(KeyboardInterrupt):
        index_latents(activations, saes, tmp_path / "resumed", top=3, progress=False)
    assert (tmp_path / "resumed" / f"supervised--{BLOCK}.partial.json").is_file()
    monkeypatch.setattr(latent_index._Accumulator, "add", original_add)
    index_latents(activations, saes, tmp_path / "resumed", top=3, progress=False)
    whole, resumed = (LatentIndex.load(tmp_path / name, "supervised", BLOCK) for name in ("whole", "resumed"))
    for field in ("top_images", "top_steps", "fire_counts", "histogram", "nearest"):
        assert torch.equal(getattr(whole, field), getattr(resumed, field)), field
    assert not (tmp_path / "resumed" / f"supervised--{BLOCK}.partial.json").exists()


def test_cli_prints_a_latents_page_and_refuses_what_it_cannot_show(tmp_path, monkeypatch, capsys):
    from conftest import index_tiny_studio, make_tiny_studio

    from saemnesia import cli

    studio = make_tiny_studio()
    index_tiny_studio(studio, tmp_path)
    monkeypatch.setattr(cli, "_load_studio", lambda args: studio)
    cli.main(["latent", "heart"])
    page = json.loads(capsys.readouterr().out)
    latent = studio.bundles["saemnesia", "object"].dictionary.latent("heart")
    assert page["latent"] == latent and page["concept"]["bound"] == "heart"
    assert len(page["top_images"]) == int((studio.bundles["saemnesia", "object"].index.top_images[latent] >= 0).sum())
    assert [n["latent"] for n in page["nearest"]] == studio.bundles["saemnesia", "object"].index.nearest[
        latent
    ].tolist()
    for argv, message in ((["latent", "700"], "latent must be a concept name or an integer in [0, 255]"),
                          (["latent", "dragon"], "Unknown concept")):  # fmt: skip
        with pytest.raises(SystemExit):
            cli.main(argv)
        assert message in capsys.readouterr().err
    studio.bundles["saemnesia", "object"].index = None
    with pytest.raises(SystemExit):
        cli.main(["latent", "heart"])
    assert "make one with `index-latents`" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(["index-latents", "--activations", str(tmp_path / "nowhere")])
    assert "No activations in" in capsys.readouterr().err


def test_a_corrupt_or_foreign_index_is_refused_with_the_fix(activations, sae_and_stats, tmp_path):
    sae, stats, dictionary = sae_and_stats
    index_latents(activations, [("supervised", BLOCK, sae, stats, dictionary)], tmp_path, top=2, progress=False)
    (tmp_path / f"supervised--{BLOCK}.safetensors").write_bytes(b"not a tensor file")
    with pytest.raises(ValueError, match="not a readable latent index.*index-latents"):
        LatentIndex.load(tmp_path, "supervised", BLOCK)
    (tmp_path / "images.json").write_text("{")
    with pytest.raises(ValueError, match="no readable image table.*index-latents"):
        ImageTable.load(tmp_path)
