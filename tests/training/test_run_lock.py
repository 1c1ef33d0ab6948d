"""The run lock: one training per output_dir, released by the kernel when its holder dies.

A first `mirotrain sft` (one CPU process) is frozen with SIGSTOP once it has a step checkpoint, so it holds
the lock without finishing. A second training into the same output_dir, one process or two under torchrun,
waits ``MIROTRAIN_RUN_LOCK_WAIT_S`` (1 s here) and is then refused with exit code 2 and one line naming the
directory and the owner, having changed nothing there. A third one, with a long wait, starts while the holder
still holds the lock, says that it waits and for whom; the holder is SIGKILLed during that wait, and the third
takes the lock and resumes from the holder's checkpoint (a retry that starts while the previous attempt's
ranks are still exiting).
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))
from sft_helpers import REPO, run_sft, tiny_config, write_config, write_shards  # noqa: E402


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """(size, mtime_ns) of every path under root: any write shows."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(root.rglob("*"))}


def _freeze(pid: int, timeout: float = 30) -> None:
    """SIGSTOP ``pid`` and wait until every thread of it has stopped (a write in flight finishes first)."""
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout
    while True:
        states = [(t / "stat").read_text().rsplit(")", 1)[1].split()[0] for t in Path(f"/proc/{pid}/task").iterdir()]
        if all(state in "tT" for state in states):
            return
        assert time.monotonic() < deadline, f"pid {pid} did not stop: thread states {states}"
        time.sleep(0.01)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the holder ended (exit {proc.returncode}) before writing {path}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.02)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_holder_killed_during_the_wait_frees_the_lock(tmp_path):
    shards = write_shards(tmp_path / "shards", n_rows=600, seq_len=64, seed=1)
    out = tmp_path / "run"
    config = write_config(tiny_config(out, shards, auto_resume=True, checkpoint_steps_for_auto_resume=5),
                          tmp_path / "run.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(tmp_path / "holder.log", "w") as holder_log:
        holder = subprocess.Popen([sys.executable, "-m", "mirotrain", "sft", "--config", str(config)], env=env,
                                  cwd=str(REPO), stdout=holder_log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        _wait_for(out / "checkpoints" / "step_5" / "COMPLETE", holder)
        _freeze(holder.pid)  # it holds the lock and writes nothing more
        owner = json.loads((out / "run.lock").read_text())
        assert owner["pid"] == holder.pid and owner["world_size"] == 1
        before = _tree(out)

        for nproc in (1, 2):
            second = run_sft(config, nproc=nproc, timeout=600, env={"MIROTRAIN_RUN_LOCK_WAIT_S": "1"})
            assert second.returncode == (2 if nproc == 1 else 1), second.stderr[-3000:]  # torchrun reports 1
            refusals = [line for line in second.stderr.splitlines() if "is in use by another training" in line]
            assert refusals == [f"mirotrain sft: output_dir {out} is in use by another training (owner: host "
                                f"{owner['host']}, pid {holder.pid}, started {owner['started']}, world size 1); "
                                f"refusing to write into it (lock file {out / 'run.lock'})"], second.stderr[-3000:]
            assert "Step 1 |" not in second.stdout + second.stderr
            after = _tree(out)
            changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
            assert not changed, f"the refused run (nproc={nproc}) changed {changed} in the output_dir"

        with open(tmp_path / "third.log", "w") as third_log:
            third = subprocess.Popen([sys.executable, "-m", "mirotrain", "sft", "--config", str(config)],
                                     env={**env, "MIROTRAIN_RUN_LOCK_WAIT_S": "300"}, cwd=str(REPO),
                                     stdout=third_log, stderr=subprocess.STDOUT, start_new_session=True)
        waiting = f"output_dir {out} is locked by another training (owner: host {owner['host']}, pid {holder.pid}"
        deadline = time.monotonic() + 240
        while waiting not in (tmp_path / "third.log").read_text():
            assert third.poll() is None, (tmp_path / "third.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the third run never said that it waits for the lock"
            time.sleep(0.1)
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()

    assert third.wait(timeout=600) == 0, (tmp_path / "third.log").read_text()[-3000:]
    log = (tmp_path / "third.log").read_text()
    assert log.count(waiting) == 1 and "Resumed from" in log and "is in use" not in log
    assert json.loads((out / "run.lock").read_text())["pid"] == third.pid
