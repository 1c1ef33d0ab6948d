"""Where an SFT step's GPU time goes: torch.profiler over real trainer steps, top kernels by device time.

Same setup as benchmarks/sft.py (synthetic packed rows, the real SFTTrainer); prints the step time and the
kernels that take the most self device time, grouped coarsely (attention, matmul, loss, optimizer, FSDP
copies, element-wise), so docs/perf-notes.md can say what the remaining time is.
Usage: python benchmarks/profile_sft.py --size 1.7B --seq 16384 [--ac selective --ac-option attention] [--fp8]
       [--trace DIR]   (the trainer flags are benchmarks/sft.py's)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GROUPS = [("communication", ("nccl",)), ("attention", ("attn", "flash", "fmha", "cudnn", "sdpa")), ("matmul", ("gemm", "sm90", "cutlass", "nvjet", "xmma")),
          ("optimizer", ("adam", "multi_tensor", "foreach")), ("fsdp copies", ("chunk_cat", "split_with_sizes", "copy", "all_gather")),
          ("reduce/norm", ("reduce", "norm"))]


def classify(name: str) -> str:
    low = name.lower()
    for group, keys in GROUPS:
        if any(k in low for k in keys):
            return group
    return "element-wise/other"


def worker(ns: argparse.Namespace) -> None:
    import torch
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    from benchmarks.sft import base_config, time_steps
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.sft import SFTTrainer

    work = Path(ns.work)
    trainer = SFTTrainer(base_config(ns, work, json.loads((work / "shards.json").read_text())["sft"]))
    timing = time_steps(trainer, ns.warmup, 2)
    it = iter(trainer.train_loader)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        trainer.train_step(trainer._micro_batches(it))
        torch.cuda.synchronize()
    if torch.distributed.get_rank() != 0:
        trainer.close()
        destroy_distributed()
        return
    # Kernels only: an operator's row (aten::mm, record_param_comms) repeats its kernels' time, and CUPTI's
    # "Command Buffer Full" rows are host waits on a full launch queue, not GPU work (8B run, 2026-11-26).
    events = [e for e in prof.key_averages()
              if e.device_type == DeviceType.CUDA and e.key != "Command Buffer Full"]
    total = sum(e.self_device_time_total for e in events)
    groups: dict[str, float] = defaultdict(float)
    for e in events:
        groups[classify(e.key)] += e.self_device_time_total
    compute = total - groups.get("communication", 0.0)
    # NCCL kernels run on their own streams, overlapped with compute: step time minus compute time is the
    # part of the step the GPU's compute streams sat idle (exposed communication, host gaps).
    print(f"\nstep {timing['step_s']:.3f} s; kernel time {total / 1e6:.3f} s, of it compute {compute / 1e6:.3f} s "
          f"(rank 0; compute-idle {timing['step_s'] - compute / 1e6:.3f} s of the step)")
    for g, t in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"  {g:<20} {t / 1e6:8.3f} s  {100 * t / total:5.1f}%")
    top = sorted(events, key=lambda e: -e.self_device_time_total)[:25]
    print("\ntop kernels by self device time:")
    for e in top:
        print(f"  {e.self_device_time_total / 1e3:9.1f} ms  x{e.count:<5} {e.key[:110]}")
    if ns.trace:
        prof.export_chrome_trace(str(Path(ns.trace) / "sft_step_trace.json"))
    trainer.close()
    destroy_distributed()


def main() -> None:
    from benchmarks.sft import add_trainer_args, write_rows

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_trainer_args(p)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--trace", help="directory for a chrome trace of the profiled step")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    ns = p.parse_args()
    ns.cpu_smoke = False
    if ns.worker:
        worker(ns)
        return
    work = Path(tempfile.mkdtemp(prefix="mirotrain-profile-"))
    shard = write_rows(work / "shards", (ns.warmup + 4) * ns.nproc, ns.seq, ns.docs, 151936)
    (work / "shards.json").write_text(json.dumps({"sft": shard}))
    env = dict(os.environ, PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    args = sys.argv[1:]
    if "--nproc" in args:  # torchrun would take it for an abbreviation of its own --nproc-per-node
        i = args.index("--nproc")
        del args[i:i + 2]
    subprocess.run(["torchrun", "--standalone", f"--nproc_per_node={ns.nproc}", str(Path(__file__).resolve()), "--worker",
                    "--work", str(work), *args], check=True, cwd=ROOT, env=env)


if __name__ == "__main__":
    main()
