"""CPU threads for training on a machine that other processes share.

Three defaults keep a run from collapsing when something else is busy on its cores:

- **Short, bounded OpenMP spinning.** By default an OpenMP thread that reaches a barrier spins for
  a long while before it sleeps. When a peer thread has been descheduled by another process, the
  spinner burns the very core the peer needs: two torch threads beside one busy process ran 10-40x
  slower. Sleeping at once (``OMP_WAIT_POLICY=PASSIVE``) fixes that but costs a quiet machine a
  third of its speed, since small ops then pay a wake-up at every barrier (2 threads: 10.7k vs
  16.2k tokens/s on the ``cpu`` preset). So waiting threads spin briefly and then sleep:
  ``OMP_WAIT_POLICY=PASSIVE`` with ``GOMP_SPINCOUNT=10000`` (GNU OpenMP, which torch's Linux wheels
  use) and ``KMP_BLOCKTIME=0`` (Intel OpenMP). OpenMP reads them when the library loads, i.e. at
  ``import torch``, so ``cortexcraft/__init__.py`` sets them (unless already set) before anything
  imports torch, and child processes inherit them. Short spins still hurt a lot beside a busy
  process, which the thread choice below handles.
- **Threads from the cores that are free.** At start: the cores this process may run on
  (``sched_getaffinity``, capped by the tightest cgroup ``cpu.max`` quota on its cgroup or any cgroup
  above it), minus the cores other processes kept busy during a short sample of ``/proc/stat``.
- **Adapting while running.** Every ``period`` steps the trainer times a few steps on the other
  thread count and keeps whichever was faster, so a neighbour that starts or stops mid-run is
  followed; steps that suddenly take much longer than after the last comparison (a neighbour has
  arrived) bring the next comparison forward.

A thread count set by the user (``--set threads=N``, or ``OMP_NUM_THREADS`` in the environment)
is used as given and never adapted. Floating-point reductions may split differently with another
thread count, so bitwise-reproducible runs need a fixed count.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Optional

OPENMP_WAIT_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "10000", "KMP_BLOCKTIME": "0"}


def set_openmp_wait_env(env: Optional[dict] = None) -> None:
    """Make waiting OpenMP threads spin only briefly before they sleep (values already set are kept)."""
    env = os.environ if env is None else env
    for name, value in OPENMP_WAIT_ENV.items():
        env.setdefault(name, value)


def _ancestors(root: Path, cgroup: str) -> list[Path]:
    """The directory of ``cgroup`` under ``root`` and each one above it, up to ``root``."""
    parts = [p for p in cgroup.split("/") if p]
    return [root.joinpath(*parts[:n]) for n in range(len(parts), -1, -1)]


def _cores(quota: str, period: str) -> Optional[float]:
    """Cores a quota per period allows; ``max`` (v2) or a negative quota (v1) is none."""
    return None if quota == "max" or int(quota) <= 0 else int(quota) / int(period)


def cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"),
                     proc_cgroup: Path = Path("/proc/self/cgroup")) -> Optional[float]:
    """Cores allowed by the tightest CPU quota (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us``) on this
    process's cgroup or any cgroup above it, None if unlimited. The cgroups come from
    ``proc_cgroup``: a quota is often set on a parent (a systemd slice, the host's cgroup of a
    container), and a container sees its own cgroup as the root while ``proc_cgroup`` may show the
    host's path, whose missing directories are skipped."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    fields = [line.split(":", 2) for line in lines if line.count(":") >= 2]
    v2 = next((path for hierarchy, _, path in fields if hierarchy == "0"), "/")
    v1 = next((path for _, controllers, path in fields if "cpu" in controllers.split(",")), "/")
    limits = []
    for directory in _ancestors(root, v2):
        try:
            quota, period = (directory / "cpu.max").read_text().split()[:2]
            limits.append(_cores(quota, period))
        except (OSError, ValueError):
            pass
    for directory in _ancestors(root / "cpu", v1):
        try:
            limits.append(_cores((directory / "cpu.cfs_quota_us").read_text().strip(),
                                 (directory / "cpu.cfs_period_us").read_text().strip()))
        except (OSError, ValueError):
            pass
    return min((limit for limit in limits if limit is not None), default=None)


def usable_cpus() -> list[int]:
    """The CPU ids this process may run on."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def available_cores(cpus: Optional[list[int]] = None, quota: Optional[float] = None) -> int:
    """How many cores this process can use at all: its affinity set, capped by the cgroup quota."""
    cpus = usable_cpus() if cpus is None else cpus
    limit = cgroup_cpu_limit() if quota is None else quota
    return max(1, min(len(cpus), math.ceil(limit)) if limit else len(cpus))


def threads_per_worker(workers: int) -> int:
    """This process's cores divided among ``workers`` processes that each run threaded code."""
    return max(1, available_cores() // workers)


def _cpu_times(cpus: list[int], stat: Path) -> dict[int, tuple[int, int]]:
    """(busy, total) jiffies per CPU from /proc/stat."""
    times = {}
    for line in stat.read_text().splitlines():
        if line.startswith("cpu") and line[3:4].isdigit():
            name, *fields = line.split()
            cpu = int(name[3:])
            if cpu in cpus:
                values = [int(v) for v in fields[:8]]
                idle = values[3] + values[4]  # idle + iowait
                times[cpu] = (sum(values) - idle, sum(values))
    return times


def busy_cores(cpus: list[int], seconds: float = 0.2, stat: Path = Path("/proc/stat")) -> float:
    """How many of ``cpus`` other processes keep busy, sampled over ``seconds`` while this one sleeps."""
    try:
        before = _cpu_times(cpus, stat)
        time.sleep(seconds)
        after = _cpu_times(cpus, stat)
    except (OSError, ValueError):
        return 0.0
    busy = 0.0
    for cpu, (busy0, total0) in before.items():
        busy1, total1 = after.get(cpu, (busy0, total0))
        if total1 > total0:
            busy += (busy1 - busy0) / (total1 - total0)
    return busy


def free_cores(available: int, busy: float) -> int:
    """Threads to start with: the available cores minus those kept busy by others (at least one)."""
    # A core counts as taken when it was busy more than half the time.
    return max(1, min(available, available - math.floor(busy + 0.5)))


def user_thread_count(configured: Optional[int]) -> Optional[int]:
    """The thread count the user fixed: ``threads`` in the config, else ``OMP_NUM_THREADS``."""
    if configured is not None:
        return configured
    try:
        value = int(os.environ.get("OMP_NUM_THREADS", ""))
    except ValueError:
        return None
    return value if value > 0 else None


class ThreadTuner:
    """Chooses between 1 thread and ``max_threads`` by timing training steps.

    It starts at ``start`` threads. Every ``period`` steps it runs ``probe`` steps on the other
    count and compares their median time with the median of the last ``probe`` steps on the
    current count; the other count wins only when clearly faster (by ``margin``). When the last
    ``probe`` steps take ``slowdown`` times as long as right after the previous comparison, the
    next comparison starts at once: spinning threads beside a newly busy neighbour run several
    times slower, and waiting ``period`` steps at that pace would cost minutes."""

    def __init__(self, max_threads: int, start: int, period: int = 200, probe: int = 8, margin: float = 0.1,
                 first_probe: int = 24, slowdown: float = 1.6):
        self.max_threads, self.period, self.probe, self.margin = max_threads, period, probe, margin
        self.slowdown = slowdown
        self.current = start
        self.switches = 0
        self._recent: list[float] = []
        self._trial: list[float] = []
        self._settled: Optional[float] = None  # median step time right after the last comparison
        # The first comparison comes early (after warm-up steps), later ones every `period` steps.
        self._steps_since_probe = period - first_probe

    @property
    def active(self) -> bool:
        return self.max_threads > 1

    @property
    def other(self) -> int:
        return 1 if self.current > 1 else self.max_threads

    def threads_for_next_step(self) -> int:
        """The thread count the next step should run with."""
        return self.other if self._probing else self.current

    @property
    def _probing(self) -> bool:
        return self.active and self._steps_since_probe >= self.period and len(self._recent) >= self.probe

    def record(self, seconds: float) -> None:
        """The duration of the step just run (with ``threads_for_next_step()`` threads)."""
        if not self.active:
            return
        if not self._probing:
            self._recent = (self._recent + [seconds])[-self.probe:]
            self._steps_since_probe += 1
            if self._settled is not None and len(self._recent) == self.probe \
                    and _median(self._recent) > self.slowdown * self._settled:
                self._steps_since_probe = self.period
            return
        self._trial.append(seconds)
        if len(self._trial) < self.probe:
            return
        if _median(self._trial) < (1.0 - self.margin) * _median(self._recent):
            self.current = self.other
            self.switches += 1
            self._recent = list(self._trial)
        self._settled = _median(self._recent)
        self._trial = []
        self._steps_since_probe = 0


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    middle = len(ordered) // 2
    return ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2


def choose_threads(configured: Optional[int], local_world_size: int = 1,
                   sample_seconds: float = 0.2) -> tuple[int, Optional[ThreadTuner], dict]:
    """(threads to start with, a tuner when the count may adapt, a description for the summary).

    Each of ``local_world_size`` processes on this machine gets an equal share of the cores."""
    fixed = user_thread_count(configured)
    if fixed is not None:
        return fixed, None, {"mode": "fixed", "threads": fixed}
    available = max(1, available_cores() // max(1, local_world_size))
    busy = busy_cores(usable_cpus(), sample_seconds) / max(1, local_world_size) if available > 1 else 0.0
    start = free_cores(available, busy)
    tuner = ThreadTuner(available, start) if available > 1 else None
    return (
        start,
        tuner,
        {"mode": "auto", "available_cores": available, "busy_cores_at_start": round(busy, 2), "threads": start},
    )
