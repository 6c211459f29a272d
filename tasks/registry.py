"""register stage: the trained model becomes a version of its model in DATA_DIR/models, is
promoted to champion or not, and the model's history is shown (table + loss-per-version chart) and
announced (a Prefect event per decision).

Not content-addressed like the other stages: it reads and changes the registry, so it runs on
every pipeline run; a run whose model is already a version only refreshes the history artifacts.
"""
from __future__ import annotations

import re
from typing import Any

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event

from tasks.stage import code_version, resolve, retry_unless_user_error

STAGE = "register"
PROMOTED, REJECTED = "cortexcraft.model.promoted", "cortexcraft.model.rejected"


def artifact_name(name: str) -> str:
    """A model name as an artifact key part (keys allow only a-z, 0-9 and '-')."""
    return re.sub(r"[^a-z0-9-]+", "-", name.lower()).strip("-") or "model"


@task(name=STAGE, retries=1, retry_delay_seconds=5, retry_condition_fn=retry_unless_user_error)
def register_task(run: dict[str, Any], shards: dict[str, Any], corpus: dict[str, Any], model: str,
                  margin: float, data_dir: str) -> dict[str, Any]:
    from cortexcraft.registry import data_identity, decide, history_rows, models_dir_of, register
    from cortexcraft.report import model_history_markdown

    logger = get_run_logger()
    models_dir = models_dir_of(data_dir)
    data = data_identity(resolve(data_dir, shards["dir"]), corpus["manifest"].get("revision"))
    record, created = register(models_dir, model, resolve(data_dir, run["dir"]), data=data,
                               code_version=code_version("tasks.train"), policy=run["plan"],
                               summary=run["summary"])
    version = record["version"]
    decision, decided_now = decide(models_dir, model, version, margin)
    if created:
        logger.info("registered %s %s (%s, step %d, val %.4f)", model, version, record["policy"]["mode"],
                    record["step"], record["val_loss"])
    else:
        logger.info("%s is already %s %s", record["checkpoint"], model, version)
    logger.info("%s", decision["message"])
    if decided_now:  # also a decision a crashed run left undone
        emit_event(
            event=PROMOTED if decision["promoted"] else REJECTED,
            resource={"prefect.resource.id": f"cortexcraft.model.{model}", "prefect.resource.name": model},
            payload={"name": model, "version": version, "val_loss": record["val_loss"],
                     "champion_val_loss": decision["champion_val_loss"], "champion": decision["champion_after"],
                     "champion_before": decision["champion_before"], "policy": record["policy"]["mode"],
                     "message": decision["message"], "data_dir": str(data_dir)},
        )
    rows = history_rows(models_dir, model)
    key = artifact_name(model)
    create_table_artifact(key=f"model-history-{key}", table=rows,
                          description=f"Versions of model {model} in {models_dir / model} (champion marked)")
    create_markdown_artifact(key=f"model-losses-{key}", markdown=model_history_markdown(model, rows),
                             description=f"Val loss per version of model {model}")
    return {"name": model, "version": version, "created": created, "policy": record["policy"],
            "step": record["step"], "val_loss": record["val_loss"], "decision": decision,
            "revision": data["revision_text"], "source": data["source"]}
