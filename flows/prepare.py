"""prepare flow: download -> vocab -> shards, in one process or in parts across workers."""
from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger
from prefect.context import FlowRunContext
from prefect.task_runners import ProcessPoolTaskRunner, TaskRunner

from cortexcraft.config import RunConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.parts import plan_parts
from cortexcraft.threads import threads_per_worker
from flows.params import PipelineParams
from tasks.download import download_key, download_task, revalidate_task
from tasks.parts import count_part_task, encode_part_task, map_parts
from tasks.shards import shards_key, write_shards_task
from tasks.stage import run_stage, valid_record
from tasks.vocab import build_vocab_task, vocab_key


def run_prepare(config: RunConfig, params: PipelineParams) -> dict[str, dict[str, Any]]:
    """The data stages as tasks of the current flow; returns their records by stage."""
    data_cfg = config.data.model_dump(mode="json")
    data_dir, refresh = params.data_path(), params.refreshed()
    # Asked on every run (a HEAD request, a hub API call or a stat per file): the download stage
    # is keyed by the answer, so it re-runs exactly when the source changed.
    revision = revalidate_task(data_cfg, data_dir)
    corpus = run_stage(download_task, download_key(data_cfg, revision), refresh,
                       data_cfg=data_cfg, revision=revision, data_dir=data_dir, workers=params.workers)
    corpus_bytes = corpus["manifest"]["bytes"]
    if params.in_parts(corpus_bytes) and not _prepared(corpus, data_cfg, data_dir, refresh):
        runner = parts_task_runner(params, params.encoding_workers(corpus_bytes))
        return {"download": corpus, **prepare_in_parts.with_options(task_runner=runner)(corpus, params)}
    init_from = config.train.init_from
    vocab = run_stage(
        build_vocab_task,
        vocab_key(corpus, data_cfg, init_from),
        refresh,
        corpus=corpus,
        data_cfg=data_cfg,
        data_dir=data_dir,
        init_from=init_from,
    )
    shards = run_stage(
        write_shards_task,
        shards_key(corpus, vocab, data_cfg),
        refresh,
        corpus=corpus,
        vocab=vocab,
        data_cfg=data_cfg,
        data_dir=data_dir,
    )
    return {"download": corpus, "vocab": vocab, "shards": shards}


def parts_task_runner(params: PipelineParams, workers: int) -> TaskRunner:
    """``workers`` local processes (threads would share one GIL), or Dask: a LocalCluster of
    ``workers`` single-threaded processes, or the scheduler at ``dask_address``."""
    if not params.on_dask():
        return ProcessPoolTaskRunner(max_workers=workers)
    try:
        from prefect_dask import DaskTaskRunner
    except ImportError:
        raise CortexCraftError(
            "--task-runner dask needs prefect-dask; install it with `pip install -c constraints.txt -e '.[dask]'`"
        ) from None
    if params.dask_address:
        return DaskTaskRunner(address=params.dask_address)
    return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True})


def _needed(data_dir: str, refresh: set[str], stage: str, key: str) -> bool:
    return stage in refresh or valid_record(data_dir, stage, key) is None


def _prepared(corpus: dict[str, Any], data_cfg: dict[str, Any], data_dir: str, refresh: set[str]) -> bool:
    """Whether vocab and shards are done already (then no task runner needs starting)."""
    vocab = None if "vocab" in refresh else valid_record(data_dir, "vocab", vocab_key(corpus, data_cfg))
    return vocab is not None and not _needed(data_dir, refresh, "shards", shards_key(corpus, vocab, data_cfg))


@flow(name="prepare-parts")
def prepare_in_parts(corpus: dict[str, Any], params: PipelineParams) -> dict[str, dict[str, Any]]:
    """vocab and shards from the corpus cut into parts, counted and encoded by tasks mapped over
    them in this flow's task runner. Stages already done skip their part tasks."""
    config = params.run_config()
    data_cfg = config.data.model_dump(mode="json")
    data_dir, refresh = params.data_path(), params.refreshed()
    parts: list[dict[str, Any]] = []

    def planned() -> list[dict[str, Any]]:  # only when a stage has to run: planning reads the corpus
        if not parts:
            parts.extend(plan_parts(corpus["manifest"], config.data, params.part_bytes()))
            get_run_logger().info(
                "%d parts of about %s MB; task runner %s",
                len(parts),
                f"{params.part_bytes() / 1e6:g}",
                type(FlowRunContext.get().task_runner).__name__,
            )
        return parts

    key = vocab_key(corpus, data_cfg)
    counts = None
    if data_cfg["tokenizer"] == "char" and _needed(data_dir, refresh, "vocab", key):
        counts = map_parts(count_part_task, planned(), data_dir, corpus=corpus)
    vocab = run_stage(
        build_vocab_task, key, refresh, corpus=corpus, data_cfg=data_cfg, data_dir=data_dir, part_counts=counts
    )
    key = shards_key(corpus, vocab, data_cfg)
    encoded = None
    if _needed(data_dir, refresh, "shards", key):
        encoded = map_parts(encode_part_task, planned(), data_dir, corpus=corpus, vocab=vocab,
                            encode_threads=threads_per_worker(params.encoding_workers(corpus["manifest"]["bytes"])))
    shards = run_stage(
        write_shards_task, key, refresh, corpus=corpus, vocab=vocab, data_cfg=data_cfg, data_dir=data_dir, parts=encoded
    )
    return {"vocab": vocab, "shards": shards}


@flow(name="prepare")
def prepare(params: PipelineParams = PipelineParams()) -> dict[str, dict[str, Any]]:
    """Download the corpus, build the tokenizer and write train/val shards (each cached by content)."""
    return run_prepare(params.run_config(), params)
