"""One typed config for a run: data preparation, model, training and sampling.

Presets are JSON files in ``cortexcraft/presets/``; a preset is a partial ``RunConfig``
(only the values that differ from the defaults below). ``--set key=value`` overrides any
field, by its bare name when that is unambiguous (``n_layer=8``) or by ``section.name``.
"""
from __future__ import annotations

import json
from importlib import resources
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from cortexcraft.errors import CortexCraftError


PRETRAINED_PREFIX = "hf:"


def pretrained_reference(spec: str) -> str:
    """The directory or hub id after ``hf:`` in an ``init_from`` value (ValueError otherwise)."""
    if not spec.startswith(PRETRAINED_PREFIX) or not spec[len(PRETRAINED_PREFIX):].strip():
        raise ValueError(f"init_from={spec!r} is not supported; use hf:DIR (a saved transformers model) "
                         f"or hf:OWNER/NAME[@REV] (a Hugging Face hub model)")
    return spec[len(PRETRAINED_PREFIX):].strip()


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    source: str = "tinyshakespeare"
    tokenizer: Literal["char", "bpe"] = "char"
    vocab_size: Optional[int] = Field(None, gt=0, description="BPE vocabulary size")
    vocab_file: Optional[str] = Field(None, description="use this vocab.txt instead of extracting one")
    tokenizer_file: Optional[str] = Field(
        None, description="use this Hugging Face tokenizer.json (e.g. GPT-2's) instead of training BPE"
    )
    bpe_train_chars: int = Field(
        100_000_000,
        gt=0,
        description="BPE is trained on at most this many characters from the start of the train split",
    )
    allow_unk: bool = Field(False, description="map characters outside --vocab to <unk>")
    special_tokens: list[str] = Field(default_factory=list, description="e.g. <pad> <unk> <bos> <eos>")
    val_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    max_docs: Optional[int] = Field(None, gt=0)
    max_bytes: Optional[int] = Field(None, gt=0)
    shard_tokens: int = Field(100_000_000, gt=0, description="maximum tokens per shard file")
    text_column: str = "text"
    separator: Optional[str] = Field(None, description="document separator; default blank line or <|endoftext|>")


class ModelConfig(_Section):
    block_size: int = Field(256, gt=0, description="context length in tokens")
    n_layer: int = Field(6, gt=0)
    n_head: int = Field(6, gt=0)
    n_embd: int = Field(384, gt=0)
    d_ff: Optional[int] = Field(None, gt=0, description="feed-forward width; default 4*n_embd")
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    attn_dropout: Optional[float] = Field(
        None,
        ge=0.0,
        lt=1.0,
        description="dropout on the attention weights; default "
        "dropout (on CPU it forgoes the fused attention kernel: a quarter of the speed)",
    )
    bias: bool = True
    pos_encoding: Literal["learned", "sinusoidal", "rope"] = "learned"
    rope_theta: float = Field(10000.0, gt=0, description="RoPE base (Llama's rotate-half convention)")
    max_positions: Optional[int] = Field(None, gt=0, description="positional table size; default block_size")
    activation: Literal["relu", "gelu", "gelu_tanh", "relu2"] = Field(
        "relu", description="gelu is exact, gelu_tanh its tanh approximation (GPT-2's), relu2 is ReLU squared"
    )
    norm: Literal["pre", "post"] = "pre"
    normalization: Literal["layernorm", "rmsnorm"] = "layernorm"
    norm_eps: float = Field(1e-5, gt=0, description="epsilon of every LayerNorm / RMSNorm")
    qk_norm: bool = Field(False, description="RMSNorm over head_dim on queries and keys, before RoPE")
    zero_init: bool = Field(False, description="zero-init the residual output projections and the untied head")
    logit_softcap: Optional[float] = Field(None, gt=0, description="logits -> cap * tanh(logits / cap)")
    tie_weights: bool = False

    @model_validator(mode="after")
    def _check_shapes(self) -> "ModelConfig":
        if problems := self.shape_problems():
            raise ValueError("; ".join(problems))
        return self

    @property
    def attention_dropout(self) -> float:
        return self.dropout if self.attn_dropout is None else self.attn_dropout

    def shape_problems(self) -> list[str]:
        """Why a model of this shape cannot be built (empty when it can)."""
        problems = []
        if self.n_embd % self.n_head:
            problems.append(
                f"n_embd={self.n_embd} is not divisible by n_head={self.n_head}; "
                f"choose n_head among the divisors of n_embd"
            )
        if self.pos_encoding == "rope" and (self.n_embd // self.n_head) % 2:
            problems.append(
                f"pos_encoding=rope needs an even head size, but n_embd/n_head = {self.n_embd // self.n_head}; "
                f"choose n_head so that n_embd/n_head is even"
            )
        if self.block_size > self.positions:
            problems.append(
                f"block_size={self.block_size} exceeds the positional table (max_positions="
                f"{self.positions}); lower block_size or raise max_positions"
            )
        return problems

    @property
    def ff_width(self) -> int:
        return self.d_ff or 4 * self.n_embd

    @property
    def positions(self) -> int:
        return self.max_positions or self.block_size


class TrainConfig(_Section):
    batch_size: int = Field(64, gt=0)
    grad_accum: int = Field(1, gt=0, description="micro-batches per optimizer step")
    max_iters: int = Field(5000, gt=0)
    max_epochs: Optional[float] = Field(
        None, gt=0, description="train for this many passes over the train tokens instead of max_iters"
    )
    max_minutes: Optional[float] = Field(None, gt=0, description="wall-clock budget, checked inside the loop")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate (all parameters, or those Muon does not take)")
    min_lr: Optional[float] = Field(None, ge=0, description="floor of the cosine / wsd decay; default lr/10")
    lr_schedule: Literal["cosine", "constant", "wsd"] = Field(
        "constant", description="wsd: warmup, stable, then linear decay over the last decay_fraction of the run"
    )
    decay_fraction: float = Field(
        0.2,
        gt=0,
        le=1,
        description="wsd: share of the run (steps, or the max_minutes budget, whichever runs out first) spent decaying",
    )
    warmup_iters: int = Field(0, ge=0)
    optimizer: Literal["adamw", "muon"] = Field(
        "adamw", description="muon: Muon for the blocks' 2-D matrices, AdamW for embeddings, head, gains and biases"
    )
    muon_lr: float = Field(0.02, gt=0, description="Muon's peak learning rate (follows the same schedule as lr)")
    muon_momentum: float = Field(0.95, ge=0, lt=1)
    muon_momentum_warmup_iters: int = Field(
        0, ge=0, description="Muon momentum rises linearly from 0.85 over these steps"
    )
    muon_weight_decay: float = Field(
        0.0, ge=0, description="Muon's decoupled weight decay (torch's default would be 0.1)"
    )
    muon_normalize: bool = Field(
        False, description="NorMuon: divide each neuron's orthogonalized update by its running RMS, keeping the norm"
    )
    muon_beta2: float = Field(0.95, gt=0, lt=1, description="decay of NorMuon's per-neuron running RMS")
    muon_adjust_lr: Literal["original", "match_rms_adamw"] = Field(
        "original",
        description="Muon's per-shape lr scale: original = sqrt(max(1, rows/cols)), or match AdamW's update RMS",
    )
    weight_decay: float = Field(0.0, ge=0)
    beta1: float = Field(0.9, gt=0, lt=1)
    beta2: float = Field(0.999, gt=0, lt=1)
    grad_clip: Optional[float] = Field(None, gt=0)
    z_loss: float = Field(
        0.0,
        ge=0,
        description="weight of the squared log of the softmax normalizer (z-loss) added to the training objective: "
        "it keeps the logits near log-probabilities, which regularizes a small model on a small corpus; "
        "logged and evaluated losses stay plain cross-entropy",
    )
    eval_interval: int = Field(500, gt=0)
    eval_iters: int = Field(200, gt=0)
    checkpoint_interval: int = Field(1000, gt=0)
    keep_last: int = Field(2, gt=0, description="periodic checkpoints kept besides the best")
    seed: int = 1337
    init_from: Optional[str] = Field(
        None,
        description="start from pretrained weights and use their tokenizer: hf:DIR (a transformers "
        "GPT-2-style model directory) or hf:OWNER/NAME[@REV] (downloaded from the Hugging Face hub)",
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto",
        description="auto: on CPU bf16 or fp32, whichever a cached matmul timing at the model's shapes finds faster",
    )
    compile: Optional[bool] = Field(
        None,
        description="torch.compile the model; default: on CUDA, and on CPU for runs of max_minutes >= 3 "
        "(and max_iters >= 1000), where the 20-40 s of compiling pays back",
    )
    deterministic: bool = Field(
        False,
        description="torch's deterministic algorithms and a deterministic cuBLAS workspace: "
        "bitwise-repeatable GPU runs and resumes, slower (CPU runs are repeatable without it)",
    )
    threads: Optional[int] = Field(
        None,
        gt=0,
        description="CPU threads; default: the free cores, re-checked while training (OMP_NUM_THREADS also fixes it)",
    )

    @field_validator("init_from")
    @classmethod
    def _check_init_from(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            pretrained_reference(value)
        return value


class SampleConfig(_Section):
    prompts: list[str] = Field(default_factory=lambda: ["\n", "ROMEO:", "First Citizen:"])
    max_new_tokens: int = Field(500, gt=0)
    temperature: float = Field(0.8, ge=0.0, description="0 means greedy")
    top_k: Optional[int] = Field(None, gt=0)
    top_p: Optional[float] = Field(None, gt=0.0, le=1.0)
    seed: int = 1337
    kv_cache: bool = True


class RunConfig(_Section):
    preset: str = "custom"
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    sample: SampleConfig = Field(default_factory=SampleConfig)

    @property
    def tokenizer_kind(self) -> str:
        """The tokenizer the data stages build: a pretrained model's (byte-level BPE) or data.tokenizer."""
        return "bpe" if self.train.init_from else self.data.tokenizer


SECTIONS = ("data", "model", "train", "sample")


def preset_names() -> list[str]:
    files = resources.files("cortexcraft.presets").iterdir()
    return sorted(f.name[: -len(".json")] for f in files if f.name.endswith(".json"))


def load_preset(name: str) -> dict[str, Any]:
    if name not in preset_names():
        raise CortexCraftError(
            f"unknown preset {name!r}; choose one of: {', '.join(preset_names())} (see `cortexcraft presets`)"
        )
    text = resources.files("cortexcraft.presets").joinpath(f"{name}.json").read_text()
    data = json.loads(text)
    data.pop("description", None)
    return data


def preset_description(name: str) -> str:
    text = resources.files("cortexcraft.presets").joinpath(f"{name}.json").read_text()
    return json.loads(text).get("description", "")


def _field_owner(key: str) -> str:
    owners = [s for s in SECTIONS if key in RunConfig.model_fields[s].annotation.model_fields]
    if not owners:
        raise CortexCraftError(f"unknown setting {key!r} in --set; see `cortexcraft presets --fields` for valid names")
    if len(owners) > 1:
        raise CortexCraftError(
            f"setting {key!r} is ambiguous; write it as one of {', '.join(o + '.' + key for o in owners)}"
        )
    return owners[0]


def _parse_value(raw: str) -> Any:
    # JSON first so numbers, booleans, null and lists get their types; anything else is a string.
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def parse_overrides(items: list[str] | None) -> dict[str, dict[str, Any]]:
    """Turn ``["n_layer=8", "train.lr=1e-3"]`` into ``{"model": {"n_layer": 8}, "train": {"lr": 0.001}}``."""
    nested: dict[str, dict[str, Any]] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise CortexCraftError(f"--set {item!r} is not key=value; write e.g. --set n_layer=8")
        if "." in key:
            section, _, name = key.partition(".")
            if section not in SECTIONS:
                raise CortexCraftError(
                    f"unknown section {section!r} in --set {item!r}; use one of {', '.join(SECTIONS)}"
                )
            if name not in RunConfig.model_fields[section].annotation.model_fields:
                raise CortexCraftError(
                    f"unknown setting {key!r} in --set; see `cortexcraft presets --fields` for valid names"
                )
        else:
            section, name = _field_owner(key), key
        nested.setdefault(section, {})[name] = _parse_value(raw.strip())
    return nested


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def build_config(preset: str = "cpu", overrides: list[str] | dict[str, Any] | None = None) -> RunConfig:
    """The run config of ``preset`` with ``overrides`` (``--set`` strings or a nested dict) applied."""
    data = load_preset(preset)
    extra = overrides if isinstance(overrides, dict) else parse_overrides(overrides)
    data = _merge(data, extra)
    data["preset"] = preset
    return validate_config(data)


def describe_validation_error(exc: ValidationError, unnamed: str | None = None) -> str:
    """pydantic's report on one line: ``field.path: problem; ...``. Problems of the whole model
    (no field) are labelled ``unnamed``, or left bare when it is None."""
    problems = []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or unnamed
        message = err["msg"].removeprefix("Value error, ")
        problems.append(f"{where}: {message}" if where else message)
    return "; ".join(problems)


def validate_config(data: dict[str, Any]) -> RunConfig:
    """Validate a config dict, turning pydantic's report into one line per problem."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise CortexCraftError("invalid config: " + describe_validation_error(exc, "config")) from None
