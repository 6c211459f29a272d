"""Thread count and OpenMP waiting on a machine shared with other processes."""
import subprocess
import sys

import pytest
import torch

from cortexcraft.threads import (
    ThreadTuner, available_cores, cgroup_cpu_limit, free_cores, set_openmp_wait_env, user_thread_count,
)
from cortexcraft.train import train
from tiny_runs import TINY, make_data_dir, tiny_config


def test_importing_cortexcraft_sets_short_openmp_spinning_before_torch_loads_and_keeps_user_values():
    probe = ("import sys, os, cortexcraft.train; print(os.environ['OMP_WAIT_POLICY'], "
             "os.environ['GOMP_SPINCOUNT'], os.environ['KMP_BLOCKTIME'], 'torch' in sys.modules)")
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["PASSIVE", "10000", "0", "True"]
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "OMP_WAIT_POLICY": "ACTIVE"},
                         capture_output=True, text=True, check=True).stdout
    assert out.split()[0] == "ACTIVE"
    env_copy = {"KMP_BLOCKTIME": "5"}
    set_openmp_wait_env(env_copy)
    assert env_copy == {"KMP_BLOCKTIME": "5", "OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000"}


def test_cgroup_quota_caps_the_cores(tmp_path):
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert cgroup_cpu_limit(tmp_path) == 1.0
    assert available_cores(cpus=[0, 1, 2, 3], quota=1.5) == 2
    assert available_cores(cpus=[0, 1], quota=None) in (1, 2)  # the real cgroup, if any, may cap it


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_the_tightest_quota_on_the_process_cgroup_or_above_it_caps_the_cores(tmp_path):
    root, proc = tmp_path / "sys-fs-cgroup", tmp_path / "proc-self-cgroup"
    # cgroup v2: a systemd service inside a slice; the slice holds the quota, the service none.
    _write(proc, "0::/system.slice/train.service\n")
    _write(root / "system.slice" / "cpu.max", "200000 100000\n")
    _write(root / "system.slice" / "train.service" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_limit(root, proc) == 2.0
    _write(root / "system.slice" / "train.service" / "cpu.max", "50000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 0.5
    # The cgroup a container sees as its root is the directory above a host path it cannot see.
    _write(proc, "0::/host.slice/container-7/inner\n")
    _write(root / "cpu.max", "150000 100000\n")
    assert cgroup_cpu_limit(root, proc) == 1.5
    # cgroup v1: the cpu controller's own hierarchy.
    v1 = tmp_path / "v1"
    _write(proc, "4:memory:/docker/abc\n3:cpu,cpuacct:/docker/abc\n")
    _write(v1 / "cpu" / "docker" / "abc" / "cpu.cfs_quota_us", "300000\n")
    _write(v1 / "cpu" / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    _write(v1 / "cpu" / "docker" / "cpu.cfs_quota_us", "-1\n")
    _write(v1 / "cpu" / "docker" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_limit(v1, proc) == 3.0
    assert cgroup_cpu_limit(tmp_path / "none", tmp_path / "no-proc") is None


@pytest.mark.parametrize("available, busy, expected", [(2, 0.1, 2), (2, 0.9, 1), (2, 2.0, 1), (8, 2.6, 5), (1, 0.0, 1)])
def test_threads_start_on_the_cores_others_leave_free(available, busy, expected):
    assert free_cores(available, busy) == expected


def test_a_user_thread_count_wins(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert user_thread_count(None) == 3
    assert user_thread_count(2) == 2
    monkeypatch.delenv("OMP_NUM_THREADS")
    assert user_thread_count(None) is None


def run_tuner(tuner: ThreadTuner, step_seconds: dict[int, float], steps: int) -> list[int]:
    used = []
    for _ in range(steps):
        threads = tuner.threads_for_next_step()
        used.append(threads)
        tuner.record(step_seconds[threads])
    return used


def test_the_tuner_drops_to_one_thread_when_two_are_slower_and_returns_when_they_are_fast_again():
    tuner = ThreadTuner(max_threads=2, start=2, period=20, probe=4, first_probe=6)
    used = run_tuner(tuner, {2: 1.0, 1: 0.3}, 40)  # a neighbour stalls our second thread
    assert used[:6] == [2] * 6 and used[6:10] == [1] * 4
    assert tuner.current == 1 and tuner.switches == 1 and set(used[10:30]) == {1}
    assert used[30:34] == [2] * 4  # it keeps checking, every `period` steps
    used = run_tuner(tuner, {2: 0.1, 1: 0.3}, 60)  # the neighbour is gone
    assert tuner.current == 2 and tuner.switches == 2


def test_a_sudden_slowdown_brings_the_next_comparison_forward():
    tuner = ThreadTuner(max_threads=2, start=2, period=200, probe=4, first_probe=6)
    used = run_tuner(tuner, {2: 0.1, 1: 0.15}, 30)  # quiet: two threads are faster and stay
    assert tuner.current == 2 and used.count(1) == 4
    used = run_tuner(tuner, {2: 0.5, 1: 0.16}, 12)  # a neighbour arrives; spinning threads crawl
    # Once the slow steps dominate the window one thread is tried at once, not 200 steps later.
    first_try = used.index(1)
    assert 1 <= first_try <= 4 and set(used[first_try:]) == {1}
    assert tuner.current == 1 and tuner.switches == 1
    run_tuner(tuner, {2: 0.5, 1: 0.16}, 100)  # steady at the new pace: no further early comparisons
    assert tuner.current == 1 and tuner.switches == 1


def test_the_tuner_keeps_its_choice_when_the_other_count_is_not_clearly_faster():
    tuner = ThreadTuner(max_threads=2, start=2, period=10, probe=4, first_probe=4)
    used = run_tuner(tuner, {2: 1.0, 1: 0.95}, 100)
    assert tuner.current == 2 and tuner.switches == 0
    assert used.count(1) >= 8  # it did try one thread, more than once


def test_training_picks_threads_itself_reports_them_and_restores_the_callers(tmp_path, monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    data_dir = make_data_dir(tmp_path / "data")
    before = torch.get_num_threads()
    summary = train(tiny_config("cpu", "max_iters=30", "threads=null"), data_dir, tmp_path / "run")
    info = summary["threads"]
    assert info["mode"] == "auto" and 1 <= info["threads"] <= info["available_cores"]
    assert 1 <= info["final"] <= info["available_cores"]
    assert torch.get_num_threads() == before
    fixed = train(tiny_config("cpu", "max_iters=5", *TINY[-1:]), data_dir, tmp_path / "fixed")
    assert fixed["threads"] == {"mode": "fixed", "threads": 1, "final": 1, "switches": 0}
