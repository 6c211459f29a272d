"""Installable as a library: the wheel, installed into a fresh venv with the constraints, runs the
CLI and a 10-step pipeline from a directory outside the repository (nothing read from the source tree)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_runs import TINY, repetitive_text

REPO = Path(__file__).resolve().parent.parent


def run(command: list, cwd: Path, env: dict | None = None, timeout: float = 900) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.mark.slow
def test_the_wheel_installs_with_the_constraints_and_runs_presets_and_a_pipeline_outside_the_repo(tmp_path):
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp_path / "dist", REPO], tmp_path)
    (wheel,) = (tmp_path / "dist").glob("cortexcraft-*.whl")
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path)
    run([venv / "bin" / "pip", "install", "-q", "-c", REPO / "constraints.txt", wheel], tmp_path)
    run([venv / "bin" / "pip", "check"], tmp_path)

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # Only the venv: no PYTHONPATH, no Prefect profile or server of the caller's.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "PREFECT_", "VIRTUAL_ENV"))}
    env.update(
        PREFECT_HOME=str(tmp_path / "prefect-home"), PREFECT_SERVER_ANALYTICS_ENABLED="false", OMP_NUM_THREADS="1"
    )
    cortexcraft = venv / "bin" / "cortexcraft"
    where = run(
        [venv / "bin" / "python", "-c", "import cortexcraft, flows, tasks; print(cortexcraft.__file__)"], elsewhere, env
    )
    assert where.stdout.strip().startswith(str(venv))
    presets = run([cortexcraft, "presets"], elsewhere, env).stdout
    assert {line.split()[0] for line in presets.splitlines()[1:]} >= {"cpu", "gpt2-small", "shakespeare-char"}

    (elsewhere / "corpus.txt").write_text(repetitive_text(20_000), encoding="utf-8")
    settings = [f"--set={s}" for s in [*TINY, "max_iters=10", "max_new_tokens=20", 'prompts=["ROMEO:"]']]
    run([cortexcraft, "pipeline", "--source", "corpus.txt", *settings], elsewhere, env)
    (summary,) = (elsewhere / "data" / "runs").glob("*/summary.json")
    assert json.loads(summary.read_text())["steps"] == 10
    assert list((elsewhere / "data" / "reports").glob("*/report.md"))
