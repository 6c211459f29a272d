"""Preparing an OpenWebText-size corpus in parts: throughput with 1 and 2 workers against a
nanoGPT-style baseline, and peak memory against corpus size.

The corpus is synthetic and deterministic (``generate_corpus``): parquet files with a ``text``
column of OpenWebText-like documents (log-normal lengths around 5 KB, paragraphs, mostly English
words with accented Latin, Cyrillic, Greek, CJK and emoji mixed in), generated once into
``--corpus-dir`` (2 GB by default: keep it between runs).

- throughput (MB of text per second, the download stage cached, so vocabulary + shards):
  ``cortexcraft.prepare(workers=N)`` for N in 1, 2, char and BPE; the baseline is nanoGPT's
  ``data/openwebtext/prepare.py`` recipe, ``datasets.map(num_proc=N)`` encoding each document
  (char: ``[stoi[c] for c in text]``; BPE: the same tokenizer.json, ``encode(text).ids``, which ours
  loads with ``tokenizer_file``: training it is not timed) and
  writing one memmap per split. Char runs on ``--char-mb`` of the corpus, BPE on ``--bpe-mb``
  (the baseline's per-document Python encode and Arrow lists of ids run at a few MB/s). Every run
  is a fresh child process. Ours runs as a user's would: with 1 worker the tokenizers library
  encodes batches on all cores, with N workers each gets its share of them. The baseline runs
  with RAYON_NUM_THREADS=1: it encodes one document per call, and its worker count is its
  parallelism.
- the machine's ceiling: how much 2 processes gain over 1 on a pure-Python loop and on 64 MB
  array copies (memory bandwidth), printed before the throughput table.
- collection (the download stage of a directory of parquet files: every row's text into one
  corpus file): ``cortexcraft.sources.download(workers=N)`` on the whole corpus, a fresh cache each
  run; the baseline is nanoGPT's ``datasets.load_dataset(num_proc=N)`` of the same files into a
  fresh Arrow cache. Both corpora of ours must have the same sha256.
- memory: peak RSS (VmHWM) of ``prepare`` (download from the parquet files included) with 1
  worker on the first ``--small-mb`` of the corpus and on all of it; the goal is the large within
  +10% of the small. RSS does not depend on the machine's load, so this half can run anywhere.

    python bench/bench_scale.py [--quick] [--corpus-dir DIR] [--corpus-mb 2048] [--char-mb 500] [--bpe-mb 100]
                                [--only throughput collection memory]
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchlib import REPO, parse_args, print_table, save_results

DOCS_PER_ROW_GROUP = 1024
FILE_MB = 256
# Word pools: (weight, words). Mostly English-like, like OpenWebText, with the scripts it also holds.
_LATIN = (
    "the of and to in is was for that on with as by at from his her they this which were be are have had "
    "not but an it or one all their has been would who more when will there no so can if out up about "
    "people time year government world state city company market president police report police water"
).split()
_ACCENTED = "café naïve résumé façade über straße größe señor niño coöperate déjà Zürich São Kraków".split()
_OTHER = (
    "Москва правительство человек Αθήνα δημοκρατία 日本 東京 政府 中国 北京 市场 한국 서울 "
    "😀 🙂 🚀 ✓ € £ — – “quoted” ‘single’ … ½ ° ± × µ"
).split()
BPE_VOCAB = 8192
BPE_TRAIN_CHARS = 20_000_000

CHILD_OURS = """
import json, os, resource, sys, time
from cortexcraft.config import DataConfig
from cortexcraft.prepare import prepare
args = json.loads(sys.argv[1])
config = DataConfig(**args["data"])
start = time.perf_counter()
manifest = prepare(config, args["out"], cache_dir=args["cache"], workers=args["workers"])
seconds = time.perf_counter() - start
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
print(json.dumps({"seconds": seconds, "bytes": manifest["source"]["bytes"],
                  "tokens": sum(s["tokens"] for s in manifest["splits"].values()),
                  "vm_hwm_mib": int(status["VmHWM"].split()[0]) / 1024,
                  "children_max_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""

CHILD_COLLECT = """
import json, sys, time
from cortexcraft.config import DataConfig
from cortexcraft.sources import download
args = json.loads(sys.argv[1])
start = time.perf_counter()
corpus = download(DataConfig(source=args["source"]), args["cache"], workers=args["workers"])
print(json.dumps({"seconds": time.perf_counter() - start, "bytes": corpus["bytes"], "sha256": corpus["sha256"]}))
"""

CHILD_NANOGPT_LOAD = """
import json, sys, time
args = json.loads(sys.argv[1])
start = time.perf_counter()
import datasets
datasets.disable_progress_bars()
num_proc = args["num_proc"] if args["num_proc"] > 1 else None
ds = datasets.load_dataset("parquet", data_files=args["files"], split="train", cache_dir=args["hf_cache"],
                          num_proc=num_proc)
print(json.dumps({"seconds": time.perf_counter() - start, "rows": len(ds)}))
"""

# The machine's own ceiling for 2 workers: a pure-Python loop (compute) and 64 MB array copies
# (memory bandwidth), each timed alone and as two processes at once.
CHILD_CEILING = """
import sys, time
import numpy as np
if sys.argv[1] == "python loop":
    start, total = time.perf_counter(), 0
    for i in range(20_000_000):
        total += i
else:
    source = np.ones(64 << 20, dtype=np.uint8)
    target = np.empty_like(source)
    np.copyto(target, source)
    start = time.perf_counter()
    for _ in range(96):
        np.copyto(target, source)
print(time.perf_counter() - start)
"""


def _two_process_speedup(kind: str) -> float:
    def slowest_of(count: int) -> float:
        procs = [
            subprocess.Popen([sys.executable, "-c", CHILD_CEILING, kind], stdout=subprocess.PIPE, text=True)
            for _ in range(count)
        ]
        return max(float(proc.communicate()[0]) for proc in procs)

    return 2 * slowest_of(1) / slowest_of(2)


CHILD_NANOGPT = """
import json, sys, time
import numpy as np
args = json.loads(sys.argv[1])
start = time.perf_counter()
import datasets
datasets.disable_progress_bars()
ds = datasets.load_dataset("parquet", data_files=args["files"], split="train", cache_dir=args["hf_cache"])
if args["max_docs"] is not None:
    ds = ds.select(range(args["max_docs"]))
if args["tokenizer"] == "char":
    chars = [json.loads(line) for line in open(args["vocab"], encoding="utf-8").read().splitlines()[1:]]
    stoi = {c: i for i, c in enumerate(chars)}
    dtype = np.uint16 if len(chars) < 65536 else np.uint32
    def process(example):
        ids = [stoi[c] for c in example["text"]]
        return {"ids": ids, "len": len(ids)}
else:
    from tokenizers import Tokenizer
    tok = Tokenizer.from_file(args["vocab"])
    eot = tok.token_to_id("<|endoftext|>")
    dtype = np.uint16
    def process(example):
        ids = tok.encode(example["text"], add_special_tokens=False).ids
        ids.append(eot)
        return {"ids": ids, "len": len(ids)}
split = ds.train_test_split(test_size=0.1, seed=2357, shuffle=False)
split["val"] = split.pop("test")
tokens = 0
for name, dset in split.items():
    # load_from_cache_file=False: an earlier run's cached map must not stand in for encoding.
    tokenized = dset.map(process, remove_columns=["text"], num_proc=args["num_proc"], load_from_cache_file=False)
    arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
    arr = np.memmap(f"{args['out']}/{name}.bin", dtype=dtype, mode="w+", shape=(arr_len,))
    total_batches = min(64, len(tokenized))
    idx = 0
    for batch_idx in range(total_batches):
        batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
        arr_batch = np.concatenate(batch["ids"])
        arr[idx: idx + len(arr_batch)] = arr_batch
        idx += len(arr_batch)
    arr.flush()
    tokens += arr_len
print(json.dumps({"seconds": time.perf_counter() - start, "tokens": tokens}))
"""


def _documents(rng: np.random.Generator, words: np.ndarray, probabilities: np.ndarray, count: int) -> list[str]:
    """``count`` documents: ~900 words each (log-normal, ~5 KB, like OpenWebText), drawn all at once."""
    lengths = np.clip(rng.lognormal(6.6, 0.8, size=count), 20, 40_000).astype(np.int64)
    total = int(lengths.sum())
    picks = words[rng.choice(len(words), size=total, p=probabilities)]
    gaps = np.array(["\n\n", ". ", ", ", " "], dtype=object)[np.searchsorted([0.008, 0.06, 0.1], rng.random(total))]
    pieces = np.stack([picks, gaps], axis=1).ravel()
    ends = np.cumsum(lengths) * 2
    return ["".join(pieces[end - 2 * n : end - 1]).capitalize() for n, end in zip(lengths, ends)]


def generate_corpus(directory: Path, total_mb: int, seed: int = 2026) -> list[Path]:
    """Parquet files of synthetic documents totalling about ``total_mb`` MB of UTF-8 text; reused
    when ``directory`` already holds a complete corpus of that size."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    done = directory / "corpus.json"
    if done.is_file() and json.loads(done.read_text())["total_mb"] == total_mb:
        return sorted(directory.glob("*.parquet"))
    if directory.exists():
        shutil.rmtree(directory)
    directory.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    pools = [(0.93, _LATIN), (0.04, _ACCENTED), (0.03, _OTHER)]
    words = np.array([w for _, pool in pools for w in pool], dtype=object)
    probabilities = np.array([weight / len(pool) for weight, pool in pools for _ in pool])
    written, index = 0, 0
    while written < total_mb * 1_000_000:
        docs, size = [], 0
        while size < min(FILE_MB, total_mb) * 1_000_000 and written + size < total_mb * 1_000_000:
            batch = _documents(rng, words, probabilities, 2000)
            docs += batch
            size += sum(len(doc.encode("utf-8")) for doc in batch)
        pq.write_table(
            pa.table({"text": docs}), directory / f"part-{index:04d}.parquet", row_group_size=DOCS_PER_ROW_GROUP
        )
        written, index = written + size, index + 1
        print(f"  generated {written / 1e6:,.0f} of {total_mb:,} MB", flush=True)
    done.write_text(json.dumps({"total_mb": total_mb, "seed": seed, "bytes": written}))
    return sorted(directory.glob("*.parquet"))


def _child(code: str, args: dict, tokenizer_threads: bool = False) -> dict:
    """``code`` in a fresh process; ``tokenizer_threads``: leave the tokenizers library its own threads."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    if not tokenizer_threads:
        env.update(RAYON_NUM_THREADS="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="true")
    result = subprocess.run(
        [sys.executable, "-c", code, json.dumps(args)], cwd=REPO, env=env, capture_output=True, text=True
    )
    if result.returncode != 0:
        sys.exit(f"child failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _ours(corpus: Path, work: Path, data: dict, workers: int, cache: Path | None = None) -> dict:
    out = work / f"ours-{data.get('tokenizer', 'char')}-{workers}"
    shutil.rmtree(out, ignore_errors=True)
    result = _child(
        CHILD_OURS,
        {
            "data": {"source": str(corpus), **data},
            "out": str(out),
            "cache": str(cache or work / "cache"),
            "workers": workers,
        },
        tokenizer_threads=True,
    )
    shutil.rmtree(out)
    return result


def _documents_within(files: list[Path], max_bytes: int | None) -> int | None:
    """How many documents ``max_bytes`` takes (as the download stage counts them), None for all."""
    if max_bytes is None:
        return None
    import pyarrow.parquet as pq

    count, size = 0, 0
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(columns=["text"]):
            for text in batch.column(0).to_pylist():
                count, size = count + 1, size + len(text.encode("utf-8")) + 2
                if size >= max_bytes:
                    return count
    return None


def _nanogpt(files: list[Path], work: Path, tokenizer: str, vocab: Path, num_proc: int, max_docs: int | None) -> dict:
    out = work / f"nanogpt-{tokenizer}-{num_proc}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    result = _child(
        CHILD_NANOGPT,
        {
            "files": [str(f) for f in files],
            "hf_cache": str(work / "hf-cache"),
            "out": str(out),
            "tokenizer": tokenizer,
            "vocab": str(vocab),
            "num_proc": num_proc,
            "max_docs": max_docs,
        },
    )
    shutil.rmtree(out)
    return result


def main() -> None:
    def extra(parser):
        parser.add_argument(
            "--corpus-dir", type=Path, default=REPO / "bench" / "corpus", help="where the synthetic corpus is kept"
        )
        parser.add_argument("--corpus-mb", type=int, default=2048)
        parser.add_argument("--small-mb", type=int, default=200, help="the small corpus of the memory comparison")
        parser.add_argument("--char-mb", type=int, default=500, help="MB of the corpus the char throughput runs use")
        parser.add_argument("--bpe-mb", type=int, default=100, help="MB of the corpus the BPE throughput runs use")
        parser.add_argument(
            "--only",
            nargs="+",
            choices=["throughput", "collection", "memory"],
            default=["throughput", "collection", "memory"],
        )

    args = parse_args(__doc__.splitlines()[0], extra)
    if args.quick:
        args.corpus_mb, args.small_mb, args.char_mb, args.bpe_mb = 24, 4, 24, 3
    corpus_dir = args.corpus_dir / f"owt-synthetic-{args.corpus_mb}mb"
    print(f"corpus: {corpus_dir}", flush=True)
    files = generate_corpus(corpus_dir, args.corpus_mb)
    work = Path(tempfile.mkdtemp(prefix="bench-scale-", dir=args.corpus_dir))
    results: dict = {"corpus_mb": args.corpus_mb, "quick": args.quick}
    try:
        char = {"shard_tokens": 100_000_000}
        char_part = {**char, **({"max_bytes": args.char_mb * 1_000_000} if args.char_mb < args.corpus_mb else {})}
        bpe = {
            "tokenizer": "bpe",
            "vocab_size": BPE_VOCAB,
            "bpe_train_chars": BPE_TRAIN_CHARS,
            "max_bytes": args.bpe_mb * 1_000_000,
            "shard_tokens": 100_000_000,
        }
        if "throughput" in args.only:
            ceiling = {kind: _two_process_speedup(kind) for kind in ("python loop", "memory copy")}
            results["two_process_ceiling"] = ceiling
            print_table(
                "This machine's speed-up from 2 processes (each timed alone, then two at once)",
                ["work", "2 vs 1 process"],
                [[kind, f"{value:.2f}x"] for kind, value in ceiling.items()],
            )
            # Warm-up: the download stage (parquet -> corpus.txt) and datasets' arrow cache, not timed.
            vocab_dir = work / "vocab"
            rows, speeds = [], {}
            for name, data in (("char", char_part), ("bpe", bpe)):
                from cortexcraft.config import DataConfig
                from cortexcraft.sources import download
                from cortexcraft.tokenizer import build_vocab

                config = DataConfig(source=str(corpus_dir), **data)
                vocab = build_vocab(download(config, work / "cache"), config, vocab_dir / name)  # caches the download
                if name == "bpe":
                    # Both systems encode with the same tokenizer.json; training one is not part of the race.
                    data = {**data, "tokenizer_file": vocab["path"]}
                max_docs = _documents_within(files, data.get("max_bytes"))
                _nanogpt(files, work, name, Path(vocab["path"]), 1, 2)  # datasets' arrow cache of the files
                for workers in (1, 2):
                    ours = _ours(corpus_dir, work, data, workers)
                    base = _nanogpt(files, work, name, Path(vocab["path"]), workers, max_docs)
                    mb = ours["bytes"] / 1e6
                    speeds[f"{name}, {workers} worker(s)"] = {
                        "ours_mb_per_s": mb / ours["seconds"],
                        "nanogpt_mb_per_s": mb / base["seconds"],
                        "mb": mb,
                    }
                    rows.append(
                        [
                            name,
                            workers,
                            f"{mb:,.0f}",
                            mb / ours["seconds"],
                            mb / base["seconds"],
                            base["seconds"] / ours["seconds"],
                        ]
                    )
                one, two = speeds[f"{name}, 1 worker(s)"], speeds[f"{name}, 2 worker(s)"]
                speeds[f"{name} scaling 2 vs 1 worker"] = two["ours_mb_per_s"] / one["ours_mb_per_s"]
                rows.append(
                    [
                        name,
                        "2 vs 1",
                        "",
                        f"{speeds[f'{name} scaling 2 vs 1 worker']:.2f}x",
                        f"{two['nanogpt_mb_per_s'] / one['nanogpt_mb_per_s']:.2f}x",
                        "",
                    ]
                )
            results["throughput"] = speeds
            print_table(
                "Preparation throughput (vocabulary + shards; download cached)",
                ["tokenizer", "workers", "MB", "ours MB/s", "nanoGPT-style MB/s", "ours / nanoGPT"],
                rows,
            )
        if "collection" in args.only:
            rows, speeds, hashes = [], {}, set()
            for workers in (1, 2):
                cache = work / "collect-cache"
                ours = _child(CHILD_COLLECT, {"source": str(corpus_dir), "cache": str(cache), "workers": workers})
                shutil.rmtree(cache)
                hashes.add(ours["sha256"])
                base = _child(
                    CHILD_NANOGPT_LOAD,
                    {"files": [str(f) for f in files], "hf_cache": str(work / "collect-hf"), "num_proc": workers},
                )
                shutil.rmtree(work / "collect-hf")
                mb = ours["bytes"] / 1e6
                speeds[f"{workers} worker(s)"] = {
                    "ours_mb_per_s": mb / ours["seconds"],
                    "nanogpt_mb_per_s": mb / base["seconds"],
                    "mb": mb,
                }
                rows.append(
                    [
                        "parquet -> text",
                        workers,
                        f"{mb:,.0f}",
                        mb / ours["seconds"],
                        mb / base["seconds"],
                        base["seconds"] / ours["seconds"],
                    ]
                )
            if len(hashes) != 1:
                sys.exit(f"collection with 1 and 2 workers gave different corpora: {sorted(hashes)}")
            one, two = speeds["1 worker(s)"], speeds["2 worker(s)"]
            speeds["scaling 2 vs 1 worker"] = two["ours_mb_per_s"] / one["ours_mb_per_s"]
            rows.append(
                [
                    "parquet -> text",
                    "2 vs 1",
                    "",
                    f"{speeds['scaling 2 vs 1 worker']:.2f}x",
                    f"{two['nanogpt_mb_per_s'] / one['nanogpt_mb_per_s']:.2f}x",
                    "",
                ]
            )
            results["collection"] = speeds
            print_table(
                "Collection throughput (the download stage of a parquet directory; same corpus with 1 and 2 workers)",
                ["stage", "workers", "MB", "ours MB/s", "nanoGPT-style MB/s", "ours / nanoGPT"],
                rows,
            )
        if "memory" in args.only:
            peaks = {}
            for label, max_bytes in (
                (f"{args.small_mb} MB", args.small_mb * 1_000_000),
                (f"{args.corpus_mb} MB", None),
            ):
                # A fresh download cache: both runs read the parquet files too.
                cache = work / "memory-cache"
                run = _ours(corpus_dir, work, {**char, **({"max_bytes": max_bytes} if max_bytes else {})}, 1, cache)
                shutil.rmtree(cache)
                peaks[label] = run["vm_hwm_mib"]
            small, large = peaks.values()
            results["memory"] = {"peak_rss_mib": peaks, "growth_percent": 100 * (large / small - 1)}
            print_table(
                "Peak RSS of prepare (1 worker, char)",
                ["corpus", "VmHWM MiB"],
                list(peaks.items()) + [["growth", f"{100 * (large / small - 1):+.1f}% (goal <= +10%)"]],
            )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    save_results("bench_scale", results)


if __name__ == "__main__":
    main()
