"""Small pretrained-looking transformers models for the interop tests, built and saved locally."""
from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import torch

from tiny_runs import repetitive_text


def make_pretrained(transformers, directory: Path, *, tie: bool = True, activation: str = "gelu_new",
                    vocab_size: int = 400, n_positions: int = 64, n_embd: int = 32, n_layer: int = 2, n_head: int = 4,
                    seed: int = 0, text: str | None = None) -> Path:
    """A random GPT2LMHeadModel (weights from ``seed``; biases and gains random too, so a misplaced
    one shows) and a byte-level BPE tokenizer trained on ``text`` (default: a small generated
    text), saved with save_pretrained."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    backend.train_from_iterator([text if text is not None else repetitive_text(20_000)], trainer=trainer)
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|endoftext|>",
                                                     eos_token="<|endoftext|>")
    eot = tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=n_positions, n_embd=n_embd, n_layer=n_layer,
                                     n_head=n_head,
                                     activation_function=activation, tie_word_embeddings=tie,
                                     bos_token_id=eot, eos_token_id=eot)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(config)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(str(directory))
    tokenizer.save_pretrained(str(directory))
    return directory


class LoopbackHub:
    """A Hugging Face hub on 127.0.0.1 serving ``directory`` as repo ``repo`` of ``kind`` "model" or
    "dataset": the revision, tree, paths-info and resolve routes (with byte ranges) that
    huggingface_hub and datasets use; 404s as the hub sends them for the rest. ``commit`` is what
    every branch resolves to (a test may change it: a new push). With ``token`` it behaves as for a
    private repo: requests without ``Authorization: Bearer <token>`` get the hub's 401; with ``gated``
    as for a gated one (401 without a token, 403 with another). ``requests`` holds (method, path,
    authorised) of every request. Use as a context manager; ``endpoint`` is its URL."""

    def __init__(self, directory: Path, repo: str, *, kind: str = "model", commit: str = "a" * 40,
                 token: str | None = None, gated: bool = False):
        self.repo, self.kind, self.commit, self.token, self.gated = repo, kind, commit, token, gated
        self.files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
        self.requests: list[tuple[str, str, bool]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> "LoopbackHub":
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()

    def _entries(self, prefix: str = "", recursive: bool = True) -> list[dict]:
        """The tree API's listing of directory ``prefix``: its files and directories, or everything
        below it when ``recursive``."""
        prefix = prefix.strip("/")
        entries: dict[str, dict] = {}
        for name, data in self.files.items():
            if prefix and not name.startswith(prefix + "/"):
                continue
            parts = name[len(prefix) + 1 if prefix else 0:].split("/")
            for depth in range(1, len(parts) if recursive else min(2, len(parts))):
                directory = "/".join(filter(None, [prefix, *parts[:depth]]))
                entries[directory] = {"type": "directory", "path": directory, "oid": _blob_id(directory.encode())}
            if recursive or len(parts) == 1:
                entries[name] = {"type": "file", "path": name, "size": len(data), "oid": _blob_id(data)}
        return list(entries.values())

    def _handler(self):
        hub = self
        api = f"/api/{hub.kind}s/{hub.repo}"
        resolve = f"{'/datasets' if hub.kind == 'dataset' else ''}/{hub.repo}/resolve/"

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            def _json(self, value) -> None:
                self._reply(200, json.dumps(value).encode(), {"Content-Type": "application/json"})

            def _error(self, status: int, code: str, message: str) -> None:
                self._reply(status, json.dumps({"error": message}).encode(),
                            {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message})

            def _revision(self, rest: str) -> str | None:
                """The commit a revision resolves to (any branch or tag: the current commit)."""
                revision = urllib.parse.unquote(rest.split("/", 1)[0])
                return hub.commit if revision else None

            def do_HEAD(self) -> None:
                self.do_GET()

            def do_POST(self) -> None:
                self.do_GET()

            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                path = url.path
                repo_route = path.startswith((api + "/", resolve))
                authorised = (not repo_route or hub.token is None
                              or self.headers.get("Authorization") == f"Bearer {hub.token}")
                hub.requests.append((self.command, path, authorised))
                if not authorised and hub.gated:
                    status = 403 if self.headers.get("Authorization") else 401
                    self._error(status, "GatedRepo", f"Access to {hub.kind} {hub.repo} is restricted.")
                elif not authorised:  # what the hub answers for a private repo without a valid token
                    self._error(401, "RepoNotFound", "Invalid username or password.")
                elif path.startswith(api + "/revision/"):
                    self._json(
                        {
                            "id": hub.repo,
                            "sha": self._revision(path[len(api + "/revision/") :]),
                            "siblings": [{"rfilename": name} for name in hub.files],
                            "private": hub.token is not None,
                        }
                    )
                elif path.startswith(api + "/tree/"):
                    rest = path[len(api + "/tree/") :]
                    recursive = urllib.parse.parse_qs(url.query).get("recursive") == ["true"]
                    self._json(hub._entries(rest.split("/", 1)[1] if "/" in rest else "", recursive))
                elif path.startswith(api + "/paths-info/"):
                    length = int(self.headers.get("Content-Length") or 0)
                    form = urllib.parse.parse_qs(self.rfile.read(length).decode())
                    wanted = set(form.get("paths", []))
                    self._json([e for e in hub._entries() if e["path"] in wanted])
                elif path.startswith(resolve) and "/" in path[len(resolve) :]:
                    name = urllib.parse.unquote(path[len(resolve) :].split("/", 1)[1])
                    if name not in hub.files:
                        self._error(404, "EntryNotFound", f"{name} does not exist on this revision")
                        return
                    data = hub.files[name]
                    headers = {"X-Repo-Commit": hub.commit, "ETag": f'"{_blob_id(data)}"', "Accept-Ranges": "bytes"}
                    if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):
                        first = int(match[1])
                        last = min(int(match[2]) if match[2] else len(data) - 1, len(data) - 1)
                        headers["Content-Range"] = f"bytes {first}-{last}/{len(data)}"
                        self._reply(206, data[first : last + 1], headers)
                    else:
                        self._reply(200, data, headers)
                else:
                    self._error(404, "RepoNotFound", "Repository not found")

        return Handler


def _blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()
