"""download stage: fetch (or read) the corpus into the download cache."""
from __future__ import annotations

import glob
from pathlib import Path
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from cortexcraft.config import DataConfig
from cortexcraft.fileio import sha256_file, sha256_json
from tasks.stage import retry_unless_user_error, stage_key, write_record

STAGE = "download"


def file_digest(path: str) -> str:
    """Content hash of a local file, or a marker the library will turn into a clear error."""
    try:
        return sha256_file(path)
    except OSError:
        return f"unreadable:{path}"


def local_source_digest(spec: str) -> str | None:
    """Content hash of a local source (file, directory or glob), None for hub ids and URLs.

    Content, not the path: an edited input.txt must re-run every stage.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
    elif glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
    else:
        return None
    return sha256_json([[p.as_posix(), sha256_file(p)] for p in files])


def download_key(data_cfg: dict[str, Any]) -> str:
    digest = local_source_digest(data_cfg["source"])
    return stage_key(STAGE, [digest] if digest else [], data_cfg)


@task(name=STAGE, persist_result=True, result_serializer="json", retries=2, retry_delay_seconds=10,
      retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # run_stage gives it its key, lock and result storage
def download_task(data_cfg: dict[str, Any], data_dir: str) -> dict[str, Any]:
    from cortexcraft.sources import download

    key = download_key(data_cfg)
    manifest = download(DataConfig(**data_cfg), Path(data_dir) / "downloads")
    files = [Path(manifest["path"])] + ([Path(manifest["doc_starts"])] if manifest.get("doc_starts") else [])
    record = write_record(data_dir, STAGE, key, files, manifest=manifest)
    get_run_logger().info("corpus %s: %s documents, %s characters", data_cfg["source"],
                          manifest["documents"], manifest["chars"])
    create_markdown_artifact(
        key=f"corpus-{key}",
        description="Corpus read by the download stage",
        markdown=(f"### Corpus\n\n| | |\n|---|---|\n| source | `{data_cfg['source']}` |\n"
                  f"| documents | {manifest['documents']:,} |\n| characters | {manifest['chars']:,} |\n"
                  f"| files | {', '.join(f'`{f}`' for f in record['files'])} |\n"),
    )
    return record
