"""User errors reach the terminal as one line and exit status 2, inside a flow or not; --debug
shows the tracebacks. The CLI runs as a real process; stderr is counted line by line."""
from __future__ import annotations

import os
import subprocess
import sys

import httpx
import pytest

from prefect_server import REPO, free_port, isolated_prefect_env, prefect_server


def cortexcraft(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "flows", *args], cwd=REPO, env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=300)


def test_a_user_error_outside_a_flow_is_one_line_on_stderr(tmp_path):
    result = cortexcraft("train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"cortexcraft train: error: shard directory {tmp_path / 'missing'} does not exist; "
        f"run `cortexcraft prepare --out {tmp_path / 'missing'}` first"]


def test_debug_adds_the_traceback_before_or_after_the_command_name(tmp_path):
    for args in (["--debug", "train"], ["train", "--debug"]):
        result = cortexcraft(*args, "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "run"))
        assert result.returncode == 2
        assert result.stderr.startswith("Traceback (most recent call last)")
        assert result.stderr.splitlines()[-1].startswith("cortexcraft train: error: shard directory ")


def unreachable_source() -> str:
    return f"http://127.0.0.1:{free_port()}/corpus.txt"  # nothing listens there


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if "cannot reach http://127.0.0.1:" in line]


@pytest.mark.slow
def test_a_user_error_inside_a_flow_is_one_line_and_the_run_still_fails_in_the_api(tmp_path):
    source = unreachable_source()
    with prefect_server(tmp_path / "prefect-home", tmp_path / "server.log") as env:
        result = cortexcraft("pipeline", "--source", source, "--data-dir", str(tmp_path / "data"), env=env)
        assert result.returncode == 2
        lines = result.stderr.splitlines()
        (error,) = error_lines(result.stderr)
        assert error.startswith(f"cortexcraft pipeline: error: cannot reach {source} (")
        assert error.endswith("download the text and pass --source /path/to/local/copy")
        # Besides the error: the flow run's start, and on a busy machine Prefect's note at exit that
        # it is still sending events.
        assert "Traceback" not in result.stderr and len(lines) <= 3, result.stderr

        (run,) = httpx.post(f"{env['PREFECT_API_URL']}/flow_runs/filter", timeout=5).json()
        assert run["state_type"] == "FAILED"
        assert f"cannot reach {source}" in run["state"]["message"]

        debug = cortexcraft("--debug", "pipeline", "--source", source, "--data-dir", str(tmp_path / "data"), env=env)
        assert debug.returncode == 2
        assert debug.stderr.count("Traceback (most recent call last)") >= 2  # Prefect's and the CLI's
        assert "Finished in state Failed" in debug.stderr
        assert error_lines(debug.stderr)[-1] == error


@pytest.mark.slow
def test_a_user_error_in_a_flow_with_a_temporary_server_is_one_line(tmp_path):
    # No PREFECT_API_URL: the CLI starts (and stops) Prefect's temporary server, as a new user's does.
    env = isolated_prefect_env(tmp_path / "prefect-home", free_port())
    del env["PREFECT_API_URL"]
    result = cortexcraft("pipeline", "--source", unreachable_source(), "--data-dir", str(tmp_path / "data"), env=env)
    assert result.returncode == 2
    assert len(error_lines(result.stderr)) == 1 and "Traceback" not in result.stderr
    # Besides the error: starting (two lines) and stopping the temporary server, the flow run's
    # start, perhaps Prefect's note that it is still sending events (88 lines before the fix).
    assert len(result.stderr.splitlines()) <= 6, result.stderr
