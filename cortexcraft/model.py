"""A decoder-only transformer (GPT), configurable to cover every seed project.

Token embedding + positional encoding (learned table or fixed sinusoids) -> ``n_layer`` blocks of
masked multi-head self-attention and a feed-forward network, each wrapped in a residual connection
and a LayerNorm (pre-norm: ``x + f(ln(x))``; post-norm: ``ln(x + f(x))``) -> final LayerNorm ->
linear head over the vocabulary. Attention runs through ``F.scaled_dot_product_attention`` (flash
kernels on GPU) with a fused QKV projection; on CPU under bf16 autocast, contexts up to 512 use two
bf16 matmuls around a masked softmax instead, which is faster there.

Options from the speedrun literature (modded-nanogpt), all off by default so the seed presets keep
their architectures, and all standard maths so a model maps onto a Llama-family checkpoint:
rotary positions (``pos_encoding="rope"``: Llama's rotate-half convention, cos/sin cached once),
RMSNorm instead of LayerNorm, ReLU² feed-forward, QK-norm (RMSNorm over each head's queries and
keys, before RoPE), zero-initialised output projections and head, and a tanh logit soft-cap.

On CUDA the embedding and head rows are padded to a multiple of 128 (GPT-2's 50,257 -> 50,304,
as nanoGPT does) so the head's matmuls fill whole tensor-core tiles; the padding rows are zero,
never receive a gradient (logits are sliced back to the true vocabulary before anything reads
them), and never leave the model: ``state_dict`` (checkpoints, HF export) holds the true vocabulary
and ``load_state_dict`` pads it again (see ``keep_true_vocabulary_in``). On CPU nothing is padded:
an arbitrary head width costs the CPU kernels nothing, padding a 65-character head to 128 would
double its work, and unpadded shapes keep CPU numerics exactly as before.

Generation can pass a ``KVCache``: the keys and values of earlier positions are kept so each new
token costs one position instead of the whole context.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from cortexcraft.config import ModelConfig
from cortexcraft.errors import CortexCraftError


def check_model_config(cfg: ModelConfig, vocab_size: int) -> None:
    """Reject shapes that cannot work, before any tensor is allocated (also for configs built
    without validation, e.g. ``ModelConfig.model_construct``)."""
    if problems := cfg.shape_problems():
        raise CortexCraftError("; ".join(problems))
    if vocab_size < 1:
        raise CortexCraftError(f"vocab_size={vocab_size} is not positive; prepare the data again")


class KVCache:
    """Keys and values of the positions seen so far, one (k, v) pair per layer."""

    def __init__(self, n_layer: int):
        self.layers: list[Optional[tuple[torch.Tensor, torch.Tensor]]] = [None] * n_layer
        self.length = 0

    def reset(self) -> None:
        self.layers = [None] * len(self.layers)
        self.length = 0


def make_norm(cfg: ModelConfig, dim: int) -> nn.Module:
    """LayerNorm or RMSNorm (both with a learned gain) over the last ``dim`` features."""
    if cfg.normalization == "rmsnorm":
        return nn.RMSNorm(dim, eps=cfg.norm_eps)
    return nn.LayerNorm(dim, eps=cfg.norm_eps, bias=cfg.bias)


class Rotary(nn.Module):
    """cos/sin tables of rotary position embeddings for every position, computed once.

    Frequencies ``theta^(-2i/head_dim)``; the pair rotated together is (x[i], x[i + head_dim/2])
    ("rotate half", as in Llama and Hugging Face transformers)."""

    def __init__(self, head_dim: int, positions: int, theta: float):
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        angles = torch.outer(torch.arange(positions, dtype=torch.float32), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        # Buffers, not parameters: fixed, and rebuilt rather than stored in checkpoints.
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)

    def forward(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.cos[start:start + length], self.sin[start:start + length]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, head_dim) queries or keys by their positions' angles."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-second, first], dim=-1) * sin


# Up to this many positions, causal attention on CPU under autocast runs as bf16 matmuls around a
# masked softmax; from 1,024 positions torch's fp32 flash kernel is faster (see CausalSelfAttention).
CPU_SHORT_CONTEXT = 512


def masked_softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float,
                             dtype: torch.dtype) -> torch.Tensor:
    """Causal attention of (B, heads, T, head_dim) tensors as two matmuls around a masked softmax,
    all in ``dtype`` (the probabilities too, as GPU flash kernels keep them)."""
    with torch.autocast(q.device.type, enabled=False):
        q, k, v = (t.to(dtype, memory_format=torch.contiguous_format) for t in (q, k, v))
        T = q.size(-2)
        mask = torch.full((T, T), float("-inf"), dtype=dtype, device=q.device).triu(1)
        scores = (q * q.size(-1) ** -0.5) @ k.transpose(-2, -1) + mask
        return F.dropout(scores.softmax(-1), dropout_p) @ v


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head = cfg.n_head
        self.attn_dropout = cfg.attention_dropout
        self.qkv = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.resid_dropout = nn.Dropout(cfg.dropout)
        head_dim = cfg.n_embd // cfg.n_head
        self.q_norm = nn.RMSNorm(head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=cfg.norm_eps) if cfg.qk_norm else None

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        # Under CPU autocast, torch's flash attention is slower in bf16 than in fp32 (its backward most
        # of all), so the QK-norm and rotation run in fp32. Up to CPU_SHORT_CONTEXT positions, bf16
        # matmuls around a masked softmax beat both (forward + backward of 24 x 4 heads x 128 x 32:
        # 4.5 ms, against 9.5 for fp32 flash and 17.5 for bf16 flash); from 1,024, fp32 flash wins.
        # The values are neither normalised nor rotated: they stay bf16 unless fp32 flash takes them.
        cpu_autocast = x.device.type == "cpu" and torch.is_autocast_enabled("cpu")
        if cpu_autocast:
            q, k = q.float(), k.float()
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
        past = cache.layers[layer] if cache is not None else None
        if past is not None:
            # After the prefill the cache grows one token at a time, and that one newest query may
            # attend to every cached key: no mask needed.
            if T > 1:
                raise ValueError("a filled KVCache is extended one token at a time")
            k = torch.cat([past[0], k], dim=2)
            v = torch.cat([past[1], v], dim=2)
        if cache is not None:
            cache.layers[layer] = (k, v)
        dropout_p = self.attn_dropout if self.training else 0.0
        if cpu_autocast and past is None and T <= CPU_SHORT_CONTEXT:
            y = masked_softmax_attention(q, k, v, dropout_p, torch.get_autocast_dtype("cpu"))
        else:
            causal = past is None and T > 1
            if cpu_autocast:
                with torch.autocast("cpu", enabled=False):
                    y = F.scaled_dot_product_attention(q, k, v.float(), dropout_p=dropout_p, is_causal=causal)
            else:
                y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=causal)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.proj(y))


class ReLUSquared(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x).square()


ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "gelu_tanh": partial(nn.GELU, approximate="tanh"),
               "relu2": ReLUSquared}


class FeedForward(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.up = nn.Linear(cfg.n_embd, cfg.ff_width, bias=cfg.bias)
        self.act = ACTIVATIONS[cfg.activation]()
        self.proj = nn.Linear(cfg.ff_width, cfg.n_embd, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.proj(self.act(self.up(x))))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm == "pre"
        self.ln1 = make_norm(cfg, cfg.n_embd)
        self.attn = CausalSelfAttention(cfg)
        self.ln2 = make_norm(cfg, cfg.n_embd)
        self.ff = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]] = None,
                cache: Optional[KVCache] = None, layer: int = 0) -> torch.Tensor:
        if self.pre_norm:
            x = x + self.attn(self.ln1(x), rope, cache, layer)
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x, rope, cache, layer))
        return self.ln2(x + self.ff(x))


def sinusoidal_table(positions: int, n_embd: int) -> torch.Tensor:
    """The fixed sin/cos position encodings of "Attention Is All You Need"."""
    position = torch.arange(positions, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, n_embd, 2, dtype=torch.float32) * (-math.log(10000.0) / n_embd))
    table = torch.zeros(positions, n_embd)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: n_embd // 2])
    return table


def padded_vocab_size(vocab_size: int, multiple: int) -> int:
    """``vocab_size`` rounded up to a multiple of ``multiple``."""
    return -(-vocab_size // multiple) * multiple


class GPT(nn.Module):
    def __init__(self, model_cfg: ModelConfig, vocab_size: int, pad_vocab_to: int = 1):
        super().__init__()
        check_model_config(model_cfg, vocab_size)
        self.config = model_cfg
        self.vocab_size = vocab_size
        self.vocab_rows = padded_vocab_size(vocab_size, pad_vocab_to)
        self.tok_emb = self._pad_vocab(nn.Embedding(vocab_size, model_cfg.n_embd))
        self.rotary = None
        if model_cfg.pos_encoding == "learned":
            self.pos_emb = nn.Embedding(model_cfg.positions, model_cfg.n_embd)
        elif model_cfg.pos_encoding == "sinusoidal":
            # A buffer, not a parameter: fixed, and rebuilt rather than stored in checkpoints.
            self.register_buffer("pos_table", sinusoidal_table(model_cfg.positions, model_cfg.n_embd), persistent=False)
        else:
            self.rotary = Rotary(model_cfg.n_embd // model_cfg.n_head, model_cfg.positions, model_cfg.rope_theta)
        self.drop = nn.Dropout(model_cfg.dropout)
        self.blocks = nn.ModuleList(Block(model_cfg) for _ in range(model_cfg.n_layer))
        self.ln_f = make_norm(model_cfg, model_cfg.n_embd)
        # Tied weights reuse the embedding matrix as the head, so there is no second copy to save.
        self.lm_head = None if model_cfg.tie_weights else self._pad_vocab(
            nn.Linear(model_cfg.n_embd, vocab_size, bias=False)
        )
        self.apply(self._init_weights)
        for name, param in self.named_parameters():
            if name.endswith("proj.weight"):
                if model_cfg.zero_init:
                    # modded-nanogpt: every block starts as the identity, so early steps train the
                    # embeddings and head through a clean residual stream.
                    nn.init.zeros_(param)
                else:
                    # GPT-2: scale the projections that write into the residual stream by depth.
                    nn.init.normal_(param, mean=0.0, std=0.02 / math.sqrt(2 * model_cfg.n_layer))
        if model_cfg.zero_init and self.lm_head is not None:
            # A zero head predicts the uniform distribution: the loss starts exactly at ln(vocab).
            nn.init.zeros_(self.lm_head.weight)
        if self.vocab_rows != vocab_size:
            self.register_state_dict_post_hook(_strip_vocab_padding)
            self.register_load_state_dict_pre_hook(_pad_vocab_rows)

    def _pad_vocab(self, module: nn.Embedding | nn.Linear) -> nn.Embedding | nn.Linear:
        """``module`` (built with the true vocabulary, so that it draws the same random numbers as an
        unpadded model's) with zero rows up to ``vocab_rows``."""
        if self.vocab_rows != self.vocab_size:
            module.weight = nn.Parameter(_pad_rows(module.weight.detach(), self.vocab_rows))
            if isinstance(module, nn.Embedding):
                module.num_embeddings = self.vocab_rows
            else:
                module.out_features = self.vocab_rows
        return module

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            weight = module.weight
            if module is self.tok_emb or module is self.lm_head:
                # Random values for the true rows only: the same draws as an unpadded model, so one
                # seed gives one model whatever the padding; the padding rows stay zero.
                nn.init.zeros_(weight[self.vocab_size :])
                weight = weight[: self.vocab_size]
            nn.init.normal_(weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    @property
    def vocab_keys(self) -> tuple[str, ...]:
        """State-dict keys of the tensors with one row per vocabulary entry."""
        return ("tok_emb.weight",) if self.lm_head is None else ("tok_emb.weight", "lm_head.weight")

    def forward(
        self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, cache: Optional[KVCache] = None
    ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Logits for every position and the mean cross-entropy when ``targets`` are given.

        Without targets only the last position's logits are computed (all generation needs).
        """
        T = idx.size(1)
        start = cache.length if cache is not None else 0
        if start + T > self.config.positions:
            raise ValueError(f"sequence of {start + T} tokens exceeds the {self.config.positions} positions")
        x = self.tok_emb(idx)
        rope = None
        if self.rotary is not None:
            rope = self.rotary(start, T)
        else:
            pos = torch.arange(start, start + T, device=idx.device)
            x = x + (self.pos_emb(pos) if self.config.pos_encoding == "learned" else self.pos_table[pos])
        x = self.drop(x)
        for layer, block in enumerate(self.blocks):
            x = block(x, rope, cache, layer)
        if cache is not None:
            cache.length += T
        x = self.ln_f(x)
        if targets is None:
            return self.head(x[:, [-1], :]), None
        logits = self.head(x)
        loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1))
        return logits, loss

    def head(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.tok_emb.weight)
        if self.vocab_rows != self.vocab_size:
            logits = logits[..., : self.vocab_size]
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = cap * torch.tanh(logits.float() / cap)
        return logits


def _strip_vocab_padding(model: GPT, state: dict, prefix: str, local_metadata: dict) -> None:
    for key in model.vocab_keys:
        state[prefix + key] = state[prefix + key][: model.vocab_size]


def _pad_vocab_rows(model: GPT, state: dict, prefix: str, *unused) -> None:
    for key in model.vocab_keys:
        tensor = state.get(prefix + key)
        if tensor is not None and tensor.dim() == 2 and tensor.size(0) == model.vocab_size:
            state[prefix + key] = _pad_rows(tensor, model.vocab_rows)


def _pad_rows(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    return torch.cat([tensor, tensor.new_zeros(rows - tensor.size(0), *tensor.shape[1:])])


def keep_true_vocabulary_in(model: GPT, optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``'s state dicts hold the true vocabulary, as ``model.state_dict()`` does:
    its per-row state (AdamW's moments) of the padded embedding and head is cut to
    ``model.vocab_size`` rows when saved and padded with zeros when loaded, so a checkpoint written
    on a GPU resumes on a CPU and back. The padding rows' moments are zero anyway: they never get a
    gradient. Nothing to do for an unpadded model."""
    if model.vocab_rows == model.vocab_size:
        return
    parameters = dict(model.named_parameters())
    padded = {id(parameters[key]) for key in model.vocab_keys}

    def padded_entries(optimizer: torch.optim.Optimizer, state_dict: dict):
        # The state dict numbers parameters in param-group order.
        for saved, group in zip(state_dict["param_groups"], optimizer.param_groups):
            for index, param in zip(saved["params"], group["params"]):
                if id(param) in padded and index in state_dict["state"]:
                    yield state_dict["state"], index

    def strip(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        for states, index in padded_entries(optimizer, state_dict):
            states[index] = {
                name: value[: model.vocab_size] if _is_vocab_state(value, model.vocab_rows) else value
                for name, value in states[index].items()
            }
        return state_dict

    def pad(optimizer: torch.optim.Optimizer, state_dict: dict) -> dict:
        state_dict = {**state_dict, "state": dict(state_dict["state"])}
        for states, index in padded_entries(optimizer, state_dict):
            states[index] = {
                name: _pad_rows(value, model.vocab_rows) if _is_vocab_state(value, model.vocab_size) else value
                for name, value in states[index].items()
            }
        return state_dict

    optimizer.register_state_dict_post_hook(strip)
    optimizer.register_load_state_dict_pre_hook(pad)


def _is_vocab_state(value: object, rows: int) -> bool:
    return isinstance(value, torch.Tensor) and value.dim() == 2 and value.size(0) == rows


def matmul_shapes(cfg: ModelConfig, vocab_size: int, tokens: int) -> list[tuple[int, int, int]]:
    """(m, k, n) of the forward matmuls of one layer and the head, for ``tokens`` tokens at once."""
    C, F = cfg.n_embd, cfg.ff_width
    return [(tokens, C, 3 * C), (tokens, C, C), (tokens, C, F), (tokens, F, C), (tokens, C, vocab_size)]


def parameter_count(model_cfg: ModelConfig, vocab_size: int) -> int:
    """Trainable parameters of ``GPT(model_cfg, vocab_size)``, built on the meta device (no memory)."""
    with torch.device("meta"):
        model = GPT(model_cfg, vocab_size)
    return sum(p.numel() for p in model.parameters())
