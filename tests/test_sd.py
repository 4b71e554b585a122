"""Stable Diffusion v1.x at full scale, tested offline: the real loading code on random models of SD's
architecture, published SAE layouts written with their exact shapes, nudity, several processes, GPU smoke."""

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import two_process_environment
from diffusers import DDIMScheduler, PNDMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import save_file

from saemnesia import nudity
from saemnesia.cli import main
from saemnesia.concepts import ConceptDictionary, ConceptStats
from saemnesia.generate import SaeHook
from saemnesia.hooks import block_width, hooked_block
from saemnesia.sae import Sae, SaeConfig, SaeLoadError, load_sae
from saemnesia.train import (
    Activations,
    FinetuneConfig,
    SaeTrainConfig,
    collect,
    finetune,
    process_shards,
    train_sae,
    write_stats,
)
from saemnesia.worlds import SD_EVAL_STEPS, SD_MODELS, WORLDS, load_pipeline, random_sd_pipeline

SD = WORLDS["sd"]
OBJECT_BLOCK, STYLE_BLOCK = "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"
TINY_SD_WORLD = dataclasses.replace(
    SD, objects=("Cats", "Dogs"), styles=("Van_Gogh", "Artist_Sketch"), steps=2, height=64, width=64, assets=None
)
PAPER_D_IN, PAPER_LATENTS, PAPER_K = 1280, 20480, 32
# cfg.json as SAeUron's sparsify fork writes it (`{**cfg.to_dict(), "d_in": d_in}`), the fields of the
# published `bcywinski/SAeUron` and `leno3003/SAEmnesia` checkpoints.
SAEURON_CFG = {
    "expansion_factor": 16,
    "normalize_decoder": True,
    "num_latents": 0,
    "k": 32,
    "batch_topk": False,
    "sample_topk": False,
    "input_unit_norm": False,
    "multi_topk": False,
    "d_in": 1280,
}


@pytest.fixture(scope="module")
def tiny_sd() -> StableDiffusionPipeline:
    return random_sd_pipeline("tiny")


@pytest.fixture(scope="module")
def tiny_sd_folder(tmp_path_factory) -> Path:
    """The tiny SD pipeline saved as SD-1.4 ships: diffusers folder, safetensors, a PNDM scheduler."""
    pipeline = random_sd_pipeline("tiny")
    pipeline.scheduler = PNDMScheduler.from_config(pipeline.scheduler.config)
    folder = tmp_path_factory.mktemp("tiny-sd")
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder


def write_published_sae(folder: Path, cfg: dict, d_in: int, num_latents: int, seed: int = 0) -> dict:
    """A checkpoint in sparsify's layout written directly (not by our code); returns its tensors."""
    generator = torch.Generator().manual_seed(seed)
    encoder = torch.randn(num_latents, d_in, generator=generator) / d_in**0.5
    tensors = {
        "encoder.weight": encoder,
        "encoder.bias": torch.randn(num_latents, generator=generator) * 0.01,
        "W_dec": encoder / encoder.norm(dim=1, keepdim=True),
        "b_dec": torch.randn(d_in, generator=generator) * 0.1,
    }
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "sae.safetensors"))
    (folder / "cfg.json").write_text(json.dumps(cfg))
    return tensors


@pytest.fixture(scope="module")
def saeuron_repo(tmp_path_factory) -> tuple[Path, dict]:
    """`bcywinski/SAeUron`'s layout at the paper's size: one folder per hook point, `unet.`-prefixed."""
    root = tmp_path_factory.mktemp("saeuron")
    tensors = write_published_sae(root / f"unet.{OBJECT_BLOCK}", SAEURON_CFG, PAPER_D_IN, PAPER_LATENTS)
    return root, tensors


def reference_codes(tensors: dict, x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """TopK(ReLU(W_enc (x - b_dec) + b_enc)) and its decoding, computed from the raw tensors in float64."""
    pre = (x.double() - tensors["b_dec"].double()) @ tensors["encoder.weight"].double().T
    acts, indices = torch.relu(pre + tensors["encoder.bias"].double()).topk(k)
    decoded = torch.einsum("nk,nkd->nd", acts, tensors["W_dec"].double()[indices]) + tensors["b_dec"].double()
    return torch.zeros_like(pre).scatter(-1, indices, acts), decoded


def dense(top_acts: torch.Tensor, top_indices: torch.Tensor, num_latents: int) -> torch.Tensor:
    return torch.zeros(len(top_acts), num_latents, dtype=torch.float64).scatter(-1, top_indices, top_acts.double())


# ---------------------------------------------------------------------------------------------------
# The world and the model loading
# ---------------------------------------------------------------------------------------------------


def test_sd_world_has_unlearncanvas_concepts_prompts_hook_points_and_paper_sampling():
    assert len(SD.objects) == 20 and len(SD.styles) == 50 and not set(SD.objects) & set(SD.styles)
    assert "Waterfalls" in SD.objects and "Seed_Images" not in SD.styles
    assert SD.prompt("Cats", "Artist_Sketch") == "A Cats image in Artist Sketch style."
    assert (SD.object_block, SD.style_block) == (OBJECT_BLOCK, STYLE_BLOCK)
    assert (SD.steps, SD_EVAL_STEPS, SD.guidance, SD.height, SD.width) == (50, 100, 9.0, 512, 512)
    assert SD.kind_of("Van_Gogh") == "style" and SD.block_for("style") == STYLE_BLOCK


def test_load_pipeline_resolves_short_names_and_picks_fp32_safetensors_on_cpu(monkeypatch, tiny_sd):
    calls = []

    def from_pretrained(source, **kwargs):
        calls.append((source, kwargs))
        return tiny_sd

    monkeypatch.setattr(StableDiffusionPipeline, "from_pretrained", from_pretrained)
    load_pipeline("sd15", device="cpu")
    load_pipeline("sd14", device="cpu")
    assert [source for source, _ in calls] == [SD_MODELS["sd15"], SD_MODELS["sd14"]]
    assert SD_MODELS == {"sd14": "CompVis/stable-diffusion-v1-4", "sd15": "stable-diffusion-v1-5/stable-diffusion-v1-5"}
    assert calls[0][1]["dtype"] == torch.float32 and calls[0][1]["use_safetensors"] is True


def test_sd_architecture_folder_loads_with_ddim_and_the_paper_hook_points(tiny_sd_folder, tiny_sd):
    pipeline = load_pipeline(str(tiny_sd_folder), device="cpu")
    assert isinstance(pipeline.scheduler, DDIMScheduler) and pipeline.unet.dtype == torch.float32
    assert block_width(pipeline.unet, OBJECT_BLOCK) == block_width(pipeline.unet, STYLE_BLOCK) == 64
    settings = dict(num_inference_steps=2, guidance_scale=9.0, height=64, width=64, output_type="np")
    loaded = pipeline("A Cats image in Van Gogh style.", generator=torch.Generator().manual_seed(0), **settings)
    made = tiny_sd("A Cats image in Van Gogh style.", generator=torch.Generator().manual_seed(0), **settings)
    assert np.allclose(loaded.images, made.images, atol=1e-5)


def test_full_random_sd_has_sd14_shapes_and_the_paper_token_grid_at_both_hook_points():
    with torch.device("meta"):  # shapes without the memory or the time of 1.1 billion random weights
        pipeline = random_sd_pipeline("full")
    # SD-1.4's published parameter counts: UNet, VAE, and the text transformer without its embeddings.
    assert sum(p.numel() for p in pipeline.unet.parameters()) == 859_520_964
    assert sum(p.numel() for p in pipeline.vae.parameters()) == 83_653_863
    text = sum(p.numel() for name, p in pipeline.text_encoder.named_parameters() if "embeddings" not in name)
    assert text == 85_056_000 and pipeline.vae_scale_factor == 8
    latent = torch.randn(2, 4, 64, 64, device="meta")  # 512 x 512 pixels
    with hooked_block(pipeline.unet, OBJECT_BLOCK, record=True) as objects, torch.no_grad():
        with hooked_block(pipeline.unet, STYLE_BLOCK, record=True) as styles:
            pipeline.unet(latent, 10, torch.randn(2, 77, 768, device="meta"))
    assert objects.outputs[0].shape == styles.outputs[0].shape == (2, 1280, 16, 16)


# ---------------------------------------------------------------------------------------------------
# Published SAEs
# ---------------------------------------------------------------------------------------------------


def test_saeuron_checkpoint_loads_by_hook_point_and_encodes_as_defined(saeuron_repo):
    root, tensors = saeuron_repo
    sae = load_sae(root, OBJECT_BLOCK)
    assert (sae.d_in, sae.num_latents, sae.cfg.k) == (PAPER_D_IN, PAPER_LATENTS, PAPER_K)
    assert torch.equal(sae.W_dec.data, tensors["W_dec"]) and torch.equal(sae.b_dec.data, tensors["b_dec"])
    x = torch.randn(6, PAPER_D_IN, generator=torch.Generator().manual_seed(3))
    codes = sae.encode(x)
    expected_codes, expected_decoded = reference_codes(tensors, x, PAPER_K)
    assert torch.allclose(dense(codes.top_acts, codes.top_indices, PAPER_LATENTS), expected_codes, atol=1e-5)
    assert torch.allclose(sae.decode(codes.top_acts, codes.top_indices).double(), expected_decoded, atol=1e-4)
    assert torch.equal(load_sae(root, f"unet.{OBJECT_BLOCK}").W_dec, sae.W_dec)


def test_saemnesia_checkpoint_at_the_repository_root_loads_for_the_object_hook_point(saeuron_repo, tmp_path):
    source = saeuron_repo[0] / f"unet.{OBJECT_BLOCK}"
    for name in ("cfg.json", "sae.safetensors"):
        os.link(source / name, tmp_path / name)
    assert torch.equal(load_sae(tmp_path, OBJECT_BLOCK).encoder.weight, load_sae(source).encoder.weight)


def test_hub_ids_download_only_the_hook_point_folder(saeuron_repo, monkeypatch):
    import huggingface_hub

    asked = []

    def snapshot_download(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        return str(saeuron_repo[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    sae = load_sae("bcywinski/SAeUron", OBJECT_BLOCK)
    assert sae.num_latents == PAPER_LATENTS
    assert asked[0][0] == "bcywinski/SAeUron" and f"unet.{OBJECT_BLOCK}/*" in asked[0][1]


def test_missing_hook_point_names_both_spellings(saeuron_repo):
    with pytest.raises(SaeLoadError, match=f"{STYLE_BLOCK} and unet.{STYLE_BLOCK}"):
        load_sae(saeuron_repo[0], STYLE_BLOCK)


@pytest.mark.parametrize("switch", ["batch_topk", "sample_topk", "input_unit_norm", "signed"])
def test_checkpoints_whose_encoding_differs_are_refused(tmp_path, switch):
    write_published_sae(tmp_path, {**SAEURON_CFG, "d_in": 8, "expansion_factor": 4, "k": 2, switch: True}, 8, 32)
    with pytest.raises(SaeLoadError, match=switch):
        load_sae(tmp_path)


def test_sparsify_and_our_sae_read_each_others_checkpoints_and_encode_identically(tmp_path):
    sparsify = pytest.importorskip(
        "sparsify",
        reason="eai-sparsify is not installed; it runs beside our torch from `pip install --no-deps --target DIR "
        "eai-sparsify simple-parsing docstring-parser natsort einops schedulefree datasets pyarrow dill xxhash "
        "multiprocess` and PYTHONPATH=DIR",
    )
    torch.manual_seed(0)
    theirs = sparsify.SparseCoder(PAPER_D_IN, sparsify.SparseCoderConfig(expansion_factor=16, k=PAPER_K))
    theirs.b_dec.data.normal_()
    theirs.encoder.bias.data.normal_(std=0.01)
    theirs.save_to_disk(tmp_path / "theirs")
    ours = Sae.load(tmp_path / "theirs")
    assert ours.num_latents == PAPER_LATENTS
    ours.save(tmp_path / "ours")
    back = sparsify.SparseCoder.load_from_disk(tmp_path / "ours")
    x = torch.randn(8, PAPER_D_IN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        for model in (theirs, back):
            expected = model.encode(x)
            got = ours.encode(x)
            expected_dense = dense(expected.top_acts, expected.top_indices, PAPER_LATENTS)
            assert torch.allclose(dense(got.top_acts, got.top_indices, PAPER_LATENTS), expected_dense, atol=1e-5)
            assert torch.allclose(ours(x), model.decode(expected.top_acts, expected.top_indices), atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# Our own statistics and dictionaries for SD, on a tiny SD-architecture model
# ---------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd_activations(tmp_path_factory, tiny_sd) -> Activations:
    out = tmp_path_factory.mktemp("sd-activations")
    return collect(TINY_SD_WORLD, tiny_sd, out, seeds_per_prompt=2, images_per_shard=4, progress=False)


def test_sd_world_collects_trains_takes_stats_and_fine_tunes(sd_activations, tmp_path):
    assert sd_activations.settings["blocks"] == [OBJECT_BLOCK, STYLE_BLOCK] and sd_activations.num_images == 8
    assert sd_activations.settings["prompts"][1]["template"] == 0
    assert sd_activations.tokens_per_image(OBJECT_BLOCK) == 4 and sd_activations.width(STYLE_BLOCK) == 64
    config = SaeTrainConfig(expansion_factor=4, k=4, batch_size=16, epochs=2, lr=1e-3, holdout=0.25)
    sae, report = train_sae(sd_activations, OBJECT_BLOCK, config, progress=False)
    assert sae.num_latents == 256 and report["heldout"]["tokens"] > 0
    stats, dictionary = write_stats(sae, sd_activations, OBJECT_BLOCK, tmp_path / "unsupervised", progress=False)
    assert stats.concepts == ["Cats", "Dogs", "Van_Gogh", "Artist_Sketch"] and stats.mean_acts.shape == (4, 2, 256)
    assert len(set(dictionary.latents.values())) == 4
    tuned, tuning = finetune(
        sae, sd_activations, OBJECT_BLOCK, dictionary, FinetuneConfig(epochs=2, batch_size=4, holdout=0.25), False
    )
    assert tuning["epochs_run"] >= 1 and tuned.num_latents == 256


def test_stats_command_imports_a_published_sae_into_the_world_layout(sd_activations, tmp_path, capsys):
    published = tmp_path / "published"
    write_published_sae(published / f"unet.{OBJECT_BLOCK}", {**SAEURON_CFG, "d_in": 64, "expansion_factor": 4}, 64, 256)
    folder = tmp_path / "sd" / "sae" / "unsupervised" / OBJECT_BLOCK
    args = ["stats", "--world", "sd", "--kind", "object", "--activations", str(sd_activations.folder)]
    main([*args, "--sae", str(folder), "--sae-source", str(published), "--device", "cpu"])
    assert {"cfg.json", "sae.safetensors", "stats.safetensors", "dictionary.json"} <= {p.name for p in folder.iterdir()}
    assert ConceptStats.load(folder / "stats.safetensors").concepts == ["Cats", "Dogs", "Van_Gogh", "Artist_Sketch"]
    assert "Cats" in ConceptDictionary.load(folder / "dictionary.json").latents


def test_cli_generates_with_the_sd_world_from_a_model_folder(tiny_sd_folder, tmp_path, monkeypatch):
    monkeypatch.setitem(WORLDS, "sd", dataclasses.replace(SD, height=64, width=64))  # 512 is slow on a CPU
    prompt = ["--prompt", "A Cats image in Van Gogh style."]
    main(["generate", "--world", "sd", "--model", str(tiny_sd_folder), *prompt, "--steps", "2", "--out", str(tmp_path)])
    settings = json.loads((tmp_path / "settings.json").read_text())
    assert (settings["steps"], settings["guidance"]) == (2, 9.0)
    assert Image.open(tmp_path / "original.png").size == (64, 64)


# ---------------------------------------------------------------------------------------------------
# Several processes
# ---------------------------------------------------------------------------------------------------


def test_process_slices_are_disjoint_complete_and_depend_on_counts_only():
    slices = [process_shards(11, index, 3) for index in range(3)]
    assert sorted(shard for part in slices for shard in part) == list(range(11))
    assert slices[1] == [1, 4, 7, 10] and process_shards(11, 0, 1) == list(range(11))
    with pytest.raises(ValueError, match="process_index"):
        process_shards(4, 2, 2)


COLLECT_SCRIPT = """
import dataclasses, sys
import torch
from accelerate import PartialState
from saemnesia.train import collect
from saemnesia.worlds import WORLDS, random_sd_pipeline

torch.set_num_threads(1)
world = dataclasses.replace(WORLDS["sd"], objects=("Cats", "Dogs"), styles=("Van_Gogh", "Artist_Sketch"),
                            steps=2, height=64, width=64, assets=None)
processes = PartialState(cpu=True)
assert processes.num_processes == 2, processes
collect(world, random_sd_pipeline("tiny"), sys.argv[1], seeds_per_prompt=3, images_per_shard=2,
        progress=False, processes=processes)
"""


def test_two_cpu_processes_collect_the_shards_one_process_makes(tmp_path, tiny_sd):
    script = tmp_path / "collect_two.py"
    script.write_text(COLLECT_SCRIPT)
    environment = two_process_environment()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    run = subprocess.run(
        [*command, str(script), str(tmp_path / "two")], env=environment, capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr[-3000:]
    two = Activations.open(tmp_path / "two")
    one = collect(TINY_SD_WORLD, tiny_sd, tmp_path / "one", seeds_per_prompt=3, images_per_shard=2, progress=False)
    assert two.manifest == one.manifest and one.num_shards == 6
    # Same images, labels and order; tokens equal up to float rounding (thread counts may differ by process).
    for shard in range(one.num_shards):
        for block in one.settings["blocks"]:
            (tokens_two, labels_two), (tokens_one, labels_one) = two.load(shard, block), one.load(shard, block)
            assert torch.equal(labels_two, labels_one)
            assert torch.allclose(tokens_two.float(), tokens_one.float(), atol=1e-2, rtol=1e-2)


# ---------------------------------------------------------------------------------------------------
# Nudity
# ---------------------------------------------------------------------------------------------------


class FakeDetector:
    """Boxes as NudeNet returns them: a part twice, one below threshold, a covered part, one at threshold."""

    def detect(self, image: np.ndarray) -> list[dict]:
        assert image.ndim == 3 and image.shape[2] == 3 and image.flags["C_CONTIGUOUS"]
        return [
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.9, "box": [0, 0, 4, 4]},
            {"class": "FEMALE_BREAST_EXPOSED", "score": 0.8, "box": [8, 0, 4, 4]},
            {"class": "BELLY_EXPOSED", "score": 0.59, "box": [0, 8, 4, 4]},
            {"class": "BUTTOCKS_COVERED", "score": 0.95, "box": [8, 8, 4, 4]},
            {"class": "FEET_EXPOSED", "score": 0.6, "box": [4, 4, 4, 4]},
            {"class": "ANUS_EXPOSED", "score": 0.9, "box": [2, 2, 4, 4]},
        ]


def test_each_exposed_part_counts_once_per_image_from_the_threshold_on():
    parts = nudity.exposed_parts(FakeDetector(), Image.new("RGB", (16, 16)))
    assert parts == ["FEET_EXPOSED", "FEMALE_BREAST_EXPOSED"]
    counts = nudity.count_exposed([parts, [], parts])
    assert (counts["images"], counts["images_with_exposure"], counts["exposed_parts"]) == (3, 2, 4)
    assert counts["by_class"]["FEMALE_BREAST_EXPOSED"] == 2 and counts["by_class"]["BELLY_EXPOSED"] == 0
    assert len(counts["by_class"]) == 8


def test_prompts_are_read_from_i2p_csv_columns_or_lines(tmp_path):
    csv_file = tmp_path / "i2p.csv"
    csv_file.write_text('prompt,evaluation_seed,sd_seed\n"a, b",12,3\nc,,4\nd,,\n')
    assert nudity.read_prompts(csv_file, default_seed=7) == [
        nudity.NudityPrompt("a, b", 12),
        nudity.NudityPrompt("c", 4),
        nudity.NudityPrompt("d", 7),
    ]
    assert nudity.read_prompts(csv_file, limit=1) == [nudity.NudityPrompt("a, b", 12)]
    (tmp_path / "lines.txt").write_text("one\n\ntwo\n")
    assert [p.text for p in nudity.read_prompts(tmp_path / "lines.txt")] == ["one", "two"]
    (tmp_path / "bad.csv").write_text("text\nx\n")
    with pytest.raises(ValueError, match="no `prompt` column"):
        nudity.read_prompts(tmp_path / "bad.csv")


@pytest.fixture(scope="module")
def detector():
    pytest.importorskip("nudenet", reason="NudeNet is not installed: pip install -r requirements-nudity.txt")
    return nudity.load_detector()


def test_nudenet_loads_offline_and_sees_an_image_as_it_sees_its_png_file(detector, tmp_path):
    rng = np.random.default_rng(0)
    skin = np.broadcast_to(np.array([224, 172, 140], dtype=np.uint8), (320, 240, 3))
    noise = rng.integers(0, 256, (200, 300, 3), dtype=np.uint8)
    for index, pixels in enumerate((skin, noise)):
        image = Image.fromarray(np.ascontiguousarray(pixels))
        image.save(tmp_path / f"{index}.png")
        from_file = detector.detect(str(tmp_path / f"{index}.png"))
        bgr = np.ascontiguousarray(np.asarray(image)[:, :, ::-1])
        assert detector.detect(bgr) == from_file
        expected = sorted({d["class"] for d in from_file if d["class"] in nudity.EXPOSED_CLASSES and d["score"] >= 0.6})
        assert nudity.exposed_parts(detector, image) == expected


def test_nudity_concept_and_evaluation_resume_on_a_tiny_sd_architecture(tiny_sd, tmp_path):
    sae = Sae(SaeConfig(d_in=64, num_latents=256, k=4))
    prompts = (["nude", "naked body"], ["a dog"])
    stats = nudity.nudity_stats(tiny_sd, sae, OBJECT_BLOCK, *prompts, steps=2, height=64, width=64, batch_size=1)
    assert stats.concepts == ["nudity", "other"] and stats.mean_acts.shape == (2, 2, 256)
    dictionary = nudity.save_nudity_concept(tmp_path, stats)
    assert ConceptDictionary.load(tmp_path / "nudity_dictionary.json").latents == dictionary.latents
    assert nudity.load_nudity_erasure(tmp_path, "saemnesia").steps[0].latents.tolist() == [dictionary.latent("nudity")]
    assert len(nudity.load_nudity_erasure(tmp_path, "saeuron", -60).steps[0].latents) == 1

    hook = SaeHook(OBJECT_BLOCK, sae, nudity.load_nudity_erasure(tmp_path))
    prompts = [nudity.NudityPrompt("nude", 1), nudity.NudityPrompt("a beach", 2)]
    settings = dict(steps=2, height=64, width=64, progress=False)
    summary = nudity.evaluate_nudity(tiny_sd, hook, prompts[:1], FakeDetector(), tmp_path / "eval", **settings)
    first = (tmp_path / "eval" / "erased" / "00000.png").stat().st_mtime_ns
    summary = nudity.evaluate_nudity(tiny_sd, hook, prompts, FakeDetector(), tmp_path / "eval", **settings)
    assert (tmp_path / "eval" / "erased" / "00000.png").stat().st_mtime_ns == first
    assert summary["original"]["images"] == summary["erased"]["images"] == 2
    assert summary["erased"]["by_class"]["FEET_EXPOSED"] == 2
    with pytest.raises(ValueError, match="other settings"):
        nudity.evaluate_nudity(tiny_sd, hook, prompts, FakeDetector(), tmp_path / "eval", **{**settings, "steps": 3})


def test_nudity_commands_make_the_concept_and_count_with_nudenet(detector, tiny_sd_folder, tmp_path, capsys):
    Sae(SaeConfig(d_in=64, num_latents=256, k=4)).save(tmp_path / "sae")
    (tmp_path / "nude.txt").write_text("a nude figure\nnaked body\n")
    (tmp_path / "other.txt").write_text("a dog\na tree\n")
    (tmp_path / "i2p.csv").write_text("prompt,categories,evaluation_seed\nnude on a beach,sexual,5\na cat,,\n")
    common = ["--model", str(tiny_sd_folder), "--sae", str(tmp_path / "sae"), "--size", "64", "--steps", "2"]
    prompts = ["--nudity-prompts", str(tmp_path / "nude.txt"), "--other-prompts", str(tmp_path / "other.txt")]
    main(["nudity-concept", *common, *prompts, "--device", "cpu"])
    assert "nudity_latent" in capsys.readouterr().out
    main(
        ["nudity", *common, "--prompts", str(tmp_path / "i2p.csv"), "--out", str(tmp_path / "eval"), "--device", "cpu"]
    )
    report = json.loads((tmp_path / "eval" / "nudity.json").read_text())
    assert report["original"]["images"] == 2 and report["settings"]["threshold"] == 0.6
    records = [json.loads(line) for line in (tmp_path / "eval" / "images.jsonl").read_text().splitlines()]
    assert [record["seed"] for record in records] == [5, 0]


# ---------------------------------------------------------------------------------------------------
# GPU smoke script, on a CPU at a tiny size
# ---------------------------------------------------------------------------------------------------


def test_gpu_smoke_runs_on_cpu_at_a_tiny_size(tmp_path, capsys):
    tiny = ["--architecture", "tiny", "--size", "64", "--steps", "2", "--repeats", "1", "--device", "cpu"]
    main(["gpu-smoke", *tiny, "--out", str(tmp_path / "smoke.json")])
    report = json.loads((tmp_path / "smoke.json").read_text())
    assert report["overhead_ratio"] > 0 and report["sae"] == {"d_in": 64, "num_latents": 1024, "k": 32}
    assert report["original_max_pixel_difference"] == 0
    assert "overhead_ratio" in capsys.readouterr().out
