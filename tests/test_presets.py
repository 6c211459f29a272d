import json

import pytest

from cortexcraft.cli import main
from cortexcraft.config import build_config, preset_names
from cortexcraft.metrics import read_metrics
from cortexcraft.train import train
from tiny_runs import make_data_dir, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

FEATURES = ("pos_encoding", "activation", "norm", "tie_weights", "bias")


def test_every_seed_has_a_preset_plus_ours():
    assert set(preset_names()) == {"cortexcraft", "shakespeare-char", "gpt1-lecture", "gpt2-small", "micro", "cpu"}


def test_preset_features_match_their_seed_projects():
    models = {name: build_config(name).model for name in preset_names()}
    assert (models["cortexcraft"].n_layer, models["cortexcraft"].n_head, models["cortexcraft"].n_embd) == (1, 1, 400)
    assert models["cortexcraft"].norm == "post"
    assert models["shakespeare-char"].norm == "pre" and models["shakespeare-char"].dropout == 0.2
    gpt2 = build_config("gpt2-small")
    assert (gpt2.model.pos_encoding, gpt2.model.activation, gpt2.model.norm, gpt2.model.ff_width) == (
        "sinusoidal",
        "gelu",
        "post",
        3072,
    )
    assert gpt2.train.max_epochs == 10 and gpt2.train.lr_schedule == "cosine" and gpt2.train.grad_clip == 1.0
    assert gpt2.data.special_tokens == ["<pad>", "<unk>", "<bos>", "<eos>"]
    assert build_config("micro").data.val_fraction == 0.2 and build_config("gpt1-lecture").train.eval_interval == 500


@pytest.mark.parametrize("preset", ["cortexcraft", "shakespeare-char", "gpt1-lecture", "gpt2-small", "micro", "cpu"])
def test_each_preset_shrunk_trains_and_its_loss_goes_down(preset, tmp_path, request):
    original = build_config(preset)
    data_cfg = original.data
    if preset == "cortexcraft":
        # Seed 000 reads its character vocabulary from OpenWebText's vocab.txt.
        data_cfg = data_cfg.model_copy(update={"vocab_file": str(request.getfixturevalue("openwebtext_vocab_path"))})
    data_dir = make_data_dir(tmp_path, data_cfg)
    # gpt2-small trains by epochs: a fraction of one over this small corpus is ~40 steps.
    length = ["max_epochs=0.2"] if original.train.max_epochs else ["max_iters=40"]
    config = tiny_config(preset, "eval_interval=1000", "checkpoint_interval=1000", *length)
    if preset == "cortexcraft":
        config = config.model_copy(update={"model": config.model.model_copy(update={"n_head": 1})})
    assert {f: getattr(config.model, f) for f in FEATURES} == {f: getattr(original.model, f) for f in FEATURES}
    summary = train(config, data_dir, tmp_path / "run")
    first, last = read_metrics(tmp_path / "run")[0], read_metrics(tmp_path / "run")[-1]
    assert first["step"] == 0 and last["step"] == summary["steps"] >= 30
    assert last["val_loss"] < first["val_loss"] - 0.05


def test_gpt2_small_evaluates_and_checkpoints_at_gpu_intervals():
    # On a GPU a step of this preset takes a fraction of a second. An eval batch (forward only) is
    # about a third of a training step's work, so evals stay under 7% of the run; a periodic
    # checkpoint (~1 GB of weights and AdamW moments) comes every few evals, not at each.
    train_cfg = build_config("gpt2-small").train
    eval_batches = 2 * train_cfg.eval_iters  # train and val
    assert eval_batches / 3 <= 0.07 * train_cfg.eval_interval * train_cfg.grad_accum
    assert train_cfg.checkpoint_interval >= 5 * train_cfg.eval_interval
    assert train_cfg.eval_iters >= 100  # an estimate worth its cost at this scale


def test_presets_command_lists_every_preset_with_its_parameter_count(capsys):
    assert main(["presets"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()[1:]}
    assert set(rows) == set(preset_names())
    assert int(rows["gpt2-small"].replace(",", "")) > 80_000_000
    assert int(rows["cpu"].replace(",", "")) < 2_000_000
    assert main(["presets", "--show", "micro"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["n_layer"] == 4 and shown["preset"] == "micro"
