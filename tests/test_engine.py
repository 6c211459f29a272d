"""The inference engine of `cortexcraft serve`, in process: concurrent completions equal
`generate_from_run`, stop sequences, whole-character pieces, cancellation, the bounded queue, and
hot swaps (requests finish on their version, the old one is released, a damaged one never serves)."""
from __future__ import annotations

import gc
import random
import shutil
import threading
import time
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from cortexcraft import registry
from cortexcraft.checkpoint import MODEL_FILE, CheckpointError
from cortexcraft.engine import (Candidate, Completion, InferenceEngine, QueueFull, ServingMetrics, find_stop, held_back,
                                verified_run_checkpoint, verified_version)
from cortexcraft.errors import CortexCraftError
from cortexcraft.generate import TextPieces, generate_from_run
from cortexcraft.tokenizer import BPETokenizer
from live_server import NAME, corrupt_copy_of_version, registered_versions

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return registered_versions(tmp_path_factory.mktemp("engine"), count=2)


@pytest.fixture(scope="module")
def models(data_dir) -> Path:
    return registry.models_dir_of(data_dir)


@pytest.fixture
def engine(models):
    engine = InferenceEngine(torch.device("cpu"), ServingMetrics(), max_batch=8, max_queue=32)
    engine.start(verified_version(models, NAME, "v2"))
    yield engine
    engine.stop()


class Collector:
    """Receives one completion's pieces and result (from the engine's thread)."""

    def __init__(self):
        self.pieces: list[str] = []
        self.result = None
        self.done = threading.Event()

    def piece(self, text: str) -> None:
        self.pieces.append(text)

    def finish(self, result) -> None:
        self.result = result
        self.done.set()

    def wait(self):
        assert self.done.wait(60), "the completion never finished"
        return self.result


def submit(engine: InferenceEngine, prompt: str, max_tokens: int, stream: bool = True, **settings) -> Collector:
    collector = Collector()
    version = engine.current
    engine.submit(Completion(version=version, prompt_ids=[int(i) for i in version.tokenizer.encode(prompt)],
                             max_tokens=max_tokens, on_done=collector.finish,
                             on_piece=collector.piece if stream else None, **settings))
    return collector


def test_concurrent_completions_equal_generate_alone(engine, models):
    rng = random.Random(0)
    requests = [dict(prompt=rng.choice(["ROMEO:", "J", "O, juliet loves the moon.\n\nHAMLET:\n", "\n"]),
                     max_tokens=rng.randint(1, 40), temperature=rng.choice([0, 0.8, 1.0]), seed=rng.randint(0, 99),
                     top_k=rng.choice([None, 5]), top_p=rng.choice([None, 0.9]))
                for _ in range(20)]
    collectors = [submit(engine, **r, stream=i % 2 == 0) for i, r in enumerate(requests)]
    directory = registry.version_dir(models, NAME, "v2")
    for request, collector in zip(requests, collectors):
        result = collector.wait()
        expected = generate_from_run(directory, prompt=request["prompt"], max_new_tokens=request["max_tokens"],
                                     temperature=request["temperature"], top_k=request["top_k"], top_p=request["top_p"],
                                     seed=request["seed"])
        assert (result.text, result.finish_reason) == (expected, "length")
        assert result.completion_tokens == request["max_tokens"]
        assert result.prompt_tokens == len(request["prompt"])
        if collector.pieces:
            assert "".join(collector.pieces) == expected
    sample = engine.metrics.registry.get_sample_value
    steps, single = sample("cortexcraft_batch_rows_count"), sample("cortexcraft_batch_rows_bucket", {"le": "1.0"})
    assert single < steps, "no decoding step had more than one row"


def test_a_stop_sequence_ends_the_text_before_it_and_is_never_streamed(engine, models):
    directory = registry.version_dir(models, NAME, "v2")
    full = generate_from_run(directory, prompt="ROMEO:", max_new_tokens=40, temperature=0)
    stop = full[10:13]
    collector = submit(engine, "ROMEO:", 40, temperature=0, stop=("never there", stop))
    result = collector.wait()
    assert (result.text, result.finish_reason) == (full[:full.index(stop)], "stop")
    assert "".join(collector.pieces) == result.text
    assert result.completion_tokens == full.index(stop) + len(stop)  # char tokens: one per character


def test_stop_helpers():
    assert find_stop("abcabc", ("ca",), 3) == 2 and find_stop("abcabc", ("ca", "b"), 4) == 4
    assert find_stop("abcabc", ("b",), 5) is None
    assert find_stop("abc", ("x",), 0) is None
    assert held_back("hello wor", ("world", "or ")) == 3 and held_back("hello", ("xyz",)) == 0


def test_pieces_are_whole_characters_and_join_to_the_decoded_text():
    corpus = "naïve café — 日本語 text, emoji 🙂 and more naïve 日本 🙂 " * 20
    tokenizer = BPETokenizer.train(iter([corpus]), vocab_size=300, special_tokens=["<|endoftext|>"])
    text = corpus[:60] + " Ω ж ≈ 🦀 "  # characters the BPE never merged: several byte tokens each
    ids = [int(i) for i in tokenizer.encode(text)]
    pieces = TextPieces(tokenizer)
    streamed = [pieces.push(i) for i in ids]
    assert "".join(streamed) + pieces.rest() == tokenizer.decode(ids) == text
    assert not any("\ufffd" in piece for piece in streamed)
    assert any(piece == "" for piece in streamed), "no multi-byte character was split across tokens"


def test_a_cancelled_completion_stops_at_the_next_token(engine):
    collector = Collector()
    started = threading.Event()
    version = engine.current
    completion = Completion(version=version, prompt_ids=[1], max_tokens=100_000, on_done=collector.finish,
                            on_piece=lambda piece: started.set())
    engine.submit(completion)
    assert started.wait(30)
    engine.cancel(completion)
    result = collector.wait()
    assert result.finish_reason == "cancelled" and 0 < result.completion_tokens < 100_000
    assert engine.running == 0


def test_a_full_queue_refuses_with_a_retry_time(models):
    engine = InferenceEngine(torch.device("cpu"), ServingMetrics(), max_batch=1, max_queue=1)
    engine.start(verified_version(models, NAME, "v2"))
    try:
        long = [submit(engine, "ROMEO:", 100_000)]
        while not long[0].pieces:  # generating
            time.sleep(0.01)
        long.append(submit(engine, "ROMEO:", 100_000))  # waiting
        with pytest.raises(QueueFull) as refused:
            submit(engine, "ROMEO:", 5)
        assert 1 <= refused.value.retry_after <= 60
        for collector in long:
            assert collector.result is None
    finally:
        engine.stop()
    assert all(c.wait().finish_reason == "cancelled" for c in long)


def test_a_swap_lets_running_completions_finish_on_their_version_and_releases_it(engine, models):
    old = weakref.ref(engine.current.model)
    before = submit(engine, "ROMEO:", 300, temperature=0)
    engine.load(verified_version(models, NAME, "v1")).result()
    after = submit(engine, "ROMEO:", 30, temperature=0)
    expected = {v: generate_from_run(registry.version_dir(models, NAME, v), prompt="ROMEO:", max_new_tokens=n,
                                     temperature=0) for v, n in (("v2", 300), ("v1", 30))}
    assert (before.wait().text, after.wait().text) == (expected["v2"], expected["v1"])
    assert engine.current.fingerprint == f"{NAME}@v1"
    assert engine.metrics.registry.get_sample_value("cortexcraft_swaps_total") == 1
    gc.collect()
    assert old() is None, "the old version's model is still in memory"
    assert engine.metrics.registry.get_sample_value("cortexcraft_models_loaded") == 1


def test_a_damaged_version_is_refused_naming_the_file_and_nan_weights_fail_the_smoke_test(engine, models, tmp_path):
    v1 = verified_version(models, NAME, "v1")
    nan_dir = tmp_path / "step_nan"
    shutil.copytree(v1.checkpoint, nan_dir)
    weights = load_file(str(nan_dir / MODEL_FILE))
    weights["ln_f.weight"][0] = float("nan")
    save_file(weights, str(nan_dir / MODEL_FILE))
    nan = Candidate(NAME, "v9", v1.directory, nan_dir, v1.state, v1.tokenizer)
    with pytest.raises(CortexCraftError, match=r"tiny@v9 failed its smoke test: its logits hold NaN or inf"):
        engine.load(nan).result()
    assert engine.current.version == "v2"
    assert submit(engine, "ROMEO:", 5, temperature=0).wait().finish_reason == "length"

    copy = tmp_path / "data"
    shutil.copytree(models, registry.models_dir_of(copy))
    weights_file = corrupt_copy_of_version(copy, "v1")
    with pytest.raises(CheckpointError, match=rf"{weights_file}.*damaged \(hash mismatch\)"):
        verified_version(registry.models_dir_of(copy), NAME, "v1")


def test_a_run_checkpoint_is_served_as_run_name_at_step(data_dir):
    run_dir = data_dir.parent / "runs" / "run0"
    candidate = verified_run_checkpoint(run_dir, "last")
    assert (candidate.name, candidate.version) == ("run0", "step_00000020")
