"""Remake docs/erase-tab.png: the app's Erase tab after one click on Erase, with its defaults.

    python docs/screenshot.py [--out docs/erase-tab.png]

Serves `app.py` (the MiniCanvas world, on the CPU) on a free loopback port, drives it with Playwright and
Debian's chromium (`apt-get install chromium`, as `.ci/run` does), waits for the pair and the neighbour
prompts, and saves the page. Run it again whenever the Erase tab changes.
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from playwright.sync_api import sync_playwright

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_until_served(url: str, server: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"app.py exited with code {server.returncode} before serving {url}.")
        try:
            with urllib.request.urlopen(url, timeout=5):
                return
        except OSError:
            time.sleep(1)
    raise TimeoutError(f"app.py did not serve {url} within {timeout:.0f} s.")


def screenshot(out: Path, width: int = 1280, height: int = 1000) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        raise SystemExit("Needs Debian's chromium: apt-get install chromium.")
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    server = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--device", "cpu"], cwd=ROOT)
    try:
        wait_until_served(url, server)
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": width, "height": height})
            page.goto(url)
            page.get_by_role("button", name="Erase", exact=True).click()
            page.wait_for_selector("text=images in", timeout=120_000)  # the pair
            page.wait_for_selector("text=” erased", timeout=120_000)  # the neighbour prompts, which follow it
            page.wait_for_timeout(1000)  # let the images finish painting
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=30)
    print(f"wrote {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "erase-tab.png")
    screenshot(parser.parse_args().out)
