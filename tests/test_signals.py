"""SIGINT/SIGTERM during training, sent for real to real processes: `cortexcraft train` and
`cortexcraft pipeline` (also with torchrun children) save a checkpoint at the step they reached,
exit within 15 s leaving no process behind (the pipeline's temporary API server included), mark
the flow run Cancelled, and a re-run resumes from that checkpoint. A second signal exits at once."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from cortexcraft.checkpoint import list_checkpoints, read_checkpoint_state
from cortexcraft.fileio import read_json
from cortexcraft.metrics import read_metrics
from cortexcraft.train import train
from prefect_server import processes_with_env, wait_until
from tiny_runs import ONE_THREAD_ENV, TINY, make_data_dir, same_weights, tiny_config

REPO = Path(__file__).resolve().parent.parent
STOP_SECONDS = 15
MARK = "CORTEXCRAFT_TEST_MARK"


def trained_to(run_dir: Path, step: int) -> bool:
    return any(r["step"] >= step for r in read_metrics(run_dir)) if (run_dir / "metrics.jsonl").is_file() else False


def stop_and_time(proc: subprocess.Popen, signum: int = signal.SIGTERM) -> float:
    t0 = time.monotonic()
    proc.send_signal(signum)
    proc.wait(timeout=60)
    return time.monotonic() - t0


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_data_dir(tmp_path_factory.mktemp("signals"))


def train_command(data_dir: Path, run: Path, max_iters: int) -> list[str]:
    return [sys.executable, "-m", "cortexcraft", "train", "--data", str(data_dir), "--out", str(run),
            *(f"--set={o}" for o in TINY), "--set=checkpoint_interval=1000", "--max-iters", str(max_iters)]


def test_sigterm_to_train_saves_the_current_step_and_the_rerun_ends_bitwise_equal(data_dir, tmp_path, one_thread):
    run, max_iters = tmp_path / "run", 300
    proc = subprocess.Popen(train_command(data_dir, run, max_iters), cwd=REPO, env=ONE_THREAD_ENV,
                            stderr=subprocess.PIPE, text=True)
    wait_until("training to pass step 30", lambda: trained_to(run, 30) or proc.poll() is not None, 120)
    took = stop_and_time(proc)
    last_line = proc.stderr.read().strip().splitlines()[-1]
    print(f"\ncortexcraft train stopped {took:.2f} s after SIGTERM: {last_line}")
    assert proc.returncode == 128 + signal.SIGTERM and took < STOP_SECONDS
    assert last_line.startswith("cortexcraft train: training stopped by SIGTERM at step ")
    step = int(last_line.split(" at step ")[1].split(";")[0])
    assert 30 <= step < max_iters
    stopped_at = list_checkpoints(run)[-1]
    assert read_checkpoint_state(stopped_at)["step"] == step and f"checkpoint {stopped_at};" in last_line
    assert not (run / "summary.json").exists()

    subprocess.run(train_command(data_dir, run, max_iters), cwd=REPO, env=ONE_THREAD_ENV, check=True,
                   capture_output=True)
    summary = read_json(run / "summary.json")
    assert summary["resumed_from_step"] == step and summary["steps"] == max_iters

    reference = train(tiny_config("cpu", "checkpoint_interval=1000", f"max_iters={max_iters}"), data_dir,
                      tmp_path / "uninterrupted", progress=False)
    assert same_weights(Path(summary["checkpoint_last"]), Path(reference["checkpoint_last"]))
    assert [r["step"] for r in read_metrics(run)] == [r["step"] for r in read_metrics(tmp_path / "uninterrupted")]


def test_a_second_signal_exits_at_once(data_dir, tmp_path):
    run = tmp_path / "run"
    proc = subprocess.Popen(train_command(data_dir, run, 100_000), cwd=REPO, env=ONE_THREAD_ENV,
                            stderr=subprocess.PIPE, text=True)
    wait_until("training to pass step 10", lambda: trained_to(run, 10) or proc.poll() is not None, 120)
    # Both signals arrive before the trainer runs another line: the first asks for a checkpoint,
    # the second must not wait for it.
    proc.send_signal(signal.SIGSTOP)
    proc.send_signal(signal.SIGINT)
    proc.send_signal(signal.SIGTERM)
    proc.send_signal(signal.SIGCONT)
    proc.wait(timeout=STOP_SECONDS)
    assert proc.returncode == -signal.SIGTERM
    assert "training stopped" not in proc.stderr.read()


# --- cortexcraft pipeline ------------------------------------------------------------------------

def pipeline_env(tmp: Path, mark: str) -> dict[str, str]:
    env = {k: v for k, v in ONE_THREAD_ENV.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", **{MARK: mark})
    return env


def pipeline_command(source: Path, data: Path, max_iters: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "flows", "pipeline", "--source", str(source), "--data-dir", str(data),
            *(f"--set={o}" for o in TINY), f"--set=max_iters={max_iters}", "--set=checkpoint_interval=1000",
            "--set=max_new_tokens=20", *extra]


def run_dirs(data: Path) -> list[Path]:
    # Directories only: a trainer killed mid-run leaves its run directory's lock file beside it.
    return [p for p in (data / "runs").glob("*") if p.is_dir()] if (data / "runs").is_dir() else []


def flow_run_states(prefect_home: Path) -> list[str]:
    with sqlite3.connect(prefect_home / "prefect.db") as db:
        return [row[0] for row in db.execute("select state_type from flow_run order by created")]


def start_pipeline(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        return subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True)


def sigterm_during_training(tmp_path: Path, source: Path, *extra: str, max_iters: int = 400) -> dict:
    """Start the pipeline, SIGTERM it (the CLI process only) during training; return what happened."""
    data, mark, log = tmp_path / "data", uuid.uuid4().hex, tmp_path / "pipeline.log"
    env = pipeline_env(tmp_path, mark)
    command = pipeline_command(source, data, max_iters, *extra)
    proc = start_pipeline(command, env, log)
    try:
        wait_until("training to pass step 20",
                   lambda: any(trained_to(r, 20) for r in run_dirs(data)) or proc.poll() is not None, 240, log)
        assert proc.poll() is None, log.read_text()
        helpers = [p for p in processes_with_env(MARK, mark) if p != proc.pid]
        took = stop_and_time(proc)
        wait_until("every process the pipeline started to exit", lambda: not processes_with_env(MARK, mark), 30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_with_env(MARK, mark):
            os.kill(pid, signal.SIGKILL)
    (run,) = run_dirs(data)
    (message,) = [line for line in log.read_text().splitlines() if line.startswith("cortexcraft pipeline: ")]
    return {
        "message": message,
        "took": took,
        "returncode": proc.returncode,
        "log": log.read_text(),
        "run": run,
        "helpers": helpers,
        "command": command,
        "env": env,
        "data": data,
    }


@pytest.mark.slow
def test_sigterm_to_pipeline_checkpoints_stops_the_temporary_server_and_cancels_the_run(tmp_path, tinyshakespeare_path):
    stopped = sigterm_during_training(tmp_path, tinyshakespeare_path)
    last_line = stopped["message"]
    print(
        f"\ncortexcraft pipeline stopped {stopped['took']:.2f} s after SIGTERM "
        f"({len(stopped['helpers'])} helper process(es), all gone): {last_line}"
    )
    assert stopped["helpers"], "the pipeline ran no temporary API server"
    assert stopped["returncode"] == 130 and stopped["took"] < STOP_SECONDS
    assert last_line.startswith("cortexcraft pipeline: training stopped by SIGTERM at step ")
    step = int(last_line.split(" at step ")[1].split(";")[0])
    assert read_checkpoint_state(list_checkpoints(stopped["run"])[-1])["step"] == step
    assert flow_run_states(tmp_path / "prefect-home") == ["CANCELLED"]

    rerun = subprocess.run(stopped["command"], cwd=REPO, env=stopped["env"], capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    summary = read_json(stopped["run"] / "summary.json")
    assert summary["resumed_from_step"] == step and summary["steps"] == 400
    assert flow_run_states(tmp_path / "prefect-home") == ["CANCELLED", "COMPLETED"]


@pytest.mark.slow
def test_sigterm_to_pipeline_stops_its_torchrun_trainers_at_a_checkpoint(tmp_path, tinyshakespeare_path):
    stopped = sigterm_during_training(tmp_path, tinyshakespeare_path, "--nproc", "2", max_iters=2000)
    last_line = stopped["message"]
    print(f"\ncortexcraft pipeline --nproc 2 stopped {stopped['took']:.2f} s after SIGTERM: {last_line}")
    assert stopped["returncode"] == 130 and stopped["took"] < STOP_SECONDS
    assert last_line.startswith("cortexcraft pipeline: training stopped by SIGTERM; checkpoint ")
    newest = list_checkpoints(stopped["run"])[-1]
    state = read_checkpoint_state(newest)
    assert str(newest) in last_line and 20 <= state["step"] < 2000 and state["step"] % 10 == 0
    assert json.loads((stopped["run"] / "run.json").read_text())["world_size"] == 2
    assert flow_run_states(tmp_path / "prefect-home") == ["CANCELLED"]


# --- the parent-death signal, set by the child itself ------------------------------------------


def cmdline(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


CHILD = (
    "import os, time; from cortexcraft.interrupt import EXIT_WITH_PARENT_ENV, exit_with_parent_if_asked; "
    "exit_with_parent_if_asked(); print(os.getpid(), EXIT_WITH_PARENT_ENV in os.environ, flush=True); time.sleep(60)"
)


def test_a_child_asked_to_exit_with_its_parent_gets_sigterm_when_the_parent_is_sigkilled(tmp_path):
    # The parent is a plain Python process that starts the child the way tasks/train.py does.
    parent_code = (
        "import subprocess, sys, time; from cortexcraft.interrupt import exit_with_parent_env; "
        f"subprocess.Popen([sys.executable, '-c', {CHILD!r}], "
        f"env={{**__import__('os').environ, **exit_with_parent_env()}}); "
        "time.sleep(60)"
    )
    parent = subprocess.Popen([sys.executable, "-c", parent_code], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        child_pid, still_asked = parent.stdout.readline().split()
        child_pid = int(child_pid)
        # The request does not travel further: whatever the child execs has another parent.
        assert still_asked == "False" and alive(child_pid)
        parent.kill()
        parent.wait()
        wait_until("the child to exit after its parent's SIGKILL", lambda: not alive(child_pid), 10)
    finally:
        parent.kill()


def test_a_child_whose_parent_died_before_it_asked_terminates_at_once():
    from cortexcraft.interrupt import EXIT_WITH_PARENT_ENV

    gone = subprocess.Popen(["true"])
    gone.wait()  # the pid of a parent that has already died
    child = subprocess.run(
        [sys.executable, "-c", CHILD],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
        env={**os.environ, EXIT_WITH_PARENT_ENV: str(gone.pid)},
    )
    assert child.returncode == -signal.SIGTERM and child.stdout == ""
    # Not asked: nothing happens.
    unasked = subprocess.run(
        [sys.executable, "-c", CHILD.replace("time.sleep(60)", "pass")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert unasked.returncode == 0 and unasked.stdout.split()[1] == "False"


@pytest.mark.slow
def test_sigkill_to_pipeline_stops_its_torchrun_trainers_at_a_checkpoint(tmp_path, tinyshakespeare_path):
    data, mark, log = tmp_path / "data", uuid.uuid4().hex, tmp_path / "pipeline.log"
    proc = start_pipeline(
        pipeline_command(tinyshakespeare_path, data, 2000, "--nproc", "2"), pipeline_env(tmp_path, mark), log
    )
    try:
        wait_until(
            "training to pass step 20",
            lambda: any(trained_to(r, 20) for r in run_dirs(data)) or proc.poll() is not None,
            240,
            log,
        )
        assert proc.poll() is None, log.read_text()
        trainers = [
            p
            for p in processes_with_env(MARK, mark)
            if "cortexcraft train" in cmdline(p) or "torch.distributed.run" in cmdline(p)
        ]
        assert len(trainers) == 3, [cmdline(p) for p in trainers]  # torchrun and its two trainers
        os.kill(proc.pid, signal.SIGKILL)  # the pipeline process alone, as an OOM killer would
        t0 = time.monotonic()
        wait_until("the torchrun trainers to exit", lambda: not any(alive(p) for p in trainers), STOP_SECONDS)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        for pid in processes_with_env(MARK, mark):  # the orphaned temporary API server
            os.kill(pid, signal.SIGKILL)
    (run,) = run_dirs(data)
    state = read_checkpoint_state(list_checkpoints(run)[-1])
    print(f"\ntorchrun trainers exited {took:.2f} s after SIGKILL of the pipeline, checkpoint at step {state['step']}")
    assert 20 <= state["step"] < 2000 and state["step"] % 10 == 0
