"""The seeds' data preparation, as the baseline ``bench_data_prep.py`` measures ours against:
the vocabulary as ``sorted(set(text))`` and a per-character Python encode ``[stoi[c] for c in text]``,
written with numpy like nanoGPT's prepare.py."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def seed_vocab(text: str) -> list[str]:
    return sorted(set(text))


def seed_encode(text: str, stoi: dict[str, int]) -> np.ndarray:
    return np.array([stoi[c] for c in text], dtype=np.uint16)


def seed_prepare(text: str, out_dir: Path, val_fraction: float = 0.1) -> int:
    """Vocabulary, encode, split and write train.bin/val.bin; returns the vocabulary size."""
    chars = seed_vocab(text)
    stoi = {c: i for i, c in enumerate(chars)}
    cut = int(len(text) * (1 - val_fraction))
    seed_encode(text[:cut], stoi).tofile(out_dir / "train.bin")
    seed_encode(text[cut:], stoi).tofile(out_dir / "val.bin")
    return len(chars)
