"""Distance to the hardware's limit: MFU of training on this CPU, and where a step's time goes.

MFU = model FLOPs per second / this CPU's peak matmul FLOP/s, both measured in this run: the peak
is the best of large square matmuls (fp32 and bf16) at the thread count training uses. Model
FLOPs per token are nanoGPT's (PaLM's) estimate: 6 x the parameters that multiply (every Linear
weight, the LM head included) + 12 x layers x width x context for attention. A step's time is
that of the trainer itself (``cortexcraft.train``, timed between its last two evals; best of two
alternating rounds), for the ``cpu`` preset (eager in bf16 and fp32, and compiled in bf16 as its
5.5-minute runs train, timed after the compiling steps) and for nanoGPT's CPU config, beside the
nanoGPT-style reference. Compiling itself is timed too: seconds to the first step from an empty
compile cache, and the time per step after, for the blocks compiled as the trainer does and for one
whole-model graph, each in a fresh process.

The profile runs the trainer's own step function (``cortexcraft.train._train_step``) on the
``cpu`` preset under torch.profiler and sorts each op's self time into: matmuls (forward and
backward), attention (the fused SDPA kernels, or the batched matmuls and softmax of the
short-context path), optimizer (Muon, AdamW, clipping, zero_grad),
dtype casts (autocast), other ops (norms, activations, embedding, loss...), and the rest of the
wall time: Python and dispatcher overhead between ops. The profiler adds overhead of its own, so
shares are of the profiled step, printed beside the unprofiled step time.

    python bench/bench_limits.py [--quick] [--threads N]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
import tempfile

import torch

from benchlib import markdown_table, parse_args, prepared_tinyshakespeare, print_table, save_results

PEAK_SIZES = (1024, 2048)
CATEGORIES = ("matmul", "attention", "optimizer", "dtype casts", "other ops", "Python and dispatch overhead")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::baddbmm", "aten::_weight_int8pack_mm"}
# Outside the optimizer only attention multiplies batched (4-D) tensors: its short-context path's
# two matmuls and softmax, forward and backward.
ATTENTION_OPS = {"aten::bmm", "aten::_softmax", "aten::_softmax_backward_data"}
CAST_OPS = {"aten::to", "aten::_to_copy", "aten::copy_"}


def peak_matmul_flops(dtype: torch.dtype, seconds: float) -> dict:
    """The best FLOP/s of n x n @ n x n matmuls over ``PEAK_SIZES``, each timed for ``seconds``."""
    best = {}
    for n in PEAK_SIZES:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        for _ in range(2):
            a @ b
        rate, end = 0.0, time.perf_counter() + seconds
        while time.perf_counter() < end:
            start = time.perf_counter()
            a @ b
            rate = max(rate, 2 * n**3 / (time.perf_counter() - start))
        best[n] = rate
    size = max(best, key=best.get)
    return {"flops": best[size], "size": size, "by_size": best}


def attention_kernels(batch: int, heads: int, context: int, head_dim: int, repeats: int) -> dict[str, float]:
    """Milliseconds of one causal attention's forward + backward at one shape (best of ``repeats``):
    the model's CPU short-context path (bf16 matmuls around a masked softmax) and torch's flash
    kernel in fp32 (what CPU autocast ran before) and in bf16."""
    import torch.nn.functional as F

    from cortexcraft.model import masked_softmax_attention

    def flash(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    kernels = {"masked softmax, bf16 (ours)": (lambda q, k, v: masked_softmax_attention(q, k, v, 0.0, q.dtype),
                                               torch.bfloat16),
               "flash, fp32": (flash, torch.float32), "flash, bf16": (flash, torch.bfloat16)}
    best = {}
    for name, (kernel, dtype) in kernels.items():
        q, k, v = (torch.randn(batch, heads, context, head_dim, dtype=dtype, requires_grad=True) for _ in range(3))
        grad = torch.randn_like(q)
        kernel(q, k, v).backward(grad)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            kernel(q, k, v).backward(grad)
            times.append(time.perf_counter() - start)
        best[name] = 1000 * min(times)
    return best


def flops_per_token(model: torch.nn.Module, n_layer: int, n_embd: int, block_size: int) -> float:
    multiplying = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * multiplying + 12 * n_layer * n_embd * block_size


def our_model(overrides: dict, vocab_size: int):
    from cortexcraft.config import build_config
    from cortexcraft.model import GPT

    config = build_config("cpu", overrides)
    with torch.device("meta"):
        return config, GPT(config.model, vocab_size)


def category(event, optimizer_scope: bool) -> str:
    name = event.name
    if optimizer_scope or name.startswith(("aten::_foreach", "aten::_fused_adam")):
        return "optimizer"
    if "scaled_dot_product" in name or "flash_attention" in name or name in ATTENTION_OPS:
        return "attention"
    if name in MATMUL_OPS:
        return "matmul"
    if name in CAST_OPS:
        return "dtype casts"
    return "other ops"


def breakdown(events, wall_us: float) -> dict[str, float]:
    """Microseconds per category: each op's self time goes to its category; an op inside an
    optimizer step or an attention kernel counts wholly for it; the rest of the wall is overhead."""
    totals = dict.fromkeys(CATEGORIES, 0.0)

    def walk(event, inherited: str | None, optimizer_scope: bool) -> None:
        scope = optimizer_scope or event.name.startswith(("Optimizer.step", "Optimizer.zero_grad"))
        own = inherited or category(event, scope)
        if not event.name.startswith(("Optimizer.", "ProfilerStep", "step")):
            totals[own] += event.self_cpu_time_total
        # Everything an attention kernel calls is attention; other ops' children are judged alone.
        for child in event.cpu_children:
            walk(child, "attention" if own == "attention" else None, scope)

    roots = [e for e in events if e.cpu_parent is None]
    for root in roots:
        walk(root, None, False)
    totals["Python and dispatch overhead"] = max(0.0, wall_us - sum(totals.values()))
    return totals


def cpu_preset_steps(data_dir: Path, compiled: str | None = None):
    """``run(first, count)``: the trainer's own step function (``cortexcraft.train._train_step``) on
    the ``cpu`` preset, uncompiled, or compiled as the trainer does (``"blocks"``) or as one
    whole-model graph (``"whole model"``)."""
    from cortexcraft.batches import TokenWindows
    from cortexcraft.config import build_config
    from cortexcraft.device import compile_model, grad_scaler, select_dtype, vocab_multiple
    from cortexcraft.distributed import Distributed
    from cortexcraft.fileio import read_json
    from cortexcraft.model import GPT, matmul_shapes
    from cortexcraft.optim import Optimizers
    from cortexcraft.train import HealthMonitor, _train_step

    vocab_size = read_json(data_dir / "manifest.json")["vocab_size"]
    config = build_config("cpu", {})
    tcfg, mcfg = config.train, config.model
    device = torch.device("cpu")
    dtype = select_dtype(device, tcfg.dtype, matmul_shapes(mcfg, vocab_size, tcfg.batch_size * mcfg.block_size))
    torch.manual_seed(tcfg.seed)
    model = GPT(mcfg, vocab_size, pad_vocab_to=vocab_multiple(device))
    optimizers = Optimizers(model, tcfg, device, grad_scaler(device, dtype))
    windows = TokenWindows(data_dir, "train", mcfg.block_size, tcfg.batch_size, tcfg.seed, device)
    ddp = Distributed("cpu")
    health = HealthMonitor(device, ddp, tcfg.lr)
    params = list(model.parameters())
    stepped = model
    if compiled is not None:
        stepped = compile_model(model, device)  # also sets the inductor options the trainer uses
        if compiled == "whole model":
            stepped = torch.compile(model, dynamic=False)

    def run(first: int, count: int) -> None:
        for step in range(first, first + count):
            optimizers.schedule(step, tcfg.max_iters)
            _train_step(stepped, params, optimizers, windows, step, tcfg, device, dtype, ddp, health)

    return run, dtype


def compile_probe(data_dir: Path, compiled: str, steps: int) -> dict:
    """Seconds to the first compiled step (in a fresh process with an empty compile cache, as the
    parent runs it), then ms per step, best of two rounds."""
    run, _ = cpu_preset_steps(data_dir, compiled)
    start = time.perf_counter()
    run(0, 1)
    first = time.perf_counter() - start
    best = float("inf")
    for r in range(2):
        start = time.perf_counter()
        run(1 + r * steps, steps)
        best = min(best, (time.perf_counter() - start) / steps)
    return {"first_step_s": first, "step_ms": 1000 * best}


def compile_costs(data_dir: Path, steps: int, threads: int | None) -> dict[str, dict]:
    """``compile_probe`` for each way of compiling, each in its own process and empty cache."""
    results = {}
    for compiled in ("whole model", "blocks"):
        with tempfile.TemporaryDirectory(prefix="bench-inductor-") as cache:
            command = [sys.executable, __file__, "--compile-probe", compiled, "--data", str(data_dir),
                       "--steps", str(steps), *(["--threads", str(threads)] if threads else [])]
            out = subprocess.run(command, env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
                                 check=True, capture_output=True, text=True).stdout
        results[compiled] = json.loads(out.strip().splitlines()[-1])
    return results


def profile_cpu_preset(data_dir: Path, steps: int, warmup: int) -> dict:
    run, dtype = cpu_preset_steps(data_dir)
    run(0, warmup)
    start = time.perf_counter()
    run(warmup, steps)
    plain = (time.perf_counter() - start) / steps
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        run(warmup + steps, steps)
        profiled = (time.perf_counter() - start) / steps
    totals = breakdown(prof.events(), profiled * steps * 1e6)
    return {"dtype": str(dtype).removeprefix("torch."), "threads": torch.get_num_threads(), "steps": steps,
            "step_ms": 1000 * plain, "profiled_step_ms": 1000 * profiled,
            "ms_per_step": {name: us / steps / 1000 for name, us in totals.items()}}


def main() -> None:
    from bench_train import (NANOGPT_ARCH, NANOGPT_BATCH, NANOGPT_SHAPE, seconds_per_step, throughput_nanogpt,
                             throughput_ours)
    from cortexcraft.fileio import read_json

    def probe_arguments(parser):
        parser.add_argument("--compile-probe", choices=("whole model", "blocks"), help=argparse.SUPPRESS)
        parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
        parser.add_argument("--steps", type=int, help=argparse.SUPPRESS)

    args = parse_args(__doc__.splitlines()[0], probe_arguments)
    if args.compile_probe:
        print(json.dumps(compile_probe(args.data, args.compile_probe, args.steps)))
        return
    iters, rounds, peak_seconds, profile_steps = (10, 1, 0.2, 3) if args.quick else (100, 2, 2.0, 20)
    peaks = {name: peak_matmul_flops(dtype, peak_seconds) for name, dtype in
             (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        work = Path(tmp)
        data_dir = prepared_tinyshakespeare(work / "tinyshakespeare")
        vocab = read_json(data_dir / "manifest.json")["vocab_size"]
        cpu_config, cpu_model = our_model({}, vocab)
        mcfg = cpu_config.model
        cpu_tokens = cpu_config.train.batch_size * mcfg.block_size
        nano_config, nano_model = our_model({"model": {**NANOGPT_SHAPE, **NANOGPT_ARCH}}, vocab)
        nano_tokens = NANOGPT_BATCH * NANOGPT_SHAPE["block_size"]
        runs = {
            "cpu preset, ours (bf16 autocast)": (
                lambda: seconds_per_step(data_dir, work, iters, "bfloat16"), cpu_model, mcfg, cpu_tokens, "bf16"),
            "cpu preset, ours (bf16 autocast, compiled)": (
                lambda: seconds_per_step(data_dir, work, iters, "bfloat16", train={"compile": True}), cpu_model, mcfg,
                cpu_tokens, "bf16"),
            "cpu preset, ours (fp32)": (
                lambda: seconds_per_step(data_dir, work, iters, "float32"), cpu_model, mcfg, cpu_tokens, "fp32"),
            "nanoGPT CPU config, ours (bf16 autocast)": (
                lambda: throughput_ours(data_dir, work, iters, "bfloat16"), nano_model, nano_config.model,
                nano_tokens, "bf16"),
            "nanoGPT CPU config, nanoGPT-style reference (fp32)": (
                lambda: throughput_nanogpt(data_dir, iters), nano_model, nano_config.model, nano_tokens, "fp32"),
        }
        # Best of alternating rounds: a 2-core VM's step time varies by 10-30% from run to run.
        best: dict[str, float] = {}
        for r in range(rounds):
            for name in list(runs) if r % 2 == 0 else list(reversed(runs)):
                best[name] = min(best.get(name, float("inf")), runs[name][0]())
        rows, results = [], {}
        for name, (_, model, m, tokens, precision) in runs.items():
            seconds = best[name]
            per_token = flops_per_token(model, m.n_layer, m.n_embd, m.block_size)
            achieved = per_token * tokens / seconds
            results[name] = {"step_ms": 1000 * seconds, "tokens_per_second": tokens / seconds,
                             "flops_per_token": per_token, "model_flops": achieved, "precision": precision,
                             "mfu": achieved / peaks[precision]["flops"],
                             "mfu_vs_bf16_peak": achieved / peaks["bf16"]["flops"]}
            rows.append([name, 1000 * seconds, tokens / seconds, achieved / 1e9,
                         f"{100 * achieved / peaks[precision]['flops']:.1f}% of {precision}",
                         f"{100 * achieved / peaks['bf16']['flops']:.1f}%"])
        peak_line = ", ".join(f"{name} {p['flops'] / 1e9:,.0f} GFLOP/s (n={p['size']})" for name, p in peaks.items())
        headers = ["run", "ms/step", "tokens/s", "model GFLOP/s", "MFU (own precision's peak)", "MFU vs bf16 peak"]
        print_table(f"MFU on this CPU ({torch.get_num_threads()} threads); peak matmul: {peak_line}", headers, rows)
        profile = profile_cpu_preset(data_dir, profile_steps, warmup=5)
        compiling = compile_costs(data_dir, profile_steps, args.threads)
    compile_rows = [[name, res["first_step_s"], res["step_ms"]] for name, res in compiling.items()]
    compile_headers = ["compiled as", "s to the first step (empty cache)", "ms/step after (best of 2)"]
    print_table("Compiling the cpu preset's training step, each in a fresh process", compile_headers, compile_rows)
    attention_shape = (cpu_config.train.batch_size, mcfg.n_head, mcfg.block_size, mcfg.n_embd // mcfg.n_head)
    attention = attention_kernels(*attention_shape, repeats=3 if args.quick else 20)
    ours = attention["masked softmax, bf16 (ours)"]
    attention_rows = [[name, ms, f"{ms / ours:.2f}x"] for name, ms in attention.items()]
    attention_headers = ["kernel", "ms (forward + backward)", "time vs ours"]
    print_table(f"One attention layer of the cpu preset, batch x heads x context x head size = "
                f"{' x '.join(map(str, attention_shape))}", attention_headers, attention_rows)
    shares = profile["ms_per_step"]
    total = sum(shares.values())
    profile_rows = [[name, ms, f"{100 * ms / total:.1f}%"] for name, ms in shares.items()]
    print_table(f"Where one step of the cpu preset goes ({profile['dtype']}, {profile['threads']} threads; "
                f"{profile['step_ms']:.1f} ms unprofiled, {profile['profiled_step_ms']:.1f} ms profiled)",
                ["part", "ms/step (profiled)", "share"], profile_rows)
    save_results("bench_limits", {"peaks": peaks, "runs": results, "profile": profile,
                                  "attention_shape": attention_shape, "attention_ms": attention,
                                  "attention_markdown": markdown_table(attention_headers, attention_rows),
                                  "markdown": markdown_table(headers, rows), "compile": compiling,
                                  "compile_markdown": markdown_table(compile_headers, compile_rows),
                                  "profile_markdown": markdown_table(["part", "ms/step", "share"], profile_rows)})


if __name__ == "__main__":
    main()
