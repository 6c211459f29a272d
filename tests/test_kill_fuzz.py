"""Kill fuzz (slow): SIGKILL the whole `cortexcraft pipeline` process group at K seeded moments
spread over all five stages, re-running after each kill. After every kill each stage output that
has a record is intact (nothing partial is ever accepted); the final run's report numbers and
weights equal an uninterrupted run's; no temporary file or directory and no held lock remains.

The schedule: every stage once plus K-5 seeded extra kills, in pipeline order; each kill lands a
seeded fraction into its stage, timed from the log line that ends the stage before it (the
uninterrupted run gives the stage lengths; a kill that came too late is made again, earlier). A
data-stage or report kill re-runs its stage with --refresh so that it computes.
CORTEXCRAFT_FUZZ_SEED (default 0) and CORTEXCRAFT_FUZZ_KILLS (default 8) pick another schedule.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from cortexcraft.checkpoint import list_checkpoints, read_checkpoint_state
from cortexcraft.fileio import TEMP_SUFFIX, read_json
from cortexcraft.locks import lock_holder
from cortexcraft.shards import MANIFEST, verify_shards
from cortexcraft.metrics import read_metrics
from prefect_server import REPO
from tasks.stage import RECORD_NAME, STAGE_DIRS, STAGES, valid_record
from tiny_runs import same_weights

pytestmark = pytest.mark.slow

SEED = int(os.environ.get("CORTEXCRAFT_FUZZ_SEED", "0"))
KILLS = int(os.environ.get("CORTEXCRAFT_FUZZ_KILLS", "8"))
OVERRIDES = [
    "n_layer=1",
    "n_head=2",
    "n_embd=32",
    "block_size=32",
    "batch_size=8",
    "max_iters=160",
    "warmup_iters=0",
    "eval_interval=20",
    "eval_iters=2",
    "checkpoint_interval=20",
    "max_new_tokens=40",
    "device=cpu",
]
STAGE_END = "prefect.task_runs: Finished in state"
FLOW_START = "Beginning flow run"
# The pipeline's tasks in order: the five stages, and the always-run revalidate and register.
TASKS = ("revalidate", "download", "vocab", "shards", "train", "register", "report")


class Pipeline:
    """A `cortexcraft pipeline` in a process group of its own; its output lines, timestamped on arrival."""

    def __init__(self, command: list[str], env: dict[str, str]):
        self.proc = subprocess.Popen(
            command,
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[tuple[float, str]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip()))

    def stage_starts(self) -> list[float]:
        """When each stage began so far: the flow's start, then the end of each stage before it."""
        lines = list(self.lines)
        return [t for t, line in lines if FLOW_START in line][:1] + [t for t, line in lines if STAGE_END in line]

    def finish(self, timeout: float = 240) -> int:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            self.kill()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()
        self.reader.join()

    def output(self) -> str:
        return "\n".join(line for _, line in self.lines)


def kill_during(run: Pipeline, index: int, seconds: float) -> str:
    """SIGKILL ``run`` ``seconds`` after stage ``index`` began; returns the stage it was in."""
    try:
        deadline = time.monotonic() + 180
        while len(run.stage_starts()) <= index and run.proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(run.stage_starts()) > index, run.output()[-3000:]
        time.sleep(max(0.0, run.stage_starts()[index] + seconds - time.monotonic()))
        in_stage = len(run.stage_starts()) - 1
        finished = run.proc.poll() is not None
    finally:
        run.kill()
    return "done" if finished or in_stage >= len(TASKS) else TASKS[in_stage]


def check_outputs(data: Path) -> None:
    """Every stage output with a record is intact; every checkpoint verifies."""
    for stage in STAGES:
        for record in (data / STAGE_DIRS[stage]).glob(f"*/{RECORD_NAME}"):
            assert valid_record(data, stage, record.parent.name) is not None, record
    for manifest in (data / "shards").glob(f"*/{MANIFEST}"):
        verify_shards(manifest.parent, check_hashes=True)
    for run in (data / "runs").glob("*"):
        for checkpoint in list_checkpoints(run):
            read_checkpoint_state(checkpoint)


def leftovers(data: Path) -> list[Path]:
    temps = [p for p in data.rglob("*") if p.name.endswith(TEMP_SUFFIX)]
    held = [p for p in data.rglob("*.lock") if lock_holder(p) is not None]
    return temps + held


def comparable_report(data: Path) -> list[str]:
    (report,) = (data / "reports").glob("*/report.md")
    varying = ("| wall time |", "| checkpoint |", "| run directory |")
    return [line for line in report.read_text().splitlines() if not line.startswith(varying)]


def metrics_without_times(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed_seconds"} for r in read_metrics(run)]


def test_sigkill_at_seeded_moments_in_every_stage_then_rerun_matches_an_uninterrupted_run(
    api_server, tmp_path, tinyshakespeare_path
):
    def command(data: Path, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "flows",
            "pipeline",
            "--source",
            str(tinyshakespeare_path),
            "--data-dir",
            str(data),
            *(f"--set={o}" for o in OVERRIDES),
            *extra,
        ]

    env = api_server["env"]
    reference_dir = tmp_path / "uninterrupted"
    reference = Pipeline(command(reference_dir), env)
    assert reference.finish() == 0, reference.output()[-3000:]
    starts = reference.stage_starts()
    assert len(starts) == len(TASKS) + 1, reference.output()[-3000:]
    lengths = {task: starts[i + 1] - starts[i] for i, task in enumerate(TASKS)}

    rng = random.Random(SEED)
    targets = sorted(list(STAGES) + [rng.choice(STAGES) for _ in range(KILLS - len(STAGES))], key=STAGES.index)
    data, landed = tmp_path / "data", []
    for target in targets:
        # Training resumes where the last kill left it: kill early enough to stay inside it.
        fraction = rng.uniform(0.1, 0.35) if target == "train" else rng.uniform(0.05, 0.8)
        # Stage lengths vary on a busy machine: a kill that came after its stage ended is made
        # again, earlier (every attempt is a real kill and counts).
        for attempt in range(3):
            stage = kill_during(
                Pipeline(command(data, *([] if target == "train" else ["--refresh", target])), env),
                TASKS.index(target),
                fraction / 2**attempt * lengths[target],
            )
            landed.append((target, round(fraction / 2**attempt, 3), stage))
            check_outputs(data)
            if stage == target:
                break

    final = Pipeline(command(data), env)
    assert final.finish() == 0, final.output()[-3000:]
    print(f"\nseed {SEED}: {len(landed)} SIGKILLs (target, fraction of the stage, landed in): {landed}")
    assert {stage for _, _, stage in landed} >= set(STAGES) and len(landed) >= KILLS

    check_outputs(data)
    assert leftovers(data) == []
    (run,), (reference_run,) = (data / "runs").glob("*"), (reference_dir / "runs").glob("*")
    summary, reference_summary = read_json(run / "summary.json"), read_json(reference_run / "summary.json")
    for checkpoint in ("checkpoint_best", "checkpoint_last"):
        assert Path(summary[checkpoint]).name == Path(reference_summary[checkpoint]).name
        assert same_weights(Path(summary[checkpoint]), Path(reference_summary[checkpoint]))
    assert metrics_without_times(run) == metrics_without_times(reference_run)
    assert comparable_report(data) == comparable_report(reference_dir)
