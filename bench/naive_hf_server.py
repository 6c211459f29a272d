"""The naive baseline of bench_serve.py: FastAPI with transformers' `pipeline` on an exported model,
one request at a time (no batching, no streaming), speaking the same POST /v1/completions.

    python bench/naive_hf_server.py --model hf/DIR [--port 0]

Prints "listening on http://127.0.0.1:PORT (N torch threads)" once it accepts connections.
"""
from __future__ import annotations

import argparse
import socket
import threading

import torch
import uvicorn
from fastapi import FastAPI
from pydantic import BaseModel
from transformers import pipeline


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = 16
    temperature: float = 1.0
    seed: int | None = None


def create_app(model_dir: str) -> FastAPI:
    generator = pipeline("text-generation", model=model_dir, device="cpu")
    one_at_a_time = threading.Lock()
    app = FastAPI()

    @app.post("/v1/completions")
    def complete(request: CompletionRequest) -> dict:
        sampling = {"do_sample": True, "temperature": request.temperature, "top_k": 0} if request.temperature > 0 \
            else {"do_sample": False}
        with one_at_a_time:
            out = generator(request.prompt, max_new_tokens=request.max_tokens, min_new_tokens=request.max_tokens,
                            return_full_text=False, **sampling)
        text = out[0]["generated_text"]
        return {"object": "text_completion", "model": request.model, "system_fingerprint": "naive",
                "choices": [{"text": text, "index": 0, "finish_reason": "length"}],
                "usage": {"completion_tokens": request.max_tokens}}

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a directory written by `cortexcraft export --format hf`")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    app = create_app(args.model)
    # proto IPPROTO_TCP, as asyncio makes them: only then are its connections TCP_NODELAY (no ~40 ms
    # delayed-ACK stall per answer), as they are for `cortexcraft serve`.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.bind(("127.0.0.1", args.port))
    listener.listen(socket.SOMAXCONN)
    print(f"listening on http://127.0.0.1:{listener.getsockname()[1]} ({torch.get_num_threads()} torch threads)",
          flush=True)
    uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[listener])


if __name__ == "__main__":
    main()
