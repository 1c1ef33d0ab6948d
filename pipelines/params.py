"""Typed flow parameters. Prefect turns these models into each deployment's parameter schema, which the UI
renders as a form and the server enforces when a run is created (bad values fail at submission time, not
an hour into a GPU job).

A ``--param`` on the command line replaces a whole top-level parameter: pass complete objects, e.g.
``--param sft='{"config": "cfg.yaml", "overrides": ["max_steps=50"]}'``.

Every model forbids unknown keys (``extra="forbid"``, which the schema carries as
``additionalProperties: false``): a typo such as ``launch={"nproc_per_nod": 1}`` is refused when the run
is created, instead of being dropped while the run silently uses the default.
"""

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field

# Where a training config takes its initial weights and tokenizer. torchtune-style configs (the seed's)
# name the HF directory in both places; the flows set every key listed here to the model they chain in.
DEFAULT_MODEL_KEYS = ["checkpointer.checkpoint_dir", "tokenizer.path"]


class ModelSource(BaseModel):
    """Where the starting weights come from and where the download goes."""

    model_config = ConfigDict(extra="forbid")

    source: str = Field(description="Hub repo id (Qwen/Qwen3-8B), fsspec URL (s3://, file://) or local path")
    output_dir: str = Field(description="Local directory for the downloaded checkpoint (re-runs resume into it)")
    revision: Optional[str] = Field(default=None, description="Hub branch, tag or commit")
    hf_token_secret: Optional[str] = Field(default=None, description="Prefect Secret block with the Hub token "
                                           "(default: the worker's HF_TOKEN)")


class StageConfig(BaseModel):
    """One training stage: the engine config plus overrides."""

    model_config = ConfigDict(extra="forbid")

    config: str = Field(description="Engine config YAML (e.g. mirotrain/configs/qwen3/8B_full_sft.yaml)")
    overrides: list[str] = Field(default_factory=list, description="key=value config overrides")
    output_dir: Optional[str] = Field(default=None, description="Base directory of this stage's runs (default: the "
                                      "config's output_dir); each flow run trains in <output_dir>/<run name>")
    model_keys: list[str] = Field(default_factory=lambda: list(DEFAULT_MODEL_KEYS),
                                  description="Config keys that receive the chained-in model directory")


class Launch(BaseModel):
    """How torchrun is started and how failures are retried. Unset rendezvous fields come from the
    environment (torchrun/Kubeflow, WORKER_*, Slurm variables; tasks/_rendezvous.py), else one local node."""

    model_config = ConfigDict(extra="forbid")

    nproc_per_node: Optional[int] = Field(default=None, ge=1, description="Processes (GPUs) per node")
    nnodes: Optional[int] = Field(default=None, ge=1, description="Number of nodes")
    node_rank: Optional[int] = Field(default=None, ge=0, description="This node's rank")
    master_addr: Optional[str] = Field(default=None, description="Rendezvous host")
    master_port: Optional[int] = Field(default=None, ge=1, le=65535, description="Rendezvous port")
    rdzv_timeout_s: Optional[float] = Field(default=None, gt=0, description="Seconds the rendezvous waits for every "
                                            "node (default MIROTRAIN_RDZV_TIMEOUT_S, else 300)")
    launcher: Literal["auto", "torchrun", "python"] = Field(default="auto", description="auto = torchrun if >1 process")
    timeout_s: Optional[float] = Field(default=None, gt=0, description="Wall-clock limit per training attempt")
    retries: int = Field(default=2, ge=0, le=20, description="Task retries; each resumes from the newest checkpoint")
    retry_delay_s: float = Field(default=10.0, ge=0, description="Seconds between retries")
    env: dict[str, str] = Field(default_factory=dict, description="Extra environment for the engine")


def stage_overrides(stage: StageConfig, model_dir: Optional[str]) -> list[str]:
    """The stage's overrides with every model key pointed at ``model_dir`` (user overrides win)."""
    chained = [f"{k}={model_dir}" for k in stage.model_keys] if model_dir else []
    out = chained + list(stage.overrides)
    if stage.output_dir:
        out.append(f"output_dir={stage.output_dir}")
    return out
