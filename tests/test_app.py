"""The app served on loopback, every endpoint called through gradio_client, and a real browser."""

import json
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import index_tiny_studio
from gradio_client import Client

import app as studio_app
from saemnesia.evaluate import DEFAULT_STRENGTH, result_set_label
from ui.shared import tuned_settings


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def served(tiny_studio, tmp_path_factory):
    index_tiny_studio(tiny_studio, tmp_path_factory.mktemp("index"))
    demo = studio_app.build_app(tiny_studio, classifier=None)
    demo.queue(default_concurrency_limit=1, max_size=8)
    port = free_port()
    demo.launch(
        server_name="127.0.0.1",
        server_port=port,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        css=studio_app.CSS,
    )
    yield f"http://127.0.0.1:{port}/"
    demo.close()


@pytest.fixture(scope="module")
def client(served):
    return Client(served, verbose=False)


def test_every_event_has_an_api_name(client):
    endpoints = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    named = {
        "/erase",
        "/neighbours",
        "/inspect",
        "/neuron_concepts",
        "/score_profile",
        "/concept_table",
        "/quick_check",
        "/latent_page",
        "/explore_image",
        "/paint",
    }
    assert named <= endpoints


def test_erase_returns_the_pair_and_panes_then_neighbours(client):
    request = ("a star in neon style", ["star"], "Both", -10, 0, 2, 5.0, 0, 1, -10, "Steer")
    slider, panes, status = client.predict(*request, api_name="/erase")
    assert len(slider) == 2 and all(slider)
    assert [pane["caption"] for pane in panes] == ["original", "erased: SAEmnesia", "erased: SAeUron"]
    assert "4 images in" in status
    neighbours = client.predict(api_name="/neighbours")  # of the session's last pair
    assert [item["caption"] for item in neighbours] == [
        "“a circle in neon style” erased",
        "“a heart in neon style” erased",
    ]


def test_a_latent_page_shows_its_top_images_density_and_neighbours(client, tiny_studio):
    info, gallery, histogram, nearest = client.predict("star", "object", "saemnesia", api_name="/latent_page")
    latent = tiny_studio.bundles["saemnesia", "object"].dictionary.latent("star")
    index = tiny_studio.bundles["saemnesia", "object"].index
    assert f"**Latent {latent}**" in info and "bound to **star**" in info
    assert len(gallery) == int((index.top_images[latent] >= 0).sum()) > 0
    assert all("seed" in item["caption"] and "step" in item["caption"] for item in gallery)
    assert sum(row[1] for row in histogram["data"]) == int(index.fire_counts[latent])
    assert [row[0] for row in nearest["data"]] == index.nearest[latent].tolist()
    by_number = client.predict(str(latent), "object", "saemnesia", api_name="/latent_page")
    assert by_number[0] == info
    for query, message in (("9999", "latent must be a concept name or an integer in [0, 255]"), ("unicorn", "Unknown")):
        with pytest.raises(Exception, match=message.replace("[", r"\[").replace("]", r"\]")):
            client.predict(query, "object", "saemnesia", api_name="/latent_page")


def test_explore_image_lists_the_last_images_top_latents(client):
    with pytest.raises(Exception, match="No image yet"):
        Client(client.src, verbose=False).predict("object", "original", 1, api_name="/explore_image")
    client.predict("a star in neon style", ["star"], "SAEmnesia", -10, 0, 2, 5.0, 0, 1, -10, "Steer", api_name="/erase")
    gallery = client.predict("object", "erased", 1, api_name="/explore_image")
    assert 0 < len(gallery) <= 8 and all(item["caption"].startswith("latent ") for item in gallery)


def test_paint_returns_the_pair_and_the_latents_heatmap_and_refuses_bad_masks(client, tiny_studio):
    height, width = tiny_studio.token_grid("object")
    middle = "\n".join("".join("1" if height // 4 <= r < 3 * height // 4 and width // 4 <= c < 3 * width // 4 else "0"
                                for c in range(width)) for r in range(height))  # fmt: skip
    pair, panes, status = client.predict(
        "a circle in neon style", "star", "object", "saemnesia", 30, middle, 0, 1, 0, api_name="/paint"
    )
    assert len(pair) == 2 and [pane["caption"].split(" ")[0] for pane in panes] == [
        "original",
        "painted",
        "latent",
        "mask",
    ]
    assert f"on {middle.count('1')} tokens" in status
    for mask, message in (
        ("0110", f"mask must be a {height} x {width} grid"),
        ("01x", "only 0 and 1"),
        ("", "rows of"),
    ):
        with pytest.raises(Exception, match=message):
            client.predict(
                "a circle in neon style", "star", "object", "saemnesia", 30, mask, 0, 1, 0, api_name="/paint"
            )
    with pytest.raises(Exception, match=r"strength must be in \[-100, 100\]"):  # NaN: tests/test_paint.py
        client.predict("a circle", "star", "object", "saemnesia", 1e6, middle, 0, 1, 0, api_name="/paint")
    with pytest.raises(Exception, match="last painted step must be an integer in"):
        client.predict("a circle", "star", "object", "saemnesia", 5, middle, 0, 9, 0, api_name="/paint")
    with pytest.raises(Exception, match="source must be one of neuron, footprint, got 'colour'"):
        client.predict("a circle", "star", "object", "saemnesia", 5, middle, 0, 1, 0, "colour", api_name="/paint")
    with pytest.raises(Exception, match="has no footprints: make them with"):  # the tiny world ships none
        client.predict("a circle", "star", "object", "saemnesia", 2, middle, 0, 1, 0, "footprint", api_name="/paint")


def test_one_click_compares_original_steer_and_replace(client):
    request = ("a star in neon style", ["star"], "SAEmnesia", -10, 0, 2, 5.0, 0, 1)  # the default: compare
    slider, panes, status = client.predict(*request, api_name="/erase")
    captions = [pane["caption"] for pane in panes]
    assert captions == ["original", "erased: SAEmnesia", "erased: SAEmnesia + replace"]
    assert "4 images in" in status and len(slider) == 2
    with pytest.raises(Exception, match="intervention must be one of"):
        client.predict(*request, -10, "scrub", api_name="/erase")


def test_neighbours_before_any_erasure_say_to_erase_first(served):
    with pytest.raises(Exception, match="press Erase first"):
        Client(served, verbose=False).predict(api_name="/neighbours")  # a new session: no pair yet


def test_both_methods_erase_at_their_own_strengths(client, tiny_studio, monkeypatch):
    strengths, erase = {}, tiny_studio.erase

    def recording_erase(prompts, concepts, method="saemnesia", strength=-10.0, **settings):
        strengths[method] = strength
        return erase(prompts, concepts, method, strength, **settings)

    monkeypatch.setattr(tiny_studio, "erase", recording_erase)
    client.predict("a star in neon style", ["star"], "Both", -0.3, 0, 2, 5.0, 0, 1, -25.0, "Steer", api_name="/erase")
    assert strengths == {"saemnesia": -0.3, "saeuron": -25.0}


def test_tuned_settings_come_from_the_benchmark_per_method():
    benchmark = {
        "methods": {
            "saemnesia": {"concepts": {"star": {"chosen": {"strength": -0.3, "features_per_step": 1}}}},
            "saeuron": {"concepts": {"star": {"chosen": {"strength": -25.0, "features_per_step": 2}}}},
        }
    }
    assert tuned_settings(benchmark, ["star"]) == (-0.3, -25.0, 2)
    default = DEFAULT_STRENGTH
    assert tuned_settings(None, ["star"]) == tuned_settings(benchmark, []) == (default, default, 1)


def test_erase_refuses_unknown_concept_with_its_name(client):
    with pytest.raises(Exception, match="unicorn"):
        client.predict("a star", ["unicorn"], "SAEmnesia", -10, 0, 2, 5.0, 0, 1, api_name="/erase")


def test_inspect_shows_maps_of_the_last_run(client):
    client.predict("a star in neon style", ["star"], "SAEmnesia", -10, 0, 2, 5.0, 0, 1, api_name="/erase")
    original, erased, mask, info = client.predict("star", None, "saemnesia", 1, 0.6, api_name="/inspect")
    assert original and erased and mask
    assert "Neuron" in info and "Tokens edited" in info
    *_, replaced = client.predict("star", None, "saemnesia+replace", 1, 0.6, api_name="/inspect")
    assert "Tokens detected and replaced" in replaced
    with pytest.raises(Exception, match="No SAeUron \\+ replace run"):
        client.predict("star", None, "saeuron+replace", 1, 0.6, api_name="/inspect")


def test_neuron_tools(client):
    drivers = client.predict(0, "object", "saemnesia", api_name="/neuron_concepts")
    assert len(drivers["data"]) == 5
    table = client.predict(api_name="/concept_table")
    assert {row[0] for row in table["data"]} >= {"star", "circle", "heart", "neon", "sketch"}
    profile = client.predict("star", api_name="/score_profile")
    assert profile is not None


def test_result_sets_are_named_in_plain_words_from_their_name_parts():
    assert result_set_label("full") == "full: the benchmark, every object and style, seed 60000"
    assert result_set_label("full", [60000, 60001]) == "full: the benchmark, every object and style, seeds 60000-60001"
    assert result_set_label("standard") == "standard: a lighter search, every object and 4 styles, seed 60000"
    assert result_set_label("quick") == "quick: a smoke test, 3 objects and 2 styles, seed 60000"
    assert result_set_label("full-heldout-from-70000", [70000, 70001]) == (  # the seeds that run recorded
        "full-heldout-from-70000: the same tuning, reported on seeds 70000-70001"
    )
    assert result_set_label("full-no-object-class") == (
        "full-no-object-class: scored by the classifier that can answer 'nothing'"
    )
    assert result_set_label("quick-tuned-on-2-seeds-plus-mid_block.attentions.0-up_blocks.0.attentions.1-replace") == (
        "quick-tuned-on-2-seeds-plus-mid_block.attentions.0-up_blocks.0.attentions.1-replace: tuned on 2 seeds; "
        "objects erased at mid_block.attentions.0, up_blocks.0.attentions.1 too; replace only"
    )
    assert result_set_label("full-something-new") == "full-something-new"  # a name it cannot read, as it is


BROWSER = "needs Debian's chromium (installed by .ci/run)"


def browse(served: str, steps: str, height: int = 900) -> dict:
    """Run playwright `steps` (indented 4, ending in a print of JSON) on the served page in headless chromium."""
    script = f"""
import json
from playwright.sync_api import sync_playwright
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="{shutil.which("chromium")}", args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={{"width": 1280, "height": {height}}})
    page.goto("{served}")
{steps}
    browser.close()
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(shutil.which("chromium") is None, reason=BROWSER)
def test_browser_follows_an_example_through_erase_and_inspect_and_shows_every_tab(served, tmp_path):
    """A visitor's path: Inspect says no erasure has run; an example sets the concept it erases; an erasure with 3
    steps (the tiny world's default is 2) leaves Inspect on that run, its step slider spanning those steps."""
    seen = browse(
        served,
        f"""
    page.get_by_role("tab", name="Inspect").click()
    waiting = page.get_by_text("No erasure has run yet").is_visible()
    page.get_by_role("tab", name="Erase").click()
    page.get_by_text("zebra picture of a heart").first.click()
    page.wait_for_function("() => document.querySelector('.token')?.innerText.trim() === 'heart'", timeout=10000)
    concepts = page.locator(".token").all_inner_texts()
    page.get_by_text("Sampling").click()
    page.get_by_label("number input for Steps").fill("3")
    page.get_by_label("number input for Steps").press("Enter")
    page.get_by_role("button", name="Erase", exact=True).click()
    page.wait_for_selector("text=images in", timeout=60000)
    page.wait_for_selector("text=” erased", timeout=60000)  # the neighbours, which follow the pair
    images = page.locator("img").count()
    page.screenshot(path="{tmp_path / "erase.png"}", full_page=True)
    page.get_by_role("tab", name="Inspect").click()
    page.wait_for_selector("text=Peak activation", timeout=30000)  # the maps of the new run, shown unasked
    step = page.locator("input[type=range][aria-label^='range slider for Step (']")
    shown = {{"max": step.get_attribute("max"), "label": step.get_attribute("aria-label")}}
    shown["waiting"] = page.get_by_text("No erasure has run yet").is_visible()
    page.screenshot(path="{tmp_path / "inspect.png"}", full_page=True)
    for tab in ("Neurons", "Metrics", "About"):
        page.get_by_role("tab", name=tab).click()
        page.wait_for_timeout(500)
        page.screenshot(path=f"{tmp_path}/{{tab.lower()}}.png", full_page=True)
    print(json.dumps({{"waiting_before": waiting, "concepts": concepts, "images": images, "inspect": shown}}))""",
    )
    assert seen["waiting_before"] and seen["concepts"] == ["heart"]
    assert seen["images"] >= 5  # the slider's pair, three panes; then the neighbours
    assert seen["inspect"] == {
        "max": "2",
        "label": "range slider for Step (0 – 2, of the last run)",
        "waiting": False,
    }
    for tab in ("erase", "inspect", "neurons", "metrics", "about"):
        assert (tmp_path / f"{tab}.png").stat().st_size > 10_000, tab


@pytest.mark.skipif(shutil.which("chromium") is None, reason=BROWSER)
def test_browser_drives_the_explorer_and_paint(served, tmp_path):
    """A researcher's path: the explorer opens a concept's latent, then the nearest latent from its table; Paint
    paints the middle of the grid and shows the pair with the latent's heatmap."""
    seen = browse(
        served,
        f"""
    page.get_by_role("tab", name="Neurons").click()
    page.get_by_label("Concept or latent number").fill("heart")
    page.get_by_role("button", name="Show latent").click()
    page.wait_for_function("() => document.querySelector('#latent-info').innerText.includes('Fires on')")
    first = page.locator("#latent-info").inner_text()
    page.screenshot(path="{tmp_path / "explorer.png"}", full_page=True)
    nearest = page.locator("#nearest-latents [data-testid='cell-0-0']")
    neighbour = nearest.inner_text().strip()
    nearest.click()
    page.wait_for_function("n => document.body.innerText.includes('Latent ' + n + ' at')", arg=neighbour, timeout=30000)
    page.get_by_role("tab", name="Paint").click()
    page.get_by_role("button", name="Paint", exact=True).click()
    page.wait_for_selector("text=2 images in", timeout=60000)
    status = page.get_by_text("2 images in").inner_text()
    images = page.locator("img").count()
    page.screenshot(path="{tmp_path / "paint.png"}", full_page=True)
    print(json.dumps({{"explorer": first, "neighbour": neighbour, "paint": status, "images": images}}))""",
        height=1000,
    )
    assert "bound to heart" in seen["explorer"] and "Latent" in seen["explorer"] and seen["neighbour"].isdigit()
    assert "tokens, steps 0" in seen["paint"] and seen["images"] >= 3
    for name in ("explorer", "paint"):
        assert (tmp_path / f"{name}.png").stat().st_size > 10_000, name
