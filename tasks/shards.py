"""shards stage: train/val token shards plus the tokenizer, in one directory training reads."""
from __future__ import annotations

import os
import shutil
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_table_artifact

from cortexcraft.config import DataConfig
from tasks.stage import files_under, resolve, retry_unless_user_error, stage_dir, stage_key, write_record

STAGE = "shards"


def shards_key(corpus: dict[str, Any], vocab: dict[str, Any], data_cfg: dict[str, Any]) -> str:
    return stage_key(STAGE, [corpus["content"], vocab["content"]], data_cfg)


@task(name=STAGE, persist_result=True, result_serializer="json", retries=1,
      retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # run_stage gives it its key, lock and result storage
def write_shards_task(corpus: dict[str, Any], vocab: dict[str, Any], data_cfg: dict[str, Any],
                      data_dir: str, parts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Encode the corpus into shards, or assemble them from ``parts`` (``encode_part_task``
    records covering the corpus): the same bytes either way. Assembled parts are deleted."""
    from cortexcraft.parts import write_shards_from_parts
    from cortexcraft.shards import MANIFEST as SHARDS_MANIFEST, write_shards
    from tasks.parts import encoded_parts

    key = shards_key(corpus, vocab, data_cfg)
    out_dir = stage_dir(data_dir, STAGE, key)
    if not (out_dir / SHARDS_MANIFEST).is_file():
        # Leftovers of a damaged stage (e.g. only stage.json): write_shards refuses to replace them.
        shutil.rmtree(out_dir, ignore_errors=True)
    if parts:
        manifest = write_shards_from_parts(corpus["manifest"], vocab["manifest"], DataConfig(**data_cfg), out_dir,
                                           encoded_parts(data_dir, parts), workers=os.cpu_count() or 1)
    else:
        manifest = write_shards(corpus["manifest"], vocab["manifest"], DataConfig(**data_cfg), out_dir)
    record = write_record(data_dir, STAGE, key, files_under(out_dir),
                          vocab_size=manifest["vocab_size"], splits=manifest["splits"])
    for part in parts or []:  # the shards hold their ids now; keeping both would double the disk used
        shutil.rmtree(resolve(data_dir, part["dir"]), ignore_errors=True)
    rows = [{"split": split, "file": f["name"], "tokens": f["tokens"], "sha256": f["sha256"][:12]}
            for split, info in manifest["splits"].items() for f in info["files"]]
    get_run_logger().info("shards in %s: %s", out_dir, ", ".join(
        f"{split} {info['tokens']:,} tokens" for split, info in manifest["splits"].items()))
    create_table_artifact(
        key=f"shards-{key}",
        table=rows,
        description=f"Token shards in {out_dir} (vocab size {manifest['vocab_size']}, dtype {manifest['dtype']})",
    )
    return record
