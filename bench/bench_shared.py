"""Training on a shared machine: tokens/s with one competing busy process, as a share of quiet.

Each trainer runs in a fresh process with no thread flags, exactly as a user starts it: ours (the
``cpu`` preset through ``cortexcraft.train.train``, which picks and adapts its own threads, whose
OpenMP waits spin only briefly) and the nanoGPT-style reference (its CPU recipe, torch's default
threads and OpenMP's default spin-waiting: the OpenMP variables cortexcraft sets are removed from
its environment). Each is measured quiet, then beside one ``while True: pass`` process, alternately
in the same run. Goal: ours keeps >= 0.4x of its quiet tokens/s (ideal 0.5x on 2 cores).

    python bench/bench_shared.py [--quick] [--steps N]

Prints a table and writes bench/results/bench_shared.json.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOAL_SHARE = 0.4


def worker(system: str, data_dir: str, steps: int) -> None:
    """Runs in the measured process: train ``steps`` steps, print {"tokens_per_second", ...} as JSON."""
    if system == "ours":
        sys.path.insert(0, str(HERE.parent))
        from cortexcraft.config import build_config
        from cortexcraft.train import train

        config = build_config("cpu", [f"max_iters={steps}", f"eval_interval={steps}", "eval_iters=1",
                                      f"checkpoint_interval={steps}", "max_minutes=null"])
        with tempfile.TemporaryDirectory(prefix="shared-") as tmp:
            summary = train(config, data_dir, Path(tmp) / "run", progress=False)
        print(json.dumps({"tokens_per_second": summary["tokens_per_second"], "threads": summary["threads"]}))
        return
    # Only numpy and torch: nothing of cortexcraft is imported, so OpenMP keeps its defaults.
    sys.path.insert(0, str(HERE))
    import numpy as np
    import torch
    from nanogpt_reference import NanoConfig, NanoTrainConfig, train_nanogpt

    manifest = json.loads((Path(data_dir) / "manifest.json").read_text())
    train_bin, val_bin = (str(Path(data_dir) / manifest["splits"][s]["files"][0]["name"]) for s in ("train", "val"))
    records: list[dict] = []
    vocab = manifest["vocab_size"]
    train_nanogpt(train_bin, val_bin, np.dtype(manifest["dtype"]), vocab, NanoConfig(vocab_size=vocab),
                  NanoTrainConfig(max_iters=steps, eval_interval=steps, eval_iters=1), on_eval=records.append)
    seconds = records[-1]["elapsed_seconds"] - records[0]["elapsed_seconds"]
    tokens = steps * NanoTrainConfig.batch_size * NanoConfig.block_size
    print(json.dumps({"tokens_per_second": tokens / seconds, "threads": {"torch_default": torch.get_num_threads()}}))


def child_env(system: str) -> dict[str, str]:
    from cortexcraft.threads import OPENMP_WAIT_ENV

    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    if system == "nanogpt":
        for name, value in OPENMP_WAIT_ENV.items():
            if env.get(name) == value:
                del env[name]
    return env


def measure(system: str, data_dir: Path, steps: int, competitor: bool) -> dict:
    busy = None
    if competitor:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        start = time.perf_counter()
        out = subprocess.run([sys.executable, __file__, "--worker", system, str(data_dir), str(steps)],
                             env=child_env(system), capture_output=True, text=True)
        wall = time.perf_counter() - start
    finally:
        if busy is not None:
            os.killpg(busy.pid, signal.SIGKILL)
            busy.wait()
    if out.returncode:
        raise SystemExit(f"{system} worker failed:\n{out.stderr[-2000:]}")
    return {**json.loads(out.stdout.strip().splitlines()[-1]), "wall_seconds": wall}


def main() -> None:
    from benchlib import markdown_table, parse_args, prepared_tinyshakespeare, print_table, save_results

    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--steps", type=int))
    steps = args.steps or (20 if args.quick else 200)
    nano_steps = max(10, steps // 2)  # nanoGPT's steps are 2.7x smaller (batch 12 vs 32)
    runs: dict[str, dict[str, list]] = {s: {"quiet": [], "busy": []} for s in ("ours", "nanogpt")}
    with tempfile.TemporaryDirectory(prefix="bench-shared-") as tmp:
        data_dir = prepared_tinyshakespeare(Path(tmp) / "tinyshakespeare")
        for condition in ("quiet", "busy", "busy", "quiet") if not args.quick else ("quiet", "busy"):
            for system in ("ours", "nanogpt"):
                result = measure(system, data_dir, steps if system == "ours" else nano_steps, condition == "busy")
                runs[system][condition].append(result)
                print(
                    f"{system:8} {condition:5} {result['tokens_per_second']:>10,.0f} tok/s  {result['threads']}",
                    flush=True,
                )
    rows, shares = [], {}
    for system, by_condition in runs.items():
        quiet = max(r["tokens_per_second"] for r in by_condition["quiet"])
        busy = max(r["tokens_per_second"] for r in by_condition["busy"])
        shares[system] = busy / quiet
        rows.append([system, quiet, busy, f"{busy / quiet:.2f}x", f">= {GOAL_SHARE}x" if system == "ours" else ""])
    headers = ["trainer", "tokens/s quiet", "tokens/s beside 1 busy process", "share kept", "goal"]
    print_table("Training beside one `while True: pass` process (best of the runs per condition)", headers, rows)
    save_results(
        "bench_shared",
        {
            "steps": {"ours": steps, "nanogpt": nano_steps},
            "runs": runs,
            "share_kept": shares,
            "goal_share": GOAL_SHARE,
            "markdown": markdown_table(headers, rows),
        },
    )


if __name__ == "__main__":
    if len(sys.argv) == 5 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
