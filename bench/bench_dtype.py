"""dtype=auto on this CPU: the calibration's fp32 and bf16 matmul times at every preset's shapes,
and the choice it makes, measured afresh (a temporary cache) and compared with the choice cached
for this machine.

    python bench/bench_dtype.py [--quick]

Prints a table and writes bench/results/bench_dtype.json.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

from benchlib import markdown_table, parse_args, print_table, save_results


def main() -> None:
    from cortexcraft.config import build_config, preset_names
    from cortexcraft.device import calibrate_cpu_dtype
    from cortexcraft.model import matmul_shapes
    from cortexcraft.tokenizer import preset_vocab_size
    from cortexcraft.train import CALIBRATION_TOKENS

    args = parse_args(__doc__.splitlines()[0])
    names = ["cpu"] if args.quick else preset_names()
    rows, results = [], {}
    with tempfile.TemporaryDirectory(prefix="bench-dtype-") as tmp:
        for name in names:
            config = build_config(name)
            shapes = matmul_shapes(config.model, preset_vocab_size(config.data),
                                   min(CALIBRATION_TOKENS, config.train.batch_size * config.model.block_size))
            fresh = calibrate_cpu_dtype(shapes, directory=Path(tmp))
            cached = calibrate_cpu_dtype(shapes)  # this machine's cache, measured once ever
            speedup = fresh["float32_seconds"] / fresh["bfloat16_seconds"]
            results[name] = {"fresh": fresh, "cached_choice": cached["dtype"], "bf16_speedup": speedup}
            rows.append([name, 1e3 * fresh["float32_seconds"], 1e3 * fresh["bfloat16_seconds"], f"{speedup:.2f}x",
                         fresh["dtype"], cached["dtype"]])
    headers = ["preset", "fp32 matmuls ms", "bf16 matmuls ms", "bf16 speed-up", "choice now", "cached choice"]
    print_table(
        "dtype=auto: matmul calibration at each preset's shapes (one layer + head, as training calibrates them)",
        headers,
        rows,
    )
    save_results("bench_dtype", {"presets": results, "markdown": markdown_table(headers, rows)})


if __name__ == "__main__":
    main()
