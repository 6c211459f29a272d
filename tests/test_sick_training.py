"""Sick training: diverging loss, damaged token ids, and `cortexcraft verify` (real runs, real files)."""
from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from cortexcraft.checkpoint import (
    CheckpointError, list_checkpoints, load_model_state, read_checkpoint_state, resolve_checkpoint, save_checkpoint,
)
from cortexcraft.cli import main
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import read_json
from cortexcraft.shards import verify_shards
from cortexcraft.metrics import read_metrics
from cortexcraft.train import train
from tiny_runs import TINY, make_data_dir, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("sick"))


@pytest.fixture
def healthy_run(data_dir, tmp_path) -> Path:
    """A run trained to step 20 at a sane learning rate (checkpoints at 10 and 20)."""
    run = tmp_path / "run"
    train(tiny_config("cpu", "max_iters=20", "lr=3e-3"), data_dir, run)
    return run


def cli_train(data_dir: Path, run: Path, *settings: str) -> int:
    return main(["train", "--data", str(data_dir), "--out", str(run), "--preset", "cpu",
                 *[arg for s in TINY + list(settings) for arg in ("--set", s)]])


def test_a_diverging_run_stops_naming_the_step_and_the_last_good_checkpoint(healthy_run, data_dir, capsys):
    best_before = resolve_checkpoint(healthy_run, "best")[0]
    summary_before = (healthy_run / "summary.json").read_bytes()
    capsys.readouterr()

    assert cli_train(data_dir, healthy_run, "lr=1e4", "max_iters=60") == 2

    (line,) = capsys.readouterr().err.strip().splitlines()[-1:]
    assert line.startswith("cortexcraft train: error: training diverged at step ")
    step = int(line.split("diverged at step ")[1].split(":")[0])
    assert 20 <= step < 30
    assert f"the last good checkpoint is {healthy_run / 'checkpoints' / 'step_00000020'}" in line
    assert "lower train.lr (was 1e+04)" in line
    # Nothing after the divergence was written: no checkpoint, no metrics record, no summary.
    assert [p.name for p in list_checkpoints(healthy_run)] == ["step_00000010", "step_00000020"]
    for path in list_checkpoints(healthy_run):
        read_checkpoint_state(path)
        weights = load_model_state(path)
        assert all(torch.isfinite(t).all() for t in weights.values())
    assert max(r["step"] for r in read_metrics(healthy_run)) == 20
    assert all(math.isfinite(r["val_loss"]) for r in read_metrics(healthy_run))
    assert (healthy_run / "summary.json").read_bytes() == summary_before
    assert resolve_checkpoint(healthy_run, "best")[0] == best_before


def test_a_run_that_diverges_before_any_checkpoint_says_so(data_dir, tmp_path):
    with pytest.raises(CortexCraftError, match=r"diverged at step \d+: .* no checkpoint was written"):
        train(tiny_config("cpu", "lr=1e4", "max_iters=60"), data_dir, tmp_path / "run")
    assert list_checkpoints(tmp_path / "run") == []


def test_non_finite_weights_are_never_checkpointed_and_never_best(healthy_run):
    path, state = resolve_checkpoint(healthy_run, "best")
    weights = load_model_state(path)
    broken = {name: t.clone() for name, t in weights.items()}
    name = next(iter(broken))
    broken[name][0] = float("nan")
    with pytest.raises(
        CheckpointError, match=rf"refusing to write the checkpoint of step 30 .* weight {name} holds NaN or inf"
    ):
        save_checkpoint(
            healthy_run, 30, broken, {"optimizer": {"state": {}, "param_groups": []}}, [], {**state, "val_loss": 0.1}
        )
    assert [p.name for p in list_checkpoints(healthy_run)] == ["step_00000010", "step_00000020"]
    assert not list((healthy_run / "checkpoints").glob(".*"))
    # A checkpoint whose recorded val loss is not finite (or worse) never becomes best.
    save_checkpoint(
        healthy_run,
        40,
        weights,
        {"optimizer": {"state": {}, "param_groups": []}},
        [],
        {**state, "val_loss": float("nan")},
    )
    save_checkpoint(
        healthy_run,
        50,
        weights,
        {"optimizer": {"state": {}, "param_groups": []}},
        [],
        {**state, "val_loss": state["val_loss"] + 1},
    )
    assert resolve_checkpoint(healthy_run, "best")[0] == path
    assert resolve_checkpoint(healthy_run, "last")[0].name == "step_00000050"


def damage_token_ids(shard: Path, dtype: str, every: int = 7) -> int:
    """Overwrite every ``every``-th token with the largest id the dtype holds, in place, keeping
    the size and mtime so the cheap size check still passes; returns that id."""
    stat = shard.stat()
    ids = np.memmap(shard, dtype=np.dtype(dtype).newbyteorder("<"), mode="r+")
    bad = int(np.iinfo(ids.dtype).max)
    ids[::every] = bad
    ids.flush()
    del ids
    os.utime(shard, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert shard.stat().st_size == stat.st_size and shard.stat().st_mtime_ns == stat.st_mtime_ns
    return bad


def test_out_of_range_token_ids_are_a_clear_error_and_verify_names_the_file(data_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged"
    shutil.copytree(data_dir, damaged)
    manifest = read_json(damaged / "manifest.json")
    shard = damaged / manifest["splits"]["train"]["files"][0]["name"]
    bad = damage_token_ids(shard, manifest["dtype"])
    assert bad >= manifest["vocab_size"]
    verify_shards(damaged)  # sizes still match

    with pytest.raises(CortexCraftError) as caught:
        train(tiny_config("cpu", "max_iters=20"), damaged, tmp_path / "run")
    message = str(caught.value)
    assert message.startswith(f"{shard} holds token id {bad} at token ")
    assert (
        f"but the vocabulary has {manifest['vocab_size']} ids: the shard is damaged; "
        f"check with `cortexcraft verify {damaged}`"
        in message
    )

    capsys.readouterr()
    assert main(["verify", str(damaged)]) == 2
    err = capsys.readouterr().err.strip()
    assert (
        err
        == f"cortexcraft verify: error: {shard} does not match its sha256 in manifest.json; "
        f"re-run `cortexcraft prepare --out {damaged}`"
    )


def test_verify_checks_every_hash_of_a_shard_dir_and_a_run_dir(data_dir, healthy_run, capsys):
    assert main(["verify", str(data_dir)]) == 0
    out = capsys.readouterr().out
    files = sum(len(s["files"]) for s in read_json(data_dir / "manifest.json")["splits"].values())
    assert out.strip() == f"{data_dir}: shard directory OK, the tokenizer and {files} shard files match their sha256"

    assert main(["verify", str(healthy_run)]) == 0
    assert (
        capsys.readouterr().out.strip()
        == f"{healthy_run}: run directory OK, 2 checkpoints (steps 10, 20) match their sha256"
    )

    # One flipped byte in the middle of a checkpoint's weights, size and mtime kept.
    weights = healthy_run / "checkpoints" / "step_00000010" / "model.safetensors"
    stat = weights.stat()
    with open(weights, "r+b") as handle:
        handle.seek(stat.st_size // 2)
        byte = handle.read(1)
        handle.seek(stat.st_size // 2)
        handle.write(bytes([byte[0] ^ 0xFF]))
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert main(["verify", str(healthy_run)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"cortexcraft verify: error: checkpoint file {weights} is missing or damaged "
        "(hash mismatch); use another checkpoint"
    )

    assert main(["verify", str(healthy_run / "checkpoints")]) == 2
    assert "is neither a shard directory (no manifest.json) nor a run directory" in capsys.readouterr().err
