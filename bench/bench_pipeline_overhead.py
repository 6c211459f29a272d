"""How much a fully cached pipeline run costs over Prefect's own floor (issue 5).

Compares, measured the same way (a fresh `python` process per run, wall time from the parent;
inside the child, the first flow call, which includes starting or reaching the API server, and a
second call, which is the flow alone):
  - trivial: a Prefect flow of 7 tasks that return small dicts, no caching;
  - cached:  the full pipeline with every stage Cached (a tiny config, trained once beforehand),
             its revalidate task finding the source unchanged and its register task the model
             already registered;
against Prefect's ephemeral server (spawned by each process) and against a running
`prefect server start` (started and stopped here). Goal: cached - trivial <= 2 s.

    python bench/bench_pipeline_overhead.py [--repeats 3]

Prints a table and writes bench/results/pipeline_overhead.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SOURCE = (
    Path(os.environ.get("CORTEXCRAFT_SHARED_DATA", REPO.parent / "shared" / "data")) / "tinyshakespeare" / "input.txt"
)
TINY = [
    "n_layer=1",
    "n_head=2",
    "n_embd=32",
    "block_size=32",
    "batch_size=8",
    "max_iters=20",
    "eval_interval=10",
    "eval_iters=2",
    "max_new_tokens=40",
    "device=cpu",
]
GOAL_SECONDS = 2.0
METRICS = ("process_seconds", "flow_seconds", "second_call_seconds")


def child(kind: str, data_dir: str) -> None:
    """Runs in the measured process: one flow call, its duration printed as JSON."""
    if kind == "trivial":
        from prefect import flow, task

        @task
        def stage(previous: dict, n: int) -> dict:
            return {"stage": n, "previous": previous.get("stage")}

        @flow
        def trivial() -> dict:
            record: dict = {}
            for n in range(7):  # as many tasks as the pipeline: revalidate, 5 stages, register
                record = stage(record, n)
            return record

        call = trivial
    else:
        from flows.params import PipelineParams
        from flows.pipeline import pipeline

        params = PipelineParams(source=str(SOURCE), data_dir=data_dir, overrides=TINY)

        def call():
            state = pipeline(params, return_state=True)
            if not state.is_completed():
                raise SystemExit(f"pipeline failed: {state.message}")

    # The first call includes starting (or connecting to) the API server; the second is the flow alone.
    timings = {}
    for name in ("flow_seconds", "second_call_seconds"):
        start = time.perf_counter()
        call()
        timings[name] = time.perf_counter() - start
    print(json.dumps(timings))


def measure(kind: str, data_dir: Path, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    out = subprocess.run(
        [sys.executable, __file__, "--child", kind, "--data-dir", str(data_dir)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    wall = time.perf_counter() - start
    if out.returncode:
        raise SystemExit(f"{kind} run failed:\n{out.stderr[-3000:]}")
    return {"process_seconds": wall, **json.loads(out.stdout.strip().splitlines()[-1])}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = free_port()
    server_env = dict(
        env, PREFECT_SERVER_API_HOST="127.0.0.1", PREFECT_SERVER_API_PORT=str(port), PREFECT_UI_ENABLED="false"
    )
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "prefect"), "server", "start"],
        env=server_env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                if response.status == 200:
                    return server, url
        except OSError:
            time.sleep(0.5)
    server.terminate()
    raise SystemExit("prefect server did not become healthy within 120 s")


def stop(server: subprocess.Popen) -> None:
    server.terminate()
    try:
        server.wait(timeout=20)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def bench(repeats: int) -> dict:
    if not SOURCE.is_file():
        raise SystemExit(
            f"{SOURCE} not found; set CORTEXCRAFT_SHARED_DATA to the folder holding tinyshakespeare/input.txt"
        )
    root = Path(tempfile.mkdtemp(prefix="cc-bench-"))
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    # The same settings the pipeline sets for itself (tasks/__init__.py), so both flows start alike.
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    )
    data_dir = root / "data"
    results: dict = {"repeats": repeats, "config": TINY, "modes": {}}
    server = None
    try:
        measure("cached", data_dir, env)  # trains once so that later runs are fully cached
        server, url = start_server(env)
        for mode, mode_env in (("ephemeral", env), ("server", dict(env, PREFECT_API_URL=url))):
            runs = {kind: [measure(kind, data_dir, mode_env) for _ in range(repeats)] for kind in ("trivial", "cached")}
            results["modes"][mode] = {
                kind: {metric: statistics.median(r[metric] for r in rs) for metric in METRICS} | {"runs": rs}
                for kind, rs in runs.items()
            }
    finally:
        if server is not None:
            stop(server)
        shutil.rmtree(root, ignore_errors=True)
    for mode in results["modes"].values():
        for metric in METRICS:
            mode[f"overhead_{metric}"] = mode["cached"][metric] - mode["trivial"][metric]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", choices=["trivial", "cached"], help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.data_dir)
        return
    results = bench(args.repeats)
    print(
        f"{'server':<10} {'flow':<8} {'process s':>10} {'1st call s':>11} {'2nd call s':>11}   "
        f"(medians of {args.repeats})"
    )
    for mode, kinds in results["modes"].items():
        rows = [(kind, kinds[kind]) for kind in ("trivial", "cached")]
        rows.append(("overhead", {metric: kinds[f"overhead_{metric}"] for metric in METRICS}))
        for kind, values in rows:
            print(
                f"{mode:<10} {kind:<8} "
                + " ".join(f"{values[m]:>{10 if m == 'process_seconds' else 11}.2f}" for m in METRICS)
            )
        verdict = "ok" if kinds["overhead_process_seconds"] <= GOAL_SECONDS else "over"
        print(f"{mode:<10} goal: cached - trivial <= {GOAL_SECONDS:.0f} s per process: {verdict}")
    out = REPO / "bench" / "results" / "pipeline_overhead.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
