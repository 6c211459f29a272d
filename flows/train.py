"""train flow: train the run for a shards record, from scratch or from the champion's weights."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from cortexcraft.config import RunConfig
from cortexcraft.registry import models_dir_of, plan_retrain
from flows.params import PipelineParams
from tasks.stage import resolve, run_stage
from tasks.train import train_key, train_task


def run_train(shards: dict[str, Any], config: RunConfig, params: PipelineParams) -> dict[str, Any]:
    """The train stage as a task of the current flow. The retraining policy picks the start:
    ``continue``/``finetune`` train the champion's weights ``retrain_iters`` steps further, in a
    run directory of their own (so a re-run with nothing changed is Cached)."""
    config_dict = config.model_dump(mode="json")
    data_dir, refresh = params.data_path(), params.refreshed()
    plan = plan_retrain(models_dir_of(data_dir), params.model_name(), params.retrain,
                        resolve(data_dir, shards["dir"]), config_dict["model"])
    if plan["init_checkpoint"]:
        config_dict["train"].update(max_iters=plan["init_step"] + params.retrain_iters, max_epochs=None)
    get_run_logger().info("retraining policy %s", plan["reason"])
    return run_stage(train_task, train_key(shards, config_dict, plan), refresh,
                     shards=shards, config=config_dict, plan=plan, data_dir=data_dir,
                     fresh="train" in refresh, nproc=params.nproc, nnodes=params.nnodes,
                     rdzv_endpoint=params.rdzv_endpoint)


@flow(name="train")
def train(shards: dict[str, Any], params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """Train on the shards record returned by the prepare flow."""
    return run_train(shards, params.run_config(), params)
