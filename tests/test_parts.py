"""Data preparation in parts: byte-identical to the serial path for any number of parts and workers,
safe cut points, char counts as a map-reduce, BPE on a bounded sample, an existing tokenizer.json,
local parquet corpora."""
from __future__ import annotations

import logging
import os
import random
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cortexcraft import sources
from cortexcraft.cli import main
from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import read_json
from cortexcraft.parts import (
    CHAR_BYTES_PER_WORKER, PART_BYTES, add_counts, balanced_part_bytes, count_part, encode_part_in_place, plan_parts,
    prepare_parts, workers_that_pay,
)
from cortexcraft.prepare import prepare
from cortexcraft.sources import download
from cortexcraft.threads import available_cores, threads_per_worker
from cortexcraft.tokenizer import BPETokenizer, build_vocab, count_chars, load_tokenizer

PIECES = ["the", "quick", "Grüße", "😀", "日本語", " ", "\n", "\n\n", "  indented", "\t", "x\u2028y", "é", "a\u0301",
          "\r\n", "<eos>", "don't", "123"]


def _mixed_text(rng: random.Random, words: int) -> str:
    return "".join(rng.choice(PIECES) + rng.choice([" ", "\n", ""]) for _ in range(words))


def write_mixed_docs(directory, count: int, min_words: int, max_words: int, seed: int):
    """A directory of mixed-Unicode documents (astral, combining, CRLF, U+2028, leading spaces)."""
    directory.mkdir()
    rng = random.Random(seed)
    for i in range(count):
        (directory / f"{i:03d}.txt").write_text(
            _mixed_text(rng, rng.randint(min_words, max_words)), encoding="utf-8", newline=""
        )
    return directory


@pytest.fixture(scope="module")
def docs(tmp_path_factory):
    return write_mixed_docs(tmp_path_factory.mktemp("parts") / "docs", 30, 50, 400, seed=7)


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


TOKENIZERS = {
    "char": {"shard_tokens": 1500},
    "char-specials": {"shard_tokens": 1500, "special_tokens": ["<eos>"]},
    "bpe": {"tokenizer": "bpe", "vocab_size": 320, "shard_tokens": 1500},
}


@pytest.mark.parametrize("name", sorted(TOKENIZERS))
def test_parts_and_workers_give_the_serial_shards_byte_for_byte(name, docs, tmp_path):
    config = DataConfig(source=str(docs), **TOKENIZERS[name])
    serial = tmp_path / "serial"
    prepare(config, serial, cache_dir=tmp_path / "cache")
    corpus = download(config, tmp_path / "cache")
    runs = {
        "2 workers, 600-byte parts": dict(workers=2, part_bytes=600),
        "2 workers, 40-byte parts": dict(workers=2, part_bytes=40),
        "2 workers, 1 part per split": dict(workers=2, part_bytes=10**9),
    }
    for label, options in runs.items():
        out = tmp_path / label.replace(" ", "-").replace(",", "")
        prepare(config, out, cache_dir=tmp_path / "cache", **options)
        assert _files(out) == _files(serial), label
    one_worker = tmp_path / "one-worker"
    prepare_parts(corpus, config, tmp_path / "vocab", tmp_path / "parts", one_worker, workers=1, part_bytes=333)
    assert _files(one_worker) == _files(serial)
    # Plain characters are encoded straight into the shard files; the others go through part files.
    assert bool(list((tmp_path / "parts").iterdir())) == (name != "char")
    assert len(read_json(serial / "manifest.json")["splits"]["train"]["files"]) > 1  # the layout is exercised


def test_parts_cover_each_split_and_cut_before_a_newline_after_a_visible_character(docs, tmp_path):
    config = DataConfig(source=str(docs))
    corpus = download(config, tmp_path / "cache")
    parts = plan_parts(corpus, config, part_bytes=500)
    data = open(corpus["path"], "rb").read()
    assert len(parts) > 10 and [p["index"] for p in parts] == list(range(len(parts)))
    for split in ("train", "val"):
        mine = [p for p in parts if p["split"] == split]
        assert all(a["stop"] == b["start"] for a, b in zip(mine, mine[1:]))
        for part in mine[:-1]:
            assert part["stop"] - part["start"] >= 500
            assert data[part["stop"] : part["stop"] + 1] == b"\n" and 0x21 <= data[part["stop"] - 1] <= 0x7E
    assert parts[0]["start"] == 0 and parts[-1]["stop"] == corpus["bytes"]
    train_stop = max(p["stop"] for p in parts if p["split"] == "train")
    cut_char = prepare(config, tmp_path / "out", cache_dir=tmp_path / "cache")["split_char"]
    assert len(data[:train_stop].decode("utf-8")) == cut_char


def test_char_counts_of_the_parts_add_up_to_the_whole_corpus(docs, tmp_path):
    config = DataConfig(source=str(docs))
    corpus = download(config, tmp_path / "cache")
    parts = plan_parts(corpus, config, part_bytes=300)
    whole = count_chars([open(corpus["path"], encoding="utf-8", newline="").read()])
    assert np.array_equal(add_counts(count_part(corpus, p) for p in parts), whole)


def test_bpe_is_trained_on_a_bounded_sample_from_the_start_of_train(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text("aaaa bbbb\n" * 300 + "zzzz yyyy\n" * 300, encoding="utf-8")
    prepare(
        DataConfig(source=str(source), tokenizer="bpe", vocab_size=270, bpe_train_chars=1000),
        tmp_path / "out",
        cache_dir=tmp_path / "cache",
    )
    tok = load_tokenizer(tmp_path / "out")
    assert len(tok.encode("aaaa bbbb")) < len("aaaa bbbb") / 2  # merged: it was in the sample
    assert len(tok.encode("zzzz")) == 4  # never merged: only after the first 1000 characters


@pytest.fixture(scope="module")
def tokenizer_json(tmp_path_factory):
    """A byte-level BPE tokenizer.json with <|endoftext|>, built here (like GPT-2's, but small)."""
    rng = random.Random(3)
    tok = BPETokenizer.train(iter([_mixed_text(rng, 3000)]), 400, ["<|endoftext|>"])
    directory = tmp_path_factory.mktemp("tokenizer")
    tok.save(directory)
    return directory / "tokenizer.json"


def test_an_existing_tokenizer_file_encodes_the_shards_like_nanogpt_owt(docs, tokenizer_json, tmp_path, capsys):
    out = tmp_path / "out"
    args = [
        "prepare",
        "--source",
        str(docs),
        "--tokenizer-file",
        str(tokenizer_json),
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "cache"),
    ]
    assert main(args) == 0
    manifest = read_json(out / "manifest.json")
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400 and manifest["tokenizer"]["type"] == "bpe"
    tok = load_tokenizer(out)
    assert tok.encode("<|endoftext|>").tolist() == [
        BPETokenizer.from_file(tokenizer_json, []).encode("<|endoftext|>")[0]
    ]
    texts = [p.read_bytes().decode("utf-8") for p in sorted(docs.iterdir())]
    ids = np.concatenate(
        [
            np.fromfile(out / f["name"], dtype=np.uint16)
            for split in ("train", "val")
            for f in manifest["splits"][split]["files"]
        ]
    )
    assert tok.decode(ids) == "<|endoftext|>".join(texts)
    parallel = tmp_path / "parallel"
    assert (
        main(
            args[:-4]
            + ["--out", str(parallel), "--cache-dir", str(tmp_path / "cache"), "--workers", "2", "--part-mb", "0.001"]
        )
        == 0
    )
    assert _files(parallel) == _files(out)


def _write_json(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


BAD_TOKENIZER_INPUTS = {
    "missing file": (
        lambda t, j: ["--tokenizer-file", str(t / "none.json")],
        "does not exist; pass an existing tokenizer.json",
    ),
    "not a tokenizer": (
        lambda t, j: ["--tokenizer-file", _write_json(t, "x.json", '{"a": 1}')],
        "is not a Hugging Face tokenizer.json",
    ),
    "no separator token": (
        lambda t, j: ["--tokenizer-file", str(j), "--special-tokens", "<pad>"],
        "has no token for <pad>",
    ),
    "char tokenizer": (
        lambda t, j: ["--tokenizer-file", str(j), "--tokenizer", "char"],
        "--tokenizer-file loads a BPE tokenizer; add --tokenizer bpe",
    ),
    "zero workers": (lambda t, j: ["--workers", "0"], "--workers 0 must be at least 1"),
}


@pytest.mark.parametrize("case", sorted(BAD_TOKENIZER_INPUTS))
def test_bad_tokenizer_and_worker_options_are_one_line_errors_before_any_work(
    case, docs, tokenizer_json, tmp_path, capsys
):
    args, message = BAD_TOKENIZER_INPUTS[case]
    out = tmp_path / "out"
    code = main(
        [
            "prepare",
            "--source",
            str(docs),
            "--out",
            str(out),
            "--cache-dir",
            str(tmp_path / "cache"),
            *args(tmp_path, tokenizer_json),
        ]
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("cortexcraft prepare: error: ") and message in err[0], err
    assert not out.exists() and not (tmp_path / "cache").exists()


def test_local_parquet_rows_are_documents(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "STREAM_BATCH_ROWS", 3)  # several batches per row group
    directory = tmp_path / "owt"
    directory.mkdir()
    texts = [f"document {i} — ünïcode 😀\nsecond line" for i in range(20)]
    pq.write_table(
        pa.table({"text": texts[:12], "id": list(range(12))}), directory / "part-0.parquet", row_group_size=5
    )
    pq.write_table(pa.table({"text": texts[12:], "id": list(range(12, 20))}), directory / "part-1.parquet")
    corpus = download(DataConfig(source=str(directory), separator="|"), tmp_path / "cache")
    assert corpus["documents"] == 20 and open(corpus["path"], encoding="utf-8").read() == "|".join(texts)
    limited = download(DataConfig(source=str(directory / "part-0.parquet"), max_docs=4), tmp_path / "cache")
    assert limited["documents"] == 4
    with pytest.raises(CortexCraftError, match="has no column 'body'.*pass --text-column NAME"):
        download(DataConfig(source=str(directory), text_column="body"), tmp_path / "cache")


def test_dask_runner_without_prefect_dask_says_how_to_install_it(monkeypatch, tmp_path):
    import sys

    from flows.params import PipelineParams
    from flows.prepare import parts_task_runner

    monkeypatch.setitem(sys.modules, "prefect_dask", None)  # what an install without the extra gives
    with pytest.raises(CortexCraftError, match=r"--task-runner dask needs prefect-dask; install it with .*\[dask\]"):
        parts_task_runner(PipelineParams(data_dir=str(tmp_path), task_runner="dask"), 2)


def test_only_the_workers_that_finish_sooner_encode():
    assert workers_that_pay(10 * CHAR_BYTES_PER_WORKER, "bpe", 8) == 1  # the tokenizer's threads use every core
    assert workers_that_pay(CHAR_BYTES_PER_WORKER - 1, "char", 2) == 1
    assert workers_that_pay(2 * CHAR_BYTES_PER_WORKER, "char", 2) == 2
    assert workers_that_pay(3 * CHAR_BYTES_PER_WORKER, "char", 8) == 3
    assert workers_that_pay(100 * CHAR_BYTES_PER_WORKER, "char", 4) == 4


@pytest.mark.parametrize("name", ["char", "bpe"])
def test_workers_on_a_small_corpus_encode_in_one_process(name, docs, tmp_path, caplog):
    config = DataConfig(source=str(docs), **TOKENIZERS[name])
    serial = prepare(config, tmp_path / "serial", cache_dir=tmp_path / "cache")
    with caplog.at_level(logging.INFO, logger="cortexcraft.prepare"):
        assert prepare(config, tmp_path / "two", cache_dir=tmp_path / "cache", workers=2) == serial
    assert f"encoding with 1 of 2 workers: on 0 MB of {name} text more would not finish sooner" in caplog.text
    assert _files(tmp_path / "two") == _files(tmp_path / "serial")


def test_pipeline_parts_run_where_they_pay_or_where_asked(tmp_path):
    from flows.params import PIPELINE_CHAR_BYTES_PER_WORKER, PipelineParams

    def in_parts(corpus_bytes, **params):
        return PipelineParams(data_dir=str(tmp_path), **params).in_parts(corpus_bytes)

    assert not in_parts(10**6, workers=2)
    assert not in_parts(2 * CHAR_BYTES_PER_WORKER, workers=2)  # the task runner takes seconds to start
    assert in_parts(2 * PIPELINE_CHAR_BYTES_PER_WORKER, workers=2)
    assert not in_parts(10**12, workers=2, overrides=["tokenizer=bpe"])
    assert in_parts(10**6, workers=2, part_mb=0.2)  # a part size asks for parts
    assert in_parts(10**6, task_runner="dask")  # Dask workers may be other machines
    assert not in_parts(10**12)


def test_default_parts_keep_every_worker_busy_to_the_end():
    assert balanced_part_bytes(500_000_000, 2) == 31_250_000  # 16 parts: 8 for each worker
    assert balanced_part_bytes(10**12, 2) == PART_BYTES  # OpenWebText-size corpora keep 64 MB parts
    assert balanced_part_bytes(1000, 4) == 1 << 20  # tiny corpora are not cut into crumbs


def test_a_part_that_does_not_fill_its_promised_place_is_a_one_line_error(docs, tmp_path):
    config = DataConfig(source=str(docs))
    corpus = download(config, tmp_path / "cache")
    part = plan_parts(corpus, config, part_bytes=500)[0]
    counts = count_part(corpus, part)
    vocab = build_vocab(corpus, config, tmp_path / "vocab", char_counts=add_counts([counts]))
    tokens = int(counts[1].sum())
    shard = tmp_path / "shard.bin"
    shard.write_bytes(bytes(4 * tokens))
    assert encode_part_in_place(vocab["dir"], corpus, part, [(str(shard), 0, tokens)]) == tokens
    with pytest.raises(
        CortexCraftError,
        match=rf"^part 0 encodes to more than the {tokens - 1:,} tokens its characters "
        r"promised; prepare again with --workers 1$",
    ):
        encode_part_in_place(vocab["dir"], corpus, part, [(str(shard), 0, tokens - 1)])
    with pytest.raises(
        CortexCraftError,
        match=rf"^part 0 encoded to {tokens:,} tokens, not the {tokens + 1:,} its "
        r"characters promised; prepare again with --workers 1$",
    ):
        encode_part_in_place(vocab["dir"], corpus, part, [(str(shard), 0, tokens + 1)])


ENCODE_THREADS = """
import os, sys
from pathlib import Path
from cortexcraft.tokenizer import limit_encode_threads, load_tokenizer
limit_encode_threads(int(sys.argv[2]))
tok = load_tokenizer(Path(sys.argv[1]))
before = len(os.listdir("/proc/self/task"))
tok.encode_batch(["a few words of text to encode, " * 20] * 4000)
print(len(os.listdir("/proc/self/task")) - before)
"""


@pytest.mark.skipif(not os.path.isdir("/proc/self/task"), reason="counts threads in Linux's /proc")
@pytest.mark.parametrize("threads", [1, 3])
def test_a_worker_encodes_bpe_with_its_share_of_the_threads(tokenizer_json, threads):
    """Issue 20: each worker got one tokenizer thread per core, so 2 workers were slower than 1."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAYON_NUM_THREADS", "TOKENIZERS_PARALLELISM")}
    out = subprocess.run([sys.executable, "-c", ENCODE_THREADS, str(tokenizer_json.parent), str(threads)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    # One thread encodes in the calling thread; more start a pool of exactly that many.
    assert int(out.stdout.strip().splitlines()[-1]) == (0 if threads == 1 else threads)


def test_workers_divide_the_cores():
    cores = available_cores()
    assert threads_per_worker(1) == cores
    assert threads_per_worker(cores) == 1
    assert threads_per_worker(cores + 5) == 1
