"""Hugging Face export: a run written as a transformers model directory, in the transformers
architecture that computes what our model computes:

- ``GPT2LMHeadModel`` for GPT-2-shaped models (pre-norm, learned positions, LayerNorm, no
  QK-norm): keys map one to one, the four Conv1D weights stored transposed, zero biases for a
  bias-free model (a zero bias adds nothing), exact GELU as ``activation_function="gelu"``;
- ``ApertusForCausalLM`` for RoPE + RMSNorm + QK-norm, ``ArceeForCausalLM`` for RoPE + RMSNorm
  without QK-norm (both Llama-family with a plain, ungated feed-forward): the fused QKV projection
  is split into q/k/v;
- anything else (post-norm, sinusoidal positions, a logit soft-cap, ...) fails naming the field.

Only the CLI's ``export`` imports this module.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

import torch

from cortexcraft.checkpoint import load_model, resolve_checkpoint
from cortexcraft.config import ModelConfig, RunConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, atomic_write_text, build_dir, fsync_tree, read_json
from cortexcraft.generate import generate
from cortexcraft.markdown import fence
from cortexcraft.metrics import read_metrics
from cortexcraft.pretrained import HF_ACTIVATIONS, SPECIAL_ROLES, Plan, gpt2_plan, require_transformers
from cortexcraft.tokenizer import CharTokenizer, Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# Written into every export: what it was exported from, and proof that --out may be replaced.
EXPORT_RECORD = "cortexcraft-export.json"
CARD_SAMPLE_TOKENS = 200


def _unexportable(field: str, value: Any, why: str, fix: str) -> CortexCraftError:
    shown = value if isinstance(value, str) else json.dumps(value)  # as --set spells it
    return CortexCraftError(f"model.{field}={shown} cannot be exported to transformers: {why}; {fix}")


def check_exportable(m: ModelConfig) -> None:
    """Fail, naming the field, for a model no transformers architecture computes exactly."""
    if m.norm == "post":
        raise _unexportable(
            "norm",
            "post",
            "no transformers decoder normalises after the residual add as this model does",
            "only pre-norm models (norm=pre) export",
        )
    if m.pos_encoding == "sinusoidal":
        raise _unexportable(
            "pos_encoding",
            "sinusoidal",
            "no transformers decoder adds fixed sinusoidal positions",
            "train with pos_encoding=learned or rope to export",
        )
    if m.logit_softcap is not None:
        raise _unexportable(
            "logit_softcap",
            m.logit_softcap,
            "GPT-2, Apertus and Arcee have no logit soft-cap (Gemma 2's blocks differ in other ways)",
            "train without logit_softcap to export",
        )
    if m.pos_encoding == "learned":
        if m.normalization != "layernorm":
            raise _unexportable(
                "normalization",
                m.normalization,
                "GPT-2 (learned positions) uses LayerNorm",
                "use normalization=layernorm, or pos_encoding=rope for the RMSNorm architectures",
            )
        if m.qk_norm:
            raise _unexportable(
                "qk_norm",
                True,
                "GPT-2 (learned positions) has no QK-norm",
                "use qk_norm=false, or pos_encoding=rope with normalization=rmsnorm (Apertus)",
            )
        return
    if m.normalization != "rmsnorm":
        raise _unexportable(
            "normalization",
            m.normalization,
            "the RoPE architectures that match (Apertus, Arcee) use RMSNorm",
            "use normalization=rmsnorm with pos_encoding=rope",
        )
    if m.qk_norm and m.bias:
        raise _unexportable(
            "bias",
            True,
            "Apertus (RoPE + RMSNorm + QK-norm) has no feed-forward biases",
            "train with bias=false to export",
        )


def special_token_ids(tok: Tokenizer) -> dict[str, Optional[int]]:
    """bos/eos/pad/unk ids where the tokenizer has such a special token, else None (a char
    vocabulary usually has none: GPT-2's default 50256 would point outside it)."""
    ids = {}
    for role, names in SPECIAL_ROLES.items():
        present = [n for n in names if n in tok.special_tokens]
        ids[role] = tok.encode(present[0]).tolist()[0] if present else None
    return ids


def _rope_plan(m: ModelConfig, vocab_size: int, specials: dict[str, Optional[int]]) -> Plan:
    config = {
        "vocab_size": vocab_size,
        "hidden_size": m.n_embd,
        "intermediate_size": m.ff_width,
        "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_head,
        "hidden_act": HF_ACTIVATIONS[m.activation],
        "max_position_embeddings": m.positions,
        "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_weights,
        "attention_dropout": m.attention_dropout,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.rope_theta},
        "attention_bias": m.bias,
        "bos_token_id": specials["bos"],
        "eos_token_id": specials["eos"],
        "pad_token_id": specials["pad"],
    }
    if m.qk_norm:
        architecture, model_type, norms = (
            "ApertusForCausalLM",
            "apertus",
            ("attention_layernorm", "feedforward_layernorm"),
        )
    else:
        architecture, model_type, norms = "ArceeForCausalLM", "arcee", ("input_layernorm", "post_attention_layernorm")
        config["mlp_bias"] = m.bias
    keys = [("model.embed_tokens.weight", "tok_emb.weight", "copy")]
    for i in range(m.n_layer):
        hf, ours = f"model.layers.{i}.", f"blocks.{i}."
        params = ("weight", "bias") if m.bias else ("weight",)
        keys.append((f"{hf}{norms[0]}.weight", f"{ours}ln1.weight", "copy"))
        keys += [(f"{hf}self_attn.{part}_proj.{p}", f"{ours}attn.qkv.{p}", part) for part in "qkv" for p in params]
        if m.qk_norm:
            keys += [
                (f"{hf}self_attn.q_norm.weight", f"{ours}attn.q_norm.weight", "copy"),
                (f"{hf}self_attn.k_norm.weight", f"{ours}attn.k_norm.weight", "copy"),
            ]
        keys += [(f"{hf}self_attn.o_proj.{p}", f"{ours}attn.proj.{p}", "copy") for p in params]
        keys.append((f"{hf}{norms[1]}.weight", f"{ours}ln2.weight", "copy"))
        keys += [(f"{hf}mlp.up_proj.{p}", f"{ours}ff.up.{p}", "copy") for p in params]
        keys += [(f"{hf}mlp.down_proj.{p}", f"{ours}ff.proj.{p}", "copy") for p in params]
    keys += [
        ("model.norm.weight", "ln_f.weight", "copy"),
        ("lm_head.weight", "tok_emb.weight" if m.tie_weights else "lm_head.weight", "copy"),
    ]
    return Plan(architecture, model_type, config, keys)


def export_plan(m: ModelConfig, vocab_size: int, specials: dict[str, Optional[int]]) -> Plan:
    check_exportable(m)
    return gpt2_plan(m, vocab_size, specials) if m.pos_encoding == "learned" else _rope_plan(m, vocab_size, specials)


def _to_hf(tensor: torch.Tensor, how: str) -> torch.Tensor:
    if how == "t":
        return tensor.t().contiguous()
    if how in ("q", "k", "v"):
        return tensor.chunk(3, dim=0)["qkv".index(how)].contiguous()
    return tensor


def hf_model_from(model: torch.nn.Module, plan: Plan):
    """A transformers model (eval mode, fp32) holding ``model``'s weights as ``plan`` maps them."""
    transformers = require_transformers()
    model_class = getattr(transformers, plan.architecture)
    hf_model = model_class(model_class.config_class(**plan.config))
    template, ours = hf_model.state_dict(), model.state_dict()
    hf_state = {}
    for hf_key, our_key, how in plan.keys:
        if our_key in ours:
            hf_state[hf_key] = _to_hf(ours[our_key].float(), how)
        elif hf_key.endswith(".bias") and not model.config.bias:
            hf_state[hf_key] = torch.zeros_like(template[hf_key])
    unused = set(ours) - {our_key for _, our_key, _ in plan.keys}
    unfilled = set(template) - set(hf_state)
    if unused or unfilled:
        raise CortexCraftError(
            f"cannot map this model onto {plan.architecture}: no place for {sorted(unused)[:3]}, "
            f"nothing for {sorted(unfilled)[:3]}; report this with the run's config"
        )
    hf_model.load_state_dict(hf_state, strict=True)
    return hf_model.eval()


# ---------------------------------------------------------------------------------------------
# tokenizers


def hf_tokenizer(tok: Tokenizer, max_length: int):
    """Our tokenizer as a ``PreTrainedTokenizerFast``. A char vocabulary becomes a WordLevel model
    over single characters (every character split off on its own, decoded by joining)."""
    transformers = require_transformers()
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, pre_tokenizers

    if isinstance(tok, CharTokenizer):
        backend = Backend(models.WordLevel(vocab={t: i for i, t in enumerate(tok.tokens)}, unk_token=tok.unk))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        backend.add_special_tokens(tok.special_tokens)
    else:
        backend = Backend.from_str(tok.backend.to_str())
    roles = {
        f"{role}_token": next(n for n in names if n in tok.special_tokens)
        for role, names in SPECIAL_ROLES.items()
        if any(n in tok.special_tokens for n in names)
    }
    # No clean-up: it would delete the spaces before punctuation that the text really has.
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, model_max_length=max_length, clean_up_tokenization_spaces=False, **roles
    )


def save_hf_tokenizer(tok: Tokenizer, max_length: int, out_dir: Path) -> None:
    hf_tokenizer(tok, max_length).save_pretrained(str(out_dir))
    # transformers 5 writes its own class name ("TokenizersBackend"), which 4.x cannot load.
    path = out_dir / "tokenizer_config.json"
    atomic_write_json(path, {**read_json(path), "tokenizer_class": "PreTrainedTokenizerFast"})


# ---------------------------------------------------------------------------------------------
# export


def _check_export_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise CortexCraftError(f"--out {out_dir} is a file; choose a directory path")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / EXPORT_RECORD).is_file():
        raise CortexCraftError(
            f"--out {out_dir} is a non-empty directory that is not a CortexCraft export; "
            f"choose a new or empty directory"
        )


def _data_description(run_dir: Path) -> dict[str, Any]:
    run = read_json(run_dir / "run.json") if (run_dir / "run.json").is_file() else {}
    return {"source": run.get("data_source") or {}, "manifest_sha256": run.get("data_manifest_sha256")}


def model_card(
    *,
    name: str,
    plan: Plan,
    config: RunConfig,
    state: dict[str, Any],
    vocab_size: int,
    tokenizer_kind: str,
    data: dict[str, Any],
    history: list[dict[str, Any]],
    sample: tuple[str, str],
) -> str:
    """README.md of an export: the hub's metadata header, how to load it, config, data, losses, a sample."""
    at_step = next((r for r in reversed(history) if r["step"] == state["step"]), {})
    source = data["source"]

    def fmt(value: Any) -> str:
        return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)

    prompt, text = sample
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: text-generation",
        f"tags: [cortexcraft, {plan.model_type}]",
        "---",
        "",
        f"# {name}",
        "",
        f"A {plan.architecture} exported by CortexCraft from checkpoint step {state['step']:,} "
        f"(preset `{config.preset}`). Load it offline with transformers:",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline",
        "",
        f'model = AutoModelForCausalLM.from_pretrained("{name}")',
        f'tokenizer = AutoTokenizer.from_pretrained("{name}")',
        f'print(pipeline("text-generation", model="{name}")({json.dumps(prompt, ensure_ascii=False)}, '
        f'max_new_tokens=50)[0]["generated_text"])',
        "```",
        "",
        "## Model",
        "",
        "| | |",
        "|---|---|",
        f"| architecture | {plan.architecture} |",
        f"| layers × heads × width | {config.model.n_layer} × {config.model.n_head} × {config.model.n_embd} |",
        f"| context | {config.model.block_size} tokens (position table {config.model.positions}) |",
        f"| vocabulary | {vocab_size:,} ({tokenizer_kind}) |",
        f"| started from | {config.train.init_from or 'scratch'} |",
        "",
        "## Data",
        "",
        "| | |",
        "|---|---|",
        f"| source | `{source.get('spec', config.data.source)}` |",
        f"| corpus fingerprint | `{source.get('fingerprint', '–')}` |",
        f"| corpus sha256 | `{source.get('sha256', '–')}` |",
        f"| characters | {source['chars']:,} |" if source.get("chars") else "| characters | – |",
        f"| shard manifest sha256 | `{data.get('manifest_sha256') or '–'}` |",
        "",
        "## Losses",
        "",
        "| | |",
        "|---|---|",
        f"| step | {state['step']:,} |",
        f"| val loss at this checkpoint | {fmt(state.get('val_loss'))} |",
        f"| train loss at this checkpoint | {fmt(at_step.get('train_loss'))} |",
        f"| best val loss of the run | {fmt(state.get('best_val_loss'))} (step {fmt(state.get('best_step'))}) |",
        f"| tokens seen | {state.get('tokens_seen', 0):,} |",
        "",
        "## Sample",
        "",
        f"Prompt `{json.dumps(prompt, ensure_ascii=False)}`, temperature {config.sample.temperature}, "
        f"top_k {config.sample.top_k}, top_p {config.sample.top_p}, seed {config.sample.seed}:",
        "",
        fence(text),
        "",
        "## Config",
        "",
        fence(json.dumps(config.model_dump(mode="json"), indent=2)),
        "",
    ]
    return "\n".join(lines)


def _card_prompt(tok: Tokenizer, prompts: list[str]) -> tuple[str, list[int]]:
    """The first configured prompt the vocabulary can encode, else its first token."""
    for prompt in [*prompts, "\n"]:
        try:
            return prompt, tok.encode(prompt).tolist()
        except CortexCraftError:
            continue
    return tok.decode([0]), [0]


def export_run(
    run_dir: str | os.PathLike, out_dir: str | os.PathLike, checkpoint: str | os.PathLike = "best"
) -> dict[str, Any]:
    """Write a checkpoint of a run as a transformers model directory (weights, config, tokenizer,
    model card) that ``AutoModelForCausalLM`` / ``AutoTokenizer.from_pretrained`` load offline.
    The directory is built beside ``out_dir`` and renamed into place. Returns what was written."""
    require_transformers()
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    _check_export_dir(out_dir)
    path, state = resolve_checkpoint(run_dir, checkpoint)
    config = RunConfig.model_validate(state["config"])
    tok = load_tokenizer(run_dir)
    plan = export_plan(config.model, state["vocab_size"], special_token_ids(tok))

    model, _ = load_model(run_dir, path)
    hf_model = hf_model_from(model, plan)
    prompt, prompt_ids = _card_prompt(tok, config.sample.prompts)
    generator = torch.Generator().manual_seed(config.sample.seed)
    ids = generate(
        model,
        torch.as_tensor(prompt_ids, dtype=torch.long).unsqueeze(0),
        CARD_SAMPLE_TOKENS,
        config.sample.temperature,
        config.sample.top_k,
        config.sample.top_p,
        generator,
    )
    sample = (prompt, tok.decode(ids[0, len(prompt_ids) :].tolist()))

    with build_dir(out_dir) as tmp:
        hf_model.save_pretrained(str(tmp))
        if "rope_parameters" in plan.config:
            # transformers 4.x reads rope_theta / rope_scaling instead; without them it would rotate
            # with its own defaults (Apertus: theta 12M with llama3 scaling).
            theta, config_file = plan.config["rope_parameters"]["rope_theta"], tmp / "config.json"
            atomic_write_json(
                config_file,
                {
                    **read_json(config_file),
                    "rope_theta": theta,
                    "rope_scaling": {"rope_type": "default", "rope_theta": theta},
                },
            )
        save_hf_tokenizer(tok, config.model.positions, tmp)
        atomic_write_text(
            tmp / "README.md",
            model_card(
                name=out_dir.name,
                plan=plan,
                config=config,
                state=state,
                vocab_size=state["vocab_size"],
                tokenizer_kind=tok.kind,
                data=_data_description(run_dir),
                history=read_metrics(run_dir),
                sample=sample,
            ),
        )
        record = {
            "format": "cortexcraft-export/1",
            "architecture": plan.architecture,
            "run_dir": str(run_dir.resolve()),
            "checkpoint": str(path.resolve()),
            "step": state["step"],
            "val_loss": state.get("val_loss"),
            "vocab_size": state["vocab_size"],
            "tokenizer": tok.kind,
        }
        atomic_write_json(tmp / EXPORT_RECORD, record)
        fsync_tree(tmp)
    log.info("exported %s (step %d) as %s to %s", path, state["step"], plan.architecture, out_dir)
    return {**record, "out_dir": str(out_dir)}
