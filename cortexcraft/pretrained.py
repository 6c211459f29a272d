"""Hugging Face import: a GPT-2-style transformers checkpoint as the starting point of a run
(``train.init_from``): its architecture (``pretrained_model_config``), weights
(``pretrained_state``) and byte-level BPE tokenizer (``pretrained_tokenizer``), plus the GPT-2 key
table that maps its tensors to ours (also used by ``cortexcraft.export``). ``hf:DIR`` is a local
directory; ``hf:OWNER/NAME[@REV]`` is fetched from the hub.

transformers is an optional extra (``pip install -e ".[hf]"``), imported only inside these
functions, so the base install works without it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch

from cortexcraft.config import ModelConfig, pretrained_reference
from cortexcraft.errors import CortexCraftError
from cortexcraft.tokenizer import BPETokenizer

INSTALL_HINT = 'install the Hugging Face extra: pip install -e ".[hf]"'
# Our activation names -> transformers' ACT2FN names computing the same function. gelu_tanh is
# GPT-2's own "gelu_new" (the same tanh formula as torch's approximate GELU).
HF_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_tanh": "gelu_new", "relu2": "relu2"}
IMPORTED_ACTIVATIONS = {"relu": "relu", "gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                        "relu2": "relu2"}
# Which of a tokenizer's special tokens plays which role in a transformers config.
SPECIAL_ROLES = {"bos": ("<|endoftext|>", "<bos>", "<s>"), "eos": ("<|endoftext|>", "<eos>", "</s>"),
                 "pad": ("<pad>",), "unk": ("<unk>",)}


def require_transformers():
    try:
        import transformers
    except ImportError:
        raise CortexCraftError(
            f"Hugging Face interop needs transformers, which is not installed; {INSTALL_HINT}"
        ) from None
    return transformers


@dataclass
class Plan:
    """How our weights become a transformers model: its class, its config, and for every one of
    its tensors the tensor of ours it comes from (``how``: "copy", "t" for a Conv1D transpose, or
    "q"/"k"/"v" for one third of the fused QKV projection)."""

    architecture: str
    model_type: str
    config: dict[str, Any]
    keys: list[tuple[str, str, str]]


def gpt2_plan(m: ModelConfig, vocab_size: int, specials: dict[str, Optional[int]]) -> Plan:
    config = {
        "vocab_size": vocab_size,
        "n_positions": m.positions,
        "n_embd": m.n_embd,
        "n_layer": m.n_layer,
        "n_head": m.n_head,
        "n_inner": m.d_ff,
        "activation_function": HF_ACTIVATIONS[m.activation],
        "layer_norm_epsilon": m.norm_eps,
        "resid_pdrop": m.dropout,
        "embd_pdrop": m.dropout,
        "attn_pdrop": m.attention_dropout,
        "tie_word_embeddings": m.tie_weights,
        "bos_token_id": specials["bos"],
        "eos_token_id": specials["eos"],
        "pad_token_id": specials["pad"],
    }
    keys = [("transformer.wte.weight", "tok_emb.weight", "copy"), ("transformer.wpe.weight", "pos_emb.weight", "copy")]
    for i in range(m.n_layer):
        hf, ours = f"transformer.h.{i}.", f"blocks.{i}."
        for hf_name, our_name, conv1d in (
            ("ln_1", "ln1", False),
            ("attn.c_attn", "attn.qkv", True),
            ("attn.c_proj", "attn.proj", True),
            ("ln_2", "ln2", False),
            ("mlp.c_fc", "ff.up", True),
            ("mlp.c_proj", "ff.proj", True),
        ):
            keys += [
                (f"{hf}{hf_name}.weight", f"{ours}{our_name}.weight", "t" if conv1d else "copy"),
                (f"{hf}{hf_name}.bias", f"{ours}{our_name}.bias", "copy"),
            ]
    keys += [
        ("transformer.ln_f.weight", "ln_f.weight", "copy"),
        ("transformer.ln_f.bias", "ln_f.bias", "copy"),
        ("lm_head.weight", "tok_emb.weight" if m.tie_weights else "lm_head.weight", "copy"),
    ]
    return Plan("GPT2LMHeadModel", "gpt2", config, keys)


def check_init_from(spec: str) -> str:
    """The reference after ``hf:`` (a directory or a hub id), or a CortexCraftError naming the format."""
    try:
        return pretrained_reference(spec)
    except ValueError as exc:
        raise CortexCraftError(str(exc)) from None


def pretrained_dir(spec: str) -> Path:
    """The local directory of ``hf:DIR``, or of ``hf:OWNER/NAME[@REV]`` after fetching it from the
    hub (weights as safetensors, configs, tokenizer files; cached by huggingface_hub)."""
    from cortexcraft import hub

    ref = check_init_from(spec)
    local = Path(ref).expanduser()
    if local.is_dir():
        return local
    if (reference := hub.hub_model_reference(ref)) is None:
        raise CortexCraftError(
            f"init_from={spec}: {local} is not a directory; pass hf:DIR of a model saved with "
            f"save_pretrained, or hf:OWNER/NAME of a hub model"
        )
    repo, revision = reference
    try:
        sha = hub.model_commit(repo, revision)
    except CortexCraftError as exc:
        raise CortexCraftError(f"init_from={spec}: {exc}") from None
    try:
        return hub.download_model(repo, revision, sha)
    # The hub client raises connection, HTTP, offline-mode and repo-id errors of several families.
    except Exception as exc:
        raise CortexCraftError(
            f"init_from={spec}: cannot fetch {repo} from the Hugging Face hub ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}); save it with save_pretrained where the "
            f"hub is reachable and pass hf:/path/to/dir"
        ) from None


def _pretrained_gpt2_config(spec: str, directory: Path):
    transformers = require_transformers()
    try:
        hf_config = transformers.AutoConfig.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise CortexCraftError(
            f"init_from={spec}: {directory} holds no transformers model config ({exc}); "
            f"pass a directory written by save_pretrained"
        ) from None
    if hf_config.model_type != "gpt2":
        raise CortexCraftError(
            f"init_from={spec} is a {hf_config.model_type} model; only GPT-2-style models "
            f"(model_type gpt2) can be imported"
        )
    unsupported = [
        f"{name}={getattr(hf_config, name)}"
        for name, wanted in (
            ("scale_attn_weights", True),
            ("scale_attn_by_inverse_layer_idx", False),
            ("add_cross_attention", False),
        )
        if getattr(hf_config, name) != wanted
    ]
    if hf_config.activation_function not in IMPORTED_ACTIVATIONS:
        unsupported.append(f"activation_function={hf_config.activation_function}")
    if unsupported:
        raise CortexCraftError(
            f"init_from={spec} uses {', '.join(unsupported)}, which our GPT does not compute; "
            f"import a standard GPT-2 checkpoint"
        )
    return hf_config


def pretrained_model_config(spec: str, model_cfg: ModelConfig) -> ModelConfig:
    """The architecture of the pretrained model, with ``model_cfg``'s block_size and dropout (the
    two settings a fine-tune chooses, as nanoGPT's init_from does)."""
    hf_config = _pretrained_gpt2_config(spec, pretrained_dir(spec))
    if model_cfg.block_size > hf_config.n_positions:
        raise CortexCraftError(
            f"block_size={model_cfg.block_size} exceeds the {hf_config.n_positions} positions of "
            f"init_from={spec}; set block_size to at most {hf_config.n_positions}"
        )
    return ModelConfig(
        block_size=model_cfg.block_size,
        n_layer=hf_config.n_layer,
        n_head=hf_config.n_head,
        n_embd=hf_config.n_embd,
        d_ff=hf_config.n_inner,
        dropout=model_cfg.dropout,
        attn_dropout=model_cfg.attn_dropout,
        bias=True,
        pos_encoding="learned",
        max_positions=hf_config.n_positions,
        activation=IMPORTED_ACTIVATIONS[hf_config.activation_function],
        norm="pre",
        norm_eps=hf_config.layer_norm_epsilon,
        tie_weights=bool(hf_config.tie_word_embeddings),
    )


def pretrained_vocab_size(spec: str) -> int:
    return _pretrained_gpt2_config(spec, pretrained_dir(spec)).vocab_size


def pretrained_state(spec: str, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The pretrained weights as our GPT's state dict (``model_cfg`` from ``pretrained_model_config``)."""
    transformers = require_transformers()
    directory = pretrained_dir(spec)
    hf_config = _pretrained_gpt2_config(spec, directory)
    try:
        hf_model = transformers.GPT2LMHeadModel.from_pretrained(
            str(directory), use_safetensors=True, dtype=torch.float32
        )
    except (OSError, ValueError) as exc:
        raise CortexCraftError(
            f"init_from={spec}: cannot load safetensors weights from {directory} ({exc}); "
            f"save the model with save_pretrained (safetensors; pickled .bin files are not read)"
        ) from None
    hf_state = hf_model.state_dict()
    plan = gpt2_plan(model_cfg, hf_config.vocab_size, dict.fromkeys(SPECIAL_ROLES))
    ours = {}
    for hf_key, our_key, how in plan.keys:
        if hf_key == "lm_head.weight" and model_cfg.tie_weights:
            continue  # the tied head is the embedding itself
        ours[our_key] = hf_state[hf_key].t().contiguous() if how == "t" else hf_state[hf_key].clone()
    return ours


def pretrained_tokenizer(spec: str) -> BPETokenizer:
    """The pretrained model's tokenizer (byte-level BPE, e.g. GPT-2's 50,257 tokens) as ours."""
    transformers = require_transformers()
    from tokenizers import Tokenizer as Backend

    directory = pretrained_dir(spec)
    try:
        fast = transformers.AutoTokenizer.from_pretrained(str(directory))
    except (OSError, ValueError) as exc:
        raise CortexCraftError(
            f"init_from={spec}: cannot load a tokenizer from {directory} ({exc}); "
            f"save the tokenizer beside the model with save_pretrained"
        ) from None
    backend = getattr(fast, "backend_tokenizer", None)
    kind = json.loads(backend.to_str())["model"]["type"] if backend is not None else type(fast).__name__
    if kind != "BPE":
        raise CortexCraftError(
            f"init_from={spec} has a {kind} tokenizer; only byte-level BPE tokenizers (as GPT-2's) can be imported"
        )
    specials = [t.content for _, t in sorted(backend.get_added_tokens_decoder().items()) if t.special]
    tok = BPETokenizer(Backend.from_str(backend.to_str()), specials)
    # transformers builds an empty tokenizer when the files are missing: the sizes tell.
    model_vocab = _pretrained_gpt2_config(spec, directory).vocab_size
    if tok.vocab_size != model_vocab:
        raise CortexCraftError(
            f"init_from={spec}: its tokenizer has {tok.vocab_size:,} tokens but the model {model_vocab:,}; "
            f"save the model's own tokenizer beside it with save_pretrained"
        )
    return tok
