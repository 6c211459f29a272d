"""The installed ``cortexcraft`` command: the library's commands (``cortexcraft.cli``) plus
``pipeline``, which runs the Prefect flow in-process. Prefect stays out of the library: this is
the only command line that names it.

    cortexcraft pipeline --source ../shared/data/tinyshakespeare/input.txt [--set k=v ...]
    python -m flows pipeline ...          # the same
"""
from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path
from typing import Any

from cortexcraft.cli import add_config_options, add_parts_options, default_data_dir, main as library_main
from cortexcraft.errors import CortexCraftError


def add_pipeline_command(subparsers: Any) -> None:
    p = subparsers.add_parser("pipeline", help="run the full Prefect pipeline in-process")
    add_config_options(p, "cpu")
    p.add_argument("--source", help="corpus spec, as for prepare (default: the preset's)")
    p.add_argument("--data-dir", type=Path, help="where stage outputs and the cache live (default ./data)")
    p.add_argument("--refresh", nargs="+", default=[], metavar="STAGE",
                   help="force these stages to re-run: download vocab shards train report, or all")
    p.add_argument(
        "--model", help="register the trained model under this name in DATA_DIR/models (default: the preset's name)"
    )
    p.add_argument(
        "--retrain",
        choices=["fresh", "continue", "finetune", "auto"],
        help="fresh (default): from scratch; continue/finetune: from the champion's weights for "
        "--retrain-iters more steps; auto: continue on unchanged data, finetune on changed data",
    )
    p.add_argument(
        "--retrain-iters", type=int, metavar="N", help="steps continue/finetune train beyond the champion (default 500)"
    )
    p.add_argument(
        "--promote-margin",
        type=float,
        metavar="NATS",
        help="promote a challenger only when its val loss beats the champion's by more than this (default 0)",
    )
    p.add_argument("--nproc", type=int, default=1, help="training processes; > 1 trains under torchrun")
    p.add_argument(
        "--nnodes",
        type=int,
        default=1,
        help="machines training together; this is node 0 (the log says what to run on the others)",
    )
    p.add_argument(
        "--rdzv-endpoint", metavar="HOST:PORT", help="this machine's address and a free port, for the other nodes"
    )
    add_parts_options(p)
    p.add_argument(
        "--task-runner",
        choices=["process", "dask"],
        default="process",
        help="what runs the part tasks: local processes (default) or a Dask cluster",
    )
    p.add_argument(
        "--dask-address", metavar="tcp://HOST:PORT", help="an existing Dask scheduler (implies --task-runner dask)"
    )


def run_pipeline_command(args: argparse.Namespace) -> int:
    from flows.pipeline import run_pipeline_from_cli

    return run_pipeline_from_cli(
        preset=args.preset,
        overrides=args.overrides,
        source=args.source,
        data_dir=args.data_dir or default_data_dir(),
        refresh=args.refresh,
        nproc=args.nproc,
        model=args.model,
        retrain=args.retrain,
        retrain_iters=args.retrain_iters,
        promote_margin=args.promote_margin,
        workers=args.workers,
        task_runner=args.task_runner,
        dask_address=args.dask_address,
        part_mb=args.part_mb,
        nnodes=args.nnodes,
        rdzv_endpoint=args.rdzv_endpoint,
    )


def _user_error_names() -> set[str]:
    names, todo = set(), [CortexCraftError]
    while todo:
        cls = todo.pop()
        names.add(cls.__name__)
        todo.extend(cls.__subclasses__())
    return names


class HidePrefectReportsOfUserErrors(logging.Filter):
    """Drops Prefect's own console reports of a task or flow run that failed with a
    CortexCraftError (a traceback and two "Finished in state Failed" lines): the CLI prints that
    error as one line. Installed on console handlers only, so the API still gets the full logs."""

    _STATE = re.compile(r"(?:encountered an exception|during execution):? (\w+)\b")

    def filter(self, record: logging.LogRecord) -> bool:
        if not record.name.startswith("prefect"):
            return True
        if record.exc_info and isinstance(record.exc_info[1], CortexCraftError):
            return False
        match = self._STATE.search(record.getMessage())
        return not (match and match.group(1) in _user_error_names())


def main(argv: list[str] | None = None) -> int:
    return library_main(
        argv,
        {"pipeline": (add_pipeline_command, run_pipeline_command)},
        console_filter=HidePrefectReportsOfUserErrors(),
    )
