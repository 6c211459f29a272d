"""Sampling text from a trained model: temperature, top-k, top-p, greedy, with or without a KV cache.

With the cache and without it, the next token is always predicted from the same context window,
so both paths give the same text for the same seed. Positions are absolute (learned or
sinusoidal), so a window that slides puts every cached key at the wrong position and the cache
must be rebuilt: the window therefore slides by half a block at a time (the context is the last
``block_size/2`` to ``block_size`` tokens), costing one full forward pass per ``block_size/2`` new
tokens instead of one per token.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Callable, Optional

import torch
from torch.nn import functional as F

from cortexcraft.checkpoint import load_model
from cortexcraft.config import SampleConfig
from cortexcraft.device import autocast, inference_dtype, select_device
from cortexcraft.errors import CortexCraftError
from cortexcraft.model import GPT, KVCache
from cortexcraft.tokenizer import load_tokenizer

log = logging.getLogger(__name__)


def sample_next(
    logits: torch.Tensor,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """One token id per row of ``logits`` (B, vocab); temperature 0 is greedy."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, [-1]]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        sorted_probs = F.softmax(sorted_logits, dim=-1)
        # Drop a token when the more likely ones already reach top_p; the most likely always stays.
        drop_sorted = sorted_probs.cumsum(dim=-1) - sorted_probs >= top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)


def window_start(length: int, start: int, block_size: int) -> int:
    """Where the context window of a ``length``-token sequence starts for its next token, given
    that it started at ``start``.

    When the window is full it slides by half a window at once (keeping the newest half), not by
    one token: with absolute positions every slide invalidates the KV cache, so this rebuilds the
    cache once per block_size/2 tokens instead of on every token. Every path (with and without the
    cache, batched or not) uses these windows, so they all give the same text.
    """
    return length - max(1, block_size // 2) if length - start > block_size else start


class TextPieces:
    """The text of generated token ids as it grows, in pieces of whole characters
    (``tokenizer.stream_decoder``: a multi-byte character split across byte-level BPE tokens is
    held back until its last byte arrives), so the pieces join to ``tokenizer.decode`` of all ids."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.text = ""
        self._decode_next = tokenizer.stream_decoder()
        self._pending: list[int] = []

    def push(self, token: int) -> str:
        """The whole characters ``token`` completes ("" while a character is still incomplete)."""
        piece = self._decode_next(token)
        if piece is None:
            self._pending.append(token)
            return ""
        self._pending.clear()
        self.text += piece
        return piece

    def rest(self) -> str:
        """What the held-back ids decode to when no more come (U+FFFD for an incomplete character)."""
        return self.tokenizer.decode(self._pending) if self._pending else ""


@torch.inference_mode()
def generate(
    model: GPT,
    idx: torch.Tensor,
    max_new_tokens: int,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    generator: Optional[torch.Generator] = None,
    kv_cache: bool = True,
    on_token: Optional[Callable[[int], None]] = None,
) -> torch.Tensor:
    """Extend ``idx`` (B, T) by ``max_new_tokens`` sampled tokens; returns (B, T + max_new_tokens).

    ``on_token`` gets each new token id of row 0 as soon as it is sampled.
    """
    model.eval()
    block_size = model.config.block_size
    start = max(0, idx.size(1) - block_size)
    cache = KVCache(model.config.n_layer) if kv_cache else None
    precision = autocast(idx.device, inference_dtype(idx.device))
    for _ in range(max_new_tokens):
        if (slid := window_start(idx.size(1), start, block_size)) != start:
            start = slid
            if cache is not None:
                cache.reset()
        with precision:
            if cache is not None and cache.length > 0:
                logits, _ = model(idx[:, -1:], cache=cache)
            else:
                logits, _ = model(idx[:, start:], cache=cache)
        next_id = sample_next(logits[:, -1, :], temperature, top_k, top_p, generator)
        idx = torch.cat([idx, next_id], dim=1)
        if on_token is not None:
            on_token(int(next_id[0, 0]))
    return idx


def generate_from_run(
    run_dir: str | os.PathLike,
    checkpoint: str | os.PathLike = "best",
    prompt: str = "\n",
    max_new_tokens: int = 500,
    temperature: float = 0.8,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    seed: int = 1337,
    kv_cache: bool = True,
    on_text: Optional[Callable[[str], None]] = None,
) -> str:
    """Sample a continuation of ``prompt`` from a trained run; returns only the new text.

    ``on_text`` receives the text in pieces as it is produced (whole characters only).
    """
    if not prompt:
        raise CortexCraftError("the prompt is empty; give at least one character, e.g. --prompt $'\\n'")
    if max_new_tokens < 1 or temperature < 0 or (top_k is not None and top_k < 1) or (
        top_p is not None and not 0 < top_p <= 1
    ):
        raise CortexCraftError(
            "invalid sampling settings; use max_new_tokens >= 1, temperature >= 0, top_k >= 1, 0 < top_p <= 1"
        )
    run_dir = Path(run_dir)
    tokenizer = load_tokenizer(run_dir)
    prompt_ids = tokenizer.encode(prompt)
    device = select_device("auto")
    model, _ = load_model(run_dir, checkpoint, device)
    generator = torch.Generator(device=device).manual_seed(seed)
    pieces = TextPieces(tokenizer)

    def stream(token: int) -> None:
        if piece := pieces.push(token):
            on_text(piece)

    idx = torch.as_tensor(prompt_ids, dtype=torch.long, device=device).unsqueeze(0)
    out = generate(
        model,
        idx,
        max_new_tokens,
        temperature,
        top_k,
        top_p,
        generator,
        kv_cache,
        on_token=stream if on_text is not None else None,
    )
    text = tokenizer.decode(out[0, idx.size(1) :].tolist())
    # Ids that end inside a character (or never form one) are held back; the full decode shows
    # them as U+FFFD, as the returned text does.
    if on_text is not None and len(text) > len(pieces.text):
        on_text(text[len(pieces.text) :])
    return text


def sample_prompts(
    run_dir: str | os.PathLike, sample: SampleConfig, checkpoint: str | os.PathLike = "best"
) -> list[tuple[str, int, str]]:
    """(prompt, seed, continuation) for every prompt of ``sample``; prompt ``i`` is sampled with
    seed ``sample.seed + i``, so samples never share a random stream and start alike."""
    return [
        (
            prompt,
            sample.seed + index,
            generate_from_run(
                run_dir,
                checkpoint=checkpoint,
                prompt=prompt,
                max_new_tokens=sample.max_new_tokens,
                temperature=sample.temperature,
                top_k=sample.top_k,
                top_p=sample.top_p,
                seed=sample.seed + index,
                kv_cache=sample.kv_cache,
            ),
        )
        for index, prompt in enumerate(sample.prompts)
    ]
