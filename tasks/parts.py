"""Corpus parts as tasks: each part counted (char vocabulary) or encoded (shards) by its own task,
mapped over the parts in the flow's task runner (processes or Dask), each cached on its own so a
killed preparation resumes with the parts it had not finished.

A part's key is its byte range of the corpus content (plus the tokenizer for an encoded part):
the shard layout and the number of workers do not enter it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import Task, task, unmapped
from prefect.cache_policies import NO_CACHE

from tasks.stage import (cache_key, discard_stale_outputs, locked_cache_policy, results_dir, retry_unless_user_error,
                         stage_dir, stage_key, write_record)

COUNT, ENCODE = "count-part", "encode-part"
COUNTS_FILE, IDS_FILE = "counts.npy", "ids.bin"


def part_key(kind: str, corpus: dict[str, Any], part: dict[str, Any], vocab: dict[str, Any] | None = None) -> str:
    inputs = [corpus["content"]] + ([vocab["content"]] if vocab else [])
    return stage_key("parts", inputs, {"kind": kind, "start": part["start"], "stop": part["stop"]})


@task(name=COUNT, task_run_name="count-part-{part[index]}", persist_result=True, result_serializer="json",
      retries=1, retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # map_parts gives it its key, lock and result storage
def count_part_task(corpus: dict[str, Any], part: dict[str, Any], data_dir: str) -> dict[str, Any]:
    import numpy as np

    from cortexcraft.fileio import atomic_open
    from cortexcraft.parts import count_part

    key = part_key(COUNT, corpus, part)
    path = stage_dir(data_dir, COUNT, key) / COUNTS_FILE
    with atomic_open(path) as handle:
        np.save(handle, count_part(corpus["manifest"], part))
    return write_record(data_dir, COUNT, key, [path], part=part)


@task(name=ENCODE, task_run_name="encode-part-{part[index]}", persist_result=True, result_serializer="json",
      retries=1, retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # map_parts gives it its key, lock and result storage
def encode_part_task(
    corpus: dict[str, Any], vocab: dict[str, Any], part: dict[str, Any], data_dir: str, encode_threads: int = 1
) -> dict[str, Any]:
    from cortexcraft.parts import encode_part

    key = part_key(ENCODE, corpus, part, vocab)
    path = stage_dir(data_dir, ENCODE, key) / IDS_FILE
    encoded = encode_part(vocab["manifest"]["dir"], corpus["manifest"], part, str(path), encode_threads)
    return write_record(data_dir, ENCODE, key, [path], part=part, tokens=encoded["tokens"])


def map_parts(part_task: Task, parts: list[dict[str, Any]], data_dir: str, **shared: Any) -> list[dict[str, Any]]:
    """``part_task`` mapped over ``parts`` in the flow's task runner, records in part order. Each
    part is a transaction under its stage lock, as the stages are: of two pipelines needing one
    part, one computes it and the other waits and comes out Cached. Parts whose outputs are gone
    or changed since their cache record compute again."""
    name = part_task.name
    for part in parts:
        discard_stale_outputs(data_dir, name, part_key(name, shared["corpus"], part, shared.get("vocab")))
    policy = locked_cache_policy(
        data_dir, lambda _, p: cache_key(name, part_key(name, p["corpus"], p["part"], p.get("vocab")))
    )
    configured = part_task.with_options(cache_policy=policy, result_storage=results_dir(data_dir))
    fixed = {key: unmapped(value) for key, value in shared.items()}
    return configured.map(part=parts, data_dir=unmapped(data_dir), **fixed).result()


def encoded_parts(data_dir: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What ``write_shards_from_parts`` takes, from ``encode_part_task`` records."""
    return [dict(r["part"], tokens=r["tokens"], path=str(Path(data_dir) / next(iter(r["files"])))) for r in records]
