"""The Prefect pipeline end to end on Tiny Shakespeare with a tiny model: outputs, artifacts read
back through Prefect's client, and which stages re-run (Completed) or not (Cached) as inputs change.

All runs share one temporary Prefect server and database (PREFECT_HOME in a temp dir) and one data
directory, like a user re-running the pipeline in the same project.
"""
from __future__ import annotations

import base64
import functools
import http.server
import json
import shutil
import threading
import time

import pytest

prefect = pytest.importorskip("prefect")

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import (  # noqa: E402
    ArtifactFilter, ArtifactFilterKey, FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId)

from cortexcraft.errors import CortexCraftError  # noqa: E402
from flows.params import PipelineParams  # noqa: E402
from flows.pipeline import pipeline, run_pipeline_from_cli  # noqa: E402
from flows.prepare import prepare  # noqa: E402
from flows.report import report  # noqa: E402
from flows.train import train  # noqa: E402
from tasks.stage import STAGES  # noqa: E402

TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=20",
        "warmup_iters=2", "eval_interval=10", "eval_iters=2", "checkpoint_interval=10", "max_new_tokens=40",
        "device=cpu"]


@pytest.fixture(scope="module")
def project(tmp_path_factory, tinyshakespeare_path, temporary_prefect_server):
    """A data dir and a private copy of Tiny Shakespeare (one test edits it), after a first run."""
    root = tmp_path_factory.mktemp("project")
    source = root / "input.txt"
    shutil.copyfile(tinyshakespeare_path, source)
    data_dir = root / "data"
    state, records = run(source=source, data_dir=data_dir)
    return {"source": source, "data_dir": data_dir, "first": (state, records)}


def run(source, data_dir, overrides=(), **extra):
    params = PipelineParams(source=str(source), data_dir=str(data_dir), overrides=TINY + list(overrides), **extra)
    state = pipeline(params, return_state=True)
    assert state.is_completed(), state.message
    return state, state.result()


def stage_states(state) -> dict[str, str]:
    # Task runs reach the API through events, shipped in the background: wait for all of them.
    deadline = time.monotonic() + 30
    while True:
        with get_client(sync_client=True) as client:
            task_runs = client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))
        final = len(task_runs) >= len(STAGES) + 2 and all(tr.state and tr.state.is_final() for tr in task_runs)
        if final or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    states = {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in task_runs}
    # revalidate asks whether the source changed and register reads and changes the model
    # registry, so both run every time (see test_freshness and test_registry).
    assert sorted(states) == sorted(STAGES + ("revalidate", "register"))
    assert states.pop("revalidate") == states.pop("register") == "Completed"
    return states


def latest_artifact(key: str):
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key])))
    assert found, f"no artifact with key {key}"
    return found[0]


def test_first_run_writes_outputs_and_artifacts(project):
    state, records = project["first"]
    assert set(stage_states(state).values()) == {"Completed"}
    data_dir = project["data_dir"]

    run_dir = data_dir / records["train"]["dir"]
    assert (run_dir / "metrics.jsonl").is_file() and (run_dir / "summary.json").is_file()
    assert records["train"]["summary"]["steps"] == 20
    report_md = (data_dir / records["report"]["dir"] / "report.md").read_text()

    run_key = records["train"]["key"]
    report = latest_artifact(f"report-{run_key}")
    assert report.type == "markdown" and report.data == report_md
    for prompt in ("ROMEO:", "First Citizen:"):
        assert json.dumps(prompt) in report.data
    uri = report.data.split("![loss curve](", 1)[1].split(")", 1)[0]
    assert uri.startswith("data:image/svg+xml;base64,")
    svg = base64.b64decode(uri.split(",", 1)[1]).decode()
    assert svg.startswith("<svg") and svg.count("<polyline") == 2
    assert "bits/char" in report.data and f"{records['train']['summary']['params']:,}" in report.data

    history = json.loads(latest_artifact(f"eval-history-{run_key}").data)
    assert [row["step"] for row in history] == [0, 10, 20]
    assert latest_artifact(f"train-progress-{run_key}").data == 100.0
    assert str(run_dir) in latest_artifact(f"run-dir-{run_key}").data
    assert "checkpoints" in latest_artifact(f"checkpoint-{run_key}").data

    assert "1,115,394" in latest_artifact(f"corpus-{records['download']['key']}").data
    assert "65" in latest_artifact(f"vocab-{records['vocab']['key']}").data
    shard_rows = json.loads(latest_artifact(f"shards-{records['shards']['key']}").data)
    assert {row["split"] for row in shard_rows} == {"train", "val"}


def test_rerun_with_nothing_changed_is_all_cached(project):
    state, records = run(project["source"], project["data_dir"])
    assert set(stage_states(state).values()) == {"Cached"}
    assert records["report"] == project["first"][1]["report"]


def test_stage_group_flows_chain_on_their_own_and_share_the_cache(project):
    params = PipelineParams(source=str(project["source"]), data_dir=str(project["data_dir"]), overrides=TINY)
    data = prepare(params)
    run_record = train(data["shards"], params)
    report_record = report(run_record, data, params)
    assert report_record == project["first"][1]["report"]


def test_deleted_shard_reruns_only_the_shards(project):
    data_dir, first = project["data_dir"], project["first"][1]
    shard = data_dir / first["shards"]["dir"] / "train_000.bin"
    shard.unlink()
    state, records = run(project["source"], data_dir)
    assert stage_states(state) == {"download": "Cached", "vocab": "Cached", "shards": "Completed",
                                   "train": "Cached", "report": "Cached"}
    # The rewritten shards are byte-identical, so training (keyed on content) stayed valid.
    assert shard.is_file() and records["shards"]["content"] == first["shards"]["content"]


def test_sampling_change_reruns_only_the_report(project):
    state, records = run(project["source"], project["data_dir"], overrides=["temperature=0.5"])
    assert stage_states(state) == {"download": "Cached", "vocab": "Cached", "shards": "Cached",
                                   "train": "Cached", "report": "Completed"}
    assert "temperature 0.5" in (project["data_dir"] / records["report"]["dir"] / "report.md").read_text()


def test_training_change_reruns_train_and_report(project):
    state, records = run(project["source"], project["data_dir"], overrides=["lr=1e-3"])
    assert stage_states(state) == {"download": "Cached", "vocab": "Cached", "shards": "Cached",
                                   "train": "Completed", "report": "Completed"}
    assert records["train"]["dir"] != project["first"][1]["train"]["dir"]


def test_retrain_continue_starts_from_the_champion_in_a_run_of_its_own(project):
    first = project["first"][1]
    state, records = run(project["source"], project["data_dir"], model="nightly")
    assert stage_states(state)["train"] == "Cached"  # an existing run registers under a new name as is
    assert records["register"]["version"] == "v1" and records["register"]["decision"]["rule"] == "first version"
    state, records = run(project["source"], project["data_dir"], model="nightly", retrain="continue", retrain_iters=10)
    states = stage_states(state)
    assert states["train"] == "Completed" and states["report"] == "Completed"
    summary = records["train"]["summary"]
    assert summary["segment_start"] == 20 and summary["steps"] == 30 and summary["resumed_from_step"] is None
    assert records["train"]["dir"] != first["train"]["dir"]  # the champion's run is left as it was
    model = records["register"]
    assert model["version"] == "v2" and model["policy"]["parent"] == "v1" and model["policy"]["mode"] == "continue"
    report = (project["data_dir"] / records["report"]["dir"] / "report.md").read_text()
    assert "**Model:** `nightly` v2, continue from v1 (step 20 to 30)" in report
    # Its own lr segment: warmup from step 20, then decay to min_lr at step 30.
    history = json.loads(latest_artifact(f"eval-history-{records['train']['key']}").data)
    assert [row["step"] for row in history] == [20, 30]

    again, same = run(project["source"], project["data_dir"], model="nightly", retrain="continue", retrain_iters=10)
    if same["register"]["decision"]["promoted"]:  # v2 is champion: continuing it is a new run
        assert same["train"]["dir"] != records["train"]["dir"]
    else:  # v1 still champion: the same continuation, Cached, and not registered twice
        assert stage_states(again)["train"] == "Cached" and same["register"]["version"] == "v2"


def test_refresh_forces_the_chosen_stage(project):
    state, _ = run(project["source"], project["data_dir"], refresh=["vocab"])
    assert stage_states(state) == {"download": "Cached", "vocab": "Completed", "shards": "Cached",
                                   "train": "Cached", "report": "Cached"}


def test_torchrun_training_output_reaches_the_run_logs(project):
    state, records = run(project["source"], project["data_dir"], overrides=["max_iters=10"], nproc=2)
    assert stage_states(state)["train"] == "Completed"
    assert records["train"]["summary"]["world_size"] == 2
    assert latest_artifact(f"train-progress-{records['train']['key']}").data == 100.0
    flow_run_id = state.state_details.flow_run_id
    deadline = time.monotonic() + 30  # the log handler ships records in the background
    while True:
        with get_client(sync_client=True) as client:
            logs = client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        messages = [log.message for log in logs]
        if any("[torchrun]" in m and "world size 2" in m for m in messages) or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert any("[torchrun]" in m and "world size 2" in m for m in messages)
    # The trainers' own evaluation line, logged once (the task no longer repeats it).
    assert sum("step 10/10: train loss" in m for m in messages) == 1


def test_changed_source_reruns_every_stage(project):
    source = project["source"]
    original = source.read_bytes()
    try:
        source.write_bytes(original.replace(b"ROMEO", b"ROMEA", 1))
        state, _ = run(source, project["data_dir"])
        assert set(stage_states(state).values()) == {"Completed"}
    finally:
        source.write_bytes(original)


def test_url_source_is_revalidated_each_run_and_downloaded_only_when_it_changed(
    tmp_path, tinyshakespeare_path, temporary_prefect_server
):
    from test_freshness import CountingHandler, bodies_sent, edit

    site = tmp_path / "site"
    site.mkdir()
    text = tinyshakespeare_path.read_text(encoding="utf-8")[:60_000]
    (site / "input.txt").write_text(text, encoding="utf-8")
    log: list = []
    handler = type("Handler", (CountingHandler,), {"log": log})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{httpd.server_port}/input.txt"
        state, first = run(url, tmp_path / "data")
        sent = bodies_sent(log)
        assert stage_states(state)["download"] == "Completed" and sent >= 1
        assert "Last-Modified" in latest_artifact(f"corpus-{first['download']['key']}").data

        state, again = run(url, tmp_path / "data")
        assert set(stage_states(state).values()) == {"Cached"} and bodies_sent(log) == sent  # a HEAD only
        assert ("HEAD", 200) in log[-1:]

        edit(site / "input.txt", text + "ROMEO:\nAnd more.\n")
        state, changed = run(url, tmp_path / "data")
        assert set(stage_states(state).values()) == {"Completed"} and bodies_sent(log) > sent
        assert changed["download"]["key"] != first["download"]["key"]
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_bad_parameter_fails_before_any_stage_naming_it(project):
    state = pipeline(params={"source": str(project["source"]), "overrides": TINY + ["n_layer=0"]}, return_state=True)
    assert state.is_failed() and "n_layer" in state.message
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    assert task_runs == []

    with pytest.raises(CortexCraftError, match="n_embd=30 is not divisible by n_head=4"):
        run_pipeline_from_cli(
            preset="cpu",
            overrides=["n_embd=30"],
            source=str(project["source"]),
            data_dir=project["data_dir"],
            refresh=[],
        )
    with pytest.raises(CortexCraftError, match="refresh"):
        run_pipeline_from_cli(
            preset="cpu", overrides=[], source=None, data_dir=project["data_dir"], refresh=["everything"]
        )
    with pytest.raises(CortexCraftError, match="retrain_iters: Input should be greater than 0"):
        run_pipeline_from_cli(
            preset="cpu", overrides=[], source=None, data_dir=project["data_dir"], refresh=[], retrain_iters=0
        )
    with pytest.raises(CortexCraftError, match="model name 'no/slash' is not valid"):
        run_pipeline_from_cli(
            preset="cpu", overrides=[], source=None, data_dir=project["data_dir"], refresh=[], model="no/slash"
        )


def test_diverging_training_fails_the_train_stage_and_no_report_is_written(project):
    reports_before = sorted((project["data_dir"] / "reports").iterdir())
    params = PipelineParams(
        source=str(project["source"]), data_dir=str(project["data_dir"]), overrides=TINY + ["lr=1e4"]
    )
    state = pipeline(params, return_state=True)
    assert state.is_failed()
    assert "training diverged at step" in state.message and "no checkpoint was written" in state.message
    with get_client(sync_client=True) as client:
        task_runs = client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[state.state_details.flow_run_id]))
        )
    states = {tr.name.rsplit("-", 1)[0]: tr.state.name for tr in task_runs}
    assert states["train"] == "Failed" and "report" not in states
    assert sorted((project["data_dir"] / "reports").iterdir()) == reports_before
