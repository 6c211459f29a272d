"""A nanoGPT-style reference, written here to match nanoGPT's model.py and train.py on CPU.

What makes it nanoGPT: one fused ``c_attn`` projection per block with
``scaled_dot_product_attention(is_causal=True)``, pre-norm blocks, a GELU MLP, weights tied between
the token embedding and the LM head, N(0, 0.02) init with the residual projections scaled by
1/sqrt(2 * n_layer), AdamW (``fused=False`` on CPU) with weight decay on 2-D weights only,
linear warmup then cosine decay, a fresh ``np.memmap`` per batch, ``loss.item()`` every iteration,
and an eval of ``eval_iters`` train and val batches every ``eval_interval`` iterations.
The benchmarks compare our trainer against it in the same process, alternately.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
from torch.nn import functional as F


@dataclass
class NanoConfig:
    block_size: int = 64
    vocab_size: int = 65
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True


@dataclass
class NanoTrainConfig:
    """nanoGPT's README CPU recipe for Tiny Shakespeare (train_shakespeare_char.py + CLI overrides)."""
    batch_size: int = 12
    max_iters: int = 2000
    learning_rate: float = 1e-3
    min_lr: float = 1e-4
    warmup_iters: int = 100
    lr_decay_iters: int = 2000
    weight_decay: float = 1e-1
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0
    eval_interval: int = 250
    eval_iters: int = 20
    seed: int = 1337


class CausalSelfAttention(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.resid_dropout = nn.Dropout(config.dropout)
        self.n_head = config.n_head
        self.n_embd = config.n_embd
        self.dropout = config.dropout

    def forward(self, x):
        B, T, C = x.size()
        q, k, v = self.c_attn(x).split(self.n_embd, dim=2)
        k = k.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        q = q.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        v = v.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0, is_causal=True)
        y = y.transpose(1, 2).contiguous().view(B, T, C)
        return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class NanoGPT(nn.Module):
    def __init__(self, config: NanoConfig):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            drop=nn.Dropout(config.dropout),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, bias=config.bias),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.transformer.wte.weight = self.lm_head.weight
        self.apply(self._init_weights)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                torch.nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    def _init_weights(self, module):
        if isinstance(module, nn.Linear):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                torch.nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            torch.nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, idx, targets=None):
        t = idx.size(1)
        pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
        x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
        for block in self.transformer.h:
            x = block(x)
        x = self.transformer.ln_f(x)
        if targets is not None:
            logits = self.lm_head(x)
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        else:
            logits = self.lm_head(x[:, [-1], :])
            loss = None
        return logits, loss

    def configure_optimizers(self, weight_decay, learning_rate, betas):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=learning_rate, betas=betas, fused=False)


def get_lr(it: int, tc: NanoTrainConfig) -> float:
    if it < tc.warmup_iters:
        return tc.learning_rate * (it + 1) / (tc.warmup_iters + 1)
    if it > tc.lr_decay_iters:
        return tc.min_lr
    ratio = (it - tc.warmup_iters) / (tc.lr_decay_iters - tc.warmup_iters)
    return tc.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (tc.learning_rate - tc.min_lr)


def get_batch(bin_path: str, dtype, block_size: int, batch_size: int):
    # nanoGPT recreates the memmap on every batch to avoid a memory leak.
    data = np.memmap(bin_path, dtype=dtype, mode="r")
    ix = torch.randint(len(data) - block_size, (batch_size,))
    x = torch.stack([torch.from_numpy(data[i:i + block_size].astype(np.int64)) for i in ix])
    y = torch.stack([torch.from_numpy(data[i + 1:i + 1 + block_size].astype(np.int64)) for i in ix])
    return x, y


@torch.no_grad()
def estimate_loss(model, bins: dict, dtype, block_size: int, batch_size: int, eval_iters: int) -> dict:
    out = {}
    model.eval()
    for split, path in bins.items():
        losses = torch.zeros(eval_iters)
        for k in range(eval_iters):
            x, y = get_batch(path, dtype, block_size, batch_size)
            _, loss = model(x, y)
            losses[k] = loss.item()
        out[split] = losses.mean().item()
    model.train()
    return out


def train_nanogpt(train_bin: str, val_bin: str, dtype, vocab_size: int, model_cfg: NanoConfig | None = None,
                  train_cfg: NanoTrainConfig | None = None, on_eval=None) -> dict:
    """nanoGPT's training loop. ``on_eval(record)`` gets step, val_loss and elapsed_seconds per eval."""
    model_cfg = model_cfg or NanoConfig(vocab_size=vocab_size)
    tc = train_cfg or NanoTrainConfig()
    torch.manual_seed(tc.seed)
    model = NanoGPT(model_cfg)
    optimizer = model.configure_optimizers(tc.weight_decay, tc.learning_rate, (tc.beta1, tc.beta2))
    bins = {"train": train_bin, "val": val_bin}
    bs, T = tc.batch_size, model_cfg.block_size
    best_val = float("inf")
    start = time.perf_counter()
    x, y = get_batch(train_bin, dtype, T, bs)
    for it in range(tc.max_iters + 1):
        for group in optimizer.param_groups:
            group["lr"] = get_lr(it, tc)
        if it % tc.eval_interval == 0 or it == tc.max_iters:
            losses = estimate_loss(model, bins, dtype, T, bs, tc.eval_iters)
            best_val = min(best_val, losses["val"])
            if on_eval is not None:
                on_eval({"step": it, "val_loss": losses["val"], "train_loss": losses["train"],
                         "elapsed_seconds": time.perf_counter() - start})
        if it == tc.max_iters:
            break
        _, loss = model(x, y)
        x, y = get_batch(train_bin, dtype, T, bs)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loss.item()
    return {"best_val_loss": best_val, "wall_seconds": time.perf_counter() - start, "model": model}
