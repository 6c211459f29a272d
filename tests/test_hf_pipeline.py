"""Fine-tuning a pretrained transformers GPT-2 through the Prefect pipeline (`--set init_from=hf:DIR`):
its tokenizer feeds the vocab and shards stages, its weights and architecture the train stage, and
its files are part of the stage keys."""
from __future__ import annotations

import json

import pytest

pytest.importorskip("prefect")
transformers = pytest.importorskip(
    "transformers", reason='the Hugging Face extra is not installed (pip install -e ".[hf]")'
)

from prefect.settings import PREFECT_HOME, temporary_settings  # noqa: E402
from prefect.testing.utilities import prefect_test_harness  # noqa: E402

from flows.params import PipelineParams  # noqa: E402
from flows.pipeline import pipeline  # noqa: E402
from hf_models import make_pretrained  # noqa: E402
from test_pipeline import stage_states  # noqa: E402
from tiny_runs import repetitive_text  # noqa: E402

SETTINGS = [
    "block_size=32",
    "batch_size=8",
    "max_iters=10",
    "eval_interval=10",
    "eval_iters=2",
    "checkpoint_interval=10",
    "max_new_tokens=20",
    "device=cpu",
    "dtype=float32",
    "lr=1e-3",
]


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    with temporary_settings({PREFECT_HOME: tmp_path_factory.mktemp("prefect-home")}):
        with prefect_test_harness(server_startup_timeout=120):
            yield


def run(source, data_dir, pretrained):
    params = PipelineParams(
        source=str(source), data_dir=str(data_dir), overrides=SETTINGS + [f"init_from=hf:{pretrained}"]
    )
    state = pipeline(params, return_state=True)
    assert state.is_completed(), state.message
    return state, state.result()


def test_pipeline_fine_tunes_a_pretrained_gpt2(tmp_path, prefect_server):
    pretrained = make_pretrained(transformers, tmp_path / "gpt2")
    source = tmp_path / "corpus.txt"
    source.write_text(repetitive_text(20_000, seed=2))
    data_dir = tmp_path / "data"
    state, records = run(source, data_dir, pretrained)
    assert set(stage_states(state).values()) == {"Completed"}

    tokenizer = transformers.AutoTokenizer.from_pretrained(str(pretrained))
    manifest = json.loads((data_dir / records["shards"]["dir"] / "manifest.json").read_text())
    assert (manifest["tokenizer"]["type"], manifest["vocab_size"], manifest["dtype"]) == (
        "bpe",
        len(tokenizer),
        "uint16",
    )
    run_json = json.loads((data_dir / records["train"]["dir"] / "run.json").read_text())
    model = run_json["config"]["model"]
    assert (model["n_layer"], model["n_embd"], model["max_positions"], model["activation"]) == (2, 32, 64, "gelu_tanh")
    report = (data_dir / records["report"]["dir"] / "report.md").read_text()
    assert "bits/token" in report and '"n_embd": 32' in report

    # New weights, same tokenizer: the data stages stay Cached, training re-runs from the new weights.
    make_pretrained(transformers, pretrained, seed=1)
    state, again = run(source, data_dir, pretrained)
    assert stage_states(state) == {
        "download": "Cached",
        "vocab": "Cached",
        "shards": "Cached",
        "train": "Completed",
        "report": "Completed",
    }
    assert again["train"]["key"] != records["train"]["key"]
    first_eval = [
        json.loads((data_dir / r["train"]["dir"] / "metrics.jsonl").read_text().splitlines()[0])
        for r in (records, again)
    ]
    assert first_eval[0]["step"] == first_eval[1]["step"] == 0
    assert first_eval[0]["val_loss"] != first_eval[1]["val_loss"]
