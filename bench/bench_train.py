"""Training speed on Tiny Shakespeare: throughput at nanoGPT's CPU configuration, and time to quality.

Throughput: ms/iter and tokens/s at 4 layers, 4 heads, n_embd 128, block 64, batch 12, dropout 0
for our trainer (``cortexcraft.train.train``), the nanoGPT-style reference and the seed-style
baseline, in alternating rounds (the machine is shared: compare the ratios of one run).

Time to quality: wall seconds (evals included) until val loss <= 1.89, and the best val loss within
a wall-clock budget (nanoGPT's 78 s), for the ``cpu`` preset and for nanoGPT's CPU recipe run by
the reference. Val is the last 10% of the text; the best checkpoint of our run is re-scored on the
whole val split.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchlib import (RESULTS_DIR, markdown_table, parse_args, prepared_tinyshakespeare, print_table, save_results,
                      split_paths)
from cortexcraft.fileio import read_json

TARGET_VAL = 1.89
BUDGET_SECONDS = 78.0
NANOGPT_SHAPE = {"n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 64, "dropout": 0.0}
NANOGPT_BATCH = 12


def ours_config(overrides: dict):
    from cortexcraft.config import build_config

    return build_config("cpu", overrides)


def run_ours(config, data_dir: Path, work: Path) -> list[dict]:
    from cortexcraft.train import train

    records: list[dict] = []
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    train(config, data_dir, run_dir, resume=False, on_eval=records.append, progress=False)
    return records


def throughput_ours(data_dir: Path, work: Path, iters: int, dtype: str) -> float:
    """Seconds per iteration of our trainer, timed between its first and last eval (one batch each)."""
    config = ours_config({
        "model": {**NANOGPT_SHAPE},
        "train": {"batch_size": NANOGPT_BATCH, "max_iters": iters, "eval_interval": iters, "eval_iters": 1,
                  "checkpoint_interval": iters, "dtype": dtype, "max_minutes": None, "warmup_iters": 0},
    })
    records = run_ours(config, data_dir, work)
    return (records[-1]["elapsed_seconds"] - records[0]["elapsed_seconds"]) / iters


def throughput_nanogpt(data_dir: Path, iters: int) -> float:
    from nanogpt_reference import NanoConfig, NanoTrainConfig, train_nanogpt

    (train_bin,), dtype = split_paths(data_dir, "train")
    (val_bin,), _ = split_paths(data_dir, "val")
    vocab = _vocab_size(data_dir)
    records: list[dict] = []
    train_nanogpt(str(train_bin), str(val_bin), np.dtype(dtype), vocab,
                  NanoConfig(block_size=NANOGPT_SHAPE["block_size"], vocab_size=vocab, n_layer=4, n_head=4, n_embd=128),
                  NanoTrainConfig(max_iters=iters, eval_interval=iters, eval_iters=1), on_eval=records.append)
    return (records[-1]["elapsed_seconds"] - records[0]["elapsed_seconds"]) / iters


def throughput_seed(data_dir: Path, iters: int) -> float:
    import seed_baseline

    (train_bin,), dtype = split_paths(data_dir, "train")
    data = torch.from_numpy(np.fromfile(train_bin, dtype=dtype).astype(np.int64))
    torch.manual_seed(1337)
    block = NANOGPT_SHAPE["block_size"]
    model = seed_baseline.SeedGPT(_vocab_size(data_dir), block, 4, 4, 128, 0.0)
    optimizer = seed_baseline.make_optimizer(model, 1e-3)
    seed_baseline.train_step(model, optimizer, data, block, NANOGPT_BATCH)
    start = time.perf_counter()
    for _ in range(iters):
        seed_baseline.train_step(model, optimizer, data, block, NANOGPT_BATCH)
    return (time.perf_counter() - start) / iters


def _vocab_size(data_dir: Path) -> int:
    from cortexcraft.fileio import read_json

    return read_json(data_dir / "manifest.json")["vocab_size"]


def measure_throughput(data_dir: Path, work: Path, iters: int, rounds: int) -> tuple[list, dict]:
    runners = {
        "ours (bf16 autocast)": lambda: throughput_ours(data_dir, work, iters, "bfloat16"),
        "ours (fp32)": lambda: throughput_ours(data_dir, work, iters, "float32"),
        "nanoGPT-style reference (fp32)": lambda: throughput_nanogpt(data_dir, iters),
        "seed-style baseline (fp32)": lambda: throughput_seed(data_dir, iters),
    }
    per_iter: dict[str, list[float]] = {name: [] for name in runners}
    for r in range(rounds):
        for name in (list(runners) if r % 2 == 0 else list(reversed(runners))):
            per_iter[name].append(runners[name]())
    tokens_per_iter = NANOGPT_BATCH * NANOGPT_SHAPE["block_size"]
    best = {name: min(v) for name, v in per_iter.items()}
    nano = best["nanoGPT-style reference (fp32)"]
    seed = best["seed-style baseline (fp32)"]
    rows = [[name, 1000 * s, tokens_per_iter / s, f"{nano / s:.2f}x", f"{seed / s:.2f}x"] for name, s in best.items()]
    return rows, {"iters_per_round": iters, "rounds": rounds, "seconds_per_iter": per_iter,
                  "tokens_per_second": {n: tokens_per_iter / s for n, s in best.items()}}


def first_crossing(records: list[dict], target: float):
    hit = next((r for r in records if r["step"] > 0 and r["val_loss"] <= target), None)
    return (hit["elapsed_seconds"], hit["step"]) if hit else (None, None)


def best_within(records: list[dict], budget: float):
    inside = [r["val_loss"] for r in records if r["step"] > 0 and r["elapsed_seconds"] <= budget]
    return min(inside) if inside else None


def quality_nanogpt(data_dir: Path, max_iters: int) -> dict:
    from nanogpt_reference import NanoConfig, NanoTrainConfig, train_nanogpt

    (train_bin,), dtype = split_paths(data_dir, "train")
    (val_bin,), _ = split_paths(data_dir, "val")
    vocab = _vocab_size(data_dir)
    records: list[dict] = []
    train_nanogpt(str(train_bin), str(val_bin), np.dtype(dtype), vocab,
                  NanoConfig(block_size=64, vocab_size=vocab, n_layer=4, n_head=4, n_embd=128),
                  NanoTrainConfig(max_iters=max_iters, lr_decay_iters=max_iters, warmup_iters=min(100, max_iters // 10)), on_eval=records.append)
    return {"records": records}


def quality_ours(data_dir: Path, work: Path, overrides: dict) -> dict:
    from cortexcraft.train import evaluate_run

    config = ours_config(overrides)
    records: list[dict] = []
    run_dir = Path(tempfile.mkdtemp(prefix="run-", dir=work))
    from cortexcraft.train import train

    summary = train(config, data_dir, run_dir, resume=False, on_eval=records.append, progress=False)
    full = evaluate_run(run_dir, data_dir, checkpoint="best")
    return {"records": records, "config": config.train.model_dump(), "model": config.model.model_dump(),
            "summary_steps": summary["steps"], "best_full_val": full["val_loss"], "best_full_val_step": full["step"]}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument(
        "--part", choices=["all", "throughput", "quality"], default="all"))
    iters, rounds = (20, 1) if args.quick else (100, 2)
    budget = 15.0 if args.quick else BUDGET_SECONDS
    nano_iters = 100 if args.quick else 2000
    # The cpu preset with its cosine schedule sized to end near the 1.89 crossing, and to end at ~78 s.
    # (max_iters, stop at the wall-clock budget?)
    ours_runs = ({"cpu preset, max_iters=100": (100, False)} if args.quick else
                 {"cpu preset, max_iters=700": (700, False), "cpu preset, max_iters=1600, stopped at 78 s": (1600, True)})
    results: dict = {"target_val": TARGET_VAL, "budget_seconds": budget}
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        work = Path(tmp)
        data_dir = prepared_tinyshakespeare(work / "tinyshakespeare")
        if args.part in ("all", "throughput"):
            rows, results["throughput"] = measure_throughput(data_dir, work, iters, rounds)
            headers = ["trainer", "ms/iter", "tokens/s", "vs nanoGPT-style", "vs seed-style"]
            print_table(f"Training throughput at nanoGPT's CPU config (4x128, block 64, batch 12), best of {rounds} "
                        f"alternating rounds of {iters} iters", headers, rows)
            results["throughput"]["markdown"] = markdown_table(headers, rows)
        if args.part in ("all", "quality"):
            runs = {f"nanoGPT CPU recipe (reference, {nano_iters} iters)": quality_nanogpt(data_dir, nano_iters)}
            for name, (iters_, cap) in ours_runs.items():
                runs[name] = quality_ours(data_dir, work, {"train": {"max_iters": iters_, "max_minutes": budget / 60 if cap else None}})
            rows = []
            for name, res in runs.items():
                seconds, step = first_crossing(res["records"], TARGET_VAL)
                res.update({"seconds_to_target": seconds, "step_to_target": step,
                            "best_val_within_budget": best_within(res["records"], budget),
                            "wall_seconds": res["records"][-1]["elapsed_seconds"],
                            "best_val": min(r["val_loss"] for r in res["records"] if r["step"] > 0)})
                rows.append([name, seconds, step, res["best_val_within_budget"], res["best_val"],
                             res["records"][-1]["step"], res["wall_seconds"], res.get("best_full_val")])
            headers = ["run", f"s to val<={TARGET_VAL}", "at step", f"best val <= {budget:.0f} s",
                       "best val", "steps", "wall s", "best ckpt, full val"]
            print_table("Time to quality on Tiny Shakespeare (val = last 10%; evals included in wall time)", headers, rows)
            results["quality"] = {"runs": runs, "markdown": markdown_table(headers, rows)}
    previous = RESULTS_DIR / "bench_train.json"
    if args.part != "all" and previous.is_file():
        # A partial run keeps the other part's figures from the last run.
        results = {**{k: v for k, v in read_json(previous).items() if k in ("throughput", "quality")}, **results}
    save_results("bench_train", results)


if __name__ == "__main__":
    main()
