"""Task ``train``: run `mirotrain sft|dpo` under torchrun as a supervised child process tree.

What the task adds around the engine:

- rendezvous from parameters, else torchrun's or Kubeflow's variables (PET_*, NNODES, NODE_RANK, MASTER_ADDR,
  ...), the platform's WORKER_* or Slurm's (``tasks/_rendezvous.py``); on node 0 of a multi-node job each
  launch is published to the other nodes' agents (``tasks/node_agent.py``);
- ``auto_resume=True`` appended after the user's overrides, so every retry -- task retry, flow retry, or a
  manual ``prefect flow-run retry`` after a crash -- continues from the newest complete step checkpoint in
  ``output_dir`` and recomputes at most one checkpoint interval. Which directory that is, is the caller's
  choice: the flows give each flow run a run directory of its own (``pipelines/runs.py``), so a new flow run
  starts fresh and only retries resume; called on its own (the CLI below) the task uses ``output_dir`` as is;
- output streamed line by line into the Prefect run log, a progress artifact updated as steps go by;
- the whole process group killed on cancellation, timeout or flow-process death (``tasks/_subprocess.py``);
- a non-zero exit is a task failure, retried with a delay (``retries``/``retry_delay_seconds``, override
  with ``train.with_options(...)``).

Never cached: training is not idempotent in cost, and resume is the engine's job.

    python -m tasks.train --recipe sft --config mirotrain/configs/tiny/sft.yaml --overrides max_steps=20
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from tasks._launch_spec import node_launch
from tasks._rendezvous import engine_command, resolve_rendezvous
from tasks._retry import retry_unless_permanent
from tasks._runtime import in_run, run_logger
from tasks._subprocess import run_streaming

# The engine's step lines ("Step 12 | loss=... | total_steps=40"; also "step 12/40"); the total may be absent.
_STEP = re.compile(r"\bstep[\s=:]+(\d+)\s*(?:/\s*(\d+))?", re.IGNORECASE)
_TOTAL = re.compile(r"\b(?:total_steps|max_steps)[=:\s]+(\d+)")


class TrainResult(BaseModel):
    """Where the run wrote its outputs (see docs/contracts.md: output directory layout)."""

    recipe: str
    output_dir: str
    hf_dir: str | None
    steps: int | None
    final_loss: float | None
    checkpoints: list[str]
    resumed_from: str | None = None  # the step checkpoint the successful attempt started from
    summary: dict[str, Any]


def complete_checkpoints(output_dir: str | Path) -> list[str]:
    """The step checkpoints under ``output_dir`` that the engine would load, oldest first: the engine's own
    integrity check (marker, file sizes, DCP byte ranges), not a second implementation of it."""
    from mirotrain.checkpoint.layout import check_step_dir, list_step_dirs

    return [str(e.path) for e in list_step_dirs(Path(output_dir) / "checkpoints") if check_step_dir(e.path) is None]


def resumed_checkpoint(output_dir: str | Path, summary: dict[str, Any]) -> str | None:
    """The step checkpoint the engine says (``resumed_from_step`` in summary.json) the run started from."""
    step = summary.get("resumed_from_step")
    return str(Path(output_dir) / "checkpoints" / f"step_{step}") if step else None


def resolve_output_dir(config: str, overrides: list[str]) -> str:
    """The run's ``output_dir`` after overrides and interpolation, exactly as the engine will see it.

    A missing one is a :class:`~mirotrain.config.ConfigError`, which no retry can fix (``tasks/_retry.py``).
    """
    from mirotrain.config import ConfigError, load_config

    cfg = load_config(config, overrides)
    out = cfg.get("output_dir")
    if not out:
        raise ConfigError("output_dir", "not set (set it in the config or pass output_dir=...)", source=config)
    return str(out)


class _Progress:
    """Turns step lines into a Prefect progress artifact (0-100), updated at most every ``every_s`` seconds."""

    def __init__(self, key: str, description: str, total: int | None, every_s: float = 2.0):
        self.total = total
        self.every_s = every_s
        self.last_update = 0.0
        self.step = 0
        self.artifact_id = None
        if in_run():
            from prefect.artifacts import create_progress_artifact

            self.artifact_id = create_progress_artifact(progress=0.0, key=key, description=description)

    def on_line(self, line: str) -> None:
        m = _STEP.search(line)
        if not m:
            return
        self.step = int(m.group(1))
        total = m.group(2) or (_TOTAL.search(line).group(1) if _TOTAL.search(line) else None)
        if total:
            self.total = int(total)
        if self.artifact_id and self.total and time.monotonic() - self.last_update > self.every_s:
            self.push()

    def push(self, value: float | None = None) -> None:
        if not self.artifact_id:
            return
        from prefect.artifacts import update_progress_artifact

        pct = value if value is not None else (100.0 * min(self.step, self.total) / self.total if self.total else 0.0)
        update_progress_artifact(artifact_id=self.artifact_id, progress=round(pct, 1))
        self.last_update = time.monotonic()


def planned_steps(config: str, overrides: list[str]) -> int | None:
    """epochs x max_steps_per_epoch when the config caps the epoch; else None (the engine's step lines say)."""
    from mirotrain.config import load_config

    try:
        cfg = load_config(config, overrides)
    except Exception:  # noqa: BLE001 - progress is best-effort; the engine reports config errors itself
        return None
    per_epoch, epochs = cfg.get("max_steps_per_epoch"), cfg.get("epochs", 1)
    return per_epoch * epochs if isinstance(per_epoch, int) and isinstance(epochs, int) and per_epoch > 0 else None


def _read_summary(output_dir: str) -> dict[str, Any]:
    p = Path(output_dir) / "summary.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def engine_root() -> str:
    """The directory this process imports the engine package from, first on the children's PYTHONPATH: there
    the package is a regular one, which Python's path search takes over any namespace folder of the same name,
    so the children run this engine from any working directory.

    It is read from a module of the package, not from ``mirotrain.__file__``: with the editable install
    (``pip install -e .``) the package is found by an import hook that runs after the path search, so where
    the working directory (first on ``sys.path`` under ``python -m``) holds a folder named ``mirotrain/`` --
    ``/tmp`` does once a shipped config has written its ``output_dir`` under ``/tmp/mirotrain`` -- the package
    itself is that empty namespace folder (``__file__`` None) while its modules still come from the install."""
    from mirotrain import cli

    return str(Path(cli.__file__).resolve().parents[1])


def run_engine(args: list[str], *, nproc_per_node: int | None, nnodes: int | None, node_rank: int | None,
               master_addr: str | None, master_port: int | None, launcher: str, timeout_s: float | None,
               env: dict[str, str] | None, on_line: Any = None, rdzv_timeout_s: float | None = None) -> None:
    """Resolve the rendezvous, build the launch command and run it under :func:`run_streaming`."""
    logger = run_logger()
    rdzv = resolve_rendezvous(nproc_per_node, nnodes, node_rank, master_addr, master_port, rdzv_timeout_s)
    cmd = engine_command(args, rdzv, launcher)
    logger.info(f"rendezvous: {rdzv.describe()}")
    logger.info("launch: " + " ".join(cmd))
    # Node 0 of a multi-node job publishes the launch to the other nodes' agents (tasks/_launch_spec.py).
    launch = node_launch(args, rdzv, launcher=launcher, timeout_s=timeout_s, env=env)
    # The children import the same engine as this process, whatever their working directory.
    env = {**(env or {}), "PYTHONPATH": os.pathsep.join(p for p in (engine_root(), os.environ.get("PYTHONPATH")) if p)}
    with launch:
        run_streaming(cmd, env=env, log=logger.info, on_line=on_line, timeout_s=timeout_s,
                      on_start=lambda pid: logger.info(f"engine process group {pid}"))


@task(name="train", retries=2, retry_delay_seconds=[10, 60], cache_policy=NO_CACHE, persist_result=True,
      retry_condition_fn=retry_unless_permanent)
def train(recipe: Literal["sft", "dpo"], config: str, overrides: list[str] | None = None,
          output_dir: str | None = None, nproc_per_node: int | None = None, nnodes: int | None = None,
          node_rank: int | None = None, master_addr: str | None = None, master_port: int | None = None,
          rdzv_timeout_s: float | None = None, launcher: Literal["auto", "torchrun", "python"] = "auto",
          timeout_s: float | None = None, env: dict[str, str] | None = None) -> TrainResult:
    """Train with `mirotrain sft|dpo` under torchrun; resumes from the newest complete step checkpoint.

    Args:
        recipe: sft or dpo.
        config: Training config YAML.
        overrides: key=value config overrides (auto_resume=True is always appended).
        output_dir: Overrides the config's output_dir (used as is: the run directory to train or resume in).
        nproc_per_node: Processes (GPUs) per node; default from PET_NPROC_PER_NODE / WORKER_GPU / Slurm /
            visible GPUs / 1.
        nnodes: Number of nodes; default from PET_NNODES / NNODES / WORLD_SIZE / WORKER_NUM / SLURM_NNODES / 1.
        node_rank: This node's rank; default from PET_NODE_RANK / NODE_RANK / RANK / ROLE_INDEX / SLURM_NODEID / 0.
        master_addr: Rendezvous host; default from PET_MASTER_ADDR / MASTER_ADDR / WORKER_0_HOST / the first
            Slurm node / 127.0.0.1.
        master_port: Rendezvous port; default from PET_MASTER_PORT / MASTER_PORT / WORKER_0_PORT / Slurm job
            id / 29500.
        rdzv_timeout_s: Seconds the rendezvous waits for every node; default from MIROTRAIN_RDZV_TIMEOUT_S / 300.
        launcher: auto (torchrun when more than one process), torchrun, or python (one process).
        timeout_s: Wall-clock limit; the process group is killed when it is reached.
        env: Extra environment variables for the engine (e.g. NCCL settings).
    """
    logger = run_logger()
    overrides = list(overrides or [])
    if output_dir:
        overrides.append(f"output_dir={output_dir}")
    overrides.append("auto_resume=True")
    out = str(Path(resolve_output_dir(config, overrides)).resolve())  # artifacts are read from elsewhere
    found = complete_checkpoints(out)
    logger.info(f"{recipe}: output_dir={out}; the engine resumes from its newest complete step checkpoint "
                + (f"(now {found[-1]})" if found else "(none yet: a fresh start)"))
    progress = _Progress(key=f"{recipe}-progress", description=f"{recipe} steps ({out})",
                         total=planned_steps(config, overrides))
    run_engine([recipe, "--config", config, *overrides], nproc_per_node=nproc_per_node, nnodes=nnodes,
               node_rank=node_rank, master_addr=master_addr, master_port=master_port, launcher=launcher,
               timeout_s=timeout_s, env=env, on_line=progress.on_line, rdzv_timeout_s=rdzv_timeout_s)
    progress.push(100.0)
    summary = _read_summary(out)
    hf_dir = summary.get("hf_dir") or (str(Path(out) / "hf" / "final") if (Path(out) / "hf" / "final").is_dir() else None)
    hf_dir = str(Path(hf_dir).resolve()) if hf_dir else None
    return TrainResult(recipe=recipe, output_dir=out, hf_dir=hf_dir, steps=summary.get("steps"),
                       final_loss=summary.get("final_loss"), checkpoints=complete_checkpoints(out),
                       resumed_from=resumed_checkpoint(out, summary), summary=summary)


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(train, argv, module="train")


if __name__ == "__main__":
    raise SystemExit(main())
