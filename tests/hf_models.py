"""Small pretrained-looking transformers models for the interop tests, built and saved locally."""
from __future__ import annotations

from pathlib import Path

import torch

from tiny_runs import repetitive_text


def make_pretrained(transformers, directory: Path, *, tie: bool = True, activation: str = "gelu_new",
                    vocab_size: int = 400, n_positions: int = 64, n_embd: int = 32, n_layer: int = 2, n_head: int = 4,
                    seed: int = 0, text: str | None = None) -> Path:
    """A random GPT2LMHeadModel (weights from ``seed``; biases and gains random too, so a misplaced
    one shows) and a byte-level BPE tokenizer trained on ``text`` (default: a small generated
    text), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text if text is not None else repetitive_text(20_000)], trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head,
                                     activation_function=activation, tie_word_embeddings=tie,
                                     bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory
