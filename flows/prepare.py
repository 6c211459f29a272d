"""prepare flow: download -> vocab -> shards."""
from __future__ import annotations

from typing import Any

from prefect import flow

from cortexcraft.config import RunConfig
from flows.params import PipelineParams
from tasks.download import download_key, download_task, revalidate_task
from tasks.shards import shards_key, write_shards_task
from tasks.stage import run_stage
from tasks.vocab import build_vocab_task, vocab_key


def run_prepare(config: RunConfig, params: PipelineParams) -> dict[str, dict[str, Any]]:
    """The data stages as tasks of the current flow; returns their records by stage."""
    data_cfg = config.data.model_dump(mode="json")
    data_dir, refresh = params.data_path(), params.refreshed()
    # Asked on every run (a HEAD request, a hub API call or a stat per file): the download stage
    # is keyed by the answer, so it re-runs exactly when the source changed.
    revision = revalidate_task(data_cfg, data_dir)
    corpus = run_stage(download_task, download_key(data_cfg, revision), refresh,
                       data_cfg=data_cfg, revision=revision, data_dir=data_dir)
    vocab = run_stage(build_vocab_task, vocab_key(corpus, data_cfg), refresh,
                      corpus=corpus, data_cfg=data_cfg, data_dir=data_dir)
    shards = run_stage(write_shards_task, shards_key(corpus, vocab, data_cfg), refresh,
                       corpus=corpus, vocab=vocab, data_cfg=data_cfg, data_dir=data_dir)
    return {"download": corpus, "vocab": vocab, "shards": shards}


@flow(name="prepare")
def prepare(params: PipelineParams = PipelineParams()) -> dict[str, dict[str, Any]]:
    """Download the corpus, build the tokenizer and write train/val shards (each cached by content)."""
    return run_prepare(params.run_config(), params)
