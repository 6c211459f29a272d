"""Continuous batching (cortexcraft.batched_decode): rows at their own positions, joining and leaving
between tokens, windows sliding past block_size, give bitwise the logits and tokens that
`generate` gives each sequence alone, for every model option."""
from __future__ import annotations

import itertools

import pytest
import torch

from cortexcraft.batched_decode import KVSlots, Row, decode_step, full_pass, next_logits, rowwise_linear
from cortexcraft.config import ModelConfig
from cortexcraft.generate import generate, sample_next
from cortexcraft.model import GPT, KVCache

VOCAB = 50
OPTIONS = {
    "learned-layernorm-bias": {},
    "learned-no-bias": {"bias": False},
    "rope-rmsnorm-qknorm-relu2": {"pos_encoding": "rope", "normalization": "rmsnorm", "qk_norm": True,
                                  "activation": "relu2", "bias": False},
    "sinusoidal-post-norm-gelu": {"pos_encoding": "sinusoidal", "norm": "post", "activation": "gelu"},
    "tied-softcap-gelu-tanh": {"tie_weights": True, "logit_softcap": 5.0, "activation": "gelu_tanh"},
    "tied-rope-no-bias": {"tie_weights": True, "bias": False, "pos_encoding": "rope"},
}


def random_model(options: dict, block_size: int = 16, n_embd: int = 32, n_layer: int = 2, seed: int = 0) -> GPT:
    """Weights far from their initialisation (zero-init, unit gains), so every layer matters."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(block_size=block_size, n_layer=n_layer, n_head=2, n_embd=n_embd, **options), VOCAB).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3) if param.dim() > 1 else param.uniform_(0.5, 1.5)
    return model


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape", [(32, 96), (128, 65), (384, 1152)])
def test_rowwise_linear_gives_each_row_what_a_batch_of_one_gets(shape, threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(1)
        layer = torch.nn.Linear(*shape)
        x = torch.randn(16, 1, shape[0])
        alone = torch.cat([layer(x[i:i + 1]) for i in range(16)])
        assert torch.equal(rowwise_linear(x, layer.weight, layer.bias), alone)
        no_bias = torch.cat([x[i:i + 1] @ layer.weight.t() for i in range(16)])
        assert torch.equal(rowwise_linear(x, layer.weight), no_bias)
    finally:
        torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", OPTIONS)
def test_a_batched_step_gives_every_row_the_logits_of_the_model_alone(name):
    model = random_model(OPTIONS[name])
    prompts = [torch.randint(0, VOCAB, (1, n)).tolist()[0] for n in (1, 3, 7, 12)]
    slots = KVSlots(model, len(prompts))
    rows = [Row(p, slots) for p in prompts]
    caches = [KVCache(model.config.n_layer) for _ in prompts]
    with torch.inference_mode():
        for row, cache, prompt in zip(rows, caches, prompts):
            alone, _ = model(torch.tensor([prompt]), cache=cache)
            assert torch.equal(full_pass(model, row), alone[:, -1, :])
        for _ in range(3):  # three batched steps; the rows sit at positions 1..14
            for row in rows:
                row.append(int(torch.randint(0, VOCAB, ())))
            batched = decode_step(model, rows)
            for i, (row, cache) in enumerate(zip(rows, caches)):
                alone, _ = model(torch.tensor([[row.tokens[-1]]]), cache=cache)
                assert torch.equal(batched[i:i + 1], alone[:, -1, :]), f"row {i}"


def run_batched(model: GPT, requests: list[dict]) -> list[list[int]]:
    """Generate every request through next_logits, each joining the batch at its own step and
    leaving after its own number of tokens; returns the new tokens of each."""
    slots = KVSlots(model, len(requests))
    rows = [Row(r["prompt"], slots) for r in requests]
    generators = [torch.Generator().manual_seed(r["seed"]) for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    step = 0
    with torch.inference_mode():
        while any(len(out) < r["tokens"] for r, out in zip(requests, outputs)):
            live = [i for i, r in enumerate(requests) if r["join"] <= step and len(outputs[i]) < r["tokens"]]
            if live:
                logits = next_logits(model, [rows[i] for i in live])
                for j, i in enumerate(live):
                    request = requests[i]
                    token = int(sample_next(logits[j:j + 1], request["temperature"], request.get("top_k"),
                                            request.get("top_p"), generators[i]))
                    rows[i].append(token)
                    outputs[i].append(token)
                    if len(outputs[i]) == request["tokens"]:
                        rows[i].release()
            step += 1
    return outputs


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["learned-layernorm-bias", "rope-rmsnorm-qknorm-relu2", "tied-softcap-gelu-tanh"])
def test_rows_joining_and_leaving_at_any_step_generate_what_generate_does_alone(name):
    model = random_model(OPTIONS[name])
    torch.manual_seed(2)
    requests = [  # block_size 16: the 40-token answers slide their window three times
        {"prompt": torch.randint(0, VOCAB, (5,)).tolist(), "join": 0, "tokens": 40, "temperature": 0, "seed": 0},
        {"prompt": torch.randint(0, VOCAB, (1,)).tolist(), "join": 0, "tokens": 9, "temperature": 0.8, "seed": 7},
        {"prompt": torch.randint(0, VOCAB, (30,)).tolist(), "join": 3, "tokens": 25, "temperature": 1.0, "seed": 11,
         "top_k": 5},
        {"prompt": torch.randint(0, VOCAB, (16,)).tolist(), "join": 4, "tokens": 30, "temperature": 0.7, "seed": 3,
         "top_p": 0.9},
        {"prompt": torch.randint(0, VOCAB, (2,)).tolist(), "join": 20, "tokens": 12, "temperature": 0, "seed": 0},
    ]
    batched = run_batched(model, requests)
    for request, tokens in zip(requests, batched):
        generator = torch.Generator().manual_seed(request["seed"])
        alone = generate(model, torch.tensor([request["prompt"]]), request["tokens"], request["temperature"],
                         request.get("top_k"), request.get("top_p"), generator)
        assert tokens == alone[0, len(request["prompt"]):].tolist()


@pytest.mark.usefixtures("one_thread")
def test_the_cache_grows_past_its_first_capacity_up_to_the_block_and_slots_are_reused():
    model = random_model({}, block_size=160, n_embd=16, n_layer=1)
    slots = KVSlots(model, 2)
    row = Row([1, 2, 3], slots)
    tokens, capacities = [], []
    with torch.inference_mode():
        for _ in range(200):
            token = int(next_logits(model, [row]).argmax())
            row.append(token)
            tokens.append(token)
            capacities.append(slots.capacity)
        alone = generate(model, torch.tensor([[1, 2, 3]]), 200, temperature=0)
    assert tokens == alone[0, 3:].tolist()
    assert [c for c, _ in itertools.groupby(capacities)] == [64, 128, 160]
    taken = row.slot
    row.release()
    assert slots.take() == taken  # free again
