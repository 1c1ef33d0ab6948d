"""Glue shared by the flows: launch parameters to task keyword arguments, the stage outcome record."""

from typing import Any, Optional

from pydantic import BaseModel

from pipelines.params import Launch


class StageOutcome(BaseModel):
    """What a training flow hands to the next stage: small paths and numbers, never tensors."""

    recipe: str
    output_dir: str
    hf_dir: Optional[str]
    export_dir: Optional[str] = None
    steps: Optional[int]
    final_loss: Optional[float]
    first_loss: Optional[float] = None
    shards: list[str]
    model_dir: Optional[str] = None
    loss_curve_png: Optional[str] = None


def launch_kwargs(launch: Launch) -> dict[str, Any]:
    """The rendezvous/launcher arguments ``train`` and ``reference_logprobs`` share."""
    return {"nproc_per_node": launch.nproc_per_node, "nnodes": launch.nnodes, "node_rank": launch.node_rank,
            "master_addr": launch.master_addr, "master_port": launch.master_port, "launcher": launch.launcher,
            "timeout_s": launch.timeout_s, "env": dict(launch.env) or None}


def retry_options(launch: Launch) -> dict[str, Any]:
    return {"retries": launch.retries, "retry_delay_seconds": launch.retry_delay_s}
