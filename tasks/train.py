"""train stage: a GPT trained on the shards, in a run directory named by its content key.

The run directory depends only on (shards content, model + train config, code), so a retried or
re-run task finds its own checkpoints and the library resumes from the newest valid one.
"""
from __future__ import annotations

import shutil
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from tasks.stage import (cache_key, files_under, resolve, retry_unless_user_error, stage_dir,
                         stage_key, write_record)

STAGE = "train"


def train_key(shards: dict[str, Any], config: dict[str, Any]) -> str:
    return stage_key(STAGE, [shards["content"]], {"model": config["model"], "train": config["train"]})


def continuation(data_dir: str, shards: dict[str, Any], config: dict[str, Any], extra_iters: int) -> dict[str, int]:
    """Steps for "continue for ``extra_iters`` more iterations": from the run's newest valid
    checkpoint, or from scratch to max_iters when there is none. Fixed before the task starts, so
    a retry aims at the same final step."""
    from cortexcraft.checkpoint import latest_checkpoint

    latest = latest_checkpoint(stage_dir(data_dir, STAGE, train_key(shards, config)))
    if latest is None:
        return {"from_step": 0, "to_step": config["train"]["max_iters"]}
    step = latest[1]["step"]
    return {"from_step": step, "to_step": step + extra_iters}


@task(name=STAGE, persist_result=True, result_serializer="json", retries=1, retry_delay_seconds=5,
      retry_condition_fn=retry_unless_user_error,
      cache_key_fn=lambda ctx, p: cache_key(STAGE, train_key(p["shards"], p["config"])))
def train_task(shards: dict[str, Any], config: dict[str, Any], data_dir: str, fresh: bool = False,
               continued: dict[str, int] | None = None) -> dict[str, Any]:
    """Train (or resume) the run. ``fresh`` starts over (``--refresh train``) except on a retry,
    which resumes what the first attempt checkpointed; ``continued`` trains up to its ``to_step``."""
    from cortexcraft.config import RunConfig
    from cortexcraft.train import train

    logger = get_run_logger()
    key = train_key(shards, config)
    run_dir = stage_dir(data_dir, STAGE, key)
    run_config = RunConfig.model_validate(config)
    if continued:
        run_config.train.max_iters = continued["to_step"]
        logger.info("continuing %s from step %d to step %d", run_dir, continued["from_step"], continued["to_step"])
    if fresh and TaskRunContext.get().task_run.run_count <= 1 and run_dir.exists():
        logger.info("refresh requested: removing %s to train from scratch", run_dir)
        shutil.rmtree(run_dir)

    progress = create_progress_artifact(0.0, key=f"train-progress-{key}",
                                        description=f"Training progress of {run_dir}")

    def on_eval(m: dict[str, Any]) -> None:
        logger.info("step %d/%d: train loss %.4f, val loss %.4f, lr %.2e, %s tokens, %.1f s",
                    m["step"], m["max_steps"], m["train_loss"], m["val_loss"], m["lr"],
                    f"{m['tokens_seen']:,}", m["elapsed_seconds"])
        update_progress_artifact(progress, 100.0 * m["step"] / max(m["max_steps"], 1))

    summary = train(run_config, resolve(data_dir, shards["dir"]), run_dir, resume=True,
                    on_eval=on_eval, progress=False)
    update_progress_artifact(progress, 100.0)
    logger.info("trained %s: best val loss %.4f at step %d", run_dir, summary["best_val_loss"], summary["best_step"])
    return write_record(data_dir, STAGE, key, files_under(run_dir), summary=summary, continued=continued)
