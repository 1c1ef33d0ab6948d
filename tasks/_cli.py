"""Turn a task's signature into a command line, so ``python -m tasks.<name>`` takes the task's parameters.

The parser is derived from the function's type hints and defaults (one ``--flag`` per parameter, ``_`` ->
``-``), so the CLI and the task cannot drift apart. By default the task runs inside a one-task flow named
``task-<name>``: standalone task runs do not send their logs to the Prefect API, a flow run does.
``--no-prefect`` calls the plain function instead (no API needed, e.g. inside a Slurm step).

Under ``python -m tasks.<name>`` the module runs as ``__main__``, and a task taken from there would store
results whose classes live in ``__main__`` (pickled by value, a new class on every load) under a key hashed
from ``__main__``'s code. So the CLI runs the task imported from its real module, ``tasks.<name>``: a second
call with the same inputs then finds the first call's record and reports ``Cached``.

Exit codes: 0 when the task completed (or was cached), 2 when it failed with a permanent error (a config
error, a missing file, a source that does not exist: :func:`tasks._retry.is_permanent`, the errors that are
never retried), 1 for any other failure. A scheduler wrapping the CLI can thus tell "fix the input" from
"try again" the way the engine's own exit code 2 does.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import sys
import types
import typing
from typing import Any, Callable, Literal, Union, get_args, get_origin

from tasks._retry import is_permanent
from tasks._runtime import apply_prefect_env_defaults


def _exit_code(exc: BaseException | None) -> int:
    """2 for a permanent error, 1 for any other failure (see the module docstring)."""
    return 2 if is_permanent(exc) else 1


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _add_argument(parser: argparse.ArgumentParser, name: str, tp: Any, default: Any, help_text: str) -> None:
    flag = "--" + name.replace("_", "-")
    tp = _unwrap_optional(tp)
    origin = get_origin(tp)
    required = default is inspect.Parameter.empty
    kwargs: dict[str, Any] = {"dest": name, "help": help_text}
    if not required:
        kwargs["default"] = default
    else:
        kwargs["required"] = True
    if tp is bool:
        parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kwargs)
        return
    if origin is Literal:
        kwargs["choices"] = list(get_args(tp))
        kwargs["type"] = type(get_args(tp)[0])
    elif origin in (list, tuple):
        inner = get_args(tp)[0] if get_args(tp) else str
        kwargs.update(nargs="*", type=inner)
        kwargs["metavar"] = "VALUE"
    elif origin is dict or tp is dict:
        kwargs.update(type=json.loads, metavar="JSON")
    elif tp in (int, float, str):
        kwargs["type"] = tp
    parser.add_argument(flag, **kwargs)


def _param_help(doc: str) -> dict[str, str]:
    """Pull ``name: text`` lines out of a Google-style ``Args:`` section."""
    out: dict[str, str] = {}
    in_args = False
    current = None
    for line in (doc or "").splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            in_args = True
            continue
        if in_args:
            if stripped.endswith(":") and " " not in stripped:  # next section ("Returns:")
                break
            if ":" in stripped and stripped.split(":", 1)[0].isidentifier() and line.startswith(" " * 4) and not line.startswith(" " * 5):
                current, text = stripped.split(":", 1)
                out[current] = text.strip()
            elif current and stripped:
                out[current] += " " + stripped
    return out


def build_parser(fn: Callable[..., Any], prog: str) -> argparse.ArgumentParser:
    doc = inspect.getdoc(fn) or ""
    parser = argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(fn)
    helps = _param_help(doc)
    for name, param in inspect.signature(fn).parameters.items():
        _add_argument(parser, name, hints.get(name, str), param.default, helps.get(name, ""))
    parser.add_argument("--no-prefect", action="store_true",
                        help="call the step without Prefect (no API, no retries, no artifacts)")
    return parser


def run_task_cli(task_obj: Any, argv: list[str] | None = None, module: str | None = None) -> int:
    """Parse ``argv`` against the task's signature, run it (inside a flow unless ``--no-prefect``), print the result.

    ``module`` names the task's module under ``tasks``; the task object is re-imported from there (see above).
    """
    apply_prefect_env_defaults()
    if module:
        task_obj = getattr(importlib.import_module(f"tasks.{module}"), task_obj.fn.__name__)
    fn = task_obj.fn
    name = task_obj.name
    args = vars(build_parser(fn, f"python -m tasks.{module or name}").parse_args(argv))
    no_prefect = args.pop("no_prefect")
    if no_prefect:
        try:
            result = fn(**args)
        except Exception as exc:  # noqa: BLE001 - one clear line, as the flow path prints its failed state
            print(f"{name}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            return _exit_code(exc)
    else:
        from prefect import flow

        @flow(name=f"task-{name}", log_prints=True, validate_parameters=False)
        def _one_task_flow(params: dict[str, Any]) -> tuple[str, Any]:
            task_state = task_obj(**params, return_state=True)
            return task_state.name, task_state.result()  # raises the task's error: the flow fails with it

        state = _one_task_flow(params=args, return_state=True)
        if not state.is_completed():
            print(f"{name}: {state.type.value}: {state.message}", file=sys.stderr, flush=True)
            error = state.result(raise_on_failure=False)
            return _exit_code(error if isinstance(error, BaseException) else None)
        task_state_name, result = state.result()
        print(f"{name}: {task_state_name}", file=sys.stderr, flush=True)  # Completed, or Cached on a cache hit
    if hasattr(result, "model_dump_json"):
        print(result.model_dump_json(indent=2))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0
