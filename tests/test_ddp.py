import shutil
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from cortexcraft.checkpoint import list_checkpoints, read_checkpoint_state
from cortexcraft.metrics import read_metrics
from prefect_server import free_port, start, stop, tail
from tiny_runs import ONE_THREAD_ENV, TINY, make_data_dir, same_weights

TORCHRUN = shutil.which("torchrun", path=str(Path(sys.executable).parent))


def torchrun_train(data_dir: Path, run_dir: Path, max_iters: int, *extra: str) -> subprocess.CompletedProcess:
    cmd = [TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "cortexcraft", "train", "--data", str(data_dir),
           "--out", str(run_dir), "--max-iters", str(max_iters), "--set", "dropout=0.1", "--set", "device=cpu", *extra]
    cmd += [arg for s in TINY for arg in ("--set", s)]
    return subprocess.run(cmd, capture_output=True, text=True, env=ONE_THREAD_ENV, timeout=120)


@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_two_cpu_processes_train_with_ddp_and_resume_together(tmp_path):
    data_dir = make_data_dir(tmp_path)
    run = tmp_path / "run"
    first = torchrun_train(data_dir, run, 20)
    assert first.returncode == 0, first.stderr[-2000:]
    state = read_checkpoint_state(list_checkpoints(run)[-1])
    assert state["step"] == 20
    # Both ranks' RNG states are in the checkpoint, and the batches of both ranks were counted.
    assert (run / "checkpoints" / "step_00000020" / "training.safetensors").is_file()
    assert state["tokens_seen"] == 20 * 2 * 8 * 16
    assert "world size 2" in first.stderr

    second = torchrun_train(data_dir, run, 30)
    assert second.returncode == 0, second.stderr[-2000:]
    assert second.stderr.count("resuming") == 2  # every rank loaded the checkpoint
    assert [r["step"] for r in read_metrics(run)] == [0, 10, 20, 30]
    assert read_checkpoint_state(list_checkpoints(run)[-1])["step"] == 30

    # A new run from that checkpoint (what continue/finetune retraining does under torchrun).
    third = torchrun_train(data_dir, tmp_path / "from-30", 40, "--start-from", str(list_checkpoints(run)[-1]))
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stderr.count("starting") == 2  # every rank loaded the weights
    assert [r["step"] for r in read_metrics(tmp_path / "from-30")] == [30, 40]

ITERS = 60  # the multi-node runs: time to kill a node after the first checkpoint


def node_command(data_dir: Path, run_dir: Path, max_iters: int, node_rank: int, endpoint: str) -> list[str]:
    cmd = [sys.executable, "-m", "cortexcraft", "train", "--data", str(data_dir), "--out", str(run_dir),
           "--max-iters", str(max_iters), "--set", "dropout=0.1", "--set", "device=cpu",
           "--nnodes", "2", "--node-rank", str(node_rank), "--rdzv-endpoint", endpoint]
    return cmd + [arg for s in TINY for arg in ("--set", s)]


def start_nodes(data_dir: Path, run_dir: Path, max_iters: int, logs: Path) -> list[subprocess.Popen]:
    """Two one-process nodes on loopback meeting at a c10d rendezvous, each in a session of its own."""
    endpoint = f"127.0.0.1:{free_port()}"
    return [start(node_command(data_dir, run_dir, max_iters, rank, endpoint), ONE_THREAD_ENV, logs / f"node{rank}.log")
            for rank in (0, 1)]


def losses(run_dir: Path) -> list[float]:
    """Step, train loss, val loss of every evaluation, one after another."""
    return [value for r in read_metrics(run_dir) for value in (r["step"], r["train_loss"], r["val_loss"])]


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory):
    """Shards, and a run of one node with two processes to compare the multi-node runs with."""
    root = tmp_path_factory.mktemp("one-node")
    data_dir = make_data_dir(root)
    run = root / "run"
    result = torchrun_train(data_dir, run, ITERS)
    assert result.returncode == 0, result.stderr[-2000:]
    return data_dir, run


def run_nodes(data_dir: Path, run_dir: Path, logs: Path, max_iters: int = ITERS) -> None:
    logs.mkdir()
    nodes = start_nodes(data_dir, run_dir, max_iters, logs)
    try:
        for node in nodes:
            assert node.wait(timeout=150) == 0, tail(logs / "node0.log") + tail(logs / "node1.log")
    finally:
        for node in nodes:
            stop(node)


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_two_nodes_of_one_process_train_like_one_node_with_two(one_node_run, tmp_path):
    data_dir, one_node = one_node_run
    two_nodes = tmp_path / "run"
    run_nodes(data_dir, two_nodes, tmp_path / "logs")
    assert losses(two_nodes) == pytest.approx(losses(one_node), abs=1e-6)
    # Rank 0 alone writes: one record per evaluation, the same checkpoints.
    assert [r["step"] for r in read_metrics(two_nodes)] == list(range(0, ITERS + 1, 10))
    assert [p.name for p in list_checkpoints(two_nodes)] == [p.name for p in list_checkpoints(one_node)]


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_after_a_node_is_killed_rerunning_the_nodes_resumes(one_node_run, tmp_path):
    data_dir, one_node = one_node_run
    run = tmp_path / "run"
    (tmp_path / "killed").mkdir()
    nodes = start_nodes(data_dir, run, ITERS, tmp_path / "killed")
    try:
        deadline = time.monotonic() + 150
        while not list_checkpoints(run) and time.monotonic() < deadline and all(n.poll() is None for n in nodes):
            time.sleep(0.01)  # the steps after the first checkpoint take a second or two
        assert list_checkpoints(run), tail(tmp_path / "killed" / "node0.log")
        stop(nodes[1], terms=0)  # SIGKILL node 1 and its worker
    finally:
        # Node 0's torchrun would wait out its exit barrier (5 minutes) for the lost node: stop it too.
        for node in nodes:
            stop(node)
    steps_before = [r["step"] for r in read_metrics(run)]
    assert steps_before and steps_before[-1] < ITERS
    run_nodes(data_dir, run, tmp_path / "again")
    assert all("resuming" in (tmp_path / "again" / f"node{rank}.log").read_text() for rank in (0, 1))
    assert losses(run) == pytest.approx(losses(one_node), abs=1e-6)


def test_multi_node_options_are_checked_before_launching(tmp_path, capsys):
    from cortexcraft.cli import main

    data_dir = make_data_dir(tmp_path)
    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "run")]
    assert main(base + ["--nnodes", "2"]) == 2
    assert "--nnodes 2 needs --rdzv-endpoint HOST:PORT" in capsys.readouterr().err
    assert main(base + ["--nnodes", "2", "--node-rank", "2", "--rdzv-endpoint", "127.0.0.1:29500"]) == 2
    assert "--node-rank 2 must be between 0 and 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_the_train_stage_is_node_0_and_the_logged_command_is_node_1(one_node_run, tmp_path, temporary_prefect_server):
    from cortexcraft.registry import models_dir_of, plan_retrain
    from flows.params import PipelineParams
    from flows.prepare import prepare
    from flows.train import train
    from tasks.stage import stage_dir
    from tasks.train import train_args, train_key

    data_dir, one_node = one_node_run
    endpoint = f"127.0.0.1:{free_port()}"
    params = PipelineParams(source=str(data_dir.parent / "corpus.txt"), data_dir=str(tmp_path / "data"),
                            overrides=TINY + ["dropout=0.1", "device=cpu", f"max_iters={ITERS}"],
                            nnodes=2, rdzv_endpoint=endpoint)
    shards = prepare(params)["shards"]
    config = params.run_config().model_dump(mode="json")
    plan = plan_retrain(models_dir_of(params.data_path()), params.model_name(), params.retrain,
                        tmp_path / "data" / shards["dir"], config["model"])
    run_dir = stage_dir(params.data_path(), "train", train_key(shards, config, plan))
    # What the train stage logs for node 1.
    node1 = [
        sys.executable,
        "-m",
        "cortexcraft",
        "train",
        *train_args(config, tmp_path / "data" / shards["dir"], run_dir),
        "--nproc-per-node=1",
        "--nnodes=2",
        "--node-rank=1",
        f"--rdzv-endpoint={endpoint}",
    ]
    node = start(node1, ONE_THREAD_ENV, tmp_path / "node1.log")
    try:
        record = train(shards, params)
        assert node.wait(timeout=150) == 0, tail(tmp_path / "node1.log")
    finally:
        stop(node)
    assert record["summary"]["steps"] == ITERS
    assert [r["step"] for r in read_metrics(run_dir)] == list(range(0, ITERS + 1, 10))


# Two threads multiplying matrices for as long as the test runs: what a loaded CI machine has beside it.
BUSY_TORCH_JOB = (
    "import torch\ntorch.set_num_threads(2)\na = torch.randn(512, 512)\nwhile True:\n    a = (a @ a).tanh()"
)
STRESS_ITERS = 20


@contextmanager
def busy_torch_job():
    busy = subprocess.Popen([sys.executable, "-c", BUSY_TORCH_JOB])
    try:
        yield
    finally:
        busy.kill()
        busy.wait()


def final_checkpoint(run_dir: Path) -> Path:
    return list_checkpoints(run_dir)[-1]


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_finished_ddp_runs_end_cleanly_beside_a_busy_job_every_time(tmp_path):
    """Issue 22: a finished 2-process run once ended in SIGABRT on a loaded machine, failing a job
    that had completed. 20 one-node runs and 3 two-node loopback runs, each beside a busy torch job:
    every one exits 0, with the same final weights as the others of its kind."""
    data_dir = make_data_dir(tmp_path)
    with busy_torch_job():
        runs = [tmp_path / f"one-node-{i}" for i in range(20)]
        for i, run in enumerate(runs):
            result = torchrun_train(data_dir, run, STRESS_ITERS)
            assert result.returncode == 0, f"run {i} of 20: {result.stderr[-2000:]}"
            assert same_weights(final_checkpoint(run), final_checkpoint(runs[0]))
        nodes = [tmp_path / f"two-nodes-{i}" for i in range(3)]
        for i, run in enumerate(nodes):
            run_nodes(data_dir, run, tmp_path / f"logs-{i}", STRESS_ITERS)
            assert same_weights(final_checkpoint(run), final_checkpoint(nodes[0]))


@pytest.mark.slow
@pytest.mark.skipif(TORCHRUN is None, reason="torchrun not installed beside this Python")
def test_the_pipeline_train_stage_with_two_processes_ends_cleanly_beside_a_busy_job(tmp_path, temporary_prefect_server):
    from cortexcraft.checkpoint import MODEL_FILE
    from cortexcraft.fileio import sha256_file
    from flows.params import PipelineParams
    from flows.prepare import prepare
    from flows.train import train

    data_dir = make_data_dir(tmp_path / "corpus")
    settings = dict(
        source=str(data_dir.parent / "corpus.txt"),
        data_dir=str(tmp_path / "data"),
        nproc=2,
        overrides=TINY + ["dropout=0.1", "device=cpu", f"max_iters={STRESS_ITERS}"],
    )
    shards = prepare(PipelineParams(**settings))["shards"]
    weights = []
    with busy_torch_job():
        for _ in range(3):  # --refresh train: the stage trains again from scratch
            record = train(shards, PipelineParams(**settings, refresh=["train"]))
            assert record["summary"]["steps"] == STRESS_ITERS
            weights.append(sha256_file(Path(record["summary"]["checkpoint_last"]) / MODEL_FILE))
    assert len(set(weights)) == 1
