"""Evaluation: when a run evaluates and checkpoints, the loss estimate made while training, and the
score of a finished checkpoint over the whole val split."""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from cortexcraft.batches import IGNORE_INDEX, TokenWindows
from cortexcraft.checkpoint import load_model
from cortexcraft.config import RunConfig, TrainConfig
from cortexcraft.device import autocast, inference_dtype, select_device
from cortexcraft.distributed import Distributed
from cortexcraft.errors import CortexCraftError
from cortexcraft.shards import verify_shards

# Evaluation batches come from their own stream, far from the training streams (one per rank).
EVAL_STREAM = 1 << 20
# Evaluation batches hold at most this many logits (64 MiB in fp32).
EVAL_LOGITS_BUDGET = 1 << 24


def eval_plan(eval_iters: int, batch_size: int, block_size: int, vocab_size: int) -> tuple[int, int]:
    """(batches, windows per batch) for an evaluation of ``eval_iters`` training-sized batches:
    the same number of windows in as few forward passes as the logits budget allows (a larger
    batch costs less per token on CPU, and the loss estimate is just as accurate)."""
    windows = eval_iters * batch_size
    per_batch = max(batch_size, min(windows, EVAL_LOGITS_BUDGET // (block_size * vocab_size)))
    batches = math.ceil(windows / per_batch)
    return batches, math.ceil(windows / batches)


@dataclass(frozen=True)
class Cadence:
    """When a run evaluates and checkpoints. Evaluations use no RNG, so evaluating at other steps
    never changes the trained weights (bitwise resume holds whatever the cadence)."""

    eval_interval: int
    checkpoint_interval: int
    start_step: int  # where this process started: a resume does not evaluate its first step again
    segment_start: int  # a run started from another model never saves that model as its own
    resumed: bool

    @classmethod
    def of(cls, cfg: TrainConfig, start_step: int, segment_start: int, resumed: bool) -> "Cadence":
        return cls(cfg.eval_interval, cfg.checkpoint_interval, start_step, segment_start, resumed)

    def _new(self, step: int) -> bool:
        # A resumed run already evaluated and saved its first step before it stopped.
        return step > self.start_step or not self.resumed

    def evaluates(self, step: int, at_end: bool, stopping: bool) -> bool:
        # The first evaluation of a run started from a checkpoint scores that model on this data. A
        # stop by signal skips the final evaluation (it can take long).
        return self._new(step) and (step % self.eval_interval == 0 or (at_end and not stopping))

    def checkpoints(self, step: int, at_end: bool) -> bool:
        return self._new(step) and step > self.segment_start and (step % self.checkpoint_interval == 0 or at_end)


@torch.inference_mode()
def estimate_loss(model: torch.nn.Module, windows: dict[str, TokenWindows], eval_batches: int, device: torch.device,
                  dtype: torch.dtype, ddp: Distributed) -> dict[str, float]:
    """Mean loss over the same ``eval_batches`` batches of each split every time (shared among
    ranks). Losses add up on the device: one host read per split, not one per batch."""
    model.eval()
    out = {}
    for split, source in windows.items():
        total = torch.zeros(2, device=device)
        for i in range(ddp.rank, eval_batches, ddp.world_size):
            x, y = source.batch(i, stream=EVAL_STREAM)
            with autocast(device, dtype):
                _, loss = model(x, y)
            total += torch.stack([loss.float(), torch.ones((), device=device)])
        if ddp.enabled:
            dist.all_reduce(total)
        out[split] = (total[0] / total[1]).item()
    model.train()
    return out


@torch.inference_mode()
def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, checkpoint: str = "best",
                 batches: Optional[int] = None) -> dict[str, Any]:
    """Val loss of a checkpoint over the whole val split (or ``batches`` random batches) and bits
    per character (char tokenizer) or per token (BPE, where ``bits_per_char`` is None).

    On a GPU it runs under bf16 (or fp16) autocast; on a CPU in fp32 (``inference_dtype``)."""
    manifest = verify_shards(data_dir)
    device = select_device("auto")
    dtype = inference_dtype(device)
    model, state = load_model(run_dir, checkpoint, device)
    if manifest["vocab_size"] != state["vocab_size"]:
        raise CortexCraftError(f"{data_dir} has vocab_size {manifest['vocab_size']} but the checkpoint expects "
                               f"{state['vocab_size']}; evaluate on the run's data")
    run_cfg = RunConfig.model_validate(state["config"])
    batch_size, block_size = run_cfg.train.batch_size, run_cfg.model.block_size
    windows = TokenWindows(data_dir, "val", block_size, batch_size, run_cfg.train.seed, device)
    source = ((windows.batch(i, stream=EVAL_STREAM) for i in range(batches)) if batches
              else windows.sequential(batch_size))
    # Sums stay on the device: reading them per batch would wait for the device every batch.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    tokens = torch.zeros((), dtype=torch.int64, device=device)
    for x, y in source:
        with autocast(device, dtype):
            _, loss = model(x, y)
        # The loss is a mean over scored targets; the end of `sequential` marks re-scored ones.
        scored = (y != IGNORE_INDEX).sum()
        total_loss += loss.double() * scored
        tokens += scored
    if int(tokens) == 0:
        raise CortexCraftError(f"the val split of {data_dir} is shorter than one window of {block_size} tokens; "
                               f"prepare more data")
    val_loss = float(total_loss / tokens)
    bits = val_loss / math.log(2)
    is_char = manifest["tokenizer"]["type"] == "char"
    return {"val_loss": val_loss, "bits_per_token": bits, "bits_per_char": bits if is_char else None,
            "tokens": int(tokens), "checkpoint": state["path"], "step": state["step"]}
