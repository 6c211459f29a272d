"""Registered tiny model versions and `cortexcraft serve` processes for the serving tests."""
from __future__ import annotations

import re
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx

from cortexcraft import registry
from cortexcraft.checkpoint import MODEL_FILE
from cortexcraft.train import train
from prefect_server import start, stop, wait_until
from tiny_runs import ONE_THREAD_ENV, make_data_dir, tiny_config

NAME = "tiny"
PROMPT_CHARS = "ROMEO:JULIET\n"
_URL = re.compile(r"serving \S+ \(.*\) on (http://[^/\s]+)/")


def registered_versions(root: Path, count: int = 2) -> Path:
    """A data directory whose registry holds ``count`` versions of model ``NAME`` (different seeds
    and lengths of training, so their answers differ), each promoted in turn: the last one is
    champion, and rolling back goes through the others."""
    data_dir = root / "data"
    shards = make_data_dir(root / "corpus")
    models = registry.models_dir_of(data_dir)
    for index in range(count):
        summary = train(tiny_config("cpu", "lr=3e-3", "warmup_iters=2", f"max_iters={20 * (index + 1)}",
                                    f"train.seed={index}"), shards, root / "runs" / f"run{index}")
        record, _ = registry.register(models, NAME, summary["run_dir"], data=registry.data_identity(shards),
                                      code_version="test", policy={"mode": "fresh"}, summary=summary)
        registry.promote(models, f"{NAME}@{record['version']}")
    return data_dir


def corrupt_copy_of_version(data_dir: Path, version: str) -> Path:
    """Flip one byte of the version's weights, keeping size; the file is replaced rather than
    written through, so the run's checkpoint it was hard-linked to stays intact."""
    version_dir = registry.version_dir(registry.models_dir_of(data_dir), NAME, version)
    (weights,) = version_dir.glob(f"checkpoints/*/{MODEL_FILE}")
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0xFF
    weights.unlink()
    weights.write_bytes(bytes(data))
    return weights


def server_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in ONE_THREAD_ENV.items() if k != "CORTEXCRAFT_API_KEY"}
    return {**env, **extra}


@contextmanager
def live_server(args: list[str], log: Path, env: dict[str, str] | None = None) -> Iterator[dict]:
    """`cortexcraft serve ARGS --port 0` in a session of its own; yields {"url", "proc", "log"}
    once /health answers; stopped (SIGTERM, then SIGKILL) on exit."""
    proc = start([sys.executable, "-m", "cortexcraft", "serve", *args, "--port", "0"], env or server_env(), log)
    try:
        match = wait_until("the server's address in its log",
                           lambda: proc.poll() is None and _URL.search(log.read_text(errors="replace")), 120, log)
        url = match.group(1)
        wait_until("/health", lambda: health(url) is not None, 60, log)
        yield {"url": url, "proc": proc, "log": log}
    finally:
        stop(proc)


def health(url: str) -> dict | None:
    try:
        response = httpx.get(url + "/health", timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def metric(url: str, name: str, headers: dict | None = None) -> float:
    """The value of one Prometheus sample, e.g. 'cortexcraft_swaps_total' or
    'cortexcraft_completions_total{finish_reason="cancelled"}' (0 when absent)."""
    text = httpx.get(url + "/metrics", timeout=5, headers=headers).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def wait_for_version(url: str, version: str, timeout: float = 5.0) -> float:
    """Seconds until /health reports ``version`` as served (AssertionError after ``timeout``)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if (state := health(url)) and state["version"] == version:
            return time.monotonic() - started
        time.sleep(0.05)
    raise AssertionError(f"{version} not served {timeout} s after the pointer moved: {health(url)}")

