"""Training windows read straight from the shard memmaps.

A split is the concatenation of its shard files; a window may span two shards. ``batch(step)``
is a pure function of (seed, split, stream, step), so a resumed run that stores only the step
draws exactly the batches it would have drawn without the interruption.
"""
from __future__ import annotations

import bisect
import mmap
import zlib
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from cortexcraft.errors import CortexCraftError
from cortexcraft.shards import verify_shards

# Targets already scored by an earlier window of `sequential` carry this id; it is the default
# ignore_index of torch.nn.functional.cross_entropy.
IGNORE_INDEX = -100
# The largest page-cache folio a read maps (PMD size on x86-64 and arm64 with 4 KiB pages).
FOLIO_BYTES = 2 << 20


def _map_tokens(path: Path) -> mmap.mmap:
    with open(path, "rb") as handle:
        mapped = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    mapped.madvise(mmap.MADV_RANDOM)
    return mapped


class TokenWindows:
    def __init__(self, data_dir: Path, split: str, block_size: int, batch_size: int, seed: int, device: str = "cpu"):
        manifest = verify_shards(data_dir)
        if split not in manifest["splits"]:
            raise CortexCraftError(f"split {split!r} not in {data_dir}; use one of {', '.join(manifest['splits'])}")
        files = manifest["splits"][split]["files"]
        dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
        self.data_dir, self.vocab_size = Path(data_dir), manifest["vocab_size"]
        self._files = [Path(data_dir) / f["name"] for f in files if f["tokens"]]
        self._maps = [_map_tokens(path) for path in self._files]
        self.shards = [np.frombuffer(mapped, dtype=dtype) for mapped in self._maps]
        self._shard_starts = np.cumsum([0] + [len(s) for s in self.shards]).tolist()
        self.tokens = self._shard_starts[-1]
        if self.tokens < block_size + 1:
            raise CortexCraftError(
                f"the {split} split of {data_dir} has {self.tokens:,} tokens, "
                f"fewer than block_size+1 = {block_size + 1}; "
                f"lower block_size or prepare with a smaller --val-fraction / larger corpus"
            )
        self.split, self.block_size, self.batch_size, self.seed = split, block_size, batch_size, seed
        self.device = torch.device(device)
        self._split_key = zlib.crc32(split.encode())

    def _gather(self, starts: np.ndarray) -> np.ndarray:
        """Rows ``tokens[start : start + block_size + 1]`` of the concatenated split, as int64."""
        span = self.block_size + 1
        out = np.empty((len(starts), span), dtype=np.int64)
        for row, start in enumerate(starts.tolist()):
            filled = 0
            while filled < span:  # a window may continue in the next shard
                shard = bisect.bisect_right(self._shard_starts, start + filled) - 1
                first = start + filled - self._shard_starts[shard]
                piece = self.shards[shard][first : first + span - filled]
                out[row, filled : filled + len(piece)] = piece
                self._unmap(shard, first, len(piece))
                filled += len(piece)
        # A shard damaged after it was written (same size, so the cheap check passed) must not
        # reach the embedding as an out-of-range index; one max per batch costs next to nothing.
        if out.max(initial=0) >= self.vocab_size:
            self._raise_bad_token(starts, out)
        return out

    def _raise_bad_token(self, starts: np.ndarray, rows: np.ndarray) -> None:
        row, col = np.argwhere(rows >= self.vocab_size)[0]
        position = int(starts[row]) + int(col)
        shard = bisect.bisect_right(self._shard_starts, position) - 1
        raise CortexCraftError(
            f"{self._files[shard]} holds token id {rows[row, col]} at token {position - self._shard_starts[shard]:,} "
            f"but the vocabulary has {self.vocab_size} ids: the shard is damaged; "
            f"check with `cortexcraft verify {self.data_dir}` "
            f"and re-run `cortexcraft prepare --out {self.data_dir}`"
        )

    def _unmap(self, shard: int, first: int, count: int) -> None:
        # Reading a window maps its whole page-cache folio (up to 2 MiB with large folios, whatever
        # MADV_RANDOM says), so over a run the pages of a big corpus would all count as resident.
        # Unmapping each window's folios right after its copy keeps RSS flat (the data stays cached).
        itemsize = self.shards[shard].itemsize
        lo = first * itemsize // FOLIO_BYTES * FOLIO_BYTES
        hi = min(len(self._maps[shard]), -(-(first + count) * itemsize // FOLIO_BYTES) * FOLIO_BYTES)
        self._maps[shard].madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def _to_device(self, x: np.ndarray, y: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(np.ascontiguousarray(y))
        if self.device.type == "cuda":
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def batch(self, step: int, stream: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Random (x, y) windows, int64 of shape (batch_size, block_size), y shifted by one."""
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, self._split_key, stream, step])
        starts = rng.integers(0, self.tokens - self.block_size, size=self.batch_size)
        rows = self._gather(starts)
        return self._to_device(rows[:, :-1], rows[:, 1:])

    def sequential(self, batch_size: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Consecutive non-overlapping windows covering every target of the split exactly once.

        The last window is aligned to the end of the split; its targets that an earlier window
        already scored are set to IGNORE_INDEX, so summed cross-entropy over all batches divided by
        ``(y != IGNORE_INDEX).sum()`` is the exact mean loss of the split."""
        batch_size = batch_size or self.batch_size
        block = self.block_size
        starts = np.arange(0, self.tokens - block, block)
        covered = int(starts[-1]) + block + 1
        tail = covered < self.tokens
        if tail:
            starts = np.append(starts, self.tokens - block - 1)
        for first in range(0, len(starts), batch_size):
            chunk = starts[first : first + batch_size]
            rows = self._gather(chunk)
            x, y = rows[:, :-1], rows[:, 1:].copy()
            if tail and first + len(chunk) == len(starts):
                y[-1, : covered - 1 - int(chunk[-1])] = IGNORE_INDEX
            yield self._to_device(x, y)
