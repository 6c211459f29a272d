import pytest
import torch

from cortexcraft.config import ModelConfig
from cortexcraft.generate import generate, sample_next
from cortexcraft.model import GPT


pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 13


def trained_looking_model(**fields) -> GPT:
    """A random model with sharpened output so sampling is far from uniform."""
    torch.manual_seed(0)
    cfg = ModelConfig(**{**dict(block_size=12, n_layer=2, n_head=2, n_embd=16), **fields})
    model = GPT(cfg, VOCAB)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(8)
    return model.eval()


def run(model, prompt_len, new, kv_cache, seed=7, **sampling):
    prompt = torch.arange(prompt_len).remainder(VOCAB).unsqueeze(0)
    gen = torch.Generator().manual_seed(seed)
    return generate(model, prompt, new, generator=gen, kv_cache=kv_cache, **sampling)


@pytest.mark.parametrize("fields", [
    dict(pos_encoding="learned", norm="pre"),
    dict(pos_encoding="sinusoidal", norm="post", activation="gelu"),
    dict(pos_encoding="learned", norm="post", tie_weights=True),
])
@pytest.mark.parametrize("prompt_len", [1, 20])
def test_kv_cache_output_equals_full_recompute_past_the_block_size(fields, prompt_len):
    model = trained_looking_model(**fields)
    # 40 new tokens with block_size 12: the window slides many times (and prompt 20 starts cropped).
    with_cache = run(model, prompt_len, 40, kv_cache=True, temperature=1.0)
    without = run(model, prompt_len, 40, kv_cache=False, temperature=1.0)
    assert with_cache.shape == (1, prompt_len + 40)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, prompt_len:].tolist())) > 3  # really sampled, not a constant


def test_kv_cache_equality_holds_with_top_k_and_top_p():
    model = trained_looking_model()
    a = run(model, 3, 30, kv_cache=True, temperature=0.9, top_k=5, top_p=0.9)
    b = run(model, 3, 30, kv_cache=False, temperature=0.9, top_k=5, top_p=0.9)
    assert torch.equal(a, b)


def test_same_seed_same_text_other_seed_other_text():
    model = trained_looking_model()
    assert torch.equal(run(model, 2, 30, True, seed=1), run(model, 2, 30, True, seed=1))
    assert not torch.equal(run(model, 2, 30, True, seed=1), run(model, 2, 30, True, seed=2))


def test_temperature_zero_is_greedy_and_ignores_the_seed():
    model = trained_looking_model()
    greedy = run(model, 2, 20, True, seed=1, temperature=0)
    assert torch.equal(greedy, run(model, 2, 20, True, seed=99, temperature=0))
    assert torch.equal(greedy, run(model, 2, 20, True, seed=99, temperature=1.0, top_k=1))


def test_top_k_and_top_p_restrict_the_candidates():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(2000, 1)
    gen = torch.Generator().manual_seed(0)
    assert set(sample_next(logits, 1.0, top_k=2, generator=gen).flatten().tolist()) == {0, 1}
    # softmax: p0 ~ 0.64, p1 ~ 0.23: nucleus 0.8 needs exactly the first two.
    assert set(sample_next(logits, 1.0, top_p=0.8, generator=gen).flatten().tolist()) == {0, 1}
    assert set(sample_next(logits, 1.0, top_p=0.5, generator=gen).flatten().tolist()) == {0}
    assert len(set(sample_next(logits, 1.0, generator=gen).flatten().tolist())) == 6


def test_on_token_streams_every_new_token_in_order():
    model = trained_looking_model()
    seen = []
    out = generate(model, torch.zeros(1, 1, dtype=torch.long), 15, generator=torch.Generator().manual_seed(3),
                   on_token=seen.append)
    assert seen == out[0, 1:].tolist()
