"""Prefect on PostgreSQL (slow): a real PostgreSQL cluster, a Prefect server on it, two process
workers on one pool sharing one data directory, and two deployment runs at once, both to
completion. Needs Debian's postgresql (`apt-get install postgresql`); skips without it."""
from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from pathlib import Path

import pytest

from prefect_server import (POOL, TERMINAL, TINY_OVERRIDES, api_get, free_port, prefect, prefect_server, run_deployment,
                           start, stop, tail, wait_until)
from tiny_runs import repetitive_text

PG_BIN = next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)), None)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(PG_BIN is None, reason="PostgreSQL not installed; apt-get install postgresql (Debian)"),
]


def as_postgres(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """initdb and pg_ctl refuse to run as root: run them as the postgres user."""
    if os.geteuid() == 0:
        args = ("runuser", "-u", "postgres", "--", *args)
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture(scope="module")
def postgres():
    """A throwaway PostgreSQL cluster on a free port with a `prefect` database; stopped afterwards."""
    root = Path(tempfile.mkdtemp(prefix="cortexcraft-pg-"))
    if os.geteuid() == 0:
        account = pwd.getpwnam("postgres")
        os.chown(root, account.pw_uid, account.pw_gid)
    port = free_port()
    data = root / "cluster"
    as_postgres(f"{PG_BIN}/initdb", "-D", str(data), "-U", "postgres", "--auth=trust", "-E", "UTF8")
    try:
        as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "-l", str(root / "postgres.log"), "-w", "start", "-o",
                    f"-p {port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=200")
        as_postgres(f"{PG_BIN}/createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect")
        yield {"url": f"postgresql+asyncpg://postgres@127.0.0.1:{port}/prefect", "port": port}
    finally:
        as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "immediate", "stop", check=False)
        shutil.rmtree(root, ignore_errors=True)


def psql(postgres: dict, query: str) -> str:
    return as_postgres(f"{PG_BIN}/psql", "-h", "127.0.0.1", "-p", str(postgres["port"]), "-U", "postgres", "-d",
                       "prefect", "-At", "-c", query).stdout.strip()


def test_two_workers_run_two_deployment_runs_at_once_on_a_postgres_backed_server(postgres, tmp_path):
    # One data directory for every worker, at the same absolute path (a shared filesystem on several machines).
    data_dir = tmp_path / "shared-data"
    sources = []
    for seed in (0, 1):
        sources.append(tmp_path / f"corpus-{seed}.txt")
        sources[-1].write_text(repetitive_text(20_000, seed=seed), encoding="utf-8")

    with ExitStack() as cleanup:
        env = cleanup.enter_context(prefect_server(tmp_path / "prefect-home", tmp_path / "server.log",
                                                   PREFECT_SERVER_DATABASE_CONNECTION_URL=postgres["url"]))
        env["OMP_NUM_THREADS"] = "1"
        api = env["PREFECT_API_URL"]
        prefect(env, "work-pool", "create", POOL, "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all")
        for name in ("worker-a", "worker-b"):
            # --limit 1: each worker takes one run at a time, so the two runs need both workers.
            worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL, "--name", name,
                            "--limit", "1"], env, tmp_path / f"{name}.log")
            cleanup.callback(stop, worker, 2)
        run_ids = []
        for source in sources:
            params = {"params": {"source": str(source), "data_dir": str(data_dir),
                                 "overrides": TINY_OVERRIDES + ['prompts=["ROMEO:"]']}}
            run_ids.append(run_deployment(env, "pipeline/pipeline-on-demand", params))

        def finished():
            runs = [api_get(api, f"/flow_runs/{run_id}") for run_id in run_ids]
            return runs if all(r and r["state_type"] in TERMINAL for r in runs) else None

        runs = wait_until("both flow runs to finish", finished, 240, tmp_path / "worker-a.log")
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in ("worker-a", "worker-b")}

    assert [r["state_type"] for r in runs] == ["COMPLETED", "COMPLETED"], tail(tmp_path / "worker-a.log") + tail(
        tmp_path / "worker-b.log"
    )
    # Each worker ran one of them, and the runs overlapped.
    # (Both workers may try to submit a run; the server lets one of them start it.)
    started = {
        name: [r["name"] for r in runs if f"Flow run '{r['name']}' submitted to infrastructure" in log]
        for name, log in logs.items()
    }
    assert sorted(len(names) for names in started.values()) == [1, 1], started
    starts, ends = [r["start_time"] for r in runs], [r["end_time"] for r in runs]
    assert max(starts) < min(ends)
    # The server kept them in PostgreSQL, and both reports landed in the shared data directory.
    assert (
        psql(
            postgres,
            f"select count(*) from flow_run where id in ('{run_ids[0]}', '{run_ids[1]}') and state_type = 'COMPLETED'",
        )
        == "2"
    )
    assert len(list(data_dir.glob("reports/*/report.md"))) == 2
