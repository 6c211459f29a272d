"""vocab stage: the tokenizer (vocab.txt or tokenizer.json) of a corpus."""
from __future__ import annotations

from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.artifacts import create_markdown_artifact

from cortexcraft.config import DataConfig
from cortexcraft.markdown import code_span, fence
from tasks.stage import (file_digest, files_under, pretrained_digest, resolve, retry_unless_user_error, stage_dir,
                         stage_key, write_record)

STAGE = "vocab"


def vocab_key(corpus: dict[str, Any], data_cfg: dict[str, Any], init_from: str | None = None) -> str:
    inputs = [corpus["content"]]
    for name in ("vocab_file", "tokenizer_file"):
        if data_cfg.get(name):
            inputs.append(file_digest(data_cfg[name]))
    if init_from:
        # A pretrained model's tokenizer replaces the one data_cfg describes.
        return stage_key(STAGE, inputs + pretrained_digest(init_from, weights=False), {"init_from": init_from})
    return stage_key(STAGE, inputs, data_cfg)


@task(name=STAGE, persist_result=True, result_serializer="json", retries=1,
      retry_condition_fn=retry_unless_user_error,
      cache_policy=NO_CACHE)  # run_stage gives it its key, lock and result storage
def build_vocab_task(corpus: dict[str, Any], data_cfg: dict[str, Any], data_dir: str,
                     part_counts: list[dict[str, Any]] | None = None, init_from: str | None = None) -> dict[str, Any]:
    """``part_counts``: records of ``count_part_task`` for every part, when counted in parts;
    ``init_from``: use this pretrained model's tokenizer instead."""
    from cortexcraft.tokenizer import build_vocab

    key = vocab_key(corpus, data_cfg, init_from)
    out_dir = stage_dir(data_dir, STAGE, key)
    counts = None
    if part_counts:
        import numpy as np

        from cortexcraft.parts import add_counts

        counts = add_counts(np.load(resolve(data_dir, name)) for record in part_counts for name in record["files"])
    pretrained = None
    if init_from:
        from cortexcraft.pretrained import pretrained_tokenizer

        pretrained = pretrained_tokenizer(init_from)
    manifest = build_vocab(
        corpus["manifest"], DataConfig(**data_cfg), out_dir, char_counts=counts, tokenizer=pretrained
    )
    record = write_record(data_dir, STAGE, key, files_under(out_dir), manifest=manifest)
    preview = manifest.get("preview", "")
    get_run_logger().info("vocab: %s tokens (%s) in %s", manifest["vocab_size"], manifest["tokenizer"]["type"], out_dir)
    create_markdown_artifact(
        key=f"vocab-{key}",
        description="Tokenizer of the corpus",
        markdown=(
            f"### Vocabulary\n\n| | |\n|---|---|\n| tokenizer | {manifest['tokenizer']['type']} |\n"
            f"| vocab size | {manifest['vocab_size']:,} |\n"
            f"| directory | {code_span(str(out_dir), in_table=True)} |\n\n"
            f"Preview:\n\n{fence(preview)}\n"
        ),
    )
    return record
