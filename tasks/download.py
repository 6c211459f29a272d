"""download stage: fetch (or read) the corpus into the download cache."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from cortexcraft.config import DataConfig
from cortexcraft.freshness import revision_id
from cortexcraft.markdown import code_span
from tasks.stage import retry_unless_user_error, stage_key, write_record

STAGE = "download"


def download_cache(data_dir: str) -> Path:
    return Path(data_dir) / "downloads"


def download_key(data_cfg: dict[str, Any], revision: dict[str, Any]) -> str:
    """Keyed by the source's current revision (``cortexcraft.sources.source_revision``), so an
    edited file, a new ETag or a new hub commit re-runs the stage and everything after it."""
    return stage_key(STAGE, [revision_id(revision)], data_cfg)


@task(name="revalidate", retries=2, retry_delay_seconds=10, retry_condition_fn=retry_unless_user_error)
def revalidate_task(data_cfg: dict[str, Any], data_dir: str) -> dict[str, Any]:
    """The source's current revision (a HEAD request, a hub API call or a stat per file): never
    cached, since finding out whether the source changed is its whole job."""
    from cortexcraft.sources import describe_revision, revision_summary, source_revision

    revision = source_revision(DataConfig(**data_cfg), download_cache(data_dir))
    get_run_logger().info("source %s: %s", data_cfg["source"], describe_revision(revision_summary(revision)))
    return revision


@task(name=STAGE, persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # run_stage gives it its key, lock and result storage
def download_task(
    data_cfg: dict[str, Any], revision: dict[str, Any], data_dir: str, workers: int = 1
) -> dict[str, Any]:
    from cortexcraft.sources import describe_revision, download

    key = download_key(data_cfg, revision)
    manifest = download(DataConfig(**data_cfg), download_cache(data_dir), revision=revision, workers=workers)
    files = [Path(manifest["path"])] + ([Path(manifest["doc_starts"])] if manifest.get("doc_starts") else [])
    record = write_record(data_dir, STAGE, key, files, manifest=manifest)
    revision_text = describe_revision(manifest.get("revision"))
    get_run_logger().info(
        "corpus %s: %s documents, %s characters, revision %s",
        data_cfg["source"],
        manifest["documents"],
        manifest["chars"],
        revision_text,
    )
    create_markdown_artifact(
        key=f"corpus-{key}",
        description="Corpus read by the download stage",
        markdown=(
            f"### Corpus\n\n| | |\n|---|---|\n| source | {code_span(data_cfg['source'], in_table=True)} |\n"
            f"| revision | {revision_text} |\n"
            f"| documents | {manifest['documents']:,} |\n| characters | {manifest['chars']:,} |\n"
            f"| files | {', '.join(code_span(f, in_table=True) for f in record['files'])} |\n"
        ),
    )
    return record
