"""champion-card flow: what the automation on `cortexcraft.model.promoted` runs.

The `champion-card` deployment (prefect.yaml) has a trigger on that event and passes the event's
model name, version and data directory; the flow publishes a `champion-<name>` markdown artifact
saying which version now serves, with its losses, how it was trained, and a sample from it.
"""
from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

from cortexcraft.registry import models_dir_of, resolve
from cortexcraft.report import champion_card_markdown
from tasks.registry import artifact_name

SAMPLE_TOKENS = 200


@task(name="champion-sample")
def champion_sample(version_dir: str, prompt: str, seed: int) -> str:
    from cortexcraft.generate import generate_from_run

    return generate_from_run(version_dir, prompt=prompt, max_new_tokens=SAMPLE_TOKENS, seed=seed)


@flow(name="champion-card")
def champion_card(model: str, version: str, data_dir: str = "data") -> str:
    """Publish the card of ``model@version`` (the version an event says was promoted)."""
    path, record = resolve(models_dir_of(data_dir), f"{model}@{version}")
    sample_cfg = record["config"]["sample"]
    prompt = sample_cfg["prompts"][0]
    text = champion_sample(str(path), prompt, sample_cfg["seed"])
    markdown = champion_card_markdown(record, path, prompt, text)
    create_markdown_artifact(key=f"champion-{artifact_name(model)}", markdown=markdown,
                             description=f"The serving version of model {model}")
    get_run_logger().info("champion of %s is %s (val %.4f)", model, version, record["val_loss"])
    return version
