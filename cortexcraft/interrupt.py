"""Stopping on SIGINT/SIGTERM at a safe point: the first signal asks, a second one insists.

Training polls a ``StopRequest`` once per step, saves a checkpoint at the step it reached and
raises ``Interrupted``; a second signal goes straight to the handler that was installed before
(Python's KeyboardInterrupt, the default "terminate", or an orchestrator's own), so it exits at once.
"""
from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from typing import Any, Callable, Optional

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
_PR_SET_PDEATHSIG = 1


class Interrupted(KeyboardInterrupt):
    """Stopped by a signal, after saving a checkpoint when training.

    A KeyboardInterrupt, not an Exception: an operator's stop is not a failure to retry."""

    def __init__(self, signum: int, message: str):
        super().__init__(message)
        self.signum = signum

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


class StopRequest:
    """While entered in the main thread, the first SIGINT/SIGTERM only records ``signum`` (and
    calls ``on_request``); the next one is handed to the handler that was there before.

    Elsewhere (a worker thread cannot own signals) it still works through ``request``."""

    def __init__(self, on_request: Optional[Callable[[int], None]] = None):
        self.signum: Optional[int] = None
        self.on_request = on_request
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def request(self, signum: int = signal.SIGTERM) -> None:
        self.signum = signum
        if self.on_request is not None:
            self.on_request(signum)

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.request(signum)
            return
        previous = self._previous.get(signum)
        self.__exit__()
        if callable(previous):
            previous(signum, frame)
        elif previous != signal.SIG_IGN:  # the default action: die by this signal, now
            os.kill(os.getpid(), signum)


# Set by a parent (to its pid) in a child's environment: the child is to call
# ``exit_with_parent_if_asked`` itself, since setting it between fork and exec (Popen's preexec_fn)
# can deadlock a parent that runs threads, as Prefect's task runners do.
EXIT_WITH_PARENT_ENV = "CORTEXCRAFT_EXIT_WITH_PARENT"


def exit_with_parent_env() -> dict[str, str]:
    """Environment entries asking a child that calls ``exit_with_parent_if_asked`` to get SIGTERM
    when this process dies."""
    return {EXIT_WITH_PARENT_ENV: str(os.getpid())}


def exit_with_parent_if_asked() -> None:
    """When this process's environment asks for it (``exit_with_parent_env``), arrange SIGTERM on
    the parent's death; when the parent died before that could be arranged, SIGTERM now, as the
    kernel would have sent it. The request is removed from the environment, so programs this process
    execs or starts do not act on a parent that is not theirs."""
    expected = os.environ.pop(EXIT_WITH_PARENT_ENV, None)
    if expected is None:
        return
    exit_with_parent()
    # prctl only covers a parent alive at the call; one that died earlier left us to init or a
    # subreaper, which shows as another parent pid.
    if os.getppid() != int(expected):
        os.kill(os.getpid(), signal.SIGTERM)


def exit_with_parent(signum: int = signal.SIGTERM) -> None:
    """Have Linux send ``signum`` to this process when its parent dies (a SIGKILLed launcher
    must not leave its children training on). It outlives ``exec`` of an ordinary program.
    No-op on other systems."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
