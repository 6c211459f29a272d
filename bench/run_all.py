"""Run every benchmark, one fresh process each, then print the README Performance table.

    python bench/run_all.py [--quick] [--threads N] [--only train generate ...]

Each benchmark prints its own table and writes bench/results/<name>.json; this script adds
bench/results/summary.json and a markdown table of the headline figures (about 45 minutes on 2 cores,
15 of them the moonshot run; `--only` picks benchmarks). Run it on a quiet machine: every ratio
compares runs made in this one session.
"""
from __future__ import annotations

import subprocess
import sys
import time

from benchlib import REPO, RESULTS_DIR, machine, markdown_table, parse_args, save_results
from cortexcraft.fileio import read_json

# name -> (script, extra arguments for a full run, extra arguments for --quick)
BENCHMARKS = {
    "train": ("bench_train.py", [], ["--quick"]),
    "limits": ("bench_limits.py", [], ["--quick"]),
    "main_command": ("bench_main_command.py", [], ["--quick"]),
    "shared": ("bench_shared.py", [], ["--quick"]),
    "dtype": ("bench_dtype.py", [], ["--quick"]),
    "generate": ("bench_generate.py", [], ["--quick"]),
    "memory": ("bench_memory.py", [], ["--quick"]),
    "data_prep": ("bench_data_prep.py", [], ["--quick"]),
    "pipeline": ("bench_pipeline_overhead.py", [], ["--repeats", "1"]),
    "scale": ("bench_scale.py", [], ["--quick"]),
    "serve": ("bench_serve.py", [], ["--quick"]),
}


def run(name: str, quick: bool, threads: int | None) -> dict:
    script, full_args, quick_args = BENCHMARKS[name]
    extra = ["--threads", str(threads)] if threads and name != "pipeline" else []
    print(f"\n=== {script} ===", flush=True)
    start = time.perf_counter()
    code = subprocess.call(
        [sys.executable, str(REPO / "bench" / script), *(quick_args if quick else full_args), *extra], cwd=REPO
    )
    return {"script": script, "exit_code": code, "seconds": time.perf_counter() - start}


def _load(name: str):
    path = RESULTS_DIR / name
    return read_json(path) if path.is_file() else None


def headline_rows() -> list[list[str]]:
    rows = []
    train = _load("bench_train.json")
    if train and "throughput" in train:
        tps = train["throughput"]["tokens_per_second"]
        ours = max(tps["ours (bf16 autocast)"], tps["ours (fp32)"])
        nano, seed = tps["nanoGPT-style reference (fp32)"], tps["seed-style baseline (fp32)"]
        rows.append(
            [
                "training tokens/s, nanoGPT CPU config (4x128, block 64, batch 12)",
                f"{ours:,.0f}",
                f"{nano:,.0f} (nanoGPT-style) / {seed:,.0f} (seed-style)",
                f"{ours / nano:.2f}x / {ours / seed:.2f}x",
                ">= 1.3x nanoGPT",
            ]
        )
    if train and "quality" in train:
        runs = train["quality"]["runs"]
        nano = next(res for name, res in runs.items() if name.startswith("nanoGPT"))
        ours = {name: res for name, res in runs.items() if "max_iters" in name}
        fastest = min(ours, key=lambda n: ours[n]["seconds_to_target"] or float("inf"))
        rows.append(
            [
                f"seconds from process start to val <= {train['target_val']} "
                f"(Tiny Shakespeare; {fastest}; same threads)",
                _num(ours[fastest]["seconds_to_target"]),
                _num(nano["seconds_to_target"])
                if nano["seconds_to_target"] is not None
                else f"not reached (best {nano['best_val']:.3f} after {nano['wall_seconds']:.0f} s)",
                _ratio(
                    nano["seconds_to_target"] or nano["wall_seconds"],
                    ours[fastest]["seconds_to_target"],
                    bound=nano["seconds_to_target"] is None,
                ),
                "<= 0.35x nanoGPT",
            ]
        )
        same_time = runs.get("cpu preset, budget = nanoGPT's wall time")
        if same_time:
            rows.append(
                [
                    f"best val within nanoGPT's wall time ({train['quality']['budget_seconds']:.0f} s)",
                    _num(same_time["best_val"], 4),
                    _num(nano["best_val"], 4),
                    "",
                    "",
                ]
            )
    if train and "moonshot" in train:
        moon = train["moonshot"]
        rows.append(
            [
                f"moonshot: best val within {moon['minutes']:g} min "
                f"(cpu preset{' ' + ' '.join(moon['overrides']) if moon['overrides'] else ''}, "
                f"{moon['records'][-1]['step']:,} steps)",
                f"{_num(moon['best_val'], 4)} "
                f"({_num(moon.get('best_full_val'), 4)} best checkpoint on the whole val split)",
                "1.47 (nanoGPT's baby GPT on an A100)",
                "",
                f"whole val split <= {moon['goal_val']}",
            ]
        )
    main_command = _load("bench_main_command.json")
    if main_command:
        rows.append(
            [
                f"README main command, whole pipeline (cpu preset, {main_command['steps']:,} steps, stopped by "
                f"{main_command.get('stopped_by', '?')}): loss of the best checkpoint on the whole val split, wall s",
                f"{_num(main_command.get('whole_val_loss'), 4)} in {main_command['wall_seconds']:.0f} s "
                f"(eval windows: {main_command['best_val_loss']:.4f})",
                "",
                "",
                "<= 1.45 within 360 s: " + ("met" if main_command["goal_met"] else "NOT met"),
            ]
        )
        rows.append(
            [
                "share of training wall time spent evaluating (README main command)",
                f"{100 * main_command['eval_share']:.1f}%",
                "",
                "",
                "",
            ]
        )
    limits = _load("bench_limits.json")
    if limits:
        peaks = limits["peaks"]
        for name, res in limits["runs"].items():
            rows.append(
                [
                    f"MFU, {name}: model FLOP/s over this CPU's peak matmul FLOP/s "
                    f"(fp32 {peaks['fp32']['flops'] / 1e9:,.0f}, bf16 {peaks['bf16']['flops'] / 1e9:,.0f} GFLOP/s)",
                    f"{100 * res['mfu']:.1f}% of the {res['precision']} peak",
                    f"{res['model_flops'] / 1e9:,.1f} GFLOP/s, {res['tokens_per_second']:,.0f} tokens/s",
                    f"{100 * res['mfu_vs_bf16_peak']:.1f}% of the bf16 peak",
                    "",
                ]
            )
        profile = limits["profile"]
        parts = ", ".join(f"{name} {ms:.1f}" for name, ms in profile["ms_per_step"].items())
        rows.append(
            [
                f"one step of the cpu preset, profiled ({profile['dtype']}, {profile['threads']} threads), ms",
                f"{profile['profiled_step_ms']:.1f} ({profile['step_ms']:.1f} unprofiled)",
                parts,
                "",
                "",
            ]
        )
    shared = _load("bench_shared.json")
    if shared:
        share = shared["share_kept"]
        rows.append(
            [
                "tokens/s kept beside one busy process (`while True: pass`), share of quiet",
                f"{share['ours']:.2f}x",
                f"{share['nanogpt']:.2f}x (nanoGPT-style, torch defaults)",
                "",
                f">= {shared['goal_share']}x (ideal 0.5x)",
            ]
        )
    dtype = _load("bench_dtype.json")
    if dtype:
        choices = ", ".join(
            f"{name} {res['fresh']['dtype']} ({res['bf16_speedup']:.2f}x)" for name, res in dtype["presets"].items()
        )
        rows.append(["dtype=auto by calibration per preset (bf16 matmul speed-up)", choices, "", "", ""])
    gen = _load("bench_generate.json")
    if gen:
        tps = {r["generator"]: r["tokens_per_second"] for r in gen["results"]}
        rows.append(
            [
                f"generate {gen['new_tokens']} tokens, 6x384 context 256, KV cache (tokens/s)",
                f"{tps['ours, KV cache']:,.1f}",
                f"{tps['ours, no KV cache']:,.1f} (no cache) / {tps['seed-style generate']:,.1f} (seed-style)",
                f"{gen['speedup_cache_vs_nocache']:.1f}x / {gen['speedup_cache_vs_seed']:.1f}x",
                ">= 5x / >= 10x; identical output: " + str(gen["kv_cache_output_identical"]).lower(),
            ]
        )
    mem = _load("bench_memory.json")
    if mem:
        peaks = {k: max(v) for k, v in mem["peak_rss_mib"].items()}
        small, large = sorted(peaks, key=int)
        rows.append(
            [
                f"training peak RSS, {large} MB vs {small} MB corpus (MiB)",
                f"{peaks[large]:,.0f}",
                f"{peaks[small]:,.0f}",
                f"{mem['growth_percent']:+.1f}%",
                "<= +5%",
            ]
        )
    prep = _load("data_prep.json")
    if prep:
        speeds = prep["throughput"]["mb_per_s"]
        rounds = prep["throughput"]["rounds"]
        encode = speeds["encode (in memory)"]
        rows.append(
            [
                "char encode in memory (MB/s)",
                f"{encode['ours']:,.0f}",
                f"{encode['seed']:,.1f} (seed-style)",
                f"{encode['speedup']:.0f}x",
                "",
            ]
        )
        for phase in ("first run", f"best of {rounds}"):
            write, floor = (
                speeds[f"encode + write shards, {phase}"],
                speeds[f"(I/O floor: write+sha256+fsync), {phase}"],
            )
            rows.append(
                [
                    f"char encode + shard write, {phase} (MB/s; I/O floor {floor['ours']:,.0f})",
                    f"{write['ours']:,.0f}",
                    f"{write['seed']:,.1f} (seed-style)",
                    f"{write['speedup']:.1f}x",
                    ">= 20x and >= 500 MB/s",
                ]
            )
    scale = _load("bench_scale.json")
    if scale and "throughput" in scale:
        speeds = scale["throughput"]
        for name in ("char", "bpe"):
            one, two = speeds[f"{name}, 1 worker(s)"], speeds[f"{name}, 2 worker(s)"]
            rows.append(
                [
                    f"prepare {name} in parts, {two['mb']:,.0f} MB synthetic OpenWebText, 2 workers (MB/s)",
                    f"{two['ours_mb_per_s']:,.1f} (1 worker: {one['ours_mb_per_s']:,.1f})",
                    f"{two['nanogpt_mb_per_s']:,.1f} (nanoGPT-style datasets.map, num_proc=2)",
                    f"{speeds[f'{name} scaling 2 vs 1 worker']:.2f}x vs 1 worker / "
                    f"{two['ours_mb_per_s'] / two['nanogpt_mb_per_s']:.1f}x nanoGPT",
                    ">= 1.0x vs 1 worker (never slower)",
                ]
            )
    if scale and "collection" in scale:
        speeds = scale["collection"]
        one, two = speeds["1 worker(s)"], speeds["2 worker(s)"]
        rows.append(
            [
                f"collect {two['mb']:,.0f} MB of parquet rows into the corpus, 2 workers (MB/s)",
                f"{two['ours_mb_per_s']:,.1f} (1 worker: {one['ours_mb_per_s']:,.1f})",
                f"{two['nanogpt_mb_per_s']:,.1f} (nanoGPT-style load_dataset, num_proc=2)",
                f"{speeds['scaling 2 vs 1 worker']:.2f}x vs 1 worker / "
                f"{two['ours_mb_per_s'] / two['nanogpt_mb_per_s']:.1f}x nanoGPT",
                "",
            ]
        )
    if scale and "memory" in scale:
        (small, small_mib), (large, large_mib) = scale["memory"]["peak_rss_mib"].items()
        rows.append(
            [
                f"prepare peak RSS, {large} vs {small} corpus (MiB)",
                f"{large_mib:,.0f}",
                f"{small_mib:,.0f}",
                f"{scale['memory']['growth_percent']:+.1f}%",
                "<= +10%",
            ]
        )
    pipe = _load("pipeline_overhead.json")
    if pipe:
        for mode, res in pipe["modes"].items():
            rows.append(
                [
                    f"cached pipeline re-run over a trivial 5-task flow ({mode}), s",
                    f"{res['cached']['process_seconds']:.1f}",
                    f"{res['trivial']['process_seconds']:.1f}",
                    f"+{res['overhead_process_seconds']:.1f} s",
                    "<= +2 s",
                ]
            )
    serve = _load("bench_serve.json")
    if serve:
        ours = serve["results"]["ours (cortexcraft serve)"]
        naive = serve["results"]["naive (FastAPI + transformers pipeline)"][-1]["tokens_per_second"]
        swaps = serve["swaps"]
        rows.append(
            [
                f"serve: tokens/s, 16 clients (1 client), cpu preset, {serve['max_tokens']} tokens per request",
                f"{ours[-1]['tokens_per_second']:,.0f} ({ours[0]['tokens_per_second']:,.0f})",
                f"{naive:,.0f} (naive FastAPI + transformers pipeline)",
                f"{serve['ours_16_vs_1']:.1f}x vs 1 client / {ours[-1]['tokens_per_second'] / naive:.1f}x naive",
                ">= 3x vs 1 client",
            ]
        )
        rows.append(
            [
                f"serve under hot swaps: {swaps['swaps']:.0f} swaps, {swaps['requests']} requests, failed; "
                "s to first answer by the new version (p50 / max)",
                f"{swaps['failures']} failed; "
                f"{_num(swaps['first_answer_p50'], 2)} / {_num(swaps['first_answer_max'], 2)} s",
                "",
                "",
                "0 failed, <= 5 s",
            ]
        )
    return rows


def _num(value, digits: int = 1) -> str:
    return "not reached" if value is None else f"{value:.{digits}f}"


def _ratio(baseline, ours, bound: bool = False) -> str:
    """ours/baseline; ``bound`` marks a baseline that never reached the target, so the ratio is an upper bound."""
    return "" if baseline is None or ours is None else f"{'< ' if bound else ''}{ours / baseline:.2f}x"


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], lambda p: p.add_argument("--only", nargs="+", choices=list(BENCHMARKS)))
    start = time.perf_counter()
    runs = {name: run(name, args.quick, args.threads) for name in (args.only or BENCHMARKS)}
    headers = ["measure", "ours", "baseline", "ratio", "goal"]
    rows = headline_rows()
    m = machine()
    table = markdown_table(headers, rows)
    print(
        f"\n## Performance\n\nMachine: {m['cpu']}, {m['cores']} cores ({m['isa']}), "
        f"torch {m['torch']} ({m['torch_threads']} threads), "
        f"Python {m['python']}; load average {m['load_average']:.1f} at the end.\n\n{table}\n\n"
        f"Reproduce: `python bench/run_all.py` ({time.perf_counter() - start:.0f} s here).\n"
    )
    failed = [name for name, r in runs.items() if r["exit_code"] != 0]
    save_results("summary", {"quick": args.quick, "runs": runs, "markdown": table, "failed": failed})
    if failed:
        sys.exit(f"benchmarks failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
