"""Sources: local files, loopback HTTP through `datasets`, hub ids with only the network faked."""
from __future__ import annotations

import functools
import hashlib
import http.server
import json
import logging
import re
import socket
import threading
import urllib.parse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import datasets
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cortexcraft import sources
from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.fileio import sha256_file
from cortexcraft.freshness import STATE_DIR
from cortexcraft.sources import download, train_val_cut

REAL_LOAD_DATASET = datasets.load_dataset


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass  # clients may stop reading once they have their answer


@pytest.fixture
def serve():
    """serve(directory) -> base URL of a loopback HTTP server for that directory."""
    servers = []

    def start(directory):
        server = http.server.ThreadingHTTPServer(
            ("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(directory))
        )
        threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_port}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture
def closed_url():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class FakeHub(list):
    """The load_dataset calls our code made, plus the hub API's answers: ``revisions[(repo, rev)]``
    is the commit sha a revision resolves to (a test may change it to publish a new commit)."""

    def __init__(self):
        super().__init__()
        self.revisions: dict[tuple[str, str], str] = {}
        self.api_calls: list[str] = []

    def sha(self, repo, revision="main"):
        return self.revisions.setdefault((repo, revision), hashlib.sha1(f"{repo}@{revision}".encode()).hexdigest())


@pytest.fixture
def hub(monkeypatch):
    """A reachable fake hub endpoint whose API resolves revisions (any repo exists)."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    fake = FakeHub()

    class Api(_QuietHandler):
        def do_GET(self):
            fake.api_calls.append(self.path)
            match = re.fullmatch(r"/api/datasets/([^/]+/[^/]+)/revision/([^/?]+)", self.path)
            if not match:
                self.send_error(404)
                return
            body = json.dumps({"id": match[1], "sha": fake.sha(match[1], urllib.parse.unquote(match[2]))}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Api)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield fake
    server.shutdown()
    server.server_close()


def _parquet(path, row_group_size=None, **columns):
    pq.write_table(pa.table(columns), path, row_group_size=row_group_size)
    return str(path)


def _no_entries(cache_dir):
    """No corpus entry in the cache (revalidation state under revisions/ does not count)."""
    return not cache_dir.exists() or not [p for p in cache_dir.iterdir() if p.name not in ("datasets", STATE_DIR)]


def test_local_file_is_used_in_place_and_fingerprinted_by_content(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("héllo\r\nwörld 😀", encoding="utf-8", newline="")
    manifest = download(DataConfig(source=str(path)), tmp_path / "cache")
    assert manifest["path"] == str(path.resolve()) and manifest["chars"] == 14 and manifest["documents"] == 1
    assert manifest["sha256"] == sha256_file(path) and manifest["bytes"] == path.stat().st_size
    assert not (tmp_path / "cache").exists()
    path.write_text("changed", encoding="utf-8")
    assert download(DataConfig(source=str(path)), tmp_path / "cache")["fingerprint"] != manifest["fingerprint"]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"ok\n\xff\xfe", r"is not UTF-8 text \(invalid start byte near byte 3\); convert it to UTF-8"),
        (b"", "is empty; pass a file with text"),
    ],
)
def test_bad_local_files_are_errors(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CortexCraftError, match=message):
        download(DataConfig(source=str(path)), tmp_path / "cache")


def test_unknown_source_names_the_accepted_forms(tmp_path):
    with pytest.raises(CortexCraftError, match="'tinyshakespear' is not a known name .* check the spelling or path"):
        download(DataConfig(source="tinyshakespear"), tmp_path / "cache")
    with pytest.raises(CortexCraftError, match="is not hf:OWNER/NAME"):
        download(DataConfig(source="hf:just-a-name"), tmp_path / "cache")
    with pytest.raises(CortexCraftError, match="matches no files"):
        download(DataConfig(source=str(tmp_path / "*.nothing")), tmp_path / "cache")


def test_directory_and_glob_sources_are_documents_joined_by_the_separator(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "b.txt").write_text("bee", encoding="utf-8")
    (docs / "a.txt").write_text("ay", encoding="utf-8")
    (docs / "sub" / "c.txt").write_text("sea", encoding="utf-8")
    (docs / ".hidden").write_text("skip me", encoding="utf-8")
    manifest = download(DataConfig(source=str(docs)), tmp_path / "cache")
    with open(manifest["path"], encoding="utf-8", newline="") as handle:
        assert handle.read() == "ay\n\nbee\n\nsea"
    assert manifest["documents"] == 3 and list(sources.document_starts(manifest)) == [0, 4, 9]
    assert download(DataConfig(source=str(docs)), tmp_path / "cache") == manifest
    globbed = download(DataConfig(source=str(docs / "*.txt"), separator="<eos>"), tmp_path / "cache")
    with open(globbed["path"], encoding="utf-8") as handle:
        assert handle.read() == "ay<eos>bee"
    limited = download(DataConfig(source=str(docs), max_docs=2), tmp_path / "cache")
    assert limited["documents"] == 2 and limited["chars"] == len("ay\n\nbee")
    (docs / "a.txt").write_text("AY", encoding="utf-8")
    assert download(DataConfig(source=str(docs)), tmp_path / "cache")["fingerprint"] != manifest["fingerprint"]


def _mixed_directory(tmp_path):
    """Text and parquet files (several row groups, a null row), in and below one directory, and
    the documents they hold in corpus order."""
    directory = tmp_path / "mixed"
    (directory / "sub").mkdir(parents=True)
    texts = [f"row {i} — ünïcode 😀\n" * (i % 7 + 1) for i in range(60)]
    (directory / "a.txt").write_text("first file ✓", encoding="utf-8")
    _parquet(directory / "b.parquet", 6, text=texts[:40] + [None])
    (directory / "c.txt").write_text("third\r\nfile", encoding="utf-8", newline="")
    _parquet(directory / "sub" / "d.parquet", 4, text=texts[40:], id=list(range(20)))
    (directory / "sub" / "e.txt").write_text("last", encoding="utf-8")
    return directory, ["first file ✓", *texts[:40], "", "third\r\nfile", *texts[40:], "last"]


def test_several_processes_collect_the_same_corpus_as_one(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(sources, "SEGMENT_BYTES", 300)  # many segments: runs of text files, row-group ranges
    directory, documents = _mixed_directory(tmp_path)
    config = DataConfig(source=str(directory), separator="<|endoftext|>")
    one = download(config, tmp_path / "one")
    with caplog.at_level(logging.INFO, logger="cortexcraft.sources"):
        two = download(config, tmp_path / "two", workers=2)
    assert _segments_collected(caplog) >= 8
    with open(two["path"], encoding="utf-8", newline="") as handle:
        assert handle.read() == "<|endoftext|>".join(documents)
    assert np.array_equal(sources.document_starts(two), sources.document_starts(one)) and two["documents"] == len(
        documents
    )
    assert {k: v for k, v in two.items() if k not in ("path", "doc_starts")} == {
        k: v for k, v in one.items() if k not in ("path", "doc_starts")
    }
    assert sorted(p.name for p in Path(two["path"]).parent.iterdir()) == ["corpus.json", "corpus.txt", "doc_starts.npy"]
    assert download(config, tmp_path / "two", workers=2) == two  # cached


def test_a_bad_file_met_by_a_worker_is_one_line_and_nothing_is_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(sources, "SEGMENT_BYTES", 1)  # a segment per file
    docs = tmp_path / "docs"
    docs.mkdir()
    for index in range(4):
        (docs / f"{index}.txt").write_text(f"fine {index}", encoding="utf-8")
    (docs / "5.txt").write_bytes(b"ok\n\xff")
    with pytest.raises(
        CortexCraftError, match=r"5.txt is not UTF-8 text \(invalid start byte near byte 3\); convert it to UTF-8"
    ):
        download(DataConfig(source=str(docs)), tmp_path / "cache", workers=2)
    assert _no_entries(tmp_path / "cache")
    (docs / "5.txt").write_bytes(b"")
    with pytest.raises(CortexCraftError, match=r"5.txt is empty; pass a file with text"):  # found before any work
        download(DataConfig(source=str(docs)), tmp_path / "cache", workers=2)


def test_http_url_through_datasets_is_exact_and_cached(tmp_path, serve, tinyshakespeare_path, monkeypatch):
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    url = serve(tinyshakespeare_path.parent) + "/input.txt"
    manifest = download(DataConfig(source=url), tmp_path / "cache")
    assert manifest["chars"] == 1_115_394 and manifest["sha256"] == sha256_file(tinyshakespeare_path)
    entries = [p.name for p in (tmp_path / "cache").iterdir() if p.name != STATE_DIR]
    assert entries == [manifest["path"].split("/")[-2]]
    monkeypatch.setattr(sources, "_url_documents", None)  # revalidated and unchanged: not downloaded again
    assert download(DataConfig(source=url), tmp_path / "cache") == manifest


def test_unreachable_url_fails_fast_naming_it_and_caches_nothing(tmp_path, closed_url):
    with pytest.raises(
        CortexCraftError, match=rf"cannot reach {closed_url}/x.txt \(.*\); download the text and pass --source"
    ):
        download(DataConfig(source=closed_url + "/x.txt"), tmp_path / "cache")
    assert _no_entries(tmp_path / "cache")


def test_missing_url_is_reported_as_http_404(tmp_path, serve):
    url = serve(tmp_path) + "/missing.txt"
    with pytest.raises(CortexCraftError, match=r"answered HTTP 404; check the URL"):
        download(DataConfig(source=url), tmp_path / "cache")
    assert _no_entries(tmp_path / "cache")


def test_default_source_offline_says_how_to_use_a_local_copy(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(
        CortexCraftError, match=r"HF_HUB_OFFLINE is set.*download input.txt and pass --source /path/to/input.txt"
    ):
        download(DataConfig(), tmp_path / "cache")


def test_default_source_without_network_fails_fast_with_the_fix(tmp_path, monkeypatch, closed_url):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", closed_url)
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", closed_url + "/input.txt")
    with pytest.raises(CortexCraftError) as err:
        download(DataConfig(), tmp_path / "cache")
    message = str(err.value)
    assert message.startswith("cannot reach the Hugging Face hub for source 'tinyshakespeare' (")
    assert message.endswith("download input.txt and pass --source /path/to/input.txt") and "\n" not in message
    assert _no_entries(tmp_path / "cache")


def _tinyshakespeare_hub(tmp_path, text, calls):
    cut1, cut2 = 1_003_854, 1_003_854 + 55_770
    files = {
        name: _parquet(tmp_path / f"{name}.parquet", text=[piece])
        for name, piece in (("train", text[:cut1]), ("validation", text[cut1:cut2]), ("test", text[cut2:]))
    }

    def fake(path, *args, **kwargs):
        calls.append((path, kwargs.get("revision")))
        if path != "karpathy/tiny_shakespeare":
            return REAL_LOAD_DATASET(path, *args, **kwargs)
        # The real thing returns splits in an arbitrary order; ours must join train, validation, test.
        return REAL_LOAD_DATASET(
            "parquet", data_files={k: files[k] for k in ("test", "train", "validation")}, cache_dir=kwargs["cache_dir"]
        )

    return fake


def test_tinyshakespeare_from_the_hub_is_the_exact_text(tmp_path, hub, monkeypatch, tinyshakespeare_path, closed_url):
    text = tinyshakespeare_path.read_text(encoding="utf-8")
    monkeypatch.setattr(datasets, "load_dataset", _tinyshakespeare_hub(tmp_path, text, hub))
    manifest = download(DataConfig(), tmp_path / "cache")
    assert hub == [("karpathy/tiny_shakespeare", hub.sha("karpathy/tiny_shakespeare", "refs/convert/parquet"))]
    assert manifest["revision"]["sha"] == hub.sha("karpathy/tiny_shakespeare", "refs/convert/parquet")
    assert manifest["chars"] == 1_115_394 and manifest["sha256"] == sha256_file(tinyshakespeare_path)
    monkeypatch.setenv("HF_ENDPOINT", closed_url)
    offline = download(DataConfig(), tmp_path / "cache")  # the hub is gone: the revision seen last serves
    assert offline["revision"]["checked_by"].startswith("not revalidated: cannot reach")
    assert dict(offline, revision=manifest["revision"]) == manifest
    assert len(hub) == 1


def test_a_new_hub_commit_is_downloaded_and_an_unchanged_one_is_not(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _streaming_hub(tmp_path, hub, ["one", "two"]))
    first = download(DataConfig(source="hf:me/corpus"), tmp_path / "cache")
    assert first["revision"]["sha"] == hub.sha("me/corpus") and len(hub) == 1
    assert download(DataConfig(source="hf:me/corpus"), tmp_path / "cache")["path"] == first["path"]
    assert len(hub) == 1 and hub.api_calls[-1] == "/api/datasets/me/corpus/revision/main"
    hub.revisions[("me/corpus", "main")] = "f" * 40  # someone pushed to main
    second = download(DataConfig(source="hf:me/corpus"), tmp_path / "cache")
    assert hub[-1][:2] == ("me/corpus", "f" * 40) and len(hub) == 2
    assert second["path"] != first["path"] and second["revision"]["sha"] == "f" * 40
    assert "hub commit ffffffffffff" in sources.describe_revision(second["revision"])


def test_tinyshakespeare_falls_back_to_the_raw_file_url(tmp_path, hub, monkeypatch, serve, tinyshakespeare_path):
    def hub_down(path, *args, **kwargs):
        hub.append(path)
        if path == "karpathy/tiny_shakespeare":
            raise ConnectionError("Couldn't reach 'karpathy/tiny_shakespeare' on the Hub")
        return REAL_LOAD_DATASET(path, *args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub_down)
    monkeypatch.setattr(sources, "TINYSHAKESPEARE_URL", serve(tinyshakespeare_path.parent) + "/input.txt")
    manifest = download(DataConfig(), tmp_path / "cache")
    assert hub == ["karpathy/tiny_shakespeare", "text"]
    assert manifest["sha256"] == sha256_file(tinyshakespeare_path) and manifest["origin"] == sources.TINYSHAKESPEARE_URL


def _streaming_hub(tmp_path, calls, texts, fail_after=None, row_group_size=None):
    path = _parquet(tmp_path / "owt.parquet", row_group_size, text=texts, id=list(range(len(texts))))

    def fake(repo, *args, **kwargs):
        calls.append((repo, kwargs.get("revision"), kwargs.get("split"), kwargs.get("streaming")))
        stream = REAL_LOAD_DATASET("parquet", data_files=path, split="train", streaming=True)
        if fail_after is None:
            return stream

        class Broken:
            def iter(self, batch_size):
                for i, batch in enumerate(stream.iter(batch_size=1)):
                    if i == fail_after:
                        raise ConnectionError("connection reset by peer")
                    yield batch

        return Broken()

    return fake


def test_openwebtext_streams_and_stops_at_max_docs(tmp_path, hub, monkeypatch):
    texts = [f"document {i} " * 20 for i in range(1000)]
    monkeypatch.setattr(datasets, "load_dataset", _streaming_hub(tmp_path, hub, texts))
    manifest = download(DataConfig(source="openwebtext-10k", max_docs=3), tmp_path / "cache")
    assert hub == [("sam2ai/openwebtext-10k", hub.sha("sam2ai/openwebtext-10k"), "train", True)]
    with open(manifest["path"], encoding="utf-8") as handle:
        assert handle.read() == "\n\n".join(texts[:3])
    assert manifest["documents"] == 3
    by_bytes = download(DataConfig(source="openwebtext", max_bytes=1000, tokenizer="bpe"), tmp_path / "cache")
    assert hub[-1][0] == "dvruette/openwebtext"
    # 4 documents + 3 separators are 919 bytes; the 5th reaches the bound and is kept whole
    assert by_bytes["documents"] == 5 and by_bytes["bytes"] == 5 * 220 + 4 * len("<|endoftext|>")
    assert by_bytes["separator"] == "<|endoftext|>"


def test_hub_spec_with_revision_split_and_column(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _streaming_hub(tmp_path, hub, ["one", "two"]))
    with pytest.raises(CortexCraftError, match=r"has no column 'body' \(columns: text, id\); pass --text-column NAME"):
        download(DataConfig(source="hf:me/corpus@v2:validation", text_column="body"), tmp_path / "cache")
    assert hub == [("me/corpus", hub.sha("me/corpus", "v2"), "validation", True)]
    assert _no_entries(tmp_path / "cache")
    manifest = download(DataConfig(source="hf:me/corpus@v2:validation"), tmp_path / "cache")
    assert manifest["documents"] == 2 and manifest["chars"] == len("one\n\ntwo")


def test_a_broken_stream_is_one_line_and_is_not_cached(tmp_path, hub, monkeypatch):
    monkeypatch.setattr(datasets, "load_dataset", _streaming_hub(tmp_path, hub, ["a", "b", "c"], fail_after=2))
    with pytest.raises(
        CortexCraftError, match=r"failed after 2 documents \(ConnectionError: connection reset by peer\)"
    ):
        download(DataConfig(source="openwebtext"), tmp_path / "cache")
    assert _no_entries(tmp_path / "cache")


def _segments_collected(caplog) -> int:
    found = re.findall(r"collecting (\d+) segments of .* with 2 processes", caplog.text)
    assert len(found) == 1, caplog.text
    return int(found[0])


def test_a_hub_split_is_collected_in_shards_of_its_row_groups_into_the_same_corpus(tmp_path, hub, monkeypatch, caplog):
    texts = [f"document {i} ✓ " * (i % 5 + 1) for i in range(100)] + [None]
    monkeypatch.setattr(datasets, "load_dataset", _streaming_hub(tmp_path, hub, texts, row_group_size=7))
    # The fake hub lives in this process, so threads stand in for the worker processes here.
    monkeypatch.setattr(sources, "ProcessPoolExecutor", lambda workers, mp_context: ThreadPoolExecutor(workers))
    one = download(DataConfig(source="openwebtext"), tmp_path / "one")
    with caplog.at_level(logging.INFO, logger="cortexcraft.sources"):
        two = download(DataConfig(source="openwebtext"), tmp_path / "two", workers=2)
    # One file of 15 row groups, fewer than the 16 segments wanted: a shard per row group.
    assert _segments_collected(caplog) == 15
    assert Path(two["path"]).read_text(encoding="utf-8") == "\n\n".join(text or "" for text in texts)
    assert np.array_equal(sources.document_starts(two), sources.document_starts(one)) and two["documents"] == 101
    assert {k: v for k, v in two.items() if k not in ("path", "doc_starts")} == {
        k: v for k, v in one.items() if k not in ("path", "doc_starts")
    }
    assert sorted(p.name for p in Path(two["path"]).parent.iterdir()) == ["corpus.json", "corpus.txt", "doc_starts.npy"]


def test_unreachable_hub_fails_fast_for_hub_ids(tmp_path, monkeypatch, closed_url):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", closed_url)
    with pytest.raises(
        CortexCraftError, match=r"cannot reach the Hugging Face hub for source 'openwebtext' \(.*\); download the text"
    ):
        download(DataConfig(source="openwebtext"), tmp_path / "cache")


def test_train_val_cut_is_nanogpt_split_for_one_document():
    assert train_val_cut({"chars": 1_115_394, "documents": 1}, 0.1) == 1_003_854
