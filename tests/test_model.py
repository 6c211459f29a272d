import math

import pytest
import torch

from cortexcraft.config import ModelConfig, build_config
from cortexcraft.errors import CortexCraftError
from cortexcraft.model import GPT, KVCache, Rotary, apply_rotary, parameter_count


pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 11


def tiny(**fields) -> ModelConfig:
    base = dict(block_size=8, n_layer=2, n_head=2, n_embd=16, dropout=0.0)
    return ModelConfig(**{**base, **fields})


VARIANTS = [
    dict(pos_encoding="learned", norm="pre", activation="relu"),
    dict(pos_encoding="sinusoidal", norm="post", activation="gelu"),
    dict(pos_encoding="learned", norm="post", activation="gelu", tie_weights=True, bias=False),
    dict(pos_encoding="sinusoidal", norm="pre", activation="relu", d_ff=24),
    # The speedrun options: rotary positions, RMSNorm, ReLU², QK-norm, soft-capped logits.
    dict(
        pos_encoding="rope", normalization="rmsnorm", activation="relu2", qk_norm=True, logit_softcap=15.0, bias=False
    ),
    dict(pos_encoding="rope", norm="post", normalization="rmsnorm", activation="gelu", norm_eps=1e-6),
]


@pytest.mark.parametrize("variant", VARIANTS)
def test_forward_gives_logits_and_a_loss_near_uniform_at_init(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant), VOCAB)
    idx = torch.randint(0, VOCAB, (3, 8))
    logits, loss = model(idx, idx)
    assert logits.shape == (3, 8, VOCAB)
    # GPT-2 init keeps the untrained prediction close to uniform.
    assert abs(loss.item() - torch.log(torch.tensor(float(VOCAB))).item()) < 0.3
    last, no_loss = model(idx)
    assert no_loss is None and last.shape == (3, 1, VOCAB)
    torch.testing.assert_close(last[:, 0], logits[:, -1])


@pytest.mark.parametrize("variant", VARIANTS)
def test_attention_is_causal(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant), VOCAB).eval()
    idx = torch.randint(0, VOCAB, (1, 8))
    changed = idx.clone()
    changed[0, 5] = (idx[0, 5] + 1) % VOCAB
    a, _ = model(idx, idx)
    b, _ = model(changed, changed)
    torch.testing.assert_close(a[:, :5], b[:, :5])
    assert not torch.allclose(a[:, 5:], b[:, 5:])


@pytest.mark.parametrize("variant", VARIANTS)
def test_kv_cache_gives_the_same_logits_as_a_full_forward(variant):
    torch.manual_seed(0)
    model = GPT(tiny(**variant), VOCAB).eval()
    idx = torch.randint(0, VOCAB, (2, 8))
    cache = KVCache(model.config.n_layer)
    model(idx[:, :3], cache=cache)
    for t in range(3, 8):
        cached, _ = model(idx[:, t : t + 1], cache=cache)
        full, _ = model(idx[:, : t + 1])
        torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    assert cache.length == 8


def test_sinusoidal_positions_are_fixed_and_not_saved():
    model = GPT(tiny(pos_encoding="sinusoidal"), VOCAB)
    assert not any("pos" in name for name in model.state_dict())
    learned = GPT(tiny(pos_encoding="learned"), VOCAB)
    assert "pos_emb.weight" in learned.state_dict()


def test_tied_weights_share_the_embedding_and_save_it_once():
    model = GPT(tiny(tie_weights=True), VOCAB)
    untied = GPT(tiny(), VOCAB)
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(untied) - n(model) == VOCAB * 16
    assert not any(name.startswith("lm_head") for name in model.state_dict())


def test_residual_projections_get_the_depth_scaled_init():
    torch.manual_seed(0)
    model = GPT(ModelConfig(block_size=8, n_layer=8, n_head=4, n_embd=256), VOCAB)
    proj_std = model.blocks[0].ff.proj.weight.std().item()
    up_std = model.blocks[0].ff.up.weight.std().item()
    assert up_std == pytest.approx(0.02, rel=0.05)
    assert proj_std == pytest.approx(0.02 / 4, rel=0.05)


@pytest.mark.parametrize("preset", ["cpu", "micro", "cortexcraft", "shakespeare-char", "gpt1-lecture", "gpt2-small"])
def test_parameter_count_matches_a_built_model(preset):
    m = build_config(preset).model
    shrunk = m.model_copy(update=dict(n_layer=1, n_embd=m.n_head * 4, d_ff=None if m.d_ff is None else 24))
    assert parameter_count(shrunk, 65) == sum(p.numel() for p in GPT(shrunk, 65).parameters())


def test_parameter_count_of_the_largest_preset_needs_no_memory():
    # ~85M parameters: counted on the meta device, so this is instant and allocates nothing.
    assert parameter_count(build_config("gpt2-small").model, 65) > 80_000_000


def test_shapes_that_cannot_work_are_rejected_before_allocation():
    with pytest.raises(CortexCraftError, match="not divisible by n_head"):
        build_config("cpu", ["n_embd=130", "n_head=4"])
    with pytest.raises(CortexCraftError, match="exceeds the positional table"):
        build_config("gpt2-small", ["block_size=2048"])
    # A config built without validation is still checked by the model itself.
    bad = ModelConfig.model_construct(**{**tiny().model_dump(), "n_embd": 15})
    with pytest.raises(CortexCraftError, match="n_head"):
        GPT(bad, VOCAB)
    with pytest.raises(CortexCraftError, match="vocab_size"):
        GPT(tiny(), 0)


def test_a_sequence_longer_than_the_positions_is_refused():
    model = GPT(tiny(), VOCAB)
    with pytest.raises(ValueError, match="exceeds"):
        model(torch.zeros(1, 9, dtype=torch.long))


def rotate_pairs_reference(x: torch.Tensor, position: int, theta: float = 10000.0) -> torch.Tensor:
    """RoPE written the long way: pair (i, i + d/2) turned by position * theta^(-2i/d)."""
    d = x.size(-1)
    out = x.clone()
    for i in range(d // 2):
        angle = position * theta ** (-2 * i / d)
        a, b = x[..., i], x[..., i + d // 2]
        out[..., i] = a * math.cos(angle) - b * math.sin(angle)
        out[..., i + d // 2] = a * math.sin(angle) + b * math.cos(angle)
    return out


def test_rotary_embedding_is_llamas_rotate_half_and_keeps_attention_relative():
    rotary = Rotary(head_dim=8, positions=16, theta=10000.0)
    torch.manual_seed(0)
    q, k = torch.randn(1, 1, 1, 8), torch.randn(1, 1, 1, 8)
    for pos in (0, 3, 15):
        torch.testing.assert_close(apply_rotary(q, *rotary(pos, 1)), rotate_pairs_reference(q, pos))
    # A query at position m and a key at n score the same as at m + s and n + s.
    score = lambda m, n: (apply_rotary(q, *rotary(m, 1)) * apply_rotary(k, *rotary(n, 1))).sum()  # noqa: E731
    torch.testing.assert_close(score(5, 2), score(12, 9))
    assert "cos" not in GPT(tiny(pos_encoding="rope"), VOCAB).state_dict()


def test_rope_model_scores_the_same_text_the_same_at_any_cache_offset():
    # RoPE attention depends only on relative positions, so the same window gives the same logits
    # at whatever absolute offset it starts (with a learned position table it would not).
    torch.manual_seed(0)
    model = GPT(tiny(pos_encoding="rope", normalization="rmsnorm", qk_norm=True), VOCAB).eval()
    idx = torch.randint(0, VOCAB, (1, 4))
    first, _ = model(idx)
    cache = KVCache(model.config.n_layer)
    cache.length = 3  # as if three earlier positions had been dropped from the window
    cache.layers = [None] * model.config.n_layer
    shifted, _ = model(idx, cache=cache)
    torch.testing.assert_close(shifted, first, rtol=1e-5, atol=1e-5)


def test_qk_norm_and_rmsnorm_have_learned_gains_and_relu2_squares():
    model = GPT(tiny(normalization="rmsnorm", qk_norm=True, activation="relu2", bias=False), VOCAB)
    names = set(model.state_dict())
    assert {"blocks.0.attn.q_norm.weight", "blocks.0.attn.k_norm.weight", "blocks.0.ln1.weight", "ln_f.weight"} <= names
    assert not any(name.endswith(".bias") for name in names)
    assert model.blocks[0].attn.q_norm.weight.shape == (8,)
    x = torch.tensor([-2.0, -0.5, 0.0, 1.5, 3.0])
    torch.testing.assert_close(model.blocks[0].ff.act(x), torch.tensor([0.0, 0.0, 0.0, 2.25, 9.0]))


def test_zero_init_starts_every_block_as_identity_and_the_loss_at_uniform():
    torch.manual_seed(0)
    model = GPT(tiny(zero_init=True, pos_encoding="rope", normalization="rmsnorm"), VOCAB)
    for block in model.blocks:
        assert not block.attn.proj.weight.any() and not block.ff.proj.weight.any()
    assert not model.lm_head.weight.any()
    idx = torch.randint(0, VOCAB, (2, 8))
    _, loss = model(idx, idx)
    assert loss.item() == pytest.approx(math.log(VOCAB), abs=1e-6)
    # The gradient still reaches the head (and through it everything else) on the first step.
    loss.backward()
    assert model.lm_head.weight.grad.abs().sum() > 0


def test_logit_softcap_bounds_the_logits():
    torch.manual_seed(0)
    model = GPT(tiny(logit_softcap=2.0), VOCAB)
    with torch.no_grad():
        model.lm_head.weight.mul_(1000.0)
    logits, _ = model(torch.randint(0, VOCAB, (2, 8)), torch.randint(0, VOCAB, (2, 8)))
    assert logits.abs().max() <= 2.0
    assert logits.abs().max() > 1.9


def test_rope_with_an_odd_head_size_is_refused_with_the_fix():
    with pytest.raises(CortexCraftError, match="pos_encoding=rope needs an even head size"):
        build_config("cpu", ["pos_encoding=rope", "n_embd=132", "n_head=44"])


def sdpa_calls(monkeypatch) -> list:
    """(query length, dropout_p) of every call of torch's fused attention from now on."""
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def recording(*args, **kwargs):
        calls.append((args[0].size(-2), kwargs["dropout_p"]))
        return real(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    return calls


@pytest.mark.parametrize(
    "fields, attention_p",
    [
        (dict(dropout=0.2), 0.2),  # nanoGPT's: one rate everywhere
        (dict(dropout=0.2, attn_dropout=0.0), 0.0),  # the fused CPU attention kernel stays usable
        (dict(dropout=0.0, attn_dropout=0.3), 0.3),
    ],
)
def test_attention_dropout_defaults_to_dropout_and_can_be_set_apart(fields, attention_p, monkeypatch):
    seen = sdpa_calls(monkeypatch)
    torch.manual_seed(0)
    model = GPT(tiny(**fields), VOCAB)
    idx = torch.randint(0, VOCAB, (2, 8))
    model.train()
    first, _ = model(idx)
    assert seen == [(8, attention_p)] * 2
    second, _ = model(idx)
    assert not torch.equal(first, second)  # some dropout is on in training
    model.eval()
    seen.clear()
    assert torch.equal(model(idx)[0], model(idx)[0]) and seen == [(8, 0.0)] * 4


def padded_pair(**fields) -> tuple[GPT, GPT]:
    """The same seed's model unpadded and with 11 vocabulary rows padded to 16."""
    torch.manual_seed(0)
    plain = GPT(tiny(**fields), VOCAB)
    torch.manual_seed(0)
    padded = GPT(tiny(**fields), VOCAB, pad_vocab_to=16)
    return plain, padded


@pytest.mark.parametrize("tied", [False, True])
def test_a_padded_vocabulary_is_the_same_model_with_zero_rows_that_never_leave_it(tied):
    plain, padded = padded_pair(tie_weights=tied)
    assert padded.tok_emb.weight.shape[0] == 16 and (padded.lm_head is None) == tied
    # One seed, one model: the true rows and every other weight are drawn exactly as unpadded.
    assert {k: v.shape for k, v in padded.state_dict().items()} == {k: v.shape for k, v in plain.state_dict().items()}
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(), padded.state_dict().values()))
    assert not padded.tok_emb.weight[VOCAB:].any()
    idx = torch.randint(0, VOCAB, (3, 8))
    (logits_a, loss_a), (logits_b, loss_b) = plain(idx, idx), padded(idx, idx)
    assert logits_b.shape == (3, 8, VOCAB) and padded(idx)[0].shape == (3, 1, VOCAB)
    torch.testing.assert_close(logits_b, logits_a)
    torch.testing.assert_close(loss_b, loss_a)
    # True-vocabulary state dicts (old checkpoints, HF weights) load into a padded model and back.
    padded.load_state_dict(plain.state_dict())
    plain.load_state_dict(padded.state_dict())
    assert padded.tok_emb.weight.shape[0] == 16 and not padded.tok_emb.weight[VOCAB:].any()


def test_padding_rows_get_no_gradient_and_the_optimizer_state_dict_holds_the_true_vocabulary():
    from cortexcraft.model import keep_true_vocabulary_in

    plain, padded = padded_pair(tie_weights=False)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=0.1, weight_decay=0.1) for m in (plain, padded)]
    keep_true_vocabulary_in(padded, optimizers[1])
    idx = torch.randint(0, VOCAB, (3, 8))
    for _ in range(3):
        for model, optimizer in zip((plain, padded), optimizers):
            model(idx, idx)[1].backward()
            optimizer.step()
            optimizer.zero_grad()
    assert not padded.tok_emb.weight[VOCAB:].any() and not padded.lm_head.weight[VOCAB:].any()
    saved = optimizers[1].state_dict()
    assert {tuple(s["exp_avg"].shape) for s in saved["state"].values()} == {
        tuple(s["exp_avg"].shape) for s in optimizers[0].state_dict()["state"].values()
    }
    # Either way round: a padded run's state resumes unpadded (on CPU) and an unpadded one padded (on GPU).
    fresh = torch.optim.AdamW(plain.parameters(), lr=0.1)
    fresh.load_state_dict(saved)
    fresh_padded = torch.optim.AdamW(padded.parameters(), lr=0.1)
    keep_true_vocabulary_in(padded, fresh_padded)
    fresh_padded.load_state_dict(optimizers[0].state_dict())
    moments = fresh_padded.state[padded.tok_emb.weight]["exp_avg"]
    assert moments.shape[0] == 16 and not moments[VOCAB:].any()
    torch.testing.assert_close(moments[:VOCAB], optimizers[0].state[plain.tok_emb.weight]["exp_avg"])


def test_short_contexts_under_cpu_autocast_attend_in_bf16_like_the_fp32_flash_kernel(monkeypatch):
    import cortexcraft.model as model_module

    calls = sdpa_calls(monkeypatch)
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[4]), VOCAB)
    idx = torch.randint(0, VOCAB, (3, 8))

    def logits_and_grads():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(idx, idx)
        loss.backward()
        return logits.float(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    short, short_grads = logits_and_grads()
    assert calls == []  # every layer took the bf16 path
    monkeypatch.setattr(model_module, "CPU_SHORT_CONTEXT", 4)
    flash, flash_grads = logits_and_grads()
    assert calls == [(8, 0.0)] * 2
    torch.testing.assert_close(short, flash, rtol=0.05, atol=0.05)
    for a, b in zip(short_grads, flash_grads):
        torch.testing.assert_close(a, b, rtol=0.1, atol=0.02)


def test_the_bf16_attention_is_causal_applies_attention_dropout_and_matches_the_kv_cache():
    torch.manual_seed(0)
    model = GPT(tiny(**VARIANTS[4], attn_dropout=0.3), VOCAB)
    idx = torch.randint(0, VOCAB, (2, 8))
    changed = idx.clone()
    changed[:, 5] = (idx[:, 5] + 1) % VOCAB
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.train()
        assert not torch.equal(model(idx, idx)[0], model(idx, idx)[0])
        model.eval()
        full, _ = model(idx, idx)
        assert torch.equal(full[:, :5], model(changed, changed)[0][:, :5])
        cache = KVCache(model.config.n_layer)
        model(idx[:, :3], cache=cache)
        for t in range(3, 8):
            cached, _ = model(idx[:, t : t + 1], cache=cache)
            torch.testing.assert_close(cached[:, 0].float(), full[:, t].float(), rtol=0.05, atol=0.05)
