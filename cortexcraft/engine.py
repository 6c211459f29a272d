"""The inference engine behind `cortexcraft serve`: continuous batching on one thread, and hot swaps
of the served model version.

One thread, the engine's, owns torch: it builds every model, runs its smoke test, and runs every
forward pass. Other threads (the HTTP server's event loop, the champion follower) only submit work
and receive results through callbacks, so no model code ever runs on the event loop and torch's
thread pool is never used from two threads at once.

Batching: completions wait in a bounded queue (``max_queue``; ``QueueFull`` beyond it) and join the
batch, up to ``max_batch`` rows, between any two decoding steps; a row leaves as soon as it is
finished, stopped or cancelled (``cortexcraft.batched_decode`` computes the steps).

Hot swap: a version is verified (every sha256) by the caller's thread, then built, smoke-tested and
published by the engine with one reference assignment (``current``). A completion is bound to the
version that was current when it was submitted and finishes on it, however many swaps happen
meanwhile; a version no completion refers to any more is released. A version that fails to verify,
build or generate raises, and the current one keeps serving.
"""
from __future__ import annotations

import logging
import math
import secrets
import threading
import time
import weakref
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info

from cortexcraft.batched_decode import KVSlots, Row, next_logits
from cortexcraft.checkpoint import MODEL_FILE, model_from_checkpoint, resolve_checkpoint, verify_run
from cortexcraft.errors import CortexCraftError
from cortexcraft.generate import TextPieces, sample_next
from cortexcraft.model import GPT
from cortexcraft.registry import read_champion, resolve
from cortexcraft.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger(__name__)

# Tokens the smoke test generates from a new version before it may serve.
SMOKE_TOKENS = 4


class QueueFull(Exception):
    """The queue of waiting completions is full; try again in ``retry_after`` seconds."""

    def __init__(self, waiting: int, retry_after: int):
        super().__init__(f"{waiting} completions are already waiting")
        self.retry_after = retry_after


@dataclass(frozen=True)
class Candidate:
    """A model version on disk whose files all match their recorded sha256; not loaded yet."""

    name: str
    version: str
    directory: Path
    checkpoint: Path
    state: dict[str, Any]
    tokenizer: Tokenizer

    @property
    def fingerprint(self) -> str:
        return f"{self.name}@{self.version}"


def verified_version(models_dir: str | Path, name: str, version: str) -> Candidate:
    """Registered version ``NAME@vN``, its checkpoint and tokenizer checked against their sha256 and
    the checkpoint against the weights that were registered."""
    directory, record = resolve(models_dir, f"{name}@{version}")
    checked = verify_run(directory)
    checkpoint, state = checked[-1]
    if state["sha256"][MODEL_FILE] != record["model_sha256"]:
        raise CortexCraftError(f"{name}@{version}: {checkpoint / MODEL_FILE} is not the model that was registered "
                               f"(its sha256 differs from version.json); register the run again")
    return Candidate(name, version, directory, checkpoint, state, load_tokenizer(directory))


def verified_run_checkpoint(run_dir: str | Path, checkpoint: str = "best") -> Candidate:
    """A run's checkpoint (best, last or a path) and tokenizer, checked against their sha256; served
    as model ``<run dir name>``, version ``<checkpoint dir name>``."""
    run_dir = Path(run_dir).resolve()
    path, state = resolve_checkpoint(run_dir, checkpoint)
    return Candidate(run_dir.name, path.name, run_dir, path, state, load_tokenizer(run_dir))


class ServedVersion:
    """A loaded model version that can answer completions."""

    def __init__(self, candidate: Candidate, model: GPT, device: torch.device, slots: int):
        self.name = candidate.name
        self.version = candidate.version
        self.fingerprint = candidate.fingerprint
        self.tokenizer = candidate.tokenizer
        self.model = model
        self.device = device
        self.cache = KVSlots(model, slots)
        self.step = candidate.state["step"]
        self.loaded_at = time.time()
        # Completions bound to this version and not finished yet; changed under the engine's lock.
        self.in_flight = 0

    @property
    def max_model_len(self) -> int:
        return self.model.config.block_size


@dataclass(frozen=True)
class CompletionResult:
    text: str
    finish_reason: str  # "length" | "stop" | "cancelled" | "error"
    prompt_tokens: int
    completion_tokens: int
    error: Optional[str] = None


@dataclass(eq=False)
class Completion:
    """One request: a prompt to extend on ``version``, its sampling settings, and where its text goes.

    ``on_piece`` (when set) receives the text as it grows, in pieces of whole characters, never
    text that might turn out to be the start of a stop sequence: the first piece at once, later
    ones at most every ``stream_interval`` seconds of the engine; ``on_done`` receives the result.
    Both are called from the engine's thread.
    """

    version: ServedVersion
    prompt_ids: list[int]
    max_tokens: int
    on_done: Callable[[CompletionResult], None]
    temperature: float = 1.0
    top_k: Optional[int] = None
    top_p: Optional[float] = None
    seed: Optional[int] = None
    stop: tuple[str, ...] = ()
    on_piece: Optional[Callable[[str], None]] = None
    cancelled: bool = False
    submitted: float = field(default_factory=time.monotonic)


class ServingMetrics:
    """Prometheus metrics of one server, in a registry of their own."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("cortexcraft_http_requests", "HTTP requests answered, by route and status "
                                "(499: the client went away first)", ["route", "status"], registry=r)
        self.latency = Histogram("cortexcraft_http_request_duration_seconds", "time to the last byte of the answer",
                                 ["route"], registry=r,
                                 buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120))
        self.completions = Counter("cortexcraft_completions", "completions ended, by finish reason (length, stop, "
                                   "cancelled: the client went away, error)", ["finish_reason"], registry=r)
        self.generated_tokens = Counter("cortexcraft_generated_tokens", "tokens generated", registry=r)
        self.prompt_tokens = Counter("cortexcraft_prompt_tokens", "prompt tokens of admitted completions", registry=r)
        self.first_token = Histogram("cortexcraft_time_to_first_token_seconds", "from submission to the first token",
                                     registry=r,
                                     buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.queue_depth = Gauge("cortexcraft_queue_depth", "completions waiting for a place in the batch", registry=r)
        self.active = Gauge("cortexcraft_active_completions", "completions being generated (rows of the batch)",
                            registry=r)
        self.batch_rows = Histogram("cortexcraft_batch_rows", "rows extended by one batched decoding step", registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.swaps = Counter("cortexcraft_swaps", "versions published while serving (hot swaps)", registry=r)
        self.swap_failures = Counter("cortexcraft_swap_failures", "versions that failed to verify, load or pass the "
                                     "smoke test (the served version kept serving)", registry=r)
        self.served = Info("cortexcraft_served", "the version that answers new requests", registry=r)
        self.served_version = Gauge("cortexcraft_served_version", "N of the served registered version vN "
                                    "(0 when serving a run's checkpoint)", registry=r)
        self.models_loaded = Gauge("cortexcraft_models_loaded", "model versions in memory (the served one, plus "
                                   "earlier ones until their last requests finish)", registry=r)


@dataclass(eq=False)
class _Active:
    """Engine-thread state of an admitted completion."""

    completion: Completion
    row: Row
    pieces: TextPieces
    generator: Optional[torch.Generator]
    text: str = ""
    sent: int = 0
    sent_at: float = 0.0
    generated: int = 0


def find_stop(text: str, stops: tuple[str, ...], new_from: int) -> Optional[int]:
    """Where the earliest stop sequence ending after ``new_from`` starts in ``text``, or None."""
    found = [i for stop in stops if (i := text.find(stop, max(0, new_from - len(stop) + 1))) >= 0]
    return min(found) if found else None


def held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many characters at the end of ``text`` could still be the start of a stop sequence."""
    return max((k for stop in stops for k in range(len(stop) - 1, 0, -1) if text.endswith(stop[:k])), default=0)


class InferenceEngine:
    def __init__(self, device: torch.device, metrics: ServingMetrics, max_batch: int = 16, max_queue: int = 64,
                 stream_interval: float = 0.0, threads: Optional[int] = None):
        if max_batch < 1 or max_queue < 0:
            raise CortexCraftError(f"max_batch={max_batch}, max_queue={max_queue}: use max_batch >= 1 and "
                                   f"max_queue >= 0")
        self.device = device
        self.metrics = metrics
        self.max_batch = max_batch
        self.max_queue = max_queue
        # Streamed text is handed over at most this often per completion (the first piece at once):
        # every hand-over costs the HTTP side a wake-up and a write, which at hundreds of tokens per
        # second and client would compete with generation for the CPU and the GIL.
        self.stream_interval = stream_interval
        self.threads = threads
        self.current: Optional[ServedVersion] = None
        self._cond = threading.Condition()
        self._waiting: deque[Completion] = deque()
        self._jobs: list[tuple[Candidate, Future]] = []
        self._active: list[_Active] = []
        self._stopping = False
        self._loaded: weakref.WeakSet[ServedVersion] = weakref.WeakSet()
        self._seconds_per_completion = 1.0  # moving average, for Retry-After
        metrics.models_loaded.set_function(lambda: len(self._loaded))
        self._thread = threading.Thread(target=self._run, name="cortexcraft-inference", daemon=True)

    # ----------------------------------------------------------------------------------------
    # called from other threads

    def start(self, candidate: Candidate) -> ServedVersion:
        """Start the engine's thread and serve ``candidate``; raises when it cannot serve."""
        self._thread.start()
        return self.load(candidate).result()

    def load(self, candidate: Candidate) -> "Future[ServedVersion]":
        """Build, smoke-test and publish ``candidate`` on the engine's thread, between two steps.
        The future holds the published version, or the exception that kept it from serving."""
        future: Future[ServedVersion] = Future()
        with self._cond:
            self._jobs.append((candidate, future))
            self._cond.notify()
        return future

    def submit(self, completion: Completion) -> None:
        with self._cond:
            if self._stopping:
                raise CortexCraftError("the server is shutting down")
            if not self._thread.is_alive():
                raise CortexCraftError("the inference thread has stopped (see the server's log); restart the server")
            if len(self._waiting) >= self.max_queue:
                waves = (len(self._waiting) + len(self._active)) / self.max_batch
                raise QueueFull(len(self._waiting), max(1, min(60, math.ceil(waves * self._seconds_per_completion))))
            completion.version.in_flight += 1
            self._waiting.append(completion)
            self.metrics.queue_depth.set(len(self._waiting))
            self._cond.notify()

    def cancel(self, completion: Completion) -> None:
        """Stop generating for ``completion`` (its client went away) at the next token boundary."""
        with self._cond:
            completion.cancelled = True
            try:
                self._waiting.remove(completion)
            except ValueError:
                self._cond.notify()
                return
            self.metrics.queue_depth.set(len(self._waiting))
        self._end(completion, CompletionResult("", "cancelled", len(completion.prompt_ids), 0))

    def stop(self, timeout: float = 10.0) -> None:
        """End the engine's thread; completions still running end as cancelled."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._active)

    # ----------------------------------------------------------------------------------------
    # the engine's thread

    def _run(self) -> None:
        if self.threads is not None:
            torch.set_num_threads(self.threads)
        # Each iteration's state lives in _iteration's frame, so an idle engine holds no finished
        # completion and through it no earlier version.
        while self._iteration():
            pass
        for active in list(self._active):
            self._finish(active, "cancelled")
        for candidate, future in self._jobs:
            future.set_exception(CortexCraftError(f"{candidate.fingerprint} was not loaded: the server is "
                                                  f"shutting down"))
        for completion in self._waiting:
            self._end(completion, CompletionResult("", "cancelled", len(completion.prompt_ids), 0))

    def _iteration(self) -> bool:
        """Load what was asked, admit waiting completions, extend every row by one token; False
        once the engine is stopping."""
        with self._cond:
            while not (self._waiting or self._active or self._jobs or self._stopping):
                self._cond.wait()
            if self._stopping:
                return False
            jobs, self._jobs = self._jobs, []
            admitted = []
            while self._waiting and len(self._active) + len(admitted) < self.max_batch:
                admitted.append(self._waiting.popleft())
            self.metrics.queue_depth.set(len(self._waiting))
        for candidate, future in jobs:
            self._publish(candidate, future)
        try:
            for completion in admitted:
                self._admit(completion)
            for active in [a for a in self._active if a.completion.cancelled]:
                self._finish(active, "cancelled")
            if self._active:
                self._step()
        except Exception as exc:  # noqa: BLE001 -- a bug must fail requests, never end the engine
            log.exception("the engine failed; failing the requests it was generating")
            for active in list(self._active):
                self._finish(active, "error", f"generation failed: {exc}")
        return True

    def _publish(self, candidate: Candidate, future: Future) -> None:
        try:
            served = ServedVersion(candidate, model_from_checkpoint(candidate.checkpoint, candidate.state, self.device),
                                   self.device, self.max_batch)
            self._smoke_test(served)
        except Exception as exc:  # noqa: BLE001 -- whatever breaks a version, the served one keeps serving
            future.set_exception(exc)
            return
        previous, self.current = self.current, served
        self._loaded.add(served)
        weakref.finalize(served, log.info, "released %s", served.fingerprint)
        self.metrics.served.info({"model": served.name, "version": served.version, "fingerprint": served.fingerprint})
        self.metrics.served_version.set(int(served.version[1:]) if served.version.startswith("v") else 0)
        if previous is not None:
            self.metrics.swaps.inc()
            log.info("now serving %s (was %s; %d of its requests finish on it)", served.fingerprint,
                     previous.fingerprint, previous.in_flight)
        future.set_result(served)

    def _smoke_test(self, served: ServedVersion) -> None:
        """A few greedy tokens through the serving path, every logit finite, the text decodable."""
        try:
            prompt = [int(i) for i in served.tokenizer.encode("\n")] or [0]
        except CortexCraftError:
            prompt = [0]
        row = Row(prompt, KVSlots(served.model, 1))
        with torch.inference_mode():
            for _ in range(SMOKE_TOKENS):
                logits = next_logits(served.model, [row])
                if not torch.isfinite(logits).all():
                    raise CortexCraftError(f"{served.fingerprint} failed its smoke test: its logits hold NaN or inf "
                                           f"(damaged weights); it does not serve")
                row.append(int(logits.argmax()))
        served.tokenizer.decode(row.tokens)

    def _admit(self, completion: Completion) -> None:
        version = completion.version
        generator = None
        if completion.temperature > 0:
            seed = completion.seed if completion.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=version.device).manual_seed(seed)
        self._active.append(_Active(completion, Row(completion.prompt_ids, version.cache),
                                    TextPieces(version.tokenizer), generator))
        self.metrics.prompt_tokens.inc(len(completion.prompt_ids))
        self.metrics.active.set(len(self._active))

    def _step(self) -> None:
        groups: dict[int, list[_Active]] = {}
        for active in self._active:
            groups.setdefault(id(active.completion.version), []).append(active)
        for group in groups.values():
            version = group[0].completion.version
            rows = [a.row for a in group]
            decoding = sum(not row.needs_full_pass for row in rows)
            try:
                with torch.inference_mode():
                    logits = next_logits(version.model, rows)
                    tokens = [int(sample_next(logits[i:i + 1], a.completion.temperature, a.completion.top_k,
                                              a.completion.top_p, a.generator)) for i, a in enumerate(group)]
                if decoding:
                    self.metrics.batch_rows.observe(decoding)
                self.metrics.generated_tokens.inc(len(group))
                for active, token in zip(group, tokens):
                    self._advance(active, token)
            except Exception as exc:  # noqa: BLE001 -- fail these requests, keep serving the others
                log.exception("generation failed on %s", version.fingerprint)
                for active in group:
                    if active in self._active:
                        self._finish(active, "error", f"generation failed: {exc}")

    def _advance(self, active: _Active, token: int) -> None:
        completion = active.completion
        active.row.append(token)
        active.generated += 1
        if active.generated == 1:
            self.metrics.first_token.observe(time.monotonic() - completion.submitted)
        finished = None
        before = len(active.text)
        active.text += active.pieces.push(token)
        if active.generated >= completion.max_tokens:
            active.text += active.pieces.rest()
            finished = "length"
        if completion.stop and len(active.text) > before:
            if (cut := find_stop(active.text, completion.stop, before)) is not None:
                active.text, finished = active.text[:cut], "stop"
        if completion.on_piece is not None:
            ready = len(active.text) if finished else len(active.text) - held_back(active.text, completion.stop)
            now = time.monotonic()
            if ready > active.sent and (finished or not active.sent or now - active.sent_at >= self.stream_interval):
                completion.on_piece(active.text[active.sent:ready])
                active.sent, active.sent_at = ready, now
        if finished:
            self._finish(active, finished)

    def _finish(self, active: _Active, reason: str, error: Optional[str] = None) -> None:
        self._active.remove(active)
        active.row.release()
        self.metrics.active.set(len(self._active))
        completion = active.completion
        seconds = time.monotonic() - completion.submitted
        self._seconds_per_completion = 0.9 * self._seconds_per_completion + 0.1 * seconds
        self._end(completion, CompletionResult(active.text, reason, len(completion.prompt_ids), active.generated,
                                               error))

    def _end(self, completion: Completion, result: CompletionResult) -> None:
        self.metrics.completions.labels(result.finish_reason).inc()
        with self._cond:
            completion.version.in_flight -= 1
        completion.on_done(result)


class ChampionFollower:
    """Follows ``NAME``'s ``champion.json``, whatever moves it (a pipeline's promotion, `cortexcraft
    models promote` or `rollback`): a new champion is verified on this thread (sha256s), then
    built, smoke-tested and published by the engine. A version that fails is logged once (per
    change of the pointer) and the served one keeps serving."""

    def __init__(self, engine: InferenceEngine, models_dir: str | Path, name: str, poll_seconds: float = 0.5):
        self.engine = engine
        self.models_dir = Path(models_dir)
        self.name = name
        self.poll_seconds = poll_seconds
        self.champion: Optional[str] = None
        self.swap_error: Optional[str] = None
        self._failed: Optional[tuple[str, str]] = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="cortexcraft-champion-follower", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def _run(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            try:
                self.check()
            except Exception:  # noqa: BLE001 -- an unexpected failure must not end the following
                log.exception("following the champion of %s failed; trying again", self.name)

    def check(self) -> None:
        """Look at the pointer once; load the champion when it is not the served version."""
        try:
            pointer = read_champion(self.models_dir, self.name)
        except (OSError, ValueError) as exc:
            log.warning("cannot read the champion of %s (%s); still serving %s", self.name, exc,
                        self.engine.current.fingerprint)
            return
        if pointer is None:
            return
        self.champion = version = pointer["version"]
        if version == self.engine.current.version:
            self.swap_error = None
            return
        seen = (version, pointer.get("since", ""))
        if seen == self._failed:
            return
        serving = self.engine.current.fingerprint
        log.info("champion of %s is now %s: loading it beside %s", self.name, version, serving)
        try:
            self.engine.load(verified_version(self.models_dir, self.name, version)).result()
        except Exception as exc:  # noqa: BLE001 -- a bad version must never stop the served one
            self.engine.metrics.swap_failures.inc()
            self._failed = seen
            self.swap_error = f"{self.name}@{version}: {exc}"
            log.error("not serving %s@%s: %s; still serving %s", self.name, version, exc, serving)
            return
        self.swap_error = None
