"""`cortexcraft serve`: an OpenAI-compatible HTTP server for a registered model or a run's checkpoint.

Routes (OpenAI's shapes, so the `openai` client and curl work unchanged):

    GET  /health           open without the API key: status, model, version, uptime
    GET  /v1/models        the served model (id NAME, version, fingerprint, max_model_len)
    POST /v1/completions   prompt -> text; "stream": true sends server-sent events
    GET  /metrics          Prometheus text
    GET  /                 a page to type a prompt and watch the answer stream in

The HTTP side (FastAPI on uvicorn's event loop) validates, authenticates and tokenizes; every model
computation happens on the engine's thread (``cortexcraft.engine``), which batches concurrent
completions and swaps in a new champion while serving. Each answer names the version that wrote
it in ``system_fingerprint`` (``NAME@vN``).

Limits: the default host is 127.0.0.1; any other needs ``CORTEXCRAFT_API_KEY``, and with a key
every route but ``/health`` needs ``Authorization: Bearer KEY``. Bodies over 1 MB, ``max_tokens``
over the cap, characters outside the vocabulary, unknown models and malformed JSON are answered
with OpenAI's error JSON (4xx); a full queue gets 429 with ``Retry-After``. A client that goes
away stops its generation. SIGTERM stops accepting connections, lets the requests in flight
finish (up to ``grace_seconds``) and exits with status 0.
"""
from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import signal
import socket
import threading
import time
import uuid
from importlib import resources
from pathlib import Path
from typing import Any, Optional

import uvicorn
from fastapi import Depends, FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from cortexcraft.device import select_device
from cortexcraft.engine import (ChampionFollower, Completion, CompletionResult, InferenceEngine, QueueFull,
                                ServedVersion, ServingMetrics, verified_run_checkpoint, verified_version)
from cortexcraft.errors import CortexCraftError
from cortexcraft.interrupt import signal_name
from cortexcraft.registry import models_dir_of, parse_ref, read_champion, require_model
from cortexcraft.threads import available_cores, user_thread_count
from cortexcraft.tokenizer import describe_chars

log = logging.getLogger(__name__)

API_KEY_ENV = "CORTEXCRAFT_API_KEY"
MAX_BODY_BYTES = 1_000_000
MAX_STOP_SEQUENCES = 4
# Each generated character is checked against every proper prefix of every stop sequence.
MAX_STOP_CHARS = 128
# Prompts longer than this are tokenized off the event loop, so one huge prompt cannot stall the
# other clients' streams.
INLINE_TOKENIZE_CHARS = 100_000
ROUTES = ("/", "/health", "/v1/models", "/v1/completions", "/metrics")
# OpenAI parameters accepted only at their default value.
UNSUPPORTED = ("n", "best_of", "logprobs", "presence_penalty", "frequency_penalty", "logit_bias", "suffix")


class APIError(Exception):
    """An answer in OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: Optional[str] = None, code: Optional[str] = None,
                 kind: str = "invalid_request_error", headers: Optional[dict[str, str]] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse({"error": {"message": self.message, "type": self.kind, "param": self.param,
                                       "code": self.code}}, status_code=self.status, headers=self.headers)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    """The body of POST /v1/completions: OpenAI's fields, plus ``top_k``. Fields whose only
    supported value is OpenAI's default (n, best_of, echo, logprobs, penalties, logit_bias,
    suffix) are accepted at that value, so clients that send defaults work."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    model: str
    prompt: Any
    max_tokens: Optional[int] = Field(16, ge=1)
    temperature: Optional[float] = Field(1.0, ge=0, le=2)
    top_p: Optional[float] = Field(1.0, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=1)
    seed: Optional[int] = Field(None, ge=0, le=2**63 - 1)
    stop: Any = Field(None, validate_default=True)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None
    n: Optional[int] = Field(1, ge=1, le=1)
    best_of: Optional[int] = Field(1, ge=1, le=1)
    echo: Optional[bool] = Field(False)
    logprobs: Optional[int] = Field(None, le=0)
    presence_penalty: Optional[float] = Field(0.0, ge=0, le=0)
    frequency_penalty: Optional[float] = Field(0.0, ge=0, le=0)
    logit_bias: Optional[dict[str, float]] = Field(None, max_length=0)
    suffix: Optional[str] = Field(None, max_length=0)

    @field_validator("prompt")
    @classmethod
    def _one_text_prompt(cls, value: Any) -> str:
        if isinstance(value, list) and len(value) == 1:
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("send the prompt as a string (or a list holding one string); token ids and several "
                             "prompts per request are not supported")
        if not value:
            raise ValueError("the prompt is empty; send at least one character")
        return value

    @field_validator("stop")
    @classmethod
    def _stop_sequences(cls, value: Any) -> tuple[str, ...]:
        stops = [value] if isinstance(value, str) else [] if value is None else value
        if not isinstance(stops, list) or len(stops) > MAX_STOP_SEQUENCES \
                or not all(isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
            raise ValueError(f"stop is a string of 1 to {MAX_STOP_CHARS} characters or a list of at most "
                             f"{MAX_STOP_SEQUENCES} of them")
        return tuple(stops)

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: Optional[bool]) -> Optional[bool]:
        if value:
            raise ValueError("echo is not supported; the answer holds the new text only")
        return value


def _validation_message(exc: ValidationError) -> tuple[str, Optional[str]]:
    """(message, param) for the first problem of a request body."""
    error = exc.errors()[0]
    param = ".".join(str(part) for part in error["loc"]) or None
    if param is None:
        return "the body must be a JSON object such as {\"model\": ..., \"prompt\": ...}", None
    if error["loc"][0] in UNSUPPORTED and error["type"] in ("less_than_equal", "greater_than_equal", "too_long"):
        return (f"{param}={json.dumps(error.get('input'))} is not supported: this server answers with one choice "
                f"of plain text, without penalties or logit biases; leave {param} out"), param
    if error["type"] == "extra_forbidden":
        fields = ", ".join(CompletionRequest.model_fields)
        return f"unknown parameter {param!r}; the parameters are: {fields}", param
    if error["type"] == "missing":
        return f"{param} is required", param
    message = error["msg"].removeprefix("Value error, ")
    return f"{param}: {message} (got {json.dumps(error.get('input'))[:60]})", param


def _check_bearer(api_key: Optional[str]):
    expected = hashlib.sha256(api_key.encode()).digest() if api_key else None

    async def authorize(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # Compared as digests, in constant time: neither the key nor its length leaks through timing.
        given = hashlib.sha256(token.strip().encode()).digest()
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, expected):
            raise APIError(401, f"missing or wrong API key; send the header Authorization: Bearer <{API_KEY_ENV}>",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
    return authorize


class MetricsMiddleware:
    """Counts every answer by route and status and times it to its last byte; an answer never
    completed (the client went away) counts as status 499."""

    def __init__(self, app, metrics: ServingMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        started = time.monotonic()
        status = 499
        done = False

        async def counting_send(message) -> None:
            nonlocal status, done
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True

        try:
            await self.app(scope, receive, counting_send)
        finally:
            self.metrics.requests.labels(route, str(status if done else 499)).inc()
            if done:
                self.metrics.latency.labels(route).observe(time.monotonic() - started)


async def _read_body(request: Request, limit: int) -> bytes:
    too_large = APIError(413, f"the request body is over {limit:,} bytes (1 MB); send a shorter prompt",
                         code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    return bytes(body)


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(payload: Any) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)}\n\n"


class _Handover:
    """Hands items from the engine's thread to queues on the event loop: one wake-up of the loop
    per burst of items rather than one per item."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, Any]] = []

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        with self.lock:
            self.pending.append((queue, item))
            if len(self.pending) > 1:
                return  # a flush is already on its way
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop has closed: nobody is waiting any more
            pass

    def _flush(self) -> None:
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, item in pending:
            queue.put_nowait(item)


def create_app(engine: InferenceEngine, *, follower: Optional[ChampionFollower] = None, follows: str = "pinned",
               api_key: Optional[str] = None, max_tokens_cap: int = 1024,
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The HTTP application over a started ``engine``. ``follows`` says what the server serves:
    "champion" (with ``follower``), "pinned" (one registered version) or "run" (a run's checkpoint)."""
    started = time.time()
    metrics = engine.metrics
    app = FastAPI(title="cortexcraft serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    protected = [Depends(_check_bearer(api_key))]
    handover: list[Optional[_Handover]] = [None]  # made on the first request, on the event loop's thread
    page = resources.files("cortexcraft").joinpath("serve_page.html").read_text(encoding="utf-8")

    @app.exception_handler(APIError)
    async def api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        routes = ", ".join(f"{m} {p}" for m, p in (("GET", "/health"), ("GET", "/v1/models"),
                                                  ("POST", "/v1/completions"), ("GET", "/metrics"), ("GET", "/")))
        return APIError(exc.status_code, f"{exc.detail}; the routes are {routes}", code="not_found"
                        if exc.status_code == 404 else None).response()

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return APIError(500, f"internal error: {exc}", kind="server_error").response()

    def served() -> ServedVersion:
        return engine.current

    def model_names(version: ServedVersion) -> set[str]:
        names = {version.name, version.fingerprint}
        if follows == "champion":
            names.add(f"{version.name}@champion")
        return names

    @app.get("/health")
    async def health() -> JSONResponse:
        version = served()
        return JSONResponse(status_code=200 if engine.alive else 503, content={
            "status": "ok" if engine.alive else "the inference thread has stopped", "model": version.name,
            "version": version.version, "fingerprint": version.fingerprint, "follows": follows,
            "champion": follower.champion if follower else None,
            "swap_error": follower.swap_error if follower else None,
            "uptime_seconds": round(time.time() - started, 3), "queue": engine.waiting, "active": engine.running,
            "device": str(version.device)})

    @app.get("/v1/models", dependencies=protected)
    async def models() -> dict[str, Any]:
        version = served()
        return {"object": "list", "data": [{
            "id": version.name, "object": "model", "created": int(version.loaded_at), "owned_by": "cortexcraft",
            "version": version.version, "fingerprint": version.fingerprint, "max_model_len": version.max_model_len,
            "follows": follows}]}

    @app.get("/metrics", dependencies=protected)
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/", dependencies=protected, response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    @app.post("/v1/completions", dependencies=protected)
    async def completions(request: Request) -> Response:
        body = await _read_body(request, max_body_bytes)
        try:
            params = CompletionRequest.model_validate(json.loads(body))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(400, f"the body is not valid JSON ({exc}); send a JSON object",
                           code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the body nests too deeply to parse; send a flat JSON object",
                           code="invalid_json") from None
        except ValidationError as exc:
            message, param = _validation_message(exc)
            raise APIError(400, message, param=param) from None
        version = served()
        if params.model not in model_names(version):
            raise APIError(404, f"model {params.model!r} is not served here; this server serves {version.fingerprint}"
                           f"{' (the champion of ' + version.name + ')' if follows == 'champion' else ''}: "
                           f"use model {version.name!r}", param="model", code="model_not_found")
        max_tokens = 16 if params.max_tokens is None else params.max_tokens
        if max_tokens > max_tokens_cap:
            raise APIError(400, f"max_tokens is {max_tokens:,}, over this server's cap of {max_tokens_cap:,} "
                                f"(--max-tokens-cap); ask for fewer", param="max_tokens")
        if params.stream_options is not None and not params.stream:
            raise APIError(400, "stream_options needs stream: true", param="stream_options")
        prompt_ids = await _tokenize(version, params.prompt)
        if handover[0] is None:
            handover[0] = _Handover(asyncio.get_running_loop())
        queue: asyncio.Queue = asyncio.Queue()
        put = handover[0].put
        completion = Completion(
            version=version, prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=1.0 if params.temperature is None else params.temperature, top_k=params.top_k,
            top_p=params.top_p, seed=params.seed, stop=params.stop,
            on_piece=(lambda piece: put(queue, ("piece", piece))) if params.stream else None,
            on_done=lambda result: put(queue, ("done", result)))
        try:
            engine.submit(completion)
        except QueueFull as exc:
            raise APIError(429, f"the server is busy: {exc} (--max-queue {engine.max_queue}); retry in "
                                f"{exc.retry_after} s", kind="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(exc.retry_after)}) from None
        except CortexCraftError as exc:
            raise APIError(503, str(exc), kind="server_error") from None
        answer = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                  "model": version.name, "system_fingerprint": version.fingerprint}
        if params.stream:
            include_usage = params.stream_options is not None and params.stream_options.include_usage
            return StreamingResponse(_stream(engine, completion, queue, answer, include_usage),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await _result_unless_disconnected(engine, completion, queue, request)
        if result is None:
            return Response(status_code=499)
        if result.finish_reason in ("error", "cancelled"):
            status, message = _failure(result)
            raise APIError(status, message, kind="server_error")
        return JSONResponse({**answer, "choices": [{"text": result.text, "index": 0, "logprobs": None,
                                                    "finish_reason": result.finish_reason}],
                             "usage": _usage(result)})

    return app


async def _tokenize(version: ServedVersion, prompt: str) -> list[int]:
    try:
        if len(prompt) > INLINE_TOKENIZE_CHARS:
            ids = await asyncio.to_thread(version.tokenizer.encode, prompt)
        else:
            ids = version.tokenizer.encode(prompt)
    except CortexCraftError:
        unknown = describe_chars(version.tokenizer.unknown_chars(prompt))
        raise APIError(400, f"the prompt has characters outside the vocabulary of {version.fingerprint}: {unknown}; "
                            f"use only characters the model was trained on", param="prompt",
                       code="unknown_characters") from None
    if len(ids) == 0:
        raise APIError(400, "the prompt encodes to no tokens; send at least one character", param="prompt")
    return [int(i) for i in ids]


def _failure(result: CompletionResult) -> tuple[int, str]:
    """(status, message) of a completion that ended without an answer."""
    if result.finish_reason == "cancelled":
        return 503, "the server is shutting down and stopped this completion; send it again"
    return 500, result.error or "generation failed"


def _usage(result: CompletionResult) -> dict[str, int]:
    return {"prompt_tokens": result.prompt_tokens, "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens}


async def _result_unless_disconnected(engine: InferenceEngine, completion: Completion, queue: asyncio.Queue,
                                      request: Request) -> Optional[CompletionResult]:
    """The completion's result, or None (its generation stopped) when the client goes away first."""
    result = asyncio.ensure_future(queue.get())
    gone = asyncio.ensure_future(_disconnected(request))
    answered = False
    try:
        await asyncio.wait({result, gone}, return_when=asyncio.FIRST_COMPLETED)
        answered = result.done()
        return result.result()[1] if answered else None
    finally:
        for task in (result, gone):
            task.cancel()
        if not answered:
            # The client went away, or this handler was cancelled (a shutdown's grace period ran out).
            engine.cancel(completion)


async def _stream(engine: InferenceEngine, completion: Completion, queue: asyncio.Queue, answer: dict[str, Any],
                  include_usage: bool):
    """Server-sent events: a chunk per piece of text, one with the finish reason, [DONE]. When the
    client goes away Starlette cancels this generator, and the generation stops."""
    # Chunks differ only in their text: the rest is serialised once.
    head = f"data: {json.dumps(answer, ensure_ascii=False)[:-1]}, \"choices\": [{{\"text\": "
    tail = ', "index": 0, "logprobs": null, "finish_reason": null}]}\n\n'
    finished = False
    try:
        while True:
            kind, value = await queue.get()
            if kind == "piece":
                yield head + json.dumps(value, ensure_ascii=False) + tail
                continue
            finished = True
            if value.finish_reason in ("error", "cancelled"):
                status, message = _failure(value)
                yield _sse({"error": {"message": message, "type": "server_error", "param": None, "code": status}})
                return
            yield _sse({**answer, "choices": [{"text": "", "index": 0, "logprobs": None,
                                               "finish_reason": value.finish_reason}]})
            if include_usage:
                yield _sse({**answer, "choices": [], "usage": _usage(value)})
            yield _sse("[DONE]")
            return
    finally:
        if not finished:
            engine.cancel(completion)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _listen(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                             proto=socket.IPPROTO_TCP, flags=socket.AI_PASSIVE)[0]
        # Made with proto IPPROTO_TCP, as asyncio would: only then does asyncio set TCP_NODELAY on the
        # connections, without which each answer's second write waits for a delayed ACK (~40 ms).
        listener = socket.socket(family, kind, proto)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            listener.bind(address)
            listener.listen(socket.SOMAXCONN)
        except OSError:
            listener.close()
            raise
        return listener
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise CortexCraftError(f"cannot listen on {host}:{port} ({reason}); choose another --port or --host") from None


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, engine: InferenceEngine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        if not self.should_exit:
            log.info("%s: accepting no more connections; finishing %d requests in flight (up to %s s)",
                     signal_name(sig), self.engine.running + self.engine.waiting, self.config.timeout_graceful_shutdown)
        super().handle_exit(sig, frame)


def serve(*, model: Optional[str] = None, run: Optional[Path] = None, checkpoint: str = "best",
          data_dir: Path = Path("data"), host: str = "127.0.0.1", port: int = 8000, max_batch: int = 16,
          max_queue: int = 64, max_tokens_cap: int = 1024, grace_seconds: float = 30.0, poll_seconds: float = 0.5,
          stream_interval: float = 0.02, threads: Optional[int] = None, access_log: bool = True) -> int:
    """Serve ``model`` (``NAME``/``NAME@champion``: follow the champion; ``NAME@vN``: pinned) from
    ``data_dir``'s registry, or a ``run`` directory's ``checkpoint``, until SIGTERM or SIGINT."""
    api_key = os.environ.get(API_KEY_ENV) or None
    if not _is_loopback(host) and api_key is None:
        raise CortexCraftError(f"--host {host} serves beyond this machine, so requests must carry a key: set "
                               f"{API_KEY_ENV} (clients send Authorization: Bearer KEY), or serve on 127.0.0.1")
    for name, value, low in (("--max-tokens-cap", max_tokens_cap, 1), ("--max-batch", max_batch, 1),
                             ("--max-queue", max_queue, 0), ("--grace-seconds", grace_seconds, 0),
                             ("--stream-interval", stream_interval, 0)):
        if value < low:
            raise CortexCraftError(f"{name} {value} is below {low}; use {low} or more")
    if poll_seconds <= 0:
        raise CortexCraftError(f"--poll-seconds {poll_seconds} is not positive; use e.g. 0.5")
    if threads is not None and threads < 1:
        raise CortexCraftError(f"--threads {threads} is below 1; use 1 or more")
    # One core is left to the HTTP side (the event loop parses, tokenizes and streams while the
    # engine computes): torch threads beside a busy thread of the same process stall each other at
    # every OpenMP barrier.
    threads = threads or user_thread_count(None) or max(1, available_cores() - 1)
    follows = "run"
    if model is not None:
        name, which = parse_ref(model)
        models_dir = models_dir_of(data_dir)
        require_model(models_dir, name)
        follows = "champion" if which == "champion" else "pinned"
        if which == "champion":
            pointer = read_champion(models_dir, name)
            if pointer is None:
                raise CortexCraftError(f"model {name!r} has no champion yet; promote a version with "
                                       f"`cortexcraft models promote {name}@vN` or serve {name}@vN")
            which = pointer["version"]
        candidate = verified_version(models_dir, name, which)
    else:
        candidate = verified_run_checkpoint(run, checkpoint)
    listener = _listen(host, port)
    engine = InferenceEngine(select_device("auto"), ServingMetrics(), max_batch=max_batch, max_queue=max_queue,
                             stream_interval=stream_interval, threads=threads)
    follower = None
    try:
        try:
            engine.start(candidate)
        except Exception as exc:  # noqa: BLE001 -- whatever kept it from loading, in one line
            raise CortexCraftError(f"cannot serve {candidate.fingerprint}: {exc}") from exc
        if follows == "champion":
            follower = ChampionFollower(engine, models_dir, candidate.name, poll_seconds)
            follower.check()
            follower.start()
        app = create_app(engine, follower=follower, follows=follows, api_key=api_key, max_tokens_cap=max_tokens_cap)
        config = uvicorn.Config(app, log_config=None, access_log=access_log, lifespan="off",
                                timeout_graceful_shutdown=grace_seconds)
        bound_host, bound_port = listener.getsockname()[:2]
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        what = {"champion": f"follows {candidate.name}@champion", "pinned": "pinned", "run": "a run's checkpoint"}
        log.info("serving %s (%s) on http://%s:%d/ with %s (%d torch threads), batches of up to %d, queue %d%s",
                 engine.current.fingerprint, what[follows], url_host, bound_port, engine.device, threads, max_batch,
                 max_queue, ", API key required" if api_key else "")
        # uvicorn re-raises the signal it shut down for once it is done, for the handler that was
        # there before: this one, so a SIGTERM ends in exit status 0 after the drain.
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)
        try:
            _Server(config, engine).run(sockets=[listener])
        finally:
            signal.signal(signal.SIGTERM, previous)
        log.info("stopped")
        return 0
    finally:
        if follower is not None:
            follower.stop()
        engine.stop()
        listener.close()
