"""The full pipeline flow: revalidate -> download -> vocab -> shards -> train -> register -> report.

The stages run as tasks of this one flow (subflows would cost ~1 s each); the stage-group flows
``prepare``, ``train`` and ``report`` reuse the same functions.

    cortexcraft pipeline --source ../shared/data/tinyshakespeare/input.txt [--set k=v ...]
"""
from __future__ import annotations

import logging
import os
import signal
import threading
from typing import Any

from prefect import flow
from prefect.exceptions import CancelledRun
from prefect.states import Cancelled

from cortexcraft.interrupt import Interrupted, signal_name
from cortexcraft.report import bits
from flows.crashes import note_running_here, rerun_crashed
from flows.params import PipelineParams, params_from_cli
from flows.prepare import run_prepare
from flows.report import run_register, run_report
from flows.train import run_train


@flow(name="pipeline", on_crashed=[rerun_crashed])
def pipeline(params: PipelineParams = PipelineParams()) -> dict[str, dict[str, Any]]:
    """Prepare data, train a GPT (from scratch or from the champion, by the retraining policy),
    register it as a version of its model (champion if it beats the current one) and write its
    report; every stage but register is cached by content."""
    note_running_here()
    config = params.run_config()
    records = run_prepare(config, params)
    try:
        records["train"] = run_train(records["shards"], config, params)
    except Interrupted as exc:  # stopped by a signal after a checkpoint: the run is Cancelled, not failed
        return Cancelled(message=str(exc))
    records["register"] = run_register(records["train"], records["shards"], records["download"], params)
    records["report"] = run_report(records["train"], records["shards"], records["register"], config, params)
    return records


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum, f"interrupted by {signal_name(signum)}")


def run_pipeline_from_cli(preset: str, overrides: list[str], source: str | None,
                          data_dir: str | os.PathLike, refresh: list[str], nproc: int = 1,
                          **options: Any) -> int:
    """``cortexcraft pipeline``: run the flow in-process, print the report path and a summary.
    ``options``: model, retrain, retrain_iters, promote_margin, workers, task_runner, dask_address,
    part_mb, nnodes, rdzv_endpoint (see PipelineParams); None means the default."""
    params = params_from_cli(preset=preset, overrides=overrides, source=source,
                             data_dir=str(data_dir), refresh=refresh, nproc=nproc,
                             **{k: v for k, v in options.items() if v is not None})
    # The CLI logs at INFO on the root logger, where Prefect's client would add a line per request.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    # SIGTERM unwinds like Ctrl-C (Prefect re-sends it here after recording the crash), so exit
    # handlers run and stop the temporary API server instead of orphaning it.
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _interrupt) if in_main_thread else None
    try:
        records = pipeline(params)
    except CancelledRun as exc:
        raise Interrupted(signal.SIGINT, str(exc)) from None
    finally:
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)
    summary = records["train"]["summary"]
    unit = "char" if params.run_config().tokenizer_kind == "char" else "token"
    best = summary["best_val_loss"]
    best_text = "no evaluation yet" if best is None else (
        f"best val loss {best:.4f} ({bits(best):.3f} bits/{unit}) at step {summary['best_step']:,}")
    model = records["register"]
    print(records["report"]["report"])
    print(
        f"{best_text}; {summary['steps']:,} steps, {summary['tokens_seen']:,} tokens in {summary['wall_seconds']:.1f} s"
    )
    print(f"model {model['name']} {model['version']} ({model['policy']['mode']}): {model['decision']['message']}")
    return 0
