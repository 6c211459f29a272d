"""`cortexcraft serve` against live servers (slow): the openai client, streamed and not, answers equal
to `cortexcraft generate`; bad input; auth; a full queue; clients that go away; the page in
Chromium; six clients through thirty promote/rollback swaps and a damaged version without a failed
request; SIGTERM draining the requests in flight. The command-line refusals are fast."""
from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import socket
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch

from cortexcraft import registry
from cortexcraft.cli import main
from cortexcraft.generate import generate_from_run
from live_server import (NAME, corrupt_copy_of_version, health, live_server, metric, registered_versions, server_env,
                         wait_for_version)
from prefect_server import CHROMIUM, CHROMIUM_ARGS, require_chromium, tail, wait_until

KEY = "test-key-0123456789"
CAP = 50_000  # max_tokens allowed by the main server: enough for a generation that outlasts a test step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    """v1, v2 good, v3 damaged (one flipped byte of its weights); champion v2, v1 before it."""
    data_dir = registered_versions(tmp_path_factory.mktemp("serve"), count=3)
    corrupt_copy_of_version(data_dir, "v3")
    registry.rollback(registry.models_dir_of(data_dir), NAME)
    return data_dir


@pytest.fixture(scope="module")
def models(data_dir) -> Path:
    return registry.models_dir_of(data_dir)


@pytest.fixture(scope="module")
def server(data_dir, tmp_path_factory):
    """Follows NAME's champion."""
    log = tmp_path_factory.mktemp("server") / "serve.log"
    with live_server(["--model", NAME, "--data-dir", str(data_dir), "--max-tokens-cap", str(CAP),
                      "--poll-seconds", "0.2", "--no-access-log"], log) as live:
        yield live


@pytest.fixture(scope="module")
def keyed_server(data_dir, tmp_path_factory):
    """Pinned to v1, an API key, one row per batch and one waiting place."""
    log = tmp_path_factory.mktemp("keyed") / "serve.log"
    with live_server(["--model", f"{NAME}@v1", "--data-dir", str(data_dir), "--max-batch", "1", "--max-queue", "1",
                      "--max-tokens-cap", str(CAP), "--poll-seconds", "0.2"], log,
                     server_env(CORTEXCRAFT_API_KEY=KEY)) as live:
        yield live


def cli_generate(data_dir: Path, ref: str, prompt: str, tokens: int, capsys, *options: str) -> str:
    """What `cortexcraft generate --model REF ...` prints (without its final newline)."""
    capsys.readouterr()
    assert main(["generate", "--model", ref, "--data-dir", str(data_dir), "--prompt", prompt,
                 "--max-new-tokens", str(tokens), *options]) == 0
    return capsys.readouterr().out.removesuffix("\n")


def stream_events(response: httpx.Response) -> list:
    """The JSON payloads of a server-sent event stream, up to and including the [DONE] marker."""
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: "):]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


@pytest.mark.slow
def test_the_openai_client_gets_what_cortexcraft_generate_writes(server, data_dir, capsys):
    client = openai.OpenAI(base_url=server["url"] + "/v1", api_key="not-needed-on-loopback")
    served = health(server["url"])["fingerprint"]

    (model,) = client.models.list().data
    assert (model.id, model.model_extra["fingerprint"], model.model_extra["max_model_len"]) == (NAME, served, 16)

    greedy = cli_generate(data_dir, served, "ROMEO:", 40, capsys, "--temperature", "0")
    answer = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0)
    assert answer.choices[0].text == greedy and answer.choices[0].finish_reason == "length"
    assert answer.system_fingerprint == served and answer.model == NAME and answer.object == "text_completion"
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens, answer.usage.total_tokens) == (6, 40, 46)

    chunks = list(client.completions.create(model=f"{NAME}@champion", prompt=["ROMEO:"], max_tokens=40, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == greedy and len([t for t in texts if t]) > 1
    assert {c.system_fingerprint for c in chunks} == {served}
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 40

    sampled = cli_generate(data_dir, served, "JULIET:", 30, capsys, "--temperature", "0.9", "--top-k", "10",
                           "--seed", "5")
    for model_name in (NAME, served):
        again = client.completions.create(model=model_name, prompt="JULIET:", max_tokens=30, temperature=0.9,
                                          extra_body={"top_k": 10}, seed=5)
        assert again.choices[0].text == sampled
    others = {client.completions.create(model=NAME, prompt="JULIET:", max_tokens=30, temperature=0.9, seed=seed)
              .choices[0].text for seed in (1, 2, 3)}
    assert len(others) > 1, "different seeds gave one text"

    stopped = client.completions.create(model=NAME, prompt="ROMEO:", max_tokens=40, temperature=0, stop=[greedy[12:15]])
    assert (stopped.choices[0].text, stopped.choices[0].finish_reason) == (greedy[:greedy.index(greedy[12:15])], "stop")

    with pytest.raises(openai.NotFoundError, match="model 'other' is not served here"):
        client.completions.create(model="other", prompt="ROMEO:")


@pytest.mark.slow
def test_bad_input_gets_a_clear_openai_error_and_the_server_stays_healthy(server):
    url = server["url"] + "/v1/completions"
    good = {"model": NAME, "prompt": "ROMEO:", "max_tokens": 5}
    cases = [
        (b'{"model": "tiny", "prompt": "RO', 400, "the body is not valid JSON"),
        (b'[1, 2]', 400, "the body must be a JSON object"),
        (json.dumps({**good, "prompt": "x" * 1_100_000}).encode(), 413, "over 1,000,000 bytes"),
        (json.dumps({**good, "max_tokens": CAP + 1}).encode(), 400, f"over this server's cap of {CAP:,}"),
        (json.dumps({**good, "prompt": "ROMEO: café"}).encode(), 400, 'outside the vocabulary of tiny@v2: "é" (x1)'),
        (json.dumps({**good, "model": "tiny@v1"}).encode(), 404, "model 'tiny@v1' is not served here"),
        (json.dumps({**good, "prompt": [1, 2, 3]}).encode(), 400, "send the prompt as a string"),
        (json.dumps({**good, "prompt": ""}).encode(), 400, "the prompt is empty"),
        (json.dumps({**good, "n": 2}).encode(), 400, "n=2 is not supported"),
        (json.dumps({**good, "max_tokens": "many"}).encode(), 400, "max_tokens"),
        (json.dumps({**good, "temperature": -1}).encode(), 400, "temperature"),
        (json.dumps({**good, "colour": "blue"}).encode(), 400, "unknown parameter 'colour'"),
        (json.dumps({"prompt": "ROMEO:"}).encode(), 400, "model is required"),
        (json.dumps({**good, "stop": ["a", "b", "c", "d", "e"]}).encode(), 400, "at most 4"),
        (json.dumps({**good, "stop": "x" * 129}).encode(), 400, "a string of 1 to 128 characters"),
        (b"[" * 100_000 + b"]" * 100_000, 400, "nests too deeply"),
    ]
    for body, status, message in cases:
        response = httpx.post(url, content=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert response.status_code == status, (body[:80], response.text)
        error = response.json()["error"]
        assert message in error["message"] and error["type"] == "invalid_request_error", error
    missing = httpx.get(server["url"] + "/v1/chat", timeout=5)
    assert missing.status_code == 404 and "the routes are" in missing.json()["error"]["message"]
    assert health(server["url"])["status"] == "ok"
    assert httpx.post(url, json=good, timeout=30).json()["usage"]["completion_tokens"] == 5


@pytest.mark.slow
def test_concurrent_clients_share_decoding_steps_and_metrics_count_them(server):
    url = server["url"]
    steps_before = metric(url, "cortexcraft_batch_rows_count")
    rows_before = metric(url, "cortexcraft_batch_rows_sum")
    tokens_before = metric(url, "cortexcraft_generated_tokens_total")

    def complete(index: int) -> None:
        response = httpx.post(url + "/v1/completions", timeout=60, json={
            "model": NAME, "prompt": "ROMEO:", "max_tokens": 200, "temperature": 0.8, "seed": index})
        assert response.status_code == 200

    threads = [threading.Thread(target=complete, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    steps = metric(url, "cortexcraft_batch_rows_count") - steps_before
    rows = metric(url, "cortexcraft_batch_rows_sum") - rows_before
    assert metric(url, "cortexcraft_generated_tokens_total") - tokens_before == 8 * 200
    assert rows / steps > 2, f"{rows:.0f} rows in {steps:.0f} steps: the clients were not batched together"
    text = httpx.get(url + "/metrics", timeout=5).text
    for family in ("cortexcraft_http_requests_total", "cortexcraft_http_request_duration_seconds_bucket",
                   "cortexcraft_generated_tokens_total", "cortexcraft_queue_depth", "cortexcraft_swaps_total",
                   "cortexcraft_served_info", "cortexcraft_time_to_first_token_seconds_bucket"):
        assert family in text
    assert 'cortexcraft_http_requests_total{route="/v1/completions",status="200"}' in text


def wait_for_idle(url: str) -> None:
    wait_until("the generation to stop", lambda: metric(url, "cortexcraft_active_completions") == 0, 5, interval=0.05)


@pytest.mark.slow
def test_a_client_that_goes_away_stops_its_generation(server):
    url = server["url"]
    cancelled = 'cortexcraft_completions_total{finish_reason="cancelled"}'
    gone = 'cortexcraft_http_requests_total{route="/v1/completions",status="499"}'
    before = {name: metric(url, name) for name in (cancelled, gone, "cortexcraft_generated_tokens_total")}
    body = {"model": NAME, "prompt": "ROMEO:", "max_tokens": CAP, "temperature": 0.8}

    with httpx.stream("POST", url + "/v1/completions", json={**body, "stream": True}, timeout=30) as response:
        next(response.iter_lines())  # the first piece arrived; dropping the iterator closes the connection
    gone_at = time.monotonic()
    wait_for_idle(url)
    stream_stopped = time.monotonic() - gone_at
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=1.0)
    gone_at = time.monotonic()
    wait_for_idle(url)
    plain_stopped = time.monotonic() - gone_at

    after = {name: metric(url, name) for name in before}
    assert after[cancelled] - before[cancelled] == 2 and after[gone] - before[gone] == 2
    generated = after["cortexcraft_generated_tokens_total"] - before["cortexcraft_generated_tokens_total"]
    assert generated < CAP / 2, f"{generated:.0f} tokens generated for two clients that went away"
    assert health(url)["active"] == 0
    print(f"\nclients gone: generation stopped within {stream_stopped:.2f} s (stream) and {plain_stopped:.2f} s "
          f"(plain, after a 1 s client timeout); {generated:.0f} tokens generated of 2 x {CAP:,} asked")


@pytest.mark.slow
def test_the_page_streams_an_answer_with_the_served_version_in_chromium(server):
    require_chromium()
    from playwright.sync_api import sync_playwright

    url = server["url"]
    served = health(url)["fingerprint"]
    expected = httpx.post(url + "/v1/completions", timeout=30, json={
        "model": NAME, "prompt": "JULIET:\nO, ", "max_tokens": 60, "temperature": 0}).json()["choices"][0]["text"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.goto(url + "/")
        page.wait_for_function("document.getElementById('version').textContent !== '…'")
        assert page.text_content("#version") == served
        page.fill("#prompt", "JULIET:\nO, ")
        page.fill("#max-tokens", "60")
        page.fill("#temperature", "0")
        page.click("#generate")
        page.wait_for_selector('#status[data-state="done"]', timeout=30_000)
        shown = page.text_content("#output")
        pieces = int(page.get_attribute("#output", "data-chunks"))
        status = page.text_content("#status")

        page.fill("#prompt", "ROMEO: café")
        page.click("#generate")
        page.wait_for_selector('#status[data-state="error"]', timeout=30_000)
        error = page.text_content("#status")
    assert shown == expected and pieces > 1, (shown, pieces)
    assert status.startswith("done (length)")
    assert error.startswith("400: the prompt has characters outside the vocabulary") and '"é"' in error


def complete(http: httpx.Client, request: dict) -> tuple[str, str, str]:
    """(fingerprint, text, finish reason) of one completion, streamed or not; a stream must be
    answered by one version from its first chunk to its last."""
    body = {"model": NAME, **request}
    if not request["stream"]:
        response = http.post("/v1/completions", json=body)
        response.raise_for_status()
        answer = response.json()
        return answer["system_fingerprint"], answer["choices"][0]["text"], answer["choices"][0]["finish_reason"]
    with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        events = stream_events(response)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = events[:-1]
    assert all("error" not in chunk for chunk in chunks), chunks
    fingerprints = {chunk["system_fingerprint"] for chunk in chunks}
    assert len(fingerprints) == 1, f"one stream answered by {fingerprints}"
    text = "".join(c["choices"][0]["text"] for c in chunks)
    return fingerprints.pop(), text, chunks[-1]["choices"][0]["finish_reason"]


@pytest.mark.slow
def test_six_clients_through_thirty_swaps_and_a_damaged_version_lose_no_request(server, keyed_server, models):
    url = server["url"]
    requests = [{"prompt": prompt, "max_tokens": tokens, "temperature": temperature, "seed": seed, "stream": stream}
                for prompt, tokens, temperature, seed in (("ROMEO:", 24, 0, None), ("JULIET:\n", 40, 0.8, 3),
                                                          ("O, ", 16, 1.0, 11), ("HAMLET:\nO, the", 32, 0, None))
                for stream in (False, True)]
    answers: list[tuple[int, str, str, str]] = []
    failures: list[str] = []
    stop = threading.Event()

    def client(index: int) -> None:
        rng = random.Random(index)
        with httpx.Client(base_url=url, timeout=60) as http:
            while not stop.is_set():
                which = rng.randrange(len(requests))
                try:
                    answers.append((which, *complete(http, requests[which])))
                except Exception as exc:  # noqa: BLE001 -- every failure is reported below
                    failures.append(f"{requests[which]}: {exc!r}")

    assert health(url)["version"] == "v2"
    swaps_before = metric(url, "cortexcraft_swaps_total")
    clients = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for thread in clients:
        thread.start()
    seconds = []
    try:
        for swap in range(30):
            if swap % 2 == 0:
                registry.promote(models, f"{NAME}@v1")   # as `cortexcraft models promote tiny@v1`
            else:
                registry.rollback(models, NAME)           # as `cortexcraft models rollback tiny`
            seconds.append(wait_for_version(url, registry.read_champion(models, NAME)["version"], timeout=5))
            if swap == 15:  # serving v2 (rolled back): a damaged champion must not take over
                registry.promote(models, f"{NAME}@v3")
                wait_until("the damaged v3 to be refused", lambda: "v3" in (health(url)["swap_error"] or ""), 5,
                           server["log"], interval=0.05)
                time.sleep(0.5)  # requests keep coming meanwhile
                assert health(url)["version"] == "v2"
                registry.rollback(models, NAME)
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in clients:
            thread.join(60)

    assert failures == [], failures[:5]
    expected: dict[tuple[str, int], str] = {}
    for which, fingerprint, text, finish in answers:
        name, version = fingerprint.split("@")
        request = requests[which]
        if (version, which) not in expected:
            expected[version, which] = generate_from_run(
                registry.version_dir(models, name, version), prompt=request["prompt"],
                max_new_tokens=request["max_tokens"], temperature=request["temperature"],
                seed=request["seed"] if request["seed"] is not None else 1337)
        assert (text, finish) == (expected[version, which], "length"), (fingerprint, request)
    versions = [fingerprint for _, fingerprint, _, _ in answers]
    assert {f"{NAME}@v1", f"{NAME}@v2"} == set(versions)
    assert metric(url, "cortexcraft_swaps_total") - swaps_before == 30
    assert metric(url, "cortexcraft_swap_failures_total") == 1
    wait_until("the earlier version to leave memory", lambda: metric(url, "cortexcraft_models_loaded") == 1, 5)
    log = server["log"].read_text()
    assert re.search(r"ERROR .*not serving tiny@v3: checkpoint file \S+model.safetensors is missing or damaged "
                     r"\(hash mismatch\).*; still serving tiny@v2", log), tail(server["log"])
    # The pinned server saw every pointer change and never swapped.
    assert health(keyed_server["url"])["version"] == "v1"
    print(f"\n{len(answers)} answers ({versions.count(NAME + '@v1')} by v1, {versions.count(NAME + '@v2')} by v2), "
          f"0 failed; 30 swaps + 1 damaged version refused; swap visible after {min(seconds):.2f}-{max(seconds):.2f} s "
          f"(median {sorted(seconds)[15]:.2f} s)")


@pytest.mark.slow
def test_with_a_key_every_route_but_health_needs_it(keyed_server):
    url = keyed_server["url"]
    assert httpx.get(url + "/health", timeout=5).status_code == 200
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("GET", "/"), ("POST", "/v1/completions")):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
            response = httpx.request(method, url + path, headers=headers, json={}, timeout=5)
            assert response.status_code == 401, (method, path, headers)
            assert response.json()["error"]["code"] == "invalid_api_key"
            assert response.headers["WWW-Authenticate"] == "Bearer"
        assert httpx.request(method, url + path, headers={"Authorization": f"Bearer {KEY}"},
                             json={"model": NAME, "prompt": "ROMEO:", "max_tokens": 3}, timeout=30).status_code == 200
    answer = openai.OpenAI(base_url=url + "/v1", api_key=KEY).completions.create(model=f"{NAME}@v1", prompt="ROMEO:",
                                                                                max_tokens=3)
    assert answer.system_fingerprint == f"{NAME}@v1"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="wrong").completions.create(model=NAME, prompt="ROMEO:")
    with pytest.raises(openai.NotFoundError, match="this server serves tiny@v1"):
        openai.OpenAI(base_url=url + "/v1", api_key=KEY).completions.create(model=f"{NAME}@champion", prompt="ROMEO:")


@pytest.mark.slow
def test_a_full_queue_is_answered_429_with_retry_after(keyed_server):
    url = keyed_server["url"]
    auth = {"Authorization": f"Bearer {KEY}"}
    body = {"model": NAME, "prompt": "ROMEO:", "temperature": 0.8}
    waiting: list[httpx.Response] = []
    with httpx.stream("POST", url + "/v1/completions", headers=auth, timeout=30,
                      json={**body, "max_tokens": CAP, "stream": True}) as generating:
        lines = generating.iter_lines()  # kept: dropping the iterator closes the connection
        next(lines)  # the one row of the batch is taken
        queued = threading.Thread(target=lambda: waiting.append(httpx.post(
            url + "/v1/completions", headers=auth, timeout=60, json={**body, "max_tokens": 5})))
        queued.start()
        wait_until("the second request to wait", lambda: health(url)["queue"] == 1, 10, interval=0.05)
        refused = httpx.post(url + "/v1/completions", headers=auth, timeout=30, json={**body, "max_tokens": 5})
        with pytest.raises(openai.RateLimitError):
            openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0).completions.create(
                model=NAME, prompt="ROMEO:", max_tokens=5)
    queued.join(60)
    assert refused.status_code == 429 and 1 <= int(refused.headers["Retry-After"]) <= 60
    error = refused.json()["error"]
    assert (error["type"], error["code"]) == ("rate_limit_error", "queue_full") and "--max-queue 1" in error["message"]
    assert waiting[0].status_code == 200 and waiting[0].json()["usage"]["completion_tokens"] == 5
    assert health(url)["status"] == "ok"


@pytest.mark.slow
def test_sigterm_stops_accepting_finishes_the_requests_in_flight_and_exits_0(data_dir, tmp_path):
    """(Also serves a run directory with --run, not a registered model.)"""
    log = tmp_path / "serve.log"
    results: list[list] = []
    started = threading.Semaphore(0)
    run_dir = data_dir.parent / "runs" / "run1"  # an unregistered run: served as run1@<its checkpoint>
    with live_server(["--run", str(run_dir), "--checkpoint", "last", "--max-tokens-cap", str(CAP),
                      "--grace-seconds", "60"], log) as live:
        url, proc = live["url"], live["proc"]
        assert health(url)["fingerprint"] == "run1@step_00000040"

        def client() -> None:
            with httpx.stream("POST", url + "/v1/completions", timeout=120, json={
                    "model": "run1", "prompt": "ROMEO:", "max_tokens": 2000, "temperature": 0.8, "stream": True,
                    "stream_options": {"include_usage": True}}) as response:
                lines = response.iter_lines()
                first = next(lines)
                started.release()
                results.append(stream_events_from([first, *lines]))

        clients = [threading.Thread(target=client) for _ in range(3)]
        for thread in clients:
            thread.start()
        for _ in clients:
            assert started.acquire(timeout=60)
        proc.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        refused_after = _seconds_until_refused(url)
        for thread in clients:
            thread.join(120)
        drained_after = time.monotonic() - signalled
        exit_status = proc.wait(60)
        exited_after = time.monotonic() - signalled
    assert exit_status == 0, tail(log)
    assert refused_after < 2.0
    assert len(results) == 3
    for events in results:
        assert events[-1] == "[DONE]" and events[-2]["usage"]["completion_tokens"] == 2000
        assert events[-3]["choices"][0]["finish_reason"] == "length"
    text = log.read_text()
    assert "SIGTERM: accepting no more connections; finishing 3 requests in flight (up to 60.0 s)" in text, tail(log)
    assert "INFO cortexcraft.server: stopped" in text
    print(f"\nSIGTERM: connections refused after {refused_after:.2f} s; 3 x 2,000-token streams finished "
          f"{drained_after:.2f} s after it; exit 0 after {exited_after:.2f} s")


def stream_events_from(lines) -> list:
    return [line[6:] if line == "data: [DONE]" else json.loads(line[6:]) for line in lines if line.startswith("data: ")]


def _seconds_until_refused(url: str) -> float:
    host, port = url.removeprefix("http://").rsplit(":", 1)
    started = time.monotonic()
    while time.monotonic() - started < 10:
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
        except ConnectionRefusedError:
            return time.monotonic() - started
        time.sleep(0.02)
    return float("inf")


def test_serving_beyond_loopback_needs_an_api_key(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CORTEXCRAFT_API_KEY", raising=False)
    assert main(["serve", "--model", NAME, "--data-dir", str(tmp_path), "--host", "0.0.0.0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["cortexcraft serve: error: --host 0.0.0.0 serves beyond this machine, so requests must carry a key: "
                   "set CORTEXCRAFT_API_KEY (clients send Authorization: Bearer KEY), or serve on 127.0.0.1"]


def test_an_unknown_model_or_a_busy_port_is_one_line(data_dir, tmp_path, capsys):
    assert main(["serve", "--model", "nope", "--data-dir", str(data_dir)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("cortexcraft serve: error: no model 'nope' in ")
    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        assert main(["serve", "--model", NAME, "--data-dir", str(data_dir), "--port", str(port)]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"cortexcraft serve: error: cannot listen on 127.0.0.1:{port} (Address already in use); "
        f"choose another --port or --host")


def test_only_the_inference_thread_runs_the_model(models):
    """The HTTP side (here Starlette's test client) parses, tokenizes and streams; every module of
    the model runs on the engine's one thread."""
    from fastapi.testclient import TestClient

    from cortexcraft.engine import InferenceEngine, ServingMetrics, verified_version
    from cortexcraft.server import create_app

    callers: set[str] = set()
    engine = InferenceEngine(torch.device("cpu"), ServingMetrics(), max_batch=4)
    engine.start(verified_version(models, NAME, "v2"))
    for module in engine.current.model.modules():
        module.register_forward_pre_hook(lambda module, args: callers.add(threading.current_thread().name))
    try:
        with TestClient(create_app(engine, follows="pinned")) as client:
            answers = [client.post("/v1/completions", json={"model": NAME, "prompt": "ROMEO:", "max_tokens": 8,
                                                            "stream": stream}) for stream in (False, True)]
    finally:
        engine.stop()
    assert [a.status_code for a in answers] == [200, 200]
    assert callers == {"cortexcraft-inference"}


def test_characters_outside_the_vocabulary_are_named_unless_it_has_unk():
    from types import SimpleNamespace

    from cortexcraft.server import APIError, _tokenize
    from cortexcraft.tokenizer import CharTokenizer

    plain = SimpleNamespace(tokenizer=CharTokenizer(list(" abc")), fingerprint="m@v1")
    with pytest.raises(APIError, match=r'outside the vocabulary of m@v1: "é" \(x2\)'):
        asyncio.run(_tokenize(plain, "ab é é"))
    with_unk = SimpleNamespace(tokenizer=CharTokenizer(list(" abc"), unk="<unk>"), fingerprint="m@v2")
    assert asyncio.run(_tokenize(with_unk, "abé")) == [1, 2, 4]
