"""Prefect tasks: one thin wrapper per pipeline stage, passing JSON stage records (see stage.py)."""
import os

# Read by Prefect when it is first imported: no telemetry (only errors offline); the ephemeral
# server gets longer than its 20 s default to start on a busy machine; and the library's own log
# lines (e.g. a damaged checkpoint skipped on resume) reach the run logs.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "cortexcraft")
