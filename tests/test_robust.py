"""A public demo meets careless and hostile input and many users at once, and holds.

Bad input gets one clear message (field, value, allowed range) at every door, library, CLI and API, and
nothing else happens; concurrent requests never see each other's erasures; a request that fails midway
leaves the service as it was; only safetensors and JSON are read from disk; a small load test runs.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import random
import re
import shutil
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

import gradio as gr
import httpx
import numpy as np
import pytest
import torch
from conftest import BLOCK, make_tiny_pipeline, make_tiny_sae
from gradio_client import Client
from gradio_client.exceptions import AppError
from gradio_client.utils import QueueError, Status
from PIL import Image
from safetensors.torch import load_file

import app as studio_app
from saemnesia import cli, generate
from saemnesia.concepts import ConceptStats, build_dictionary
from saemnesia.evaluate import fingerprint
from saemnesia.generate import model_lock, sampler_timesteps
from saemnesia.hooks import get_block
from saemnesia.latent_index import ImageTable, LatentIndex
from saemnesia.loadtest import free_port, load_test
from saemnesia.minicanvas.classifier import ClassifierConfig, MiniCanvasClassifier, load_classifier
from saemnesia.sae import Sae, load_sae
from saemnesia.studio import DICTIONARY_FILE, LATENTS_FOLDER, STATS_FILE, Studio
from saemnesia.worlds import MINICANVAS, World, load_pipeline

GOOD = {
    "prompt": "a star in neon style",
    "concepts": ["star"],
    "method": "saemnesia",
    "strength": -10.0,
    "seed": 0,
    "steps": 2,
    "guidance": 5.0,
    "start_step": 0,
}
API_METHOD = {"saemnesia": "SAEmnesia", "saeuron": "SAeUron (baseline)"}
MISSING_BLOCK = "up_blocks.7.attentions.0"


def serve(studio: Studio, max_size: int) -> tuple[gr.Blocks, str]:
    """The app on a free loopback port, as `app.py` queues it; returns the Blocks and its URL."""
    demo = studio_app.build_app(studio, classifier=None)
    demo.queue(default_concurrency_limit=1, max_size=max_size)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, show_error=True)
    return demo, f"http://127.0.0.1:{port}/"


@pytest.fixture(scope="module")
def served(tiny_studio):
    demo, url = serve(tiny_studio, max_size=16)
    yield url
    demo.close()


def visitor(url: str, downloads: Path) -> Client:
    """A gradio_client session saving what it is sent into `downloads`, not into the server's own cache folder
    (gradio_client's default, /tmp/gradio), where it would overwrite files the in-process server is serving."""
    return Client(url, verbose=False, download_files=downloads)


@pytest.fixture(scope="module")
def client(served, tmp_path_factory) -> Client:
    return visitor(served, tmp_path_factory.mktemp("downloads"))


def write_assets(root: Path, block: str, sae: Sae, timesteps: torch.Tensor, variant: str = "supervised") -> None:
    """A world's assets folder holding one object SAE at `block`, with statistics and dictionary."""
    folder = root / "sae" / variant / block
    sae.save(folder)
    mean_acts = torch.rand(3, len(timesteps), sae.num_latents, generator=torch.Generator().manual_seed(0))
    stats = ConceptStats(["star", "circle", "heart"], ["object"] * 3, timesteps, mean_acts)
    stats.save(folder / STATS_FILE)
    build_dictionary(stats).save(folder / DICTIONARY_FILE)


def tiny_world(model: Path, assets: Path, block: str = BLOCK) -> World:
    return replace(MINICANVAS, model=str(model), assets=assets, objects=("star", "circle", "heart"), object_block=block)


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> Path:
    """Good, missing, corrupt and pickled model and SAE folders, made once."""
    root = tmp_path_factory.mktemp("files")
    pipeline = make_tiny_pipeline()
    pipeline.save_pretrained(root / "model")
    (root / "model-without-index").mkdir()
    shutil.copytree(root / "model", root / "model-corrupt")
    (root / "model-corrupt" / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    shutil.copytree(root / "model", root / "model-pickled")
    for weights in (root / "model-pickled").rglob("*.safetensors"):
        pickled = "pytorch_model.bin" if weights.name == "model.safetensors" else weights.stem + ".bin"
        torch.save(load_file(weights), weights.with_name(pickled))
        weights.unlink()
    sae = make_tiny_sae()
    sae.save(root / "sae")
    for name in ("sae-pickled", "sae-corrupt", "sae-bad-json", "sae-missing-keys", "sae-wrong-type", "sae-wrong-shape"):
        shutil.copytree(root / "sae", root / name)
    (root / "sae-pickled" / "sae.safetensors").unlink()
    torch.save(sae.state_dict(), root / "sae-pickled" / "sae.pt")
    (root / "sae-corrupt" / "sae.safetensors").write_bytes(b"garbage")
    (root / "sae-bad-json" / "cfg.json").write_text("{not json")
    (root / "sae-missing-keys" / "cfg.json").write_text(json.dumps({"width": 32, "latents": 256}))
    (root / "sae-wrong-type" / "cfg.json").write_text(json.dumps({"d_in": "32", "num_latents": 256, "k": 8}))
    (root / "sae-wrong-shape" / "cfg.json").write_text(json.dumps({"d_in": 64, "num_latents": 256, "k": 8}))
    timesteps = torch.tensor(sampler_timesteps(pipeline, MINICANVAS.steps))
    write_assets(root / "assets", BLOCK, make_tiny_sae(), timesteps)
    write_assets(root / "assets-narrow-sae", BLOCK, make_tiny_sae(d_in=16), timesteps)
    write_assets(root / "assets-missing-block", MISSING_BLOCK, make_tiny_sae(), timesteps)
    write_assets(root / "assets-foreign-index", BLOCK, make_tiny_sae(), timesteps)
    write_foreign_index(root / "assets-foreign-index" / LATENTS_FOLDER, latents=64)
    return root


def write_foreign_index(folder: Path, latents: int) -> None:
    """A latent index of an SAE with `latents` latents, and its (empty) image table."""

    def zeros(*shape, dtype=torch.float32):
        return torch.zeros(latents, *shape, dtype=dtype)

    LatentIndex(
        BLOCK, "supervised", (8, 8), zeros(1, dtype=torch.long) - 1, zeros(1), zeros(1, dtype=torch.long),
        zeros(1, 64, dtype=torch.float16), zeros(dtype=torch.long), zeros(dtype=torch.float64), zeros(),
        zeros(48, dtype=torch.long), zeros(1, dtype=torch.long), zeros(1),
        [{"concept": "star", "score": 0.0, "bound": None}] * latents, 0, {},
    ).save(folder)  # fmt: skip
    ImageTable(torch.zeros(0, dtype=torch.long), torch.zeros(0, 16, 16, 3, dtype=torch.uint8), [], []).save(folder)


def studio_with_sae(studio: Studio, sae: Sae, block: str = BLOCK) -> Studio:
    """The tiny studio with its object SAE swapped: how a misconfigured deployment would look."""
    bundle = studio.bundles["saemnesia", "object"]
    return Studio(studio.world, studio.pipeline, {("saemnesia", "object"): replace(bundle, sae=sae, block=block)})


@dataclass
class Doors:
    """The ways in: each is called with a bad input and returns the message it got (and asserts it failed)."""

    studio: Studio
    client: Client
    url: str
    files: Path
    out: Path
    unet_calls: list
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch

    def library(self, **changes) -> str:
        settings = {**GOOD, **changes}
        prompt, concepts = settings.pop("prompt"), settings.pop("concepts")
        return self.load(lambda: self.studio.erase([prompt], concepts, **settings))

    def load(self, call: Callable[[], object]) -> str:
        with pytest.raises((ValueError, KeyError, FileNotFoundError)) as caught:
            call()
        return str(caught.value)

    def cli(self, *argv: str) -> str:
        with pytest.raises(SystemExit) as caught:
            cli.main(list(argv))
        assert caught.value.code == 2
        stderr = self.capsys.readouterr().err
        assert re.search(r"(^|: )error: ", stderr, re.MULTILINE), stderr
        return stderr

    def cli_generate(self, studio: Studio | None = None, **changes) -> str:
        """`generate` on the tiny studio (or `studio`): loading the world is the load cases' business."""
        self.monkeypatch.setattr(cli, "_load_studio", lambda args: studio or self.studio)
        settings = {**GOOD, **changes}
        return self.cli(
            "generate",
            f"--prompt={settings['prompt']}",
            *(f"--erase={concept}" for concept in settings["concepts"]),
            *(f"--{name.replace('_', '-')}={settings[name]}" for name in GOOD if name not in ("prompt", "concepts")),
            f"--out={self.out}",
        )

    def api(self, **changes) -> str:
        """gradio_client, as a visitor's script would call it; it cannot send NaN or infinity (not JSON),
        so those go raw to the REST route, as a hostile client would send them."""
        settings = {**GOOD, **changes}
        settings["method"] = API_METHOD.get(settings["method"], settings["method"])
        # GOOD is in the endpoint's order; then 1 latent per step, the same strength for SAeUron, and steer
        values = [*settings.values(), 1, settings["strength"], "Steer"]
        if any(isinstance(value, float) and not math.isfinite(value) for value in values):
            call = f"{self.url}gradio_api/call/erase"
            event = httpx.post(call, content=json.dumps({"data": values}), headers={"content-type": "application/json"})
            stream = httpx.get(f"{call}/{event.json()['event_id']}", timeout=60).text
            event_name, data = re.search(r"event: (\w+)\ndata: (.*)", stream).groups()
            assert event_name == "error", stream
            return json.loads(data)["error"]
        with pytest.raises(AppError) as caught:
            self.client.predict(*values, api_name="/erase")
        return str(caught.value)


@pytest.fixture
def doors(tiny_studio, client, served, files, tmp_path, capsys, monkeypatch) -> Doors:
    """The doors, with every run of the shared UNet counted: a refused request must never reach it."""
    unet_calls = []
    unet = tiny_studio.pipeline.unet
    forward = unet.forward

    def counted(*args, **kwargs):
        unet_calls.append(None)
        return forward(*args, **kwargs)

    monkeypatch.setattr(unet, "forward", counted)
    return Doors(tiny_studio, client, served, files, tmp_path / "out", unet_calls, capsys, monkeypatch)


LIBRARY, CLI, API = "library", "cli", "api"
EVERY_DOOR = (LIBRARY, CLI, API)
NOT_CLI = (LIBRARY, API)
"""Inputs argparse cannot even express (None, a bare string for a list)."""
STRENGTH = r"strength must be a finite number in \[-1000, 0\] \(negative erases\), got "

# (case, doors, changed settings, message): every door must answer with the message.
SETTINGS_CASES = [
    ("empty prompt", EVERY_DOOR, {"prompt": ""}, r"prompt must be a non-empty text, e\.g\. '.+', got ''"),
    ("blank prompt", EVERY_DOOR, {"prompt": "   "}, r"prompt must be a non-empty text, .*got '   '"),
    ("prompt not text", NOT_CLI, {"prompt": None}, r"prompt must be a non-empty text, .*got None"),
    ("huge prompt", EVERY_DOOR, {"prompt": "star " * 300}, r"prompt must be at most 1000 characters, got 1500"),
    (
        "unknown concept",
        EVERY_DOOR,
        {"concepts": ["unicorn"]},
        r"Unknown concept\(s\) 'unicorn'; known concepts: star, circle, heart, neon, sketch",
    ),
    ("concepts not a list", NOT_CLI, {"concepts": "star"}, r"concepts must be a list of concept names, got 'star'"),
    (
        "unknown method",
        EVERY_DOOR,
        {"method": "erasing"},
        r"method must be one of .+, got 'erasing'|argument --method: invalid choice: 'erasing'",
    ),
    ("strength NaN", EVERY_DOOR, {"strength": math.nan}, STRENGTH + "nan"),
    ("strength infinite", EVERY_DOOR, {"strength": math.inf}, STRENGTH + "inf"),
    ("strength minus infinity", EVERY_DOOR, {"strength": -math.inf}, STRENGTH + "-inf"),
    ("strength positive", EVERY_DOOR, {"strength": 5.0}, STRENGTH + r"5\.0"),
    ("strength below range", EVERY_DOOR, {"strength": -5000.0}, STRENGTH + r"-5000\.0"),
    (
        "strength not a number",
        EVERY_DOOR,
        {"strength": "strong"},
        STRENGTH + "'strong'|argument --strength: invalid float value: 'strong'",
    ),
    ("steps zero", EVERY_DOOR, {"steps": 0}, r"steps must be in \[1, 150\], got 0"),
    ("steps too many", EVERY_DOOR, {"steps": 1000}, r"steps must be in \[1, 150\], got 1000"),
    (
        "steps fractional",
        EVERY_DOOR,
        {"steps": 2.5},
        r"steps must be an integer in \[1, 150\], got 2\.5|argument --steps: invalid int value: '2\.5'",
    ),
    ("guidance negative", EVERY_DOOR, {"guidance": -1.0}, r"guidance must be in \[0\.0, 30\.0\], got -1\.0"),
    (
        "guidance NaN",
        EVERY_DOOR,
        {"guidance": math.nan},
        r"guidance must be a finite number in \[0\.0, 30\.0\], got nan",
    ),
    ("seed negative", EVERY_DOOR, {"seed": -1}, r"seed must be in \[0, 4294967295\], got -1"),
    ("seed too large", EVERY_DOOR, {"seed": 2**32}, r"seed must be in \[0, 4294967295\], got 4294967296"),
    ("seed missing", NOT_CLI, {"seed": None}, r"seed must be an integer in \[0, 4294967295\], got None"),
    (
        "seed not a number",
        EVERY_DOOR,
        {"seed": "abc"},
        r"seed must be an integer in \[0, 4294967295\], got 'abc'|argument --seed: invalid int value: 'abc'",
    ),
    ("start step past the end", EVERY_DOOR, {"start_step": 2}, r"start_step must be an integer in \[0, 1\], got 2"),
    ("start step negative", EVERY_DOOR, {"start_step": -1}, r"start_step must be an integer in \[0, 1\], got -1"),
]

MISMATCH = r"The SAE reads 16-wide activations but block 'up_blocks\.1\.attentions\.1' outputs 32 channels"
NO_BLOCK = r"The UNet has no block 'up_blocks\.7\.attentions\.0'\. Its cross-attention blocks are: .*up_blocks\.1"
PICKLED_MODEL = r"Cannot load a diffusers pipeline from '.+' \(only safetensors weights are read\): .*no file named"

# (case, call, message): files and deployments; the API has no door to them (no endpoint takes a path).
LOADING_CASES = [
    (
        "missing model folder / library",
        lambda d: d.load(lambda: load_pipeline(str(d.files / "no-model"), device="cpu")),
        r"Model folder '.+no-model' does not exist",
    ),
    (
        "missing model folder / cli",
        lambda d: d.cli("generate", f"--model={d.files / 'no-model'}", "--prompt=a star", f"--out={d.out}"),
        r"error: Model folder '.+no-model' does not exist",
    ),
    (
        "folder without model_index.json / library",
        lambda d: d.load(lambda: load_pipeline(str(d.files / "model-without-index"), device="cpu")),
        r"'.+model-without-index' has no model_index\.json: it is not a diffusers pipeline folder",
    ),
    (
        "folder without model_index.json / cli",
        lambda d: d.cli("generate", f"--model={d.files / 'model-without-index'}", "--prompt=a star", f"--out={d.out}"),
        r"error: '.+model-without-index' has no model_index\.json",
    ),
    (
        "corrupt model weights / library",
        lambda d: d.load(lambda: load_pipeline(str(d.files / "model-corrupt"), device="cpu")),
        r"Cannot load a diffusers pipeline from '.+model-corrupt' \(only safetensors weights are read\)",
    ),
    (
        "corrupt model weights / cli",
        lambda d: d.cli("generate", f"--model={d.files / 'model-corrupt'}", "--prompt=a star", f"--out={d.out}"),
        r"error: Cannot load a diffusers pipeline from '.+model-corrupt'",
    ),
    (
        "pickled model weights only / library",
        lambda d: d.load(lambda: load_pipeline(str(d.files / "model-pickled"), device="cpu")),
        PICKLED_MODEL,
    ),
    (
        "missing SAE folder / library",
        lambda d: d.load(lambda: load_sae(d.files / "no-sae")),
        r"SAE folder '.+no-sae' does not exist",
    ),
    (
        "missing SAE folder / cli",
        lambda d: d.cli("stats", f"--sae={d.files / 'no-sae'}", "--device=cpu"),
        r"error: No cfg\.json in SAE folder '.+no-sae'",
    ),
    (
        "pickled SAE weights only / library",
        lambda d: d.load(lambda: Sae.load(d.files / "sae-pickled")),
        r"No sae\.safetensors in SAE folder '.+sae-pickled'",
    ),
    (
        "pickled SAE weights only / cli",
        lambda d: d.cli("stats", f"--sae={d.files / 'sae-pickled'}", "--device=cpu"),
        r"error: No sae\.safetensors in SAE folder '.+sae-pickled'",
    ),
    (
        "corrupt SAE safetensors / library",
        lambda d: d.load(lambda: Sae.load(d.files / "sae-corrupt")),
        r"sae-corrupt/sae\.safetensors is not a readable safetensors file",
    ),
    (
        "cfg.json not JSON / library",
        lambda d: d.load(lambda: Sae.load(d.files / "sae-bad-json")),
        r"sae-bad-json/cfg\.json is not valid JSON",
    ),
    (
        "cfg.json missing keys / library",
        lambda d: d.load(lambda: Sae.load(d.files / "sae-missing-keys")),
        r"cfg\.json lacks d_in, num_latents, k \(needs d_in, k and num_latents or expansion_factor\)",
    ),
    (
        "cfg.json missing keys / cli",
        lambda d: d.cli("stats", f"--sae={d.files / 'sae-missing-keys'}", "--device=cpu"),
        r"error: .+cfg\.json lacks d_in, num_latents, k",
    ),
    (
        "cfg.json key of the wrong type / library",
        lambda d: d.load(lambda: Sae.load(d.files / "sae-wrong-type")),
        r"cfg\.json: d_in must be a positive integer, found '32'",
    ),
    (
        "weights not matching cfg.json / library",
        lambda d: d.load(lambda: Sae.load(d.files / "sae-wrong-shape")),
        r"'encoder\.weight' has shape \(256, 32\), cfg\.json says \(256, 64\)",
    ),
    (
        "SAE narrower than its block / library load",
        lambda d: d.load(lambda: Studio.load(tiny_world(d.files / "model", d.files / "assets-narrow-sae"), "cpu")),
        MISMATCH,
    ),
    (
        "SAE narrower than its block / library erase",
        lambda d: d.load(lambda: studio_with_sae(d.studio, make_tiny_sae(d_in=16)).erase(["a star"], ["star"])),
        MISMATCH,
    ),
    (
        "SAE narrower than its block / cli",
        lambda d: d.cli_generate(studio_with_sae(d.studio, make_tiny_sae(d_in=16))),
        "error: " + MISMATCH,
    ),
    (
        "latent index of another SAE / library load",
        lambda d: d.load(lambda: Studio.load(tiny_world(d.files / "model", d.files / "assets-foreign-index"), "cpu")),
        r"has 64 latents but the SAE 256: it was made for another SAE; make it again with `python -m saemnesia "
        r"index-latents`",
    ),
    (
        "hook point the UNet lacks / library load",
        lambda d: d.load(
            lambda: Studio.load(
                tiny_world(d.files / "model", d.files / "assets-missing-block", block=MISSING_BLOCK), "cpu"
            )
        ),
        NO_BLOCK,
    ),
    (
        "hook point the UNet lacks / cli",
        lambda d: d.cli_generate(studio_with_sae(d.studio, make_tiny_sae(), block=MISSING_BLOCK)),
        "error: " + NO_BLOCK,
    ),
    (
        "load test with no clients / cli",
        lambda d: d.cli("loadtest", f"--url={d.url}", "--clients=0"),
        r"error: clients must be in \[1, 64\], got 0",
    ),
]

DOOR_CALLS = {LIBRARY: Doors.library, CLI: Doors.cli_generate, API: Doors.api}
TABLE = [
    (f"{case} / {door}", lambda d, door=door, changes=changes: DOOR_CALLS[door](d, **changes), message)
    for case, doors_of_case, changes, message in SETTINGS_CASES
    for door in doors_of_case
] + LOADING_CASES


@pytest.mark.parametrize(("case", "call", "message"), TABLE, ids=[row[0] for row in TABLE])
def test_bad_input_gets_one_clear_message_and_nothing_else(case, call, message, doors):
    answer = call(doors)
    assert re.search(message, answer), f"{case}: {answer!r}"
    assert doors.unet_calls == [], "a refused request must not reach the model"
    assert not doors.out.exists(), "a refused request must write nothing"


LONG_PROMPT = "a star in neon style " * 20
TRUNCATED = r"The prompt is \d+ tokens long; only the first \d+ are used\."


def test_long_prompt_runs_truncated_with_a_visible_warning_at_every_door(tiny_studio, client, tmp_path, caplog):
    result = tiny_studio.erase([LONG_PROMPT], ["star"], steps=2)
    assert re.fullmatch(TRUNCATED, result.settings["warnings"][0])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(cli, "_load_studio", lambda args: tiny_studio)
        cli.main(["generate", f"--prompt={LONG_PROMPT}", "--erase=star", "--steps=2", f"--out={tmp_path}"])
    assert any(re.fullmatch(TRUNCATED, record.getMessage()) for record in caplog.records)
    status = client.predict(LONG_PROMPT, ["star"], "SAEmnesia", -10, 0, 2, 5.0, 0, 1, api_name="/erase")[2]
    assert re.search("⚠️ " + TRUNCATED, status)


def pixels(result) -> list[np.ndarray]:
    return [np.asarray(image) for image in result.originals + result.erased]


def same_images(first: list[np.ndarray], second: list[np.ndarray]) -> bool:
    return len(first) == len(second) and all(np.array_equal(a, b) for a, b in zip(first, second))


def no_forward_hooks(studio: Studio) -> bool:
    return not any(module._forward_hooks for module in studio.pipeline.unet.modules())


REQUESTS = [
    {"prompts": ["a star in neon style"], "concepts": ["neon"], "strength": -10.0, "seed": 0},
    {"prompts": ["a circle in sketch style"], "concepts": ["circle"], "strength": -25.0, "seed": 1, "record": True},
    {"prompts": ["a heart in neon style"], "concepts": ["neon"], "strength": -5.0, "seed": 2, "method": "saeuron"},
    {"prompts": ["a star in sketch style"], "concepts": ["star", "sketch"], "strength": -60.0, "seed": 3},
]


def test_concurrent_requests_each_get_exactly_what_they_get_alone(tiny_studio):
    alone = [pixels(tiny_studio.erase(**request, steps=2)) for request in REQUESTS]
    assert not same_images(alone[0][:1], alone[0][1:]), "the erasure must show, or the test proves nothing"
    order = [index for index in range(len(REQUESTS)) for _ in range(3)]
    random.Random(0).shuffle(order)
    start = threading.Barrier(len(order))

    def request(index: int) -> list[np.ndarray]:
        start.wait()
        return pixels(tiny_studio.erase(**REQUESTS[index], steps=2))

    with ThreadPoolExecutor(len(order)) as pool:
        together = list(pool.map(request, order))
    for index, images in zip(order, together):
        assert same_images(images, alone[index]), f"request {index} changed when others ran beside it"
    assert no_forward_hooks(tiny_studio)


API_REQUESTS = [
    ("a star in neon style", ["star"], "SAEmnesia", -10, 0),
    ("a circle in sketch style", ["circle"], "SAeUron (baseline)", -25, 1),
    ("a heart in neon style", ["neon", "heart"], "Both", -60, 2),
    ("a heart in sketch style", ["sketch"], "SAEmnesia", -5, 3),
]
"""Distinct prompts and seeds, so no two answers share an image: gradio 6.31 rewrites a cached image file in
place (`save_pil_to_cache`) when another answer holds the same image, and a visitor fetching it at that moment
gets a truncated file. Identical requests at once are covered by the library test above."""


def api_pixels(outputs) -> list[np.ndarray]:
    """Every image of an /erase answer (before/after pair, panes), decoded."""
    pair, panes, _ = outputs
    paths = [*pair, *(item["image"] for item in panes)]
    return [np.asarray(Image.open(path).convert("RGB")) for path in paths]


def api_erase(client: Client, request: tuple):
    return client.submit(*request, 2, 5.0, 0, 1, request[3], api_name="/erase")  # SAeUron: the same strength


def test_concurrent_api_jobs_each_get_exactly_what_they_get_alone(served, client, tiny_studio, tmp_path):
    alone = [api_pixels(api_erase(client, request).result(timeout=60)) for request in API_REQUESTS]
    order = list(range(len(API_REQUESTS)))
    random.Random(1).shuffle(order)
    sessions = [visitor(served, tmp_path / str(i)) for i in range(len(order))]
    jobs = [api_erase(session, API_REQUESTS[index]) for session, index in zip(sessions, order)]
    answers = [job.result(timeout=120) for job in jobs]
    for index, answer in zip(order, answers):
        assert same_images(api_pixels(answer), alone[index]), f"API request {index} changed"
    assert no_forward_hooks(tiny_studio)


def fail_on_second_call(function: Callable, error: BaseException) -> Callable:
    """`function`, except that its second call raises `error`: a fault midway through a generation."""
    calls = []

    def failing(*args, **kwargs):
        calls.append(None)
        if len(calls) == 2:
            raise error
        return function(*args, **kwargs)

    return failing


def hook_error(patch: pytest.MonkeyPatch, studio: Studio) -> BaseException:
    """The SAE edit (REQUESTS[0] erases a style) fails as the hook encodes the second step's tokens."""
    error = RuntimeError("fault inside the SAE hook")
    patch.setattr(generate, "rank_counted_changes", fail_on_second_call(generate.rank_counted_changes, error))
    return error


def block_fault(error: BaseException) -> Callable[[pytest.MonkeyPatch, Studio], BaseException]:
    def inject(patch: pytest.MonkeyPatch, studio: Studio) -> BaseException:
        block = get_block(studio.pipeline.unet, BLOCK)
        patch.setattr(block, "forward", fail_on_second_call(block.forward, error))
        return error

    return inject


FAULTS = {
    "exception inside the hook": hook_error,
    "out of memory inside the UNet block": block_fault(torch.OutOfMemoryError("CUDA out of memory (simulated)")),
    "interrupted midway (Ctrl-C)": block_fault(KeyboardInterrupt()),
}


def lock_is_free(pipeline) -> bool:
    """Whether another thread can take the model lock now (a re-entrant lock always lets its holder back in)."""
    taken = []

    def try_lock() -> None:
        lock = model_lock(pipeline)
        taken.append(lock.acquire(blocking=False))
        if taken[0]:
            lock.release()

    thread = threading.Thread(target=try_lock)
    thread.start()
    thread.join()
    return taken[0]


@pytest.mark.parametrize("fault", FAULTS)
def test_a_request_failing_midway_leaves_the_service_as_it_was(fault, tiny_studio):
    before = pixels(tiny_studio.erase(**REQUESTS[0], steps=2))
    with pytest.MonkeyPatch.context() as patch:
        error = FAULTS[fault](patch, tiny_studio)
        with pytest.raises(type(error)):
            tiny_studio.erase(**REQUESTS[0], steps=2)
    assert no_forward_hooks(tiny_studio) and lock_is_free(tiny_studio.pipeline)
    assert same_images(pixels(tiny_studio.erase(**REQUESTS[0], steps=2)), before)


def test_out_of_memory_through_the_api_gets_a_clear_message_then_correct_images(client, tiny_studio):
    before = api_pixels(api_erase(client, API_REQUESTS[0]).result(timeout=60))
    with pytest.MonkeyPatch.context() as patch:
        block_fault(torch.OutOfMemoryError("CUDA out of memory (simulated)"))(patch, tiny_studio)
        with pytest.raises(AppError, match="The server ran out of memory for this request: try again"):
            api_erase(client, API_REQUESTS[0]).result(timeout=60)
    assert same_images(api_pixels(api_erase(client, API_REQUESTS[0]).result(timeout=60)), before)
    assert no_forward_hooks(tiny_studio)


class Gate:
    """Holds every generation inside the UNet block until opened: a request that is surely running."""

    def __init__(self, patch: pytest.MonkeyPatch, studio: Studio):
        block = get_block(studio.pipeline.unet, BLOCK)
        forward = block.forward
        self.entered, self.opened = threading.Event(), threading.Event()

        def held(*args, **kwargs):
            self.entered.set()
            self.opened.wait(timeout=60)
            return forward(*args, **kwargs)

        patch.setattr(block, "forward", held)


def test_a_cancelled_api_request_leaves_the_service_as_it_was(served, client, tiny_studio, tmp_path):
    before = api_pixels(api_erase(client, API_REQUESTS[1]).result(timeout=60))
    with pytest.MonkeyPatch.context() as patch:
        gate = Gate(patch, tiny_studio)
        try:
            job = api_erase(visitor(served, tmp_path), API_REQUESTS[1])
            assert gate.entered.wait(timeout=60)
            assert job.cancel()
        finally:
            gate.opened.set()
    assert same_images(api_pixels(api_erase(client, API_REQUESTS[1]).result(timeout=60)), before)
    assert no_forward_hooks(tiny_studio)


@pytest.fixture
def unpickling(monkeypatch) -> list:
    """Every attempt to unpickle, recorded (and refused)."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise AssertionError("something tried to unpickle")

    for module, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(module, name, refuse)
    return attempts


def test_every_loader_reads_only_safetensors_and_json(files, unpickling, tmp_path):
    studio = Studio.load(tiny_world(files / "model", files / "assets"), device="cpu")
    assert studio.bundles["saemnesia", "object"].dictionary is not None
    assert Sae.load(files / "sae").d_in == 32 and load_sae(files / "sae").num_latents == 256
    MiniCanvasClassifier(ClassifierConfig(channels=(4, 4, 4))).save(tmp_path / "classifier")
    assert load_classifier(tmp_path / "classifier").config.channels == (4, 4, 4)
    assert unpickling == []


def test_extra_blocks_erase_objects_there_too_and_must_exist_and_fit(files, tmp_path):
    """A second object block erases the same objects with its own SAEs; the world's hook is unchanged."""
    assets, extra = tmp_path / "assets", "up_blocks.1.attentions.0"
    timesteps = torch.tensor(sampler_timesteps(load_pipeline(str(files / "model"), device="cpu"), MINICANVAS.steps))
    for variant in ("supervised", "unsupervised"):
        for block in (BLOCK, extra):
            write_assets(assets, block, make_tiny_sae(), timesteps, variant)
    world = tiny_world(files / "model", assets)
    one, two = Studio.load(world, "cpu"), Studio.load(world, "cpu", extra_blocks={"object": [extra]})
    for method in ("saemnesia", "saeuron"):
        assert [hook.block for hook in one.hooks(["star"], method, -10.0)] == [BLOCK]
        assert [hook.block for hook in two.hooks(["star"], method, -10.0)] == [BLOCK, extra]
    prompt = "a star in neon style"
    alone, together = (studio.erase([prompt], ["star"], seed=0, steps=2) for studio in (one, two))
    assert np.array_equal(np.asarray(alone.originals[0]), np.asarray(together.originals[0]))
    assert not np.array_equal(np.asarray(alone.erased[0]), np.asarray(together.erased[0]))
    classifier = MiniCanvasClassifier(ClassifierConfig(objects=world.objects, channels=(4, 4, 4)))
    assert fingerprint(one, classifier) != fingerprint(two, classifier)
    with pytest.raises(FileNotFoundError, match=r"train an SAE on up_blocks\.0\.attentions\.1 first"):
        Studio.load(world, "cpu", extra_blocks={"object": ["up_blocks.0.attentions.1"]})
    write_assets(assets, "mid_block.attentions.0", make_tiny_sae(), timesteps)
    with pytest.raises(ValueError, match="mid_block.attentions.0"):
        Studio.load(world, "cpu", extra_blocks={"object": ["mid_block.attentions.0"]})


def test_pickle_only_folders_are_refused_without_being_read(files, unpickling):
    with pytest.raises(ValueError, match=PICKLED_MODEL):
        load_pipeline(str(files / "model-pickled"), device="cpu")
    with pytest.raises(ValueError, match=r"No sae\.safetensors"):
        Sae.load(files / "sae-pickled")
    assert unpickling == []


FILE_COMPONENTS = {"File", "Files", "Image", "ImageSlider", "Gallery", "Video", "Audio", "Model3D", "UploadButton"}


def test_no_endpoint_takes_a_file_or_a_path(client):
    api = client.view_api(print_info=False, return_format="dict")
    endpoints = {**api["named_endpoints"], **api["unnamed_endpoints"]}
    assert "/erase" in endpoints
    for name, endpoint in endpoints.items():
        for parameter in endpoint["parameters"]:
            described = json.dumps(parameter).lower()
            assert parameter["component"] not in FILE_COMPONENTS, (name, parameter)
            assert not re.search(r"filepath|filedata|folder|path", described), (name, parameter)


def test_the_server_serves_no_file_a_visitor_names(served):
    for path in ("/etc/passwd", Path(studio_app.__file__).resolve(), Path(MINICANVAS.model) / "model_index.json"):
        assert httpx.get(f"{served}gradio_api/file={path}").status_code == 403


def test_load_test_reports_throughput_latency_errors_and_memory(served, capsys):
    argv = ["loadtest", f"--url={served}", f"--pid={os.getpid()}", "--clients=4", "--requests=5"]
    cli.main([*argv, "--method=SAEmnesia", "--steps=2"])
    report = json.loads(capsys.readouterr().out)
    assert (report["ok"], report["busy"], report["errors"]) == (20, 0, 0), report["error_messages"]
    assert report["throughput"] > 0 and 0 < report["latency_p50"] <= report["latency_p95"]
    assert report["rss_before_mib"] > 0 and report["rss_after_mib"] > 0


def test_a_full_queue_tells_visitors_the_server_is_busy(tiny_studio, tmp_path):
    """One request running, one waiting, a queue of one: the next visitors are told at once to come back."""
    demo, url = serve(tiny_studio, max_size=1)
    try:
        with pytest.MonkeyPatch.context() as patch:
            gate = Gate(patch, tiny_studio)
            try:
                running = api_erase(visitor(url, tmp_path / "running"), API_REQUESTS[0])
                assert gate.entered.wait(timeout=60)
                waiting = api_erase(visitor(url, tmp_path / "waiting"), API_REQUESTS[1])
                deadline = time.monotonic() + 30
                while waiting.status().code != Status.IN_QUEUE and time.monotonic() < deadline:
                    time.sleep(0.05)
                with pytest.raises(QueueError, match=r"Queue is full! Please try again\."):
                    api_erase(visitor(url, tmp_path / "turned-away"), API_REQUESTS[2]).result(timeout=30)
                report = load_test(url, clients=2, requests=1, request={"method": "SAEmnesia", "steps": 2})
                assert (report.ok, report.busy, report.errors) == (0, 2, 0)
                assert report.error_messages == ["busy: Queue is full! Please try again."]
            finally:
                gate.opened.set()
            assert running.result(timeout=60)[2] and waiting.result(timeout=60)[2]
    finally:
        demo.close()
    assert no_forward_hooks(tiny_studio)
