"""Small data and shrunk configs shared by the training, checkpoint, preset and DDP tests."""
from __future__ import annotations

import os
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

from cortexcraft.checkpoint import MODEL_FILE
from cortexcraft.config import DataConfig, RunConfig, build_config
from cortexcraft.prepare import prepare

# For models this small one thread is fastest, and on a busy 2-core machine a second spinning
# OpenMP thread makes every step ~10x slower. Subprocesses get the same setting through the env.
ONE_THREAD_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


# Shrinks any preset to a model that trains in a fraction of a second per few steps, on one fixed
# thread (an adapting thread count may change float reductions, and the tests compare bitwise).
TINY = ["n_layer=1", "n_embd=32", "n_head=2", "block_size=16", "batch_size=8",
        "eval_iters=4", "eval_interval=10", "checkpoint_interval=10", "threads=1"]


def repetitive_text(chars: int = 30_000, seed: int = 0) -> str:
    """Shakespeare-flavoured sentences from a tiny grammar: easy to learn, never one fixed loop."""
    rng = random.Random(seed)
    names = ["ROMEO", "JULIET", "HAMLET", "OPHELIA"]
    verbs = ["loves", "fears", "calls", "follows"]
    things = ["the moon", "my lord", "the king", "sweet night"]
    lines = []
    while sum(len(line) for line in lines) < chars:
        lines.append(
            f"{rng.choice(names)}:\nO, {rng.choice(names).lower()} {rng.choice(verbs)} {rng.choice(things)}.\n\n"
        )
    return "".join(lines)[:chars]


def make_data_dir(root: Path, data_cfg: DataConfig | None = None, chars: int = 30_000) -> Path:
    """Prepare shards for a small local text into ``root/data`` (the preset's data settings kept)."""
    root.mkdir(parents=True, exist_ok=True)
    text_file = root / "corpus.txt"
    text_file.write_text(repetitive_text(chars), encoding="utf-8")
    cfg = (data_cfg or DataConfig()).model_copy(update={"source": str(text_file)})
    prepare(cfg, root / "data", cache_dir=root / "downloads")
    return root / "data"


def tiny_config(preset: str = "cpu", *overrides: str) -> RunConfig:
    return build_config(preset, TINY + list(overrides))


def same_weights(checkpoint_a: Path, checkpoint_b: Path) -> bool:
    """Bitwise equality of two checkpoints' model tensors."""
    a, b = load_file(str(Path(checkpoint_a) / MODEL_FILE)), load_file(str(Path(checkpoint_b) / MODEL_FILE))
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
