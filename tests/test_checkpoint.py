import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from cortexcraft.checkpoint import (
    CheckpointError, latest_checkpoint, list_checkpoints, load_model_state, read_checkpoint_state, resolve_checkpoint,
)
from cortexcraft.generate import generate_from_run
from cortexcraft.metrics import read_metrics
from cortexcraft.train import train
from tiny_runs import ONE_THREAD_ENV, TINY, make_data_dir, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

# Dropout on, so exact resume also needs the restored RNG state; a cosine schedule, so it needs the step.
RESUME_SETTINGS = ["dropout=0.1", "max_iters=60", "keep_last=10"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("ckpt"))


def losses(run_dir: Path) -> list[tuple]:
    return [(r["step"], r["train_loss"], r["val_loss"], r["lr"], r["tokens_seen"]) for r in read_metrics(run_dir)]


def test_a_run_killed_with_sigkill_resumes_to_bitwise_identical_weights(data_dir, tmp_path):
    config = tiny_config("cpu", *RESUME_SETTINGS)
    reference = tmp_path / "uninterrupted"
    train(config, data_dir, reference)

    killed = tmp_path / "killed"
    cmd = [sys.executable, "-m", "cortexcraft", "train", "--data", str(data_dir), "--out", str(killed),
           "--preset", "cpu"] + [arg for s in TINY + RESUME_SETTINGS for arg in ("--set", s)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ONE_THREAD_ENV)
    first = killed / "checkpoints" / "step_00000010" / "state.json"
    deadline = time.monotonic() + 60
    while not first.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the training process ended before it could be killed"
    interrupted_at = read_checkpoint_state(list_checkpoints(killed)[-1])["step"]
    assert 10 <= interrupted_at < 60

    summary = train(config, data_dir, killed)
    assert summary["resumed_from_step"] >= 10 and summary["steps"] == 60

    final_a = load_model_state(resolve_checkpoint(reference, "last")[0])
    final_b = load_model_state(resolve_checkpoint(killed, "last")[0])
    assert final_a.keys() == final_b.keys()
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert losses(killed) == losses(reference)


def test_muon_and_the_speedrun_model_resume_bitwise_from_a_middle_checkpoint(data_dir, tmp_path):
    # Both optimizers' states (AdamW moments, Muon momentum buffers, NorMuon's neuron RMS) must come
    # back exactly.
    config = tiny_config("cpu", "max_iters=40", "keep_last=10", "optimizer=muon", "muon_normalize=true",
                         "muon_momentum_warmup_iters=30", "lr_schedule=wsd", "pos_encoding=rope",
                         "normalization=rmsnorm", "activation=relu2", "qk_norm=true", "zero_init=true",
                         "tie_weights=false", "logit_softcap=30", "dropout=0.1")
    reference = tmp_path / "uninterrupted"
    train(config, data_dir, reference)
    resumed = tmp_path / "resumed"
    train(config, data_dir, resumed)
    for later in list_checkpoints(resumed)[2:]:
        shutil.rmtree(later)  # as if the run had died after step 20
    summary = train(config, data_dir, resumed)
    assert summary["resumed_from_step"] == 20 and summary["steps"] == 40
    state = read_checkpoint_state(resolve_checkpoint(resumed, "last")[0])
    assert set(state["optimizers"]) == {"optimizer", "muon"}
    final_a = load_model_state(resolve_checkpoint(reference, "last")[0])
    final_b = load_model_state(resolve_checkpoint(resumed, "last")[0])
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert losses(resumed) == losses(reference)


def test_a_damaged_checkpoint_is_named_and_the_previous_good_one_is_used(data_dir, tmp_path, caplog):
    run = tmp_path / "run"
    config = tiny_config("cpu", "max_iters=30", "keep_last=5")
    train(config, data_dir, run)
    newest = list_checkpoints(run)[-1]
    assert newest.name == "step_00000030"
    model_file = newest / "model.safetensors"
    model_file.write_bytes(model_file.read_bytes()[:100])  # truncated

    with caplog.at_level(logging.WARNING):
        path, state = latest_checkpoint(run)
    assert path.name == "step_00000020" and state["step"] == 20
    assert str(model_file) in caplog.text

    with pytest.raises(CheckpointError, match="step_00000030"):
        generate_from_run(run, checkpoint=newest, max_new_tokens=5)

    # Training the damaged run again continues from step 20 and rewrites step 30 whole.
    summary = train(config, data_dir, run)
    assert summary["resumed_from_step"] == 20
    assert read_checkpoint_state(newest)["step"] == 30
    assert [r["step"] for r in read_metrics(run)] == [0, 10, 20, 30]


def test_garbage_state_json_and_leftover_temp_dirs_are_skipped(data_dir, tmp_path):
    run = tmp_path / "run"
    train(tiny_config("cpu", "max_iters=20"), data_dir, run)
    (run / "checkpoints" / "step_00000020" / "state.json").write_text("{not json")
    leftover = run / "checkpoints" / ".step_00000030.x1y2z3.tmp"  # a killed writer's, unlocked
    leftover.mkdir()
    assert latest_checkpoint(run)[1]["step"] == 10
    summary = train(tiny_config("cpu", "max_iters=30"), data_dir, run)
    assert summary["resumed_from_step"] == 10 and summary["steps"] == 30
    assert not leftover.exists()


def test_only_the_last_k_and_the_best_checkpoint_are_kept(data_dir, tmp_path):
    run = tmp_path / "run"
    summary = train(tiny_config("cpu", "max_iters=50", "keep_last=2"), data_dir, run)
    names = [p.name for p in list_checkpoints(run)]
    best = Path(summary["checkpoint_best"]).name
    assert names[-2:] == ["step_00000040", "step_00000050"]
    assert set(names) == {"step_00000040", "step_00000050", best}
    assert read_checkpoint_state(resolve_checkpoint(run, "best")[0])["val_loss"] == summary["best_val_loss"]


def test_a_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="no valid checkpoint"):
        resolve_checkpoint(tmp_path, "best")
    with pytest.raises(CheckpointError, match="does not exist"):
        resolve_checkpoint(tmp_path, tmp_path / "nope")


# A child process, so its peak resident set is this save's alone: 64 MiB of weights plus an
# optimizer state of the same size, then one checkpoint of them.
SAVE_PEAK_CHILD = """
import resource, sys, torch
from cortexcraft.checkpoint import read_checkpoint_state, save_checkpoint
weights = {"w": torch.ones(16 << 20)}
optimizer = {"state": {0: {"step": 3, "exp_avg": torch.full((16 << 20,), 0.5)}}, "param_groups": [{"params": [0]}]}
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
path = save_checkpoint(sys.argv[1], 7, weights, {"optimizer": optimizer}, [{"cpu": torch.get_rng_state()}], {})
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before, read_checkpoint_state(path)["step"])
"""


def test_writing_a_checkpoint_holds_no_second_copy_of_its_tensors_in_memory(tmp_path):
    result = subprocess.run([sys.executable, "-c", SAVE_PEAK_CHILD, str(tmp_path / "run")], env=ONE_THREAD_ENV,
                            capture_output=True, text=True, check=True)
    grown_kib, step = map(int, result.stdout.split())
    # The tensors hold 128 MiB; a serialized copy of them in memory would grow the peak by as much.
    assert step == 7 and grown_kib < 32 << 10, f"peak resident set grew {grown_kib:,} KiB while saving"
    model = load_model_state(tmp_path / "run" / "checkpoints" / "step_00000007")
    assert torch.equal(model["w"], torch.ones(16 << 20))


@pytest.mark.parametrize("tied", ["false", "true"])
def test_a_gpu_padded_vocabulary_checkpoints_the_true_vocabulary_and_resumes_bitwise(
    data_dir, tmp_path, monkeypatch, tied
):
    import cortexcraft.train as train_module
    from safetensors.torch import load_file

    config = tiny_config(
        "cpu", "max_iters=30", "keep_last=10", "dropout=0.1", "zero_init=false", "dtype=float32", f"tie_weights={tied}"
    )
    unpadded = tmp_path / "unpadded"
    train(config, data_dir, unpadded)
    monkeypatch.setattr(train_module, "vocab_multiple", lambda device: 128)  # as on CUDA
    reference, resumed = tmp_path / "padded", tmp_path / "resumed"
    train(config, data_dir, reference)
    train(config, data_dir, resumed)
    for later in list_checkpoints(resumed)[1:]:
        shutil.rmtree(later)  # as if the run had died after step 10
    assert train(config, data_dir, resumed)["resumed_from_step"] == 10

    last = resolve_checkpoint(reference, "last")[0]
    vocab = read_checkpoint_state(last)["vocab_size"]
    assert vocab < 128 and load_model_state(last)["tok_emb.weight"].shape[0] == vocab
    # The optimizer moments too: every tensor has the shape an unpadded run saves.
    padded_state = load_file(str(last / "training.safetensors"))
    plain_state = load_file(str(resolve_checkpoint(unpadded, "last")[0] / "training.safetensors"))
    assert {k: t.shape for k, t in padded_state.items()} == {k: t.shape for k, t in plain_state.items()}
    final_a, final_b = load_model_state(last), load_model_state(resolve_checkpoint(resumed, "last")[0])
    assert all(torch.equal(final_a[k], final_b[k]) for k in final_a)
    assert losses(resumed) == losses(reference)
    # Padding changes the head's matmul shape, not the maths: the same run to within float rounding.
    for padded_record, plain_record in zip(read_metrics(reference), read_metrics(unpadded)):
        assert padded_record["val_loss"] == pytest.approx(plain_record["val_loss"], rel=1e-4)

    # A checkpoint of a padded (GPU) run resumes unpadded (CPU).
    monkeypatch.undo()
    more = config.model_copy(update={"train": config.train.model_copy(update={"max_iters": 40})})
    assert train(more, data_dir, reference)["steps"] == 40


def test_deterministic_mode_is_on_while_training_and_off_afterwards(data_dir, tmp_path):
    seen = []
    train(
        tiny_config("cpu", "max_iters=10", "deterministic=true"),
        data_dir,
        tmp_path / "run",
        on_eval=lambda record: seen.append(torch.are_deterministic_algorithms_enabled()),
    )
    assert seen and all(seen) and not torch.are_deterministic_algorithms_enabled()
