"""Step-checkpoint directories on disk: naming, the COMPLETE marker, integrity checks and retention.

``{output_dir}/checkpoints/step_{N}/`` holds the DCP files (one ``*.distcp`` per rank + ``.metadata``), a
``meta.json`` (step, epoch, seed, config hash, model args; readable before DCP loading) and, once every rank's
data is persisted, ``COMPLETE``: a JSON manifest of every file and its size. A checkpoint counts only when its
marker exists, every listed file has its recorded size, and every byte range the DCP metadata refers to lies
inside its file, so a missing or truncated file is caught before resume rather than during it.

MiroTrain v0.1 wrote its step checkpoints to ``{output_dir}/epoch_{E}/step_{S}/`` (DCP, a ``.metadata`` file,
no ``meta.json``), beside the HF weights it saved into ``epoch_{E}/`` at each epoch end. Those cannot be
resumed here: their model and optimizer entries use MiroTrain's parameter names (``layers.0.attn.q_proj``
where ours say ``layers.0.attention.wq``) and their data-loader state is MiroTrain's. Auto-resume and
``mirotrain convert`` therefore refuse them with :func:`mirotrain_refusal`, which names the directory found
and the run to start instead (from MiroTrain's epoch-end HF weights). The ``epoch_{N}/`` directories this
trainer writes hold HF files only (no ``step_*/.metadata``), so they are never taken for one.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MARKER = "COMPLETE"
META = "meta.json"
_STEP_RE = re.compile(r"^step_(\d+)$")
# ``epoch_{E}``: the directory MiroTrain nested its step checkpoints in, and the name of this trainer's per-epoch
# HF exports and their links (mirotrain/training/export.py): written by ``epoch_dir_name``, read by EPOCH_DIR_RE
EPOCH_DIR_RE = re.compile(r"^epoch_(\d+)$")


def epoch_dir_name(epoch: int) -> str:
    return f"epoch_{epoch}"
DCP_METADATA = ".metadata"


@dataclass(frozen=True)
class StepDir:
    step: int
    path: Path


def step_path(root: Path, step: int) -> Path:
    return Path(root) / f"step_{step}"


def list_step_dirs(root: Path) -> list[StepDir]:
    """All ``step_N`` directories under ``root``, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append(StepDir(int(m.group(1)), child))
    return sorted(found, key=lambda d: d.step)


def write_marker(path: Path) -> None:
    """Write COMPLETE listing every file of the checkpoint with its size (atomically: tmp + rename)."""
    path = Path(path)
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file() and f.name != MARKER
             and not f.name.endswith(".tmp")}
    tmp = path / (MARKER + ".tmp")
    tmp.write_text(json.dumps({"files": files}, indent=1))
    tmp.rename(path / MARKER)


def _dcp_ranges_ok(path: Path) -> str | None:
    from torch.distributed.checkpoint import FileSystemReader

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except Exception as exc:  # unreadable or cut metadata
        return f".metadata is unreadable ({type(exc).__name__}: {exc})"
    sizes: dict[str, int] = {}
    for info in (metadata.storage_data or {}).values():
        rel = info.relative_path
        if rel not in sizes:
            f = path / rel
            if not f.is_file():
                return f"data file {rel} is missing"
            sizes[rel] = f.stat().st_size
        if info.offset + info.length > sizes[rel]:
            return f"data file {rel} is truncated ({sizes[rel]} bytes, needs {info.offset + info.length})"
    return None


def check_step_dir(path: Path) -> str | None:
    """None when the checkpoint is complete and intact, else the reason it cannot be used."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return "no COMPLETE marker (the save did not finish)"
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as exc:
        return f"COMPLETE marker is unreadable ({exc})"
    for name, size in files.items():
        f = path / name
        if not f.is_file():
            return f"file {name} is missing"
        if f.stat().st_size != size:
            return f"file {name} has {f.stat().st_size} bytes, expected {size}"
    if ".metadata" not in files or META not in files:
        return "COMPLETE lists no .metadata / meta.json"
    return _dcp_ranges_ok(path)


def read_meta(path: Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def newest_valid(root: Path, remove_invalid_newer: bool = False) -> StepDir | None:
    """The newest intact checkpoint; each unusable one newer than it is reported (and optionally removed)."""
    for entry in reversed(list_step_dirs(root)):
        reason = check_step_dir(entry.path)
        if reason is None:
            return entry
        log.warning("Skipping step checkpoint %s: %s.%s", entry.path, reason,
                    " Removing it (it will be written again)." if remove_invalid_newer else "")
        if remove_invalid_newer:
            shutil.rmtree(entry.path, ignore_errors=True)
    return None


@dataclass(frozen=True)
class MiroTrainStepDir:
    """A step checkpoint in MiroTrain's layout: ``{output_dir}/epoch_{epoch}/step_{step}/.metadata``."""

    epoch: int
    step: int
    path: Path


def _epoch_dirs(output_dir: Path) -> list[tuple[int, Path]]:
    """The ``epoch_E`` directories of ``output_dir`` with their E, oldest first."""
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), child) for child in output_dir.iterdir()
             if (m := EPOCH_DIR_RE.match(child.name)) and child.is_dir()]
    return sorted(found)


def mirotrain_step_dir(path: str | Path) -> MiroTrainStepDir | None:
    """``path`` as a MiroTrain step checkpoint (``.../epoch_E/step_S`` with a DCP ``.metadata`` and no
    ``meta.json`` of ours), else None."""
    path = Path(path)
    step, epoch = _STEP_RE.match(path.name), EPOCH_DIR_RE.match(path.parent.name)
    if step and epoch and (path / DCP_METADATA).is_file() and not (path / META).exists():
        return MiroTrainStepDir(int(epoch.group(1)), int(step.group(1)), path)
    return None


def mirotrain_step_dirs(output_dir: str | Path) -> list[MiroTrainStepDir]:
    """MiroTrain's step checkpoints under ``output_dir`` (or in it, when it is one ``epoch_E`` directory), oldest
    first (by epoch, then step: the order MiroTrain's auto-resume chose the newest by)."""
    output_dir = Path(output_dir)
    dirs = [output_dir, *(epoch_dir for _, epoch_dir in _epoch_dirs(output_dir))]
    found = [mirotrain_step_dir(step.path) for d in dirs for step in list_step_dirs(d)]
    return sorted((d for d in found if d is not None), key=lambda d: (d.epoch, d.step))


def newest_epoch_export(output_dir: str | Path) -> Path | None:
    """The newest ``epoch_E/`` of ``output_dir`` holding HF weights (``config.json`` and a ``*.safetensors``):
    what MiroTrain saved at an epoch end (or this trainer's own epoch export)."""
    for _, epoch_dir in reversed(_epoch_dirs(Path(output_dir))):
        if (epoch_dir / "config.json").is_file() and any(epoch_dir.glob("*.safetensors")):
            return epoch_dir
    return None


def mirotrain_refusal(found: MiroTrainStepDir) -> str:
    """Why ``found`` cannot be resumed or converted, and what to run instead: a new run from the newest
    epoch-end HF export of its output_dir when there is one."""
    output_dir = found.path.parent.parent
    head = (f"{found.path} is a MiroTrain step checkpoint (epoch_E/step_S, DCP), which this trainer cannot resume "
            f"or convert: its model and optimizer state use MiroTrain's parameter names and its data-loader "
            f"position does not carry over. ")
    tail = "To train from the start instead, use a new output_dir."
    export = newest_epoch_export(output_dir)
    if export is None:
        return (head + "MiroTrain saved no epoch-end HF weights there (epoch_E/config.json + *.safetensors) to "
                "start a new run from; finish that epoch with MiroTrain to get them. " + tail)
    return (head + f"Start a new run from the HF weights MiroTrain saved at the end of {export.name}: "
            f"checkpointer.checkpoint_dir={export} output_dir=<a new directory> (epochs count from there). " + tail)


class CheckpointInputError(ValueError):
    """A named checkpoint that cannot be used (missing, not a checkpoint, incomplete, not matching the model):
    a permanent error of the caller's arguments, never worth retrying."""


def resolve_checkpoint(path: str | Path) -> StepDir:
    """The step checkpoint ``path`` names: a step directory (``OUT/checkpoints/step_N``) as is, or, for a training
    output_dir (or its ``checkpoints/``), the newest complete step checkpoint in it -- the same choice
    auto-resume makes, and the final step of a finished run (the trainer checkpoints its last step)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointInputError(f"checkpoint directory {path} does not exist")
    if not path.is_dir():
        raise CheckpointInputError(f"{path} is not a directory")
    original = mirotrain_step_dir(path)
    if original is not None:
        raise CheckpointInputError(mirotrain_refusal(original))
    match = _STEP_RE.match(path.name)
    if match or (path / MARKER).exists() or (path / META).exists():
        reason = check_step_dir(path)
        if reason is not None:
            raise CheckpointInputError(f"{path} is not a usable step checkpoint: {reason}")
        return StepDir(int(match.group(1)) if match else int(read_meta(path)["step"]), path)
    root = path if list_step_dirs(path) else path / "checkpoints"
    found = newest_valid(root)
    originals = mirotrain_step_dirs(path)
    if found is None and originals:
        raise CheckpointInputError(mirotrain_refusal(originals[-1]))
    if not root.is_dir():
        raise CheckpointInputError(f"{path} is neither a step checkpoint (OUT/checkpoints/step_N) nor a training "
                                   f"output_dir (it has no checkpoints/ directory)")
    if found is None:
        raise CheckpointInputError(f"{root} holds no complete step checkpoint")
    return found


def apply_retention(root: Path, keep_last_n: int, newest_complete_step: int) -> list[Path]:
    """Delete complete checkpoints beyond the newest ``keep_last_n`` and incomplete ones older than the newest
    complete one (leftovers of crashed saves). The newest complete one is never deleted. Returns what went."""
    keep_last_n = max(1, keep_last_n)
    entries = list_step_dirs(root)
    complete = [e for e in entries if (e.path / MARKER).is_file() and e.step <= newest_complete_step]
    keep = {e.step for e in complete[-keep_last_n:]} | {newest_complete_step}
    removed = []
    for e in entries:
        if e.step in keep or e.step > newest_complete_step:
            continue
        shutil.rmtree(e.path, ignore_errors=True)
        removed.append(e.path)
    return removed
