"""Ready to deploy: the app with and without `spaces` (ZeroGPU), the SD world prepared offline and served, and
the MiniCanvas model folder loaded by plain diffusers in a Python that never imported the package."""

import dataclasses
import functools
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import numpy as np
import pytest
import spaces
import torch
from gradio_client import Client

import app as studio_app
from saemnesia import cli
from saemnesia.concepts import ConceptStats
from saemnesia.loadtest import free_port, start_app
from saemnesia.minicanvas.model import (
    AUTOENCODER_MODULE,
    autoencoder_code,
    build_components,
    build_tokenizer,
    save_pipeline,
)
from saemnesia.prepare import ACTIVATIONS, MARKER, assets_folder, is_prepared, prepare
from saemnesia.sae import Sae, SaeConfig
from saemnesia.studio import DICTIONARY_FILE, STATS_FILE
from saemnesia.worlds import MINICANVAS, WORLDS, load_pipeline, random_sd_pipeline

OBJECT_BLOCK, STYLE_BLOCK = "up_blocks.1.attentions.1", "up_blocks.1.attentions.2"
PAIR = ("A Cats image in Van Gogh style.", ["Cats"], "Both", -10, 0, 2, 9.0, 0, 1)
"""An /erase request on the tiny SD world: prompt, concepts, method, strength, seed, steps, guidance, start, latents."""


# ---------------------------------------------------------------------------------------------------
# The MiniCanvas model folder, as a downloaded model
# ---------------------------------------------------------------------------------------------------

PLAIN_DIFFUSERS = """
import importlib.util, sys
import numpy as np, torch
assert importlib.util.find_spec("saemnesia") is None, "the package is importable"
torch.set_num_threads(1)
from diffusers import StableDiffusionPipeline
pipeline = StableDiffusionPipeline.from_pretrained(sys.argv[1], trust_remote_code=True, use_safetensors=True)
images = pipeline("a star in neon style", num_inference_steps=4, guidance_scale=5.0, output_type="np",
                  generator=torch.Generator().manual_seed(3)).images
np.save(sys.argv[2], images)
"""


def test_minicanvas_folder_loads_in_plain_diffusers_and_draws_the_apps_image(tmp_path):
    """Isolated mode (-I) keeps the repository and PYTHONPATH off the path; only the venv's packages remain."""
    environment = {"HOME": str(tmp_path), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-I", "-c", PLAIN_DIFFUSERS, MINICANVAS.model, str(tmp_path / "plain.npy")]
    run = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=180)
    assert run.returncode == 0, run.stderr[-3000:]
    pipeline = load_pipeline(MINICANVAS.model, device="cpu")  # what Studio.load, hence the app, serves
    ours = pipeline(
        "a star in neon style",
        num_inference_steps=4,
        guidance_scale=5.0,
        output_type="np",
        generator=torch.Generator().manual_seed(3),
    ).images
    plain = np.load(tmp_path / "plain.npy")
    assert plain.shape == (1, 64, 64, 3) and plain.std() > 0.01
    assert np.array_equal(plain, ours)


def test_the_folder_carries_the_packages_autoencoder_and_other_code_is_refused(tmp_path):
    model = Path(MINICANVAS.model)
    index = json.loads((model / "model_index.json").read_text())
    assert index["vae"] == [AUTOENCODER_MODULE, "PixelUnshuffleAutoencoder"]
    assert (model / "vae" / f"{AUTOENCODER_MODULE}.py").read_text() == autoencoder_code()
    tampered = tmp_path / "model"
    shutil.copytree(model, tampered)
    code = tampered / "vae" / f"{AUTOENCODER_MODULE}.py"
    code.write_text(code.read_text() + "\nprint('not ours')\n")
    with pytest.raises(ValueError, match=f"carries code of its own \\(vae/{AUTOENCODER_MODULE}.py\\)"):
        load_pipeline(str(tampered), device="cpu")


# ---------------------------------------------------------------------------------------------------
# ZeroGPU
# ---------------------------------------------------------------------------------------------------


def test_app_starts_with_spaces_installed_on_a_cpu_and_serves_a_pair(monkeypatch):
    assert studio_app.spaces is spaces  # installed (requirements.txt), as on a Space, and the app takes it
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    port = free_port()
    server = start_app("minicanvas", port, device="cpu")
    try:
        request = ("a star in neon style", ["star"], "SAEmnesia", -10, 0, 2, 5.0, 0, 1)
        slider, panes, status = Client(f"http://127.0.0.1:{port}/", verbose=False).predict(*request, api_name="/erase")
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert len(slider) == 2 and all(slider) and len(panes) >= 2 and "images in" in status


def fake_spaces(durations: list) -> SimpleNamespace:
    """`spaces` as on ZeroGPU, but running on the CPU: `GPU` records each call's requested duration."""

    def gpu(task, duration):
        @functools.wraps(task)
        def on_gpu(*args, **kwargs):
            durations.append(duration(*args, **kwargs))
            return task(*args, **kwargs)

        return on_gpu

    return SimpleNamespace(GPU=gpu, config=SimpleNamespace(Config=SimpleNamespace(zero_gpu=True)))


def test_on_zero_gpu_each_generating_event_asks_for_the_time_its_request_needs(tiny_studio, monkeypatch):
    durations = []
    monkeypatch.setattr(studio_app, "spaces", fake_spaces(durations))
    demo = studio_app.build_app(tiny_studio)
    plain = {block_fn.api_name: block_fn.fn for block_fn in demo.fns.values()}
    studio_app.run_on_zero_gpu(demo, tiny_studio.world)
    wrapped = {block_fn.api_name for block_fn in demo.fns.values() if block_fn.fn is not plain[block_fn.api_name]}
    assert wrapped == {"erase", "neighbours", "quick_check", "paint"}  # no attack results in the tiny world
    port = free_port()
    demo.queue(default_concurrency_limit=1).launch(server_port=port, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        slider, _, _ = client.predict("a star in neon style", ["star"], "Both", -10, 0, 7, 5.0, 0, 1, api_name="/erase")
        neighbours = client.predict(api_name="/neighbours")
        mask = "\n".join(["11111111"] * 8)
        client.predict("a star in neon style", "heart", "object", "saemnesia", 5, mask, 0, 1, 0, api_name="/paint")
    finally:
        demo.close()
    assert len(slider) == 2 and len(neighbours) == 2

    def seconds(image_steps: int) -> int:
        return math.ceil(studio_app.ZERO_GPU_START_SECONDS + studio_app.ZERO_GPU_SECONDS_PER_IMAGE_STEP * image_steps)

    # Both methods, steer and replace (the default): four pairs at 7 steps; then three neighbour prompts at the
    # pair's 7 steps, erased only; then a painted pair at the world's 2 steps.
    assert durations == [seconds(2 * 2 * 2 * 7), seconds(3 * 7), seconds(2 * 2)]
    assert seconds(2 * 2 * 2 * 50) <= 40  # the SD demo's four pairs (50 steps) ask for 40 s at most


def test_without_spaces_no_event_is_wrapped(tiny_studio, monkeypatch):
    monkeypatch.setattr(studio_app, "spaces", None)
    demo = studio_app.build_app(tiny_studio)
    before = [block_fn.fn for block_fn in demo.fns.values()]
    studio_app.run_on_zero_gpu(demo, tiny_studio.world)
    assert [block_fn.fn for block_fn in demo.fns.values()] == before and not studio_app.on_zero_gpu()


# ---------------------------------------------------------------------------------------------------
# The SD world, prepared and served offline
# ---------------------------------------------------------------------------------------------------


@pytest.fixture
def offline_sd(tmp_path, monkeypatch):
    """A random SD-architecture model saved as a hub download would be, SAEs saved locally in both published
    layouts (SAeUron's folder per hook point, SAEmnesia's at the root), and the SD world, cut to 2 x 2 concepts
    at 64 px, pointing at them; the cache folder is a temporary one."""
    model = tmp_path / "tiny-sd"
    random_sd_pipeline("tiny").save_pretrained(model, safe_serialization=True)
    torch.manual_seed(0)
    for block in (OBJECT_BLOCK, STYLE_BLOCK):
        Sae(SaeConfig(d_in=64, num_latents=256, k=4)).save(tmp_path / "saeuron" / f"unet.{block}")
    Sae(SaeConfig(d_in=64, num_latents=256, k=4)).save(tmp_path / "saemnesia")
    published = (
        ("unsupervised", "object", str(tmp_path / "saeuron")),
        ("unsupervised", "style", str(tmp_path / "saeuron")),
        ("supervised", "object", str(tmp_path / "saemnesia")),
    )
    tiny = dataclasses.replace(
        WORLDS["sd"],
        objects=("Cats", "Dogs"),
        styles=("Van_Gogh", "Artist_Sketch"),
        steps=2,
        height=64,
        width=64,
        published_saes=published,
    )
    monkeypatch.setitem(WORLDS, "sd", tiny)
    monkeypatch.setenv("SAEMNESIA_CACHE", str(tmp_path / "cache"))
    return model


def test_first_start_of_the_sd_world_prepares_it_then_erase_returns_a_pair(offline_sd, monkeypatch, capsys):
    served = {}
    launch = gr.Blocks.launch

    def launch_in_background(self, **settings):
        served["app"], served["port"] = self, settings["server_port"]
        return launch(self, **{**settings, "prevent_thread_lock": True, "quiet": True})

    monkeypatch.setattr(gr.Blocks, "launch", launch_in_background)
    monkeypatch.setattr(studio_app, "spaces", None)  # the app without `spaces` installed
    port = free_port()
    studio_app.main(["--world", "sd", "--model", str(offline_sd), "--port", str(port), "--device", "cpu"])
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        slider, panes, status = client.predict(*PAIR, api_name="/erase")
        page = client.predict("Cats", "object", "saemnesia", api_name="/latent_page")  # prepare indexed the SAEs
    finally:
        served["app"].close()
    assert len(slider) == 2 and all(slider) and len(panes) >= 3 and "images in" in status  # original, 2 erased
    assert "bound to **Cats**" in page[0] and page[1]

    said = capsys.readouterr().err
    assert "The sd world is not prepared" in said and "s per image" in said and "will take about" in said
    folder = WORLDS["sd"].on_model(str(offline_sd)).assets
    assert is_prepared(folder) and not (folder / ACTIVATIONS).exists()
    record = json.loads((folder / MARKER).read_text())
    assert (record["images"], record["steps"], record["seconds_per_image"] > 0) == (4, 10, True)
    for variant, kind, _ in WORLDS["sd"].published_saes:
        sae_folder = dataclasses.replace(WORLDS["sd"], assets=folder).sae_folder(variant, kind)
        assert (sae_folder / STATS_FILE).is_file() and (sae_folder / DICTIONARY_FILE).is_file()


def test_prepare_command_resumes_keeping_what_is_done_and_refuses_what_it_cannot_read(offline_sd, tmp_path, capsys):
    command = ["prepare", "--world", "sd", "--model", str(offline_sd), "--device", "cpu", "--steps", "2"]
    with pytest.raises(SystemExit):
        cli.main([*command, "--sae-source", "bcywinski/SAeUron"])
    assert "--sae-source must be VARIANT=SOURCE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*command, "--sae-source", "supervisedd=x"])
    assert "Unknown SAE variant(s) supervisedd" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main([*command[:-1], "0"])
    assert "steps must be in [1, 150], got 0" in capsys.readouterr().err

    out = tmp_path / "out"
    cli.main([*command, "--out", str(out), "--keep-activations"])
    assert capsys.readouterr().out.strip() == str(out) and (out / ACTIVATIONS).is_dir()
    stats = out / "sae" / "unsupervised" / OBJECT_BLOCK / STATS_FILE
    first = stats.stat().st_mtime_ns
    (out / MARKER).unlink()  # as if the run had stopped after the statistics
    world = WORLDS["sd"].on_model(str(offline_sd))
    prepare(world, out, steps=2, device="cpu")
    assert stats.stat().st_mtime_ns == first and is_prepared(out) and not (out / ACTIVATIONS).exists()
    assert "Prepared in" in capsys.readouterr().err
    (out / MARKER).unlink()  # a rerun with another source for one variant fetches it and takes its statistics anew
    mine = tmp_path / "mine"
    Sae(SaeConfig(d_in=64, num_latents=128, k=4)).save(mine / f"unet.{OBJECT_BLOCK}")
    Sae(SaeConfig(d_in=64, num_latents=128, k=4)).save(mine / f"unet.{STYLE_BLOCK}")
    prepare(world, out, {"unsupervised": str(mine)}, steps=2, device="cpu")
    assert ConceptStats.load(stats).mean_acts.shape[-1] == 128
    supervised = out / "sae" / "supervised" / OBJECT_BLOCK / STATS_FILE
    assert ConceptStats.load(supervised).mean_acts.shape[-1] == 256
    with pytest.raises(ValueError, match="ships its SAEs"):
        prepare(MINICANVAS, tmp_path / "minicanvas")


def test_on_zero_gpu_an_unprepared_world_stops_the_app_and_a_prepared_hub_repository_serves(
    offline_sd, tmp_path, monkeypatch
):
    import huggingface_hub

    monkeypatch.setattr(studio_app, "spaces", fake_spaces([]))
    with pytest.raises(SystemExit, match="ZeroGPU lends a GPU per request only: prepare it on a GPU machine"):
        studio_app.main(["--world", "sd", "--model", str(offline_sd), "--device", "cpu"])
    monkeypatch.setattr(studio_app, "spaces", None)
    with pytest.raises(SystemExit, match="Cannot prepare the sd world .*Model folder '/no/model' does not exist"):
        studio_app.main(["--world", "sd", "--model", "/no/model", "--device", "cpu"])
    downloads = {"me/prepared": tmp_path / "snapshot", "me/empty": tmp_path / "empty"}
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id: str(downloads[repo_id]))
    (tmp_path / "snapshot").mkdir()
    (tmp_path / "snapshot" / MARKER).write_text("{}")
    assert assets_folder("me/prepared") == tmp_path / "snapshot"
    with pytest.raises(FileNotFoundError, match="holds no prepared world"):
        assets_folder("me/empty")
    assert assets_folder("runs-sd") == Path("runs-sd")  # a local folder, to prepare into


def test_a_minicanvas_model_saved_by_train_world_carries_its_code_and_loads(tmp_path):
    save_pipeline(build_components(build_tokenizer(), seed=1), tmp_path / "model")
    assert (tmp_path / "model" / "vae" / f"{AUTOENCODER_MODULE}.py").read_text() == autoencoder_code()
    pipeline = load_pipeline(str(tmp_path / "model"), device="cpu")
    assert type(pipeline.vae).__name__ == "PixelUnshuffleAutoencoder"
