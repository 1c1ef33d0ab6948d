"""Small helpers shared by the tasks: a logger that works in and out of a Prefect run, quiet defaults."""

from __future__ import annotations

import logging
import os

# Offline defaults: no telemetry from server or SDK (the machines may have no route out), and enough time for a
# fresh SQLite database to migrate when Prefect starts an ephemeral server (the default timeout is too short on
# a busy 2-core machine).
PREFECT_ENV_DEFAULTS: dict[str, str] = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
}


def apply_prefect_env_defaults() -> None:
    """Set the offline defaults unless the user set them; call before ``import prefect`` to be sure."""
    for key, value in PREFECT_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def run_logger() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run logger inside a flow/task run, a plain logger otherwise (``.fn()`` calls, tests)."""
    from prefect.context import FlowRunContext, TaskRunContext
    from prefect.logging import get_run_logger

    if TaskRunContext.get() or FlowRunContext.get():
        return get_run_logger()
    logger = logging.getLogger("mirotrain.tasks")
    if not logger.handlers and not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    return logger


def in_run() -> bool:
    """True inside a Prefect flow or task run (artifacts need one)."""
    from prefect.context import FlowRunContext, TaskRunContext

    return bool(TaskRunContext.get() or FlowRunContext.get())
