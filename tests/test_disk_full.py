"""A full disk, for real: a small tmpfs mounted for each test (needs root; skipped otherwise) and
filled with a ballast file. Every write fails with one clear line, nothing written earlier is lost,
and the same command completes once the ballast is deleted."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from cortexcraft.checkpoint import list_checkpoints, load_model_state, resolve_checkpoint, verify_run
from cortexcraft.cli import main
from cortexcraft.fileio import DiskFullError, append_text, atomic_write_text
from cortexcraft.shards import verify_shards
from cortexcraft.metrics import read_metrics
from cortexcraft.train import train
from tiny_runs import make_data_dir, repetitive_text, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

DISK_BYTES = 4 << 20
ONE_LINE = re.compile(
    r"no space left on the device to write (\S+): (?:about )?([\d,]+) bytes needed, ([\d,]+) bytes free; "
    r"free some space \(or write elsewhere\) and re-run"
)


@pytest.fixture
def disk(tmp_path) -> Path:
    """A 4 MiB tmpfs of its own, unmounted afterwards."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={DISK_BYTES}", "tmpfs", str(mount_point)], capture_output=True, text=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the disk-full tests (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(disk: Path, leave_free: int = 0) -> Path:
    """Write a ballast file until only ``leave_free`` bytes (rounded to pages) are free."""
    ballast = disk / "ballast"
    free = shutil.disk_usage(disk).free
    with open(ballast, "wb") as handle:
        try:
            handle.write(b"\0" * max(0, free - leave_free))
        except OSError:
            pass
    return ballast


def no_temp_files(root: Path) -> bool:
    return not [p for p in root.rglob("*") if p.name.startswith(".") or p.name.endswith(".tmp")]


def test_shards_on_a_full_disk_fail_in_one_line_keep_the_old_output_and_succeed_once_space_is_freed(
    disk, tmp_path, capsys
):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(repetitive_text(200_000), encoding="utf-8")
    common = ["prepare", "--source", str(corpus), "--cache-dir", str(tmp_path / "downloads")]
    assert main([*common, "--out", str(disk / "shards-a")]) == 0
    before = verify_shards(disk / "shards-a", check_hashes=True)
    ballast = fill(disk, leave_free=64 << 10)
    capsys.readouterr()

    assert main([*common, "--val-fraction", "0.2", "--out", str(disk / "shards-b")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    match = ONE_LINE.search(line)
    assert line.startswith("cortexcraft prepare: error: ") and match, line
    assert match.group(1) == str(disk / "shards-b")
    assert int(match.group(2).replace(",", "")) == 200_000  # one byte per character
    # The partial shards were removed first (only prepare's small vocabulary temp dir remained).
    assert int(match.group(3).replace(",", "")) >= 48 << 10
    assert not (disk / "shards-b").exists() and no_temp_files(disk)
    assert verify_shards(disk / "shards-a", check_hashes=True) == before

    ballast.unlink()
    assert main([*common, "--val-fraction", "0.2", "--out", str(disk / "shards-b")]) == 0
    verify_shards(disk / "shards-b", check_hashes=True)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("disk-full"))


def test_a_checkpoint_that_cannot_fit_is_refused_and_the_rerun_resumes_to_the_same_weights(disk, data_dir, tmp_path):
    config = tiny_config("cpu", "max_iters=40", "lr=3e-3", "keep_last=10")
    run = disk / "run"
    ballast = None

    def fill_at_step_20(record):
        nonlocal ballast
        if record["step"] == 20:
            ballast = fill(disk, leave_free=16 << 10)

    with pytest.raises(DiskFullError) as caught:
        train(config, data_dir, run, on_eval=fill_at_step_20)
    match = ONE_LINE.fullmatch(str(caught.value))
    assert match and match.group(1) == str(run / "checkpoints" / "step_00000020"), str(caught.value)
    needed = int(match.group(2).replace(",", ""))
    assert needed > int(match.group(3).replace(",", ""))
    # The checkpoint before the failure is intact; nothing partial was left behind.
    assert [p.name for p, _ in verify_run(run)] == ["step_00000010"]
    assert no_temp_files(run)

    ballast.unlink()
    summary = train(config, data_dir, run)
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 40
    uninterrupted = train(config, data_dir, tmp_path / "uninterrupted")
    ours, theirs = (load_model_state(resolve_checkpoint(r, "last")[0]) for r in (run, tmp_path / "uninterrupted"))
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    assert read_metrics(run) == [
        dict(r, elapsed_seconds=m["elapsed_seconds"])
        for r, m in zip(read_metrics(tmp_path / "uninterrupted"), read_metrics(run))
    ]
    assert summary["best_val_loss"] == uninterrupted["best_val_loss"]
    assert [p.name for p in list_checkpoints(run)] == [p.name for p in list_checkpoints(tmp_path / "uninterrupted")]


def test_a_metrics_line_or_a_report_that_cannot_fit_leaves_the_file_as_it_was(disk):
    metrics, report = disk / "metrics.jsonl", disk / "report.md"
    append_text(metrics, '{"step": 0}\n')
    atomic_write_text(report, "# old report\n")
    ballast = fill(disk)

    line = '{"step": 10, "pad": "' + "x" * 20_000 + '"}\n'
    with pytest.raises(DiskFullError) as caught:
        append_text(metrics, line)
    match = ONE_LINE.fullmatch(str(caught.value))
    assert match and match.group(1) == str(metrics) and match.group(2) == f"{len(line):,}", str(caught.value)
    assert metrics.read_text() == '{"step": 0}\n'  # no torn line for the next append to continue

    text = "# new report\n" + "sample text\n" * 50_000
    with pytest.raises(DiskFullError) as caught:
        atomic_write_text(report, text)
    match = ONE_LINE.fullmatch(str(caught.value))
    assert match and match.group(1) == str(report) and match.group(2) == f"{len(text):,}", str(caught.value)
    assert report.read_text() == "# old report\n" and no_temp_files(disk)

    ballast.unlink()
    append_text(metrics, '{"step": 10}\n')
    assert metrics.read_text() == '{"step": 0}\n{"step": 10}\n'
    atomic_write_text(report, "# new report\n")
    assert report.read_text() == "# new report\n"
