"""What every benchmark shares: the machine description, peak RSS, tables, results JSON, and the
prepared Tiny Shakespeare shards. Benchmarks are scripts (``python bench/<name>.py [--quick]``),
not tests: they print a small table and write ``bench/results/<name>.json``.
"""
from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import time
from pathlib import Path
from typing import Any, Sequence

REPO = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO / "bench" / "results"
SHARED_DATA = Path(os.environ.get("CORTEXCRAFT_SHARED_DATA", REPO.parent / "shared" / "data"))

if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from cortexcraft.fileio import atomic_write_json  # noqa: E402


def parse_args(description: str, extra=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="smaller, faster run (a smoke test of the benchmark)")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice, one per core); on a "
                        "machine shared with other jobs 1 thread avoids OpenMP stalls that make 2 threads 5-20x slower")
    if extra is not None:
        extra(parser)
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args


def machine() -> dict[str, Any]:
    import torch

    from cortexcraft.device import cpu_info

    info = cpu_info()
    flags = set(info["flags"])
    wanted = [f for f in ("avx2", "avx512_f", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_tile", "bf16", "sve",
                          "sve_bf16") if f in flags]
    isa = " ".join(wanted) + ("; AMX" if "amx_bf16" in flags else "; no AMX")
    return {
        "cpu": info["model"], "flags": wanted, "isa": isa, "amx": "amx_bf16" in flags,
        "cores": os.cpu_count(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "load_average": os.getloadavg()[0],
    }


def peak_rss_mib(children: bool = False) -> float:
    # ru_maxrss is in KiB on Linux.
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    return resource.getrusage(who).ru_maxrss / 1024


def save_results(name: str, payload: dict[str, Any]) -> Path:
    path = RESULTS_DIR / f"{name}.json"
    record = {"benchmark": name, "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
              "machine": machine(), **payload}
    atomic_write_json(path, record)
    print(f"wrote {path.relative_to(REPO)}")
    return path


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[_cell(v) for v in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def print_table(title: str, headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    print(f"\n{title}\n{format_table(headers, rows)}\n", flush=True)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}" if abs(value) < 10 else f"{value:.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return "-" if value is None else str(value)


def tinyshakespeare_text() -> Path:
    path = SHARED_DATA / "tinyshakespeare" / "input.txt"
    if not path.is_file():
        sys.exit(f"{path} not found; set CORTEXCRAFT_SHARED_DATA to the folder holding tinyshakespeare/input.txt")
    return path


def prepared_tinyshakespeare(out_dir: Path) -> Path:
    """Tiny Shakespeare as our shard directory (char vocab, val = last 10%), prepared once per out_dir."""
    from cortexcraft.config import DataConfig
    from cortexcraft.prepare import prepare

    if not (out_dir / "manifest.json").is_file():
        prepare(DataConfig(source=str(tinyshakespeare_text())), out_dir, cache_dir=out_dir / "downloads")
    return out_dir


def split_paths(data_dir: Path, split: str) -> tuple[list[Path], str]:
    """The shard files of one split and their numpy dtype, from the shard manifest."""
    from cortexcraft.fileio import read_json

    manifest = read_json(data_dir / "manifest.json")
    files = [data_dir / f["name"] for f in manifest["splits"][split]["files"]]
    return files, manifest["dtype"]
