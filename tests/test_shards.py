"""Token shards: layout, split rule, multi-file splits, atomic replacement, verification."""
from __future__ import annotations

import numpy as np
import pytest

from cortexcraft import sources
from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import read_json, sha256_file
from cortexcraft.prepare import prepare
from cortexcraft.shards import verify_shards, write_shards
from cortexcraft.sources import download
from cortexcraft.tokenizer import build_vocab, load_tokenizer

TEXT = "".join(f"line {i}: the quick brown fox — 😀 jumps\n" for i in range(300))


def _read_split(directory, manifest, split):
    files = manifest["splits"][split]["files"]
    return np.concatenate([np.memmap(directory / f["name"], dtype=manifest["dtype"], mode="r") for f in files])


def _prepare_text(tmp_path, text=TEXT, name="out", **fields):
    source = tmp_path / "corpus.txt"
    source.write_text(text, encoding="utf-8", newline="")
    return prepare(DataConfig(source=str(source), **fields), tmp_path / name, cache_dir=tmp_path / "cache")


def test_shards_hold_the_split_token_stream_and_decode_back(tmp_path):
    manifest = _prepare_text(tmp_path, shard_tokens=1000)
    out = tmp_path / "out"
    cut = int(len(TEXT) * 0.9)
    assert manifest["splits"]["train"]["tokens"] == cut and manifest["splits"]["val"]["tokens"] == len(TEXT) - cut
    assert len(manifest["splits"]["train"]["files"]) == -(-cut // 1000)
    assert all(f["tokens"] <= 1000 for f in manifest["splits"]["train"]["files"])
    tok = load_tokenizer(out)
    train, val = _read_split(out, manifest, "train"), _read_split(out, manifest, "val")
    assert tok.decode(train) + tok.decode(val) == TEXT
    assert manifest == verify_shards(out, check_hashes=True) == read_json(out / "manifest.json")
    assert manifest["source"]["sha256"] == sha256_file(tmp_path / "corpus.txt")


def test_bpe_shards_equal_whole_text_encoding_across_read_chunks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 997)  # many chunk boundaries inside the corpus
    manifest = _prepare_text(tmp_path, tokenizer="bpe", vocab_size=300)
    out = tmp_path / "out"
    tok = load_tokenizer(out)
    cut = manifest["split_char"]
    assert np.array_equal(_read_split(out, manifest, "train"), tok.encode(TEXT[:cut]))
    assert np.array_equal(_read_split(out, manifest, "val"), tok.encode(TEXT[cut:]))


def test_split_moves_to_the_nearest_document_boundary(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i, size in enumerate([50, 30, 15, 5]):
        (docs / f"{i}.txt").write_text(str(i) * size, encoding="utf-8")
    config = DataConfig(source=str(docs), val_fraction=0.3, separator="|")
    manifest = prepare(config, tmp_path / "out", cache_dir=tmp_path / "cache")
    tok = load_tokenizer(tmp_path / "out")
    train = tok.decode(_read_split(tmp_path / "out", manifest, "train"))
    val = tok.decode(_read_split(tmp_path / "out", manifest, "val"))
    # 103 chars, int(103 * 0.7) = 72; document starts are 0, 51, 82, 98 -> 82 is nearest
    assert train == "0" * 50 + "|" + "1" * 30 + "|" and val == "2" * 15 + "|" + "3" * 5
    assert manifest["source"]["documents"] == 4


def test_a_split_too_small_is_an_error_before_anything_is_written(tmp_path):
    with pytest.raises(CortexCraftError, match="leaves the val split with 1 characters.*--val-fraction"):
        _prepare_text(tmp_path, text="abcdefghij", val_fraction=0.1)
    assert not (tmp_path / "out").exists()


def _write(tmp_path, corpus_path, out):
    config = DataConfig(source=str(corpus_path))
    corpus = download(config, tmp_path / "cache")
    vocab = build_vocab(corpus, config, tmp_path / "vocab")
    return corpus, vocab, write_shards(corpus, vocab, config, out)


def test_a_failed_rewrite_leaves_the_previous_directory_intact(tmp_path):
    corpus_path = tmp_path / "corpus.txt"
    corpus_path.write_text(TEXT, encoding="utf-8")
    out = tmp_path / "out"
    corpus, vocab, before = _write(tmp_path, corpus_path, out)
    hashes = {p.name: sha256_file(p) for p in out.iterdir()}
    # Same size, but invalid UTF-8 near the end: encoding fails after train shards are written.
    data = bytearray(corpus_path.read_bytes())
    data[-3:] = b"\xff\xfe\xff"
    corpus_path.write_bytes(bytes(data))
    with pytest.raises(CortexCraftError, match="is not UTF-8 text"):
        write_shards(corpus, vocab, DataConfig(source=str(corpus_path)), out)
    assert {p.name: sha256_file(p) for p in out.iterdir()} == hashes
    assert verify_shards(out, check_hashes=True) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "out", "vocab"]  # no temp dir left


def test_out_dir_that_is_not_a_shard_directory_is_refused(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(CortexCraftError, match="non-empty directory without a shard manifest"):
        _prepare_text(tmp_path)
    assert (out / "notes.txt").read_text() == "mine"


@pytest.fixture
def shard_dir(tmp_path):
    _prepare_text(tmp_path)
    return tmp_path / "out"


def test_verify_reports_a_missing_directory(tmp_path):
    with pytest.raises(CortexCraftError, match=r"does not exist; run `cortexcraft prepare --out"):
        verify_shards(tmp_path / "nope")


def test_verify_reports_a_missing_manifest(shard_dir):
    (shard_dir / "manifest.json").unlink()
    with pytest.raises(CortexCraftError, match=r"manifest.json is missing \(prepare did not finish\); re-run"):
        verify_shards(shard_dir)


def test_verify_reports_a_truncated_shard(shard_dir):
    shard = shard_dir / "train_000.bin"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(CortexCraftError, match=r"train_000.bin is [\d,]+ bytes, the manifest says [\d,]+; re-run"):
        verify_shards(shard_dir)


def test_verify_reports_a_changed_shard_only_when_hashing(shard_dir):
    shard = shard_dir / "val_000.bin"
    data = bytearray(shard.read_bytes())
    data[0] ^= 1
    shard.write_bytes(bytes(data))
    verify_shards(shard_dir)
    with pytest.raises(CortexCraftError, match="val_000.bin does not match its sha256"):
        verify_shards(shard_dir, check_hashes=True)


def test_verify_reports_a_missing_shard_and_a_corrupt_manifest(shard_dir):
    (shard_dir / "val_000.bin").unlink()
    with pytest.raises(CortexCraftError, match="val_000.bin listed in manifest.json is missing"):
        verify_shards(shard_dir)
    (shard_dir / "manifest.json").write_text("{not json")
    with pytest.raises(CortexCraftError, match="is not a valid shard manifest"):
        verify_shards(shard_dir)


def test_bpe_document_separator_is_one_special_token(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"{i}.txt").write_text(f"Document number {i}.\nIt has two lines.", encoding="utf-8")
    manifest = prepare(DataConfig(source=str(docs), tokenizer="bpe", vocab_size=280), tmp_path / "out",
                       cache_dir=tmp_path / "cache")
    tok = load_tokenizer(tmp_path / "out")
    (separator,) = tok.encode("<|endoftext|>")
    ids = np.concatenate([_read_split(tmp_path / "out", manifest, split) for split in ("train", "val")])
    assert (ids == separator).sum() == 5
    assert tok.decode(ids) == "<|endoftext|>".join(f"Document number {i}.\nIt has two lines." for i in range(6))


ASCII_TEXT = "".join(f"{i} To be, or not to be:\r\nthat is the question.\n" for i in range(400))


def test_ascii_shards_equal_whole_text_encoding_across_read_blocks(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "READ_BYTES", 997)  # many block boundaries inside each split
    manifest = _prepare_text(tmp_path, ASCII_TEXT, shard_tokens=2000)
    out = tmp_path / "out"
    ids = load_tokenizer(out).encode(ASCII_TEXT)
    cut = manifest["split_char"]
    assert manifest["source"]["chars"] == manifest["source"]["bytes"] == len(ASCII_TEXT)
    assert np.array_equal(_read_split(out, manifest, "train"), ids[:cut])
    assert np.array_equal(_read_split(out, manifest, "val"), ids[cut:])


def test_an_ascii_corpus_edited_after_download_is_refused_not_mis_encoded(tmp_path):
    source = tmp_path / "corpus.txt"
    source.write_text(ASCII_TEXT, encoding="utf-8", newline="")
    config = DataConfig(source=str(source))
    corpus = download(config, tmp_path / "cache")
    vocab = build_vocab(corpus, config, tmp_path / "vocab")
    source.write_bytes(ASCII_TEXT[:-2].encode() + "é".encode())  # same size, no longer ASCII
    with pytest.raises(CortexCraftError, match="changed since it was read"):
        write_shards(corpus, vocab, config, tmp_path / "out")
    assert not (tmp_path / "out").exists()
