"""Run a test function on several CPU processes joined in one gloo process group, with an orderly teardown.

Every multi-process test of the engine's collectives (FSDP, Ulysses, expert parallelism, clipping, sharded
loading) goes through :func:`run_on_gloo_ranks`, so the teardown below is written once:

1. a barrier after the function: no rank tears its groups down while a peer still has a collective in flight;
2. ``destroy_process_group`` once every rank is past the barrier;
3. ``gc.collect`` and then ``os._exit(0)``: the ranks' meshes, DTensors and FSDP modules hold the gloo groups
   and their pending work alive past ``destroy_process_group``; freeing them at interpreter finalization
   re-enters Python after it has shut down and aborts the process ("terminate called without an active
   exception", SIGABRT) although every check passed. Collected while the interpreter is whole, and with the
   finalization skipped, a rank whose checks passed exits 0.

A rank whose function raises leaves its group as it is and exits through torch.multiprocessing, which reports
that rank's traceback and stops the others (they wait in their next collective). Destroying the group first
would make a waiting peer fail too, with "Connection closed by peer", and that secondary error could be the
one reported. The rendezvous is a file under the caller's temporary directory: no port to race for with
parallel tests.
"""

from __future__ import annotations

import gc
import os
import sys
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run_on_gloo_ranks(fn: Callable[..., None], world: int, tmp_dir: Path, *args: object) -> None:
    """Call ``fn(rank, world, *args)`` on ``world`` spawned processes in one gloo group; raise if any rank fails.

    ``fn`` must be a module-level function (it is pickled by name into the spawned processes).
    """
    store = Path(tmp_dir) / "gloo-rendezvous"
    mp.start_processes(_rank_main, args=(fn, world, str(store), args), nprocs=world, start_method="spawn",
                       join=True)


def _rank_main(rank: int, fn: Callable[..., None], world: int, store: str, args: tuple) -> None:
    torch.set_num_threads(1)  # the ranks share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    fn(rank, world, *args)
    dist.barrier()
    dist.destroy_process_group()
    gc.collect()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
