"""Generation speed: 500 new tokens from the `shakespeare-char` shape (6 layers, 384 wide, context 256).

Three generators, eval mode, no grad, same random-init weights shape (speed does not depend on
training): the seed-style lecture ``generate`` (full recompute of the cropped context per token),
ours without the KV cache, and ours with it. Ours with and without the cache must produce the
same tokens from the same seed. Rounds alternate the order so background load hits all three.
"""
from __future__ import annotations

import time

import torch

from benchlib import parse_args, print_table, save_results

VOCAB_SIZE = 65


def build_models():
    from cortexcraft.config import build_config
    from cortexcraft.model import GPT
    from seed_baseline import SeedGPT

    shape = build_config("shakespeare-char").model
    torch.manual_seed(1337)
    ours = GPT(shape.model_copy(update={"dropout": 0.0}), VOCAB_SIZE).eval()
    seed = SeedGPT(VOCAB_SIZE, shape.block_size, shape.n_layer, shape.n_head, shape.n_embd).eval()
    return shape, ours, seed


def timed(fn) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        out = fn()
    return out, time.perf_counter() - start


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    from cortexcraft.generate import generate

    new_tokens = 100 if args.quick else 500
    rounds = 1 if args.quick else 2
    shape, ours, seed = build_models()
    prompt = torch.zeros((1, 1), dtype=torch.long)

    def run_ours(kv_cache: bool):
        generator = torch.Generator().manual_seed(1337)
        return generate(ours, prompt, new_tokens, temperature=1.0, generator=generator, kv_cache=kv_cache)

    def run_seed():
        torch.manual_seed(1337)
        return seed.generate(prompt, new_tokens)

    runners = {"seed-style generate": run_seed, "ours, no KV cache": lambda: run_ours(False),
               "ours, KV cache": lambda: run_ours(True)}
    seconds: dict[str, list[float]] = {name: [] for name in runners}
    outputs: dict[str, torch.Tensor] = {}
    for r in range(rounds):
        order = list(runners) if r % 2 == 0 else list(reversed(runners))
        for name in order:
            outputs[name], dt = timed(runners[name])
            seconds[name].append(dt)

    identical = torch.equal(outputs["ours, no KV cache"], outputs["ours, KV cache"])
    best = {name: min(times) for name, times in seconds.items()}
    rows, results = [], []
    for name in runners:
        tok_s = new_tokens / best[name]
        rows.append([name, f"{best[name]:.2f}", tok_s, f"{best['seed-style generate'] / best[name]:.1f}x",
                     f"{best['ours, no KV cache'] / best[name]:.1f}x"])
        results.append({"generator": name, "seconds": seconds[name], "tokens_per_second": tok_s})
    print_table(f"Generate {new_tokens} tokens, {shape.n_layer} layers / {shape.n_embd} wide / context "
                f"{shape.block_size}, random init, batch 1 (best of {rounds}); cache output identical: {identical}",
                ["generator", "seconds", "tokens/s", "vs seed", "vs no-cache"], rows)
    save_results("bench_generate", {
        "new_tokens": new_tokens, "rounds": rounds, "shape": shape.model_dump(), "weights": "random init",
        "kv_cache_output_identical": identical, "results": results,
        "speedup_cache_vs_nocache": best["ours, no KV cache"] / best["ours, KV cache"],
        "speedup_cache_vs_seed": best["seed-style generate"] / best["ours, KV cache"],
    })


if __name__ == "__main__":
    main()
