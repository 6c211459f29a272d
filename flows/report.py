"""report flow: register a trained run in the model registry, then its samples, metrics and loss curve."""
from __future__ import annotations

from typing import Any

from prefect import flow

from cortexcraft.config import RunConfig
from flows.params import PipelineParams
from tasks.registry import register_task
from tasks.report import report_key, report_task
from tasks.stage import run_stage


def run_register(run: dict[str, Any], shards: dict[str, Any], corpus: dict[str, Any],
                 params: PipelineParams) -> dict[str, Any]:
    """The register stage (a version in the model registry, promoted or not) as a task of the
    current flow; it always runs, and registers a model only once."""
    return register_task(run=run, shards=shards, corpus=corpus, model=params.model_name(),
                      margin=params.promote_margin, data_dir=params.data_path())


def run_report(run: dict[str, Any], shards: dict[str, Any], model: dict[str, Any], config: RunConfig,
               params: PipelineParams) -> dict[str, Any]:
    """The report stage as a task of the current flow."""
    config_dict = config.model_dump(mode="json")
    data_dir = params.data_path()
    return run_stage(report_task, report_key(run, config_dict, model), params.refreshed(),
                     run=run, shards=shards, config=config_dict, model=model, data_dir=data_dir)


@flow(name="report")
def report(run: dict[str, Any], records: dict[str, dict[str, Any]],
           params: PipelineParams = PipelineParams()) -> dict[str, Any]:
    """Register the run record returned by the train flow and report on it (records: what the
    prepare flow returned)."""
    model = run_register(run, records["shards"], records["download"], params)
    return run_report(run, records["shards"], model, params.run_config(), params)
