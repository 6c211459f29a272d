"""A model registry on disk: every trained model becomes a version, one version is the champion.

Layout of ``MODELS_DIR/<name>/`` (``MODELS_DIR`` is ``DATA_DIR/models``)::

    champion.json        {"version": "v2", "since": ..., "reason": ..., "previous": ["v1"]}
    .lock                held (``locks.FileLock``) while the champion pointer is read and changed
    versions/v1/
      version.json       what the version is: run dir, step, config, data fingerprint and revision,
                         code version, tokenizer hash, losses, retraining policy, promotion decision
      vocab.txt ...      the tokenizer, so a version directory is a self-contained run directory
      checkpoints/step_N/  the run's best checkpoint, hard-linked (copied across file systems)

A version directory is built under a temporary name and renamed to the next free ``vN``, so
concurrent registrations get distinct numbers and a version exists complete or not at all.
Checkpoint files are never rewritten in place, so hard links stay valid when the run moves on.
``champion.json`` is replaced atomically; ``previous`` is the stack ``rollback`` pops.

Promotion: a challenger replaces the champion only when its val loss beats the champion's on the
same held-out set (the challenger's whole val split; the champion is re-evaluated on it) by more
than ``margin`` nats. When the two vocabularies differ the champion cannot read the challenger's
tokens: then each model's val loss on its own val split is compared in bits per character (bits
per token for BPE), with the same margin, and the decision says so.
"""
from __future__ import annotations

import logging
import math
import os
import re
import shutil
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import atomic_write_json, build_dir, read_json
from cortexcraft.locks import FileLock, describe_holder, lock_holder

log = logging.getLogger(__name__)

MODELS_SUBDIR = "models"
VERSION_FILE = "version.json"
CHAMPION_FILE = "champion.json"
POLICIES = ("fresh", "continue", "finetune", "auto")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
_VERSION = re.compile(r"^v([1-9][0-9]*)$")


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def models_dir_of(data_dir: str | os.PathLike) -> Path:
    """Where the registry of a data directory lives."""
    return Path(data_dir) / MODELS_SUBDIR


def data_identity(shards_dir: str | os.PathLike, revision: dict[str, Any] | None = None) -> dict[str, Any]:
    """What a model was trained on, from its shard directory's manifest: corpus fingerprint, source,
    tokenizer hash; ``revision`` is the corpus manifest's revision summary, when known."""
    from cortexcraft.sources import describe_revision

    manifest = read_json(Path(shards_dir) / "manifest.json")
    return {"fingerprint": manifest["source"]["fingerprint"], "source": manifest["source"]["spec"],
            "vocab_sha256": manifest["tokenizer"]["sha256"], "shards_dir": str(Path(shards_dir).resolve()),
            "revision": revision, "revision_text": describe_revision(revision) if revision else None}


def check_name(name: str) -> str:
    if not _NAME.match(name or ""):
        raise CortexCraftError(
            f"model name {name!r} is not valid; use letters, digits, '.', '_' and '-' (e.g. cpu-shakespeare)"
        )
    return name


def parse_ref(ref: str) -> tuple[str, str]:
    """``NAME``, ``NAME@champion`` or ``NAME@vN`` -> (name, "champion" | "vN")."""
    name, _, which = ref.partition("@")
    which = which or "champion"
    if which != "champion" and not _VERSION.match(which):
        raise CortexCraftError(f"{ref!r}: the part after @ must be champion or a version like v3")
    return check_name(name), which


def model_dir(models_dir: str | os.PathLike, name: str) -> Path:
    return Path(models_dir) / check_name(name)


def _number(version: str) -> int:
    return int(_VERSION.match(version).group(1))


def list_models(models_dir: str | os.PathLike) -> list[str]:
    root = Path(models_dir)
    return sorted(p.name for p in root.iterdir() if (p / "versions").is_dir()) if root.is_dir() else []


def list_versions(models_dir: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """Every complete version's record, oldest first."""
    root = model_dir(models_dir, name) / "versions"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _VERSION.match(p.name) and (p / VERSION_FILE).is_file()]
    return [read_json(p / VERSION_FILE) for p in sorted(found, key=lambda p: _number(p.name))]


def version_dir(models_dir: str | os.PathLike, name: str, version: str) -> Path:
    return model_dir(models_dir, name) / "versions" / version


def read_champion(models_dir: str | os.PathLike, name: str) -> dict[str, Any] | None:
    path = model_dir(models_dir, name) / CHAMPION_FILE
    return read_json(path) if path.is_file() else None


def require_model(models_dir: str | os.PathLike, name: str) -> None:
    if not list_versions(models_dir, name):
        known = ", ".join(list_models(models_dir)) or "none yet"
        raise CortexCraftError(
            f"no model {name!r} in {models_dir} (models: {known}); train one with "
            f"`cortexcraft pipeline --model {name}` or check --data-dir"
        )


def resolve(models_dir: str | os.PathLike, ref: str) -> tuple[Path, dict[str, Any]]:
    """``NAME[@champion|@vN]`` -> (version directory, usable as a run directory, and its record)."""
    name, which = parse_ref(ref)
    require_model(models_dir, name)
    if which == "champion":
        champion = read_champion(models_dir, name)
        if champion is None:
            raise CortexCraftError(
                f"model {name!r} has no champion; promote a version with `cortexcraft models promote {name}@vN`"
            )
        which = champion["version"]
    path = version_dir(models_dir, name, which)
    if not (path / VERSION_FILE).is_file():
        raise CortexCraftError(f"model {name!r} has no version {which}; see `cortexcraft models list {name}`")
    return path, read_json(path / VERSION_FILE)


def _locked(models_dir: str | os.PathLike, name: str) -> FileLock:
    """The held lock that serialises changes of one model's champion; a wait names the holder."""
    lock = FileLock(model_dir(models_dir, name) / ".lock")
    if not lock.try_acquire():
        log.info("waiting for model %r, which %s is changing", name, describe_holder(lock_holder(lock.path)))
        lock.acquire()
    return lock


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def register(
    models_dir: str | os.PathLike,
    name: str,
    run_dir: str | os.PathLike,
    *,
    data: dict[str, Any],
    code_version: str,
    policy: dict[str, Any],
    summary: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    """Register the best checkpoint of a training run (``summary``, the result of
    ``cortexcraft.train.train`` into ``run_dir``) as the next version of ``name``, scored on the
    whole val split of the data it was trained on.

    ``data`` is ``data_identity`` of that data, ``policy`` how the model was trained (a
    ``plan_retrain`` result). A checkpoint that is already a version of ``name`` is not registered
    again (found by path without loading anything, else by weights): returns (record, created).
    Registrations of one model are serialised, so two runs of one model never make two versions.
    """
    with _locked(models_dir, name):
        return _register(
            models_dir, name, run_dir, data=data, code_version=code_version, policy=policy, summary=summary
        )


def _register(
    models_dir: str | os.PathLike,
    name: str,
    run_dir: str | os.PathLike,
    *,
    data: dict[str, Any],
    code_version: str,
    policy: dict[str, Any],
    summary: dict[str, Any],
) -> tuple[dict[str, Any], bool]:
    known = list_versions(models_dir, name)
    if summary.get("checkpoint_best"):
        best = str(Path(summary["checkpoint_best"]).resolve())
        for record in known:
            if record["checkpoint"] == best:
                return record, False

    from cortexcraft.checkpoint import MODEL_FILE, resolve_checkpoint
    from cortexcraft.tokenizer import load_tokenizer
    from cortexcraft.evaluate import evaluate_run

    run_dir = Path(run_dir)
    checkpoint, state = resolve_checkpoint(run_dir, "best")
    model_sha = state["sha256"][MODEL_FILE]
    for record in known:
        if record["model_sha256"] == model_sha:
            return record, False
    root = model_dir(models_dir, name) / "versions"
    root.mkdir(parents=True, exist_ok=True)
    # Registrations of a model hold its lock, so the next number cannot be taken meanwhile.
    version = f"v{max((_number(p.name) for p in root.iterdir() if _VERSION.match(p.name)), default=0) + 1}"
    with build_dir(root / version) as tmp:
        target = tmp / "checkpoints" / checkpoint.name
        target.mkdir(parents=True)
        for file in checkpoint.iterdir():
            _link_or_copy(file, target / file.name)
        load_tokenizer(run_dir).save(tmp)
        val = evaluate_run(tmp, data["shards_dir"])
        bits = val["val_loss"] / math.log(2)
        record = {
            "name": name,
            "version": version,
            "created": now(),
            "run_dir": str(run_dir.resolve()),
            "checkpoint": str(checkpoint.resolve()),
            "step": state["step"],
            "tokens_seen": state["tokens_seen"],
            "model_sha256": model_sha,
            "config": state["config"],
            "vocab_size": state["vocab_size"],
            "data": data,
            "code_version": code_version,
            "policy": policy,
            "val_loss": val["val_loss"],
            "val_tokens": val["tokens"],
            "bits_per_char": val["bits_per_char"],
            "bits_per_token": bits,
            "train_loss": summary.get("final_train_loss"),
            "train_best_val_loss": summary.get("best_val_loss"),
            "decision": None,
        }
        atomic_write_json(tmp / VERSION_FILE, record)
    return record, True


def _set_champion(
    models_dir: str | os.PathLike, name: str, version: str, reason: str, previous: list[str]
) -> dict[str, Any]:
    pointer = {"version": version, "since": now(), "reason": reason, "previous": previous}
    atomic_write_json(model_dir(models_dir, name) / CHAMPION_FILE, pointer)
    return pointer


def decide(models_dir: str | os.PathLike, name: str, version: str, margin: float) -> tuple[dict[str, Any], bool]:
    """Promote ``version`` if it beats the champion by more than ``margin``; record the decision
    in the version. Returns (decision, made now): a version decided once keeps its decision."""
    from cortexcraft.evaluate import evaluate_run

    with _locked(models_dir, name):
        path = version_dir(models_dir, name, version)
        record = read_json(path / VERSION_FILE)
        if record.get("decision"):
            return record["decision"], False
        pointer = read_champion(models_dir, name)
        challenger = record["val_loss"]
        decision = {
            "version": version,
            "margin": margin,
            "challenger_val_loss": challenger,
            "decided": now(),
            "champion_before": pointer["version"] if pointer else None,
        }
        if pointer is None:
            decision.update(
                promoted=True,
                champion_val_loss=None,
                rule="first version",
                message=f"promoted {version}: first version of {name} (val {challenger:.4f})",
            )
        else:
            champion_dir, champion = resolve(models_dir, f"{name}@{pointer['version']}")
            if champion["data"]["vocab_sha256"] == record["data"]["vocab_sha256"]:
                champion_val = evaluate_run(champion_dir, record["data"]["shards_dir"])["val_loss"]
                ours, theirs, unit = challenger, champion_val, "val"
                rule = f"same held-out set: {version}'s val split, champion {pointer['version']} re-evaluated on it"
            else:
                champion_val = champion["val_loss"]
                per = (
                    "char" if record["bits_per_char"] is not None and champion["bits_per_char"] is not None else "token"
                )
                ours, theirs, unit = record[f"bits_per_{per}"], champion[f"bits_per_{per}"], f"bits/{per}"
                rule = (
                    f"vocabularies differ ({champion['vocab_size']} vs {record['vocab_size']} tokens): "
                    f"{unit} of each model on its own val split"
                )
            promoted = ours < theirs - margin
            verdict = f"promoted {version}" if promoted else "not promoted"
            decision.update(
                promoted=promoted,
                champion_val_loss=champion_val,
                rule=rule,
                message=f"{verdict}: {unit} {ours:.4f} vs champion {pointer['version']} {theirs:.4f}"
                + (f" (margin {margin:g})" if margin else ""),
            )
        if decision["promoted"]:
            previous = (pointer["previous"] + [pointer["version"]]) if pointer else []
            _set_champion(models_dir, name, version, decision["message"], previous)
        decision["champion_after"] = version if decision["promoted"] else decision["champion_before"]
        atomic_write_json(path / VERSION_FILE, dict(record, decision=decision))
        return decision, True


def promote(models_dir: str | os.PathLike, ref: str, reason: str = "promoted by hand") -> dict[str, Any]:
    """Make ``NAME@vN`` the champion, whatever its losses."""
    name, which = parse_ref(ref)
    if which == "champion":
        raise CortexCraftError(f"say which version to promote: {name}@vN (see `cortexcraft models list {name}`)")
    resolve(models_dir, ref)
    with _locked(models_dir, name):
        pointer = read_champion(models_dir, name)
        if pointer and pointer["version"] == which:
            return pointer
        previous = (pointer["previous"] + [pointer["version"]]) if pointer else []
        return _set_champion(models_dir, name, which, reason, previous)


def rollback(models_dir: str | os.PathLike, ref: str) -> dict[str, Any]:
    """``NAME``: make the previous champion the champion again. ``NAME@vN``: go back to vN, an
    earlier champion (later champions are dropped from the stack)."""
    name, which = parse_ref(ref)
    with _locked(models_dir, name):
        pointer = read_champion(models_dir, name)
        if pointer is None or not pointer["previous"]:
            raise CortexCraftError(
                f"model {name!r} has no earlier champion to roll back to; use `cortexcraft models promote {name}@vN`"
            )
        stack = pointer["previous"]
        target = stack[-1] if which == "champion" else which
        if target not in stack:
            raise CortexCraftError(
                f"{target} was never a champion of {name!r} before {pointer['version']} "
                f"(earlier champions: {', '.join(stack)}); use `cortexcraft models promote {name}@{target}`"
            )
        return _set_champion(
            models_dir, name, target, f"rolled back from {pointer['version']}", stack[: stack.index(target)]
        )


def history_rows(models_dir: str | os.PathLike, name: str) -> list[dict[str, Any]]:
    """One row per version, oldest first: what ``models list`` prints and the history artifact shows."""
    pointer = read_champion(models_dir, name)
    champion = pointer["version"] if pointer else None
    rows = []
    for r in list_versions(models_dir, name):
        decision = r.get("decision") or {}
        rows.append(
            {
                "version": r["version"],
                "champion": r["version"] == champion,
                "created": r["created"],
                "policy": r["policy"]["mode"],
                "parent": r["policy"].get("parent"),
                "steps": r["step"],
                "val_loss": round(r["val_loss"], 4),
                "bits_per_char": round(r["bits_per_char"], 4) if r["bits_per_char"] is not None else None,
                "data": r["data"]["fingerprint"][:12],
                "revision": r["data"].get("revision_text"),
                "promoted": decision.get("promoted"),
                "decision": decision.get("message"),
            }
        )
    return rows


def plan_retrain(
    models_dir: str | os.PathLike,
    name: str,
    requested: str,
    shards_dir: str | os.PathLike,
    model_config: dict[str, Any],
) -> dict[str, Any]:
    """How to train the next challenger of ``name`` on the shards in ``shards_dir`` under policy
    ``requested``: ``{"requested", "mode": fresh|continue|finetune, "parent", "init_checkpoint",
    "init_step", "init_model_sha256", "reason"}``.

    ``auto`` is ``continue`` when the data is the champion's, ``finetune`` when it changed; both
    need a champion of the same model shape and vocabulary. ``finetune`` and ``auto`` fall back to
    ``fresh`` (saying why) when that is not so; an explicit ``continue`` is an error instead."""
    from cortexcraft.checkpoint import shape_changes

    if requested not in POLICIES:
        raise CortexCraftError(f"retraining policy {requested!r} is unknown; use one of {', '.join(POLICIES)}")
    plan = {
        "requested": requested,
        "mode": "fresh",
        "parent": None,
        "init_checkpoint": None,
        "init_step": None,
        "init_model_sha256": None,
    }
    if requested == "fresh":
        return dict(plan, reason="fresh: trained from scratch")
    pointer = read_champion(models_dir, name) if list_versions(models_dir, name) else None
    if pointer is None:
        if requested == "continue":
            raise CortexCraftError(
                f"--retrain continue: model {name!r} has no champion to continue; "
                f"train one first (--retrain fresh or auto)"
            )
        return dict(plan, reason=f"{requested}: model {name!r} has no champion yet, so trained from scratch")
    champion_dir, champion = resolve(models_dir, f"{name}@{pointer['version']}")
    data = data_identity(shards_dir)
    same_data = champion["data"]["fingerprint"] == data["fingerprint"]
    mode = ("continue" if same_data else "finetune") if requested == "auto" else requested
    problems = shape_changes(champion["config"]["model"], model_config)
    if champion["data"]["vocab_sha256"] != data["vocab_sha256"]:
        problems.append(f"vocabulary changed ({champion['vocab_size']} tokens before)")
    if problems:
        if mode == "continue" and requested == "continue":
            raise CortexCraftError(
                f"--retrain continue: champion {pointer['version']} of {name!r} cannot be continued "
                f"({'; '.join(problems)}); use --retrain finetune or fresh"
            )
        return dict(
            plan,
            reason=f"{requested}: champion {pointer['version']} is not compatible "
            f"({'; '.join(problems)}), so trained from scratch",
        )
    (checkpoint,) = (champion_dir / "checkpoints").iterdir()
    why = "data unchanged" if same_data else "data changed"
    return dict(
        plan,
        mode=mode,
        parent=pointer["version"],
        init_checkpoint=str(checkpoint),
        init_step=champion["step"],
        init_model_sha256=champion["model_sha256"],
        reason=f"{requested}: {mode} from champion {pointer['version']} (step {champion['step']:,}; {why})",
    )
