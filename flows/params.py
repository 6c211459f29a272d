"""Typed flow parameters: the Prefect UI renders them as a form and rejects bad values, with the
config problem named, before any stage runs."""
from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, model_validator

from cortexcraft.config import RunConfig, build_config, describe_validation_error, parse_overrides
from cortexcraft.errors import CortexCraftError
from cortexcraft.parts import PART_BYTES, workers_that_pay
from cortexcraft.registry import check_name
from tasks.stage import STAGES

Stage = Literal["download", "vocab", "shards", "train", "report", "all"]


# Prefect's process pool takes ~9 s to start and every part is a task run: on 200 MB of characters
# 2 workers took 17-18 s where the ordinary stages took 7-9 s, so parts pay only on gigabytes.
PIPELINE_CHAR_BYTES_PER_WORKER = 1_500_000_000


class PipelineParams(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: str = Field("cpu", description="named preset, see `cortexcraft presets`")
    overrides: list[str] = Field(
        default_factory=list, description="config overrides as key=value, like --set: n_layer=8, train.lr=1e-3"
    )
    source: Optional[str] = Field(
        None, description="corpus spec (tinyshakespeare, hf:REPO, a URL, a local file); default: the preset's"
    )
    data_dir: str = Field("data", description="where stage outputs and Prefect's result cache live")
    refresh: list[Stage] = Field(
        default_factory=list, description="stages to re-run even if cached (train then starts from scratch), or all"
    )
    model: Optional[str] = Field(
        None, description="register the trained model under this name in DATA_DIR/models; default: the preset's name"
    )
    retrain: Literal["fresh", "continue", "finetune", "auto"] = Field(
        "fresh",
        description="fresh: train from scratch; continue/finetune: from the champion's weights for retrain_iters "
        "more iterations (finetune falls back to fresh when the vocabulary changed); auto: continue "
        "on unchanged data, finetune on changed data (scheduled retraining)",
    )
    retrain_iters: int = Field(500, gt=0, description="iterations continue/finetune train beyond the champion's step")
    promote_margin: float = Field(
        0.0,
        ge=0.0,
        description="a challenger is promoted when its val loss beats the champion's by more than this (nats)",
    )

    nproc: int = Field(1, ge=1, description="training processes on this machine; > 1 trains under torchrun")
    nnodes: int = Field(
        1,
        ge=1,
        description="machines training together; this one is node 0, the train stage logs the command for the others",
    )
    rdzv_endpoint: Optional[str] = Field(
        None, description="HOST:PORT of this machine for the other nodes (c10d rendezvous), with nnodes > 1"
    )
    workers: int = Field(
        1, ge=1, description="parallel tasks preparing the corpus in parts; > 1 (or dask) maps tasks over parts"
    )
    task_runner: Literal["process", "dask"] = Field(
        "process", description="runs the part tasks: local processes, or Dask (a LocalCluster, or dask_address)"
    )
    dask_address: Optional[str] = Field(
        None, description="an existing Dask scheduler, tcp://HOST:PORT (implies task_runner dask)"
    )
    part_mb: Optional[float] = Field(
        None, gt=0, description="size of a corpus part in MB (default 64); given, local workers always encode in parts"
    )
    crash_retries: int = Field(
        2,
        ge=0,
        description="deployment runs whose process died (SIGKILL, OOM) are re-run automatically this many times, "
        "resuming from the last checkpoint",
    )

    _config: RunConfig = PrivateAttr()

    @model_validator(mode="after")
    def _build_config(self) -> "PipelineParams":
        try:
            extra = parse_overrides(self.overrides)
            if self.source:
                extra.setdefault("data", {})["source"] = self.source
            self._config = build_config(self.preset, extra)
            check_name(self.model_name())
        except CortexCraftError as exc:
            raise ValueError(str(exc)) from None
        if self._config.train.init_from and (self.workers > 1 or self.on_dask()):
            raise ValueError(
                f"init_from={self._config.train.init_from} with workers={self.workers} or a Dask task runner: "
                f"a pretrained tokenizer is applied in one process only; use workers=1 and the default task runner"
            )
        return self

    def run_config(self) -> RunConfig:
        return self._config

    def model_name(self) -> str:
        return self.model or self.preset

    def refreshed(self) -> set[str]:
        return set(STAGES) if "all" in self.refresh else set(self.refresh)

    def on_dask(self) -> bool:
        return self.task_runner == "dask" or self.dask_address is not None

    def encoding_workers(self, corpus_bytes: int) -> int:
        """Local processes encoding a corpus of ``corpus_bytes`` in part tasks: all ``workers`` with
        Dask or a given ``part_mb``, else only those that finish sooner than the ordinary stages."""
        if self.on_dask() or self.part_mb is not None:
            return self.workers
        return workers_that_pay(corpus_bytes, self._config.data.tokenizer, self.workers, PIPELINE_CHAR_BYTES_PER_WORKER)

    def in_parts(self, corpus_bytes: int) -> bool:
        return self.on_dask() or self.encoding_workers(corpus_bytes) > 1

    def part_bytes(self) -> int:
        return int(self.part_mb * 1e6) if self.part_mb is not None else PART_BYTES

    def data_path(self) -> str:
        # Absolute, so every task of the run resolves the same directory whatever its cwd.
        return str(Path(self.data_dir).expanduser().resolve())


def params_from_cli(**values) -> PipelineParams:
    """PipelineParams, or the validation problem as a one-line CortexCraftError."""
    try:
        return PipelineParams(**values)
    except ValidationError as exc:
        raise CortexCraftError(describe_validation_error(exc)) from None
