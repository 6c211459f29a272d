"""bench/gpu_check.py, everything but the GPU: its --cpu-smoke mode runs the same phases on CPU at
a tiny shape (synthetic data through both systems, the profiled run, throughput against nanoGPT's
train.py when a copy of nanoGPT is at hand, resume after SIGKILL)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def nanogpt_copy() -> Path | None:
    """A copy of karpathy/nanoGPT: $CORTEXCRAFT_NANOGPT, or the git-ignored bench/nanogpt/."""
    for candidate in (os.environ.get("CORTEXCRAFT_NANOGPT"), REPO / "bench" / "nanogpt"):
        if candidate and (Path(candidate) / "train.py").is_file():
            return Path(candidate)
    return None


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_cpu_in_well_under_a_minute(tmp_path):
    nanogpt = nanogpt_copy()
    command = [sys.executable, "bench/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path)]
    command += ["--nanogpt", str(nanogpt)] if nanogpt else []
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check_cpu_smoke.json").read_text())
    status = {check["name"]: check["status"] for check in report["checks"]}
    expected = {"same synthetic tokens", "training on the device", "bf16 autocast", "fused AdamW", "attention kernels",
                "throughput", "resume after SIGKILL"}
    assert {name for name, s in status.items() if s == "pass"} == expected
    assert status["torch.compile"] == "skipped"
    assert report["ours"]["tokens_per_second"] > 0 and report["ours"]["steps"] == report["plan"]["steps"]
    assert report["flops_per_token"] > 0 and report["total_seconds"] < 60
    if nanogpt:
        assert report["nanogpt"]["tokens_per_second"] > 0 and report["nanogpt"]["iterations"] > 10
    else:
        assert status["nanoGPT comparison"] == "skipped"
    resume = next(c for c in report["checks"] if c["name"] == "resume after SIGKILL")
    assert resume["numbers"]["bitwise_equal"] and 20 <= resume["numbers"]["killed_at"] < 30
