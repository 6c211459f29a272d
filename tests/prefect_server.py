"""Helpers for tests that run a real Prefect server, workers, deployments and headless Chromium:
every process in a session of its own (stopped with its children), ports from the OS, PREFECT_*
settings isolated from the user's."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import httpx
import pytest

REPO = Path(__file__).resolve().parent.parent
POOL = "cortexcraft-pool"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
# --set values that shrink the pipeline's model to seconds of training.
TINY_OVERRIDES = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=20",
                  "warmup_iters=0", "eval_interval=10", "eval_iters=2", "checkpoint_interval=10",
                  "max_new_tokens=40"]


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
        # The tiny models train fastest on one thread, and the machine is shared.
        OMP_NUM_THREADS="1",
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


def api_get(api: str, path: str, auth: tuple[str, str] | None = None):
    try:
        response = httpx.get(api + path, timeout=5, auth=auth)
    except httpx.TransportError:
        return None
    return response.json() if response.status_code == 200 else None


@contextmanager
def prefect_server(home: Path, log: Path, **settings: str) -> Iterator[dict[str, str]]:
    """A `prefect server start` on a free port with PREFECT_HOME ``home`` (plus ``settings`` in
    its environment), stopped on exit. Yields the environment clients use to reach it."""
    port = free_port()
    env = isolated_prefect_env(home, port)
    api = env["PREFECT_API_URL"]
    server = start([sys.executable, "-m", "prefect", "server", "start"], {**env, **settings}, log)
    try:
        def healthy():
            try:
                return server.poll() is None and httpx.get(api + "/health", timeout=5).status_code in (200, 401)
            except httpx.TransportError:
                return False
        wait_until("the Prefect server", healthy, 90, log)
        yield env
    finally:
        stop(server)


def api_post(api: str, path: str, body: dict):
    response = httpx.post(api + path, json=body, timeout=10)
    response.raise_for_status()
    return response.json()


@contextmanager
def deployed_with_worker(tmp: Path, env: dict[str, str]) -> Iterator[Path]:
    """The prefect.yaml deployments on a process pool of the server in ``env``, and a worker
    taking its runs (stopped on exit); yields the worker's log."""
    prefect(env, "work-pool", "create", POOL, "--type", "process")
    prefect(env, "--no-prompt", "deploy", "--all")
    log = tmp / "worker.log"
    worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, log)
    try:
        yield log
    finally:
        stop(worker, 2)


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


def run_deployment(env: dict[str, str], name: str, params: dict) -> str:
    """Start a run of deployment ``name`` with ``params``; returns the flow run id."""
    out = prefect(env, "deployment", "run", name, "--params", json.dumps(params))
    return re.search(r"UUID: ([0-9a-f-]{36})", out).group(1)


def wait_for_flow_run(api: str, run_id: str, log: Path, timeout: float = 150,
                      auth: tuple[str, str] | None = None) -> dict:
    def finished():
        run = api_get(api, f"/flow_runs/{run_id}", auth)
        return run if run and run["state_type"] in TERMINAL else None

    return wait_until("the flow run to finish", finished, timeout, log)


def report_artifact(api: str, run_id: str) -> dict:
    response = httpx.post(
        f"{api}/artifacts/filter",
        timeout=5,
        json={"artifacts": {"flow_run_id": {"any_": [run_id]}, "type": {"any_": ["markdown"]}}},
    )
    (report,) = [a for a in response.json() if a["key"].startswith("report-")]
    return report


def require_chromium() -> None:
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} not found; install Debian's chromium (apt-get install chromium) for the UI test")


def open_report_artifact(page, ui: str, run_id: str, report: dict) -> None:
    """Navigate the Prefect UI from the flow run page to its report artifact, as a user would."""
    page.goto(f"{ui}/runs/flow-run/{run_id}")
    page.get_by_text("Artifacts", exact=True).last.click()
    page.wait_for_url("**tab=Artifacts**")
    page.get_by_text(report["key"], exact=True).click()
    page.wait_for_url(f"**/artifacts/artifact/{report['id']}")


def report_sample_first_lines(markdown: str) -> list[str]:
    """The first non-blank line of each generated sample in the report's markdown."""
    samples = re.findall(r"\*\*Prompt\*\* [^\n]*\n\s*\n(`{3,})[^\n]*\n(.*?)\n\1", markdown, re.S)
    return [next((line.strip() for line in body.splitlines() if line.strip()), "") for _, body in samples]


def stage_states(api: str, since: str) -> dict[str, dict[str, str]]:
    """{flow run id: {stage: state name}} of the pipeline runs started after ``since``."""
    runs = api_post(api, "/flow_runs/filter", {"flow_runs": {"start_time": {"after_": since}}})
    out = {}
    for run in runs:
        task_runs = api_post(api, "/task_runs/filter", {"flow_runs": {"id": {"any_": [run["id"]]}}})
        out[run["id"]] = {
            "overrides": run["parameters"]["params"]["overrides"],
            **{t["name"].rsplit("-", 1)[0]: t["state"]["name"] for t in task_runs},
        }
    return out
