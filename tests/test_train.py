"""Making the SAEs on tiny models: collection, SAeUron training, statistics, SAEmnesia fine-tuning."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import BLOCK, make_tiny_pipeline, make_tiny_sae, make_tiny_world, two_process_environment
from safetensors.torch import load_file, save_file

from saemnesia.cli import main
from saemnesia.concepts import ConceptDictionary, ConceptStats, build_dictionary
from saemnesia.generate import initial_noise, sampler_timesteps
from saemnesia.hooks import hooked_block
from saemnesia.sae import Sae
from saemnesia.train import (
    LABELS,
    Activations,
    FinetuneConfig,
    SaeTrainConfig,
    centralisation_report,
    centralisation_table,
    collect,
    compute_stats,
    decoder_overlap,
    evaluate_sae,
    evaluate_supervised,
    finetune,
    geometric_median,
    heldout_images,
    labelled_prompts,
    supervised_loss,
    train_sae,
    write_centralisation,
)

TINY_WORLD = make_tiny_world(objects=("circle", "square"))
SHARD_SETTINGS = {"seeds_per_prompt": 2, "images_per_shard": 8}  # 2 x 2 x 3 prompts x 2 seeds = 24 images
FAST_SAE = SaeTrainConfig(expansion_factor=4, k=8, batch_size=256, epochs=10, lr=3e-3, holdout=0.2)


@pytest.fixture(scope="module")
def activations(tmp_path_factory) -> Activations:
    return collect(TINY_WORLD, make_tiny_pipeline(), tmp_path_factory.mktemp("acts"), progress=False, **SHARD_SETTINGS)


@pytest.fixture(scope="module")
def trained(activations) -> tuple[Sae, dict]:
    return train_sae(activations, BLOCK, FAST_SAE, progress=False)


def test_collect_stores_conditional_tokens_with_labels(activations):
    settings = activations.settings
    assert activations.num_shards == 3 and activations.num_images == 24
    assert activations.concepts == ["circle", "square", "sunset", "ocean"]
    assert set(settings["blocks"]) == {TINY_WORLD.object_block, TINY_WORLD.style_block}
    shard = load_file(activations.folder / activations.manifest["shards"][0])
    assert shard[BLOCK].dtype == torch.float16 and shard[BLOCK].shape == (8 * 2 * 64, 32)
    labels = shard["labels"].long()
    assert labels.shape == (8 * 2, len(LABELS))
    prompts = labelled_prompts(TINY_WORLD)
    timesteps = sampler_timesteps(make_tiny_pipeline(), TINY_WORLD.steps)
    for object_id, style_id, prompt_id, step, timestep, image in labels.tolist():
        assert prompt_id == image % len(prompts)
        assert (prompts[prompt_id].object, prompts[prompt_id].style) == (object_id, style_id)
        assert timestep == timesteps[step]

    # The stored tokens of image 0 are the conditional half of the block output, step by step.
    pipeline = make_tiny_pipeline()
    with hooked_block(pipeline.unet, BLOCK, record=True) as hook:
        pipeline(
            prompt=[prompts[0].text],
            latents=initial_noise(pipeline, settings["first_seed"], 16, 16),
            num_inference_steps=2,
            guidance_scale=TINY_WORLD.guidance,
            height=16,
            width=16,
            output_type="latent",
        )
    tokens, _ = activations.load(0, BLOCK)
    for step, output in enumerate(hook.outputs):
        conditional = output[1].permute(1, 2, 0).reshape(64, 32)
        assert torch.allclose(tokens[step].float(), conditional, atol=2e-3, rtol=1e-2)


class InterruptAfter:
    """A pipeline that stops the collection (as Ctrl-C would) after a number of calls."""

    def __init__(self, pipeline, calls: int):
        self.pipeline, self.calls = pipeline, calls

    def __getattr__(self, name):
        return getattr(self.pipeline, name)

    def __call__(self, **kwargs):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        return self.pipeline(**kwargs)


def test_interrupted_collection_resumes_to_identical_shards(activations, tmp_path):
    pipeline = make_tiny_pipeline()
    with pytest.raises(KeyboardInterrupt):
        collect(TINY_WORLD, InterruptAfter(pipeline, calls=1), tmp_path, progress=False, **SHARD_SETTINGS)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["shards"] == ["shard-00000.safetensors"] and not manifest["complete"]
    with pytest.raises(ValueError, match="unfinished"):
        Activations.open(tmp_path)
    first_shard_written = (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns

    resumed = collect(TINY_WORLD, pipeline, tmp_path, progress=False, **SHARD_SETTINGS)
    assert (tmp_path / "shard-00000.safetensors").stat().st_mtime_ns == first_shard_written
    for name in activations.manifest["shards"]:
        assert (tmp_path / name).read_bytes() == (activations.folder / name).read_bytes()
    assert resumed.manifest == activations.manifest


def test_collect_refuses_a_folder_made_with_other_settings(activations, tmp_path):
    shutil.copy(activations.folder / "manifest.json", tmp_path / "manifest.json")
    with pytest.raises(ValueError, match="seeds_per_prompt"):
        collect(TINY_WORLD, make_tiny_pipeline(), tmp_path, seeds_per_prompt=1, images_per_shard=8, progress=False)


def test_heldout_split_is_by_image_and_nested():
    small, large = heldout_images(100, 0.1), heldout_images(100, 0.2)
    assert small.sum() == 10 and large.sum() == 20 and bool((large | ~small).all())


def test_geometric_median_ignores_an_outlier():
    points = torch.cat(
        [torch.randn(50, 3, generator=torch.Generator().manual_seed(0)) * 0.1, torch.full((1, 3), 100.0)]
    )
    assert geometric_median(points).norm() < 0.2 < points.mean(0).norm()


def test_unsupervised_training_lowers_heldout_fvu(activations, trained, tmp_path):
    sae, report = trained
    heldout = heldout_images(activations.num_images, FAST_SAE.holdout, FAST_SAE.seed)
    untrained = Sae(sae.cfg)
    untrained.b_dec.data.copy_(sae.b_dec.data)
    before = evaluate_sae(untrained, activations, BLOCK, heldout)["fvu"]
    assert report["heldout"]["fvu"] < 0.7 * before
    assert 0 <= report["heldout"]["dead_share"] <= 1 and report["heldout"]["tokens"] == 5 * 2 * 64
    assert report["history"][-1]["train_fvu"] < report["history"][0]["train_fvu"]
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(sae.num_latents), atol=1e-5)
    assert (sae.cfg.d_in, sae.cfg.num_latents, sae.cfg.k) == (32, 128, 8)
    sae.save(tmp_path)
    x = torch.randn(3, 32)
    assert torch.equal(Sae.load(tmp_path)(x), sae(x))


def test_stats_are_concepts_by_steps_by_latents_and_match_a_direct_mean(activations, trained):
    sae = trained[0]
    stats = compute_stats(sae, activations, BLOCK, progress=False)
    assert stats.mean_acts.shape == (4, 2, sae.num_latents)
    assert stats.kinds == ["object", "object", "style", "style"]
    assert torch.equal(stats.timesteps, activations.timesteps)

    # "ocean" (style 1) at step 1, by hand: mean over its images' tokens of the dense codes.
    parts = []
    for shard in range(activations.num_shards):
        tokens, labels = activations.load(shard, BLOCK)
        parts.append(tokens[(labels[:, 1] == 1) & (labels[:, 3] == 1)].flatten(0, 1).float())
    codes = sae.encode(torch.cat(parts))
    dense = torch.zeros(len(codes.top_acts), sae.num_latents).scatter(-1, codes.top_indices, codes.top_acts)
    assert torch.allclose(stats.mean_acts[3, 1], dense.mean(0), atol=1e-5)


def test_dictionary_gives_every_concept_its_own_latent(activations, trained):
    dictionary = build_dictionary(compute_stats(trained[0], activations, BLOCK, progress=False))
    assert set(dictionary.latents) == set(activations.concepts)
    assert len(set(dictionary.latents.values())) == 4


def write_planted_collection(folder, objects: int = 3, styles: int = 3, repeats: int = 4) -> Activations:
    """A collection in `collect`'s layout whose tokens carry one direction per object and per style.

    The tiny random UNet barely tells prompts apart (the seed explains most of its output), so
    whether fine-tuning binds concepts to latents is checked on activations that hold them.
    """
    generator = torch.Generator().manual_seed(0)
    steps, positions, width, images = (
        2,
        16,
        32,
        [(o, s) for _ in range(repeats) for o in range(objects) for s in range(styles)],
    )
    directions = torch.nn.functional.normalize(torch.randn(objects + styles, width, generator=generator), dim=1)
    shards = []
    for index, start in enumerate(range(0, len(images), 12)):
        labels, tokens = [], []
        for image in range(start, min(start + 12, len(images))):
            o, s = images[image]
            for step in range(steps):
                labels.append([o, s, o * styles + s, step, 900 - 400 * step, image])
                noise = torch.randn(positions, width, generator=generator)
                tokens.append(noise + 2 * directions[o] + 2 * directions[objects + s])
        shards.append(f"shard-{index:05d}.safetensors")
        tensors = {BLOCK: torch.cat(tokens).half(), "labels": torch.tensor(labels, dtype=torch.int32)}
        save_file(tensors, str(folder / shards[-1]))
    settings = {
        "objects": [f"object{i}" for i in range(objects)],
        "styles": [f"style{i}" for i in range(styles)],
        "blocks": [BLOCK],
        "timesteps": [900 - 400 * step for step in range(steps)],
        "num_images": len(images),
    }
    blocks = {BLOCK: {"width": width, "tokens_per_image": positions}}
    manifest = {"settings": settings, "blocks": blocks, "shards": shards, "complete": True}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return Activations.open(folder)


@pytest.mark.parametrize("supervision", ["bce", "bce-balanced", "ce"])
def test_fine_tuning_binds_planted_concepts_to_their_dictionary_latents(tmp_path, supervision):
    planted = write_planted_collection(tmp_path)
    unsupervised = SaeTrainConfig(expansion_factor=4, k=8, batch_size=128, epochs=10, lr=3e-3, holdout=0.2)
    sae, _ = train_sae(planted, BLOCK, unsupervised, progress=False)
    dictionary = build_dictionary(compute_stats(sae, planted, BLOCK, progress=False))
    config = FinetuneConfig(supervision=supervision, lr=3e-3, epochs=6, batch_size=8)
    tuned, report = finetune(sae, planted, BLOCK, dictionary, config, progress=False)
    before, after = report["heldout_before"], report["heldout_after"]
    assert after["supervision"] < before["supervision"] and after["total"] < before["total"]
    assert after["object_accuracy"] == after["style_accuracy"] == 1.0
    train = [epoch["train"]["total"] for epoch in report["history"][1:]]
    assert train[-1] < train[0]
    assert torch.allclose(tuned.W_dec.norm(dim=1), torch.ones(sae.num_latents), atol=1e-5)


TRAIN_SCRIPT = """
import sys
import torch
from accelerate import PartialState
from safetensors.torch import save_file
from saemnesia.train import Activations, SaeTrainConfig, train_sae

torch.set_num_threads(1)
processes = PartialState(cpu=True)
config = SaeTrainConfig(expansion_factor=4, k=8, batch_size=128, epochs=2, lr=3e-3, holdout=0.2)
sae, report = train_sae(Activations.open(sys.argv[1]), sys.argv[2], config, progress=False, processes=processes)
save_file(sae.state_dict(), f"{sys.argv[3]}/rank{processes.process_index}.safetensors")
if processes.is_main_process:
    save_file({"steps": torch.tensor(report["steps"]), "processes": torch.tensor(report["processes"]),
               "fvu": torch.tensor(report["heldout"]["fvu"])}, f"{sys.argv[3]}/report.safetensors")
"""


def test_two_cpu_processes_train_one_sae_on_half_the_batches_each(activations, tmp_path):
    script = tmp_path / "train_two.py"
    script.write_text(TRAIN_SCRIPT)
    environment = two_process_environment()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script)]
    run = subprocess.run(
        [*command, str(activations.folder), BLOCK, str(tmp_path)], env=environment, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-3000:]
    first, second = load_file(tmp_path / "rank0.safetensors"), load_file(tmp_path / "rank1.safetensors")
    assert all(torch.equal(first[name], second[name]) for name in first)  # gradients averaged: one SAE
    report = load_file(tmp_path / "report.safetensors")
    train_tokens = activations.num_tokens(BLOCK, ~heldout_images(activations.num_images, 0.2))
    assert int(report["processes"]) == 2 and int(report["steps"]) == 2 * (train_tokens // 128 // 2)
    assert 0 < float(report["fvu"]) < 1


def test_fine_tuning_keeps_the_best_heldout_epoch(activations, trained):
    sae = trained[0]
    dictionary = build_dictionary(compute_stats(sae, activations, BLOCK, progress=False))
    config = FinetuneConfig(lr=1e-2, epochs=4, batch_size=8, patience=2)
    tuned, report = finetune(sae, activations, BLOCK, dictionary, config, progress=False)
    heldout = heldout_images(activations.num_images, config.holdout, config.seed)
    assert report["heldout_after"]["total"] == min(epoch["heldout"]["total"] for epoch in report["history"])
    assert evaluate_supervised(tuned, activations, BLOCK, dictionary, heldout, config) == report["heldout_after"]
    assert report["epochs_run"] <= report["best_epoch"] + config.patience
    assert report["heldout_images"] == 5
    with pytest.raises(ValueError, match="concept_weight must be >= 0"):
        finetune(sae, activations, BLOCK, dictionary, FinetuneConfig(concept_weight=-1.0), progress=False)


def test_supervised_loss_combines_its_terms_with_the_paper_weights():
    sae = make_tiny_sae()
    tokens = torch.randn(6, 4, 32)
    objects, styles = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    config = FinetuneConfig()
    loss = supervised_loss(sae, tokens, objects, styles, torch.tensor([3, 7]), torch.tensor([10, 11, 12]), config)
    expected = loss.reconstruction + 3.0 * (loss.supervision + 0.1 * loss.decorrelation) + 0.01 * loss.sparsity
    assert torch.allclose(loss.total, expected)
    assert 0 <= loss.decorrelation.item() <= 1
    logits = sae.pre_activations(tokens.flatten(0, 1)).relu().view(6, 4, -1).mean(1)[:, [3, 7, 10, 11, 12]]
    targets = torch.tensor(
        [[1, 0, 1, 0, 0], [0, 1, 1, 0, 0], [1, 0, 0, 1, 0], [0, 1, 0, 1, 0], [1, 0, 0, 0, 1], [0, 1, 0, 0, 1]]
    )
    assert torch.allclose(
        loss.supervision, torch.nn.functional.binary_cross_entropy_with_logits(logits, targets.float())
    )


def test_balanced_bce_pulls_each_latent_up_on_its_images_as_hard_as_the_others_push_it_down():
    """Positive terms weigh (concepts of the kind - 1): 1 for two objects, 2 for three styles."""
    sae = make_tiny_sae()
    tokens = torch.randn(6, 4, 32)
    objects, styles = torch.tensor([0, 1, 0, 1, 0, 1]), torch.tensor([0, 0, 1, 1, 2, 2])
    config = FinetuneConfig(supervision="bce-balanced")
    loss = supervised_loss(sae, tokens, objects, styles, torch.tensor([3, 7]), torch.tensor([10, 11, 12]), config)
    logits = sae.pre_activations(tokens.flatten(0, 1)).relu().view(6, 4, -1).mean(1)[:, [3, 7, 10, 11, 12]]
    targets = torch.cat([torch.nn.functional.one_hot(objects, 2), torch.nn.functional.one_hot(styles, 3)], 1).float()
    weights = 1 + targets * torch.tensor([0.0, 0.0, 1.0, 1.0, 1.0])
    expected = -(weights * targets * torch.nn.functional.logsigmoid(logits))
    expected -= (1 - targets) * torch.nn.functional.logsigmoid(-logits)
    assert torch.allclose(loss.supervision, expected.mean())


def test_supervision_reads_the_latents_after_relu_so_silent_latents_cannot_win():
    """Latents far below zero count as silent (logit 0), as in sparsify's `pre_acts`: CE is then uniform."""
    sae = make_tiny_sae()
    with torch.no_grad():
        sae.encoder.weight[[3, 7, 10, 11, 12]] = 0.0
        sae.encoder.bias[[3, 7, 10, 11, 12]] = torch.tensor([-100.0, -1.0, -100.0, -5.0, -1.0])
    tokens = torch.randn(2, 4, 32)
    objects, styles = torch.tensor([0, 1]), torch.tensor([0, 2])
    ce = supervised_loss(
        sae, tokens, objects, styles, torch.tensor([3, 7]), torch.tensor([10, 11, 12]), FinetuneConfig(supervision="ce")
    )
    assert ce.supervision.item() == pytest.approx((math.log(2) + math.log(3)) / 2)
    bce = supervised_loss(
        sae, tokens, objects, styles, torch.tensor([3, 7]), torch.tensor([10, 11, 12]), FinetuneConfig()
    )
    assert bce.supervision.item() == pytest.approx(math.log(2))


def test_centralisation_report_compares_variants(tmp_path):
    mean_acts = torch.zeros(2, 3, 16)
    mean_acts[0, :, 4] = 5.0  # "star": one latent holds its score
    mean_acts[1, :, 8] = mean_acts[1, :, 9] = 2.0  # "neon": split over two latents
    stats = ConceptStats(["star", "neon"], ["object", "style"], torch.tensor([900, 500, 100]), mean_acts)
    dictionary = ConceptDictionary({"star": 4, "neon": 9}, {"star": "object", "neon": "style"})
    supervised = ConceptStats(stats.concepts, stats.kinds, stats.timesteps, mean_acts.clone())
    supervised.mean_acts[1, :, 8] = 0.0
    sae = make_tiny_sae()
    with torch.no_grad():
        sae.W_dec[[4, 9]] = torch.eye(32)[[0, 0]] * torch.tensor([[1.0], [-3.0]])  # antiparallel: |cos| 1
    overlaps = {"supervised": decoder_overlap(sae, dictionary)}
    variants = {"unsupervised": (stats, dictionary), "supervised": (supervised, dictionary)}
    report = centralisation_report(variants, overlaps=overlaps)
    assert report["summary"]["supervised"]["decoder_overlap"] == pytest.approx(1.0)
    assert report["summary"]["unsupervised"]["decoder_overlap"] is None
    star, neon = report["concepts"]
    assert star["unsupervised"]["best_share"] == pytest.approx(1.0) and star["unsupervised"]["best_is_dictionary"]
    assert neon["unsupervised"]["best_share"] == pytest.approx(0.5)
    assert neon["supervised"]["best_share"] == pytest.approx(1.0) and neon["supervised"]["best_is_dictionary"]
    assert report["summary"]["supervised"]["best_is_dictionary"] == 2
    write_centralisation(report, tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text()) == report
    table = centralisation_table(report)
    assert "| neon | style | 0.50 |" in table and table.count("\n| ") == 2
    assert "decoder rows mean |cos| 1.00" in table


def test_cli_trains_takes_stats_fine_tunes_and_reports(activations, tmp_path, capsys):
    unsupervised, supervised = tmp_path / "unsupervised", tmp_path / "supervised"
    # The style block's tokens, named as another hook point for objects: `--block` decides what is read.
    block = ["--kind", "object", "--block", TINY_WORLD.style_block]
    common = ["--activations", str(activations.folder), *block, "--device", "cpu"]
    main(["train-sae", *common, "--out", str(unsupervised), "--expansion-factor", "4", "--k", "4"]
         + ["--batch-size", "256", "--epochs", "2", "--learning-rate", "3e-3", "--holdout", "0.2"])  # fmt: skip
    assert json.loads((unsupervised / "training.json").read_text())["block"] == TINY_WORLD.style_block
    main(["stats", *common, "--sae", str(unsupervised)])
    stats = ConceptStats.load(unsupervised / "stats.safetensors")
    dictionary = ConceptDictionary.load(unsupervised / "dictionary.json")
    assert stats.mean_acts.shape == (4, 2, 128) and len(set(dictionary.latents.values())) == 4
    main(["finetune", *common, "--sae", str(unsupervised), "--out", str(supervised)]
         + ["--learning-rate", "1e-3", "--epochs", "2", "--batch-size", "8", "--supervision", "ce"]
         + ["--concept-weight", "10"])  # fmt: skip
    assert ConceptDictionary.load(supervised / "dictionary.json").latents == dictionary.latents
    assert ConceptStats.load(supervised / "stats.safetensors").mean_acts.shape == (4, 2, 128)
    config = json.loads((supervised / "training.json").read_text())["config"]
    assert config["supervision"] == "ce" and config["concept_weight"] == 10.0
    main(["centralisation", *block, "--unsupervised", str(unsupervised), "--supervised", str(supervised)])
    report = json.loads((supervised / "centralisation.json").read_text())
    assert report["block"] == TINY_WORLD.style_block
    assert report["variants"] == ["unsupervised", "supervised"] and len(report["concepts"]) == 4
    assert "| circle | object |" in capsys.readouterr().out
