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

It reads top to bottom as setup (``_setup_hardware``, ``_restore``, ``_start_run_files``), the loop
in ``_train``, one optimizer step (``_train_step``), and the summary.
"""
from __future__ import annotations

import logging
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from tqdm.contrib.logging import logging_redirect_tqdm

from cortexcraft.batches import TokenWindows
from cortexcraft.checkpoint import (
    latest_checkpoint, list_checkpoints, load_model_state, load_training_state, prune_checkpoints,
    read_checkpoint_state, resolve_checkpoint, save_checkpoint, shape_changes,
)
from cortexcraft.config import RunConfig, TrainConfig
from cortexcraft.device import (
    autocast,
    compile_model,
    deterministic_algorithms,
    dtype_name,
    grad_scaler,
    select_device,
    select_dtype,
    vocab_multiple,
)
from cortexcraft.distributed import Distributed
from cortexcraft.errors import CortexCraftError
from cortexcraft.evaluate import Cadence, estimate_loss, eval_plan
from cortexcraft.fileio import atomic_write_json, remove_dead_temps, sha256_json
from cortexcraft.interrupt import Interrupted, StopRequest, signal_name
from cortexcraft.locks import lock_run_dir
from cortexcraft.metrics import METRICS_FILE, append_metrics, progress_bar, read_metrics, write_metrics
from cortexcraft.model import GPT, check_model_config, keep_true_vocabulary_in, matmul_shapes, parameter_count
from cortexcraft.optim import Optimizers, learning_rate, max_steps_for
from cortexcraft.shards import verify_shards
from cortexcraft.threads import ThreadTuner, choose_threads
from cortexcraft.tokenizer import load_tokenizer

log = logging.getLogger(__name__)

# dtype calibration times matmuls over at most this many tokens: enough rows to show each
# precision's speed, few enough that a 50k-token vocabulary head costs well under a second.
CALIBRATION_TOKENS = 512
# Without a terminal progress bar, a progress log line at most this often.
LOG_SECONDS = 30.0


@dataclass
class Position:
    """Where a run stands: saved in every checkpoint, restored on resume."""

    step: int = 0
    tokens_seen: int = 0
    best_val: float = math.inf
    best_step: Optional[int] = None
    segment_start: int = 0  # where this run's learning-rate segment began (a run started from another model)

    def improves(self, val_loss: float) -> bool:
        """Record an evaluation; True when it is this run's best. Only trained steps can be its
        best, never the model it started from."""
        if self.step > self.segment_start and val_loss < self.best_val:
            self.best_val, self.best_step = val_loss, self.step
            return True
        return False


class HealthMonitor:
    """Remembers, on the device, the first step whose loss or gradients were not finite, so that
    checking costs no device sync per step; ``check`` syncs (all ranks, so they stop together)
    and raises if one was."""

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
            f"nothing after it was saved; {saved}; lower train.lr (was {self.lr:.3g}) or set train.grad_clip, "
            f"then re-run to resume"
        )


class StopRule:
    """When the loop ends: at ``max_steps``, when the ``max_minutes`` budget is spent, or on
    SIGINT/SIGTERM. Ranks must stop at the same step with the same learning rate (which follows
    the clock under wsd), so under DDP the clock and the signal flag are agreed by a collective
    every ``interval`` steps, never every step. The budget counts from ``t_start``, compiling
    included: a budget is wall-clock time, and compiling pays only when it saves more than it costs."""

    def __init__(
        self,
        cfg: TrainConfig,
        max_steps: int,
        t_start: float,
        stop: StopRequest,
        ddp: Distributed,
        device: torch.device,
        interval: int,
    ):
        self.max_steps, self.minutes, self.stop, self.ddp, self.device = max_steps, cfg.max_minutes, stop, ddp, device
        self.interval = interval
        self.t_start = t_start
        self.reason = "max_epochs" if cfg.max_epochs is not None else "max_iters"
        self.time_fraction, self.out_of_time, self.signalled = 0.0, False, False

    def done(self, step: int) -> bool:
        return step >= self.max_steps or self.out_of_time or self.signalled

    def after_step(self, step: int) -> None:
        if self.ddp.enabled and step % self.interval:
            return
        if self.minutes is not None:
            self.time_fraction = self.ddp.max((time.monotonic() - self.t_start) / (60 * self.minutes), self.device)
            self.out_of_time = self.time_fraction >= 1.0
            if self.out_of_time:
                self.reason = "max_minutes"
                log.info("time budget of %s min reached at step %d; saving a checkpoint", self.minutes, step)
        self.signalled = self.ddp.any(self.stop.requested, self.device)
        if self.signalled:
            log.info("stop requested at step %d; saving a checkpoint", step)


class ProgressReport:
    """Loss and tokens/s every ``interval`` steps: on the progress bar, or as a log line at most
    every LOG_SECONDS. Reading the loss waits for the device, so it happens only here."""

    def __init__(self, bar: Any, max_steps: int, tokens_seen: int, grad_accum: int):
        self.bar, self.max_steps, self.grad_accum = bar, max_steps, grad_accum
        self.t_last, self.tokens_at_last = time.monotonic(), tokens_seen

    def after_step(self, step: int, loss: torch.Tensor, tokens_seen: int) -> None:
        now = time.monotonic()
        if self.bar is None and now - self.t_last < LOG_SECONDS:
            return
        train_loss, rate = (
            loss.item() * self.grad_accum,
            (tokens_seen - self.tokens_at_last) / max(now - self.t_last, 1e-9),
        )
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {train_loss:.4f}  {rate:,.0f} tok/s", refresh=False)
            self.bar.update(step - self.bar.n)
        else:
            log.info("step %d/%d: loss %.4f, %s tok/s", step, self.max_steps, train_loss, f"{rate:,.0f}")
        self.t_last, self.tokens_at_last = now, tokens_seen


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


def _check_resumable(state: dict[str, Any], config: RunConfig, vocab_size: int, where: str, fix: str) -> None:
    if changed := shape_changes(state["config"]["model"], config.model.model_dump(mode="json")):
        raise CortexCraftError(f"{where} holds a model with a different shape ({', '.join(changed)}); {fix}")
    if state["vocab_size"] != vocab_size:
        raise CortexCraftError(
            f"{where} was trained with vocab_size {state['vocab_size']} but the data has {vocab_size}; {fix}"
        )


def _with_pretrained_architecture(config: RunConfig, manifest: dict[str, Any], data_dir: Path) -> RunConfig:
    """``config`` with the model section of its ``init_from`` checkpoint, after checking that the
    data was tokenized with that checkpoint's tokenizer."""
    from cortexcraft.pretrained import pretrained_model_config, pretrained_vocab_size

    spec = config.train.init_from
    expected = pretrained_vocab_size(spec)
    if manifest["tokenizer"]["type"] != "bpe" or manifest["vocab_size"] != expected:
        raise CortexCraftError(
            f"{data_dir} was tokenized with a {manifest['tokenizer']['type']} vocabulary of {manifest['vocab_size']:,} "
            f"tokens, but init_from={spec} reads {expected:,} BPE tokens; prepare the data with its tokenizer "
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
    fresh), its step and tokens seen, and a learning-rate segment of its own (warmup + decay from
    that step to ``max_iters``, which must lie beyond it); its best checkpoint is chosen among the
    new steps. ``on_eval`` gets every eval record (rank 0). ``progress`` draws a progress bar on
    stderr (default: when stderr is a terminal). Returns the summary also written to
    RUN_DIR/summary.json.

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
    tcfg = config.train
    check_model_config(config.model, vocab_size)

    ddp = Distributed(tcfg.device)
    lock, completed = None, False
    threads_before = torch.get_num_threads()
    try:
        if ddp.is_main:
            lock = lock_run_dir(run_dir)
            remove_dead_temps(run_dir)
        if not resume and list_checkpoints(run_dir):
            raise CortexCraftError(
                f"{run_dir} already has checkpoints; continue it (resume) or choose a new run directory"
            )
        previous = latest_checkpoint(run_dir) if resume else None
        if previous is not None:
            _check_resumable(
                previous[1], config, vocab_size, str(run_dir), "use a new --out or the run's original settings"
            )
            saved_optimizer = previous[1]["config"]["train"].get("optimizer", "adamw")
            if saved_optimizer != tcfg.optimizer:  # a new segment (start_from) may switch, a resume may not
                raise CortexCraftError(
                    f"{run_dir} was trained with optimizer={saved_optimizer}, not {tcfg.optimizer}; "
                    f"use a new --out or --set optimizer={saved_optimizer}"
                )
        init = None
        if start_from is not None and previous is None:
            init = (Path(start_from), read_checkpoint_state(start_from))
            _check_resumable(init[1], config, vocab_size, f"checkpoint {start_from}", "train from scratch instead")
            if tcfg.max_epochs is None and tcfg.max_iters <= init[1]["step"]:
                raise CortexCraftError(
                    f"max_iters {tcfg.max_iters} is not beyond step {init[1]['step']} of "
                    f"{start_from}; set max_iters to the step to train up to"
                )
        with StopRequest() as stop, deterministic_algorithms(tcfg.deterministic):
            summary = _train(config, data_dir, run_dir, manifest, previous, init, ddp, on_eval, progress, t_start, stop)
        completed = True
        return summary
    finally:
        if lock is not None:
            lock.release()
        torch.set_num_threads(threads_before)  # the caller's setting, whatever training chose
        ddp.close(completed)


def _setup_hardware(
    config: RunConfig, vocab_size: int, ddp: Distributed
) -> tuple[torch.device, torch.dtype, Optional[ThreadTuner], dict]:
    """Device, autocast dtype and CPU threads. All ranks train in one precision, whatever each
    rank's own calibration found."""
    tcfg, mcfg = config.train, config.model
    device = select_device(tcfg.device, ddp.local_rank)
    tuner, thread_info = None, {}
    if device.type == "cpu":
        threads, tuner, thread_info = choose_threads(tcfg.threads, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
        torch.set_num_threads(threads)
    shapes = matmul_shapes(mcfg, vocab_size, min(CALIBRATION_TOKENS, tcfg.batch_size * mcfg.block_size))
    dtype = select_dtype(device, tcfg.dtype, shapes)
    if device.type == "cpu" and tcfg.dtype == "auto" and ddp.enabled:
        dtype = torch.bfloat16 if ddp.any(dtype == torch.bfloat16, device) else torch.float32
    return device, dtype, tuner, thread_info


def _restore(
    config: RunConfig,
    vocab_size: int,
    device: torch.device,
    dtype: torch.dtype,
    ddp: Distributed,
    previous: Optional[tuple[Path, dict]],
    init: Optional[tuple[Path, dict]],
    run_dir: Path,
) -> tuple[GPT, Optimizers, Position]:
    """The model, its optimizers and where the run stands: new (or from pretrained weights), from
    another run's checkpoint (weights, step and tokens; fresh optimizers), or resumed with every
    state including each rank's RNG, so that a resumed run ends bitwise identical to an
    uninterrupted one."""
    tcfg = config.train
    torch.manual_seed(tcfg.seed + ddp.rank)
    model = GPT(config.model, vocab_size, pad_vocab_to=vocab_multiple(device))
    if tcfg.init_from and previous is None:
        from cortexcraft.pretrained import pretrained_state

        model.load_state_dict(pretrained_state(tcfg.init_from, config.model))
        log.info("initialised from %s", tcfg.init_from)
    model = model.to(device)
    optimizers = Optimizers(model, tcfg, device, grad_scaler(device, dtype))
    for optimizer in optimizers.by_name().values():
        keep_true_vocabulary_in(model, optimizer)
    at = Position()
    if init is not None:
        path, state = init
        model.load_state_dict(load_model_state(path, device))
        at.step = at.segment_start = state["step"]
        at.tokens_seen = state["tokens_seen"]
        log.info("starting %s from %s (step %d)", run_dir, path, at.step)
    if previous is not None:
        path, state = previous
        model.load_state_dict(load_model_state(path, device))
        optimizer_states, rng_states = load_training_state(path, state)
        optimizers.load_state_dict(optimizer_states)
        if state.get("grad_scaler"):
            optimizers.scaler.load_state_dict(state["grad_scaler"])
        if ddp.rank < len(rng_states):
            _set_rng_state(rng_states[ddp.rank], device)
        else:
            log.warning("%s has no RNG state for rank %d (world size changed); dropout is reseeded", path, ddp.rank)
        at = Position(
            state["step"],
            state["tokens_seen"],
            state["best_val_loss"] if state["best_val_loss"] is not None else math.inf,
            state["best_step"],
            state.get("segment_start", 0),
        )
        log.info("resuming %s from %s (step %d)", run_dir, path.name, at.step)
    return model, optimizers, at


def _start_run_files(
    run_dir: Path,
    config: RunConfig,
    data_dir: Path,
    manifest: dict[str, Any],
    device: torch.device,
    dtype: torch.dtype,
    ddp: Distributed,
    params: int,
    init: Optional[tuple[Path, dict]],
    at: Position,
    resumed: bool,
) -> None:
    """run.json, the tokenizer, and a metrics history that ends where the checkpoint does, so that a
    resumed run's history equals an uninterrupted one's."""
    run_dir.mkdir(parents=True, exist_ok=True)
    load_tokenizer(data_dir).save(run_dir)
    atomic_write_json(
        run_dir / "run.json",
        {
            "config": config.model_dump(mode="json"),
            "data_dir": str(data_dir.resolve()),
            "data_manifest_sha256": sha256_json(manifest),
            "data_source": manifest.get("source"),
            "vocab_size": manifest["vocab_size"],
            "params": params,
            "device": str(device),
            "dtype": dtype_name(dtype),
            "world_size": ddp.world_size,
            "start_from": str(init[0]) if init else None,
            "segment_start": at.segment_start,
        },
    )
    write_metrics(run_dir, [r for r in read_metrics(run_dir) if r["step"] <= at.step] if resumed else [])
    prune_checkpoints(run_dir, config.train.keep_last)


# On CPU, compiling takes 20-40 s (inductor writes and builds C++ kernels) and then makes the `cpu`
# preset's steps 1.4x faster: it pays back over minutes, not over the short runs of a test or a recipe
# that stops at a step count.
CPU_COMPILE_MINUTES = 3.0
CPU_COMPILE_STEPS = 1000


def compiles(cfg: TrainConfig, device: torch.device, max_steps: int) -> bool:
    """``compile`` if set; by default on CUDA, and on CPU for a run budgeted by the clock for at least
    CPU_COMPILE_MINUTES whose step cap (at least CPU_COMPILE_STEPS) does not end it first."""
    if cfg.compile is not None:
        return cfg.compile
    if device.type == "cuda":
        return True
    return (
        device.type == "cpu"
        and cfg.max_minutes is not None
        and cfg.max_minutes >= CPU_COMPILE_MINUTES
        and max_steps >= CPU_COMPILE_STEPS
    )


def _compiled_and_wrapped(
    raw_model: GPT, compiling: bool, device: torch.device, ddp: Distributed
) -> tuple[torch.nn.Module, torch.nn.Module, bool]:
    """(model that trains, model that evaluates, whether training is compiled). Shapes are static,
    so on a GPU evaluation batches get a graph of their own instead of turning the training graph
    dynamic. On CPU evaluation stays uncompiled: its graph took 18 s to build for the `cpu` preset,
    more than a 5.5-minute run's ten evaluations (2 s each) would save."""
    model = compile_model(raw_model, device) if compiling else raw_model
    compiled = model is not raw_model  # compile_model falls back without a C++ compiler
    eval_model = raw_model if device.type == "cpu" else model
    if ddp.enabled:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None
        )
    return model, eval_model, compiled


def _train_step(
    model: torch.nn.Module,
    params: list[torch.nn.Parameter],
    optimizers: Optimizers,
    windows: TokenWindows,
    step: int,
    cfg: TrainConfig,
    device: torch.device,
    dtype: torch.dtype,
    ddp: Distributed,
    health: HealthMonitor,
) -> torch.Tensor:
    """One optimizer step over ``grad_accum`` micro-batches; returns the last micro-batch's loss.
    Batches are a pure function of (step, rank), which bitwise resume relies on; nothing here reads
    a value back from the device, so a step never waits for it."""
    step_losses = torch.zeros((), device=device)
    for micro in range(cfg.grad_accum):
        x, y = windows.batch(step * cfg.grad_accum + micro, stream=ddp.rank)
        # Gradients are all-reduced once per optimizer step, on the last micro-batch.
        sync = nullcontext() if not ddp.enabled or micro == cfg.grad_accum - 1 else model.no_sync()
        with sync:
            with autocast(device, dtype):
                logits, loss = model(x, y)
            objective = loss if not cfg.z_loss else loss + cfg.z_loss * squared_log_normalizer(logits)
            loss = loss / cfg.grad_accum
            optimizers.scaler.scale(objective / cfg.grad_accum).backward()
        step_losses += loss.detach().float()
    fp16 = optimizers.scaler.is_enabled()
    if cfg.grad_clip is not None:
        optimizers.unscale_gradients()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
    elif not fp16:
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    # fp16's grad scaler skips steps with inf gradients by design; only its loss must stay finite.
    health.record(step, step_losses if fp16 else step_losses + grad_norm)
    optimizers.step()
    return loss


def squared_log_normalizer(logits: torch.Tensor) -> torch.Tensor:
    """Mean squared log of the softmax normalizer over every position (PaLM's z-loss)."""
    return torch.logsumexp(logits.float(), dim=-1).square().mean()


def _save(
    run_dir: Path,
    at: Position,
    model: GPT,
    optimizers: Optimizers,
    record: Optional[dict[str, Any]],
    config: RunConfig,
    vocab_size: int,
    device: torch.device,
    ddp: Distributed,
) -> Optional[Path]:
    """A checkpoint of this step, written by rank 0 with every rank's RNG state; ranks go on only
    when it is on disk, so that all of them resume from the same one."""
    rng_states = ddp.gather(_rng_state(device))
    path = None
    if ddp.is_main:
        path = save_checkpoint(
            run_dir,
            at.step,
            model.state_dict(),
            optimizers.state_dict(),
            rng_states,
            {
                "val_loss": record["val_loss"] if record else None,
                "best_val_loss": at.best_val if at.best_step is not None else None,
                "best_step": at.best_step,
                "tokens_seen": at.tokens_seen,
                "vocab_size": vocab_size,
                "config": config.model_dump(mode="json"),
                "segment_start": at.segment_start,
                "grad_scaler": optimizers.scaler.state_dict() or None,
            },
        )
        prune_checkpoints(run_dir, config.train.keep_last)
    ddp.barrier()
    return path


def _train(
    config: RunConfig,
    data_dir: Path,
    run_dir: Path,
    manifest: dict[str, Any],
    previous: Optional[tuple[Path, dict[str, Any]]],
    init: Optional[tuple[Path, dict[str, Any]]],
    ddp: Distributed,
    on_eval: Optional[Callable[[dict], None]],
    progress: Optional[bool],
    t_start: float,
    stop: StopRequest,
) -> dict[str, Any]:
    tcfg, mcfg, vocab_size = config.train, config.model, manifest["vocab_size"]
    device, dtype, tuner, thread_info = _setup_hardware(config, vocab_size, ddp)
    windows = {
        split: TokenWindows(data_dir, split, mcfg.block_size, tcfg.batch_size, tcfg.seed, device)
        for split in ("train", "val")
    }
    eval_batches, eval_batch_size = eval_plan(tcfg.eval_iters, tcfg.batch_size, mcfg.block_size, vocab_size)
    eval_windows = {
        split: TokenWindows(data_dir, split, mcfg.block_size, eval_batch_size, tcfg.seed, device)
        for split in ("train", "val")
    }
    tokens_per_step = tcfg.batch_size * mcfg.block_size * tcfg.grad_accum * ddp.world_size
    max_steps = max_steps_for(tcfg, windows["train"].tokens, tokens_per_step)
    raw_model, optimizers, at = _restore(config, vocab_size, device, dtype, ddp, previous, init, run_dir)
    start_step, params = at.step, parameter_count(mcfg, vocab_size)
    if ddp.is_main:
        _start_run_files(
            run_dir, config, data_dir, manifest, device, dtype, ddp, params, init, at, previous is not None
        )
    ddp.barrier()
    model, eval_model, compiled = _compiled_and_wrapped(raw_model, compiles(tcfg, device, max_steps), device, ddp)
    log_interval = max(1, min(10, tcfg.eval_interval))
    cadence = Cadence.of(tcfg, start_step, at.segment_start, resumed=previous is not None)
    rule = StopRule(tcfg, max_steps, t_start, stop, ddp, device, log_interval)
    health = HealthMonitor(device, ddp, tcfg.lr)
    history = read_metrics(run_dir) if previous else []
    last_record, last_ckpt = (history[-1] if history else None), (previous[0] if previous else None)
    show_bar = ddp.is_main and (sys.stderr.isatty() if progress is None else progress)
    bar = progress_bar(max_steps, start_step) if show_bar else None
    report = ProgressReport(bar, max_steps, at.tokens_seen, tcfg.grad_accum)
    log.info(
        "training %s: %s params, %d steps from %d, %s/%s%s, world size %d",
        config.preset,
        f"{params:,}",
        max_steps,
        start_step,
        device,
        dtype_name(dtype),
        ", compiled" if compiled else "",
        ddp.world_size,
    )

    trainable = list(raw_model.parameters())
    t_loop, eval_seconds = time.monotonic(), 0.0
    with logging_redirect_tqdm() if bar is not None else nullcontext():
        while True:
            at_end = rule.done(at.step)
            evaluates, checkpoints = (
                cadence.evaluates(at.step, at_end, rule.signalled),
                cadence.checkpoints(at.step, at_end),
            )
            record, improved = None, False
            if evaluates or checkpoints:
                health.check(last_ckpt)
            if evaluates:
                t_eval = time.monotonic()
                losses = estimate_loss(eval_model, eval_windows, eval_batches, device, dtype, ddp)
                eval_seconds += time.monotonic() - t_eval
                health.check(last_ckpt, losses, at.step)
                lr = learning_rate(min(at.step, max_steps - 1), tcfg, max_steps, at.segment_start, rule.time_fraction)
                record = last_record = {
                    "step": at.step,
                    "train_loss": losses["train"],
                    "val_loss": losses["val"],
                    "lr": lr,
                    "tokens_seen": at.tokens_seen,
                    "elapsed_seconds": round(time.monotonic() - t_start, 3),
                    "max_steps": max_steps,
                }
                improved = at.improves(record["val_loss"])
                if ddp.is_main:
                    append_metrics(run_dir, record)
                    log.info(
                        "step %d/%d: train loss %.4f, val loss %.4f, lr %.2e, %s tokens, %.1f s",
                        at.step,
                        max_steps,
                        losses["train"],
                        losses["val"],
                        lr,
                        f"{at.tokens_seen:,}",
                        record["elapsed_seconds"],
                    )
                    if on_eval is not None:
                        on_eval(dict(record))
            if checkpoints or improved:
                last_ckpt = (
                    _save(run_dir, at, raw_model, optimizers, record, config, vocab_size, device, ddp) or last_ckpt
                )
            if at_end:
                break

            optimizers.schedule(at.step, max_steps, at.segment_start, rule.time_fraction)
            threads = tuner.threads_for_next_step() if tuner is not None else None
            if threads is not None and threads != torch.get_num_threads():
                torch.set_num_threads(threads)
            t_step = time.perf_counter()
            loss = _train_step(
                model, trainable, optimizers, windows["train"], at.step, tcfg, device, dtype, ddp, health
            )
            if tuner is not None:
                tuner.record(time.perf_counter() - t_step)
            at.step += 1
            at.tokens_seen += tokens_per_step
            if at.step % log_interval == 0:
                health.check(last_ckpt)
                report.after_step(at.step, loss, at.tokens_seen)
            rule.after_step(at.step)
    if bar is not None:
        bar.close()
    if rule.signalled:
        signum = stop.signum or signal.SIGTERM
        saved = f"checkpoint {last_ckpt}" if ddp.is_main else "rank 0 saved the checkpoint"
        raise Interrupted(
            signum,
            f"training stopped by {signal_name(signum)} at step {at.step}; {saved}; "
            "run the same command again to resume",
        )

    train_seconds, wall_seconds = time.monotonic() - t_loop, time.monotonic() - t_start
    trained_tokens = (at.step - start_step) * tokens_per_step
    best = resolve_checkpoint(run_dir, "best")[0] if last_ckpt is not None else None
    summary = {
        "steps": at.step,
        "max_steps": max_steps,
        "stopped_by": rule.reason if at.step > start_step or rule.out_of_time else "already_done",
        "best_step": at.best_step,
        "best_val_loss": at.best_val if at.best_step is not None else None,
        "final_train_loss": last_record["train_loss"] if last_record else None,
        "final_val_loss": last_record["val_loss"] if last_record else None,
        "tokens_seen": at.tokens_seen,
        "wall_seconds": round(wall_seconds, 3),
        "tokens_per_second": round(trained_tokens / train_seconds, 1) if trained_tokens else None,
        "params": params,
        "resumed_from_step": start_step if previous is not None else None,
        "start_from": str(init[0]) if init else None,
        "segment_start": at.segment_start,
        "checkpoint_best": str(best) if best else None,
        "checkpoint_last": str(last_ckpt) if last_ckpt else None,
        "metrics_path": str(run_dir / METRICS_FILE),
        "run_dir": str(run_dir),
        "device": str(device),
        "dtype": dtype_name(dtype),
        "compiled": compiled,
        "world_size": ddp.world_size,
        "eval_seconds": round(eval_seconds, 3),
        "eval_share": round(eval_seconds / max(wall_seconds, 1e-9), 4),
        "threads": {**thread_info, "final": torch.get_num_threads(), "switches": tuner.switches if tuner else 0},
    }
    if ddp.is_main:
        atomic_write_json(run_dir / "summary.json", summary)
    return summary
