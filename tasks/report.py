"""report stage: samples for every prompt plus the run's metrics, as artifacts and report.md."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_link_artifact, create_markdown_artifact, create_table_artifact

from cortexcraft.fileio import atomic_write_text
from tasks.stage import resolve, retry_unless_user_error, stage_dir, stage_key, write_record

STAGE = "report"
REPORT_FILE = "report.md"


def report_key(run: dict[str, Any], config: dict[str, Any], model: dict[str, Any]) -> str:
    """The run's content, sampling settings, and the registry's verdict the report states."""
    verdict = [model["name"], model["version"], model["decision"]["message"], model["revision"]]
    return stage_key(STAGE, [run["content"]], {"sample": config["sample"], "model": verdict})


@task(name=STAGE, persist_result=True, result_serializer="json", retries=1,
      retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # run_stage gives it its key, lock and result storage
def report_task(run: dict[str, Any], shards: dict[str, Any], config: dict[str, Any], model: dict[str, Any],
                data_dir: str) -> dict[str, Any]:
    from cortexcraft.checkpoint import resolve_checkpoint
    from cortexcraft.config import RunConfig
    from cortexcraft.generate import sample_prompts
    from cortexcraft.report import eval_rows, render_report
    from cortexcraft.metrics import read_metrics

    logger = get_run_logger()
    key = report_key(run, config, model)
    run_dir = resolve(data_dir, run["dir"])
    checkpoint, state = resolve_checkpoint(run_dir, "best")
    # The model section the run really trained (with init_from, the pretrained architecture).
    run_config = RunConfig.model_validate({**config, "model": state["config"]["model"]})
    samples = sample_prompts(run_dir, run_config.sample)
    for prompt, seed, text in samples:
        logger.info("sample for %r (seed %d): %r", prompt, seed, text[:80])
    history = read_metrics(run_dir)
    markdown = render_report(
        config=run_config, summary=run["summary"], history=history, samples=samples,
        parameters=run["summary"]["params"], vocab_size=shards["vocab_size"],
        run_dir=run_dir, checkpoint=checkpoint, model=model,
    )
    out_file = stage_dir(data_dir, STAGE, key) / REPORT_FILE
    atomic_write_text(out_file, markdown)

    # Keyed by the run, so a report re-rendered with new sampling settings is a new version.
    run_key = run["key"]
    create_markdown_artifact(key=f"report-{run_key}", markdown=markdown, description=f"Run report ({out_file})")
    create_table_artifact(key=f"eval-history-{run_key}", table=eval_rows(history),
                          description=f"Evaluations of {run_dir}")
    create_link_artifact(key=f"checkpoint-{run_key}", link=checkpoint.as_uri(), link_text=str(checkpoint),
                         description="Best checkpoint (lowest val loss)")
    create_link_artifact(key=f"run-dir-{run_key}", link=run_dir.as_uri(), link_text=str(run_dir),
                         description="Run directory: run.json, metrics.jsonl, summary.json, checkpoints/")
    logger.info("report written to %s", out_file)
    return write_record(data_dir, STAGE, key, [out_file], report=str(out_file))
