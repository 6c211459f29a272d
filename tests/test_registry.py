"""The model registry (versions, champion, promotion on the same held-out set, rollback), the
retraining policies' plans, training from a champion's checkpoint with its own lr segment, and the
`cortexcraft models` / `--model` command line."""
from __future__ import annotations

import json
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cortexcraft import registry
from cortexcraft.cli import main
from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.generate import generate_from_run
from cortexcraft.locks import FileLock
from cortexcraft.prepare import prepare
from cortexcraft.metrics import read_metrics
from cortexcraft.optim import learning_rate
from cortexcraft.train import train
from tiny_runs import make_data_dir, repetitive_text, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
FRESH = {"requested": "fresh", "mode": "fresh", "parent": None, "init_checkpoint": None, "init_step": None,
         "init_model_sha256": None, "reason": "fresh: trained from scratch"}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry")


@pytest.fixture(scope="module")
def data(root) -> Path:
    return make_data_dir(root / "a")


@pytest.fixture(scope="module")
def more_data(root) -> Path:
    """Changed text with the same characters: the vocabulary is the same."""
    return make_data_dir(root / "b", chars=40_000)


@pytest.fixture(scope="module")
def other_vocab(root) -> Path:
    text = root / "other.txt"
    text.write_text(repetitive_text(30_000) + "@#~", encoding="utf-8")
    prepare(DataConfig(source=str(text)), root / "other", cache_dir=root / "downloads")
    return root / "other"


def trained(root: Path, name: str, data_dir: Path, *overrides: str, start_from=None) -> dict:
    return train(tiny_config("cpu", "lr=3e-3", "warmup_iters=2", *overrides), data_dir, root / "runs" / name,
                 start_from=start_from)


def add(models: Path, name: str, summary: dict, data_dir: Path, policy=FRESH, margin=0.0):
    record, created = registry.register(models, name, summary["run_dir"], data=registry.data_identity(data_dir),
                                        code_version="test", policy=policy, summary=summary)
    decision, _ = registry.decide(models, name, record["version"], margin)
    return record, created, decision


def test_learning_rate_segment_is_the_whole_schedule_shifted_not_restretched():
    cfg = tiny_config("cpu", "lr=1e-2", "min_lr=1e-3", "warmup_iters=5", "lr_schedule=cosine").train
    for step in range(0, 40, 3):
        assert learning_rate(100 + step, cfg, 140, start=100) == learning_rate(step, cfg, 40)
    assert learning_rate(100, cfg, 140, start=100) == pytest.approx(1e-2 / 6)  # warmup again
    assert learning_rate(139, cfg, 140, start=100) == pytest.approx(1e-3, rel=0.02)  # decayed by the end


def test_a_run_started_from_a_checkpoint_has_its_own_segment_and_best(root, data):
    base = trained(root, "base", data, "max_iters=30")
    cont = trained(root, "cont", data, "max_iters=50", start_from=base["checkpoint_best"])
    assert cont["segment_start"] == 30 and cont["start_from"] == base["checkpoint_best"]
    history = read_metrics(cont["run_dir"])
    assert [r["step"] for r in history] == [30, 40, 50]
    # The first evaluation scores the starting model: the same loss the base run measured at step 30.
    assert history[0]["val_loss"] == pytest.approx(read_metrics(base["run_dir"])[-1]["val_loss"], abs=1e-5)
    assert history[0]["lr"] == pytest.approx(3e-3 / 3)
    assert cont["best_step"] in (40, 50) and cont["tokens_seen"] == 50 * 8 * 16

    with pytest.raises(
        CortexCraftError, match=r"max_iters 30 is not beyond step 30 of .*; set max_iters to the step to train up to"
    ):
        trained(root, "nowhere", data, "max_iters=30", start_from=base["checkpoint_best"])
    with pytest.raises(
        CortexCraftError, match=r"holds a model with a different shape \(n_embd 32 -> 64\); train from scratch instead"
    ):
        trained(root, "wider", data, "max_iters=40", "n_embd=64", start_from=base["checkpoint_best"])


def test_cli_train_init_from_a_checkpoint(root, data, capsys):
    base = trained(root, "cli-base", data, "max_iters=20")
    out = root / "runs" / "cli-init"
    argv = [
        "train",
        "--data",
        str(data),
        "--out",
        str(out),
        "--start-from",
        base["checkpoint_best"],
        "--max-iters",
        "30",
        *[
            f"--set={o}"
            for o in (
                "n_layer=1",
                "n_embd=32",
                "n_head=2",
                "block_size=16",
                "batch_size=8",
                "eval_iters=4",
                "eval_interval=10",
                "checkpoint_interval=10",
            )
        ],
    ]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["segment_start"] == 20 and summary["steps"] == 30
    wider = [str(root / "runs" / "cli-wider") if a == str(out) else a for a in argv] + ["--set=n_embd=64"]
    assert main(wider) == 2
    assert (
        "holds a model with a different shape (n_embd 32 -> 64); train from scratch instead" in capsys.readouterr().err
    )


def test_promotion_on_the_same_held_out_set_with_a_margin(root, data, more_data):
    models = root / "models"
    weak = trained(root, "weak", data, "max_iters=10")
    v1, created, first = add(models, "m", weak, data)
    assert created and v1["version"] == "v1" and first["promoted"] and first["rule"] == "first version"
    assert add(models, "m", weak, data)[:2] == (registry.resolve(models, "m@v1")[1], False)  # once only
    assert registry.decide(models, "m", "v1", 0.0) == (first, False)  # and decided once

    strong = trained(root, "strong", more_data, "max_iters=60")
    v2, _, decision = add(models, "m", strong, more_data)
    assert decision["promoted"] and registry.read_champion(models, "m")["version"] == "v2"
    assert decision["rule"].startswith("same held-out set: v2's val split, champion v1 re-evaluated on it")
    # The champion was scored on the challenger's val split, not its own.
    assert decision["champion_val_loss"] != v1["val_loss"]
    assert (
        decision["message"]
        == f"promoted v2: val {v2['val_loss']:.4f} vs champion v1 {decision['champion_val_loss']:.4f}"
    )

    worse = trained(root, "worse", more_data, "max_iters=20")
    v3, _, rejected = add(models, "m", worse, more_data)
    assert not rejected["promoted"] and rejected["champion_after"] == "v2"
    assert (
        rejected["message"]
        == f"not promoted: val {v3['val_loss']:.4f} vs champion v2 {rejected['champion_val_loss']:.4f}"
    )
    assert registry.read_json(registry.version_dir(models, "m", "v3") / "version.json")["decision"] == rejected

    better = trained(root, "better", more_data, "max_iters=80")
    v4, _, blocked = add(models, "m", better, more_data, margin=10.0)
    assert v4["val_loss"] < blocked["champion_val_loss"] and not blocked["promoted"]
    assert blocked["message"].endswith("(margin 10)")
    rows = registry.history_rows(models, "m")
    assert [(r["version"], r["champion"], r["promoted"]) for r in rows] == [
        ("v1", False, True),
        ("v2", True, True),
        ("v3", False, False),
        ("v4", False, False),
    ]


def test_different_vocabularies_are_compared_by_the_stated_rule(root, data, other_vocab):
    models = root / "vocab-models"
    add(models, "m", trained(root, "va", data, "max_iters=20"), data)
    record, _, decision = add(models, "m", trained(root, "vb", other_vocab, "max_iters=40"), other_vocab)
    assert decision["rule"] == (
        "vocabularies differ (34 vs 37 tokens): bits/char of each model on its own val split".replace(
            "34", str(registry.resolve(models, "m@v1")[1]["vocab_size"])
        ).replace("37", str(record["vocab_size"]))
    )
    assert decision["message"].startswith(("promoted v2: bits/char ", "not promoted: bits/char "))


def test_plans_of_the_retraining_policies(root, data, more_data, other_vocab):
    models = root / "plan-models"
    model = tiny_config().model.model_dump(mode="json")
    assert (
        registry.plan_retrain(models, "p", "auto", data, model)["reason"]
        == "auto: model 'p' has no champion yet, so trained from scratch"
    )
    with pytest.raises(
        CortexCraftError, match="--retrain continue: model 'p' has no champion to continue; train one first"
    ):
        registry.plan_retrain(models, "p", "continue", data, model)
    summary = trained(root, "planned", data, "max_iters=20")
    add(models, "p", summary, data)

    same = registry.plan_retrain(models, "p", "auto", data, model)
    assert (same["mode"], same["parent"], same["init_step"]) == ("continue", "v1", 20)
    assert Path(same["init_checkpoint"]).parent.parent == registry.version_dir(models, "p", "v1")
    assert same["reason"] == "auto: continue from champion v1 (step 20; data unchanged)"
    assert registry.plan_retrain(models, "p", "auto", more_data, model)["mode"] == "finetune"

    changed = registry.plan_retrain(models, "p", "finetune", other_vocab, model)
    assert changed["mode"] == "fresh" and changed["init_checkpoint"] is None
    assert changed["reason"].startswith("finetune: champion v1 is not compatible (vocabulary changed (")
    with pytest.raises(
        CortexCraftError, match=r"--retrain continue: champion v1 of 'p' cannot be continued \(n_layer 1 -> 2\)"
    ):
        registry.plan_retrain(models, "p", "continue", data, dict(model, n_layer=2))


def test_models_command_line_and_generate_by_model(root, data, capsys):
    models_root = root / "cli"
    models = registry.models_dir_of(models_root)
    first = trained(root, "cli1", data, "max_iters=10")
    second = trained(root, "cli2", data, "max_iters=40")
    add(models, "shake", first, data)
    add(models, "shake", second, data)
    dd = ["--data-dir", str(models_root)]

    assert main(["models", *dd, "list", "shake"]) == 0
    rows = capsys.readouterr().out.splitlines()
    assert rows[0].split()[:6] == ["version", "created", "policy", "steps", "val", "loss"]
    assert rows[1].startswith("  v1 ") and rows[2].startswith("* v2 ") and "promoted v2" in rows[2]
    assert main(["models", *dd, "list"]) == 0 and "shake" in capsys.readouterr().out

    assert main(["models", *dd, "show", "shake"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == "v2" and shown["step"] == 40 and shown["data"]["fingerprint"]

    main(["generate", "--model", "shake@champion", *dd, "--prompt", "ROMEO:", "--max-new-tokens", "30", "--seed", "4"])
    by_model = capsys.readouterr().out
    assert (
        by_model
        == generate_from_run(registry.version_dir(models, "shake", "v2"), prompt="ROMEO:", max_new_tokens=30, seed=4)
        + "\n"
    )
    assert by_model == generate_from_run(second["run_dir"], prompt="ROMEO:", max_new_tokens=30, seed=4) + "\n"

    assert main(["models", *dd, "rollback", "shake"]) == 0
    assert "champion of shake is now v1 (rolled back from v2)" in capsys.readouterr().out
    assert main(["evaluate", "--model", "shake", *dd, "--data", str(data)]) == 0
    assert f"val loss {registry.resolve(models, 'shake@v1')[1]['val_loss']:.4f}" in capsys.readouterr().out
    assert main(["models", *dd, "promote", "shake@v2"]) == 0
    assert registry.read_champion(models, "shake") == {
        **registry.read_champion(models, "shake"),
        "version": "v2",
        "previous": ["v1"],
        "reason": "promoted by hand",
    }

    errors = [
        (
            ["models", *dd, "rollback", "shake@v2"],
            "v2 was never a champion of 'shake' before v2 (earlier champions: v1)",
        ),
        (["models", *dd, "promote", "shake"], "say which version to promote: shake@vN"),
        (["models", *dd, "show", "shake@v9"], "model 'shake' has no version v9; see `cortexcraft models list shake`"),
        (["models", *dd, "list", "nope"], "no model 'nope' in "),
        (
            ["generate", "--model", "shake@latest", *dd],
            "'shake@latest': the part after @ must be champion or a version like v3",
        ),
    ]
    for argv, message in errors:
        assert main(argv) == 2
        assert message in capsys.readouterr().err
    main(["models", *dd, "rollback", "shake"])
    capsys.readouterr()
    assert main(["models", *dd, "rollback", "shake"]) == 2
    assert "model 'shake' has no earlier champion to roll back to" in capsys.readouterr().err


def test_a_version_survives_its_run_directory_moving_on(root, data):
    models = root / "survive"
    summary = trained(root, "survivor", data, "max_iters=20")
    record, _, _ = add(models, "s", summary, data)
    version = registry.version_dir(models, "s", "v1")
    expected = generate_from_run(version, prompt="\n", max_new_tokens=20, seed=1)
    import shutil

    shutil.rmtree(summary["run_dir"])  # the run pruned or deleted: the version holds its own links
    assert generate_from_run(version, prompt="\n", max_new_tokens=20, seed=1) == expected
    ckpt = next((version / "checkpoints").iterdir())
    assert (ckpt / "model.safetensors").stat().st_nlink >= 1
    assert record["bits_per_char"] == pytest.approx(record["val_loss"] / math.log(2))
    assert oct(os.stat(version).st_mode & 0o777) == "0o755"


def test_a_champion_change_that_waits_names_the_process_holding_the_model(tmp_path, caplog):
    models = tmp_path / "models"
    holder = FileLock(registry.model_dir(models, "shake") / ".lock")
    holder.acquire()
    errors = []

    def roll_back():
        try:
            registry.rollback(models, "shake")
        except CortexCraftError as exc:
            errors.append(str(exc))

    named = f"pid {os.getpid()} on {socket.gethostname()}"
    with caplog.at_level(logging.INFO, logger="cortexcraft.registry"):
        waiter = threading.Thread(target=roll_back)
        waiter.start()
        deadline = time.monotonic() + 10
        while named not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.05)
        still_waiting = waiter.is_alive()
        holder.release()
        waiter.join(10)
    assert still_waiting and f"waiting for model 'shake', which {named}" in caplog.text
    assert not waiter.is_alive() and errors and "has no earlier champion" in errors[0]
