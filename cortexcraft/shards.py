"""Token shards: the corpus encoded into raw little-endian id files, split train/val, with a manifest.

A shard reads back with a bare ``np.memmap(path, dtype, mode="r")`` (like nanoGPT's train.bin).
``write_shards`` builds the whole directory in a temp dir beside ``out_dir`` and renames it into
place, so a killed run never leaves a directory ``verify_shards`` accepts.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import numpy as np

from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, build_dir, read_json, sha256_file
from cortexcraft.sources import char_to_byte_offset, corpus_ascii_blocks, corpus_byte_range_text, train_val_cut
from cortexcraft.tokenizer import BPETokenizer, CharTokenizer, Tokenizer, load_tokenizer

SHARDS_FORMAT = "cortexcraft-shards/1"
SPLITS = ("train", "val")
MANIFEST = "manifest.json"
# BPE is encoded in pieces of about this many characters, this many pieces per batch call.
BPE_PIECE_CHARS = 1 << 16
BPE_BATCH_PIECES = 32


def _safe_pieces(chunks: Iterable[str]) -> Iterator[str]:
    """The text of ``chunks`` re-cut so every piece encodes to the ids it has inside the whole text.

    Each chunk is cut just before its last newline between two non-space characters: BPE's
    byte-level pre-tokenizer never joins pieces across that point (a whitespace run before it
    would join the newline when a special token follows), and special tokens (no whitespace)
    cannot straddle it. The rest is carried into the next chunk."""
    carry = ""
    for chunk in chunks:
        text = carry + chunk
        cut = len(text)
        position = text.rfind("\n")
        while position > 0 and (
            position + 1 >= len(text) or text[position + 1].isspace() or text[position - 1].isspace()
        ):
            position = text.rfind("\n", 0, position)
        if position > 0:
            cut = position
        carry = text[cut:]
        yield text[:cut]
    if carry:
        yield carry


def _slices(chunks: Iterable[str], size: int) -> Iterator[str]:
    for chunk in chunks:
        yield from (chunk[start : start + size] for start in range(0, len(chunk), size))


def _encode_stream(tok: Tokenizer, chunks: Iterable[str]) -> Iterator[np.ndarray]:
    """Encode text chunks so the ids equal encoding the whole text at once. BPE goes through the
    tokenizers batch API (all cores) in small pieces, so memory stays bounded."""
    if isinstance(tok, CharTokenizer) and not tok.special_tokens:
        # One id per character: every cut is safe, and looking for safe cuts took a quarter of the time.
        yield from map(tok.encode, chunks)
        return
    if not isinstance(tok, BPETokenizer):
        yield from map(tok.encode, _safe_pieces(chunks))
        return
    pieces = _safe_pieces(_slices(chunks, BPE_PIECE_CHARS))
    while batch := list(itertools.islice(pieces, BPE_BATCH_PIECES)):
        yield from tok.encode_batch(batch)


def encode_range(tok: Tokenizer, corpus: dict, start: int, stop: int) -> Iterator[np.ndarray]:
    """The ids of corpus bytes ``[start, stop)``, a split or a part of one (see ``cortexcraft.parts``)."""
    # An ASCII corpus (one byte per character) is encoded from its bytes, never decoded: 1.2x faster.
    if isinstance(tok, CharTokenizer) and tok.encodes_ascii_bytes and corpus["chars"] == corpus["bytes"]:
        return map(tok.encode_ascii, corpus_ascii_blocks(corpus, start, stop))
    return _encode_stream(tok, corpus_byte_range_text(corpus, start, stop))


def split_ranges(corpus: dict, data_cfg: DataConfig) -> tuple[int, dict[str, tuple[int, int]]]:
    """The train/val cut as a character offset, and each split's byte range in the corpus file."""
    cut = train_val_cut(corpus, data_cfg.val_fraction)
    cut_byte = char_to_byte_offset(corpus, cut)
    return cut, {"train": (0, cut_byte), "val": (cut_byte, corpus["bytes"])}


class _SplitWriter:
    """Writes one split as files of at most ``shard_tokens`` ids, hashing them on the way."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.directory, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.files: list[dict] = []
        self._handle = None

    def _open_next(self) -> None:
        self._close()
        name = shard_file_name(self.split, len(self.files))
        self._handle = open(self.directory / name, "wb")
        self._digest = hashlib.sha256()
        self.files.append({"name": name, "tokens": 0, "sha256": None})

    def _close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()
            self.files[-1]["sha256"] = self._digest.hexdigest()
            self._handle = None

    def write(self, ids: np.ndarray) -> None:
        data = ids.astype(self.dtype.newbyteorder("<"), copy=False)
        while data.size:
            if self._handle is None or self.files[-1]["tokens"] == self.shard_tokens:
                self._open_next()
            room = self.shard_tokens - self.files[-1]["tokens"]
            piece = memoryview(data[:room])
            self._handle.write(piece)
            self._digest.update(piece)
            self.files[-1]["tokens"] += len(piece)
            data = data[room:]

    def finish(self) -> dict:
        self._close()
        return {"tokens": sum(f["tokens"] for f in self.files), "files": self.files}

    def __enter__(self) -> "_SplitWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        # Still open only after a failure: close it (its flush may fail again) so that deleting
        # the partial file frees its space at once.
        if self._handle is not None:
            with contextlib.suppress(OSError):
                self._handle.close()
            self._handle = None


def check_out_dir(out_dir: Path) -> None:
    """Refuse to replace a path that is not ours: a file, or a non-empty non-shard directory."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise CortexCraftError(f"--out {out_dir} is a file; choose a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise CortexCraftError(
            f"--out {out_dir} is a non-empty directory without a shard manifest; choose a new or empty directory"
        )


def shard_file_name(split: str, index: int) -> str:
    return f"{split}_{index:03d}.bin"


def write_shards(corpus: dict, vocab: dict, data_cfg: DataConfig, out_dir: Path) -> dict:
    """Encode the corpus with the tokenizer of ``vocab`` into ``out_dir``; returns the manifest.

    Train is the first ``1 - val_fraction`` of the characters (see ``sources.train_val_cut``)."""

    def write_split(directory: Path, split: str, tok: Tokenizer, start: int, stop: int) -> dict:
        with _SplitWriter(directory, split, tok.dtype, data_cfg.shard_tokens) as writer:
            for ids in encode_range(tok, corpus, start, stop):
                writer.write(ids)
            return writer.finish()

    return build_shard_dir(corpus, vocab, data_cfg, out_dir, write_split)


def _fill_shard_dir(
    tmp: Path,
    tok: Tokenizer,
    corpus: dict,
    data_cfg: DataConfig,
    write_split: Callable[[Path, str, Tokenizer, int, int], dict],
) -> dict:
    """Write the tokenizer, both splits and the manifest into ``tmp``; returns the manifest."""
    section = tok.save(tmp)
    cut, ranges = split_ranges(corpus, data_cfg)
    splits = {}
    for split in SPLITS:
        splits[split] = write_split(tmp, split, tok, *ranges[split])
        if splits[split]["tokens"] < 2:
            raise CortexCraftError(
                f"the {split} split encodes to {splits[split]['tokens']} tokens; "
                f"use a larger corpus or another --val-fraction"
            )
    manifest = {
        "format": SHARDS_FORMAT,
        "tokenizer": section,
        "vocab_size": tok.vocab_size,
        "dtype": tok.dtype.name,
        "splits": splits,
        "split_char": cut,
        "source": {
            key: corpus.get(key) for key in ("spec", "origin", "fingerprint", "sha256", "documents", "chars", "bytes")
        },
        "data_config": data_cfg.model_dump(mode="json"),
    }
    atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


def build_shard_dir(
    corpus: dict,
    vocab: dict,
    data_cfg: DataConfig,
    out_dir: Path,
    write_split: Callable[[Path, str, Tokenizer, int, int], dict],
) -> dict:
    """Build ``out_dir`` in a temp dir: the tokenizer, each split's files from
    ``write_split(dir, split, tokenizer, start_byte, stop_byte)`` (-> ``{"tokens", "files"}``), the
    manifest; then rename it into place. Returns the manifest."""
    out_dir = Path(out_dir)
    check_out_dir(out_dir)
    tok = load_tokenizer(Path(vocab["dir"]))
    train_val_cut(corpus, data_cfg.val_fraction)  # a split too small fails before anything is written
    if Path(corpus["path"]).stat().st_size != corpus["bytes"]:
        raise CortexCraftError(f"corpus {corpus['path']} changed since it was read; re-run `cortexcraft prepare`")
    # A character tokenizer writes one id per character; a BPE one fewer, by an unknown factor.
    needed = corpus["chars"] * tok.dtype.itemsize if isinstance(tok, CharTokenizer) else None
    with build_dir(out_dir, needed, approximate=True) as tmp:
        manifest = _fill_shard_dir(tmp, tok, corpus, data_cfg, write_split)
    return manifest


def verify_shards(data_dir: Path, check_hashes: bool = False) -> dict:
    """The manifest of ``data_dir`` after checking every file it lists (sizes always, sha256 on
    demand); CortexCraftError naming the file, the problem and the fix otherwise."""
    data_dir = Path(data_dir)
    fix = f"re-run `cortexcraft prepare --out {data_dir}`"
    if not data_dir.is_dir():
        raise CortexCraftError(
            f"shard directory {data_dir} does not exist; run `cortexcraft prepare --out {data_dir}` first"
        )
    path = data_dir / MANIFEST
    if not path.is_file():
        raise CortexCraftError(f"{path} is missing (prepare did not finish); {fix}")
    try:
        manifest = read_json(path)
        if manifest.get("format") != SHARDS_FORMAT:
            raise CortexCraftError(f"{path} has format {manifest.get('format')!r}, expected {SHARDS_FORMAT!r}; {fix}")
        itemsize = np.dtype(manifest["dtype"]).itemsize
        tokenizer_file = data_dir / manifest["tokenizer"]["file"]
        checks = [(tokenizer_file, None, manifest["tokenizer"]["sha256"])]
        for split in SPLITS:
            info = manifest["splits"][split]
            if sum(f["tokens"] for f in info["files"]) != info["tokens"]:
                raise CortexCraftError(f"{path}: the {split} files do not add up to {info['tokens']:,} tokens; {fix}")
            checks += [(data_dir / f["name"], f["tokens"] * itemsize, f["sha256"]) for f in info["files"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise CortexCraftError(f"{path} is not a valid shard manifest ({type(exc).__name__}: {exc}); {fix}") from None
    for file, size, sha in checks:
        if not file.is_file():
            raise CortexCraftError(f"{file} listed in {MANIFEST} is missing; {fix}")
        if size is not None and file.stat().st_size != size:
            raise CortexCraftError(f"{file} is {file.stat().st_size:,} bytes, the manifest says {size:,}; {fix}")
        if check_hashes and sha256_file(file) != sha:
            raise CortexCraftError(f"{file} does not match its sha256 in {MANIFEST}; {fix}")
    return manifest
