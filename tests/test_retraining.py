"""Scheduled retraining for real (slow): a Prefect server, a process worker and the prefect.yaml
deployments; three runs of `retrain-nightly` with the auto policy, as three nights:

1. night 1 trains v1 from scratch: the first version, champion;
2. the source file has changed: auto picks finetune from v1, giving v2, which is promoted;
3. an override that makes training worse (a huge learning rate): auto picks continue from v2,
   giving v3, which is not promoted; the champion stays v2.

The promotion automation (the champion-card deployment's trigger) runs for v1 and v2 only; the
model-history artifact has three rows; `cortexcraft generate --model cpu@champion` uses v2.
"""
from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from cortexcraft import registry
from cortexcraft.generate import generate_from_run
from prefect_server import (POOL, REPO, TERMINAL, api_get, prefect, prefect_server, run_deployment, start, stop,
                            tail, wait_for_flow_run, wait_until)

TINY = ["n_layer=1", "n_head=2", "n_embd=32", "block_size=32", "batch_size=8", "max_iters=60",
        "warmup_iters=5", "eval_interval=20", "eval_iters=4", "checkpoint_interval=20", "max_new_tokens=40",
        "device=cpu"]
WORSE = ["lr=2.0"]  # night 3: an override that wrecks the model


def texts(tinyshakespeare_path: Path) -> tuple[str, str]:
    """Night 1's corpus, and night 2's: more text appended, in the same characters (same vocabulary)."""
    full = tinyshakespeare_path.read_text(encoding="utf-8")
    first = full[:200_000]
    known = set(first)
    return first, first + "".join(c for c in full[200_000:300_000] if c in known)


@pytest.mark.slow
def test_three_nights_of_retraining_through_server_worker_and_deployment(tmp_path, tinyshakespeare_path):
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    source, data_dir = tmp_path / "input.txt", tmp_path / "data"
    night1_text, night2_text = texts(tinyshakespeare_path)
    models = registry.models_dir_of(data_dir)

    with ExitStack() as cleanup:
        env = dict(cleanup.enter_context(prefect_server(tmp_path / "prefect-home", server_log)), OMP_NUM_THREADS="1")
        api = env["PREFECT_API_URL"]
        prefect(env, "work-pool", "create", POOL, "--type", "process")
        prefect(env, "--no-prompt", "deploy", "--all")
        worker = start([sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL], env, worker_log)
        cleanup.callback(stop, worker, 2)

        def night(overrides: list[str]) -> dict:
            params = {"params": {"source": str(source), "data_dir": str(data_dir), "overrides": TINY + overrides,
                                 "retrain": "auto", "retrain_iters": 40}}
            run = wait_for_flow_run(api, run_deployment(env, "pipeline/retrain-nightly", params), worker_log)
            assert run["state_type"] == "COMPLETED", tail(worker_log, 80)
            return run

        source.write_text(night1_text, encoding="utf-8")
        night([])
        source.write_text(night2_text, encoding="utf-8")  # new data arrived during the day
        night([])
        night(WORSE)

        v1, v2, v3 = registry.list_versions(models, "cpu")
        assert [v["policy"]["mode"] for v in (v1, v2, v3)] == ["fresh", "finetune", "continue"]
        assert (v2["policy"]["parent"], v3["policy"]["parent"]) == ("v1", "v2")
        assert v1["data"]["fingerprint"] != v2["data"]["fingerprint"] == v3["data"]["fingerprint"]
        # Each run's best checkpoint lies in its own segment: 20 or 40 steps past its parent's.
        assert v1["step"] in (40, 60) and v2["step"] - v1["step"] in (20, 40) and v3["step"] - v2["step"] in (20, 40)
        assert [v["decision"]["promoted"] for v in (v1, v2, v3)] == [True, True, False]
        assert (
            v3["decision"]["message"].startswith("not promoted: val ") and "vs champion v2" in v3["decision"]["message"]
        )
        assert registry.read_champion(models, "cpu")["version"] == "v2"

        history = latest_artifact(api, "model-history-cpu")
        rows = json.loads(history["data"])
        assert [(r["version"], r["promoted"], r["champion"]) for r in rows] == [
            ("v1", True, False),
            ("v2", True, True),
            ("v3", False, False),
        ]
        chart = latest_artifact(api, "model-losses-cpu")
        assert "data:image/svg+xml;base64," in chart["data"]

        # The events, and the automation that reacts to promotions (it ran for v1 and v2 only).
        events = wait_until(
            "the three model events", lambda: e if len(e := model_events(api)) == 3 else None, 30, server_log
        )
        assert [(e["event"], e["payload"]["version"]) for e in events] == [
            ("cortexcraft.model.promoted", "v1"),
            ("cortexcraft.model.promoted", "v2"),
            ("cortexcraft.model.rejected", "v3"),
        ]
        assert events[2]["payload"]["val_loss"] == v3["val_loss"] and events[2]["payload"]["champion"] == "v2"
        card = api_get(api, "/deployments/name/champion-card/champion-card")

        def cards_done():
            runs = httpx.post(
                f"{api}/flow_runs/filter", timeout=5, json={"flow_runs": {"deployment_id": {"any_": [card["id"]]}}}
            ).json()
            return runs if len(runs) == 2 and all(r["state_type"] in TERMINAL for r in runs) else None

        card_runs = wait_until("champion-card runs for v1 and v2", cards_done, 120, worker_log)
        assert sorted(r["parameters"]["version"] for r in card_runs) == ["v1", "v2"]
        assert all(r["state_type"] == "COMPLETED" for r in card_runs), tail(worker_log, 80)
        assert "# Champion of `cpu`: v2" in latest_artifact(api, "champion-cpu")["data"]

    generated = subprocess.run(
        [
            sys.executable,
            "-m",
            "cortexcraft",
            "generate",
            "--model",
            "cpu@champion",
            "--data-dir",
            str(data_dir),
            "--prompt",
            "ROMEO:",
            "--max-new-tokens",
            "60",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert generated.returncode == 0, generated.stderr
    assert "model cpu@champion is cpu v2" in generated.stderr
    assert (
        generated.stdout
        == generate_from_run(registry.version_dir(models, "cpu", "v2"), prompt="ROMEO:", max_new_tokens=60) + "\n"
    )

    table = ["| version | data | policy | steps | val loss | promoted |", "|---|---|---|---|---|---|"]
    table += [
        f"| {v['version']} | {v['data']['fingerprint'][:12]} ({'night 1 file' if v is v1 else 'changed file'}) | "
        f"{v['policy']['mode']}{' from ' + v['policy']['parent'] if v['policy']['parent'] else ''} | {v['step']} | "
        f"{v['val_loss']:.4f} | {'yes' if v['decision']['promoted'] else 'no'} ({v['decision']['message']}) |"
        for v in (v1, v2, v3)
    ]
    print("\nthree nights:\n" + "\n".join(table))


def latest_artifact(api: str, key: str) -> dict:
    found = httpx.post(f"{api}/artifacts/latest/filter", timeout=5, json={"artifacts": {"key": {"any_": [key]}}}).json()
    assert found, f"no artifact {key}"
    return found[0]


def model_events(api: str) -> list[dict]:
    response = httpx.post(
        f"{api}/events/filter",
        timeout=5,
        json={
            "filter": {
                "event": {"prefix": ["cortexcraft.model."]},
                "order": "ASC",
                "occurred": {"since": "2000-01-01T00:00:00Z"},
            }
        },
    )
    return response.json()["events"] if response.status_code == 200 else []
