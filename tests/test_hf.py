"""Hugging Face transformers interop: export to transformers, import a GPT-2 checkpoint, fine-tune.

Needs the optional extra (pip install -e ".[hf]"); without it these tests skip, except the one
checking the error the base install gives. Pretrained models here are small randomly initialised
GPT2LMHeadModels with a byte-level BPE tokenizer trained and saved locally (no network).
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cortexcraft.cli import main
from cortexcraft.config import DataConfig, build_config, preset_names
from cortexcraft.errors import CortexCraftError
from cortexcraft.checkpoint import load_model
from cortexcraft.train import train
from hf_models import LoopbackHub, make_pretrained
from tiny_runs import ONE_THREAD_ENV, make_data_dir, repetitive_text, tiny_config

REPO = Path(__file__).resolve().parent.parent
NO_EXTRA = 'the Hugging Face extra is not installed (pip install -e ".[hf]")'
# Presets no transformers architecture computes, and the field the error names; every other preset
# exports.
UNEXPORTABLE_PRESETS = {"cortexcraft": "model.norm=post", "gpt2-small": "model.norm=post"}
EXPORTABLE_PRESETS = [name for name in preset_names() if name not in UNEXPORTABLE_PRESETS]
# GPT-2's shape, spelled out so the variants below do not depend on what a preset chose.
GPT2_SHAPE = ["pos_encoding=learned", "normalization=layernorm", "qk_norm=false", "logit_softcap=null",
              "activation=gelu", "bias=true", "tie_weights=true", "zero_init=false"]
# Model options beyond the presets, each mapped onto its transformers architecture.
VARIANTS = {
    "bias-free, untied, gelu_tanh": GPT2_SHAPE + ["bias=false", "tie_weights=false", "activation=gelu_tanh"],
    "relu2": GPT2_SHAPE + ["activation=relu2"],
    "special tokens": GPT2_SHAPE + ['special_tokens=["<pad>","<eos>"]'],
    "apertus: rope rmsnorm qk_norm relu2, tied": GPT2_SHAPE
    + ["pos_encoding=rope", "normalization=rmsnorm", "qk_norm=true", "activation=relu2", "bias=false"],
    "arcee: rope rmsnorm, biases": GPT2_SHAPE + ["pos_encoding=rope", "normalization=rmsnorm", "bias=true"],
}
PROMPT = "ROMEO:\nO"
BLOCK = 32


@pytest.fixture(scope="module")
def transformers():
    return pytest.importorskip("transformers", reason=NO_EXTRA)


def _trained_run(root: Path, preset: str, overrides: list[str]) -> Path:
    data_cfg = build_config(preset, overrides).data
    data = make_data_dir(root, DataConfig(special_tokens=data_cfg.special_tokens))
    config = tiny_config(preset, f"block_size={BLOCK}", "max_iters=20", "dtype=float32", "device=cpu", *overrides)
    train(config, data, root / "run", progress=False)
    return root / "run"


def _export(run: Path, out: Path, capsys) -> None:
    assert main(["export", "--run", str(run), "--format", "hf", "--out", str(out)]) == 0, capsys.readouterr().err


def _cortexcraft_greedy(run: Path, prompt: str, new_tokens: int, capsys) -> str:
    capsys.readouterr()
    assert (
        main(
            [
                "generate",
                "--run",
                str(run),
                "--prompt",
                prompt,
                "--temperature",
                "0",
                "--max-new-tokens",
                str(new_tokens),
            ]
        )
        == 0
    )
    return capsys.readouterr().out.removesuffix("\n")


def _check_export(transformers, run: Path, out: Path, capsys) -> float:
    """Logits of transformers vs ours on the same text, greedy text of both; returns the max logit gap."""
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    ours, state = load_model(run)
    text = repetitive_text(200, seed=3)[:BLOCK]
    ids = tokenizer(text, return_tensors="pt").input_ids
    assert ids.shape[1] == BLOCK and tokenizer.decode(ids[0]) == text
    with torch.no_grad():
        theirs = model(ids).logits
        mine, _ = ours(ids, targets=ids)
    gap = (theirs - mine).abs().max().item()
    assert gap < 1e-5

    new_tokens = BLOCK - len(PROMPT)
    prompt_ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    generated = model.generate(
        prompt_ids, max_new_tokens=new_tokens, do_sample=False, attention_mask=torch.ones_like(prompt_ids)
    )
    hf_text = tokenizer.decode(generated[0, prompt_ids.shape[1] :])
    assert hf_text == _cortexcraft_greedy(run, PROMPT, new_tokens, capsys)
    return gap


@pytest.mark.parametrize("preset", EXPORTABLE_PRESETS)
def test_exported_preset_gives_our_logits_and_greedy_text(transformers, preset, tmp_path, capsys, one_thread):
    run = _trained_run(tmp_path, preset, [])
    _export(run, tmp_path / "hf", capsys)
    gap = _check_export(transformers, run, tmp_path / "hf", capsys)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    rope = build_config(preset).model.pos_encoding == "rope"  # the cpu preset
    assert config["architectures"] == ["ApertusForCausalLM" if rope else "GPT2LMHeadModel"]
    assert config["bos_token_id"] is None and config["eos_token_id"] is None  # char vocabulary
    print(f"{preset}: max |logit difference| {gap:.2e}")


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_exported_model_option_gives_our_logits_and_greedy_text(transformers, variant, tmp_path, capsys, one_thread):
    run = _trained_run(tmp_path, "cpu", VARIANTS[variant])
    _export(run, tmp_path / "hf", capsys)
    gap = _check_export(transformers, run, tmp_path / "hf", capsys)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    architecture = config["architectures"][0]
    expected = {"apertus": "ApertusForCausalLM", "arcee": "ArceeForCausalLM"}.get(
        variant.split(":")[0], "GPT2LMHeadModel"
    )
    assert architecture == expected
    if architecture != "GPT2LMHeadModel":  # what transformers 4.x reads instead of rope_parameters
        assert config["rope_theta"] == 10000.0 and config["rope_scaling"]["rope_type"] == "default"
    record = json.loads((tmp_path / "hf" / "cortexcraft-export.json").read_text())
    assert record["checkpoint"] == str(sorted((run / "checkpoints").glob("step_*"))[-1].resolve())
    print(f"{variant}: {architecture}, max |logit difference| {gap:.2e}")


def test_export_runs_in_the_text_generation_pipeline_with_a_model_card(transformers, tmp_path, capsys, one_thread):
    run = _trained_run(tmp_path, "cpu", GPT2_SHAPE + ['special_tokens=["<eos>"]'])
    out = tmp_path / "shakespeare-tiny"
    _export(run, out, capsys)
    generator = transformers.pipeline("text-generation", model=str(out))
    result = generator(PROMPT, max_new_tokens=10, do_sample=False)[0]["generated_text"]
    assert result == PROMPT + _cortexcraft_greedy(run, PROMPT, 10, capsys)

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    text = "O, juliet .\n\n<eos>ROMEO: ,"
    assert tokenizer.decode(tokenizer(text).input_ids) == text
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tokenizer.convert_tokens_to_ids("<eos>")

    card = (out / "README.md").read_text()
    run_json = json.loads((run / "run.json").read_text())
    state = json.loads(sorted((run / "checkpoints").glob("step_*/state.json"))[-1].read_text())
    assert "pipeline_tag: text-generation" in card and "# shakespeare-tiny" in card
    assert run_json["data_source"]["fingerprint"] in card
    assert f"{state['best_val_loss']:.4f}" in card
    assert "## Sample" in card and '"n_layer": 1' in card


def test_export_of_best_last_and_a_path(transformers, tmp_path, capsys, one_thread):
    run = _trained_run(tmp_path, "cpu", GPT2_SHAPE + ["checkpoint_interval=5", "keep_last=10"])
    step_5 = run / "checkpoints" / "step_00000005"
    for which, step in (("last", 20), (str(step_5), 5)):
        out = tmp_path / f"hf-{step}"
        assert main(["export", "--run", str(run), "--checkpoint", which, "--out", str(out)]) == 0
        assert json.loads((out / "cortexcraft-export.json").read_text())["step"] == step
        exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
        ours, _ = load_model(run, which)
        assert torch.equal(exported["transformer.wte.weight"], ours.state_dict()["tok_emb.weight"])


@pytest.mark.parametrize(
    "preset, setting, field",
    [
        *((name, [], field) for name, field in UNEXPORTABLE_PRESETS.items()),
        ("gpt2-small", ["norm=pre"], "model.pos_encoding=sinusoidal"),
        ("gpt1-lecture", ["logit_softcap=30"], "model.logit_softcap=30.0"),
        ("gpt1-lecture", ["normalization=rmsnorm"], "model.normalization=rmsnorm"),
        ("gpt1-lecture", ["qk_norm=true"], "model.qk_norm=true"),
        ("gpt1-lecture", ["pos_encoding=rope"], "model.normalization=layernorm"),
        (
            "gpt1-lecture",
            ["pos_encoding=rope", "normalization=rmsnorm", "qk_norm=true", "bias=true"],
            "model.bias=true",
        ),
    ],
)
def test_unexportable_model_fails_naming_the_field(transformers, preset, setting, field, tmp_path, capsys):
    config = tiny_config(preset, "max_iters=1", "device=cpu", "block_size=16", "max_positions=16", *setting)
    data = make_data_dir(tmp_path, DataConfig(special_tokens=config.data.special_tokens), chars=5_000)
    train(config, data, tmp_path / "run", progress=False)
    out = tmp_path / "hf"
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {field} cannot be exported to transformers" in err[0]
    assert not out.exists()


def test_export_refuses_a_foreign_directory_and_replaces_an_earlier_export(transformers, tmp_path, capsys, one_thread):
    run = _trained_run(tmp_path, "cpu", GPT2_SHAPE)
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "todo.txt").write_text("keep me")
    assert main(["export", "--run", str(run), "--out", str(foreign)]) == 2
    assert (
        "is a non-empty directory that is not a CortexCraft export; choose a new or empty directory"
        in capsys.readouterr().err
    )
    assert (foreign / "todo.txt").read_text() == "keep me"
    out = tmp_path / "hf"
    _export(run, out, capsys)
    (out / "stale.bin").write_bytes(b"x")
    _export(run, out, capsys)
    assert not (out / "stale.bin").exists() and (out / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".hf.")]


def test_base_install_without_transformers_says_how_to_install_it(tmp_path):
    # A None entry in sys.modules makes `import transformers` raise ImportError, as when it is absent.
    code = (
        "import sys; sys.modules['transformers'] = None; from cortexcraft.cli import main; "
        f"sys.exit(main(['export', '--run', {str(tmp_path)!r}, '--out', {str(tmp_path / 'hf')!r}]))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ONE_THREAD_ENV, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        "cortexcraft export: error: Hugging Face interop needs transformers, which is not "
        'installed; install the Hugging Face extra: pip install -e ".[hf]"'
    )


# ---------------------------------------------------------------------------------------------
# import and fine-tune


@pytest.mark.parametrize("tie, activation", [(True, "gelu_new"), (False, "gelu"), (True, "relu")])
def test_imported_gpt2_gives_its_logits_and_exports_back_to_equal_weights(transformers, tie, activation, tmp_path):
    from cortexcraft.export import export_plan, hf_model_from
    from cortexcraft.pretrained import pretrained_model_config, pretrained_state
    from cortexcraft.model import GPT

    directory = make_pretrained(transformers, tmp_path / "gpt2", tie=tie, activation=activation)
    spec = f"hf:{directory}"
    original = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).eval()
    model_cfg = pretrained_model_config(spec, build_config("cpu", ["block_size=48"]).model)
    assert (model_cfg.block_size, model_cfg.max_positions, model_cfg.tie_weights) == (48, 64, tie)
    ours = GPT(model_cfg, original.config.vocab_size).eval()
    ours.load_state_dict(pretrained_state(spec, model_cfg))
    ids = torch.randint(0, original.config.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        gap = (original(ids).logits - ours(ids, targets=ids)[0]).abs().max().item()
    assert gap < 1e-5

    exported = hf_model_from(
        ours, export_plan(model_cfg, original.config.vocab_size, {"bos": None, "eos": None, "pad": None})
    )
    before, after = original.state_dict(), exported.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    print(f"import tie={tie} {activation}: max |logit difference| {gap:.2e}")


def test_finetune_from_pretrained_uses_its_tokenizer_and_weights(transformers, tmp_path, capsys, one_thread):
    directory = make_pretrained(transformers, tmp_path / "gpt2")
    spec = f"hf:{directory}"
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(repetitive_text(20_000, seed=1))
    assert main(["prepare", "--source", str(corpus), "--out", str(tmp_path / "data"), "--init-from", spec]) == 0
    manifest = json.loads((tmp_path / "data" / "manifest.json").read_text())
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(directory))
    assert manifest["vocab_size"] == len(tokenizer) and manifest["dtype"] == "uint16"
    first = torch.from_numpy(
        __import__("numpy").fromfile(tmp_path / "data" / "train_000.bin", dtype="<u2")[:50].astype("int64")
    )
    assert first.tolist() == tokenizer(corpus.read_text()[:400]).input_ids[:50]

    # One step at a negligible learning rate: the checkpoint still holds the pretrained weights.
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--data",
                str(tmp_path / "data"),
                "--out",
                str(run),
                "--set",
                f"init_from={spec}",
                "--set",
                "block_size=32",
                "--set",
                "lr=1e-12",
                "--set",
                "warmup_iters=0",
                "--set",
                "weight_decay=0",
                "--set",
                "optimizer=adamw",
                "--set",
                "max_iters=1",
                "--set",
                "eval_iters=2",
                "--set",
                "dtype=float32",
                "--set",
                "device=cpu",
                "--set",
                "threads=1",
            ]
        )
        == 0
    )
    out = tmp_path / "hf"
    _export(run, out, capsys)
    original = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).state_dict()
    exported = transformers.AutoModelForCausalLM.from_pretrained(str(out)).state_dict()
    assert max((original[k] - exported[k]).abs().max().item() for k in original) < 1e-9
    assert json.loads((out / "config.json").read_text())["eos_token_id"] == tokenizer.eos_token_id
    text = "ROMEO:\nO, juliet calls the moon."
    assert transformers.AutoTokenizer.from_pretrained(str(out))(text).input_ids == tokenizer(text).input_ids


def test_init_from_data_of_another_tokenizer_fails_naming_the_fix(transformers, tmp_path, capsys):
    directory = make_pretrained(transformers, tmp_path / "gpt2")
    data = make_data_dir(tmp_path, chars=5_000)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(tmp_path / "run"),
                "--set",
                f"init_from=hf:{directory}",
                "--set",
                "block_size=32",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert (
        "was tokenized with a char vocabulary of 39 tokens, but init_from=hf:" in err
        and f"(cortexcraft prepare --init-from hf:{directory})" in err
    )
    assert not (tmp_path / "run").exists()


def test_init_from_errors_name_the_problem(transformers, tmp_path, capsys):
    from cortexcraft.pretrained import pretrained_model_config, pretrained_tokenizer

    directory = make_pretrained(transformers, tmp_path / "gpt2", n_positions=32)
    model_cfg = build_config("cpu", ["block_size=64"]).model
    with pytest.raises(
        CortexCraftError,
        match=r"^block_size=64 exceeds the 32 positions of init_from=hf:.*; "
        r"set block_size to at most 32$",
    ):
        pretrained_model_config(f"hf:{directory}", model_cfg)
    with pytest.raises(
        CortexCraftError, match=r"is not a directory; pass hf:DIR of a model saved with save_pretrained"
    ):
        pretrained_tokenizer(f"hf:{tmp_path / 'missing'}")
    assert main(["train", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--set", "init_from=gpt2"]) == 2
    assert (
        "train.init_from: init_from='gpt2' is not supported; use hf:DIR (a saved transformers model) or "
        "hf:OWNER/NAME[@REV] (a Hugging Face hub model)"
    ) in capsys.readouterr().err


def test_init_from_another_architecture_is_refused(transformers, tmp_path, capsys, one_thread):
    from cortexcraft.pretrained import pretrained_model_config

    run = _trained_run(tmp_path, "cpu", VARIANTS["apertus: rope rmsnorm qk_norm relu2, tied"])
    _export(run, tmp_path / "hf", capsys)
    with pytest.raises(
        CortexCraftError, match=r"is a apertus model; only GPT-2-style models \(model_type gpt2\) can be imported"
    ):
        pretrained_model_config(f"hf:{tmp_path / 'hf'}", build_config("cpu").model)


def test_hub_id_without_network_fails_saying_how_to_pass_a_directory(transformers, tmp_path):
    # Offline mode is how the hub client behaves with no network: the request never leaves.
    code = (
        "import sys; from cortexcraft.pretrained import pretrained_dir\n"
        "try:\n    pretrained_dir('hf:openai-community/gpt2')\n"
        "except Exception as exc:\n    print(type(exc).__name__, exc)"
    )
    env = {**ONE_THREAD_ENV, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO)
    assert result.stdout.startswith(
        "CortexCraftError init_from=hf:openai-community/gpt2: cannot fetch "
        "openai-community/gpt2 from the Hugging Face hub ("
    )
    assert result.stdout.strip().endswith(
        "save it with save_pretrained where the hub is reachable and pass hf:/path/to/dir"
    )


def test_every_activation_maps_to_the_same_function_in_transformers(transformers):
    from transformers.activations import ACT2FN

    from cortexcraft.config import ModelConfig
    from cortexcraft.pretrained import HF_ACTIVATIONS, IMPORTED_ACTIVATIONS
    from cortexcraft.model import ACTIVATIONS

    assert set(HF_ACTIVATIONS) == set(ACTIVATIONS) == set(ModelConfig.model_fields["activation"].annotation.__args__)
    x = torch.linspace(-6, 6, 10_001)
    for ours, theirs in [*HF_ACTIVATIONS.items(), *((v, k) for k, v in IMPORTED_ACTIVATIONS.items())]:
        assert (ACTIVATIONS[ours]()(x) - ACT2FN[theirs](x)).abs().max().item() < 1e-6, (ours, theirs)


@pytest.mark.slow
def test_hub_id_is_fetched_from_the_hub_endpoint(transformers, tmp_path):
    directory = make_pretrained(transformers, tmp_path / "gpt2")
    code = """if True:
        import json, torch
        from cortexcraft.config import ModelConfig
        from cortexcraft.errors import CortexCraftError
        from cortexcraft.pretrained import pretrained_model_config, pretrained_state, pretrained_tokenizer
        from cortexcraft.model import GPT
        spec = "hf:someone/tiny-gpt2@main"
        cfg = pretrained_model_config(spec, ModelConfig(block_size=32))
        state = pretrained_state(spec, cfg)
        try:
            pretrained_model_config("hf:someone/missing", cfg)
        except CortexCraftError as exc:
            missing = str(exc)
        print(json.dumps({"n_layer": cfg.n_layer, "vocab": pretrained_tokenizer(spec).vocab_size, "missing": missing,
                          "wte": state["tok_emb.weight"].flatten()[:5].tolist()}))
    """
    with LoopbackHub(directory, "someone/tiny-gpt2") as hub:
        env = {
            **ONE_THREAD_ENV,
            "HF_ENDPOINT": hub.endpoint,
            "HF_HOME": str(tmp_path / "hf-home"),
            "HF_HUB_DISABLE_TELEMETRY": "1",
        }
        result = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
        )
    assert result.returncode == 0, result.stderr[-2000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    local = transformers.GPT2LMHeadModel.from_pretrained(str(directory)).state_dict()["transformer.wte.weight"]
    assert out["n_layer"] == 2 and out["vocab"] == len(transformers.AutoTokenizer.from_pretrained(str(directory)))
    assert out["wte"] == local.flatten()[:5].tolist()
    assert ("GET", "/someone/tiny-gpt2/resolve/" + "a" * 40 + "/model.safetensors", True) in hub.requests
    assert out["missing"].startswith(
        "init_from=hf:someone/missing: the hub has no model someone/missing at revision 'main' (HTTP 404); check the id"
    )
    assert (tmp_path / "hf-home" / "hub" / "models--someone--tiny-gpt2").is_dir()


def test_unusable_pretrained_directories_fail_naming_the_problem(transformers, tmp_path, capsys, one_thread):
    from cortexcraft.pretrained import pretrained_model_config, pretrained_state, pretrained_tokenizer

    model_cfg = build_config("cpu", ["block_size=32"]).model
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        CortexCraftError, match=r"holds no transformers model config .*; pass a directory written by save_pretrained$"
    ):
        pretrained_model_config(f"hf:{empty}", model_cfg)

    scaled = make_pretrained(transformers, tmp_path / "scaled")
    config = json.loads((scaled / "config.json").read_text())
    (scaled / "config.json").write_text(json.dumps({**config, "scale_attn_by_inverse_layer_idx": True}))
    with pytest.raises(
        CortexCraftError,
        match=r"uses scale_attn_by_inverse_layer_idx=True, which our GPT does not compute; "
        r"import a standard GPT-2 checkpoint$",
    ):
        pretrained_model_config(f"hf:{scaled}", model_cfg)

    no_weights = make_pretrained(transformers, tmp_path / "no-weights")
    (no_weights / "model.safetensors").unlink()
    with pytest.raises(
        CortexCraftError,
        match=r"cannot load safetensors weights from .*\(safetensors; pickled \.bin files are not read\)$",
    ):
        pretrained_state(f"hf:{no_weights}", pretrained_model_config(f"hf:{no_weights}", model_cfg))
    no_tokenizer = make_pretrained(transformers, tmp_path / "no-tokenizer")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (no_tokenizer / name).unlink()
    model_vocab = json.loads((no_tokenizer / "config.json").read_text())["vocab_size"]
    with pytest.raises(
        CortexCraftError,
        match=rf"its tokenizer has 1 tokens but the model {model_vocab}; save the model's own "
        r"tokenizer beside it with save_pretrained$",
    ):
        pretrained_tokenizer(f"hf:{no_tokenizer}")

    (no_tokenizer / "tokenizer.json").write_text("{not json")
    with pytest.raises(
        CortexCraftError,
        match=r"cannot load a tokenizer from .*; save the tokenizer beside the model with save_pretrained$",
    ):
        pretrained_tokenizer(f"hf:{no_tokenizer}")

    run = _trained_run(tmp_path / "char", "cpu", GPT2_SHAPE)
    _export(run, tmp_path / "char-export", capsys)
    with pytest.raises(
        CortexCraftError,
        match=r"has a WordLevel tokenizer; only byte-level BPE tokenizers \(as GPT-2's\) can be imported$",
    ):
        pretrained_tokenizer(f"hf:{tmp_path / 'char-export'}")

    assert (
        main(
            [
                "prepare",
                "--source",
                str(tmp_path / "char" / "corpus.txt"),
                "--out",
                str(tmp_path / "d"),
                "--init-from",
                "gpt2",
            ]
        )
        == 2
    )
    assert "error: init_from='gpt2' is not supported; use hf:DIR" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("x")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "a-file")]) == 2
    assert "error: --out " + str(tmp_path / "a-file") + " is a file; choose a directory path" in capsys.readouterr().err


def test_init_from_with_parts_is_refused_before_any_work(transformers, tmp_path, capsys):
    directory = make_pretrained(transformers, tmp_path / "gpt2")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(repetitive_text(5_000))
    assert (
        main(
            [
                "prepare",
                "--source",
                str(corpus),
                "--out",
                str(tmp_path / "data"),
                "--init-from",
                f"hf:{directory}",
                "--workers",
                "2",
            ]
        )
        == 2
    )
    assert (
        "error: --init-from with --workers 2: a pretrained tokenizer is applied in one process only; drop --workers"
        in capsys.readouterr().err
    )
    assert not (tmp_path / "data").exists()
    from flows.params import params_from_cli

    with pytest.raises(
        CortexCraftError,
        match=r"init_from=hf:.* with workers=2 or a Dask task runner: a pretrained tokenizer "
        r"is applied in one process only; use workers=1 and the default task runner",
    ):
        params_from_cli(source=str(corpus), overrides=[f"init_from=hf:{directory}"], workers=2)


def test_export_of_a_registered_model_by_name(transformers, tmp_path, capsys, one_thread):
    from cortexcraft import registry

    run = _trained_run(tmp_path, "cpu", [])
    data = tmp_path / "data"
    summary = json.loads((run / "summary.json").read_text())
    models = registry.models_dir_of(tmp_path / "root")
    record, _ = registry.register(
        models,
        "tiny",
        run,
        data=registry.data_identity(data),
        code_version="test",
        policy=registry.plan_retrain(models, "tiny", "fresh", None, None),
        summary=summary,
    )
    registry.decide(models, "tiny", record["version"], 0.0)

    out = tmp_path / "hf"
    assert main(["export", "--model", "tiny@champion", "--data-dir", str(tmp_path / "root"), "--out", str(out)]) == 0, (
        capsys.readouterr().err
    )
    exported = json.loads((out / "cortexcraft-export.json").read_text())
    assert exported["step"] == record["step"] and exported["architecture"] == "ApertusForCausalLM"
    _check_export(transformers, run, out, capsys)
    assert main(["export", "--model", "tiny@v9", "--data-dir", str(tmp_path / "root"), "--out", str(out)]) == 2
    assert "model 'tiny' has no version v9" in capsys.readouterr().err
