"""Training memory vs corpus size: peak RSS of a short `cpu`-preset run on a 10 MB and a 1 GB corpus.

Batches are gathered from the shard memmaps, so the resident set must not grow with the corpus
(goal: the 1 GB run within 5% of the 10 MB run). Both corpora are Tiny Shakespeare's tokens
tiled to size and written straight as shard files plus a manifest in our format (100M-token
shards, as ``prepare`` would cut them): preparing 1 GB of text through ``prepare`` measures the
data layer (bench_data_prep.py does that), not training, and costs minutes. Each run is a fresh
child process that trains ``ITERS`` steps and reports its own VmHWM; sizes alternate in rounds.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchlib import REPO, parse_args, prepared_tinyshakespeare, print_table, save_results, split_paths

SHARD_TOKENS = 100_000_000
CHILD = """
import sys
from cortexcraft.config import build_config
from cortexcraft.train import train
config = build_config("cpu", {{"train": {{"max_iters": {iters}, "eval_interval": {iters},
                                         "checkpoint_interval": {iters}, "max_minutes": None}}}})
train(config, sys.argv[1], sys.argv[2], resume=False, progress=False)
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(*(int(status[key].split()[0]) for key in ("VmHWM", "RssAnon", "RssFile")))
"""


def write_tiled_corpus(base: Path, out_dir: Path, train_bytes: int) -> Path:
    """A shard directory whose train split is ``base``'s train tokens tiled to ``train_bytes``."""
    from cortexcraft.fileio import atomic_write_json, read_json, sha256_file

    manifest = read_json(base / "manifest.json")
    if manifest["dtype"] != "uint8":
        sys.exit(f"expected a uint8 char vocabulary in {base}, got {manifest['dtype']}")
    out_dir.mkdir(parents=True)
    shutil.copy(base / manifest["tokenizer"]["file"], out_dir / manifest["tokenizer"]["file"])
    (train_bin,), _ = split_paths(base, "train")
    (val_bin,), _ = split_paths(base, "val")
    shutil.copy(val_bin, out_dir / val_bin.name)
    tokens = np.fromfile(train_bin, dtype=np.uint8)
    files, written, index = [], 0, 0
    while written < train_bytes:
        size = min(SHARD_TOKENS, train_bytes - written)
        name = f"train_{index:03d}.bin"
        np.resize(tokens, size).tofile(out_dir / name)
        files.append({"name": name, "tokens": size, "sha256": sha256_file(out_dir / name)})
        written, index = written + size, index + 1
    manifest["splits"]["train"] = {"tokens": written, "files": files}
    atomic_write_json(out_dir / "manifest.json", manifest)
    return out_dir


def child_rss_mib(data_dir: Path, run_dir: Path, iters: int) -> dict[str, float]:
    """Peak RSS of a training child, and its anonymous / file-backed (memmap) RSS at the end."""
    child = subprocess.run(
        [sys.executable, "-c", CHILD.format(iters=iters), str(data_dir), str(run_dir)],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    if child.returncode != 0:
        sys.exit(f"training child failed: {child.stderr.strip().splitlines()[-3:]}")
    peak, anon, file = (int(v) / 1024 for v in child.stdout.split()[-3:])  # kB in /proc
    return {"peak": peak, "anon_at_end": anon, "file_at_end": file}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    small_mb, large_mb = (10, 100) if args.quick else (10, 1000)
    iters, rounds = (5, 1) if args.quick else (20, 2)
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        work = Path(tmp)
        base = prepared_tinyshakespeare(work / "tinyshakespeare")
        corpora = {mb: write_tiled_corpus(base, work / f"corpus-{mb}mb", mb * 1_000_000) for mb in (small_mb, large_mb)}
        peaks: dict[int, list[dict]] = {mb: [] for mb in corpora}
        for r in range(rounds):
            for mb in corpora if r % 2 == 0 else reversed(list(corpora)):
                peaks[mb].append(child_rss_mib(corpora[mb], work / f"run-{mb}-{r}", iters))
    worst = {mb: max(runs, key=lambda run: run["peak"]) for mb, runs in peaks.items()}
    growth = 100 * (worst[large_mb]["peak"] / worst[small_mb]["peak"] - 1)
    anon_growth = 100 * (worst[large_mb]["anon_at_end"] / worst[small_mb]["anon_at_end"] - 1)
    rows = [
        [f"{mb:,} MB", -(-mb * 1_000_000 // SHARD_TOKENS), w["peak"], w["anon_at_end"], w["file_at_end"]]
        for mb, w in worst.items()
    ]
    print_table(
        f"Training RSS ({iters} iters of the cpu preset, fresh process each, worst of {rounds} rounds); "
        f"large vs small: peak {growth:+.1f}%, anonymous {anon_growth:+.1f}%",
        ["train corpus", "shards", "peak RSS MiB", "anon RSS at end", "file-backed RSS at end"],
        rows,
    )
    save_results(
        "bench_memory",
        {
            "iters": iters,
            "rounds": rounds,
            "rss_mib": {str(k): v for k, v in peaks.items()},
            "peak_rss_mib": {str(k): [r["peak"] for r in v] for k, v in peaks.items()},
            "growth_percent": growth,
            "anon_growth_percent": anon_growth,
            "corpus": "Tiny Shakespeare train tokens tiled, shards written directly",
        },
    )


if __name__ == "__main__":
    main()
