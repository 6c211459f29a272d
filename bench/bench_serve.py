"""Serving: tokens/s, time to first token and latency at 1, 4 and 16 concurrent clients.

Three ways to answer the same greedy requests (a Tiny Shakespeare line as prompt, --max-tokens new
tokens each), run one after the other at each level:

- ours: `cortexcraft serve` (continuous batching), streamed, so the first token is timed as it arrives;
- naive: FastAPI with transformers' `pipeline` on our model exported by `cortexcraft export --format
  hf`, one request at a time (bench/naive_hf_server.py; no streaming: first token = whole answer);
- in-process: our `generate` called in this process, one request at a time, no HTTP.

Clients are threads in this process, each sending its next request as soon as the last one is
answered. Then ours again with 16 clients while the champion is promoted and rolled back every
--swap-every seconds: swaps done, requests, failures, and the seconds from each pointer change to
the first answer (its first streamed piece) by the new version.

The model is the `cpu` preset (4 layers, 128 wide, block 128) trained briefly on Tiny Shakespeare
and registered twice (v1, and v2 trained longer); speed does not depend on how well it is trained.
Run it on a quiet machine: every ratio compares runs made in this one session.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import httpx
import numpy as np

from benchlib import (REPO, machine, markdown_table, parse_args, prepared_tinyshakespeare, print_table, save_results,
                      tinyshakespeare_text)

NAME = "bench"
CONCURRENCY = (1, 4, 16)
_URL = re.compile(r"(?:serving \S+ \(.*\) on|listening on) (http://[0-9.]+:[0-9]+)")


def options(parser) -> None:
    parser.add_argument("--max-tokens", type=int, help="new tokens per request (default 128; --quick 32)")
    parser.add_argument("--requests", type=int, help="requests per client and level (default 4; --quick 1)")
    parser.add_argument("--train-iters", type=int,
                        help="training steps of v1; v2 gets 50 more (default 100; --quick 5)")
    parser.add_argument("--swap-seconds", type=float, help="length of the swap phase (default 30; --quick 6)")
    parser.add_argument("--swap-every", type=float, help="seconds between pointer changes (default 2; --quick 1.5)")


def build_registry(work: Path, iters: int) -> Path:
    """Tiny Shakespeare, the cpu preset trained twice, registered as v1 and v2 (v2 champion)."""
    from cortexcraft import registry
    from cortexcraft.config import build_config
    from cortexcraft.train import train

    shards = prepared_tinyshakespeare(work / "tinyshakespeare")
    data_dir = work / "data"
    models = registry.models_dir_of(data_dir)
    for index, steps in enumerate((iters, iters + 50)):
        config = build_config("cpu", [f"max_iters={steps}", f"eval_interval={steps}", "eval_iters=5",
                                      f"train.seed={index}", f"warmup_iters={min(20, steps // 2)}"])
        summary = train(config, shards, work / "runs" / f"v{index + 1}", progress=False)
        record, _ = registry.register(models, NAME, summary["run_dir"], data=registry.data_identity(shards),
                                      code_version="bench", policy={"mode": "fresh"}, summary=summary)
        registry.promote(models, f"{NAME}@{record['version']}")
    return data_dir


def prompts() -> list[str]:
    lines = [line for line in tinyshakespeare_text().read_text(encoding="utf-8").splitlines() if len(line) > 20]
    return lines[:: max(1, len(lines) // 64)][:64]


class Process:
    """A server in a session of its own, its output in a log; ``url`` once it listens."""

    def __init__(self, command: list[str], log: Path, env: dict[str, str]):
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        deadline = time.monotonic() + 300
        while not (match := _URL.search(log.read_text(errors="replace"))):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                sys.exit(f"{command[1:4]} did not start:\n{log.read_text(errors='replace')[-3000:]}")
            time.sleep(0.2)
        self.url = match.group(1)
        self.threads = int(re.search(r"\((?:.* )?(\d+) torch threads\)", log.read_text(errors="replace")).group(1))
        while True:  # listening is not serving yet: wait for an answer
            try:
                httpx.get(self.url + "/", timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


def stream_completion(http: httpx.Client, prompt: str, max_tokens: int) -> tuple[float, str, str]:
    """(seconds to the first piece, text, fingerprint) of one streamed greedy completion."""
    started = time.perf_counter()
    first, pieces, fingerprint = None, [], None
    with http.stream("POST", "/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens,
                                                      "temperature": 0, "stream": True}) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[len("data: "):])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            fingerprint = chunk["system_fingerprint"]
            if chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - started
            pieces.append(chunk["choices"][0]["text"])
    return first, "".join(pieces), fingerprint


Sender = Callable[[str], tuple[Optional[float], str]]  # prompt -> (seconds to the first token or None, text)


def http_sender(url: str, streamed: bool, max_tokens: int) -> Callable[[], Sender]:
    """A factory of per-client senders (each client keeps its own connection)."""
    def make():
        http = httpx.Client(base_url=url, timeout=600)

        def send(prompt: str) -> tuple[Optional[float], str]:
            if streamed:
                first, text, _ = stream_completion(http, prompt, max_tokens)
                return first, text
            response = http.post("/v1/completions", json={"model": NAME, "prompt": prompt, "max_tokens": max_tokens,
                                                           "temperature": 0})
            response.raise_for_status()
            return None, response.json()["choices"][0]["text"]
        return send
    return make


def in_process_sender(version_dir: Path, max_tokens: int):
    import torch

    from cortexcraft.checkpoint import load_model
    from cortexcraft.generate import generate
    from cortexcraft.tokenizer import load_tokenizer

    model, _ = load_model(version_dir)
    tokenizer = load_tokenizer(version_dir)
    one_at_a_time = threading.Lock()

    def make():
        def send(prompt: str) -> tuple[Optional[float], str]:
            started = time.perf_counter()
            first: list[float] = []
            idx = torch.as_tensor(tokenizer.encode(prompt), dtype=torch.long).unsqueeze(0)
            with one_at_a_time:
                out = generate(model, idx, max_tokens, temperature=0,
                               on_token=lambda _: first or first.append(time.perf_counter() - started))
            return first[0], tokenizer.decode(out[0, idx.size(1):].tolist())
        return send
    return make


def run_level(make_sender, clients: int, requests: int, lines: list[str], max_tokens: int) -> dict:
    """``clients`` closed-loop clients sending ``requests`` requests each."""
    numbers = itertools.count()
    total = clients * requests
    records: list[tuple[float, float]] = []
    texts: dict[str, str] = {}
    failures: list[str] = []

    def client() -> None:
        send = make_sender()
        while (number := next(numbers)) < total:
            prompt = lines[number % len(lines)]
            started = time.perf_counter()
            try:
                first, text = send(prompt)
            except Exception as exc:  # noqa: BLE001 -- counted and shown
                failures.append(repr(exc))
                continue
            latency = time.perf_counter() - started
            records.append((first if first is not None else latency, latency))
            texts[prompt] = text

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    first, latency = np.array([r[0] for r in records]), np.array([r[1] for r in records])
    return {"clients": clients, "requests": len(records), "failures": len(failures), "seconds": wall,
            "tokens_per_second": len(records) * max_tokens / wall,
            "ttft_p50": float(np.percentile(first, 50)), "latency_p50": float(np.percentile(latency, 50)),
            "latency_p99": float(np.percentile(latency, 99)), "texts": texts, "failure_examples": failures[:3]}


def metric(url: str, name: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def swap_phase(url: str, data_dir: Path, seconds: float, every: float, clients: int, lines: list[str],
               max_tokens: int) -> dict:
    """Streamed requests from ``clients`` clients while the champion alternates v1/v2 every ``every`` s."""
    from cortexcraft import registry

    models = registry.models_dir_of(data_dir)
    stop = threading.Event()
    answers: list[tuple[float, str]] = []  # (time of the first piece, fingerprint)
    failures: list[str] = []

    def client(index: int) -> None:
        with httpx.Client(base_url=url, timeout=600) as http:
            for number in itertools.count(index):
                if stop.is_set():
                    return
                sent = time.perf_counter()
                try:
                    first, _, fingerprint = stream_completion(http, lines[number % len(lines)], max_tokens)
                except Exception as exc:  # noqa: BLE001 -- counted and shown
                    failures.append(repr(exc))
                    continue
                answers.append((sent + first, fingerprint))

    swaps_before = metric(url, "cortexcraft_swaps_total")
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for thread in threads:
        thread.start()
    changes: list[tuple[float, str]] = []
    started = time.perf_counter()
    while time.perf_counter() - started + every <= seconds:
        time.sleep(every)
        pointer = registry.promote(models, f"{NAME}@v1") if len(changes) % 2 == 0 else registry.rollback(models, NAME)
        changes.append((time.perf_counter(), pointer["version"]))
    time.sleep(max(0.0, seconds - (time.perf_counter() - started)))
    stop.set()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    delays = []
    for (changed, version), (next_change, _) in zip(changes, changes[1:] + [(float("inf"), "")]):
        firsts = [t for t, fingerprint in answers if fingerprint == f"{NAME}@{version}" and changed <= t < next_change]
        delays.append(min(firsts) - changed if firsts else None)
    seen = [d for d in delays if d is not None]
    return {"seconds": wall, "clients": clients, "pointer_changes": len(changes),
            "swaps": metric(url, "cortexcraft_swaps_total") - swaps_before, "requests": len(answers),
            "failures": len(failures), "failure_examples": failures[:3],
            "tokens_per_second": len(answers) * max_tokens / wall,
            "first_answer_by_new_version_seconds": delays,
            "first_answer_p50": float(np.percentile(seen, 50)) if seen else None,
            "first_answer_max": max(seen) if seen else None,
            "changes_never_answered": sum(d is None for d in delays)}


def main() -> None:
    args = parse_args(__doc__.splitlines()[0], options)
    max_tokens = args.max_tokens or (32 if args.quick else 128)
    requests = args.requests or (1 if args.quick else 4)
    iters = args.train_iters or (5 if args.quick else 100)
    swap_seconds = args.swap_seconds or (6.0 if args.quick else 30.0)
    swap_every = args.swap_every or (1.5 if args.quick else 2.0)
    info = machine()
    print(f"CPU: {info['cpu']} ({info['isa']}), {info['cores']} cores, torch {info['torch']} "
          f"({info['torch_threads']} threads), load average {info['load_average']:.2f}", flush=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    lines = prompts()

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        work = Path(tmp)
        data_dir = build_registry(work, iters)
        from cortexcraft import registry

        version_dir = registry.version_dir(registry.models_dir_of(data_dir), NAME, "v2")
        hf_dir = work / "hf-v2"
        subprocess.run([sys.executable, "-m", "cortexcraft", "export", "--model", f"{NAME}@v2", "--data-dir",
                        str(data_dir), "--out", str(hf_dir)], cwd=REPO, env=env, check=True, capture_output=True)
        ours = Process([sys.executable, "-m", "cortexcraft", "serve", "--model", NAME, "--data-dir", str(data_dir),
                        "--port", "0", "--no-access-log", "--max-tokens-cap", str(max(1024, max_tokens)),
                        "--max-batch", "16", "--max-queue", "64"], work / "ours.log", env)
        naive = Process([sys.executable, str(REPO / "bench" / "naive_hf_server.py"), "--model", str(hf_dir)],
                        work / "naive.log", env)
        try:
            targets = {"ours (cortexcraft serve)": http_sender(ours.url, True, max_tokens),
                       "naive (FastAPI + transformers pipeline)": http_sender(naive.url, False, max_tokens),
                       "in-process generate": in_process_sender(version_dir, max_tokens)}
            for make in targets.values():  # warm up: first requests pay for lazy initialisation
                make()(lines[0])
            results: dict[str, list[dict]] = {name: [] for name in targets}
            for level, clients in enumerate(CONCURRENCY):
                order = list(targets) if level % 2 == 0 else list(reversed(targets))
                for name in order:
                    rows_before = (metric(ours.url, "cortexcraft_batch_rows_sum"),
                                   metric(ours.url, "cortexcraft_batch_rows_count"))
                    result = run_level(targets[name], clients, requests, lines, max_tokens)
                    if name.startswith("ours"):
                        rows = metric(ours.url, "cortexcraft_batch_rows_sum") - rows_before[0]
                        steps = metric(ours.url, "cortexcraft_batch_rows_count") - rows_before[1]
                        result["mean_batch_rows"] = rows / steps if steps else None
                    results[name].append(result)
                    print(f"  {name}, {clients} clients: {result['tokens_per_second']:,.0f} tokens/s", flush=True)
            swaps = swap_phase(ours.url, data_dir, swap_seconds, swap_every, 16, lines, max_tokens)
            import torch

            threads = {"ours": ours.threads, "naive": naive.threads, "in-process": torch.get_num_threads()}
        finally:
            ours.stop()
            naive.stop()

    # Greedy answers are compared with in-process generate's, request by request, at every level.
    reference = results["in-process generate"]
    same_text = {name: all(levels[i]["texts"] == reference[i]["texts"] for i in range(len(CONCURRENCY)))
                 for name, levels in results.items() if levels is not reference}
    rows = []
    for name, levels in results.items():
        for result in levels:
            streamed = name.startswith("ours") or name.startswith("in-process")
            rows.append([name, result["clients"], result["requests"], result["failures"], result["tokens_per_second"],
                         f"{result['ttft_p50'] * 1000:.0f}" + ("" if streamed else " *"),
                         f"{result['latency_p50'] * 1000:.0f}", f"{result['latency_p99'] * 1000:.0f}"])
    headers = ["server", "clients", "requests", "failed", "tokens/s", "first token p50 ms", "latency p50 ms",
               "latency p99 ms"]
    print_table(f"Serving the cpu preset (4 layers, 128 wide), {max_tokens} greedy tokens per request "
                f"(* no streaming: the whole answer); torch threads: ours {threads['ours']}, naive {threads['naive']}, "
                f"in-process {threads['in-process']}; same greedy text as in-process generate: "
                f"{', '.join(f'{name.split()[0]} {same}' for name, same in same_text.items())}",
                headers, rows)
    ours_levels = results["ours (cortexcraft serve)"]
    ratio = ours_levels[-1]["tokens_per_second"] / ours_levels[0]["tokens_per_second"]
    print(f"ours: 16 clients / 1 client = {ratio:.1f}x the tokens/s (goal >= 3x); mean rows per decoding step at "
          f"16 clients: {ours_levels[-1]['mean_batch_rows']:.1f}")
    for name in ("naive (FastAPI + transformers pipeline)", "in-process generate"):
        ratio_to = ours_levels[-1]["tokens_per_second"] / results[name][-1]["tokens_per_second"]
        print(f"ours vs {name} at 16 clients: {ratio_to:.1f}x")
    swap_row = [swaps["seconds"], swaps["clients"], swaps["pointer_changes"], swaps["swaps"], swaps["requests"],
                swaps["failures"], swaps["tokens_per_second"], swaps["first_answer_p50"], swaps["first_answer_max"],
                swaps["changes_never_answered"]]
    swap_headers = ["seconds", "clients", "pointer changes", "swaps", "requests", "failed", "tokens/s",
                    "to first answer by new version p50 s", "max s", "changes never answered"]
    print_table("Ours under hot swaps (promote v1 / rollback to v2 alternately)", swap_headers, [swap_row])
    print(markdown_table(headers, rows))
    print()
    print(markdown_table(swap_headers, [swap_row]))
    for levels in results.values():
        for result in levels:
            del result["texts"]
    save_results("bench_serve", {"max_tokens": max_tokens, "requests_per_client": requests, "train_iters": iters,
                                 "torch_threads": threads,
                                 "same_text": same_text, "results": results, "ours_16_vs_1": ratio, "swaps": swaps})


if __name__ == "__main__":
    main()
