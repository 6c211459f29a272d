"""Data preparation in parts: a corpus cut into byte ranges that are counted and encoded
independently (in parallel), then assembled into shards byte-identical to ``write_shards``.

A part is a byte range of one split of the corpus file. Every cut but the split's ends falls just
before a newline that follows a visible ASCII character: BPE's byte-level pre-tokenizer never joins
a non-space character with the whitespace after it, and pre-tokens are matched left to right with
lookahead only, so the text after the cut splits as it does inside the whole text; no special token
(no whitespace) straddles it either. So the ids of the parts, one after another, are the ids of the
whole split. Paragraph breaks (``"x\n\nY"``) qualify, which real corpora are full of. A worker
holds one read block at a time, so memory is bounded by the block size, not by the part or the
corpus.

``prepare_parts`` runs the plan with a process pool; the Prefect tasks in ``tasks/parts.py`` run
the same functions one part per task, each cached on its own.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from itertools import repeat
from pathlib import Path

import numpy as np

from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_open, sha256_file
from cortexcraft.shards import SPLITS, build_shard_dir, encode_range, shard_file_name, split_ranges
from cortexcraft.sources import COPY_BYTES, READ_BYTES, corpus_byte_range_text
from cortexcraft.tokenizer import (MAX_CODE_POINT, CharTokenizer, Tokenizer, build_vocab, count_chars,
                                   limit_encode_threads, load_tokenizer)

PART_BYTES = 64 << 20
# A worker pays for its start (a spawned process importing numpy and this package: 0.4 s on 2
# cores) only on enough text. One process encodes characters at ~130 MB/s, and 2 workers measured
# 0.38-0.40x of that on 25 MB, 0.78-0.82x on 100 MB and 1.15-1.18x on 200 MB.
CHAR_BYTES_PER_WORKER = 80_000_000
# Parts per worker when the size is left to prepare_parts: fewer leave a worker idle at the end
# while the other finishes a big part (with 9 parts of 64 MB on 2 workers, up to an eighth).
PARTS_PER_WORKER = 8
# A safe cut: a newline after a visible ASCII character (never whitespace, never part of a
# multi-byte character); the cut goes before the newline.
_SAFE_CUT = re.compile(rb"[\x21-\x7e]\n")


def _next_cut(handle, position: int, stop: int) -> int:
    """The first safe cut at or after ``position`` and before ``stop``; ``stop`` when there is none."""
    position -= 1  # the character before the newline
    while position + 1 < stop:
        handle.seek(position)
        block = handle.read(min(READ_BYTES, stop - position))
        match = _SAFE_CUT.search(block)
        if match is not None and position + match.start() + 1 < stop:
            return position + match.start() + 1
        if len(block) < 2:
            break
        position += len(block) - 1
    return stop


def plan_parts(corpus: dict, data_cfg: DataConfig, part_bytes: int = PART_BYTES) -> list[dict]:
    """Parts of about ``part_bytes`` covering each split, in corpus order:
    ``{"split", "index", "start", "stop"}`` (byte offsets into the corpus file)."""
    if part_bytes < 1:
        raise CortexCraftError(f"part size {part_bytes} must be at least 1 byte; use e.g. --part-mb 64")
    _, ranges = split_ranges(corpus, data_cfg)
    parts = []
    with open(corpus["path"], "rb") as handle:
        for split in SPLITS:
            start, stop = ranges[split]
            while start < stop:
                end = _next_cut(handle, start + part_bytes, stop)
                parts.append({"split": split, "index": len(parts), "start": start, "stop": end})
                start = end
    return parts


def count_part(corpus: dict, part: dict) -> np.ndarray:
    """Character counts of one part as a (2, k) array: code points, then their counts."""
    counts = count_chars(corpus_byte_range_text(corpus, part["start"], part["stop"]))
    present = np.flatnonzero(counts)
    return np.stack([present, counts[present]])


def add_counts(sparse_counts: Iterable[np.ndarray]) -> np.ndarray:
    """The reduce of ``count_part``: dense counts of every code point, as ``count_chars`` gives."""
    total = np.zeros(MAX_CODE_POINT + 1, dtype=np.int64)
    for sparse in sparse_counts:
        np.add.at(total, sparse[0], sparse[1])
    return total


def encode_part(vocab_dir: str, corpus: dict, part: dict, out_path: str, encode_threads: int | None = None) -> dict:
    """Write the raw ids of one part to ``out_path``; returns the part with ``tokens`` and ``path``.
    ``encode_threads`` caps a BPE tokenizer's threads in this (worker) process."""
    if encode_threads is not None:
        limit_encode_threads(encode_threads)
    tok = load_tokenizer(Path(vocab_dir))
    tokens = 0
    with atomic_open(out_path) as handle:
        for ids in encode_range(tok, corpus, part["start"], part["stop"]):
            handle.write(memoryview(ids.astype(tok.dtype.newbyteorder("<"), copy=False)))
            tokens += ids.size
    return dict(part, tokens=tokens, path=str(out_path))


def copy_tokens(out_path: str, pieces: list[tuple[str, int, int]], itemsize: int) -> str:
    """Write token ranges ``[lo, hi)`` of part files, in order, into ``out_path``; returns its sha256."""
    digest = hashlib.sha256()
    with open(out_path, "wb") as out:
        for path, lo, hi in pieces:
            with open(path, "rb") as source:
                source.seek(lo * itemsize)
                remaining = (hi - lo) * itemsize
                while remaining:
                    block = source.read(min(COPY_BYTES, remaining))
                    if not block:
                        raise CortexCraftError(
                            f"encoded part {path} is shorter than recorded; prepare again (the part is re-encoded)"
                        )
                    digest.update(block)
                    out.write(block)
                    remaining -= len(block)
        out.flush()
        os.fsync(out.fileno())
    return digest.hexdigest()


def _shard_layout(directory: Path, split: str, encoded: list[dict], shard_tokens: int) -> list[tuple[str, list, int]]:
    """(file path, part pieces, tokens) of each shard file of a split: the files ``_SplitWriter``
    would write for the parts' ids one after another."""
    total = sum(p["tokens"] for p in encoded)
    files = []
    for index, first in enumerate(range(0, total, shard_tokens)):
        last, pieces, offset = min(first + shard_tokens, total), [], 0
        for part in encoded:
            lo, hi = max(first - offset, 0), min(last - offset, part["tokens"])
            if lo < hi:
                pieces.append((part["path"], lo, hi))
            offset += part["tokens"]
        files.append((str(directory / shard_file_name(split, index)), pieces, last - first))
    return files


def write_shards_from_parts(
    corpus: dict, vocab: dict, data_cfg: DataConfig, out_dir: Path, encoded: list[dict], workers: int = 1
) -> dict:
    """``write_shards``' directory from parts ``encode_part`` wrote, ``workers`` shard files at a
    time (threads: reading, hashing and writing release the GIL); returns the manifest."""

    def write_split(directory: Path, split: str, tok: Tokenizer, start: int, stop: int) -> dict:
        mine = sorted((p for p in encoded if p["split"] == split), key=lambda p: p["start"])
        edges = [start] + [edge for p in mine[:-1] for edge in (p["stop"], p["stop"])] + [stop]
        if [edge for p in mine for edge in (p["start"], p["stop"])] != edges:
            raise CortexCraftError(
                f"the encoded parts do not cover the {split} split (bytes {start:,} to {stop:,}) "
                f"exactly; plan the parts again for this corpus and configuration"
            )
        layout = _shard_layout(directory, split, mine, data_cfg.shard_tokens)
        with ThreadPoolExecutor(workers) as pool:
            hashes = list(
                pool.map(
                    copy_tokens,
                    [path for path, _, _ in layout],
                    [pieces for _, pieces, _ in layout],
                    repeat(tok.dtype.itemsize),
                )
            )
        files = [
            {"name": Path(path).name, "tokens": tokens, "sha256": sha} for (path, _, tokens), sha in zip(layout, hashes)
        ]
        return {"tokens": sum(f["tokens"] for f in files), "files": files}

    return build_shard_dir(corpus, vocab, data_cfg, out_dir, write_split)


def encode_part_in_place(vocab_dir: str, corpus: dict, part: dict, pieces: list[tuple[str, int, int]]) -> int:
    """Write the ids of one part straight into the shard files at ``pieces`` (path, token offset,
    tokens), in order; returns the token count, which must fill the pieces exactly."""
    tok = load_tokenizer(Path(vocab_dir))
    dtype, itemsize = tok.dtype.newbyteorder("<"), tok.dtype.itemsize
    promised = sum(tokens for _, _, tokens in pieces)
    pieces_left = iter(pieces)
    fd, position, room, written = None, 0, 0, 0  # position, room and written in bytes
    try:
        for ids in encode_range(tok, corpus, part["start"], part["stop"]):
            data = memoryview(ids.astype(dtype, copy=False)).cast("B")
            while data:
                if not room:
                    if fd is not None:
                        os.close(fd)
                        fd = None
                    path, offset, tokens = next(pieces_left, (None, 0, 0))
                    if path is None:
                        raise CortexCraftError(
                            f"part {part['index']} encodes to more than the {promised:,} tokens its "
                            f"characters promised; prepare again with --workers 1"
                        )
                    fd = os.open(path, os.O_WRONLY)
                    position, room = offset * itemsize, tokens * itemsize
                take = min(room, len(data))
                os.pwrite(fd, data[:take], position)
                data, position, room, written = data[take:], position + take, room - take, written + take
    finally:
        if fd is not None:
            os.close(fd)
    if written != promised * itemsize:
        raise CortexCraftError(
            f"part {part['index']} encoded to {written // itemsize:,} tokens, not the {promised:,} "
            f"its characters promised; prepare again with --workers 1"
        )
    return promised


def _hash_and_sync(path: str) -> str:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())
    return sha256_file(path)


def write_shards_in_place(
    corpus: dict,
    vocab: dict,
    data_cfg: DataConfig,
    out_dir: Path,
    parts: list[dict],
    part_tokens: list[int],
    pool,
    workers: int,
) -> dict:
    """``write_shards``' directory with each part encoded by ``pool`` straight into its place in the
    shard files: possible when every part's token count is known beforehand (a character tokenizer
    without special tokens writes one id per character), and it spares writing every id twice."""

    def write_split(directory: Path, split: str, tok: Tokenizer, start: int, stop: int) -> dict:
        mine = [(p, tokens) for p, tokens in zip(parts, part_tokens) if p["split"] == split]
        # _shard_layout names each part by its "path"; here the part's index stands in for it.
        placed = [dict(p, tokens=tokens, path=str(p["index"])) for p, tokens in mine]
        layout = _shard_layout(directory, split, placed, data_cfg.shard_tokens)
        for path, _, tokens in layout:
            with open(path, "wb") as handle:
                handle.truncate(tokens * tok.dtype.itemsize)
        # Turn the layout's (part, lo, hi) pieces around into each part's (file, offset, tokens).
        pieces: dict[str, list] = {p["path"]: [] for p in placed}
        for path, file_pieces, _ in layout:
            offset = 0
            for part_key, lo, hi in file_pieces:
                pieces[part_key].append((path, offset, hi - lo))
                offset += hi - lo
        list(
            pool.map(
                encode_part_in_place,
                repeat(vocab["dir"]),
                repeat(corpus),
                [p for p, _ in mine],
                [pieces[p["path"]] for p in placed],
            )
        )
        with ThreadPoolExecutor(workers) as threads:
            hashes = list(threads.map(_hash_and_sync, [path for path, _, _ in layout]))
        files = [
            {"name": Path(path).name, "tokens": tokens, "sha256": sha} for (path, _, tokens), sha in zip(layout, hashes)
        ]
        return {"tokens": sum(f["tokens"] for f in files), "files": files}

    return build_shard_dir(corpus, vocab, data_cfg, out_dir, write_split)


def workers_that_pay(corpus_bytes: int, tokenizer: str, workers: int,
                     char_bytes_per_worker: int = CHAR_BYTES_PER_WORKER) -> int:
    """How many of ``workers`` processes preparing a corpus in parts come out ahead of one process.
    BPE: one, since its tokenizer already encodes on every core in one process (2 workers measured
    0.89x to 1.0x of that). Char: one per ``char_bytes_per_worker`` of corpus, at least one."""
    if tokenizer != "char":
        return 1
    return max(1, min(workers, corpus_bytes // char_bytes_per_worker))


def balanced_part_bytes(corpus_bytes: int, workers: int) -> int:
    """At most ``PART_BYTES``, at least 1 MB, and small enough for ``PARTS_PER_WORKER`` parts each."""
    return min(PART_BYTES, max(1 << 20, corpus_bytes // (workers * PARTS_PER_WORKER)))


def prepare_parts(
    corpus: dict,
    data_cfg: DataConfig,
    vocab_dir: Path,
    parts_dir: Path,
    out_dir: Path,
    workers: int,
    part_bytes: int | None = None,
    encode_threads: int = 1,
) -> dict:
    """Vocabulary and shards of ``corpus`` with ``workers`` processes; returns the shards manifest.
    Parts are ``part_bytes`` long, by default ``balanced_part_bytes``; a BPE tokenizer encodes with
    ``encode_threads`` threads in each worker (the workers' share of the cores).

    The character vocabulary is a map-reduce of per-part counts, and those counts place every
    part's ids in the shard files directly; BPE is trained in this process (on a bounded sample)
    and the parts are encoded in the pool to part files, then assembled."""
    parts_dir = Path(parts_dir)
    parts_dir.mkdir(parents=True, exist_ok=True)
    # spawn: the workers start clean (no inherited threads of tokenizers or torch to deadlock on).
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for _ in range(workers):  # every worker starts (and imports) while the cuts are planned
            pool.submit(int)
        parts = plan_parts(corpus, data_cfg, part_bytes or balanced_part_bytes(corpus["bytes"], workers))
        part_counts = list(pool.map(count_part, repeat(corpus), parts)) if data_cfg.tokenizer == "char" else None
        vocab = build_vocab(corpus, data_cfg, vocab_dir, char_counts=add_counts(part_counts) if part_counts else None)
        tok = load_tokenizer(Path(vocab["dir"]))
        if part_counts is not None and isinstance(tok, CharTokenizer) and not tok.special_tokens:
            part_tokens = [int(counts[1].sum()) for counts in part_counts]
            return write_shards_in_place(corpus, vocab, data_cfg, out_dir, parts, part_tokens, pool, workers)
        paths = [str(parts_dir / f"part-{p['index']:05d}.bin") for p in parts]
        encoded = list(
            pool.map(encode_part, repeat(vocab["dir"]), repeat(corpus), parts, paths, repeat(encode_threads))
        )
        return write_shards_from_parts(corpus, vocab, data_cfg, out_dir, encoded, workers)
