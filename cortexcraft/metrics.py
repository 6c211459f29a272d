"""A run's evaluation history (``metrics.jsonl``, one JSON record per evaluation) and the
training progress bar."""
from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from cortexcraft.fileio import append_text, atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


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


def write_metrics(run_dir: Path, records: list[dict[str, Any]]) -> None:
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in records))


def append_metrics(run_dir: Path, record: dict[str, Any]) -> None:
    # One short write per line: a kill tears at most the last line, which read_metrics skips and
    # the resume rewrites away.
    append_text(run_dir / METRICS_FILE, json.dumps(record) + "\n")


def progress_bar(total: int, start: int) -> tqdm:
    """A one-line bar on stderr: step of total, loss and tokens/s (set with ``set_postfix_str``).
    Log lines go above it while it is open under ``tqdm.contrib.logging.logging_redirect_tqdm``."""
    return tqdm(total=total, initial=start, file=sys.stderr, unit="step", dynamic_ncols=True, mininterval=0.5)
