import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cortexcraft.checkpoint import list_checkpoints, read_checkpoint_state
from cortexcraft.train import read_metrics
from tiny_runs import ONE_THREAD_ENV, TINY, make_data_dir

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
    third = torchrun_train(data_dir, tmp_path / "from-30", 40, "--init-from", str(list_checkpoints(run)[-1]))
    assert third.returncode == 0, third.stderr[-2000:]
    assert third.stderr.count("starting") == 2  # every rank loaded the weights
    assert [r["step"] for r in read_metrics(tmp_path / "from-30")] == [30, 40]
