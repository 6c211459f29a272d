"""Processes the slow tests start (Prefect servers and workers, Dask, PostgreSQL, torchrun nodes):
free ports, process groups stopped for good, logs, polling."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # A session of its own, so stopping it also stops whatever it spawned.
    with open(log, "wb") as out:
        return subprocess.Popen(args, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)


def stop(proc: subprocess.Popen, terms: int = 1) -> None:
    """SIGTERM the process group ``terms`` times (a process worker exits on the second), then
    SIGKILL whatever is left of the group."""
    for _ in range(terms):
        if proc.poll() is not None:
            break
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def prefect(env: dict[str, str], *args: str) -> str:
    result = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"prefect {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def isolated_prefect_env(home: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home),
        PREFECT_SERVER_API_HOST="127.0.0.1",
        # The port setting, not `server start --port`: the latter leaves the UI calling port 4200.
        PREFECT_SERVER_API_PORT=str(port),
        PREFECT_API_URL=f"http://127.0.0.1:{port}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        # The worker polls every 10 s by default; the run would mostly wait.
        PREFECT_WORKER_QUERY_SECONDS="1",
    )
    return env


def wait_until(what: str, check, timeout: float, log: Path | None = None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.5)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log) if log else ''}")


def api_get(api: str, path: str):
    try:
        response = httpx.get(api + path, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
