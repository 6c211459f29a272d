"""Checkpoints: everything needed to resume training exactly, without pickling objects.

Layout of a run directory (written by ``cortexcraft.train.train``)::

    RUN_DIR/
      run.json                     the run config, data directory and device, written at start
      vocab.txt | tokenizer files  the tokenizer (``Tokenizer.save``), so the run dir is self-contained
      metrics.jsonl                one JSON object per evaluation (step, train_loss, val_loss, lr, ...)
      summary.json                 the result of the last ``train`` call
      checkpoints/
        step_00001000/
          model.safetensors        model weights (the unwrapped model's state_dict: the true
                                   vocabulary's rows, without CUDA's padding rows)
          training.safetensors     optimizer tensors ("<optimizer>.<param>.<name>": "optimizer" is
                                   AdamW, "muon" Muon) and RNG states ("rng.<rank>.cpu",
                                   "rng.<rank>.cuda<i>") of every rank
          state.json               step, val_loss, best_val_loss/best_step, tokens_seen, the config,
                                   vocab_size, each optimizer's scalars and param groups
                                   ("optimizers"), grad-scaler state, and the sha256 of both
                                   .safetensors files

A checkpoint directory is built under a temporary name and renamed into place, so it either
exists complete or not at all; the recorded hashes catch a file damaged afterwards. ``last`` is
the valid checkpoint with the highest step, ``best`` the valid one with the lowest val_loss.
Batches are a pure function of the step, so the step is the data sampler's position.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cortexcraft.config import ModelConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import (TempDir, atomic_write_json, disk_full_is_an_error, ensure_free_space, fsync_dir,
                                fsync_tree, read_json, remove_dead_temps, sha256_file)
from cortexcraft.model import GPT

log = logging.getLogger(__name__)

FORMAT = "cortexcraft-checkpoint/1"
MODEL_FILE = "model.safetensors"
TRAINING_FILE = "training.safetensors"
STATE_FILE = "state.json"
_STEP_DIR = re.compile(r"^step_(\d+)$")


class CheckpointError(CortexCraftError):
    """A checkpoint directory that is missing, incomplete or damaged."""


def checkpoints_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def _tensor_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().cpu().contiguous() for name, t in state.items()}


def _all_finite(tensor: torch.Tensor) -> bool:
    # min and max carry any NaN or inf, in one pass with none of isfinite()'s tensor-sized temporaries.
    return tensor.numel() == 0 or bool(torch.isfinite(torch.stack(torch.aminmax(tensor))).all())


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """``save_file``, which writes from the tensors' own memory (no serialized copy of them in RAM)."""
    try:
        save_file(tensors, path)
    except SafetensorError as exc:
        # safetensors reports I/O failures as text ending in Rust's "(os error N)"; as an OSError a
        # full disk becomes the one-line DiskFullError.
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if code is None:
            raise
        raise OSError(int(code.group(1)), str(exc)) from None


def _split_optimizer_state(
    prefix: str, optimizer_state: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Optimizer tensors go to safetensors (keys under ``prefix``); scalars and param groups go to JSON."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for param_id, param_state in optimizer_state["state"].items():
        for name, value in param_state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{prefix}.{param_id}.{name}"] = value
            else:
                scalars.setdefault(str(param_id), {})[name] = value
    groups = [
        {k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in optimizer_state["param_groups"]
    ]
    return tensors, {"scalars": scalars, "param_groups": groups}


def _join_optimizer_state(prefix: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith(prefix + "."):
            _, param_id, name = key.split(".", 2)
            state.setdefault(int(param_id), {})[name] = value
    for param_id, values in meta["scalars"].items():
        state.setdefault(int(param_id), {}).update(values)
    # JSON turned tuples (betas, Muon's ns_coefficients) into lists; "params" is the one list.
    groups = [
        {k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
        for g in meta["param_groups"]
    ]
    return {"state": state, "param_groups": groups}


def save_checkpoint(
    run_dir: str | os.PathLike,
    step: int,
    model_state: dict[str, torch.Tensor],
    optimizer_states: dict[str, dict[str, Any]],
    rng_states: list[dict[str, torch.Tensor]],
    state: dict[str, Any],
) -> Path:
    """Write ``checkpoints/step_<step>/`` atomically and return its path.

    ``optimizer_states`` maps each optimizer's name (no dots) to its state_dict; ``rng_states``
    holds one dict of RNG state tensors per rank; ``state`` is the JSON part (step, losses,
    config, ...), completed here with the optimizer scalars and file hashes.
    """
    not_finite = next((name for name, t in model_state.items() if t.is_floating_point() and not _all_finite(t)), None)
    if not_finite is not None:
        raise CheckpointError(
            f"refusing to write the checkpoint of step {step} in {run_dir}: weight {not_finite} holds NaN "
            "or inf (training diverged); lower train.lr or set train.grad_clip"
        )
    root = checkpoints_dir(run_dir)
    final = root / f"step_{step:08d}"
    training: dict[str, torch.Tensor] = {}
    optimizers_meta: dict[str, Any] = {}
    for name, optimizer_state in optimizer_states.items():
        tensors, optimizers_meta[name] = _split_optimizer_state(name, optimizer_state)
        training.update(tensors)
    for rank, rank_states in enumerate(rng_states):
        training.update({f"rng.{rank}.{name}": t for name, t in rank_states.items()})
    files = {MODEL_FILE: _tensor_dict(model_state), TRAINING_FILE: _tensor_dict(training)}
    # The whole checkpoint must fit: better refused up front than a half-written directory. The
    # files hold the tensor bytes plus short JSON headers.
    needed = sum(t.nbytes for tensors in files.values() for t in tensors.values())
    ensure_free_space(final, needed)
    temp = TempDir(root, final.name)
    tmp = temp.path
    try:
        with disk_full_is_an_error(
            final, needed, approximate=True, cleanup=lambda: shutil.rmtree(tmp, ignore_errors=True)
        ):
            for name, tensors in files.items():
                _save_tensors(tensors, tmp / name)
            fsync_tree(tmp)
        record = {
            **state,
            "format": FORMAT,
            "step": step,
            "optimizers": optimizers_meta,
            # Read back in chunks, mostly from the page cache: memory stays flat however large the model.
            "sha256": {name: sha256_file(tmp / name) for name in files},
        }
        atomic_write_json(tmp / STATE_FILE, record)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        temp.close()
        raise
    if final.exists():
        # Only a damaged leftover or a re-save of the same step (a resumed run) can be here.
        shutil.rmtree(final)
    os.replace(tmp, final)
    temp.close()
    fsync_dir(root)
    return final


def read_checkpoint_state(ckpt_dir: str | os.PathLike, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's state.json; with ``verify`` also check both files against their hashes."""
    ckpt_dir = Path(ckpt_dir)
    state_path = ckpt_dir / STATE_FILE
    try:
        state = read_json(state_path)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {ckpt_dir} has no {STATE_FILE}; pass a checkpoint directory") from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise CheckpointError(f"checkpoint {state_path} is not valid JSON (damaged); use another checkpoint") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {ckpt_dir} is not a {FORMAT} checkpoint; use another checkpoint")
    if verify:
        for name, expected in state["sha256"].items():
            path = ckpt_dir / name
            if not path.is_file() or sha256_file(path) != expected:
                raise CheckpointError(
                    f"checkpoint file {path} is missing or damaged (hash mismatch); use another checkpoint"
                )
    return state


def verify_run(run_dir: str | os.PathLike) -> list[tuple[Path, dict[str, Any]]]:
    """(path, state) of every checkpoint of a run with every file hash checked; CheckpointError
    naming the first damaged file otherwise."""
    paths = list_checkpoints(run_dir)
    if not paths:
        raise CheckpointError(f"{run_dir} has no checkpoints to verify; pass a run directory (it holds checkpoints/)")
    return [(path, read_checkpoint_state(path, verify=True)) for path in paths]


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Step directories under RUN_DIR/checkpoints, oldest first (validity not checked)."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def valid_checkpoints(run_dir: str | os.PathLike, verify: bool = True) -> list[tuple[Path, dict[str, Any]]]:
    """(path, state) of every checkpoint that verifies, oldest first; damaged ones are logged by name."""
    valid = []
    for path in list_checkpoints(run_dir):
        try:
            valid.append((path, read_checkpoint_state(path, verify)))
        except CheckpointError as exc:
            log.warning("skipping damaged checkpoint: %s", exc)
    return valid


def latest_checkpoint(run_dir: str | os.PathLike) -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest valid checkpoint, or None when the run has none."""
    valid = valid_checkpoints(run_dir)
    return valid[-1] if valid else None


def _best_of(valid: list[tuple[Path, dict[str, Any]]]) -> Optional[tuple[Path, dict[str, Any]]]:
    # A non-finite val loss (from a checkpoint written before this was refused) never counts as best.
    scored = [
        (s["val_loss"], s["step"], p, s)
        for p, s in valid
        if s.get("val_loss") is not None and math.isfinite(s["val_loss"])
    ]
    if not scored:
        return valid[-1] if valid else None
    _, _, path, state = min(scored, key=lambda item: (item[0], item[1]))
    return path, state


def resolve_checkpoint(run_dir: str | os.PathLike, which: str | os.PathLike = "best") -> tuple[Path, dict[str, Any]]:
    """``"best"`` | ``"last"`` | a checkpoint directory (or a file inside one) -> (path, verified state)."""
    if which in ("best", "last"):
        valid = valid_checkpoints(run_dir)
        chosen = _best_of(valid) if which == "best" else (valid[-1] if valid else None)
        if chosen is None:
            raise CheckpointError(
                f"no valid checkpoint in {checkpoints_dir(run_dir)}; "
                f"train the run first (cortexcraft train --out {run_dir})"
            )
        return chosen
    path = Path(which)
    if path.is_file():
        path = path.parent
    if not path.is_dir():
        raise CheckpointError(
            f"checkpoint {path} does not exist; use best, last or a directory under {checkpoints_dir(run_dir)}"
        )
    return path, read_checkpoint_state(path)


def load_model_state(ckpt_dir: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    return load_file(str(Path(ckpt_dir) / MODEL_FILE), device=str(device))


def load_training_state(
    ckpt_dir: str | os.PathLike, state: dict[str, Any]
) -> tuple[dict[str, dict[str, Any]], list[dict[str, torch.Tensor]]]:
    """({optimizer name: state_dict}, per-rank RNG state tensors) of a checkpoint."""
    tensors = load_file(str(Path(ckpt_dir) / TRAINING_FILE))
    rng: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        if key.startswith("rng."):
            _, rank, name = key.split(".", 2)
            rng.setdefault(int(rank), {})[name] = value
    # Checkpoints written before Muon existed hold AdamW's state alone, under "optimizer".
    metas = state["optimizers"] if "optimizers" in state else {"optimizer": state["optimizer"]}
    optimizers = {name: _join_optimizer_state(name, tensors, meta) for name, meta in metas.items()}
    return optimizers, [rng[r] for r in sorted(rng)]


def prune_checkpoints(run_dir: str | os.PathLike, keep_last: int) -> None:
    """Delete all but the newest ``keep_last`` valid checkpoints and the best one, plus any damaged
    checkpoint older than the newest valid checkpoint, and what killed writers left behind.

    Hashes are not re-checked: the trainer just wrote these, and hashing large ones each time is slow.
    """
    valid = valid_checkpoints(run_dir, verify=False)
    keep = {p for p, _ in valid[-keep_last:]}
    best = _best_of(valid)
    if best is not None:
        keep.add(best[0])
    newest = valid[-1][0].name if valid else ""
    for path in list_checkpoints(run_dir):
        if path not in keep and path.name < newest:
            shutil.rmtree(path, ignore_errors=True)
    remove_dead_temps(checkpoints_dir(run_dir))


def load_model(
    run_dir: str | os.PathLike, checkpoint: str | os.PathLike = "best", device: str | torch.device = "cpu"
) -> tuple[GPT, dict]:
    """The model of a run's checkpoint, in eval mode on ``device``, and the checkpoint's state."""
    path, state = resolve_checkpoint(run_dir, checkpoint)
    return model_from_checkpoint(path, state, device), {**state, "path": str(path)}


def model_from_checkpoint(path: Path, state: dict, device: str | torch.device = "cpu") -> GPT:
    """The model of the checkpoint at ``path`` with its (already verified) ``state``, in eval mode."""
    model = GPT(ModelConfig.model_validate(state["config"]["model"]), state["vocab_size"])
    model.load_state_dict(load_model_state(path))
    log.info("loaded %s (step %d, val loss %s)", path, state["step"], state.get("val_loss"))
    return model.to(device).eval()


def shape_changes(saved_model: dict[str, Any], wanted_model: dict[str, Any]) -> list[str]:
    """Model settings that differ between two configs, as "name old -> new". Dropout does not
    change any tensor shape; every other model field does or changes the maths."""
    return [
        f"{k} {saved_model.get(k)!r} -> {wanted_model[k]!r}"
        for k in wanted_model
        if k != "dropout" and saved_model.get(k) != wanted_model[k]
    ]
