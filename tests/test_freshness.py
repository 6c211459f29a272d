"""Source freshness: a loopback HTTP server whose file changes between runs, one that refuses HEAD
and answers conditional GETs with 304, and local files checked by stat before content."""
from __future__ import annotations

import functools
import http.server
import os
import threading
import time

import pytest

from cortexcraft.config import DataConfig
from cortexcraft.errors import CortexCraftError
from cortexcraft.freshness import local_revision, revision_id
from cortexcraft.sources import describe_revision, download, source_revision

RUNNING: list[http.server.ThreadingHTTPServer] = []
TEXT = "ROMEO:\nO, juliet loves the moon.\n\n" * 40


class CountingHandler(http.server.SimpleHTTPRequestHandler):
    """Serves a directory (Last-Modified, Content-Length; 304 on If-Modified-Since) and counts
    requests by method and status, so a test can tell whether the body was sent."""

    log: list[tuple[str, int]]
    refuse_head = False

    def log_message(self, *args):
        pass

    def do_HEAD(self):
        if self.refuse_head:
            self.send_error(405)
            return
        super().do_HEAD()

    def send_response(self, code, message=None):
        self.log.append((self.command, code))
        super().send_response(code, message)

    def handle(self):
        try:
            super().handle()
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server(tmp_path, monkeypatch):
    """serve(refuse_head=False) -> (url of corpus.txt, request log); the file is tmp_path/site/corpus.txt."""
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    site = tmp_path / "site"
    site.mkdir()
    (site / "corpus.txt").write_text(TEXT, encoding="utf-8")
    servers = RUNNING
    servers.clear()

    def start(refuse_head=False):
        log: list[tuple[str, int]] = []
        handler = type("Handler", (CountingHandler,), {"log": log, "refuse_head": refuse_head})
        httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(site)))
        threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_port}/corpus.txt", log

    yield start
    for httpd in servers:
        if httpd.socket.fileno() != -1:
            httpd.shutdown()
            httpd.server_close()


def stop_serving(url):
    for httpd in RUNNING:
        if f":{httpd.server_port}/" in url:
            httpd.shutdown()
            httpd.server_close()


def edit(path, text):
    """Rewrite ``path`` and move its mtime on by 10 s: Last-Modified has one-second resolution."""
    before = path.stat().st_mtime
    path.write_text(text, encoding="utf-8")
    os.utime(path, (before + 10, before + 10))


def bodies_sent(log):
    return sum(1 for method, status in log if method == "GET" and status == 200)


def test_unchanged_url_is_revalidated_by_head_and_not_downloaded_again(tmp_path, server):
    url, log = server()
    cache = tmp_path / "cache"
    first = download(DataConfig(source=url), cache)
    assert first["revision"]["checked_by"] == "HEAD 200" and first["revision"]["content_length"] == len(TEXT)
    assert "Last-Modified" in describe_revision(first["revision"])
    sent = bodies_sent(log)
    assert sent >= 1

    again = download(DataConfig(source=url), cache)
    assert again == first and bodies_sent(log) == sent  # only a HEAD: no body transferred

    edit(tmp_path / "site" / "corpus.txt", TEXT + "JULIET:\nAnd the king.\n")
    changed = download(DataConfig(source=url), cache)
    assert changed["revision"]["id"] != first["revision"]["id"] and changed["fingerprint"] != first["fingerprint"]
    assert changed["chars"] == len(TEXT) + len("JULIET:\nAnd the king.\n") and bodies_sent(log) > sent


def test_server_refusing_head_is_revalidated_by_a_conditional_get_answered_304(tmp_path, server):
    url, log = server(refuse_head=True)
    cache = tmp_path / "cache"
    first = download(DataConfig(source=url), cache)
    assert first["revision"]["checked_by"] == "GET 200"
    sent = bodies_sent(log)

    again = download(DataConfig(source=url), cache)
    assert again["revision"]["checked_by"] == "conditional GET 304" and again["path"] == first["path"]
    assert ("GET", 304) in log and bodies_sent(log) == sent

    edit(tmp_path / "site" / "corpus.txt", TEXT.upper())
    changed = download(DataConfig(source=url), cache)
    assert changed["revision"]["id"] != first["revision"]["id"]
    with open(changed["path"], encoding="utf-8") as handle:
        assert handle.read() == TEXT.upper()


def test_unreachable_url_uses_the_revision_seen_last_with_a_warning(tmp_path, server, caplog):
    url, log = server()
    cache = tmp_path / "cache"
    first = download(DataConfig(source=url), cache)
    stop_serving(url)
    again = download(DataConfig(source=url), cache)
    assert again["path"] == first["path"] and again["revision"]["id"] == first["revision"]["id"]
    assert any("could not revalidate source" in r.getMessage() for r in caplog.records)


def test_revision_text_from_a_server_cannot_inject_markdown():
    hostile = {"kind": "http", "etag": '"x`|![i](http://evil/)<script>"', "last_modified": None, "content_length": 5,
               "checked_by": "HEAD 200"}
    text = describe_revision(hostile)
    assert text == 'ETag "x????i?(http://evil/)?script?", 5 bytes (HEAD 200)'


def test_unreachable_url_never_seen_is_a_clear_error(tmp_path):
    with pytest.raises(CortexCraftError, match=r"cannot reach http://127\.0\.0\.1:9/x\.txt \(.*\); download the text"):
        source_revision(DataConfig(source="http://127.0.0.1:9/x.txt"), tmp_path / "cache")


def test_local_directory_is_rehashed_only_where_stat_changed(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    old = time.time() - 60  # older than the racy window: the stat cache may be trusted
    for i in range(5):
        (docs / f"{i}.txt").write_text(f"document {i}\n", encoding="utf-8")
        os.utime(docs / f"{i}.txt", (old, old))
    cache = tmp_path / "cache"
    files = sorted(docs.iterdir())
    first = local_revision(files, str(docs), cache)
    assert first["checked_by"] == "stat, 5 of 5 files hashed"
    assert local_revision(files, str(docs), cache)["checked_by"] == "stat, 0 of 5 files hashed"

    (docs / "3.txt").write_text("document X\n", encoding="utf-8")  # same size, new mtime
    changed = local_revision(files, str(docs), cache)
    assert changed["checked_by"] == "stat, 1 of 5 files hashed" and revision_id(changed) != revision_id(first)
    # Just written (inside the racy window): hashed again next time even though stat matches.
    assert local_revision(files, str(docs), cache)["checked_by"] == "stat, 1 of 5 files hashed"


def test_a_same_size_edit_that_keeps_the_mtime_is_caught_through_the_inode(tmp_path):
    path = tmp_path / "input.txt"
    path.write_text("aaaa", encoding="utf-8")
    old = time.time() - 60
    os.utime(path, (old, old))
    cache = tmp_path / "cache"
    first = source_revision(DataConfig(source=str(path)), cache)
    replacement = tmp_path / "new.txt"
    replacement.write_text("bbbb", encoding="utf-8")
    os.utime(replacement, (old, old))
    os.replace(replacement, path)  # an editor's save: new inode, same size, mtime preserved
    assert revision_id(source_revision(DataConfig(source=str(path)), cache)) != revision_id(first)


def test_hub_revision_404_is_a_clear_error(tmp_path, server, monkeypatch):
    url, _ = server()
    monkeypatch.setenv("HF_ENDPOINT", url.rsplit("/", 1)[0])
    with pytest.raises(
        CortexCraftError, match=r"the hub has no dataset me/gone at revision 'main' \(HTTP 404\); check the id"
    ):
        source_revision(DataConfig(source="hf:me/gone"), tmp_path / "cache")
