"""`mirotrain validate`'s memory estimate against measured peaks, one named case at a time (issue #18).

Each case is a shipped config, some ``key=value`` overrides and a world size. For each the script

1. writes synthetic rows of the case's row length (random tokens, random init: nothing is downloaded) with the
   data helpers of ``benchmarks/sft.py`` (SFT: one document per row, its first quarter untrained) and
   ``benchmarks/dpo.py`` (DPO: packed preference pairs);
2. computes validate's estimate in this process with ``mirotrain.commands.estimate.estimate_memory``, from the
   config the run reads (the same overrides, shard directory included);
3. trains it for a few optimizer steps under ``torch.distributed.run`` through the real trainer
   (``SFTTrainer`` / ``DPOTrainer`` built from the config, steps timed by ``benchmarks/sft.py``'s ``time_steps``),
   with the CUDA allocator set as `mirotrain sft`/`dpo` set it (``commands/cuda_alloc.py``: expandable
   segments unless PYTORCH_CUDA_ALLOC_CONF is set), and reads the allocator peaks on every rank
   (``mirotrain.training.metrics.peak_memory``, what ``metrics.jsonl`` logs as ``peak_mem_alloc_gib`` /
   ``peak_mem_reserved_gib``; ``metrics.jsonl`` has rank 0's only and resets them every window, so the worker
   reads them itself);
4. prints one table row (flushed as soon as the case ends, so a run cut off at its time limit still shows the
   cases it finished) and rewrites ``--out``/calibration.json with every row so far (each case's training log
   is ``--out``/<case>.log; its shards and run directory, under ``--work``, are deleted after it).

The peak covers every training step (the first one, with compilation, included); each rank's ``setup`` in the
JSON is the peak of building the trainer (model init, DPO's reference pass) and ``host_rss_gib`` its host peak.
The error is (estimate − measured peak allocated) / measured, against the largest rank. tokens/s/GPU is the
tokens a rank computes per step (SP: its share of the row) over the median step time of the slowest rank, the
first step left out. No HF export and no step checkpoint is written (``auto_resume=False``; the loop is driven
step by step), so a case costs start-up plus its steps. A case whose config is refused (the bf16 mode's key
before the engine knows it) is a row that says why, not an error.

Usage (GPU machine with 2 GPUs, from the repository root; carry .whl for the bundled tokenizer and Liger):
  python benchmarks/memory_calibration.py --out $OUT/calib                     # the six calibration cases
  python benchmarks/memory_calibration.py --out $OUT/calib --cases mirothinker_8b_sft_40k
  python benchmarks/memory_calibration.py --out /tmp/c --estimate-only         # estimates only (CPU is fine)
  python benchmarks/memory_calibration.py --out /tmp/c --cpu-smoke             # tiny model, gloo: the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

QWEN3 = "mirotrain/configs/qwen3"
MIROTHINKER = "tests/fixtures/mirotrain_v0_1/recipes/configs/mirothinker_v0_1"
ROW_16K = ("tokenizer.max_seq_len=16384", "dataset.packed_seq_len=16384")
ROW_40K = ("tokenizer.max_seq_len=40960", "dataset.packed_seq_len=40960")


@dataclass(frozen=True)
class Case:
    """One calibration run: ``config`` (relative to the repository root) with ``overrides`` on ``world_size``
    ranks, trained ``steps`` optimizer steps on synthetic rows of ``row`` tokens, stopped after ``timeout_s``."""

    name: str
    config: str
    overrides: tuple[str, ...]
    row: int
    steps: int
    world_size: int = 2
    timeout_s: int = 180
    note: str = ""


def calibration_cases(bf16_override: str) -> dict[str, Case]:
    """The cases of #18's calibration table (2 GPUs), and MiroThinker 8B SFT at 40K with its own settings."""
    cases = [
        Case("sft_8b_16k", f"{QWEN3}/8B_full_sft.yaml", ROW_16K, 16384, 4),
        Case("dpo_8b_16k", f"{QWEN3}/8B_full_dpo.yaml", ROW_16K, 16384, 4,
             note="DPO rows of 16K tokens (the config packs 32K)"),
        Case("sft_8b_40k", f"{QWEN3}/8B_full_sft.yaml", ROW_40K, 40960, 3),
        # mlp_tiles=1: measured untiled; its estimate (121 GiB) is close to where ``auto`` tiles on a 141 GB card
        Case("sft_14b_40k_sp2", f"{QWEN3}/14B_full_sft.yaml",
             (*ROW_40K, "ulysses_sequence_parallel_size=2", "mlp_tiles=1"), 40960, 3, timeout_s=240),
        Case("sft_8b_16k_bf16", f"{QWEN3}/8B_full_sft.yaml", (*ROW_16K, *shlex.split(bf16_override)), 16384, 4,
             note=f"bf16 memory mode: {bf16_override}"),
        Case("sft_8b_16k_offload", f"{QWEN3}/8B_full_sft.yaml", (*ROW_16K, "fsdp_cpu_offload=True"), 16384, 2,
             timeout_s=240, note="state on the host: see host_rss_gib per rank in the JSON"),
        Case("sft_8b_40k_bf16_act_offload", f"{QWEN3}/8B_full_sft.yaml",
             (*ROW_40K, *shlex.split(bf16_override), "enable_activation_offloading=True"), 40960, 3,
             note="bf16 mode, checkpointed activations in pinned host memory"),
        Case("sft_8b_40k_tiles4", f"{QWEN3}/8B_full_sft.yaml", (*ROW_40K, "mlp_tiles=4"), 40960, 3,
             note="the MLP in 4 tiles, recomputed in backward (compare sft_8b_40k)"),
        Case("sft_14b_40k_sp2_tiles8", f"{QWEN3}/14B_full_sft.yaml",
             (*ROW_40K, "ulysses_sequence_parallel_size=2", "mlp_tiles=8"), 40960, 3, timeout_s=240,
             note="the MLP in 8 tiles (compare sft_14b_40k_sp2)"),
        # its own settings (Liger loss, no compile, batch 1, GA 1, 40K rows); paths, world size and data aside:
        # 20 optimizer steps = 20 micro-batches on each GPU
        Case("mirothinker_8b_sft_40k", f"{MIROTHINKER}/MiroThinker-v0.1-8B-SFT-40k-bs128-packed.yaml", (), 40960, 20,
             timeout_s=520, note="MiroThinker v0.1 8B SFT recipe, own settings"),
    ]
    return {c.name: c for c in cases}


DEFAULT_CASES = ("sft_8b_16k", "dpo_8b_16k", "sft_8b_40k", "sft_14b_40k_sp2", "sft_8b_16k_bf16", "sft_8b_16k_offload")

CPU_SMOKE_CASES = {
    "tiny_sft": Case("tiny_sft", "mirotrain/configs/tiny/sft.yaml",
                     ("tokenizer.max_seq_len=256", "dataset.packed_seq_len=256"), 256, 2, timeout_s=300),
    "tiny_dpo": Case("tiny_dpo", "mirotrain/configs/tiny/dpo.yaml", ("dataset.packed_seq_len=512",), 512, 2,
                     timeout_s=300),
}


# ------------------------------------------------------------------------------------------- the config
def run_overrides(case: Case, raw: dict, run_dir: Path, shard_dir: str | None) -> list[str]:
    """The case's overrides plus what every calibration run changes: its own output directory, random init,
    the bundled tokenizer, the synthetic shards, ``steps`` steps of one epoch, no step checkpoints."""
    out = [*case.overrides, f"output_dir={run_dir}", "checkpointer.checkpoint_dir=null", "tokenizer.path=null",
           "epochs=1", f"max_steps_per_epoch={case.steps}", "auto_resume=False"]
    if "ref_checkpointer" in raw:
        out.append("ref_checkpointer.checkpoint_dir=null")
    if shard_dir is not None:
        out.append(f"dataset.shard_dir={shard_dir}")
    return out


def load_case(case: Case, run_dir: Path, shard_dir: str | None):
    """(overrides, typed config) of the run; raises the config's own error (e.g. an unknown key)."""
    from mirotrain.config import load_config
    from mirotrain.config.tree import read_config

    overrides = run_overrides(case, load_config(str(ROOT / case.config), list(case.overrides)), run_dir, shard_dir)
    return overrides, read_config(str(ROOT / case.config), overrides, world_size=case.world_size, check_files=False)


def estimate(cfg, world_size: int):
    """validate's estimate (``estimate_memory``) of ``cfg``, with the model built on the meta device as validate
    builds it, for this machine's GPU (``mlp_tiles: auto`` decides as the trainer will; none: untiled); returns
    ``(MemoryEstimate, model args)``."""
    import torch

    from mirotrain.commands.estimate import estimate_memory
    from mirotrain.config import instantiate

    with torch.device("meta"):
        model = instantiate(cfg.model.component)
    gpu_bytes = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    return estimate_memory(model, cfg, world_size, gpu_bytes), model.args


def write_case_data(case: Case, cfg, vocab: int, work: Path) -> str:
    """Synthetic rows of ``case.row`` tokens, enough for every data-parallel rank's micro-batches of every step."""
    from benchmarks.dpo import write_shards
    from benchmarks.sft import write_rows
    from mirotrain.commands.estimate import is_preference

    dp = case.world_size // cfg.parallel.ulysses_sequence_parallel_size
    rows = dp * cfg.optim.gradient_accumulation_steps * cfg.data.batch_size * case.steps
    if is_preference(cfg):
        return write_shards(work, rows, vocab, case.row, pad_id=0)[0]
    return write_rows(work / "sft-shards", rows, case.row, docs=1, vocab=vocab)


# ------------------------------------------------------------------------------------------- the worker
def run_worker(spec_path: Path) -> None:
    """One case on this torchrun rank: build the trainer from the config, time ``steps`` steps (the first as
    warm-up: compilation), gather every rank's peaks; rank 0 writes the result beside the spec."""
    import torch
    import torch.distributed as dist

    from benchmarks.sft import time_steps
    from mirotrain.commands.estimate import is_preference
    from mirotrain.config.tree import read_config
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.dpo import DPOTrainer
    from mirotrain.training.metrics import peak_memory
    from mirotrain.training.sft import SFTTrainer

    spec = json.loads(spec_path.read_text())
    cfg = read_config(spec["config"], spec["overrides"], world_size=int(os.environ["WORLD_SIZE"]))
    t0 = time.perf_counter()
    trainer = (DPOTrainer if is_preference(cfg) else SFTTrainer)(cfg)
    setup_s = time.perf_counter() - t0
    setup_peak = peak_memory(trainer.device)
    timing = time_steps(trainer, warmup=1, steps=spec["steps"] - 1, peak_over_warmup=True)
    mine = {"device": peak_memory(trainer.device), "setup": setup_peak,
            "host_rss_gib": peak_memory(torch.device("cpu"))["peak_rss_gib"]}
    ranks: list = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    trainer.close()
    if dist.get_rank() == 0:
        timing.pop("peak_mem_gib", None)  # rank 0's allocated peak; every rank's is in ranks
        result = {"setup_s": setup_s, **timing, "ranks": ranks}
        (spec_path.parent / "result.json").write_text(json.dumps(result, indent=2))
    destroy_distributed()


# ----------------------------------------------------------------------------------------- the launcher
def launch(case: Case, config: str, overrides: list[str], case_dir: Path, log_path: Path) -> tuple[dict | None, str]:
    """Run the case under torch.distributed.run (its output in ``log_path``); (result, note)."""
    spec = case_dir / "spec.json"
    spec.write_text(json.dumps({"config": config, "overrides": overrides, "steps": case.steps}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={case.world_size}",
           str(Path(__file__).resolve()), "--worker", str(spec)]
    from mirotrain.commands.cuda_alloc import alloc_conf_default

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    alloc_conf_default(env)  # the allocator setting `mirotrain sft`/`dpo` give their ranks
    with log_path.open("w") as log:
        # its own process group, so the launcher and its ranks end together (a timeout here, or this script
        # stopped by SIGTERM: main turns it into SystemExit, which passes through the finally)
        proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=case.timeout_s)
        except subprocess.TimeoutExpired:
            return None, f"stopped after {case.timeout_s} s (timeout_s); log {log_path}"
        finally:
            if proc.poll() is None:
                stop_group(proc)
    result = case_dir / "result.json"
    if rc == 0 and result.is_file():
        return json.loads(result.read_text()), ""
    text = log_path.read_text(errors="replace")
    why = "out of memory" if "OutOfMemoryError" in text or "CUDA out of memory" in text else f"exit {rc}"
    # a rank's exception line (torchrun's own ChildFailedError summary says only which rank failed)
    errors = [line.strip() for line in text.splitlines()
              if re.search(r"\w(Error|Exception): ", line) and "ChildFailedError" not in line]
    return None, f"{why}: {errors[0][:160] if errors else ''} (log {log_path})"


def stop_group(proc: subprocess.Popen) -> None:
    """End the torchrun launcher this script started and its ranks (its own process group)."""
    for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue
        except ProcessLookupError:
            return


def measure(case: Case, out: Path, work: Path, estimate_only: bool) -> dict:
    """One table row of ``case`` (see the module docstring); a config the engine refuses is a skipped row. The
    case's shards and run directory live under ``work`` and are deleted after it; its log goes to ``out``."""
    from mirotrain.commands.estimate import GIB
    from mirotrain.config import ConfigError

    t0 = time.perf_counter()
    row: dict = {"case": case.name, "config": case.config, "world_size": case.world_size, "steps": case.steps,
                 "note": case.note}
    case_dir = work / case.name
    try:
        overrides, cfg = load_case(case, case_dir / "run", None)
        mem, args = estimate(cfg, case.world_size)
        if not estimate_only:  # the estimate of the config the run reads: the same, with its shard directory
            case_dir.mkdir(parents=True, exist_ok=True)
            overrides, cfg = load_case(case, case_dir / "run", write_case_data(case, cfg, args.vocab_size, case_dir))
            mem, _ = estimate(cfg, case.world_size)
    except ConfigError as exc:
        row["note"] = f"skipped: {str(exc).strip().splitlines()[0]}"
        return row
    row.update(overrides=overrides, estimate=mem.gib(), estimate_gib=mem.total / GIB)
    if not estimate_only:
        result, note = launch(case, str(ROOT / case.config), overrides, case_dir, out / f"{case.name}.log")
        shutil.rmtree(case_dir, ignore_errors=True)
        if result is None:
            row["note"] = note
        else:
            # on CPU (--cpu-smoke) the process's peak RSS stands in for the allocator's peak; nothing is reserved
            device = [r["device"] for r in result["ranks"]]
            alloc = max(d.get("peak_mem_alloc_gib", d.get("peak_rss_gib", 0.0)) for d in device)
            row.update(result=result, measured_alloc_gib=alloc, error_pct=100 * (row["estimate_gib"] - alloc) / alloc,
                       tokens_per_s_per_gpu=result["tokens_per_s_per_gpu"])
            if "peak_mem_reserved_gib" in device[0]:
                row["measured_reserved_gib"] = max(d["peak_mem_reserved_gib"] for d in device)
    row["wall_s"] = time.perf_counter() - t0
    return row


HEADER = (f"{'case':<24} {'est GiB':>8} {'alloc GiB':>10} {'resv GiB':>9} {'err %':>7} {'tok/s/GPU':>10} "
          f"{'wall s':>7}  note")


def format_row(row: dict) -> str:
    def num(key: str, fmt: str) -> str:
        value = row.get(key)
        return format(value, fmt) if isinstance(value, (int, float)) else "-"

    return (f"{row['case']:<24} {num('estimate_gib', '.1f'):>8} {num('measured_alloc_gib', '.1f'):>10} "
            f"{num('measured_reserved_gib', '.1f'):>9} {num('error_pct', '+.1f'):>7} "
            f"{num('tokens_per_s_per_gpu', '.0f'):>10} {num('wall_s', '.0f'):>7}  {row.get('note', '')}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", help="directory for calibration.json and each case's log (required unless --worker)")
    p.add_argument("--work", help="directory for the cases' shards and run directories (default: a new temporary one)")
    p.add_argument("--cases", help=f"comma-separated case names (default: {','.join(DEFAULT_CASES)}; also "
                                   "mirothinker_8b_sft_40k)")
    p.add_argument("--steps", type=int, help="optimizer steps of every case (the first is warm-up; default: per case)")
    p.add_argument("--bf16-override", default="master_weights=bf16",
                   help="override(s) selecting the bf16 memory mode (shell words; the case is skipped with a note "
                        "when the config refuses them)")
    p.add_argument("--estimate-only", action="store_true", help="print the estimates, train nothing")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny SFT and DPO on CPU (gloo), 2 steps: the plumbing")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    ns = p.parse_args()
    if ns.worker:
        run_worker(Path(ns.worker))
        return
    if not ns.out:
        p.error("--out is required")
    if ns.steps is not None and ns.steps < 2:
        p.error("--steps must be >= 2 (the first step is the warm-up)")
    known = CPU_SMOKE_CASES if ns.cpu_smoke else calibration_cases(ns.bf16_override)
    names = ns.cases.split(",") if ns.cases else list(known if ns.cpu_smoke else DEFAULT_CASES)
    unknown = [n for n in names if n not in known]
    if unknown:
        p.error(f"unknown case(s) {', '.join(unknown)}; known: {', '.join(known)}")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # `timeout`: stop the running case
    out = Path(ns.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    work = Path(ns.work or tempfile.mkdtemp(prefix="mirotrain-calibration-")).resolve()
    print(HEADER, flush=True)
    rows = []
    for name in names:
        case = known[name] if ns.steps is None else replace(known[name], steps=ns.steps)
        rows.append(measure(case, out, work, ns.estimate_only))
        print(format_row(rows[-1]), flush=True)
        (out / "calibration.json").write_text(json.dumps(rows, indent=2, default=str))
    print(f"rows: {out / 'calibration.json'}", flush=True)
    if not ns.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
