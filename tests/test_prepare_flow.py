"""The prepare flow in parts: part tasks mapped over local processes or a Dask cluster give the
serial shards byte for byte, a killed preparation resumes with the parts it finished, and a
finished one re-runs Cached without starting a task runner."""
from __future__ import annotations

import json
import logging
import os
import re
import sys
from contextlib import ExitStack
from datetime import datetime, timezone

import pytest

from cortexcraft import sources
from cortexcraft.prepare import prepare as prepare_library
from flows.params import PipelineParams
from flows.prepare import prepare
from prefect_server import free_port, start, stop, tail, wait_until
from test_parts import write_mixed_docs

pytestmark = pytest.mark.slow  # each starts worker processes or a Dask cluster


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_mixed_docs(tmp_path_factory.mktemp("flow-parts") / "docs", 60, 2000, 6000, seed=11)


def _params(docs, data_dir, data: list[str], **options) -> PipelineParams:
    return PipelineParams(source=str(docs), data_dir=str(data_dir), overrides=["shard_tokens=20000", *data], **options)


def _serial(params: PipelineParams, tmp_path) -> dict[str, bytes]:
    out = tmp_path / "serial"
    prepare_library(params.run_config().data, out, cache_dir=tmp_path / "serial-cache")
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def _shards(record, data_dir) -> dict[str, bytes]:
    directory = data_dir / record["dir"]
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.name != "stage.json"}


def _task_run_states(prefix: str, since: datetime) -> list[str]:
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(limit=200)
    # revalidate always runs (it checks the source), so it is never among the cached stages.
    return sorted(r.state.name for r in runs
                  if r.name.startswith(prefix) and not r.name.startswith("revalidate") and r.created >= since)


def test_process_workers_give_the_serial_char_shards(docs, tmp_path, temporary_prefect_server, monkeypatch, caplog):
    monkeypatch.setattr(sources, "SEGMENT_BYTES", 50_000)  # the download stage collects the files in segments too
    data_dir = tmp_path / "data"
    params = _params(docs, data_dir, [], workers=2, part_mb=0.2)
    with caplog.at_level(logging.INFO, logger="cortexcraft.sources"):
        records = prepare(params)
    assert re.search(r"collecting \d+ segments of .* with 2 processes", caplog.text)
    assert _shards(records["shards"], data_dir) == _serial(params, tmp_path)
    # Encoded parts are deleted once assembled; the (small) char counts stay.
    assert sorted(p.name for p in (data_dir / "parts").glob("*/*") if p.name != "stage.json") == ["counts.npy"] * len(
        list((data_dir / "parts").iterdir())
    )
    since = datetime.now(timezone.utc)
    again = prepare(params)
    assert again["shards"] == records["shards"] and _task_run_states("", since) == ["Cached"] * 3


def test_a_dask_cluster_at_an_address_gives_the_serial_bpe_shards(docs, tmp_path, temporary_prefect_server):
    from prefect.settings import PREFECT_API_URL

    port = free_port()
    address = f"tcp://127.0.0.1:{port}"
    # Workers on other machines would get the same: the API URL and the same absolute data path.
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), OMP_NUM_THREADS="1")
    data_dir = tmp_path / "data"
    params = _params(docs, data_dir, ["tokenizer=bpe", "vocab_size=400"], dask_address=address, part_mb=0.2)
    with ExitStack() as cleanup:
        scheduler = start(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_scheduler",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--dashboard-address",
                ":0",
            ],
            env,
            tmp_path / "scheduler.log",
        )
        cleanup.callback(stop, scheduler)
        worker = start(
            [
                sys.executable,
                "-m",
                "distributed.cli.dask_worker",
                address,
                "--nworkers",
                "2",
                "--nthreads",
                "1",
                "--no-dashboard",
            ],
            env,
            tmp_path / "worker.log",
        )
        cleanup.callback(stop, worker)
        wait_until(
            "two Dask workers",
            lambda: tail(tmp_path / "scheduler.log", 200).count("Register worker") >= 2,
            90,
            tmp_path / "scheduler.log",
        )
        since = datetime.now(timezone.utc)
        records = prepare(params)
        states = _task_run_states("encode-part", since)
    assert _shards(records["shards"], data_dir) == _serial(params, tmp_path)
    assert len(states) > 4 and set(states) == {"Completed"}
    assert "PrefectDaskClient" in (tmp_path / "scheduler.log").read_text()  # the runner used this cluster


def test_a_killed_preparation_resumes_with_the_parts_it_finished(docs, tmp_path, temporary_prefect_server):
    from prefect.settings import PREFECT_API_URL

    data_dir = tmp_path / "data"
    params = _params(docs, data_dir, ["tokenizer=bpe", "vocab_size=400"], workers=2, part_mb=0.1)
    code = (
        "import json, sys; from flows.params import PipelineParams; from flows.prepare import prepare; "
        "prepare(PipelineParams(**json.loads(sys.argv[1])))"
    )
    env = dict(os.environ, PREFECT_API_URL=PREFECT_API_URL.value(), OMP_NUM_THREADS="1")
    child = start([sys.executable, "-c", code, params.model_dump_json()], env, tmp_path / "killed.log")
    try:

        def encoded():
            return [
                p for p in data_dir.glob("parts/*/stage.json") if json.loads(p.read_text())["stage"] == "encode-part"
            ]

        wait_until(
            "three encoded parts", lambda: len(encoded()) >= 3 or child.poll() is not None, 120, tmp_path / "killed.log"
        )
        assert child.poll() is None, "the preparation finished before it could be killed; use a larger corpus\n" + tail(
            tmp_path / "killed.log"
        )
    finally:
        stop(child, terms=0)  # SIGKILL to the whole group: the flow process and its task processes
    finished_before = len(encoded())
    since = datetime.now(timezone.utc)
    records = prepare(params)
    states = _task_run_states("encode-part", since)
    # A part killed between its files and its cache record (one per worker) runs again; the others are Cached.
    assert states.count("Cached") >= max(finished_before - 2, 1), (finished_before, states)
    assert set(states) == {"Cached", "Completed"}, states
    assert _shards(records["shards"], data_dir) == _serial(params, tmp_path)
