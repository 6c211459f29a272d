"""One writer at a time, and nothing blocked or left behind by a dead one: file locks taken over
the moment their holder is SIGKILLed, run directories trained by one process at a time, and
temporary files of killed writers removed while a live writer's stay. All with real processes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cortexcraft.fileio import TempDir, remove_dead_temps
from cortexcraft.locks import FileLock, LockBusy, lock_holder, lock_run_dir, run_dir_lock
from tiny_runs import ONE_THREAD_ENV, TINY, make_data_dir, repetitive_text

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def holding():
    """Starts processes that run some code (which takes something), print "held" and sleep;
    kills whatever is left of them after the test."""
    started: list[subprocess.Popen] = []

    def hold(code: str, *paths: Path) -> subprocess.Popen:
        script = f"import sys, time\n{code}\nprint('held', flush=True)\ntime.sleep(600)\n"
        proc = subprocess.Popen([sys.executable, "-c", script, *map(str, paths)], cwd=REPO, env=ONE_THREAD_ENV,
                                stdout=subprocess.PIPE, text=True)
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield hold
    for proc in started:
        kill(proc)


def kill(proc: subprocess.Popen) -> None:
    proc.kill()
    proc.wait()


def test_a_sigkilled_holders_lock_is_taken_over_at_once(tmp_path, holding):
    path = tmp_path / "locks" / "train-abc.lock"
    holder = holding("from cortexcraft.locks import FileLock\nlock = FileLock(sys.argv[1]); lock.acquire()", path)
    try:
        info = lock_holder(path)
        assert info["pid"] == holder.pid and str(path) in info["command"]
        waiter = FileLock(path)
        assert not waiter.acquire(timeout=0.5)
    finally:
        kill(holder)
    t0 = time.monotonic()
    assert waiter.acquire(timeout=30)
    took = time.monotonic() - t0
    assert lock_holder(path)["pid"] == os.getpid()
    waiter.release()
    assert not path.exists() and lock_holder(path) is None
    print(f"\nlock of a SIGKILLed holder taken over in {took:.3f} s")
    assert took < 5


def test_a_lock_file_left_by_a_reboot_is_taken_and_removed(tmp_path):
    # A holder that died with the machine leaves its file but no kernel lock behind.
    path = tmp_path / "train-abc.lock"
    path.write_text(json.dumps({"pid": 999999, "host": "before-reboot", "since": 0, "command": "x"}))
    assert lock_holder(path) is None
    lock = FileLock(path)
    assert lock.try_acquire()
    lock.release()
    assert not path.exists()


def test_a_holder_caught_between_locking_and_naming_itself_is_still_named(tmp_path, holding):
    # Two trainers started together: the loser looks while the winner has locked but not yet
    # written its name. The loser must wait for the name rather than say "another process".
    path = tmp_path / "train-abc.lock"
    holder = holding("import fcntl, json, os\n"
                     "fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT)\n"
                     "fcntl.flock(fd, fcntl.LOCK_EX)\n"
                     "print('held', flush=True)\n"
                     "time.sleep(0.3)\n"
                     "os.pwrite(fd, json.dumps({'pid': os.getpid()}).encode(), 0)", path)
    assert lock_holder(path) == {"pid": holder.pid}


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path):
    data_dir = make_data_dir(tmp_path)
    run = tmp_path / "run"
    command = [sys.executable, "-m", "cortexcraft", "train", "--data", str(data_dir), "--out", str(run),
               *(f"--set={o}" for o in TINY), "--max-iters", "60"]
    trainers = [subprocess.Popen(command, cwd=REPO, env=ONE_THREAD_ENV, stderr=subprocess.PIPE, text=True)
                for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in trainers]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    (busy,) = [err for code, err in results if code == 2]
    (last_line,) = busy.strip().splitlines()[-1:]
    assert last_line.startswith(f"cortexcraft train: error: run directory {run} is being trained by pid ")
    assert last_line.endswith("; wait for it to finish or train into another --out")
    assert not run_dir_lock(run).path.exists()


def test_training_into_a_held_run_directory_names_the_holder(tmp_path, holding):
    run = tmp_path / "run"
    holder = holding("from cortexcraft.locks import lock_run_dir\nlock = lock_run_dir(sys.argv[1])", run)
    try:
        with pytest.raises(LockBusy, match=rf"run directory {run} is being trained by pid {holder.pid} on "):
            lock_run_dir(run)
    finally:
        kill(holder)
    lock_run_dir(run).release()


def test_only_the_temporaries_of_dead_writers_are_removed(tmp_path, holding):
    live = holding("from cortexcraft.fileio import TempDir\nt = TempDir(sys.argv[1], 'shards')", tmp_path)
    dead = holding("from cortexcraft.fileio import TempDir, atomic_open\nt = TempDir(sys.argv[1], 'vocab')\n"
                   "writing = atomic_open(sys.argv[1] + '/stage.json'); writing.__enter__().write(b'{')", tmp_path)
    kill(dead)
    try:
        temps = {p.name.split(".")[1] for p in tmp_path.iterdir() if p.name.endswith(".tmp")}
        assert temps == {"shards", "vocab", "stage"}
        removed = remove_dead_temps(tmp_path)
        assert {p.name.split(".")[1] for p in removed} == {"vocab", "stage"}
        assert [p.name.split(".")[1] for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == ["shards"]
    finally:
        kill(live)
    assert [p.name.split(".")[1] for p in remove_dead_temps(tmp_path)] == ["shards"]


def test_prepare_removes_what_a_killed_prepare_left(tmp_path, holding):
    source = tmp_path / "corpus.txt"
    source.write_text(repetitive_text(20_000))
    out = tmp_path / "data"
    # A prepare killed while writing leaves its temporary shard and vocab directories.
    dead = holding("from cortexcraft.fileio import TempDir\nTempDir(sys.argv[1], 'data')\n"
                   "TempDir(sys.argv[1], 'data', kind='vocab')", tmp_path)
    kill(dead)
    assert len([p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]) == 2
    subprocess.run([sys.executable, "-m", "cortexcraft", "prepare", "--source", str(source), "--out", str(out)],
                   cwd=tmp_path, env=ONE_THREAD_ENV, check=True, capture_output=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "data"]


def test_a_temp_dir_is_locked_until_closed(tmp_path):
    temp = TempDir(tmp_path, "x")
    child = subprocess.run([sys.executable, "-c", "import sys; from cortexcraft.fileio import remove_dead_temps; "
                            "print(len(remove_dead_temps(sys.argv[1])))", str(tmp_path)],
                           cwd=REPO, capture_output=True, text=True, check=True)
    assert child.stdout.strip() == "0" and temp.path.is_dir()
    temp.close()
    assert remove_dead_temps(tmp_path) == [temp.path]
