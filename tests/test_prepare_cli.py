"""`cortexcraft prepare` end to end: nanoGPT's Tiny Shakespeare split, and every bad input failing
with one line while the previous output stays intact."""
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from cortexcraft.cli import main
from cortexcraft.fileio import read_json, sha256_file
from cortexcraft.shards import verify_shards
from cortexcraft.tokenizer import load_tokenizer


def test_prepare_tiny_shakespeare_matches_nanogpt(tmp_path, tinyshakespeare_path, capsys):
    out = tmp_path / "shakespeare"
    assert main(["prepare", "--source", str(tinyshakespeare_path), "--out", str(out)]) == 0
    assert "vocab_size 65, train 1,003,854 tokens, val 111,540 tokens" in capsys.readouterr().err
    manifest = verify_shards(out, check_hashes=True)
    assert manifest["vocab_size"] == 65 and manifest["dtype"] == "uint8"
    assert (manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"]) == (1_003_854, 111_540)
    tok = load_tokenizer(out)
    train = np.memmap(out / "train_000.bin", dtype=np.uint8, mode="r")
    val = np.memmap(out / "val_000.bin", dtype=np.uint8, mode="r")
    assert (tok.decode(train) + tok.decode(val)).encode("utf-8") == tinyshakespeare_path.read_bytes()


@pytest.fixture
def previous(tmp_path):
    """A directory from a successful earlier prepare, with the hashes of its files."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("To be, or not to be, that is the question.\n" * 20, encoding="utf-8")
    out = tmp_path / "out"
    assert main(["prepare", "--source", str(corpus), "--out", str(out)]) == 0
    return out, {p.name: sha256_file(p) for p in out.iterdir()}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _write(tmp_path, name, data: bytes) -> str:
    (tmp_path / name).write_bytes(data)
    return str(tmp_path / name)


BAD_INPUTS = {
    "missing source": (lambda t: ["--source", str(t / "nope.txt")], "is not a known name"),
    "not utf-8": (lambda t: ["--source", _write(t, "latin1.txt", "café".encode("latin-1"))], "is not UTF-8 text"),
    "unreachable url": (
        lambda t: ["--source", f"http://127.0.0.1:{_closed_port()}/input.txt"],
        "cannot reach http://127.0.0.1",
    ),
    "bpe without size": (lambda t: ["--source", str(t / "corpus.txt"), "--tokenizer", "bpe"], "pass --vocab-size N"),
    "bpe size too small": (
        lambda t: ["--source", str(t / "corpus.txt"), "--tokenizer", "bpe", "--vocab-size", "100"],
        "use at least 257",
    ),
    "missing vocab file": (
        lambda t: ["--source", str(t / "corpus.txt"), "--vocab", str(t / "none.txt")],
        "does not exist; pass an existing vocab.txt",
    ),
    "vocab lacks chars": (
        lambda t: ["--source", str(t / "corpus.txt"), "--vocab", _write(t, "v.txt", b"Tobe ")],
        "characters missing from --vocab",
    ),
    "split too small": (
        lambda t: ["--source", _write(t, "tiny.txt", b"abcdefghij"), "--val-fraction", "0.95"],
        "leaves the train split with 0 characters",
    ),
    "bad special token": (
        lambda t: ["--source", str(t / "corpus.txt"), "--special-tokens", "x"],
        "must be at least 2 characters",
    ),
    "limits on one document": (
        lambda t: ["--source", str(t / "corpus.txt"), "--max-bytes", "100"],
        "is one document; drop them",
    ),
    "bad val fraction": (
        lambda t: ["--source", str(t / "corpus.txt"), "--val-fraction", "1.5"],
        "invalid config: data.val_fraction",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_keeps_the_previous_output(case, tmp_path, previous, capsys):
    out, hashes = previous
    args, message = BAD_INPUTS[case]
    capsys.readouterr()
    assert main(["prepare", *args(tmp_path), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cortexcraft prepare: error: ") and message in err[0]
    assert {p.name: sha256_file(p) for p in out.iterdir()} == hashes
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []


def test_out_path_that_is_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep")
    corpus = _write(tmp_path, "c.txt", b"hello world\n" * 10)
    assert main(["prepare", "--source", corpus, "--out", str(target)]) == 2
    assert "is a file; choose a directory path" in capsys.readouterr().err
    assert target.read_text() == "keep"


def test_rerun_replaces_the_directory_with_the_new_corpus(tmp_path, previous):
    out, _ = previous
    corpus = _write(tmp_path, "other.txt", "Ünïcödé text\n".encode() * 50)
    assert main(["prepare", "--source", corpus, "--out", str(out), "--special-tokens", "<eos>"]) == 0
    manifest = read_json(out / "manifest.json")
    assert manifest["source"]["sha256"] == sha256_file(corpus) and manifest["tokenizer"]["special_tokens"] == ["<eos>"]
    assert sorted(p.name for p in out.iterdir()) == [
        "manifest.json",
        "tokenizer.section.json",
        "train_000.bin",
        "val_000.bin",
        "vocab.txt",
    ]


def test_a_killed_prepare_leaves_the_previous_output_as_it_was(tmp_path, previous):
    out, hashes = previous
    big = tmp_path / "big.txt"
    with open(big, "wb") as handle:
        for _ in range(60):
            handle.write(b"All the world's a stage, and all the men and women merely players.\n" * 15_000)
    child = subprocess.Popen(
        [sys.executable, "-m", "cortexcraft", "prepare", "--source", str(big), "--out", str(out)],
        stderr=subprocess.DEVNULL,
    )
    try:
        # Kill it once it is writing train shards into its temp directory.
        while child.poll() is None and not any(
            p.stat().st_size for p in out.parent.glob(f".{out.name}.*.tmp/train_*.bin")
        ):
            time.sleep(0.002)
        assert child.poll() is None, "prepare finished before it could be killed; use a larger corpus"
        child.send_signal(signal.SIGKILL)
    finally:
        child.wait()
    assert {p.name: sha256_file(p) for p in out.iterdir()} == hashes
    verify_shards(out, check_hashes=True)
