import copy
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from cortexcraft.checkpoint import load_model
from cortexcraft.cli import main
from cortexcraft.config import DataConfig, build_config
from cortexcraft.errors import CortexCraftError
from cortexcraft.config import SampleConfig
from cortexcraft.generate import generate_from_run, sample_prompts
from cortexcraft.model import GPT
from cortexcraft.prepare import prepare
from cortexcraft.evaluate import eval_plan, evaluate_run
from cortexcraft.metrics import read_metrics
from cortexcraft.optim import BatchedMuon, Optimizers, learning_rate, max_steps_for
from cortexcraft.tokenizer import BPETokenizer
from cortexcraft.device import compile_model
from cortexcraft.train import compiles, squared_log_normalizer, train
from tiny_runs import make_data_dir, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")
NO_SCALER = torch.amp.GradScaler("cpu", enabled=False)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return make_data_dir(tmp_path_factory.mktemp("train"))


@pytest.fixture(scope="module")
def trained_run(data_dir, tmp_path_factory) -> tuple[Path, dict, list]:
    run = tmp_path_factory.mktemp("trained") / "run"
    records = []
    summary = train(
        tiny_config("cpu", "max_iters=60", "lr=3e-3", "warmup_iters=5"), data_dir, run, on_eval=records.append
    )
    return run, summary, records


def test_summary_metrics_and_callback_describe_the_run(trained_run):
    run, summary, records = trained_run
    assert summary["steps"] == 60 and summary["resumed_from_step"] is None
    assert summary["tokens_seen"] == 60 * 8 * 16
    assert summary["final_val_loss"] == records[-1]["val_loss"]
    assert summary["best_val_loss"] == min(r["val_loss"] for r in records[1:])
    assert Path(summary["checkpoint_best"]).is_dir() and Path(summary["checkpoint_last"]).name == "step_00000060"
    assert json.loads((run / "summary.json").read_text()) == summary
    assert read_metrics(run) == records
    assert [r["step"] for r in records] == [0, 10, 20, 30, 40, 50, 60]
    assert set(records[0]) == {"step", "train_loss", "val_loss", "lr", "tokens_seen", "elapsed_seconds", "max_steps"}
    assert records[-1]["val_loss"] < records[0]["val_loss"] - 0.5
    json.dumps(summary)


def test_generate_from_run_returns_only_the_continuation_and_streams_it(trained_run):
    run, _, _ = trained_run
    pieces = []
    text = generate_from_run(run, prompt="ROMEO:", max_new_tokens=40, seed=3, on_text=pieces.append)
    assert len(text) == 40 and not text.startswith("ROMEO:")
    assert "".join(pieces) == text
    assert generate_from_run(run, prompt="ROMEO:", max_new_tokens=40, seed=3, kv_cache=False) == text
    assert generate_from_run(run, checkpoint="last", prompt="\n", max_new_tokens=5, temperature=0) == generate_from_run(
        run, checkpoint="last", prompt="\n", max_new_tokens=5, temperature=0, seed=9
    )


def test_streaming_bpe_text_decodes_each_id_once_and_joins_to_the_returned_text(tmp_path, monkeypatch):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("ROMEO: 😀 日本 — é 𝔘 ojo\n" * 400, encoding="utf-8")
    prepare(
        DataConfig(source=str(corpus), tokenizer="bpe", vocab_size=270), tmp_path / "data", cache_dir=tmp_path / "cache"
    )
    train(
        tiny_config("cpu", "max_iters=2", "eval_interval=2", "checkpoint_interval=2"),
        tmp_path / "data",
        tmp_path / "run",
    )
    decoded_ids = []
    decode = BPETokenizer.decode
    monkeypatch.setattr(BPETokenizer, "decode", lambda self, ids: decoded_ids.extend(ids) or decode(self, ids))
    pieces = []
    # A nearly untrained model samples byte tokens in any order: split and broken UTF-8 both occur.
    text = generate_from_run(
        tmp_path / "run", prompt="ROMEO:", max_new_tokens=120, temperature=1.5, seed=5, on_text=pieces.append
    )
    assert "".join(pieces) == text and len(decoded_ids) == 120
    assert text == generate_from_run(tmp_path / "run", prompt="ROMEO:", max_new_tokens=120, temperature=1.5, seed=5)


def test_each_report_prompt_is_sampled_with_its_own_seed(trained_run):
    run = trained_run[0]
    sample = SampleConfig(prompts=["\n", "\n", "ROMEO:"], max_new_tokens=30, seed=7)
    samples = sample_prompts(run, sample)
    assert [(prompt, seed) for prompt, seed, _ in samples] == [("\n", 7), ("\n", 8), ("ROMEO:", 9)]
    assert samples[0][2] != samples[1][2]
    assert samples[1][2] == generate_from_run(
        run, prompt="\n", max_new_tokens=30, temperature=sample.temperature, seed=8
    )


def test_prompt_characters_outside_the_vocabulary_are_named(trained_run):
    run, _, _ = trained_run
    with pytest.raises(CortexCraftError, match="Z"):
        generate_from_run(run, prompt="ZZ top", max_new_tokens=5)


def test_evaluate_run_reports_val_loss_and_bits_per_char(trained_run, data_dir):
    run, summary, _ = trained_run
    result = evaluate_run(run, data_dir)
    assert result["checkpoint"] == summary["checkpoint_best"]
    assert result["bits_per_char"] == pytest.approx(result["val_loss"] / math.log(2))
    val_tokens = json.loads((data_dir / "manifest.json").read_text())["splits"]["val"]["tokens"]
    assert result["tokens"] == val_tokens - 1  # every target of the split scored exactly once
    assert abs(result["val_loss"] - summary["best_val_loss"]) < 0.3
    assert evaluate_run(run, data_dir, batches=2)["tokens"] == 2 * 8 * 16


def test_a_finished_run_continues_when_asked_for_more_iterations(trained_run, data_dir, tmp_path):
    run, _, _ = trained_run
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    again = train(tiny_config("cpu", "max_iters=60", "lr=3e-3", "warmup_iters=5"), data_dir, copy)
    assert again["steps"] == 60 and again["stopped_by"] == "already_done" and again["tokens_per_second"] is None
    more = train(tiny_config("cpu", "max_iters=70", "lr=3e-3", "warmup_iters=5"), data_dir, copy)
    assert more["resumed_from_step"] == 60 and more["steps"] == 70
    assert [r["step"] for r in read_metrics(copy)][-2:] == [60, 70]


def test_resume_refuses_a_different_model_shape_and_a_fresh_start_refuses_an_old_run(trained_run, data_dir):
    run, _, _ = trained_run
    with pytest.raises(CortexCraftError, match=r"n_layer 1 -> 2"):
        train(tiny_config("cpu", "max_iters=70", "n_layer=2"), data_dir, run)
    with pytest.raises(CortexCraftError, match="already has checkpoints"):
        train(tiny_config("cpu", "max_iters=70"), data_dir, run, resume=False)


def test_a_vocabulary_mismatch_is_refused(trained_run, tmp_path):
    run, _, _ = trained_run
    other = make_data_dir(tmp_path, DataConfig(special_tokens=["<bos>"]))
    with pytest.raises(CortexCraftError, match="vocab_size"):
        train(tiny_config("cpu", "max_iters=70"), other, run)
    with pytest.raises(CortexCraftError, match="vocab_size"):
        evaluate_run(run, other)


def test_the_time_budget_ends_the_run_with_a_checkpoint(data_dir, tmp_path):
    summary = train(tiny_config("cpu", "max_iters=100000", "max_minutes=0.0001"), data_dir, tmp_path / "run")
    assert summary["stopped_by"] == "max_minutes"
    assert 1 <= summary["steps"] < 100000
    assert Path(summary["checkpoint_last"]).name == f"step_{summary['steps']:08d}"
    assert read_metrics(tmp_path / "run")[-1]["step"] == summary["steps"]


def test_z_loss_pulls_the_log_of_the_softmax_normalizer_toward_zero(data_dir, tmp_path):
    mean_squared_log_normalizer = {}
    for weight in (0.0, 1.0):
        run = tmp_path / f"z{weight}"
        train(tiny_config("cpu", "max_iters=40", "lr=3e-3", "warmup_iters=5", f"z_loss={weight}"), data_dir, run)
        model, _ = load_model(run, "last")
        windows = torch.randint(0, model.vocab_size, (8, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            logits, _ = model(windows, windows)
        mean_squared_log_normalizer[weight] = squared_log_normalizer(logits).item()
    assert mean_squared_log_normalizer[1.0] < 0.25 * mean_squared_log_normalizer[0.0]


def test_cpu_runs_compile_by_default_only_when_the_clock_budget_is_long_enough_to_repay_it():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    preset = build_config("cpu").train
    assert compiles(preset, cpu, preset.max_iters)  # the 5.5-min pipeline default
    assert not compiles(preset, cpu, 200)  # a step cap ends it within a minute
    assert not compiles(preset.model_copy(update={"max_minutes": 1.5}), cpu, preset.max_iters)
    assert not compiles(preset.model_copy(update={"max_minutes": None}), cpu, preset.max_iters)
    assert not compiles(preset.model_copy(update={"compile": False}), cpu, preset.max_iters)
    assert compiles(preset.model_copy(update={"compile": True}), cpu, 10)
    assert compiles(build_config("shakespeare-char").train, cuda, 10)
    assert not compiles(build_config("shakespeare-char").train, cpu, 5000)


def test_without_a_cpu_compiler_the_model_trains_uncompiled_with_a_warning(caplog):
    import torch._inductor.config as inductor_config

    model = torch.nn.Linear(2, 2)
    no_compiler = inductor_config.patch({"cpp.cxx": ("/nonexistent/g++",)})
    with no_compiler, caplog.at_level("WARNING", logger="cortexcraft.device"):
        assert compile_model(model, torch.device("cpu")) is model
    assert "training uncompiled (install g++ or set CXX" in caplog.text


@pytest.mark.slow
def test_a_compiled_cpu_step_matches_the_eager_step_and_the_budget_includes_compiling(data_dir, tmp_path):
    eager = train(tiny_config("cpu", "max_iters=1", "compile=false"), data_dir, tmp_path / "eager")
    # A 0.6 s budget: compiling alone takes longer, so the budget ends the run after its first step.
    compiled = train(tiny_config("cpu", "max_iters=100", "max_minutes=0.01", "compile=true"), data_dir,
                     tmp_path / "compiled")
    assert (eager["compiled"], compiled["compiled"]) == (False, True)
    assert (compiled["steps"], compiled["stopped_by"]) == (1, "max_minutes")
    after_one_step = [read_metrics(tmp_path / run)[-1] for run in ("eager", "compiled")]
    assert [record["step"] for record in after_one_step] == [1, 1]
    assert after_one_step[1]["val_loss"] == pytest.approx(after_one_step[0]["val_loss"], abs=1e-3)
    assert after_one_step[1]["val_loss"] != read_metrics(tmp_path / "eager")[0]["val_loss"]


@pytest.mark.slow
def test_on_cpu_every_block_runs_one_compiled_graph_and_the_model_itself_stays_uncompiled():
    from torch._dynamo.utils import counters

    model = GPT(build_config("cpu", ["n_layer=3", "n_embd=24", "n_head=2", "block_size=12"]).model, 20)
    torch._dynamo.reset()
    counters.clear()
    compiled = compile_model(model, torch.device("cpu"))
    idx = torch.randint(0, 20, (3, 12))
    compiled_logits, loss = compiled(idx, idx)
    loss.backward()
    assert counters["frames"]["ok"] == 1  # one graph, built once, for all three blocks
    eager_logits, _ = model(idx, idx)
    assert counters["frames"]["ok"] == 1  # evaluation's model was not compiled along the way
    assert torch.allclose(compiled_logits, eager_logits, atol=1e-5)
    assert [id(p) for p in compiled.parameters()] == [id(p) for p in model.parameters()]
    assert all(p.grad is not None for p in model.parameters())


def test_max_epochs_sets_the_number_of_steps(data_dir, tmp_path):
    summary = train(tiny_config("cpu", "max_epochs=0.05", "eval_interval=1000"), data_dir, tmp_path / "run")
    train_tokens = json.loads((data_dir / "manifest.json").read_text())["splits"]["train"]["tokens"]
    assert summary["steps"] == math.ceil(0.05 * train_tokens / (8 * 16))


def test_gradient_accumulation_counts_tokens_per_optimizer_step(data_dir, tmp_path):
    summary = train(tiny_config("cpu", "max_iters=5", "grad_accum=3", "grad_clip=0.5"), data_dir, tmp_path / "run")
    assert summary["tokens_seen"] == 5 * 3 * 8 * 16


def test_learning_rate_warms_up_then_decays_to_min_lr():
    cfg = build_config("cpu", ["lr=1e-3", "min_lr=1e-4", "warmup_iters=10", "lr_schedule=cosine"]).train
    assert learning_rate(0, cfg, 100) == pytest.approx(1e-3 / 11)
    assert learning_rate(10, cfg, 100) == pytest.approx(1e-3)
    assert learning_rate(55, cfg, 100) == pytest.approx(5.5e-4)
    assert learning_rate(100, cfg, 100) == pytest.approx(1e-4)
    constant = cfg.model_copy(update={"lr_schedule": "constant", "warmup_iters": 0})
    assert learning_rate(99, constant, 100) == 1e-3
    assert max_steps_for(constant, 1000, 10) == constant.max_iters


def test_weight_decay_applies_only_to_matrices():
    cfg = build_config("cpu", ["n_layer=1", "n_embd=32", "n_head=2", "weight_decay=0.1"])
    model = GPT(cfg.model, 20)
    optimizers = Optimizers(model, cfg.train.model_copy(update={"optimizer": "adamw"}), torch.device("cpu"), NO_SCALER)
    assert list(optimizers.by_name()) == ["optimizer"] and optimizers.muon is None
    decayed, plain = optimizers.adamw.param_groups
    assert decayed["weight_decay"] == 0.1 and plain["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decayed["params"]) and all(p.dim() == 1 for p in plain["params"])
    assert len(decayed["params"]) + len(plain["params"]) == len(list(model.parameters()))


def test_muon_takes_the_blocks_matrices_and_adamw_the_rest():
    cfg = build_config(
        "cpu",
        [
            "n_layer=2",
            "n_embd=32",
            "n_head=2",
            "optimizer=muon",
            "muon_lr=0.05",
            "tie_weights=false",
            "normalization=rmsnorm",
            "qk_norm=true",
        ],
    )
    model = GPT(cfg.model, 20)
    optimizers = Optimizers(model, cfg.train, torch.device("cpu"), NO_SCALER)
    muon = optimizers.muon
    names = {id(p): name for name, p in model.named_parameters()}
    muon_names = {names[id(p)] for g in muon.param_groups for p in g["params"]}
    assert muon_names == {
        f"blocks.{i}.{m}.weight" for i in range(2) for m in ("attn.qkv", "attn.proj", "ff.up", "ff.proj")
    }
    adamw_names = {names[id(p)] for g in optimizers.adamw.param_groups for p in g["params"]}
    assert adamw_names == set(names.values()) - muon_names
    assert {"tok_emb.weight", "lm_head.weight", "blocks.0.attn.q_norm.weight"} <= adamw_names
    # torch's Muon defaults to weight_decay=0.1; ours is explicit.
    assert muon.param_groups[0]["weight_decay"] == cfg.train.muon_weight_decay == 0.15


def test_warmup_stable_decay_ends_on_min_lr_by_steps_or_by_the_clock():
    cfg = build_config("cpu", ["lr=1e-3", "min_lr=0", "warmup_iters=10", "lr_schedule=wsd", "decay_fraction=0.2"]).train
    assert learning_rate(0, cfg, 110) == pytest.approx(1e-3 / 11)
    assert learning_rate(10, cfg, 110) == learning_rate(89, cfg, 110) == 1e-3
    assert learning_rate(90, cfg, 110) == pytest.approx(1e-3)
    assert learning_rate(100, cfg, 110) == pytest.approx(0.5e-3)
    assert learning_rate(110, cfg, 110) == pytest.approx(0.0)
    # 90% of a time budget used at step 20: the decay is as far along as the clock says.
    assert learning_rate(20, cfg, 110, time_fraction=0.9) == pytest.approx(0.5e-3)
    assert learning_rate(20, cfg, 110, time_fraction=0.5) == pytest.approx(1e-3)
    assert learning_rate(100, cfg, 110, time_fraction=0.1) == pytest.approx(0.5e-3)


def test_muon_momentum_warms_up_and_its_lr_follows_the_schedule():
    cfg = build_config(
        "cpu",
        [
            "n_layer=1",
            "n_embd=32",
            "n_head=2",
            "optimizer=muon",
            "lr=1e-3",
            "muon_lr=0.04",
            "warmup_iters=0",
            "lr_schedule=wsd",
            "decay_fraction=0.2",
            "min_lr=0",
            "muon_momentum=0.95",
            "muon_momentum_warmup_iters=100",
        ],
    ).train
    optimizers = Optimizers(
        GPT(build_config("cpu", ["n_layer=1", "n_embd=32", "n_head=2"]).model, 20), cfg, torch.device("cpu"), NO_SCALER
    )
    muon = optimizers.muon.param_groups[0]
    assert optimizers.schedule(0, 1000) == pytest.approx(1e-3)
    assert muon["momentum"] == pytest.approx(0.85) and muon["lr"] == pytest.approx(0.04)
    optimizers.schedule(50, 1000)
    assert muon["momentum"] == pytest.approx(0.90)
    optimizers.schedule(900, 1000)
    assert muon["momentum"] == pytest.approx(0.95) and muon["lr"] == pytest.approx(0.02)
    assert optimizers.adamw.param_groups[0]["lr"] == pytest.approx(0.5e-3)


def test_a_run_cannot_switch_optimizer_on_resume(data_dir, tmp_path):
    train(tiny_config("cpu", "max_iters=10", "optimizer=adamw"), data_dir, tmp_path / "run")
    with pytest.raises(CortexCraftError, match="trained with optimizer=adamw, not muon"):
        train(tiny_config("cpu", "max_iters=20", "optimizer=muon"), data_dir, tmp_path / "run")


def test_cli_generate_writes_only_the_text_to_stdout_and_evaluate_prints_bits(trained_run, data_dir, capsys):
    run, _, _ = trained_run
    assert main(["generate", "--run", str(run), "--prompt", "JULIET:", "--max-new-tokens", "30", "--seed", "5"]) == 0
    out = capsys.readouterr().out
    assert out == generate_from_run(run, prompt="JULIET:", max_new_tokens=30, seed=5) + "\n"
    assert main(["evaluate", "--run", str(run), "--data", str(data_dir), "--checkpoint", "last"]) == 0
    assert "bits/char" in capsys.readouterr().out
    assert main(["generate", "--run", str(run), "--prompt", "ZZ"]) == 2
    assert "outside the vocabulary" in capsys.readouterr().err


def test_the_progress_bar_shows_step_loss_and_tokens_per_second(data_dir, tmp_path, capsys):
    train(tiny_config("cpu", "max_iters=20"), data_dir, tmp_path / "run", progress=True)
    err = capsys.readouterr().err
    assert "20/20" in err and "loss " in err and "tok/s" in err


def test_the_cpu_preset_shrunk_trains_on_tiny_shakespeare_and_generates(tinyshakespeare_path, tmp_path):
    prepare(DataConfig(source=str(tinyshakespeare_path)), tmp_path / "data", cache_dir=tmp_path / "downloads")
    summary = train(tiny_config("cpu", "max_iters=40", "lr=3e-3"), tmp_path / "data", tmp_path / "run")
    history = read_metrics(tmp_path / "run")
    assert history[-1]["val_loss"] < history[0]["val_loss"] - 0.5
    text = generate_from_run(tmp_path / "run", prompt="ROMEO:", max_new_tokens=50)
    assert len(text) == 50 and summary["best_val_loss"] is not None


def test_bf16_autocast_trains_on_cpu_and_fp16_is_refused_there(data_dir, tmp_path):
    summary = train(tiny_config("cpu", "max_iters=5", "dtype=bfloat16"), data_dir, tmp_path / "bf16")
    assert summary["dtype"] == "bfloat16" and summary["final_val_loss"] is not None
    with pytest.raises(CortexCraftError, match="float16 is not supported on CPU"):
        train(tiny_config("cpu", "max_iters=5", "dtype=float16", "device=cpu"), data_dir, tmp_path / "fp16")
    assert not (tmp_path / "fp16").exists()


def test_evaluation_uses_the_same_windows_in_fewer_larger_batches_and_reports_its_share(trained_run):
    # The cpu preset's eval: 20 batches of 32 windows become one batch of 640 (64 x 65 logits each).
    assert eval_plan(20, 32, 64, 65) == (1, 640)
    # A big vocabulary and context keep the training batch size: the logits budget allows no more.
    assert eval_plan(200, 12, 1024, 50_257) == (200, 12)
    batches, per_batch = eval_plan(10, 8, 256, 4096)
    assert batches * per_batch >= 80 and per_batch * 256 * 4096 <= 1 << 24
    _, summary, _ = trained_run
    assert 0 < summary["eval_seconds"] < summary["wall_seconds"]
    # Both times are rounded to milliseconds, so on a sub-second run their ratio moves by up to 1 ms / wall.
    rounding = 1e-4 + 1e-3 / summary["wall_seconds"]
    assert summary["eval_share"] == pytest.approx(summary["eval_seconds"] / summary["wall_seconds"], abs=rounding)


@pytest.mark.parametrize("adjust_lr_fn", ["original", "match_rms_adamw"])
def test_batched_muon_steps_exactly_like_torchs_muon(adjust_lr_fn):
    """Issue 20: the blocks' matrices are orthogonalized shape by shape in one batched product."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (48, 16), (16, 64), (16, 16), (16, 64), (7, 5)]
    ours = [torch.nn.Parameter(torch.randn(shape) * 0.02) for shape in shapes]
    theirs = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=0.02, weight_decay=0.1, momentum=0.95, nesterov=True, adjust_lr_fn=adjust_lr_fn)
    batched, reference = BatchedMuon(ours, **settings), torch.optim.Muon(theirs, **settings)
    for _ in range(4):
        for mine, other in zip(ours, theirs):
            mine.grad = torch.randn(mine.shape)
            other.grad = mine.grad.clone()
        batched.step()
        reference.step()
    for mine, other in zip(ours, theirs):
        assert torch.equal(mine, other)
    # Same state layout: a checkpoint of torch's Muon resumes in ours.
    resumed = BatchedMuon([torch.nn.Parameter(p.detach().clone()) for p in theirs], **settings)
    resumed.load_state_dict(reference.state_dict())
    assert all(torch.equal(resumed.state[p]["momentum_buffer"], reference.state[q]["momentum_buffer"])
               for p, q in zip(resumed.param_groups[0]["params"], theirs))


def test_normalized_muon_gives_every_neuron_an_equal_share_of_muons_step():
    """Issue 20 (NorMuon): same update norm as Muon's, spread evenly over the rows at first, and
    each row's share then follows its own running RMS, which checkpoints carry."""
    torch.manual_seed(0)
    shapes = [(48, 16), (16, 16), (16, 64), (16, 64)]
    start = [torch.randn(shape) * 0.02 for shape in shapes]
    settings = dict(lr=0.02, weight_decay=0.0, momentum=0.95, nesterov=True, adjust_lr_fn="original")
    plain_params = [torch.nn.Parameter(w.clone()) for w in start]
    normed_params = [torch.nn.Parameter(w.clone()) for w in start]
    plain = BatchedMuon(plain_params, **settings)
    normed = BatchedMuon(normed_params, normalize=True, beta2=0.95, **settings)
    # Gradients whose rows differ in size by 100x: Muon's update keeps part of that imbalance.
    grads = [torch.randn(shape) * torch.logspace(-1, 1, shape[0]).unsqueeze(1) for shape in shapes]
    for params, optimizer in ((plain_params, plain), (normed_params, normed)):
        for param, grad in zip(params, grads):
            param.grad = grad.clone()
        optimizer.step()
    for w, a, b in zip(start, plain_params, normed_params):
        plain_step, normed_step = a.detach() - w, b.detach() - w
        assert normed_step.norm() == pytest.approx(plain_step.norm().item(), rel=1e-3)
        row_norms = normed_step.norm(dim=1)
        assert row_norms.max() / row_norms.min() == pytest.approx(1.0, abs=1e-3)
        assert plain_step.norm(dim=1).max() / plain_step.norm(dim=1).min() > 1.1
        moment = normed.state[b]["neuron_moment"]
        assert moment.shape == (w.size(0),) and bool((moment > 0).all())
    # A resumed optimizer carries each neuron's RMS on: its next step is the same.
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in normed_params]
    resumed = BatchedMuon(resumed_params, normalize=True, beta2=0.95, **settings)
    resumed.load_state_dict(copy.deepcopy(normed.state_dict()))  # as from disk: no shared tensors
    for params, optimizer in ((normed_params, normed), (resumed_params, resumed)):
        for param, grad in zip(params, grads):
            param.grad = grad.flip(0).clone()
        optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(normed_params, resumed_params))
