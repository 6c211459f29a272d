"""TokenWindows: windows match the data, span shards, are deterministic per step, cover the split."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cortexcraft.batches import IGNORE_INDEX, TokenWindows
from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.prepare import prepare

# Random CJK characters: > 256 distinct ids (uint16 shards) and every 64-token window unique.
TEXT = "".join(chr(0x4E00 + int(c)) for c in np.random.default_rng(0).integers(0, 3000, 6000))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("batches")
    (tmp / "corpus.txt").write_text(TEXT, encoding="utf-8")
    manifest = prepare(
        DataConfig(source=str(tmp / "corpus.txt"), shard_tokens=700), tmp / "out", cache_dir=tmp / "cache"
    )
    split = np.concatenate(
        [np.fromfile(tmp / "out" / f["name"], dtype="<u2") for f in manifest["splits"]["train"]["files"]]
    )
    return tmp / "out", split, manifest


def test_windows_are_slices_of_the_split_across_shards(data):
    directory, split, manifest = data
    assert len(manifest["splits"]["train"]["files"]) > 5
    windows = TokenWindows(directory, "train", block_size=64, batch_size=100, seed=1)
    assert windows.tokens == len(split)
    x, y = windows.batch(0)
    assert x.shape == y.shape == (100, 64) and x.dtype == y.dtype == torch.int64
    all_windows = np.lib.stride_tricks.sliding_window_view(split, 65)
    for row_x, row_y in zip(x.numpy(), y.numpy()):
        start = np.flatnonzero((all_windows[:, :64] == row_x).all(axis=1))
        assert len(start) == 1 and np.array_equal(all_windows[start[0], 1:], row_y)
    starts = [np.flatnonzero((all_windows[:, :64] == row).all(axis=1))[0] for row in x.numpy()]
    assert any(s // 700 != (s + 64) // 700 for s in starts)  # some windows cross a shard boundary


def test_batches_are_a_pure_function_of_seed_split_stream_and_step(data):
    directory = data[0]
    first = TokenWindows(directory, "train", block_size=32, batch_size=8, seed=7)
    resumed = TokenWindows(directory, "train", block_size=32, batch_size=8, seed=7)
    for _ in range(3):
        first.batch(0)
    assert torch.equal(first.batch(41)[0], resumed.batch(41)[0])
    assert not torch.equal(first.batch(41)[0], first.batch(42)[0])
    assert not torch.equal(first.batch(41)[0], first.batch(41, stream=1)[0])
    assert not torch.equal(first.batch(41)[0], TokenWindows(directory, "train", 32, 8, seed=8).batch(41)[0])


def test_sequential_scores_every_target_of_the_split_once(data):
    directory, split, _ = data
    windows = TokenWindows(directory, "train", block_size=100, batch_size=4, seed=0)
    targets = []
    for x, y in windows.sequential(batch_size=7):
        assert x.shape[1] == 100 and (x >= 0).all()
        targets.append(y[y != IGNORE_INDEX].numpy())
    assert np.array_equal(np.concatenate(targets), split[1:])


def test_a_split_shorter_than_a_window_is_an_error(data):
    directory = data[0]
    val_tokens = 600
    with pytest.raises(
        CortexCraftError,
        match=f"val split .* has {val_tokens} tokens, fewer than block_size\\+1 = 601; lower block_size",
    ):
        TokenWindows(directory, "val", block_size=600, batch_size=2, seed=0)
    TokenWindows(directory, "val", block_size=599, batch_size=2, seed=0).batch(0)


def test_missing_shard_directory_is_an_error(tmp_path):
    with pytest.raises(CortexCraftError, match="does not exist; run `cortexcraft prepare"):
        TokenWindows(tmp_path / "missing", "train", 8, 2, 0)
