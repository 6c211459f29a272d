"""Small pretrained-looking transformers models for the interop tests, built and saved locally."""
from __future__ import annotations

import hashlib
import json
import threading
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Iterator

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


@contextmanager
def loopback_hub(directory: Path, repo: str, commit: str = "a" * 40) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A Hugging Face hub endpoint on 127.0.0.1 serving ``directory`` as model repo ``repo`` (the
    revision, tree and resolve routes huggingface_hub's snapshot_download uses; 404 for the rest).
    Yields (endpoint URL, the requests it saw)."""
    files = {p.relative_to(directory).as_posix(): p.read_bytes() for p in directory.rglob("*") if p.is_file()}
    blob_ids = {name: hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest() for name, data in files.items()}
    seen: list[tuple[str, str]] = []

    class Hub(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _reply(self, status: int, body: bytes, headers: dict[str, str]) -> None:
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(body))}.items():
                self.send_header(name, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            path = self.path.split("?")[0]
            seen.append((self.command, path))
            as_json = {"Content-Type": "application/json"}
            resolve = f"/{repo}/resolve/{commit}/"
            if path.startswith(f"/api/models/{repo}/revision/"):
                info = {"id": repo, "sha": commit, "siblings": [{"rfilename": name} for name in files]}
                self._reply(200, json.dumps(info).encode(), as_json)
            elif path.startswith(f"/api/models/{repo}/tree/{commit}"):
                tree = [{"type": "file", "path": name, "size": len(data), "oid": blob_ids[name]} for name, data in files.items()]
                self._reply(200, json.dumps(tree).encode(), as_json)
            elif path.startswith(resolve) and path[len(resolve):] in files:
                name = path[len(resolve):]
                self._reply(200, files[name], {"X-Repo-Commit": commit, "ETag": f'"{blob_ids[name]}"'})
            else:
                self._reply(404, b'{"error": "Repository not found"}', {**as_json, "X-Error-Code": "RepoNotFound"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
