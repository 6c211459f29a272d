"""Data preparation throughput and memory: our vectorised char pipeline vs the seeds' Python loop.

Throughput (same text, same run): Tiny Shakespeare repeated to ~45 MB, prepared by
  - the seed style (``bench/seed_style_encode.py``): sorted(set(text)) + [stoi[c] for c in text];
  - ours: vocabulary extraction (``build_vocab``), encode + shard writing (``write_shards``), and
    the whole ``prepare`` (which also validates UTF-8 and hashes the source).
Memory: peak RSS of ``prepare`` in a fresh child process (its VmHWM: the rusage figures of a
child inherit the parent's high-water mark through fork/exec here) on a generated corpus several
times larger than Tiny Shakespeare (200 MB), next to a child that only imports the same modules.

    python bench/bench_data_prep.py [--quick]
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import REPO, parse_args, print_table, save_results, tinyshakespeare_text

from seed_style_encode import seed_encode, seed_prepare, seed_vocab

from cortexcraft.config import DataConfig
from cortexcraft.prepare import prepare
from cortexcraft.shards import write_shards
from cortexcraft.sources import download
from cortexcraft.tokenizer import CHUNK_CHARS, build_vocab, load_tokenizer

IMPORTS = "from cortexcraft.config import DataConfig; from cortexcraft.prepare import prepare"
PRINT_PEAK = "; print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1])"


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def child_peak_rss_mib(code: str) -> float:
    child = subprocess.run([sys.executable, "-c", code + PRINT_PEAK], cwd=REPO, capture_output=True, text=True)
    if child.returncode != 0:
        sys.exit(f"child failed: {child.stderr.strip().splitlines()[-1:]}")
    return int(child.stdout.split()[-1]) / 1024  # VmHWM is in kB


def write_hashed(out_dir: Path, data: bytes) -> str:
    """What writing one shard costs at least: the bytes written, hashed and fsynced."""
    out_dir.mkdir()
    with open(out_dir / "floor.bin", "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    return hashlib.sha256(data).hexdigest()


def cold_and_warm(work: Path, name: str, run, rounds: int) -> tuple[float, float]:
    """Seconds of the first of ``rounds`` runs and of the fastest. Each run writes a new directory
    after deleting the previous one: on this VM, memory the guest has not touched lately costs
    ~1.5 ns/byte on first touch, which a new file's page cache pays on the first run only."""
    seconds = []
    for i in range(rounds):
        out = work / f"{name}-{i}"
        seconds.append(timed(lambda: run(out))[0])
        shutil.rmtree(out)
    return seconds[0], min(seconds)


def throughput(work: Path, repeats: int, rounds: int) -> tuple[list, dict]:
    text = tinyshakespeare_text().read_text(encoding="utf-8") * repeats
    corpus_path = work / "corpus.txt"
    corpus_path.write_text(text, encoding="utf-8")
    megabytes = corpus_path.stat().st_size / 1e6

    seed_vocab_s, chars = timed(lambda: seed_vocab(text))
    stoi = {c: i for i, c in enumerate(chars)}
    seed_encode_s, _ = timed(lambda: seed_encode(text, stoi))

    def seed_write(out: Path):
        out.mkdir()
        seed_prepare(text, out)

    seed_total = cold_and_warm(work, "seed", seed_write, rounds)

    config = DataConfig(source=str(corpus_path))
    corpus = download(config, work / "cache")
    vocab_s, vocab = timed(lambda: build_vocab(corpus, config, work / "vocab"))
    tok = load_tokenizer(work / "vocab")
    encode_s, _ = timed(lambda: [tok.encode(text[i:i + CHUNK_CHARS]) for i in range(0, len(text), CHUNK_CHARS)])
    write = cold_and_warm(work, "shards", lambda out: write_shards(corpus, vocab, config, out), rounds)
    total = cold_and_warm(work, "prepared", lambda out: prepare(config, out, cache_dir=work / "cache"), rounds)
    io_floor = cold_and_warm(work, "floor", lambda out: write_hashed(out, text.encode("ascii")), rounds)

    rows = [
        ["vocabulary", megabytes / seed_vocab_s, megabytes / vocab_s, seed_vocab_s / vocab_s],
        ["encode (in memory)", megabytes / seed_encode_s, megabytes / encode_s, seed_encode_s / encode_s],
    ]
    for label, seed_s, ours_s in (("encode + write shards", [s - seed_vocab_s for s in seed_total], write),
                                  ("whole prepare", seed_total, total)):
        for phase, i in (("first run", 0), (f"best of {rounds}", 1)):
            rows.append([f"{label}, {phase}", megabytes / seed_s[i], megabytes / ours_s[i], seed_s[i] / ours_s[i]])
    rows += [[f"(I/O floor: write+sha256+fsync), {phase}", None, megabytes / io_floor[i], None]
             for phase, i in (("first run", 0), (f"best of {rounds}", 1))]
    record = {
        "corpus_mb": megabytes,
        "vocab_size": vocab["vocab_size"],
        "rounds": rounds,
        "seconds": {
            "seed_vocab": seed_vocab_s,
            "seed_encode": seed_encode_s,
            "seed_prepare": seed_total,
            "ours_vocab": vocab_s,
            "ours_encode": encode_s,
            "ours_encode_write": write,
            "ours_prepare": total,
            "io_floor": io_floor,
        },
        "mb_per_s": {row[0]: {"seed": row[1], "ours": row[2], "speedup": row[3]} for row in rows},
    }
    return rows, record


def memory(work: Path, target_mb: int) -> dict:
    piece = tinyshakespeare_text().read_bytes()
    corpus_path = work / "big.txt"
    with open(corpus_path, "wb") as handle:
        for _ in range(-(-target_mb * 10**6 // len(piece))):
            handle.write(piece)
    megabytes = corpus_path.stat().st_size / 1e6
    baseline = child_peak_rss_mib(IMPORTS)
    start = time.perf_counter()
    peak = child_peak_rss_mib(
        f"{IMPORTS}; prepare(DataConfig(source={str(corpus_path)!r}, shard_tokens=50_000_000), "
        f"__import__('pathlib').Path({str(work / 'big')!r}))"
    )
    seconds = time.perf_counter() - start
    corpus_path.unlink()
    return {"corpus_mb": megabytes, "peak_rss_mib": peak, "import_only_rss_mib": baseline, "prepare_seconds": seconds}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    repeats, big_mb = (4, 40) if args.quick else (40, 200)
    with tempfile.TemporaryDirectory(prefix="bench-data-prep-") as tmp:
        work = Path(tmp)
        rows, record = throughput(work, repeats, rounds=2 if args.quick else 3)
        print_table(
            f"char data prep on {record['corpus_mb']:.0f} MB of Tiny Shakespeare text (MB/s, same run)",
            ["stage", "seed style", "ours", "speedup x"],
            rows,
        )
        mem = memory(work, big_mb)
    print_table(
        "peak RSS of prepare in a child process",
        ["corpus MB", "prepare peak RSS MiB", "import-only RSS MiB", "prepare s"],
        [[mem["corpus_mb"], mem["peak_rss_mib"], mem["import_only_rss_mib"], mem["prepare_seconds"]]],
    )
    save_results("data_prep", {"quick": args.quick, "throughput": record, "memory": mem})


if __name__ == "__main__":
    main()
