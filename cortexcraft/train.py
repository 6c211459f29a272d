"""Training: AdamW (optionally with Muon for the blocks' matrices), warmup + cosine or
warmup-stable-decay, periodic evaluation, checkpoints and exact resume.

``train(config, data_dir, run_dir)`` runs until ``max_iters`` (or ``max_epochs``, or the
``max_minutes`` budget), evaluating every ``eval_interval`` steps (mean loss over ``eval_iters``
fixed train and val batches, appended to RUN_DIR/metrics.jsonl) and checkpointing every
``checkpoint_interval`` steps, whenever val loss improves, and at the end (layout: see
``cortexcraft.checkpoint``). Re-running into the same RUN_DIR continues from the newest valid
checkpoint; because batches are a pure function of the step and every RNG state is restored, a
resumed CPU run ends bitwise identical to an uninterrupted one.

Under ``torchrun`` it runs data-parallel (DDP, gloo on CPU, nccl on GPU): each rank draws its own
batches, rank 0 writes every file, and all ranks resume from the same checkpoint.
"""
from __future__ import annotations

import json
import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from cortexcraft.batches import IGNORE_INDEX, TokenWindows
from cortexcraft.checkpoint import (
    latest_checkpoint, list_checkpoints, load_model_state, load_training_state, prune_checkpoints,
    read_checkpoint_state, resolve_checkpoint, save_checkpoint,
)
from cortexcraft.config import RunConfig, TrainConfig
from cortexcraft.device import autocast, dtype_name, grad_scaler, select_device, select_dtype
from cortexcraft.device import deterministic_algorithms, vocab_multiple
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import append_text, atomic_write_json, atomic_write_text, remove_dead_temps, sha256_json
from cortexcraft.interrupt import Interrupted, StopRequest, exit_with_parent, signal_name
from cortexcraft.locks import lock_run_dir
from cortexcraft.model import GPT, check_model_config, matmul_shapes
from cortexcraft.model import keep_true_vocabulary_in, parameter_count
from cortexcraft.shards import verify_shards
from cortexcraft.threads import choose_threads
from cortexcraft.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
# Evaluation batches come from their own stream, far from the training streams (one per rank).
EVAL_STREAM = 1 << 20
# Evaluation batches hold at most this many logits (64 MiB in fp32).
EVAL_LOGITS_BUDGET = 1 << 24
# dtype calibration times matmuls over at most this many tokens: enough rows to show each
# precision's speed, few enough that a 50k-token vocabulary head costs well under a second.
CALIBRATION_TOKENS = 512
# Without a terminal progress bar, a progress log line at most this often.
LOG_SECONDS = 30.0


def learning_rate(step: int, cfg: TrainConfig, max_steps: int, start: int = 0, time_fraction: float = 0.0) -> float:
    """Linear warmup, then constant, cosine decay, or warmup-stable-decay ("wsd": constant, then
    linear decay over the last ``decay_fraction``) to min_lr (default lr/10) at max_steps.

    A run started from another model's checkpoint at step ``start`` gets a segment of its own:
    warmup from ``start``, decay to min_lr at ``max_steps``; the earlier schedule is not re-stretched.
    ``time_fraction`` is the share of the ``max_minutes`` budget already used: a wsd run is as far
    along as the steps or the clock say, whichever is further, so a budget that stops the run at
    any step still ends it on a finished decay."""
    step, max_steps = step - start, max_steps - start
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / (cfg.warmup_iters + 1)
    if cfg.lr_schedule == "constant":
        return cfg.lr
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    progress = min(1.0, (step - cfg.warmup_iters) / max(1, max_steps - cfg.warmup_iters))
    if cfg.lr_schedule == "wsd":
        progress = min(1.0, max(progress, time_fraction))
        remaining = 1.0 - progress
        if remaining >= cfg.decay_fraction:
            return cfg.lr
        return min_lr + (cfg.lr - min_lr) * remaining / cfg.decay_fraction
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - min_lr)


# Muon's momentum warmup starts here (modded-nanogpt's value).
MUON_MOMENTUM_START = 0.85


def make_optimizers(model: GPT, cfg: TrainConfig, device: torch.device) -> dict[str, torch.optim.Optimizer]:
    """The run's optimizers by checkpoint name: "optimizer" is AdamW, which decays only matrices
    and embeddings (>= 2-D), never biases or norm gains; with ``optimizer=muon``, "muon" takes the
    2-D matrices inside the blocks and AdamW keeps the embeddings, head, gains and biases."""
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    muon_params = [p for name, p in named if cfg.optimizer == "muon" and name.startswith("blocks.") and p.dim() == 2]
    taken = {id(p) for p in muon_params}
    params = [p for _, p in named if id(p) not in taken]
    groups = [
        {"params": [p for p in params if p.dim() >= 2], "weight_decay": cfg.weight_decay},
        {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
    ]
    # The fused kernel exists on CPU too: 1.09x (fp32) to 1.17x (bf16) per step at nanoGPT's CPU shape (bench_train).
    optimizers: dict[str, torch.optim.Optimizer] = {
        "optimizer": torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type in ("cuda", "cpu")),
    }
    if muon_params:
        # weight_decay is always passed: torch's default (0.1) is far from the speedrun's (none).
        optimizers["muon"] = torch.optim.Muon(muon_params, lr=cfg.muon_lr, weight_decay=cfg.muon_weight_decay,
                                              momentum=cfg.muon_momentum, nesterov=True, adjust_lr_fn=cfg.muon_adjust_lr)
    return optimizers


def apply_schedule(optimizers: dict[str, torch.optim.Optimizer], step: int, cfg: TrainConfig, max_steps: int,
                   start: int = 0, time_fraction: float = 0.0) -> float:
    """Set this step's learning rates (Muon's scaled by muon_lr / lr) and Muon momentum; returns AdamW's lr.
    A segment starting at ``start`` has fresh optimizers, so its momentum warms up again too."""
    lr = learning_rate(step, cfg, max_steps, start, time_fraction)
    for group in optimizers["optimizer"].param_groups:
        group["lr"] = lr
    if "muon" in optimizers:
        momentum = cfg.muon_momentum
        if step - start < cfg.muon_momentum_warmup_iters:
            first = min(MUON_MOMENTUM_START, cfg.muon_momentum)
            momentum = first + (cfg.muon_momentum - first) * (step - start) / cfg.muon_momentum_warmup_iters
        for group in optimizers["muon"].param_groups:
            group["lr"] = cfg.muon_lr * lr / cfg.lr
            group["momentum"] = momentum
    return lr


def max_steps_for(cfg: TrainConfig, train_tokens: int, tokens_per_step: int) -> int:
    """max_iters, or enough steps to draw ``max_epochs`` times the train split's tokens."""
    if cfg.max_epochs is None:
        return cfg.max_iters
    return max(1, math.ceil(cfg.max_epochs * train_tokens / tokens_per_step))


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The eval records of a run, oldest first. A line torn by a kill is ignored."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("ignoring a torn line in %s", path)
    return records


def _write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def _append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    # One short write per line: a kill tears at most the last line, which read_metrics skips and
    # the resume rewrites away.
    append_text(run_dir / METRICS_FILE, json.dumps(record) + "\n")


class Distributed:
    """Rank and world size; initialises the process group when started by torchrun."""

    def __init__(self, device_name: str):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if self.world_size > 1:
            # A rank whose torchrun agent was killed gets SIGTERM and stops like on any signal.
            exit_with_parent()
        if self.world_size > 1 and not dist.is_initialized():
            use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
            if use_cuda:
                torch.cuda.set_device(self.local_rank)
            dist.init_process_group("nccl" if use_cuda else "gloo")
            self.owns_group = True

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def any(self, flag: bool, device: torch.device) -> bool:
        return self.max(1.0 if flag else 0.0, device) > 0

    def max(self, value: float, device: torch.device) -> float:
        """The largest ``value`` over all ranks (so every rank takes the same decision)."""
        if not self.enabled:
            return value
        tensor = torch.tensor([value], device=device)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
        return float(tensor.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def close(self) -> None:
        if self.owns_group:
            dist.destroy_process_group()


def torchrun_command(train_args: list[str], nproc_per_node: int = 1, nnodes: int = 1, node_rank: int = 0,
                     rdzv_endpoint: str | None = None, rdzv_id: str = "cortexcraft") -> list[str]:
    """``cortexcraft train <train_args>`` under torchrun: ``nproc_per_node`` processes on this
    machine, alone (``--standalone``) or as node ``node_rank`` of ``nnodes`` meeting at the c10d
    rendezvous ``rdzv_endpoint`` (HOST:PORT of node 0, which hosts it; every node passes the same)."""
    if nproc_per_node < 1 or nnodes < 1:
        raise CortexCraftError(f"--nproc-per-node {nproc_per_node} and --nnodes {nnodes} must be at least 1")
    if nnodes == 1:
        launch = ["--standalone"]
    else:
        host, _, port = (rdzv_endpoint or "").rpartition(":")
        if not host or not port.isdigit():
            raise CortexCraftError(f"--nnodes {nnodes} needs --rdzv-endpoint HOST:PORT (node 0's address and a free port, "
                                   f"the same on every node), got {rdzv_endpoint!r}")
        if not 0 <= node_rank < nnodes:
            raise CortexCraftError(f"--node-rank {node_rank} must be between 0 and {nnodes - 1} (0 on the node at --rdzv-endpoint)")
        # Node 0 hosts the rendezvous store; saying so also works when all nodes share one host name.
        launch = [f"--nnodes={nnodes}", "--rdzv-backend=c10d", f"--rdzv-endpoint={rdzv_endpoint}", f"--rdzv-id={rdzv_id}",
                  f"--rdzv-conf=is_host={int(node_rank == 0)}"]
    return [sys.executable, "-m", "torch.distributed.run", *launch, f"--nproc-per-node={nproc_per_node}",
            "-m", "cortexcraft", "train", *train_args]


def _rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    state = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def _set_rng_state(state: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


class ProgressBar:
    """A one-line bar on stderr with step, loss and tokens/s, redrawn in place."""

    def __init__(self, total: int, start: int):
        self.total, self.start, self.t0 = total, start, time.monotonic()

    def update(self, step: int, loss: float, tokens_per_second: float) -> None:
        width = 30
        filled = int(width * step / max(1, self.total))
        done = step - self.start
        eta = (time.monotonic() - self.t0) / done * (self.total - step) if done else 0.0
        sys.stderr.write(f"\r{step:>7}/{self.total} [{'#' * filled}{'.' * (width - filled)}] "
                         f"loss {loss:.4f}  {tokens_per_second:,.0f} tok/s  eta {eta:,.0f}s ")
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
        sys.stderr.flush()


def eval_plan(eval_iters: int, batch_size: int, block_size: int, vocab_size: int) -> tuple[int, int]:
    """(batches, windows per batch) for an evaluation of ``eval_iters`` training-sized batches:
    the same number of windows in as few forward passes as the logits budget allows (a larger
    batch costs less per token on CPU, and the loss estimate is just as accurate)."""
    windows = eval_iters * batch_size
    per_batch = max(batch_size, min(windows, EVAL_LOGITS_BUDGET // (block_size * vocab_size)))
    batches = math.ceil(windows / per_batch)
    return batches, math.ceil(windows / batches)


@torch.inference_mode()
def estimate_loss(model: torch.nn.Module, windows: dict, eval_batches: int, device: torch.device,
                  dtype: torch.dtype, ddp: Distributed) -> dict[str, float]:
    """Mean loss over the same ``eval_batches`` batches of each split every time (shared among ranks)."""
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


class HealthMonitor:
    """Remembers, on the device, the first step whose loss or gradients were not finite, so that
    checking costs no device sync per step; ``check`` syncs (all ranks) and raises if one was."""

    def __init__(self, device: torch.device, ddp: Distributed, lr: float):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)
        self.ddp, self.lr = ddp, lr

    def record(self, step: int, value: torch.Tensor) -> None:
        """``value`` is any sum that is finite exactly when the step's losses and gradients are."""
        self.first_bad = torch.where((self.first_bad < 0) & ~torch.isfinite(value), step, self.first_bad)

    def check(self, last_ckpt: Optional[Path], eval_losses: Optional[dict[str, float]] = None, step: int = 0) -> None:
        first = self.first_bad.clone()
        if self.ddp.enabled:
            dist.all_reduce(first, op=dist.ReduceOp.MAX)
        first = int(first.item())
        if first < 0 and eval_losses is not None and not all(math.isfinite(v) for v in eval_losses.values()):
            first = step
        if first < 0:
            return
        saved = f"the last good checkpoint is {last_ckpt}" if last_ckpt is not None else "no checkpoint was written"
        raise CortexCraftError(
            f"training diverged at step {first:,}: the loss or gradients are NaN or inf, so training stopped and "
            f"nothing after it was saved; {saved}; lower train.lr (was {self.lr:.3g}) or set train.grad_clip, then re-run to resume")


def shape_changes(saved_model: dict[str, Any], wanted_model: dict[str, Any]) -> list[str]:
    """Model settings that differ between two configs, as "name old -> new". Dropout does not
    change any tensor shape; every other model field does or changes the maths."""
    return [f"{k} {saved_model.get(k)!r} -> {wanted_model[k]!r}" for k in wanted_model
            if k != "dropout" and saved_model.get(k) != wanted_model[k]]


def _check_resumable(state: dict[str, Any], config: RunConfig, vocab_size: int, where: str, fix: str) -> None:
    if changed := shape_changes(state["config"]["model"], config.model.model_dump(mode="json")):
        raise CortexCraftError(f"{where} holds a model with a different shape ({', '.join(changed)}); {fix}")
    if state["vocab_size"] != vocab_size:
        raise CortexCraftError(f"{where} was trained with vocab_size {state['vocab_size']} but the data has {vocab_size}; {fix}")


def _with_pretrained_architecture(config: RunConfig, manifest: dict[str, Any], data_dir: Path) -> RunConfig:
    """``config`` with the model section of its ``init_from`` checkpoint, after checking that the
    data was tokenized with that checkpoint's tokenizer."""
    from cortexcraft.hf import pretrained_model_config, pretrained_vocab_size

    spec = config.train.init_from
    expected = pretrained_vocab_size(spec)
    if manifest["tokenizer"]["type"] != "bpe" or manifest["vocab_size"] != expected:
        raise CortexCraftError(
            f"{data_dir} was tokenized with a {manifest['tokenizer']['type']} vocabulary of {manifest['vocab_size']:,} tokens, "
            f"but init_from={spec} reads {expected:,} BPE tokens; prepare the data with its tokenizer "
            f"(cortexcraft prepare --init-from {spec})"
        )
    return config.model_copy(update={"model": pretrained_model_config(spec, config.model)})


def train(
    config: RunConfig,
    data_dir: str | os.PathLike,
    run_dir: str | os.PathLike,
    resume: bool = True,
    on_eval: Optional[Callable[[dict], None]] = None,
    progress: Optional[bool] = None,
    start_from: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Train (or continue training) the run in ``run_dir`` on the shards in ``data_dir``.

    ``resume=True`` continues from the newest valid checkpoint when there is one; ``resume=False``
    refuses a run dir that already has checkpoints. A finished run given a larger ``max_iters``
    trains on (the cosine schedule is then stretched to the new end). ``start_from`` (a checkpoint
    directory of another run) starts a new run from that model: its weights (the optimizer starts
    fresh), its step and tokens seen, and a learning-rate segment of its own (warmup + decay from that step
    to ``max_iters``, which must lie beyond it); its best checkpoint is chosen among the new steps.
    ``on_eval`` gets every eval record (rank 0). ``progress`` draws a progress bar on stderr
    (default: when stderr is a terminal). Returns the summary also written to RUN_DIR/summary.json.

    One process trains a run directory at a time (LockBusy names the other one). The first
    SIGINT/SIGTERM saves a checkpoint at the current step and raises ``Interrupted``; a second
    one exits at once.
    """
    t_start = time.monotonic()
    data_dir, run_dir = Path(data_dir), Path(run_dir)
    manifest = verify_shards(data_dir)
    vocab_size = manifest["vocab_size"]
    if config.train.init_from:
        config = _with_pretrained_architecture(config, manifest, data_dir)
    tcfg, mcfg = config.train, config.model
    check_model_config(mcfg, vocab_size)

    ddp = Distributed(tcfg.device)
    lock = None
    threads_before = torch.get_num_threads()
    try:
        if ddp.is_main:
            lock = lock_run_dir(run_dir)
            remove_dead_temps(run_dir)
        if not resume and list_checkpoints(run_dir):
            raise CortexCraftError(f"{run_dir} already has checkpoints; continue it (resume) or choose a new run directory")
        previous = latest_checkpoint(run_dir) if resume else None
        if previous is not None:
            _check_resumable(previous[1], config, vocab_size, str(run_dir), "use a new --out or the run's original settings")
            saved_optimizer = previous[1]["config"]["train"].get("optimizer", "adamw")
            if saved_optimizer != tcfg.optimizer:  # a new segment (start_from) may switch, a resume may not
                raise CortexCraftError(f"{run_dir} was trained with optimizer={saved_optimizer}, not {tcfg.optimizer}; "
                                       f"use a new --out or --set optimizer={saved_optimizer}")
        init = None
        if start_from is not None and previous is None:
            init = (Path(start_from), read_checkpoint_state(start_from))
            _check_resumable(init[1], config, vocab_size, f"checkpoint {start_from}", "train from scratch instead")
            if tcfg.max_epochs is None and tcfg.max_iters <= init[1]["step"]:
                raise CortexCraftError(f"max_iters {tcfg.max_iters} is not beyond step {init[1]['step']} of {start_from}; "
                                       f"set max_iters to the step to train up to")
        with StopRequest() as stop, deterministic_algorithms(tcfg.deterministic):
            return _train(config, data_dir, run_dir, manifest, previous, init, ddp, on_eval, progress, t_start, stop)
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads_before)  # the caller's setting, whatever training chose
        ddp.close()


def _train(config: RunConfig, data_dir: Path, run_dir: Path, manifest: dict[str, Any],
           previous: Optional[tuple[Path, dict[str, Any]]], init: Optional[tuple[Path, dict[str, Any]]], ddp: Distributed,
           on_eval: Optional[Callable[[dict], None]], progress: Optional[bool], t_start: float,
           stop: StopRequest) -> dict[str, Any]:
    tcfg, mcfg = config.train, config.model
    vocab_size = manifest["vocab_size"]
    device = select_device(tcfg.device, ddp.local_rank)
    tuner, thread_info = None, {}
    if device.type == "cpu":
        threads, tuner, thread_info = choose_threads(tcfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(threads)
    dtype = select_dtype(device, tcfg.dtype, matmul_shapes(mcfg, vocab_size, min(CALIBRATION_TOKENS, tcfg.batch_size * mcfg.block_size)))
    if device.type == "cpu" and tcfg.dtype == "auto" and ddp.enabled:
        # Each rank timed its own matmuls; they must still train in one precision.
        dtype = torch.bfloat16 if ddp.any(dtype == torch.bfloat16, device) else torch.float32
    windows = {split: TokenWindows(data_dir, split, mcfg.block_size, tcfg.batch_size, tcfg.seed, device)
               for split in ("train", "val")}
    eval_batches, eval_batch_size = eval_plan(tcfg.eval_iters, tcfg.batch_size, mcfg.block_size, vocab_size)
    eval_windows = {split: TokenWindows(data_dir, split, mcfg.block_size, eval_batch_size, tcfg.seed, device)
                    for split in ("train", "val")}
    tokens_per_step = tcfg.batch_size * mcfg.block_size * tcfg.grad_accum * ddp.world_size
    max_steps = max_steps_for(tcfg, windows["train"].tokens, tokens_per_step)

    torch.manual_seed(tcfg.seed + ddp.rank)
    model = GPT(mcfg, vocab_size, pad_vocab_to=vocab_multiple(device))
    if tcfg.init_from and previous is None:
        from cortexcraft.hf import pretrained_state

        model.load_state_dict(pretrained_state(tcfg.init_from, mcfg))
        log.info("initialised from %s", tcfg.init_from)
    model = model.to(device)
    optimizers = make_optimizers(model, tcfg, device)
    for optimizer in optimizers.values():
        keep_true_vocabulary_in(model, optimizer)
    scaler = grad_scaler(device, dtype)
    step, tokens_seen, best_val, best_step, segment_start = 0, 0, math.inf, None, 0
    if init is not None:
        path, state = init
        # Weights only: the optimizer starts fresh, which the segment's own warmup is there for.
        model.load_state_dict(load_model_state(path, device))
        step = segment_start = state["step"]
        tokens_seen = state["tokens_seen"]
        log.info("starting %s from %s (step %d)", run_dir, path, step)
    if previous is not None:
        path, state = previous
        model.load_state_dict(load_model_state(path, device))
        optimizer_states, rng_states = load_training_state(path, state)
        for name, optimizer in optimizers.items():
            optimizer.load_state_dict(optimizer_states[name])
        if scaler is not None and state.get("grad_scaler"):
            scaler.load_state_dict(state["grad_scaler"])
        if ddp.rank < len(rng_states):
            _set_rng_state(rng_states[ddp.rank], device)
        else:
            log.warning("%s has no RNG state for rank %d (world size changed); dropout is reseeded", path, ddp.rank)
        step, tokens_seen = state["step"], state["tokens_seen"]
        best_val = state["best_val_loss"] if state["best_val_loss"] is not None else math.inf
        best_step = state["best_step"]
        segment_start = state.get("segment_start", 0)
        log.info("resuming %s from %s (step %d)", run_dir, path.name, step)
    start_step = step
    params = parameter_count(mcfg, vocab_size)

    if ddp.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        load_tokenizer(data_dir).save(run_dir)
        atomic_write_json(run_dir / "run.json", {
            "config": config.model_dump(mode="json"), "data_dir": str(data_dir.resolve()),
            "data_manifest_sha256": sha256_json(manifest), "data_source": manifest.get("source"), "vocab_size": vocab_size, "params": params,
            "device": str(device), "dtype": dtype_name(dtype), "world_size": ddp.world_size,
            "start_from": str(init[0]) if init else None, "segment_start": segment_start,
        })
        # The history must end where the checkpoint does, so it equals an uninterrupted run's.
        _write_metrics(run_dir, [r for r in read_metrics(run_dir) if r["step"] <= start_step] if previous else [])
        prune_checkpoints(run_dir, tcfg.keep_last)
    ddp.barrier()

    raw_model = model
    if tcfg.compile:
        model = torch.compile(model)
    eval_model = model
    if ddp.enabled:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    show_bar = ddp.is_main and (sys.stderr.isatty() if progress is None else progress)
    bar = ProgressBar(max_steps, start_step) if show_bar else None
    log_interval = max(1, min(10, tcfg.eval_interval))
    log.info("training %s: %s params, %d steps from %d, %s/%s, world size %d", config.preset, f"{params:,}",
             max_steps, start_step, device, dtype_name(dtype), ddp.world_size)

    health = HealthMonitor(device, ddp, tcfg.lr)
    history = read_metrics(run_dir) if previous else []
    last_record: Optional[dict[str, Any]] = history[-1] if history else None
    last_ckpt = previous[0] if previous else None
    stopped_by = "max_epochs" if tcfg.max_epochs is not None else "max_iters"
    out_of_time, time_fraction, stopping = False, 0.0, False
    t_loop = time.monotonic()
    t_log, tokens_at_log = t_loop, tokens_seen
    eval_seconds = 0.0
    loss = None
    while True:
        at_end = step >= max_steps or out_of_time or stopping
        # The first evaluation of a run started from a checkpoint scores that model on this data.
        new_step = step > start_step or previous is None
        record, improved = None, False
        # A stop by signal skips the final evaluation (it can take long); eval batches use no RNG,
        # so the resumed run still matches an uninterrupted one.
        evaluates = new_step and (step % tcfg.eval_interval == 0 or (at_end and not stopping))
        checkpoints = new_step and step > segment_start and (step % tcfg.checkpoint_interval == 0 or at_end)
        if evaluates or checkpoints:
            health.check(last_ckpt)
        if evaluates:
            t_eval = time.monotonic()
            losses = estimate_loss(eval_model, eval_windows, eval_batches, device, dtype, ddp)
            eval_seconds += time.monotonic() - t_eval
            health.check(last_ckpt, losses, step)
            record = {"step": step, "train_loss": losses["train"], "val_loss": losses["val"],
                      "lr": learning_rate(min(step, max_steps - 1), tcfg, max_steps, segment_start, time_fraction),
                      "tokens_seen": tokens_seen,
                      "elapsed_seconds": round(time.monotonic() - t_start, 3), "max_steps": max_steps}
            # Only trained steps can be this run's best (never the model it started from).
            improved = step > segment_start and record["val_loss"] < best_val
            if improved:
                best_val, best_step = record["val_loss"], step
            last_record = record
            if ddp.is_main:
                _append_metrics(run_dir, record)
                if bar is None:
                    log.info("step %d/%d: train loss %.4f, val loss %.4f", step, max_steps, record["train_loss"], record["val_loss"])
                if on_eval is not None:
                    on_eval(dict(record))
        if checkpoints or improved:
            rng_states = ddp.gather(_rng_state(device))
            if ddp.is_main:
                last_ckpt = save_checkpoint(run_dir, step, raw_model.state_dict(),
                                            {name: opt.state_dict() for name, opt in optimizers.items()}, rng_states, {
                    "val_loss": record["val_loss"] if record else None, "best_val_loss": best_val if best_step is not None else None,
                    "best_step": best_step, "tokens_seen": tokens_seen, "vocab_size": vocab_size,
                    "config": config.model_dump(mode="json"), "segment_start": segment_start,
                    "grad_scaler": scaler.state_dict() if scaler is not None else None,
                })
                prune_checkpoints(run_dir, tcfg.keep_last)
            ddp.barrier()
        if at_end:
            break

        apply_schedule(optimizers, step, tcfg, max_steps, segment_start, time_fraction)
        if tuner is not None:
            threads = tuner.threads_for_next_step()
            if threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            t_step = time.perf_counter()
        step_losses = torch.zeros((), device=device)
        for micro in range(tcfg.grad_accum):
            x, y = windows["train"].batch(step * tcfg.grad_accum + micro, stream=ddp.rank)
            # Gradients are all-reduced once per optimizer step, on the last micro-batch.
            sync = nullcontext() if not ddp.enabled or micro == tcfg.grad_accum - 1 else model.no_sync()
            with sync:
                with autocast(device, dtype):
                    _, loss = model(x, y)
                loss = loss / tcfg.grad_accum
                (scaler.scale(loss) if scaler is not None else loss).backward()
            step_losses += loss.detach().float()
        if tcfg.grad_clip is not None:
            if scaler is not None:
                for optimizer in optimizers.values():
                    scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(raw_model.parameters(), tcfg.grad_clip)
        elif scaler is None:
            grad_norm = torch.nn.utils.get_total_norm([p.grad for p in raw_model.parameters() if p.grad is not None])
        # fp16's grad scaler skips steps with inf gradients by design; only its loss must stay finite.
        health.record(step, step_losses if scaler is not None else step_losses + grad_norm)
        for optimizer in optimizers.values():
            if scaler is not None:
                scaler.step(optimizer)
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.update()
        if tuner is not None:
            tuner.record(time.perf_counter() - t_step)
        step += 1
        tokens_seen += tokens_per_step

        # Reading the loss waits for the device, so it happens only here, never every step.
        if step % log_interval == 0:
            health.check(last_ckpt)
        if step % log_interval == 0 and (bar is not None or time.monotonic() - t_log >= LOG_SECONDS):
            now = time.monotonic()
            train_loss, rate = loss.item() * tcfg.grad_accum, (tokens_seen - tokens_at_log) / max(now - t_log, 1e-9)
            if bar is not None:
                bar.update(step, train_loss, rate)
            else:
                log.info("step %d/%d: loss %.4f, %s tok/s", step, max_steps, train_loss, f"{rate:,.0f}")
            t_log, tokens_at_log = now, tokens_seen
        if tcfg.max_minutes is not None:
            # One value for all ranks, so they stop at the same step with the same learning rate.
            time_fraction = ddp.max((time.monotonic() - t_start) / (60 * tcfg.max_minutes), device)
            out_of_time = time_fraction >= 1.0
            if out_of_time:
                stopped_by = "max_minutes"
                log.info("time budget of %s min reached at step %d; saving a checkpoint", tcfg.max_minutes, step)
        # Ranks must agree on the step they stop at; agreeing costs a collective, so only every few steps.
        if not ddp.enabled:
            stopping = stop.requested
        elif step % log_interval == 0:
            stopping = ddp.any(stop.requested, device)
        if stopping:
            log.info("stop requested at step %d; saving a checkpoint", step)
    if bar is not None:
        bar.close()
    if stopping:
        signum = stop.signum or signal.SIGTERM
        saved = f"checkpoint {last_ckpt}" if ddp.is_main else "rank 0 saved the checkpoint"
        raise Interrupted(signum, f"training stopped by {signal_name(signum)} at step {step}; {saved}; "
                                  "run the same command again to resume")

    train_seconds = time.monotonic() - t_loop
    wall_seconds = time.monotonic() - t_start
    trained_tokens = (step - start_step) * tokens_per_step
    best = resolve_checkpoint(run_dir, "best")[0] if last_ckpt is not None else None
    summary = {
        "steps": step, "max_steps": max_steps, "stopped_by": stopped_by if step > start_step or out_of_time else "already_done",
        "best_step": best_step, "best_val_loss": best_val if best_step is not None else None,
        "final_train_loss": last_record["train_loss"] if last_record else None,
        "final_val_loss": last_record["val_loss"] if last_record else None,
        "tokens_seen": tokens_seen, "wall_seconds": round(wall_seconds, 3),
        "tokens_per_second": round(trained_tokens / train_seconds, 1) if trained_tokens else None,
        "params": params, "resumed_from_step": start_step if previous is not None else None,
        "start_from": str(init[0]) if init else None, "segment_start": segment_start,
        "checkpoint_best": str(best) if best else None, "checkpoint_last": str(last_ckpt) if last_ckpt else None,
        "metrics_path": str(run_dir / METRICS_FILE), "run_dir": str(run_dir), "device": str(device),
        "dtype": dtype_name(dtype), "world_size": ddp.world_size,
        "eval_seconds": round(eval_seconds, 3), "eval_share": round(eval_seconds / max(wall_seconds, 1e-9), 4),
        "threads": {**thread_info, "final": torch.get_num_threads(), "switches": tuner.switches if tuner else 0},
    }
    if ddp.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary


@torch.no_grad()
def evaluate_run(run_dir: str | os.PathLike, data_dir: str | os.PathLike, checkpoint: str = "best",
                 batches: Optional[int] = None) -> dict[str, Any]:
    """Val loss of a checkpoint over the whole val split (or ``batches`` random batches) and bits
    per character (char tokenizer) or per token (BPE, where ``bits_per_char`` is None)."""
    from cortexcraft.generate import load_model

    manifest = verify_shards(data_dir)
    device = select_device("auto")
    model, state = load_model(run_dir, checkpoint, device)
    if manifest["vocab_size"] != state["vocab_size"]:
        raise CortexCraftError(
            f"{data_dir} has vocab_size {manifest['vocab_size']} but the checkpoint expects {state['vocab_size']}; evaluate on the run's data"
        )
    run_cfg = RunConfig.model_validate(state["config"])
    windows = TokenWindows(data_dir, "val", run_cfg.model.block_size, run_cfg.train.batch_size, run_cfg.train.seed, device)
    source = (windows.batch(i, stream=EVAL_STREAM) for i in range(batches)) if batches else windows.sequential(run_cfg.train.batch_size)
    total_loss, tokens = 0.0, 0
    for x, y in source:
        _, loss = model(x, y)
        # The loss is a mean over scored targets; the end of `sequential` marks re-scored ones.
        scored = int((y != IGNORE_INDEX).sum())
        total_loss += loss.item() * scored
        tokens += scored
    if tokens == 0:
        raise CortexCraftError(f"the val split of {data_dir} is shorter than one window of {run_cfg.model.block_size} tokens; prepare more data")
    val_loss = total_loss / tokens
    bits = val_loss / math.log(2)
    is_char = manifest["tokenizer"]["type"] == "char"
    return {"val_loss": val_loss, "bits_per_token": bits, "bits_per_char": bits if is_char else None,
            "tokens": tokens, "checkpoint": state["path"], "step": state["step"]}
