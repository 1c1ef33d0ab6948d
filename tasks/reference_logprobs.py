"""Task ``reference_logprobs``: the DPO reference pass (`mirotrain dpo --config X --precompute-only`).

Computes the frozen reference model's log-probs of every chosen/rejected answer into the packed shard
directory's cache and exits, so DPO training then needs only the policy model in memory. Runs under the
same launcher and rendezvous rules as ``train`` (it is a forward pass over the whole set: on GPUs it is
worth all of them). The engine skips work already cached in the shard directory, so a retry is cheap.

    python -m tasks.reference_logprobs --config mirotrain/configs/tiny/dpo.yaml
"""

from __future__ import annotations

from typing import Literal

from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks._retry import retry_unless_permanent
from tasks._runtime import run_logger
from tasks.train import run_engine


@task(name="reference_logprobs", retries=2, retry_delay_seconds=[10, 60], cache_policy=NO_CACHE,
      retry_condition_fn=retry_unless_permanent)
def reference_logprobs(config: str, overrides: list[str] | None = None, nproc_per_node: int | None = None,
                       nnodes: int | None = None, node_rank: int | None = None, master_addr: str | None = None,
                       master_port: int | None = None, rdzv_timeout_s: float | None = None,
                       launcher: Literal["auto", "torchrun", "python"] = "auto", timeout_s: float | None = None,
                       env: dict[str, str] | None = None) -> str:
    """Precompute DPO reference log-probs into the shard cache; returns the config path for chaining.

    Args:
        config: DPO config YAML.
        overrides: key=value config overrides.
        nproc_per_node: Processes per node (as for train).
        nnodes: Number of nodes (as for train).
        node_rank: This node's rank (as for train).
        master_addr: Rendezvous host (as for train).
        master_port: Rendezvous port (as for train).
        rdzv_timeout_s: Seconds the rendezvous waits for every node (as for train).
        launcher: auto, torchrun or python.
        timeout_s: Wall-clock limit for the pass.
        env: Extra environment variables for the engine.
    """
    run_logger().info(f"reference log-probs for {config}")
    run_engine(["dpo", "--config", config, *(overrides or []), "--precompute-only"], nproc_per_node=nproc_per_node,
               nnodes=nnodes, node_rank=node_rank, master_addr=master_addr, master_port=master_port,
               rdzv_timeout_s=rdzv_timeout_s, launcher=launcher, timeout_s=timeout_s, env=env)
    return config


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(reference_logprobs, argv, module="reference_logprobs")


if __name__ == "__main__":
    raise SystemExit(main())
