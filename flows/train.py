"""train flow: train (or resume, or continue) the run for a shards record."""
from __future__ import annotations

from typing import Any

from prefect import flow

from cortexcraft.config import RunConfig
from flows.params import PipelineParams
from tasks.stage import run_stage
from tasks.train import continuation, train_key, train_task


def run_train(shards: dict[str, Any], config: RunConfig, params: PipelineParams) -> dict[str, Any]:
    """The train stage as a task of the current flow. With continue_training_iters it always
    runs (never Cached) and trains the existing run further."""
    config_dict = config.model_dump(mode="json")
    data_dir, refresh = params.data_path(), params.refreshed()
    fresh = "train" in refresh
    continued = None
    if params.continue_training_iters and not fresh:
        continued = continuation(data_dir, shards, config_dict, params.continue_training_iters)
        refresh = refresh | {"train"}
    return run_stage(train_task, train_key(shards, config_dict), refresh,
                     shards=shards, config=config_dict, data_dir=data_dir, fresh=fresh, continued=continued,
                     nproc=params.nproc, nnodes=params.nnodes, rdzv_endpoint=params.rdzv_endpoint)


@flow(name="train")
def train(shards: dict[str, Any], params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """Train on the shards record returned by the prepare flow."""
    return run_train(shards, params.run_config(), params)
