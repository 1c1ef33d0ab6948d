"""Metric sinks named by MiroTrain configs (``torchtune.training.metric_logging.*``).

Every logger has ``log_dict(metrics, step)`` and ``close()``. The trainer always writes
``{output_dir}/metrics.jsonl`` and a stdout line itself; a configured ``metric_logger`` is an extra sink.
Only rank 0 logs. Optional back-ends (tensorboard, wandb) are imported lazily and, when missing, raise a
clear error at construction.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Mapping


def format_metrics(metrics: Mapping[str, Any], step: int) -> str:
    """One line: ``Step N | loss=0.12345678 | lr=...``; floats with 8 significant decimals."""
    parts = [f"Step {step}"]
    for key, value in metrics.items():
        if isinstance(value, float):
            parts.append(f"{key}={value:.8g}" if math.isfinite(value) else f"{key}={value}")
        else:
            parts.append(f"{key}={value}")
    return " | ".join(parts)


class StdoutLogger:
    """Prints one line per logged step."""

    def __init__(self, **_: Any):
        pass

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        print(f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {format_metrics(metrics, step)}", file=sys.stdout, flush=True)

    def close(self) -> None:
        pass


class JsonlLogger:
    """Appends one JSON object per logged step (``{"step": N, ...}``) to a file.

    ``truncate_after(step)`` drops lines of steps a resumed run will redo, so the file reads as one history.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = None

    def truncate_after(self, step: int) -> None:
        if not self.path.is_file():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    kept.append(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
        self.path.write_text("".join(k + "\n" for k in kept))

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._file is None:
            self._file = self.path.open("a")
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class DiskLogger(JsonlLogger):
    """torchtune's DiskLogger: metrics written under ``log_dir`` (one JSONL file per run)."""

    def __init__(self, log_dir: str, filename: str | None = None, **_: Any):
        name = filename or f"log_{int(time.time())}.jsonl"
        super().__init__(Path(log_dir) / name)


class TensorBoardLogger:
    """Scalars to TensorBoard event files under ``log_dir``."""

    def __init__(self, log_dir: str, organize_logs: bool = True, purge_step: int | None = None, **_: Any):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as exc:
            raise ImportError("TensorBoardLogger needs the tensorboard package (pip install tensorboard)") from exc
        self._writer = SummaryWriter(log_dir=log_dir, purge_step=purge_step)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class WandBLogger:
    """Weights & Biases run (``project``, ``entity``, ``group``, ``log_dir``...)."""

    def __init__(self, project: str = "mirotrain", entity: str | None = None, group: str | None = None,
                 log_dir: str | None = None, **kwargs: Any):
        try:
            import wandb
        except ImportError as exc:
            raise ImportError("WandBLogger needs the wandb package (pip install wandb)") from exc
        self._run = wandb.init(project=project, entity=entity, group=group, dir=log_dir, resume="allow", **kwargs)

    def log_dict(self, metrics: Mapping[str, Any], step: int) -> None:
        self._run.log(dict(metrics), step=step)

    def close(self) -> None:
        self._run.finish()


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True
