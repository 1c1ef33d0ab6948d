"""Which failures are worth another attempt: permanent errors end a run at once, transient ones are retried.

A permanent error gives the same answer on every attempt, so a retry only delays the report (a config typo
used to be retried for minutes): config errors (:class:`mirotrain.config.ConfigError`), missing files and
not-found sources (``FileNotFoundError``, :class:`mirotrain.hub.SourceNotFound`), and an engine that exits
with code 2 (the engine's exit code for a config error, ``mirotrain/commands/recipe.py``). Everything else --
network errors, preemption, a SIGKILLed rank, other exit codes, a timeout -- is transient and keeps the
retries it has.

Two levels use the same rule:

- tasks: ``retry_condition_fn=retry_unless_permanent`` (a Prefect task option);
- flows: Prefect 3 flows have no retry condition, and flow retries are decided by the server (it turns a
  proposed Failed state into AwaitingRetry while ``run_count <= retries``). :func:`no_flow_retry_on_permanent`
  wraps a flow function so that a permanent error first sets this flow run's retry budget to zero through
  the API, then re-raises: the server accepts the Failed state and the run ends after one attempt.
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, TypeVar

# Exit code 2 from the engine = a config or usage error (mirotrain/cli.py, mirotrain/commands/recipe.py).
PERMANENT_EXIT_CODE = 2
# torchrun's error summary (ChildFailedError in torch.distributed.elastic) lists each failed rank under
# "Failures:" and "Root Cause (first observed failure):", up to a closing "=====" line, as
# "  exitcode  : 2 (pid: ...)". Only lines there are read: the engine's own output may say anything.
_SUMMARY_HEADERS = ("Failures:", "Root Cause (first observed failure):")
_SUMMARY_EXITCODE = re.compile(r"exitcode\s*:\s*(-?\d+)\s*\(pid:")

F = TypeVar("F", bound=Callable[..., Any])


def _is_torchrun(cmd: list[str]) -> bool:
    return "torch.distributed.run" in cmd or (bool(cmd) and cmd[0].rsplit("/", 1)[-1] == "torchrun")


def _torchrun_summary_codes(tail: list[str]) -> list[int]:
    """The per-rank exit codes of torchrun's error summary in ``tail`` (empty when it printed none)."""
    codes: list[int] = []
    inside = False
    for line in tail:
        text = line.strip()
        if text in _SUMMARY_HEADERS:
            inside = True
        elif inside and text.startswith("=" * 10):
            inside = False
        elif inside and (match := _SUMMARY_EXITCODE.match(text)):
            codes.append(int(match.group(1)))
    return codes


def _engine_exit_codes(exc: BaseException) -> list[int]:
    """Exit codes of a failed engine command: torchrun's per-rank codes from its error summary when the
    command is torchrun and it printed one, else the command's own exit code."""
    from tasks._subprocess import CommandFailed

    if not isinstance(exc, CommandFailed):
        return []
    ranks = _torchrun_summary_codes(exc.tail) if _is_torchrun(exc.cmd) else []
    return ranks or [exc.returncode]


def _hub_unreachable(exc: BaseException) -> bool:
    """``huggingface_hub`` raises LocalEntryNotFoundError, a FileNotFoundError, when the Hub cannot be reached
    and the file is not cached (e.g. ``datasets.load_dataset`` offline): a network error, not a missing file."""
    from huggingface_hub.errors import LocalEntryNotFoundError

    return isinstance(exc, LocalEntryNotFoundError)


def is_permanent(exc: BaseException | None) -> bool:
    """True for an error that another attempt cannot fix (see the module docstring for the list)."""
    from mirotrain.config import ConfigError
    from mirotrain.hub import SourceNotFound

    if exc is None:
        return False
    if isinstance(exc, (ConfigError, SourceNotFound, NotADirectoryError)):
        return True
    if isinstance(exc, FileNotFoundError):
        return not _hub_unreachable(exc)
    codes = _engine_exit_codes(exc)
    return bool(codes) and all(code == PERMANENT_EXIT_CODE for code in codes)


def _state_exception(state: Any) -> BaseException | None:
    data = getattr(state, "data", None)
    return data if isinstance(data, BaseException) else None


def retry_unless_permanent(task: Any, task_run: Any, state: Any) -> bool:
    """Prefect ``retry_condition_fn``: retry a failed task run unless its exception is permanent."""
    exc = _state_exception(state)
    if is_permanent(exc):
        from tasks._runtime import run_logger

        run_logger().error(f"not retrying {task.name}: permanent error ({type(exc).__name__}): {exc}")
        return False
    return True


def _end_flow_retries() -> None:
    """Set the current flow run's retry budget to 0, so the server lets its Failed state stand."""
    from prefect.client.orchestration import get_client
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return
    policy = ctx.flow_run.empirical_policy.model_copy(update={"retries": 0})
    with get_client(sync_client=True) as client:
        client.update_flow_run(flow_run_id=ctx.flow_run.id, empirical_policy=policy)
    ctx.flow_run.empirical_policy = policy


def no_flow_retry_on_permanent(fn: F) -> F:
    """Decorate a flow function (under ``@flow``) so a permanent error ends its flow run without flow retries."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            if is_permanent(exc):
                try:
                    _end_flow_retries()
                except Exception as api_error:  # noqa: BLE001 - the run's own error is the one to report
                    from tasks._runtime import run_logger

                    run_logger().warning(f"could not switch off flow retries for a permanent error: {api_error}")
            raise

    return wrapper  # type: ignore[return-value]
