"""The app as a user meets it (4): `python app.py` started to HTTP 200, then the first pair and its
neighbours through gradio_client."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from diffusers import StableDiffusionPipeline

from saemnesia.bench.subjects import STRENGTH, trained_sae_folder, world_bundle
from saemnesia.bench.timing import SEED, Row, Skipped
from saemnesia.hooks import block_grid
from saemnesia.studio import DICTIONARY_FILE, LATENTS_FOLDER, STATS_FILE
from saemnesia.worlds import MINICANVAS

ROOT = Path(__file__).resolve().parent.parent.parent
"""The repository, where `app.py` lives."""


def _wait_until_ready(url: str, process: subprocess.Popen, log: Path, timeout: float = 600.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"app.py exited with {process.returncode}: {log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.1)
    raise RuntimeError(f"app.py did not answer within {timeout:.0f} s.")


def app_rows(pipeline: StableDiffusionPipeline, steps: int, repeats: int, device: str) -> list[Row]:
    """Start `python app.py` to HTTP 200, then one `/erase` through gradio_client: what a user waits for."""
    from gradio_client import Client

    from saemnesia.loadtest import free_port, stop_app

    logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per HTTP request otherwise
    app = ROOT / "app.py"
    if not app.is_file():
        raise Skipped(f"No app.py in {ROOT}.")
    world = MINICANVAS
    concept = world.objects[0]
    prompt = world.prompt(concept, world.styles[0])
    started, first_pair, neighbours, pages, paints = [], [], [], [], []
    indexed = (world.assets / LATENTS_FOLDER).is_dir() and trained_sae_folder(world) is not None
    scale = pipeline.vae_scale_factor
    height, width = block_grid(pipeline.unet, world.object_block, world.height // scale, world.width // scale)
    mask = "\n".join(["1" * width] * height)
    with tempfile.TemporaryDirectory() as scratch:
        arguments, source = ["--device", device], "the world's SAE"
        if trained_sae_folder(world) is None:
            # The app erases only with an SAE in its assets: give it assets with a random one and the classifier.
            bundle, source = world_bundle(world, pipeline, steps)
            assets = Path(scratch) / "assets"
            folder = assets / "sae" / "supervised" / world.object_block
            bundle.sae.save(folder)
            bundle.stats.save(folder / STATS_FILE)
            bundle.dictionary.save(folder / DICTIONARY_FILE)
            if (world.assets / "classifier").is_dir():
                (assets / "classifier").symlink_to(world.assets / "classifier")
            arguments += ["--assets", str(assets)]
        log = Path(scratch) / "app.log"
        environment = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False"}
        for _ in range(repeats):
            port = free_port()
            url = f"http://127.0.0.1:{port}/"
            start = time.perf_counter()
            with log.open("w") as output:
                process = subprocess.Popen(
                    [sys.executable, str(app), "--port", str(port), *arguments],
                    cwd=ROOT,
                    env=environment,
                    stdout=output,
                    stderr=subprocess.STDOUT,
                )
            try:
                _wait_until_ready(url, process, log)
                started.append(time.perf_counter() - start)
                client = Client(url, verbose=False)
                start = time.perf_counter()
                client.predict(
                    prompt, [concept], "SAEmnesia", STRENGTH, SEED, steps, world.guidance, 0, 1, api_name="/erase"
                )
                first_pair.append(time.perf_counter() - start)
                start = time.perf_counter()
                client.predict(api_name="/neighbours")  # what the page asks for once the pair is shown
                neighbours.append(time.perf_counter() - start)
                if indexed:
                    start = time.perf_counter()
                    client.predict(concept, "object", "saemnesia", api_name="/latent_page")
                    pages.append(time.perf_counter() - start)
                start = time.perf_counter()
                client.predict(prompt, concept, "object", "saemnesia", 20, mask, 0, steps - 1, SEED, api_name="/paint")
                paints.append(time.perf_counter() - start)
            finally:
                stop_app(process)
    note = f"'{prompt}', erase {concept}, {steps} steps, codes recorded for Inspect; {source}"
    rows = [
        Row("app", "app start to ready (HTTP 200)", "s", started),
        Row("app", "first pair via gradio_client /erase", "s", first_pair, note=note),
        Row("app", "then the neighbours via /neighbours", "s", neighbours, note="erased images only"),
    ]
    if pages:
        rows.append(Row("app", "a latent's page via /latent_page", "s", pages, note=f"{concept}'s neuron, target 2 s"))
    rows.append(Row("app", "a painted pair via /paint", "s", paints, note=f"{concept} painted on every token"))
    return rows
