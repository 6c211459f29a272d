"""prepare flow: download -> vocab -> shards."""
from __future__ import annotations

from typing import Any

from prefect import flow

from cortexcraft.config import RunConfig
from flows.params import PipelineParams
from tasks.download import download_key, download_task
from tasks.shards import shards_key, write_shards_task
from tasks.stage import run_stage
from tasks.vocab import build_vocab_task, vocab_key


def run_prepare(config: RunConfig, params: PipelineParams) -> dict[str, dict[str, Any]]:
    """The data stages as tasks of the current flow; returns their records by stage."""
    data_cfg = config.data.model_dump(mode="json")
    data_dir, refresh = params.data_path(), params.refreshed()
    corpus = run_stage(download_task, download_key(data_cfg), refresh,
                       data_cfg=data_cfg, data_dir=data_dir)
    init_from = config.train.init_from
    vocab = run_stage(build_vocab_task, vocab_key(corpus, data_cfg, init_from), refresh,
                      corpus=corpus, data_cfg=data_cfg, data_dir=data_dir, init_from=init_from)
    shards = run_stage(write_shards_task, shards_key(corpus, vocab, data_cfg), refresh,
                       corpus=corpus, vocab=vocab, data_cfg=data_cfg, data_dir=data_dir)
    return {"download": corpus, "vocab": vocab, "shards": shards}


@flow(name="prepare")
def prepare(params: PipelineParams = PipelineParams()) -> dict[str, dict[str, Any]]:
    """Download the corpus, build the tokenizer and write train/val shards (each cached by content)."""
    return run_prepare(params.run_config(), params)
