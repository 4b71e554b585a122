"""A bounded load test of the Studio app: K clients at once, N Erase clicks each, through gradio_client.

A click is what the page sends: `/erase` (the pair), then `/neighbours` (the same erasure on neighbour
prompts) once the pair has come back.

    python -m saemnesia loadtest [--url URL [--pid PID]] [--clients 4] [--requests 5] [--steps 4]

It reports throughput, p50/p95 latency, errors (refusals of a full queue counted apart, as "busy") and the
server's resident memory before and after, read from /proc/PID/status. Without --url it starts
`python app.py --world WORLD` on a free loopback port, measures that process, and stops it afterwards.
"""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import TimeoutError as AnswerTimeout
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from gradio_client import Client
from gradio_client.utils import QueueError

APP = Path(__file__).resolve().parent.parent / "app.py"
CLIENTS_RANGE = (1, 64)
REQUESTS_RANGE = (1, 1000)
ERROR_SAMPLES = 5
"""Distinct error messages kept in the report: enough to see what went wrong, never a flood."""


@dataclass
class LoadReport:
    clients: int
    requests_per_client: int
    ok: int
    busy: int
    """Refused at once because the server's queue was full."""
    errors: int
    seconds: float
    throughput: float
    """Successful requests per second of wall time."""
    latency_p50: float | None
    latency_p95: float | None
    rss_before_mib: float | None
    rss_after_mib: float | None
    error_messages: list[str] = field(default_factory=list)


def resident_mib(pid: int | None) -> float | None:
    """The process's resident memory (VmRSS) in MiB, or None where /proc does not show it."""
    if pid is None:
        return None
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return None


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (`share` in [0, 1]): a latency some request really had."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[max(0, math.ceil(share * len(ordered)) - 1)]


def check_range(name: str, value: int, bounds: tuple[int, int]) -> None:
    low, high = bounds
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}.")


def _run_load(url: str, clients: int, requests: int, request: dict, pid: int | None, timeout: float) -> LoadReport:
    """`clients` gradio_client sessions, each in its own thread, send `requests` erase requests in turn."""
    # Each session saves the images it is sent into a folder of its own: gradio_client's default is the
    # server's cache folder (/tmp/gradio, named by content), where a local server's files would be
    # overwritten while it serves them.
    with tempfile.TemporaryDirectory(prefix="saemnesia-loadtest-") as downloads:
        sessions = [Client(url, verbose=False, download_files=Path(downloads) / str(i)) for i in range(clients)]
        return _measure(sessions, requests, request, pid, timeout)


def _measure(sessions: list[Client], requests: int, request: dict, pid: int | None, timeout: float) -> LoadReport:
    """Each request gets its own seed, so no two are the same work; `request` holds the other /erase settings."""
    latencies: list[float] = []
    outcomes = {"ok": 0, "busy": 0, "errors": 0}
    messages: dict[str, None] = {}
    record = threading.Lock()
    start = threading.Barrier(len(sessions))

    def visitor(index: int, client: Client) -> None:
        start.wait()
        for number in range(requests):
            began = time.perf_counter()
            click = (("/erase", {**request, "seed": index * requests + number}), ("/neighbours", {}))
            try:
                for endpoint, arguments in click:  # the neighbours of the pair just made
                    job = client.submit(**arguments, api_name=endpoint)
                    job.result(timeout=timeout)
                outcome, message = "ok", None
            except QueueError as error:
                outcome, message = "busy", f"busy: {error}"
            except AnswerTimeout:
                job.cancel()
                outcome, message = "errors", f"no answer within {timeout:g} s"
            except Exception as error:  # whatever the server or the network says, counted and kept
                outcome, message = "errors", f"{type(error).__name__}: {error}"
            with record:
                outcomes[outcome] += 1
                if outcome == "ok":
                    latencies.append(time.perf_counter() - began)
                elif len(messages) < ERROR_SAMPLES:
                    messages.setdefault(message)

    rss_before = resident_mib(pid)
    threads = [threading.Thread(target=visitor, args=(i, c), daemon=True) for i, c in enumerate(sessions)]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - began
    return LoadReport(
        clients=len(sessions),
        requests_per_client=requests,
        ok=outcomes["ok"],
        busy=outcomes["busy"],
        errors=outcomes["errors"],
        seconds=round(seconds, 3),
        throughput=round(outcomes["ok"] / seconds, 3),
        latency_p50=_rounded(percentile(latencies, 0.50)),
        latency_p95=_rounded(percentile(latencies, 0.95)),
        rss_before_mib=rss_before,
        rss_after_mib=resident_mib(pid),
        error_messages=list(messages),
    )


def _rounded(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_app(world: str, port: int, device: str | None = None, wait: float = 300.0) -> subprocess.Popen:
    """`python app.py --world WORLD` on loopback, returned once it answers HTTP (or raising if it died)."""
    command = [sys.executable, str(APP), "--world", world, "--host", "127.0.0.1", "--port", str(port)]
    if device:
        command += ["--device", device]
    log = tempfile.TemporaryFile("w+")  # a file, not a pipe: a chatty app never blocks on a full pipe
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if server.poll() is not None:
            log.seek(0)
            raise RuntimeError(f"The app exited with code {server.returncode}: {log.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    server.terminate()
    raise TimeoutError(f"The app did not answer on port {port} within {wait:g} s.")


def stop_app(server: subprocess.Popen) -> None:
    """Ask the app to stop, and kill it if it has not within 30 s."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def load_test(
    url: str | None,
    clients: int,
    requests: int,
    request: dict,
    pid: int | None = None,
    world: str = "minicanvas",
    device: str | None = None,
    timeout: float = 300.0,
) -> LoadReport:
    """Run the load against `url`, or against a freshly started app (measured, then stopped) when it is None."""
    check_range("clients", clients, CLIENTS_RANGE)
    check_range("requests", requests, REQUESTS_RANGE)
    if url is not None:
        return _run_load(url, clients, requests, request, pid, timeout)
    port = free_port()
    server = start_app(world, port, device)
    try:
        return _run_load(f"http://127.0.0.1:{port}/", clients, requests, request, server.pid, timeout)
    finally:
        stop_app(server)
