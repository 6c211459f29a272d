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

from tasks.stage import (cache_key, results_dir, retry_unless_user_error, stage_dir, stage_key, valid_record,
                         write_record)

COUNT, ENCODE = "count-part", "encode-part"
COUNTS_FILE, IDS_FILE = "counts.npy", "ids.bin"


def part_key(kind: str, corpus: dict[str, Any], part: dict[str, Any], vocab: dict[str, Any] | None = None) -> str:
    inputs = [corpus["content"]] + ([vocab["content"]] if vocab else [])
    return stage_key("parts", inputs, {"kind": kind, "start": part["start"], "stop": part["stop"]})


@task(name=COUNT, task_run_name="count-part-{part[index]}", persist_result=True, result_serializer="json",
      retries=1, retry_condition_fn=retry_unless_user_error,
      cache_key_fn=lambda ctx, p: cache_key(COUNT, part_key(COUNT, p["corpus"], p["part"])))
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
      cache_key_fn=lambda ctx, p: cache_key(ENCODE, part_key(ENCODE, p["corpus"], p["part"], p["vocab"])))
def encode_part_task(corpus: dict[str, Any], vocab: dict[str, Any], part: dict[str, Any], data_dir: str) -> dict[str, Any]:
    from cortexcraft.parts import encode_part

    key = part_key(ENCODE, corpus, part, vocab)
    path = stage_dir(data_dir, ENCODE, key) / IDS_FILE
    encoded = encode_part(vocab["manifest"]["dir"], corpus["manifest"], part, str(path))
    return write_record(data_dir, ENCODE, key, [path], part=part, tokens=encoded["tokens"])


def map_parts(part_task: Task, parts: list[dict[str, Any]], data_dir: str, **shared: Any) -> list[dict[str, Any]]:
    """``part_task`` mapped over ``parts`` in the flow's task runner, records in part order. Parts
    whose outputs are gone or changed since their cache record are refreshed; the rest are Cached."""
    keys = [part_key(part_task.name, shared["corpus"], p, shared.get("vocab")) for p in parts]
    stale = [valid_record(data_dir, part_task.name, key) is None for key in keys]
    fixed = {name: unmapped(value) for name, value in shared.items()}
    futures = {}
    for refresh_cache in (False, True):
        chosen = [p for p, is_stale in zip(parts, stale) if is_stale == refresh_cache]
        if chosen:
            configured = part_task.with_options(result_storage=results_dir(data_dir), refresh_cache=refresh_cache)
            futures[refresh_cache] = (chosen, configured.map(part=chosen, data_dir=unmapped(data_dir), **fixed))
    by_index = {}
    for chosen, mapped in futures.values():
        by_index.update({p["index"]: record for p, record in zip(chosen, mapped.result())})
    return [by_index[p["index"]] for p in parts]


def encoded_parts(data_dir: str, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What ``write_shards_from_parts`` takes, from ``encode_part_task`` records."""
    return [dict(r["part"], tokens=r["tokens"], path=str(Path(data_dir) / next(iter(r["files"])))) for r in records]
