"""Device and autocast dtype selection."""
import json
import time

import pytest
import torch

from cortexcraft import device as device_module
from cortexcraft.device import CALIBRATION_FILE, calibrate_cpu_dtype, select_device, select_dtype, time_matmuls
from cortexcraft.errors import CortexCraftError

CPU = torch.device("cpu")


@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float32)])
def test_auto_dtype_on_cpu_is_bf16_only_where_the_cpu_has_it(monkeypatch, native, expected):
    monkeypatch.setattr(device_module, "cpu_has_native_bf16", lambda: native)
    assert select_dtype(CPU, "auto") == expected


@pytest.fixture
def fake_cpu(tmp_path, monkeypatch):
    """Installs a CPU: what torch detects and, when given, a /proc/cpuinfo text."""
    def install(capabilities: dict, proc_cpuinfo: str | None = None) -> None:
        proc = tmp_path / "cpuinfo"
        if proc_cpuinfo is not None:
            proc.write_text(proc_cpuinfo)
        monkeypatch.setattr(device_module, "PROC_CPUINFO", proc)
        monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
        device_module.cpu_info.cache_clear()
    yield install
    device_module.cpu_info.cache_clear()


def test_auto_dtype_follows_the_instruction_sets_torch_detects_without_proc_cpuinfo(fake_cpu):
    fake_cpu({"architecture": "arm64", "cpu_name": "Apple M3", "neon": True, "bf16": True, "sve_max_length": 0})
    assert device_module.cpu_info() == {"model": "Apple M3", "flags": ["bf16", "neon"]}
    assert select_dtype(CPU, "auto") == torch.bfloat16
    fake_cpu({"architecture": "x86_64", "cpu_name": "Intel Core", "avx2": True, "avx512_bf16": False,
              "amx_bf16": False})
    assert select_dtype(CPU, "auto") == torch.float32


def test_the_calibration_key_names_the_cpu_model_of_proc_cpuinfo(fake_cpu, tmp_path):
    fake_cpu({"cpu_name": "AMD EPYC", "avx512_bf16": True},
             "processor\t: 0\nmodel name\t: AMD EPYC 9B14 96-Core Processor\nflags\t\t: fpu avx2\n\nprocessor\t: 1\n")
    result = calibrate_cpu_dtype(SHAPES, fake_timings(10.0, 5.0, []), directory=tmp_path)
    assert result["cpu"] == "AMD EPYC 9B14 96-Core Processor" and device_module.cpu_has_native_bf16()


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


SHAPES = [(2048, 128, 384), (2048, 128, 512)]


def fake_timings(fp32: float, bf16: float, calls: list):
    def measure(shapes, dtype):
        calls.append(dtype)
        return fp32 if dtype == torch.float32 else bf16
    return measure


@pytest.mark.parametrize("fp32, bf16, expected", [
    (10.0, 5.0, "bfloat16"),   # 2x faster: worth it
    (10.0, 9.5, "float32"),    # within the margin: the casts would eat the gain
    (10.0, 40.0, "float32"),   # emulated bf16
])
def test_calibration_picks_bf16_only_when_clearly_faster(tmp_path, fp32, bf16, expected):
    result = calibrate_cpu_dtype(SHAPES, fake_timings(fp32, bf16, []), directory=tmp_path)
    assert result["dtype"] == expected
    assert result["float32_seconds"] == fp32 and result["bfloat16_seconds"] == bf16


def test_calibration_is_measured_once_per_machine_and_shapes(tmp_path, monkeypatch):
    calls: list = []
    first = calibrate_cpu_dtype(SHAPES, fake_timings(10.0, 5.0, calls), directory=tmp_path)
    again = calibrate_cpu_dtype(SHAPES, fake_timings(1.0, 9.0, calls), directory=tmp_path)
    assert again == first and calls == [torch.float32, torch.bfloat16]
    # Other shapes, another torch version or another CPU: measured anew, the old entries kept.
    assert calibrate_cpu_dtype([(64, 64, 64)], fake_timings(1.0, 9.0, calls), directory=tmp_path)["dtype"] == "float32"
    monkeypatch.setattr(device_module.torch, "__version__", "9.9.9")
    assert calibrate_cpu_dtype(SHAPES, fake_timings(1.0, 9.0, calls), directory=tmp_path)["dtype"] == "float32"
    monkeypatch.setattr(device_module, "cpu_info", lambda: {"model": "Other CPU", "flags": ["avx2"]})
    assert calibrate_cpu_dtype(SHAPES, fake_timings(10.0, 5.0, calls), directory=tmp_path)["dtype"] == "bfloat16"
    assert len(calls) == 8
    assert len(json.loads((tmp_path / CALIBRATION_FILE).read_text())) == 4


def test_a_damaged_calibration_cache_is_measured_again_and_rewritten(tmp_path):
    (tmp_path / CALIBRATION_FILE).write_text("{not json")
    calls: list = []
    assert calibrate_cpu_dtype(SHAPES, fake_timings(10.0, 5.0, calls), directory=tmp_path)["dtype"] == "bfloat16"
    assert len(calls) == 2 and len(json.loads((tmp_path / CALIBRATION_FILE).read_text())) == 1


def test_auto_dtype_with_shapes_uses_the_calibration_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("CORTEXCRAFT_CACHE_DIR", str(tmp_path))
    # fp32 measured faster first, so a choice of bf16 afterwards could only come from the measurement.
    monkeypatch.setattr(device_module, "time_matmuls", lambda shapes, dtype: 0.5 if dtype == torch.float32 else 1.0)
    assert select_dtype(CPU, "auto", SHAPES) == torch.float32
    monkeypatch.setattr(device_module, "time_matmuls", lambda shapes, dtype: 1.0 if dtype == torch.float32 else 0.5)
    assert select_dtype(CPU, "auto", SHAPES) == torch.float32  # cached: not measured again
    assert select_dtype(CPU, "auto", [(8, 8, 8)]) == torch.bfloat16


def test_real_matmul_timing_is_positive_and_quick():
    start = time.perf_counter()
    assert time_matmuls([(64, 32, 48)], torch.float32, min_seconds=0.001) > 0
    assert time.perf_counter() - start < 5


CUDA = torch.device("cuda", 0)


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("native, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_auto_dtype_on_cuda_is_bf16_only_where_the_gpu_computes_it_natively(monkeypatch, native, expected):
    # A V100 or T4 reports bf16 support when emulation counts; it must get fp16 and loss scaling.
    monkeypatch.setattr(device_module.torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: native or including_emulation)
    assert select_dtype(CUDA, "auto") == expected
    monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)  # else GradScaler disables itself
    assert device_module.grad_scaler(CUDA, expected).is_enabled() == (expected == torch.float16)


def test_choosing_cuda_turns_on_tf32_matmuls_and_choosing_cpu_does_not(monkeypatch):
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert select_device("cpu") == CPU and torch.get_float32_matmul_precision() == "highest"
        monkeypatch.setattr(device_module.torch.cuda, "is_available", lambda: True)
        assert select_device("auto", local_rank=1) == torch.device("cuda", 1)
        assert torch.get_float32_matmul_precision() == "high"
    finally:
        torch.set_float32_matmul_precision(before)


def test_the_vocabulary_is_padded_on_cuda_only():
    assert device_module.vocab_multiple(CUDA) == 128 and device_module.vocab_multiple(CPU) == 1
    assert device_module.vocab_multiple(torch.device("mps")) == 1


def test_deterministic_mode_sets_a_cublas_workspace_and_restores_torch_afterwards(monkeypatch):
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert not torch.are_deterministic_algorithms_enabled()
    with device_module.deterministic_algorithms(False):
        assert not torch.are_deterministic_algorithms_enabled()
    assert "CUBLAS_WORKSPACE_CONFIG" not in device_module.os.environ
    with device_module.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert device_module.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    assert not torch.are_deterministic_algorithms_enabled()
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # the user's choice stays
    with device_module.deterministic_algorithms(True):
        assert device_module.os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":16:8"
