"""GPU check: what a first GPU run must prove, in one script of at most 5 minutes on one H100.

1. CUDA training through ``cortexcraft.train.train`` runs with bf16 autocast, fused AdamW, flash
   attention (read from the profiler's op and kernel names) and torch.compile (graphs compiled,
   graph breaks, and no recompilation once the first training interval and evaluation are done).
2. Tokens/s and MFU at GPT-2-small shape (124M parameters, block 1024, batch 12, bf16, compiled):
   ours against nanoGPT's own ``train.py`` at the same shape, on the same synthetic tokens, in the
   same run. nanoGPT's files are copied in at run time from ``--nanogpt DIR`` and never committed.
3. Resume after SIGKILL: a ``cortexcraft train`` process killed after a checkpoint and run again
   ends bitwise equal to an uninterrupted run (``deterministic=true``, see README "GPUs").

It runs from source on the GPU machine we can borrow (torch 2.11 + CUDA 13, Python 3.12, no
pydantic, no network): missing wheels travel with the tree. Preparation, where pip reaches PyPI::

    python bench/gpu_check.py --fetch-wheels                 # pydantic & co. for CPython 3.12 into bench/gpu_wheels/
    git clone https://github.com/karpathy/nanoGPT bench/nanogpt    # or any copy of its train.py, model.py,
                                                                   # configurator.py

Both folders are git-ignored: carry them to the GPU machine (the device tool's ``carry``), then::

    python3 bench/gpu_check.py --nanogpt bench/nanogpt --out DIR      # exit status 0 when every check passes

``--cpu-smoke`` runs the same phases on CPU at a tiny shape (no compile) in well under a minute:
``tests/test_gpu_check.py`` does, so everything but the GPU itself is tested without one.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pickle
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Optional

REPO = Path(__file__).resolve().parent.parent
WHEELS = REPO / "bench" / "gpu_wheels"
# What the GPU machine's Python lacks of our imports (it has torch, numpy, safetensors, tokenizers,
# PyYAML): pydantic and what pydantic needs; typing_extensions too, for a release recent enough.
CARRIED = ("pydantic", "pydantic_core", "annotated-types", "typing-inspection", "typing_extensions")
WHEEL_PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64")
NANOGPT_FILES = ("train.py", "model.py", "configurator.py")
# Dense bf16 tensor-core peaks (vendor data sheets), for MFU.
PEAK_BF16_FLOPS = (
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989.4e12),
    ("H200", 989.4e12),
    ("GH200", 989.4e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10", 125e12),
)
# Synthetic tokens are drawn as these code points (one character per token id): all encodable,
# in id order, below the surrogates.
FIRST_CODE_POINT = 0x100


def fetch_wheels() -> None:
    """Download the carried packages, at the versions constraints.txt pins, as CPython 3.12 wheels."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        name, sep, version = line.partition("==")
        if sep:
            pins[re.sub(r"[-_.]+", "-", name.strip().lower())] = version.strip()
    wanted = [f"{name}=={pins[re.sub(r'[-_.]+', '-', name.lower())]}" for name in CARRIED]
    WHEELS.mkdir(parents=True, exist_ok=True)
    platforms = [arg for p in WHEEL_PLATFORMS for arg in ("--platform", p)]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--python-version",
            "3.12",
            "--implementation",
            "cp",
            *platforms,
            "-d",
            str(WHEELS),
            *wanted,
        ],
        check=True,
    )
    print(
        f"wheels for the GPU machine in {WHEELS.relative_to(REPO)}: "
        f"{', '.join(sorted(p.name for p in WHEELS.glob('*.whl')))}"
    )


def use_carried_wheels() -> Optional[Path]:
    """Make pydantic importable (here and in child processes): from the environment, or installed
    from bench/gpu_wheels/ into a temporary folder. Returns that folder, or None."""
    try:
        import pydantic  # noqa: F401

        return None
    except ImportError:
        pass
    wheels = sorted(WHEELS.glob("*.whl"))
    if not wheels:
        sys.exit(
            "gpu_check: pydantic is not installed and bench/gpu_wheels/ holds no wheels; run "
            "`python bench/gpu_check.py --fetch-wheels` where pip reaches PyPI and carry bench/gpu_wheels"
        )
    site = Path(tempfile.mkdtemp(prefix="gpu-check-site-"))
    atexit.register(shutil.rmtree, site, ignore_errors=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--target",
            str(site),
            *map(str, wheels),
        ],
        check=True,
        env=dict(os.environ, PIP_ROOT_USER_ACTION="ignore"),
    )
    sys.path.insert(0, str(site))
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))
    return site


@dataclass
class Plan:
    """The shapes and lengths of one check run."""

    device: str
    vocab: int
    tokens: int  # synthetic tokens, train + val
    n_layer: int
    n_head: int
    n_embd: int
    block: int
    batch: int
    steps: int  # timed training steps of each system
    eval_every: int  # ours: an evaluation of one batch per split every this many steps
    warm_iters: int  # nanoGPT: iterations left out of its timing (compilation, settling)
    compile: bool
    nanogpt_dtype: str
    resume_shape: list[str]  # --set overrides of the small model the SIGKILL check trains
    resume_steps: int
    budget_seconds: float

    @property
    def tokens_per_step(self) -> int:
        return self.batch * self.block


GPU_PLAN = Plan(
    device="cuda",
    vocab=50257,
    tokens=4_000_000,
    n_layer=12,
    n_head=12,
    n_embd=768,
    block=1024,
    batch=12,
    steps=200,
    eval_every=25,
    warm_iters=20,
    compile=True,
    nanogpt_dtype="bfloat16",
    resume_shape=["n_layer=4", "n_head=4", "n_embd=256", "block_size=256", "batch_size=8"],
    resume_steps=60,
    budget_seconds=280,
)
CPU_SMOKE_PLAN = Plan(
    device="cpu",
    vocab=300,
    tokens=100_000,
    n_layer=2,
    n_head=2,
    n_embd=64,
    block=64,
    batch=4,
    steps=40,
    eval_every=10,
    warm_iters=5,
    compile=False,
    nanogpt_dtype="float32",
    resume_shape=["n_layer=1", "n_head=2", "n_embd=32", "block_size=16", "batch_size=8", "threads=1"],
    resume_steps=30,
    budget_seconds=120,
)


@dataclass
class Check:
    name: str
    status: str  # pass | FAIL | skipped
    detail: str
    numbers: dict[str, Any] = field(default_factory=dict)


class Deadline:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


# ---------------------------------------------------------------------------------------------
# data


def synthetic_data(plan: Plan, work: Path) -> tuple[Path, Path, dict[str, Any]]:
    """The same random token stream as our shard directory (through ``cortexcraft.prepare``, a
    character per token id) and as nanoGPT's ``train.bin``/``val.bin``; checks that both hold the
    same ids. Returns (our data dir, nanoGPT's dataset dir, facts)."""
    import numpy as np

    from cortexcraft.config import DataConfig
    from cortexcraft.fileio import read_json
    from cortexcraft.prepare import prepare

    rng = np.random.default_rng(1337)
    # Every id once first, so the sorted character vocabulary gives each character its id.
    stream = np.concatenate([np.arange(plan.vocab), rng.integers(0, plan.vocab, plan.tokens - plan.vocab)]).astype(
        np.uint32
    )
    text = (stream + FIRST_CODE_POINT).astype("<u4").tobytes().decode("utf-32-le")
    (work / "synthetic.txt").write_text(text, encoding="utf-8")
    ours = work / "data"
    prepare(DataConfig(source=str(work / "synthetic.txt"), val_fraction=0.1), ours, cache_dir=work / "downloads")
    manifest = read_json(ours / "manifest.json")
    nanogpt = work / "nanogpt-data"
    nanogpt.mkdir()
    splits = {}
    for split in ("train", "val"):
        ids = np.concatenate(
            [np.fromfile(ours / f["name"], dtype=manifest["dtype"]) for f in manifest["splits"][split]["files"]]
        )
        splits[split] = ids
        ids.astype(np.uint16).tofile(nanogpt / f"{split}.bin")  # nanoGPT reads uint16
    same = manifest["vocab_size"] == plan.vocab and np.array_equal(
        np.concatenate([splits["train"], splits["val"]]), stream
    )
    if plan.vocab != 50257:  # nanoGPT takes GPT-2's padded 50,304 unless its meta.pkl says otherwise
        with open(nanogpt / "meta.pkl", "wb") as handle:
            pickle.dump({"vocab_size": plan.vocab}, handle)
    return (
        ours,
        nanogpt,
        {
            "same_ids": bool(same),
            "train_tokens": int(splits["train"].size),
            "val_tokens": int(splits["val"].size),
            "vocab_size": manifest["vocab_size"],
        },
    )


# ---------------------------------------------------------------------------------------------
# our trainer


def our_settings(plan: Plan, steps: int, eval_every: int, minutes: float) -> list[str]:
    """nanoGPT's GPT-2 (pre-norm, learned positions, GELU, tied head, no biases, no dropout) and its
    optimizer settings, as --set overrides of the gpt2-small preset."""
    return [
        f"block_size={plan.block}",
        f"max_positions={plan.block}",
        f"n_layer={plan.n_layer}",
        f"n_head={plan.n_head}",
        f"n_embd={plan.n_embd}",
        f"d_ff={4 * plan.n_embd}",
        "dropout=0.0",
        "bias=false",
        "norm=pre",
        "normalization=layernorm",
        "pos_encoding=learned",
        "activation=gelu",
        "tie_weights=true",
        f"batch_size={plan.batch}",
        "grad_accum=1",
        "max_epochs=null",
        f"max_iters={steps}",
        "lr=6e-4",
        "min_lr=6e-5",
        "lr_schedule=cosine",
        "warmup_iters=10",
        "weight_decay=0.1",
        "beta2=0.95",
        "grad_clip=1.0",
        f"eval_interval={eval_every}",
        "eval_iters=1",
        "checkpoint_interval=1000000",
        "keep_last=1",
        f"compile={str(plan.compile).lower()}",
        f"device={plan.device}",
        f"max_minutes={minutes:.3f}",
        *(["threads=1"] if plan.device == "cpu" else []),
    ]


def train_ours(
    plan: Plan,
    data: Path,
    run: Path,
    steps: int,
    eval_every: int,
    minutes: float,
    on_eval: Optional[Callable[[dict], None]] = None,
) -> dict[str, Any]:
    from cortexcraft.config import build_config
    from cortexcraft.train import train

    return train(
        build_config("gpt2-small", our_settings(plan, steps, eval_every, minutes)),
        data,
        run,
        on_eval=on_eval,
        progress=False,
    )


def release_gpu_memory(plan: Plan) -> None:
    """Compiled graphs and cached blocks go, so that nanoGPT's process finds the GPU's memory free."""
    import torch

    if plan.device == "cuda":
        torch._dynamo.reset()
        torch.cuda.empty_cache()


def event_names(prof) -> set[str]:
    names = set()
    for event in prof.events():
        names.add(event.name)
        names.update(kernel.name for kernel in getattr(event, "kernels", []))
    return names


def short(names: list[str], limit: int = 3) -> str:
    return "; ".join(n if len(n) < 70 else n[:67] + "..." for n in sorted(names)[:limit])


class CompileWatch:
    """torch.compile's graph count and recompilations (with their reasons), sampled at each evaluation."""

    def __init__(self):
        import logging

        import torch
        from torch._dynamo.utils import counters

        torch._dynamo.reset()
        counters.clear()
        self.counters, self.samples, self.reasons = counters, [], []
        torch._logging.set_logs(recompiles=True)
        watch = self

        class Catch(logging.Handler):
            def emit(self, record: logging.LogRecord) -> None:
                # "Recompiling function ...", "triggered by ...:", then the failed guard(s).
                watch.reasons.append(record.getMessage().strip().splitlines()[-1].strip())

        self.handler = Catch()
        self.logger = logging.getLogger("torch._dynamo.guards.__recompiles")
        self.logger.addHandler(self.handler)

    def sample(self, step: int) -> None:
        self.samples.append(
            {"step": step, "graphs": self.counters["stats"]["unique_graphs"], "recompiles": len(self.reasons)}
        )

    def close(self) -> None:
        import torch

        self.logger.removeHandler(self.handler)
        torch._logging.set_logs()

    def check(self) -> Check:
        """No new graph and no recompilation once the first training interval and its evaluation
        (the eval-mode graph) are compiled."""
        if len(self.samples) < 3:
            return Check("torch.compile", "FAIL", f"only {len(self.samples)} evaluations: too few to see recompiles")
        warm, end = self.samples[1], self.samples[-1]
        late = self.reasons[warm["recompiles"] :]
        breaks = sum(self.counters["graph_break"].values())
        steady = end["graphs"] == warm["graphs"] and not late
        return Check(
            "torch.compile",
            "pass" if steady else "FAIL",
            f"{end['graphs']} graphs, {breaks} graph breaks, {len(self.reasons)} recompiles ({len(late)} after "
            f"step {warm['step']}): {'; '.join(self.reasons)[:300] or 'none'}",
            {
                "graphs": end["graphs"],
                "graph_breaks": breaks,
                "recompiles": len(self.reasons),
                "recompiles_after_warmup": len(late),
            },
        )


def our_run(plan: Plan, data: Path, work: Path, deadline: Deadline) -> tuple[dict[str, Any], list[Check]]:
    """Our trainer at the comparison shape, in this process. Evaluations (one batch per split) mark
    intervals of ``eval_every`` steps: the first holds the compilation, the profiler records the
    second (op and kernel names), and the median of the others is the steady tokens/s."""
    from torch.profiler import ProfilerActivity, profile, schedule

    on_gpu = plan.device == "cuda"
    watch = CompileWatch() if plan.compile else None
    names: set[str] = set()
    samples: list[dict] = []
    profiler = profile(
        activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_gpu else []),
        schedule=schedule(wait=1, warmup=1, active=1, repeat=1),
        on_trace_ready=lambda prof: names.update(event_names(prof)),
    )

    def on_eval(record: dict) -> None:
        samples.append({"step": record["step"], "t": time.monotonic(), "loss": record["train_loss"]})
        if watch is not None:
            watch.sample(record["step"])
        profiler.step()

    try:
        with profiler:
            summary = train_ours(plan, data, work / "ours", plan.steps, plan.eval_every, deadline.left() / 90, on_eval)
    finally:
        if watch is not None:
            watch.close()
        release_gpu_memory(plan)
    rates = [
        (b["step"] - a["step"]) * plan.tokens_per_step / (b["t"] - a["t"])
        for a, b in zip(samples[2:], samples[3:])
        if b["step"] > a["step"]
    ]
    result = {
        "tokens_per_second": statistics.median(rates) if rates else None,
        "intervals": len(rates),
        "first_loss": samples[0]["loss"],
        "last_loss": samples[-1]["loss"],
        "steps": summary["steps"],
        "dtype": summary["dtype"],
    }
    fused = sorted(n for n in names if "fused_adam" in n.lower())
    flash = sorted(n for n in names if "flash" in n.lower())
    bf16_kernels = sorted(n for n in names if "bf16" in n.lower())
    ran = summary["device"].startswith(plan.device) and summary["steps"] == plan.steps
    # On CUDA flash attention runs in 16 bits only: its kernels confirm attention ran under autocast.
    # CPU autocast runs short contexts as bf16 matmuls around a softmax instead (the loss's is a log-softmax).
    if on_gpu:
        attention, attention_ok = flash, any(not n.startswith("aten::") for n in flash)
    else:
        attention = flash + sorted(n for n in names if n == "aten::_softmax")
        attention_ok = bool(attention)
    checks = [
        Check(
            "training on the device",
            "pass" if ran else "FAIL",
            f"{summary['steps']} of {plan.steps} steps on {summary['device']}, dtype {summary['dtype']}, "
            f"{summary['params']:,} parameters",
        ),
        Check(
            "bf16 autocast",
            "pass" if summary["dtype"] == "bfloat16" or not on_gpu else "FAIL",
            f"dtype chosen {summary['dtype']}; {len(bf16_kernels)} kernels named bf16"
            + (f", e.g. {short(bf16_kernels, 1)}" if bf16_kernels else ""),
        ),
        Check("fused AdamW", "pass" if fused else "FAIL", short(fused) or "no fused AdamW op in the profile"),
        Check(
            "attention kernels",
            "pass" if attention_ok else "FAIL",
            short(attention) or "no flash attention kernel (nor, on CPU, an attention softmax) in the profile",
        ),
        watch.check() if watch is not None else Check("torch.compile", "skipped", "compile off"),
    ]
    return result, checks


# ---------------------------------------------------------------------------------------------
# nanoGPT


def nanogpt_throughput(plan: Plan, source: Path, dataset: Path, work: Path, deadline: Deadline) -> dict[str, Any]:
    """nanoGPT's own train.py (copied from ``source``) at the same shape on the same tokens."""
    missing = [name for name in NANOGPT_FILES if not (source / name).is_file()]
    if missing:
        raise RuntimeError(f"--nanogpt {source} lacks {', '.join(missing)}; pass a copy of karpathy/nanoGPT")
    home = work / "nanogpt"
    (home / "data").mkdir(parents=True)
    for name in NANOGPT_FILES:
        shutil.copy2(source / name, home / name)
    shutil.copytree(dataset, home / "data" / "synthetic")
    flags = {
        "dataset": "synthetic",
        "batch_size": plan.batch,
        "gradient_accumulation_steps": 1,
        "block_size": plan.block,
        "n_layer": plan.n_layer,
        "n_head": plan.n_head,
        "n_embd": plan.n_embd,
        "dropout": 0.0,
        "bias": False,
        "learning_rate": 6e-4,
        "min_lr": 6e-5,
        "max_iters": plan.steps,
        "lr_decay_iters": plan.steps,
        "warmup_iters": 10,
        "eval_interval": 10 * plan.steps,
        "eval_iters": 1,
        "log_interval": 1,
        "always_save_checkpoint": False,
        "compile": plan.compile,
        "dtype": plan.nanogpt_dtype,
        "device": plan.device,
        "out_dir": "out",
        "wandb_log": False,
    }
    env = dict(os.environ, OMP_NUM_THREADS="1") if plan.device == "cpu" else dict(os.environ)
    result = subprocess.run(
        [sys.executable, "train.py", *(f"--{k}={v}" for k, v in flags.items())],
        cwd=home,
        env=env,
        capture_output=True,
        text=True,
        timeout=max(deadline.left(), 1),
    )
    if result.returncode != 0:
        raise RuntimeError(f"nanoGPT's train.py exited with {result.returncode}: {result.stderr.strip()[-500:]}")
    iters = [
        (int(m[1]), float(m[2]), float(m[3]) / 1000)
        for m in re.finditer(r"^iter (\d+): loss ([\d.]+), time ([\d.]+)ms", result.stdout, re.MULTILINE)
    ]
    timed = [dt for it, _, dt in iters if it >= plan.warm_iters]
    if not timed:
        raise RuntimeError(f"nanoGPT's train.py printed no timed iterations: {result.stdout.strip()[-500:]}")
    return {
        "tokens_per_second": plan.tokens_per_step / statistics.median(timed),
        "iterations": len(timed),
        "first_loss": iters[0][1],
        "last_loss": iters[-1][1],
    }


# ---------------------------------------------------------------------------------------------
# MFU


def peak_flops(plan: Plan) -> tuple[Optional[float], str]:
    if plan.device != "cuda":
        return None, "cpu"
    import torch

    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_BF16_FLOPS if key in name), None), name


def flops_per_token(plan: Plan) -> float:
    """nanoGPT's estimate (PaLM appendix B): 6N + 12·L·H·Q·T, N without the position table."""
    from cortexcraft.config import build_config
    from cortexcraft.device import vocab_multiple
    from cortexcraft.model import padded_vocab_size, parameter_count

    import torch

    model = build_config("gpt2-small", our_settings(plan, 1, 1, 1.0)).model
    rows = padded_vocab_size(plan.vocab, vocab_multiple(torch.device(plan.device)))
    n = parameter_count(model, rows) - plan.block * plan.n_embd
    return 6 * n + 12 * plan.n_layer * plan.n_head * (plan.n_embd // plan.n_head) * plan.block


# ---------------------------------------------------------------------------------------------
# resume after SIGKILL


def check_resume(plan: Plan, data: Path, work: Path, deadline: Deadline) -> Check:
    """Uninterrupted vs SIGKILLed after a checkpoint and re-run: final weights and losses."""
    import torch

    from cortexcraft.checkpoint import list_checkpoints, load_model_state, resolve_checkpoint
    from cortexcraft.metrics import read_metrics

    settings = [
        *plan.resume_shape,
        "dropout=0.1",
        f"max_iters={plan.resume_steps}",
        "eval_interval=10",
        "eval_iters=2",
        "checkpoint_interval=10",
        "keep_last=20",
        "deterministic=true",
        "compile=false",
        f"device={plan.device}",
        "max_minutes=null",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1") if plan.device == "cpu" else dict(os.environ)

    def command(run: Path) -> list[str]:
        return [
            sys.executable,
            "-m",
            "cortexcraft",
            "train",
            "--data",
            str(data),
            "--out",
            str(run),
            "--preset",
            "cpu",
            *(f"--set={s}" for s in settings),
        ]

    reference, killed = work / "resume-reference", work / "resume-killed"
    subprocess.run(
        command(reference), cwd=REPO, env=env, check=True, capture_output=True, timeout=max(deadline.left(), 1)
    )
    proc = subprocess.Popen(command(killed), cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = killed / "checkpoints" / "step_00000020" / "state.json"
    while not first.exists() and proc.poll() is None and deadline.left() > 0:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        return Check(
            "resume after SIGKILL", "FAIL", f"the run ended (status {proc.returncode}) before it could be killed"
        )
    killed_at = int(list_checkpoints(killed)[-1].name.split("_")[1])
    subprocess.run(command(killed), cwd=REPO, env=env, check=True, capture_output=True, timeout=max(deadline.left(), 1))
    a = load_model_state(resolve_checkpoint(reference, "last")[0])
    b = load_model_state(resolve_checkpoint(killed, "last")[0])
    equal = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    worst = max(((a[k].float() - b[k].float()).abs().max().item() for k in a if k in b), default=float("nan"))
    losses = [[r["train_loss"], r["val_loss"]] for r in read_metrics(reference)] == [
        [r["train_loss"], r["val_loss"]] for r in read_metrics(killed)
    ]
    return Check(
        "resume after SIGKILL",
        "pass" if equal and losses else "FAIL",
        f"killed with its last checkpoint at step {killed_at}, resumed to {plan.resume_steps}: weights "
        f"{'bitwise equal' if equal else f'differ (largest {worst:.3g})'}, losses {'equal' if losses else 'differ'}",
        {"killed_at": killed_at, "bitwise_equal": equal, "largest_difference": worst},
    )


# ---------------------------------------------------------------------------------------------


def run_checks(plan: Plan, nanogpt: Optional[Path], work: Path) -> tuple[list[Check], dict[str, Any]]:
    import torch

    deadline = Deadline(plan.budget_seconds)
    if plan.device == "cuda" and not torch.cuda.is_available():
        return [Check("CUDA device", "FAIL", "torch sees no CUDA GPU; use --cpu-smoke on a machine without one")], {}
    peak, device_name = peak_flops(plan)
    numbers: dict[str, Any] = {
        "device": device_name,
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "peak_bf16_flops": peak,
        "plan": {k: v for k, v in vars(plan).items()},
    }
    t0 = time.monotonic()
    data, dataset, facts = synthetic_data(plan, work)
    checks = [
        Check(
            "same synthetic tokens",
            "pass" if facts["same_ids"] else "FAIL",
            f"{facts['train_tokens']:,} train + {facts['val_tokens']:,} val tokens, "
            f"vocabulary {facts['vocab_size']:,}; "
            f"our shards and nanoGPT's .bin files hold the generated ids: {facts['same_ids']}",
        )
    ]
    numbers["data_seconds"] = round(time.monotonic() - t0, 1)

    def phase(name: str, run: Callable[[], Any]) -> Any:
        start = time.monotonic()
        if deadline.left() <= 5:
            checks.append(Check(name, "FAIL", f"not run: the {plan.budget_seconds:.0f} s budget was used up"))
            return None
        try:
            return run()
        except Exception as exc:  # noqa: BLE001 -- one failed phase is reported, the others still run
            checks.append(Check(name, "FAIL", f"{type(exc).__name__}: {str(exc).strip()[-400:]}"))
            return None
        finally:
            numbers[f"{name}_seconds"] = round(time.monotonic() - start, 1)

    measured = phase("ours", lambda: our_run(plan, data, work, deadline))
    ours = None
    if measured is not None:
        ours, our_checks = measured
        checks += our_checks
    theirs = None
    if nanogpt is None:
        checks.append(Check("nanoGPT comparison", "skipped", "no --nanogpt DIR given"))
    else:
        theirs = phase("nanogpt", lambda: nanogpt_throughput(plan, nanogpt, dataset, work, deadline))
    per_token = flops_per_token(plan)
    for result in (ours, theirs):
        if result is not None and result["tokens_per_second"]:
            result["mfu"] = per_token * result["tokens_per_second"] / peak if peak else None
    numbers.update(ours=ours, nanogpt=theirs, flops_per_token=per_token)
    if ours is not None and ours["tokens_per_second"]:
        ratio = ours["tokens_per_second"] / theirs["tokens_per_second"] if theirs else None
        checks.append(
            Check(
                "throughput",
                "pass",
                f"ours {ours['tokens_per_second']:,.0f} tok/s"
                + (f" (MFU {ours['mfu']:.1%})" if ours.get("mfu") else "")
                + (
                    f", nanoGPT {theirs['tokens_per_second']:,.0f} tok/s"
                    + (f" (MFU {theirs['mfu']:.1%})" if theirs.get("mfu") else "")
                    + f": {ratio:.2f}x"
                    if theirs
                    else ""
                ),
                {"ratio": ratio},
            )
        )
    resume = phase("resume", lambda: check_resume(plan, data, work, deadline))
    if resume is not None:
        checks.append(resume)
    numbers["total_seconds"] = round(plan.budget_seconds - deadline.left(), 1)
    return checks, numbers


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--nanogpt", type=Path, help="a copy of karpathy/nanoGPT (train.py, model.py, configurator.py)")
    parser.add_argument("--out", type=Path, help="also write gpu_check.json here")
    parser.add_argument(
        "--cpu-smoke", action="store_true", help="the same phases on CPU at a tiny shape, without compile"
    )
    parser.add_argument(
        "--fetch-wheels", action="store_true", help="download the wheels the GPU machine lacks into bench/gpu_wheels/"
    )
    parser.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        help="torch.compile both trainers (default: on for the GPU check, off for --cpu-smoke)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder (data, runs) and print its path")
    args = parser.parse_args()
    if args.fetch_wheels:
        fetch_wheels()
        return 0
    carried = use_carried_wheels()
    sys.path.insert(0, str(REPO / "bench"))
    from benchlib import save_results

    plan = CPU_SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    if args.compile is not None:
        plan = replace(plan, compile=args.compile)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-"))
    try:
        checks, numbers = run_checks(plan, args.nanogpt.resolve() if args.nanogpt else None, work)
    finally:
        if args.keep:
            print(f"work folder kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    numbers["carried_wheels"] = str(carried) if carried else None
    print(
        f"\nGPU check on {numbers.get('device', plan.device)} (torch {numbers.get('torch')}, "
        f"Python {numbers.get('python')}, {numbers.get('total_seconds')} s of a {plan.budget_seconds:.0f} s budget)"
    )
    for check in checks:
        print(f"  {check.status:<8} {check.name:<24} {check.detail}")
    payload = {**numbers, "checks": [vars(c) for c in checks]}
    path = save_results("gpu_check" + ("_cpu_smoke" if args.cpu_smoke else ""), payload)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, args.out / path.name)
    return 0 if all(c.status != "FAIL" for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
