"""Continuous batching for a GPT: many sequences share each forward pass, each at its own position
with its own KV cache, and sequences join and leave between any two tokens.

A sequence being extended is a ``Row``; its keys and values sit in a slot of a ``KVSlots`` (per
layer one tensor for all rows, so a step writes every row's new key and value with one indexed
assignment). Its context window follows ``generate``'s rule (``window_start``): a row whose window
is new (its first token, or after the window slid) gets a full pass over the window through
``GPT.forward`` with a ``KVCache``, the very call ``generate`` makes; every other row is extended
by one token in ``decode_step``, one batched pass for all of them. ``next_logits`` does both for
any mix of rows.

Batch invariance: the logits of a row are bitwise equal to those ``generate`` computes for that
sequence alone, whatever rows share the step, so a served answer equals `cortexcraft generate`
(greedy, and sampled with the same seed). Two things make that so on CPU, where a plain
(rows, features) matmul blocks the rows together and rounds differently (~1e-6) than one row:

- every linear layer runs as ``torch.bmm`` over (rows, 1, features): the BLAS computes each row as
  the same matrix-vector product a batch of one gets;
- attention runs per row over exactly that row's cached positions (padding rows to one length and
  masking would change the softmax's summation order).

``tests/test_batched_decode.py`` checks the equality for every model option.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from torch.nn import functional as F

from cortexcraft.generate import window_start
from cortexcraft.model import GPT, KVCache, apply_rotary

# Cache tensors start this long (in positions) and double when a row outgrows them, up to the
# block size: a model with a long context does not reserve its whole window for short answers.
MIN_CAPACITY = 64


def rowwise_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``F.linear`` of (rows, 1, in) as one matrix-vector product per row (see the module docstring)."""
    w = weight.t().expand(x.size(0), -1, -1)
    if bias is None:
        return torch.bmm(x, w)
    return torch.baddbmm(bias.expand(x.size(0), 1, -1), x, w)


def _linear(x: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return rowwise_linear(x, layer.weight, layer.bias)


class KVSlots:
    """The keys and values of up to ``slots`` rows of one model: per layer one (slots, heads,
    capacity, head_dim) tensor for keys and one for values, a row owning one slot. One tensor for
    all rows lets a decoding step write every row's new key with one indexed assignment."""

    def __init__(self, model: GPT, slots: int):
        cfg = model.config
        self.block_size = cfg.block_size
        self.shape = (slots, cfg.n_head, 0, cfg.n_embd // cfg.n_head)
        self.layers = cfg.n_layer
        self.device = model.tok_emb.weight.device
        self.dtype = model.tok_emb.weight.dtype
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._free = list(range(slots - 1, -1, -1))

    @property
    def capacity(self) -> int:
        return self.keys[0].size(2) if self.keys else 0

    def take(self) -> int:
        if not self._free:
            raise RuntimeError(f"all {self.shape[0]} cache slots are taken")
        return self._free.pop()

    def give_back(self, slot: int) -> None:
        self._free.append(slot)

    def reserve(self, positions: int) -> None:
        """Make room for ``positions`` cached positions in every slot."""
        old = self.capacity
        if positions <= old:
            return
        capacity = min(self.block_size, max(positions, 2 * old, MIN_CAPACITY))
        slots, heads, _, head_dim = self.shape
        for tensors in (self.keys, self.values):
            grown = [torch.empty(slots, heads, capacity, head_dim, device=self.device, dtype=self.dtype)
                     for _ in range(self.layers)]
            for new, tensor in zip(grown, tensors):
                new[:, :, :old] = tensor
            tensors[:] = grown


class Row:
    """A sequence being extended: its tokens, its context window, and the slot of ``cache`` whose
    first ``length`` positions hold the keys and values of the window so far."""

    def __init__(self, tokens: list[int], cache: KVSlots):
        if not tokens:
            raise ValueError("a row needs at least one token")
        self.tokens = list(tokens)
        self.cache = cache
        self.block_size = cache.block_size
        self.start = max(0, len(tokens) - self.block_size)
        self.slot: Optional[int] = None
        self.length = 0

    def append(self, token: int) -> None:
        self.tokens.append(token)
        if (start := window_start(len(self.tokens), self.start, self.block_size)) != self.start:
            self.start = start
            self.length = 0  # the window slid: its keys are computed again by a full pass

    @property
    def needs_full_pass(self) -> bool:
        return self.length == 0

    def release(self) -> None:
        """Give the slot back (the row is done)."""
        if self.slot is not None:
            self.cache.give_back(self.slot)
            self.slot, self.length = None, 0

    def fill(self, kv: KVCache) -> None:
        """Take over the keys and values a full pass left in ``kv``."""
        if self.slot is None:
            self.slot = self.cache.take()
        self.length = kv.length
        self.cache.reserve(self.length)
        for layer, (k, v) in enumerate(kv.layers):
            self.cache.keys[layer][self.slot, :, :self.length] = k[0]
            self.cache.values[layer][self.slot, :, :self.length] = v[0]


def full_pass(model: GPT, row: Row) -> torch.Tensor:
    """Logits (1, vocab) for the next token of ``row`` from its whole window, filling its cache."""
    idx = torch.as_tensor(row.tokens[row.start:], dtype=torch.long, device=model.tok_emb.weight.device)
    kv = KVCache(model.config.n_layer)
    logits, _ = model(idx.unsqueeze(0), cache=kv)
    row.fill(kv)
    return logits[:, -1, :]


def decode_step(model: GPT, rows: list[Row]) -> torch.Tensor:
    """Logits (rows, vocab) for the next token of every row, each of whose caches holds its window
    but the last token; one batched pass, the rows at their own positions."""
    device = model.tok_emb.weight.device
    B = len(rows)
    tokens = torch.tensor([row.tokens[-1] for row in rows], dtype=torch.long, device=device)
    positions = torch.tensor([row.length for row in rows], dtype=torch.long, device=device)
    slots = torch.tensor([row.slot for row in rows], dtype=torch.long, device=device)
    cache = rows[0].cache
    cache.reserve(max(row.length for row in rows) + 1)
    x = model.tok_emb(tokens).unsqueeze(1)
    rope = None
    if model.rotary is not None:
        rope = (model.rotary.cos[positions].view(B, 1, 1, -1), model.rotary.sin[positions].view(B, 1, 1, -1))
    elif model.config.pos_encoding == "learned":
        x = x + model.pos_emb(positions).unsqueeze(1)
    else:
        x = x + model.pos_table[positions].unsqueeze(1)
    for layer, block in enumerate(model.blocks):
        where = (cache.keys[layer], cache.values[layer], slots, positions, rows)
        if block.pre_norm:
            x = x + _attention(block.attn, block.ln1(x), rope, *where)
            x = x + _feed_forward(block.ff, block.ln2(x))
        else:
            x = block.ln1(x + _attention(block.attn, x, rope, *where))
            x = block.ln2(x + _feed_forward(block.ff, x))
    for row in rows:
        row.length += 1
    x = model.ln_f(x)
    logits = rowwise_linear(x, model.lm_head.weight if model.lm_head is not None else model.tok_emb.weight)
    if model.config.logit_softcap is not None:
        cap = model.config.logit_softcap
        logits = cap * torch.tanh(logits.float() / cap)
    return logits[:, 0, :]


def _attention(attn: nn.Module, x: torch.Tensor, rope: Optional[tuple[torch.Tensor, torch.Tensor]],
               keys: torch.Tensor, values: torch.Tensor, slots: torch.Tensor, positions: torch.Tensor,
               rows: list[Row]) -> torch.Tensor:
    B, _, C = x.shape
    q, k, v = _linear(x, attn.qkv).split(C, dim=2)
    q, k, v = (t.view(B, 1, attn.n_head, C // attn.n_head).transpose(1, 2) for t in (q, k, v))
    if attn.q_norm is not None:
        q, k = attn.q_norm(q), attn.k_norm(k)
    if rope is not None:
        q, k = apply_rotary(q, *rope), apply_rotary(k, *rope)
    keys[slots, :, positions] = k[:, :, 0]
    values[slots, :, positions] = v[:, :, 0]
    outputs = [F.scaled_dot_product_attention(q[i:i + 1], keys[row.slot:row.slot + 1, :, :row.length + 1],
                                              values[row.slot:row.slot + 1, :, :row.length + 1])
               for i, row in enumerate(rows)]
    y = torch.cat(outputs).transpose(1, 2).reshape(B, 1, C)
    return _linear(y, attn.proj)


def _feed_forward(ff: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return _linear(ff.act(_linear(x, ff.up)), ff.proj)


def next_logits(model: GPT, rows: list[Row]) -> torch.Tensor:
    """Logits (rows, vocab) for the next token of every row: a full pass for each row whose window
    is new, one batched decode step for all the others."""
    logits: list[Optional[torch.Tensor]] = [None] * len(rows)
    decoding = []
    for i, row in enumerate(rows):
        if row.needs_full_pass:
            logits[i] = full_pass(model, row)
        else:
            decoding.append(i)
    if decoding:
        step = decode_step(model, [rows[i] for i in decoding])
        for j, i in enumerate(decoding):
            logits[i] = step[j:j + 1]
    return torch.cat(logits)
