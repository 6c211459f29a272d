"""Device and autocast dtype selection."""
import pytest
import torch

from cortexcraft import device as device_module
from cortexcraft.device import select_dtype
from cortexcraft.errors import CortexCraftError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    assert select_dtype(CPU, "auto") == expected


def test_an_explicit_dtype_wins_over_auto(monkeypatch):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: True)
    assert select_dtype(CPU, "float32") == torch.float32


def test_float16_on_cpu_is_refused_with_the_fix():
    with pytest.raises(CortexCraftError, match="dtype=bfloat16 or float32"):
        select_dtype(CPU, "float16")


def test_cpu_bf16_autocast_loss_is_close_to_fp32_with_finite_gradients():
    from cortexcraft.config import ModelConfig
    from cortexcraft.model import GPT

    torch.manual_seed(0)
    model = GPT(ModelConfig(n_layer=2, n_head=2, n_embd=32, block_size=16), 20)
    idx = torch.randint(0, 20, (3, 16))
    _, fp32_loss = model(idx, idx)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, bf16_loss = model(idx, idx)
    bf16_loss.backward()
    assert abs(bf16_loss.item() - fp32_loss.item()) < 0.05
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
