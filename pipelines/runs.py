"""Run identity: one flow run is one training run, with a run directory of its own.

The rule (docs/pipeline.md, "Runs and run directories"):

- a new flow run (manual, scheduled, from the UI) trains into ``<base>/<run name>``, where ``<base>`` is the
  stage's ``output_dir`` (or the config's) and the run name is ``<flow-run-name>-<first 8 hex of its id>``
  of the *root* flow run: the sft and dpo stages of one ``post-train`` share it, and the id suffix keeps two
  runs apart even when Prefect gives them the same two-word name;
- every retry of that flow run (task retry, flow retry, ``prefect flow-run retry``, the crash automation's
  reschedule) keeps the flow run's id, so it finds the same directory and the engine's auto-resume continues
  from its newest complete step checkpoint. The name is mutable (the UI can rename a run), so an existing
  directory under ``<base>`` ending in ``-<id8>`` of this flow run is reused whatever its name part says;
- ``resume_from`` (a run name, the flow-run name alone when it matches one run, or a run directory)
  continues a named run from a new flow run.

Outside a flow run nothing is renamed: the task CLIs use the ``output_dir`` they are given.
"""

import glob
import re
from pathlib import Path
from typing import Optional
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext

from mirotrain.config import ConfigError
from pipelines.params import StageConfig, stage_overrides

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def _dir_name(name: str) -> str:
    """A flow-run name made safe as one path component (custom names may hold spaces or slashes)."""
    return _UNSAFE.sub("-", name).strip("-.") or "run"


def _name(run: FlowRun) -> str:
    return f"{_dir_name(run.name)}-{run.id.hex[:8]}"


def flow_run_name() -> Optional[str]:
    """``<name>-<id8>`` of the root flow run of the current flow run; None outside a flow run."""
    ctx = FlowRunContext.get()
    if ctx is None or ctx.flow_run is None:
        return None
    run = ctx.flow_run
    if run.parent_task_run_id is not None:  # a subflow: walk up to the flow run the operator started
        with get_client(sync_client=True) as client:
            while run.parent_task_run_id is not None:
                run = client.read_flow_run(client.read_task_run(run.parent_task_run_id).flow_run_id)
    return _name(run)


def name_of_flow_run(flow_run_id: UUID) -> str:
    """The run name a (root) flow run trains under, e.g. to tell an operator what to pass as ``resume_from``."""
    with get_client(sync_client=True) as client:
        return _name(client.read_flow_run(flow_run_id))


def is_root_flow_run() -> bool:
    """True in a flow run that no other flow run started (where the operator's parameters arrive)."""
    ctx = FlowRunContext.get()
    return ctx is not None and ctx.flow_run is not None and ctx.flow_run.parent_task_run_id is None


def find_run(base: str | Path, resume_from: str) -> Path:
    """The existing run directory ``resume_from`` names under ``base``; a clear error when there is none.

    ``resume_from`` may be a run name (``tall-otter-1a2b3c4d``), the flow-run name alone (``tall-otter``)
    when exactly one run under ``base`` carries it, or a run directory (its last component is the name).
    """
    root = Path(base).resolve()
    name = Path(resume_from.rstrip("/")).name
    if name in ("", ".", ".."):
        raise ConfigError("", f"resume_from={resume_from!r}: not a run name or run directory")
    exact = root / name
    if exact.is_dir():
        return exact
    matches = sorted(p for p in root.glob(f"{glob.escape(name)}-*")
                     if p.is_dir() and re.fullmatch(r"[0-9a-f]{8}", p.name[len(name) + 1:]))
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError("", f"resume_from={resume_from!r}: several runs match under {root}: "
                         + ", ".join(p.name for p in matches) + "; pass the full run name")
    raise FileNotFoundError(f"resume_from={resume_from!r}: no run directory {exact}")


def existing_run_dir(base: str | Path, name: str) -> str:
    """``name`` (``<flow-run-name>-<id8>``), or the name of the directory under ``base`` that already carries
    this flow run's ``-<id8>``: a run renamed after its first attempt keeps resuming where that attempt wrote."""
    suffix = name.rsplit("-", 1)[-1]
    root = Path(base)
    if (root / name).is_dir() or not root.is_dir():
        return name
    found = sorted(p.name for p in root.glob(f"*-{suffix}") if p.is_dir())
    return found[0] if found else name


def run_name(base: str | Path, resume_from: Optional[str] = None) -> Optional[str]:
    """The run's name by the rule in this module's docstring; None outside a flow run without ``resume_from``.

    In a root flow run ``resume_from`` must name an existing run under ``base`` (checked here, before any
    download or training). A subflow trusts its parent, which checked the first stage: the later stages of a
    resumed run may not have started yet.
    """
    if resume_from:
        if is_root_flow_run():
            return find_run(base, resume_from).name
        return Path(resume_from.rstrip("/")).name
    name = flow_run_name()
    return existing_run_dir(base, name) if name else None


def stage_base(stage: StageConfig) -> Path:
    """The absolute directory a stage's runs go under: its ``output_dir``, else the config's (after overrides)."""
    from tasks.train import resolve_output_dir

    return Path(resolve_output_dir(stage.config, stage_overrides(stage, None))).resolve()


def under(base: str | Path, name: Optional[str]) -> str:
    """``base/name`` as an absolute path (``base`` itself when there is no run name)."""
    root = Path(base).resolve()
    return str(root / name if name else root)


def stage_run_dir(stage: StageConfig, resume_from: Optional[str] = None) -> str:
    """The absolute run directory one stage trains into."""
    base = stage_base(stage)
    return under(base, run_name(base, resume_from))
