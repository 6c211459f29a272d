"""Private and gated hub repos, on a loopback hub that wants a token: `cortexcraft prepare` of a
dataset and a pretrained `init_from` model, in fresh processes (huggingface_hub and datasets read
HF_ENDPOINT and HF_HOME when imported), with HF_TOKEN set or not."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hf_models import LoopbackHub, make_pretrained
from tiny_runs import repetitive_text

REPO = Path(__file__).resolve().parent.parent
TOKEN = "hf_loopback_secret"


def hub_env(hub: LoopbackHub, home: Path, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE_"))}
    env.update(HF_ENDPOINT=hub.endpoint, HF_HOME=str(home), HF_HUB_DISABLE_TELEMETRY="1", OMP_NUM_THREADS="1")
    if token is not None:
        env["HF_TOKEN"] = token
    return env


@pytest.fixture
def dataset_repo(tmp_path) -> tuple[Path, list[str]]:
    """A dataset repository as the hub stores one: a parquet file of documents under data/."""
    texts = [repetitive_text(2_000, seed=i) for i in range(12)]
    (tmp_path / "repo" / "data").mkdir(parents=True)
    pq.write_table(pa.table({"text": texts}), tmp_path / "repo" / "data" / "train-00000-of-00001.parquet")
    return tmp_path / "repo", texts


def prepare(hub: LoopbackHub, tmp_path: Path, token: str | None, name: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "cortexcraft",
            "prepare",
            "--source",
            f"hf:{hub.repo}",
            "--out",
            str(tmp_path / name),
            "--cache-dir",
            str(tmp_path / f"{name}-cache"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=hub_env(hub, tmp_path / "hf-home", token),
    )


def last_line(result: subprocess.CompletedProcess) -> str:
    return result.stderr.strip().splitlines()[-1]


def test_a_private_dataset_is_refused_without_the_token_naming_hf_token_and_downloads_with_it(tmp_path, dataset_repo):
    directory, texts = dataset_repo
    with LoopbackHub(directory, "me/private-corpus", kind="dataset", token=TOKEN) as hub:
        refused = prepare(hub, tmp_path, None, "without")
        assert refused.returncode == 2
        assert last_line(refused) == (
            "cortexcraft prepare: error: the hub has no dataset me/private-corpus at revision 'main' (HTTP 401); "
            "check the id and revision, or, if it is private or gated, set HF_TOKEN to a token that can read it "
            "(or run `hf auth login`)"
        )
        assert not (tmp_path / "without").exists()

        wrong = prepare(hub, tmp_path, "hf_not_this_one", "wrong")
        assert wrong.returncode == 2 and last_line(wrong).endswith(
            "(HTTP 401); check the id and revision, and that your token (HF_TOKEN or `hf auth login`) can read it"
        )

        hub.requests.clear()
        done = prepare(hub, tmp_path, TOKEN, "with")
        assert done.returncode == 0, done.stderr[-2000:]
    corpus = json.loads((tmp_path / "with" / "manifest.json").read_text())["source"]
    assert corpus["documents"] == len(texts) and corpus["chars"] == len("\n\n".join(texts))
    # The revision lookup, the listing and the download itself: every repo request carried the token.
    repo_requests = [r for r in hub.requests if "me/private-corpus" in r[1]]
    assert any(path.endswith(".parquet") for _, path, _ in repo_requests)
    assert repo_requests and all(authorised for _, _, authorised in repo_requests)


def test_a_gated_dataset_names_hf_token_and_the_page_to_ask_for_access(tmp_path, dataset_repo):
    directory, _ = dataset_repo
    with LoopbackHub(directory, "org/gated-corpus", kind="dataset", token=TOKEN, gated=True) as hub:
        refused = prepare(hub, tmp_path, None, "without")
        denied = prepare(hub, tmp_path, "hf_not_granted", "denied")
    assert refused.returncode == 2 and last_line(refused) == (
        "cortexcraft prepare: error: the hub's dataset org/gated-corpus is gated and no token is set (HTTP 401); set "
        "HF_TOKEN to a token that can read it (or run `hf auth login`), for an account that was granted access on "
        f"{hub.endpoint}/datasets/org/gated-corpus"
    )
    assert denied.returncode == 2 and last_line(denied) == (
        "cortexcraft prepare: error: the hub's dataset org/gated-corpus is gated and your token (HF_TOKEN or `hf auth "
        f"login`) has no access (HTTP 403); request it on {hub.endpoint}/datasets/org/gated-corpus"
    )


PRETRAINED = """if True:
    import json, sys
    from cortexcraft.errors import CortexCraftError
    from cortexcraft.pretrained import pretrained_dir
    from tasks.stage import pretrained_digest
    out = {}
    try:
        out["digest"] = pretrained_digest(sys.argv[1])
        out["dir"] = str(pretrained_dir(sys.argv[1]))
    except CortexCraftError as exc:
        out["error"] = str(exc)
    print(json.dumps(out))
"""


def pretrained(hub: LoopbackHub, home: Path, token: str | None, spec: str = "hf:someone/private-gpt2") -> dict:
    result = subprocess.run(
        [sys.executable, "-c", PRETRAINED, spec],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        env=hub_env(hub, home, token),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_pretrained_hub_model_is_keyed_by_its_commit_and_fetched_with_the_token(tmp_path):
    pytest.importorskip("transformers")
    import transformers

    directory = make_pretrained(transformers, tmp_path / "gpt2")
    home = tmp_path / "hf-home"
    with LoopbackHub(directory, "someone/private-gpt2", token=TOKEN, commit="1" * 40) as hub:
        refused = pretrained(hub, home, None)
        assert refused == {
            "error": (
                "the hub has no model someone/private-gpt2 at revision 'main' (HTTP 401); check the id and revision, "
                "or, if it is private or gated, set HF_TOKEN to a token that can read it (or run `hf auth login`)"
            )
        }
        first = pretrained(hub, home, TOKEN)
        assert first["digest"] == ["hf:someone/private-gpt2@" + "1" * 40]
        assert Path(first["dir"]).name == "1" * 40 and (Path(first["dir"]) / "model.safetensors").is_file()
        hub.commit = "2" * 40  # a new push to main: the stages that use the model must re-run
        second = pretrained(hub, home, TOKEN)
        assert second["digest"] == ["hf:someone/private-gpt2@" + "2" * 40] and Path(second["dir"]).name == "2" * 40
        # A pinned revision resolves through the hub too.
        assert pretrained(hub, home, TOKEN, "hf:someone/private-gpt2@v1")["digest"] == [
            "hf:someone/private-gpt2@" + "2" * 40
        ]
    # No hub at all: the commit of the copy downloaded before keys it.
    assert pretrained(hub, home, TOKEN)["digest"] == ["hf:someone/private-gpt2@" + "2" * 40]
