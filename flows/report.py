"""report flow: samples, metrics and the loss curve of a trained run."""
from __future__ import annotations

from typing import Any

from prefect import flow

from cortexcraft.config import RunConfig
from flows.params import PipelineParams
from tasks.report import report_key, report_task
from tasks.stage import run_stage


def run_report(run: dict[str, Any], shards: dict[str, Any], config: RunConfig, params: PipelineParams) -> dict[str, Any]:
    """The report stage as a task of the current flow."""
    config_dict = config.model_dump(mode="json")
    data_dir = params.data_path()
    return run_stage(report_task, report_key(run, config_dict), params.refreshed(),
                     run=run, shards=shards, config=config_dict, data_dir=data_dir)


@flow(name="report")
def report(run: dict[str, Any], shards: dict[str, Any], params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """Report on the run record returned by the train flow (shards: the prepare flow's record)."""
    return run_report(run, shards, params.run_config(), params)
