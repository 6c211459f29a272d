"""Device and precision selection: cuda > mps > cpu, and the autocast dtype each supports.

On CPUs ``dtype=auto`` is decided by measurement: bf16 matmuls are fast where the CPU has bf16
instructions, but how fast depends on the CPU (AMX or not), the library and the matrix shapes. A
one-off calibration times the model's own matmul shapes in fp32 and bf16 (a few ms each) and the
answer is cached per machine in ``~/.cache/cortexcraft/dtype-calibration.json`` (under
``$XDG_CACHE_HOME`` or ``$CORTEXCRAFT_CACHE_DIR`` when set), keyed by CPU model, CPU flags, torch
version and shapes. Delete the file to measure again.
"""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import platform
import time
from contextlib import contextmanager, nullcontext
from functools import lru_cache
from pathlib import Path
from typing import Callable, ContextManager, Iterator, Optional, Sequence

import torch

from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, read_json

log = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            name = "cuda"
        elif torch.backends.mps.is_available():
            name = "mps"
        else:
            name = "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise CortexCraftError("device cuda requested but torch sees no CUDA GPU; use --set device=auto or cpu")
        # TF32 tensor cores for the matmuls that stay in fp32 (dtype=float32 runs, code outside
        # autocast): ~8x an fp32 matmul's speed on Ampere and later, 10 mantissa bits.
        torch.set_float32_matmul_precision("high")
        return torch.device("cuda", local_rank)
    if name == "mps" and not torch.backends.mps.is_available():
        raise CortexCraftError("device mps requested but MPS is not available; use --set device=auto or cpu")
    return torch.device(name)


def select_dtype(device: torch.device, name: str = "auto",
                 matmul_shapes: Optional[Sequence[tuple[int, int, int]]] = None) -> torch.dtype:
    """The autocast dtype: bf16 on GPUs that have it, fp16 on older GPUs; on CPUs bf16 where it is
    measured faster than fp32 at ``matmul_shapes`` (see ``calibrate_cpu_dtype``), or without shapes
    where the CPU computes it natively (AVX-512 BF16, AMX, Arm BF16), else fp32.

    Without native support CPU bf16 is emulated and slower than fp32. With it, bf16 autocast ran the
    cpu preset's shape 1.4x faster per step than fp32, to within 0.01 of its loss per step (bench_train)."""
    if name != "auto":
        dtype = _DTYPES[name]
        if device.type == "cpu" and dtype == torch.float16:
            raise CortexCraftError("dtype float16 is not supported on CPU; use --set dtype=bfloat16 or float32")
        return dtype
    if device.type == "cuda":
        # Without emulation: a V100 or T4 "supports" bf16 only by emulating it, far slower than
        # its fp16 tensor cores, which then run with a GradScaler (see grad_scaler). The current
        # device is this process's GPU (Distributed sets it before the device is chosen).
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and matmul_shapes:
        return _DTYPES[calibrate_cpu_dtype(matmul_shapes)["dtype"]]
    if device.type == "cpu" and cpu_has_native_bf16():
        return torch.bfloat16
    return torch.float32


# bf16 must beat fp32 by this much in the matmuls: casts and fp32 attention eat part of its gain.
BF16_MIN_SPEEDUP = 1.1
CALIBRATION_FILE = "dtype-calibration.json"


def cache_dir() -> Path:
    """Where cortexcraft keeps per-machine measurements."""
    if os.environ.get("CORTEXCRAFT_CACHE_DIR"):
        return Path(os.environ["CORTEXCRAFT_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "cortexcraft"


def cpu_identity() -> dict[str, str]:
    """What makes one machine's timings valid for another: CPU model and flags, torch version."""
    info = cpu_info()
    flags = " ".join(sorted(info["flags"]))
    return {
        "cpu": info["model"],
        "flags_sha256": hashlib.sha256(flags.encode()).hexdigest(),
        "torch": torch.__version__,
    }


def time_matmuls(shapes: Sequence[tuple[int, int, int]], dtype: torch.dtype, min_seconds: float = 0.005) -> float:
    """Best-of-3 seconds for one (m x k) @ (k x n) product of every shape in ``dtype``."""
    operands = [(torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)) for m, k, n in shapes]

    def once() -> None:
        for a, b in operands:
            torch.mm(a, b)

    once()  # warm-up: first calls pick kernels and allocate
    repeats, start = 0, time.perf_counter()
    while time.perf_counter() - start < min_seconds:
        once()
        repeats += 1
    best = (time.perf_counter() - start) / repeats
    for _ in range(2):
        start = time.perf_counter()
        for _ in range(repeats):
            once()
        best = min(best, (time.perf_counter() - start) / repeats)
    return best


def calibrate_cpu_dtype(
    shapes: Sequence[tuple[int, int, int]],
    measure: Optional[Callable[[Sequence[tuple[int, int, int]], torch.dtype], float]] = None,
    directory: Optional[Path] = None,
) -> dict:
    """{"dtype": "bfloat16" | "float32", "float32_seconds", "bfloat16_seconds"} for these matmul
    shapes on this machine: read from the cache, or measured once and cached."""
    identity = {**cpu_identity(), "shapes": sorted([list(s) for s in shapes])}
    key = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()
    path = (directory or cache_dir()) / CALIBRATION_FILE
    try:
        cached = read_json(path)
    except (OSError, ValueError):
        cached = {}
    if not isinstance(cached, dict):
        cached = {}
    if isinstance(cached.get(key), dict) and cached[key].get("dtype") in ("bfloat16", "float32"):
        return cached[key]
    measure = measure or time_matmuls
    fp32 = measure(shapes, torch.float32)
    bf16 = measure(shapes, torch.bfloat16)
    result = {
        "dtype": "bfloat16" if fp32 >= BF16_MIN_SPEEDUP * bf16 else "float32",
        "float32_seconds": fp32,
        "bfloat16_seconds": bf16,
        **identity,
    }
    log.info(
        "dtype calibration: matmuls %.2f ms fp32, %.2f ms bf16 -> %s (cached in %s)",
        1e3 * fp32,
        1e3 * bf16,
        result["dtype"],
        path,
    )
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, {**cached, key: result})
    except OSError as exc:  # a read-only home: measure again next time
        log.warning("could not cache the dtype calibration in %s: %s", path, exc)
    return result


# Where Linux names the exact CPU part; torch's cpuinfo names only the family ("AMD EPYC").
PROC_CPUINFO = Path("/proc/cpuinfo")
# Instruction sets with bf16 arithmetic, as torch names them: x86 AVX-512 BF16 and AMX, Arm BF16 and SVE BF16.
NATIVE_BF16 = {"avx512_bf16", "amx_bf16", "bf16", "sve_bf16"}


@lru_cache(maxsize=1)
def cpu_info() -> dict:
    """{"model": CPU model name, "flags": the instruction sets torch detects, on any OS}. The model
    name is /proc/cpuinfo's, else torch's, else the platform's."""
    capabilities = torch.cpu.get_capabilities()
    model = capabilities.get("cpu_name") or platform.processor() or platform.machine()
    try:
        lines = PROC_CPUINFO.read_text(encoding="utf-8", errors="replace").splitlines()
    except OSError:
        lines = []
    for line in lines:
        key, _, value = line.partition(":")
        if key.strip() == "model name":
            model = value.strip()
            break
    return {"model": model, "flags": sorted(name for name, present in capabilities.items() if present is True)}


def cpu_has_native_bf16() -> bool:
    """Whether the CPU computes bf16 natively (see ``NATIVE_BF16``)."""
    return bool(set(cpu_info()["flags"]) & NATIVE_BF16)


# Tensor-core tiles are multiples of 64 or 128 wide: a head of 50,257 rows leaves the last tile
# ragged, 50,304 fills it (nanoGPT's padding). CPU kernels take any width.
CUDA_VOCAB_MULTIPLE = 128


def vocab_multiple(device: torch.device) -> int:
    """The multiple the model's embedding and head rows are padded to on ``device`` (1: no padding)."""
    return CUDA_VOCAB_MULTIPLE if device.type == "cuda" else 1


# One of the two settings with which cuBLAS gives bitwise-repeatable results (NVIDIA's cuBLAS docs,
# "Results reproducibility"); torch refuses cuBLAS calls in deterministic mode without one.
CUBLAS_DETERMINISTIC_WORKSPACE = ":4096:8"


@contextmanager
def deterministic_algorithms(enabled: bool) -> Iterator[None]:
    """With ``enabled``, torch's deterministic algorithms while inside (an operation with none
    raises), and ``CUBLAS_WORKSPACE_CONFIG`` set unless the user set it. cuBLAS reads it when this
    process makes its first GPU matmul, so enter this before any (``train`` does). Restores the
    previous setting on exit; does nothing without ``enabled``."""
    if not enabled:
        yield
        return
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_DETERMINISTIC_WORKSPACE)
    before = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before[0], warn_only=before[1])


def autocast(device: torch.device, dtype: torch.dtype) -> ContextManager:
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def inference_dtype(device: torch.device) -> torch.dtype:
    """Evaluation and generation: the GPU's autocast dtype; fp32 on CPUs, so that scores and
    samples are exact and the same on every CPU (a KV-cached sample equals an uncached one)."""
    return torch.float32 if device.type == "cpu" else select_dtype(device)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 get a disabled
    scaler, which passes everything through unchanged."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def cpu_compiler_problem() -> Optional[str]:
    """Why torch.compile cannot build CPU kernels here (inductor writes C++ and needs a compiler:
    ``g++``, or ``$CXX``), or None when it can."""
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        get_cpp_compiler()
    except Exception as exc:  # inductor's InvalidCxxCompiler, or a compiler that fails to run
        return str(exc).splitlines()[0]
    return None


def compile_model(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """``torch.compile`` with static shapes; ``model`` itself stays uncompiled.

    On CPU only the transformer blocks are compiled, as one graph that every block reuses: the C++
    compiler's time per kernel dominates there, and a whole-model graph compiles each block's
    kernels again (35 s against 19 s before the `cpu` preset's first step on 2 cores in
    ``bench/bench_limits.py``, at the same time per step). The generated kernels read the thread
    count when they run, so the thread tuner's changes never trigger a recompile. Without a C++
    compiler the model trains uncompiled, with a warning, rather than failing at its first step."""
    if device.type != "cpu":
        return torch.compile(model, dynamic=False)
    if problem := cpu_compiler_problem():
        log.warning("compile=true: %s; training uncompiled (install g++ or set CXX to compile on CPU)", problem)
        return model
    import torch._inductor.config as inductor_config

    inductor_config.cpp.dynamic_threads = True
    # A shallow copy sharing every parameter, with its own table of submodules to swap the blocks in.
    compiled = copy.copy(model)
    compiled._modules = dict(model._modules)
    compiled.blocks = torch.nn.ModuleList(torch.compile(block, dynamic=False) for block in model.blocks)
    return compiled
