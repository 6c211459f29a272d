"""Real Prefect servers, workers and CLI processes for the slow tests: each started in a session of
its own and stopped with its whole process group, on free ports, with a private PREFECT_HOME."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
POOL = "cortexcraft-pool"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


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


def wait_until(what: str, check, timeout: float, log: Path | None = None, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}\n{tail(log) if log else ''}")


def api_get(api: str, path: str):
    try:
        response = httpx.get(api + path, timeout=5)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


def api_post(api: str, path: str, body: dict):
    response = httpx.post(api + path, json=body, timeout=10)
    response.raise_for_status()
    return response.json()


@contextmanager
def prefect_server(tmp: Path, env_extra: dict[str, str] | None = None) -> Iterator[dict]:
    """A `prefect server start` on a free port; yields its env (for clients), API URL and log."""
    port = free_port()
    env = {**isolated_prefect_env(tmp / "prefect-home", port), **(env_extra or {})}
    api = f"http://127.0.0.1:{port}/api"
    log = tmp / "server.log"
    with ExitStack() as cleanup:
        server = start([sys.executable, "-m", "prefect", "server", "start"], env, log)
        cleanup.callback(stop, server)
        wait_until("the Prefect server", lambda: server.poll() is None and api_get(api, "/health"), 120, log)
        assert server.poll() is None, tail(log)
        yield {"env": env, "api": api, "ui": f"http://127.0.0.1:{port}", "log": log}


@contextmanager
def deployed_with_worker(tmp: Path, server: dict) -> Iterator[Path]:
    """The prefect.yaml deployments on a process pool, and a worker for it; yields the worker log."""
    env = server["env"]
    prefect(env, "work-pool", "create", POOL, "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    log = tmp / "worker.log"
    worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, log)
    try:
        yield log
    finally:
        stop(worker, 2)


def flow_run(api: str, run_id: str) -> dict | None:
    return api_get(api, f"/flow_runs/{run_id}")


def processes_with_env(name: str, value: str) -> list[int]:
    """Pids of this user's live processes whose environment has ``name=value``: everything a
    test started with that mark, children and grandchildren included."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                status = (entry / "stat").read_text()
                if status.rsplit(")", 1)[1].split()[0] != "Z":
                    found.append(int(entry.name))
        except OSError:
            continue
    return found
