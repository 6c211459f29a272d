"""train stage: a GPT trained on the shards, in a run directory named by its content key.

The run directory depends only on (shards content, model + train config, code), so a retried or
re-run task finds its own checkpoints and the library resumes from the newest valid one.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext

from cortexcraft.errors import CortexCraftError
from cortexcraft.interrupt import Interrupted, StopRequest, exit_with_parent_env, signal_name
from cortexcraft.fileio import read_json
from tasks.stage import (files_under, pretrained_digest, resolve, retry_unless_user_error, stage_dir,
                         stage_key, write_record)

STAGE = "train"
CLI_ERROR = "cortexcraft train: error: "


def train_key(shards: dict[str, Any], config: dict[str, Any], plan: dict[str, Any]) -> str:
    """Content, config and code; a fine-tuned pretrained model also by its files, a run started
    from a champion also by that champion's weights."""
    inputs = [shards["content"], *pretrained_digest(config["train"].get("init_from"))]
    inputs += [plan["init_model_sha256"]] if plan["init_checkpoint"] else []
    return stage_key(STAGE, inputs, {"model": config["model"], "train": config["train"]})


def train_args(config: dict[str, Any], shards_dir: Path, run_dir: Path, start_from: str | None = None) -> list[str]:
    """`cortexcraft train` arguments for this run, with every config value spelled out as --set."""
    from cortexcraft.checkpoint import list_checkpoints

    resume = ["--resume"] if list_checkpoints(run_dir) else []  # the CLI refuses --resume of nothing
    resume += ["--start-from", start_from] if start_from else []
    settings = [f"--set={section}.{name}={json.dumps(value)}"
                for section in ("data", "model", "train", "sample") for name, value in config[section].items()]
    return ["--data", str(shards_dir), "--out", str(run_dir), "--preset", config["preset"], *resume, *settings]


def _new_records(metrics: Path, offset: int) -> tuple[list[dict[str, Any]], int]:
    """Complete lines appended to metrics.jsonl since byte ``offset``, and the new offset. A resume
    rewrites the file shorter; then it is read again from the start."""
    if not metrics.is_file():
        return [], offset
    if metrics.stat().st_size < offset:
        offset = 0
    with open(metrics, "rb") as handle:
        handle.seek(offset)
        data = handle.read()
    complete = data[: data.rfind(b"\n") + 1]
    records = []
    for line in complete.splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # read across a rewrite: progress only, so skip it
            continue
    return records, offset + len(complete)


def _train_in_children(
    command: list[str], run_dir: Path, logger: Any, on_eval: Callable[[dict], None]
) -> dict[str, Any]:
    """Run the trainer processes, logging every line they print and passing each new
    metrics.jsonl record to ``on_eval`` (the children cannot call back into this process)."""
    metrics = run_dir / "metrics.jsonl"
    # Only evaluations made by these children: a resumed run's file already holds earlier ones.
    offset, last_lines, error = metrics.stat().st_size if metrics.is_file() else 0, [], None
    # A session of its own, so that only this process signals torchrun (a terminal's Ctrl-C would
    # reach it twice), and SIGTERM to it if this process dies (even by SIGKILL): the child arranges
    # that itself (exit_with_parent_env), since no code may run between fork and exec in a process
    # with threads.
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        env=dict(os.environ, PYTHONUNBUFFERED="1", **exit_with_parent_env()),
        start_new_session=True,
    ) as child:
        # The first SIGINT/SIGTERM here is passed on: torchrun stops the trainers, which checkpoint.
        with StopRequest(on_request=lambda signum: child.send_signal(signal.SIGTERM)) as stop:
            try:
                for line in child.stdout:
                    line = line.rstrip()
                    logger.info("[torchrun] %s", line)
                    last_lines = (last_lines + [line])[-5:]
                    if CLI_ERROR in line:
                        error = line.split(CLI_ERROR, 1)[1]
                    records, offset = _new_records(metrics, offset)
                    for record in records:
                        on_eval(record)
            except BaseException:  # a second signal: stop at once, leaving no trainer behind
                if child.poll() is None:
                    os.killpg(child.pid, signal.SIGKILL)
                raise
    if stop.requested:
        from cortexcraft.checkpoint import latest_checkpoint

        latest = latest_checkpoint(run_dir)
        raise Interrupted(
            stop.signum,
            f"training stopped by {signal_name(stop.signum)}; "
            f"checkpoint {latest[0] if latest else None}; re-run to resume",
        )
    if child.returncode and error:  # a CortexCraftError in the children: retrying cannot help
        raise CortexCraftError(error)
    if child.returncode:
        raise RuntimeError(f"torchrun exited with status {child.returncode}: {' | '.join(last_lines)}")
    return read_json(run_dir / "summary.json")


@task(
    name=STAGE,
    persist_result=True,
    result_serializer="json",
    retries=1,
    retry_delay_seconds=5,
    retry_condition_fn=retry_unless_user_error,
    cache_policy=NO_CACHE,
)  # run_stage gives it its key, lock and result storage
def train_task(
    shards: dict[str, Any],
    config: dict[str, Any],
    plan: dict[str, Any],
    data_dir: str,
    fresh: bool = False,
    nproc: int = 1,
    nnodes: int = 1,
    rdzv_endpoint: str | None = None,
) -> dict[str, Any]:
    """Train (or resume) the run. ``plan`` (``cortexcraft.registry.plan_retrain``) says whether it
    starts from a champion's checkpoint; ``fresh`` starts over (``--refresh train``) except on a
    retry, which resumes what the first attempt checkpointed; ``nproc`` > 1 trains with that many
    torchrun processes; ``nnodes`` > 1 makes this machine node 0 of that many, meeting at
    ``rdzv_endpoint`` (the log says what to run on the others)."""
    from cortexcraft.config import RunConfig
    from cortexcraft.train import train

    logger = get_run_logger()
    key = train_key(shards, config, plan)
    run_dir = stage_dir(data_dir, STAGE, key)
    run_config = RunConfig.model_validate(config)
    if fresh and TaskRunContext.get().task_run.run_count <= 1 and run_dir.exists():
        logger.info("refresh requested: removing %s to train from scratch", run_dir)
        shutil.rmtree(run_dir)

    progress = create_progress_artifact(0.0, key=f"train-progress-{key}", description=f"Training progress of {run_dir}")

    def on_eval(m: dict[str, Any]) -> None:  # the library logs the evaluation itself, once
        update_progress_artifact(progress, 100.0 * m["step"] / max(m["max_steps"], 1))

    shards_dir = resolve(data_dir, shards["dir"])
    if nproc > 1 or nnodes > 1:
        args = train_args(run_config.model_dump(mode="json"), shards_dir, run_dir, plan["init_checkpoint"])
        # `cortexcraft train` execs torchrun after setting its own parent-death signal.
        launch = [
            f"--nproc-per-node={nproc}",
            f"--nnodes={nnodes}",
            "--node-rank=0",
            *([f"--rdzv-endpoint={rdzv_endpoint}"] if rdzv_endpoint else []),
        ]
        command = [sys.executable, "-m", "cortexcraft", "train", *args, *launch]
        for node in range(1, nnodes):
            others = " ".join(
                shlex.quote(a)
                for a in [
                    "cortexcraft",
                    "train",
                    *args,
                    f"--nproc-per-node={nproc}",
                    f"--nnodes={nnodes}",
                    f"--node-rank={node}",
                    f"--rdzv-endpoint={rdzv_endpoint}",
                ]
            )
            logger.info("node %d of %d: run on that machine (same paths, shared filesystem): %s", node, nnodes, others)
        summary = _train_in_children(command, run_dir, logger, on_eval)
    else:
        summary = train(
            run_config,
            shards_dir,
            run_dir,
            resume=True,
            on_eval=on_eval,
            progress=False,
            start_from=plan["init_checkpoint"],
        )
    update_progress_artifact(progress, 100.0)
    logger.info(
        "trained %s to step %s: best val loss %s at step %s",
        run_dir,
        summary["steps"],
        summary["best_val_loss"],
        summary["best_step"],
    )
    return write_record(data_dir, STAGE, key, files_under(run_dir), summary=summary, plan=plan)
