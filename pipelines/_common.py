"""Glue shared by the flows: launch parameters to task keyword arguments, the stage outcome record."""

from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel

from pipelines.params import Launch, ModelSource, StageConfig


class StageOutcome(BaseModel):
    """What a training flow hands to the next stage: small paths and numbers, never tensors.

    Every path is absolute (or a URL): artifacts and the parent run read them from another directory.
    """

    recipe: str
    run_name: str  # the run directory's last component (pipelines/runs.py)
    output_dir: str
    hf_dir: Optional[str]
    export_dir: Optional[str] = None
    steps: Optional[int]
    final_loss: Optional[float]
    first_loss: Optional[float] = None
    resumed_from: Optional[str] = None  # the step checkpoint the successful attempt started from
    shards: list[str]
    model_dir: Optional[str] = None
    loss_curve_png: Optional[str] = None
    summary_markdown: str = ""  # the stage's summary artifact, repeated on the parent post-train run


def launch_kwargs(launch: Launch) -> dict[str, Any]:
    """The rendezvous/launcher arguments ``train`` and ``reference_logprobs`` share."""
    return {"nproc_per_node": launch.nproc_per_node, "nnodes": launch.nnodes, "node_rank": launch.node_rank,
            "master_addr": launch.master_addr, "master_port": launch.master_port,
            "rdzv_timeout_s": launch.rdzv_timeout_s, "launcher": launch.launcher, "timeout_s": launch.timeout_s,
            "env": dict(launch.env) or None}


def retry_options(launch: Launch) -> dict[str, Any]:
    return {"retries": launch.retries, "retry_delay_seconds": launch.retry_delay_s}


def world_size(launch: Launch) -> Optional[int]:
    """Training processes the launch parameters fix (None when the platform decides: GPUs, Slurm, Kubernetes)."""
    return launch.nproc_per_node * (launch.nnodes or 1) if launch.nproc_per_node else None


def validate_stage(train: StageConfig, model_dir: Optional[str], *, model_pending: bool,
                   launch: Optional[Launch] = None) -> None:
    """Validate a stage's config with the overrides it will train with, before anything is downloaded or run.

    ``model_pending``: the model directory is produced later in the flow (a download, the previous stage's
    export), so the stage's model keys need not exist yet; ``model_dir`` may then be None (not known yet).
    """
    from pipelines.params import stage_overrides
    from tasks.validate_config import validate_config

    validate_config(train.config, stage_overrides(train, model_dir),
                    pending_keys=list(train.model_keys) if model_pending else [],
                    world_size=world_size(launch) if launch else None)


def prepare_stage(train: StageConfig, model: Optional[ModelSource], model_dir: Optional[str], launch: Launch
                  ) -> tuple[Optional[str], list[str], list[str]]:
    """The steps before training, shared by the sft and dpo flows: validate -> [download] -> pack every
    dataset section. Validation sees the launch's world size, so a parallel layout that does not fit it fails
    here, before any download.

    Returns (model_dir, overrides, shard dirs); the overrides point the trainer at exactly the shards just
    packed (and cached), so it never packs a second time.
    """
    from pipelines.params import stage_overrides
    from tasks.download_weights import download_weights
    from tasks.pack_dataset import dataset_sections, pack_dataset

    validate_stage(train, model.output_dir if model is not None else model_dir, model_pending=model is not None,
                   launch=launch)
    if model is not None:
        model_dir = download_weights(model.source, model.output_dir, revision=model.revision,
                                     hf_token_secret=model.hf_token_secret).path
    overrides = stage_overrides(train, model_dir)
    packed = {section: pack_dataset(train.config, overrides, section).path
              for section in dataset_sections(train.config, overrides)}
    overrides = overrides + [f"{section}.shard_dir={path}" for section, path in packed.items()]
    return model_dir, overrides, list(packed.values())


def finish_stage(recipe: str, title: str, result: Any, train: StageConfig, launch: Launch,
                 model_dir: Optional[str], shards: list[str], export_dir: Optional[str]) -> StageOutcome:
    """The steps after training, shared by the sft and dpo flows: report -> [HF export to
    ``<export_dir>/<run name>``] -> summary and link artifacts."""
    from pipelines.outputs import absolute, publish_links
    from pipelines.runs import under
    from tasks.convert_checkpoint import convert_checkpoint
    from tasks.report_run import publish_summary, report_run

    run = Path(result.output_dir).name
    report = report_run(result.output_dir, key=recipe)
    export = (convert_checkpoint(result.output_dir, under(export_dir, run), config=train.config).path
              if export_dir else None)
    outcome = StageOutcome(recipe=recipe, run_name=run, output_dir=absolute(result.output_dir),
                           hf_dir=absolute(result.hf_dir), export_dir=absolute(export), steps=report.steps,
                           final_loss=report.final_loss, first_loss=report.first_loss,
                           resumed_from=result.resumed_from, shards=[absolute(s) for s in shards],
                           model_dir=absolute(model_dir), loss_curve_png=absolute(report.loss_curve_png))
    outcome.summary_markdown = publish_summary(
        f"{title} {run}", recipe, {"train": train.model_dump(), "model_dir": model_dir, "launch": launch.model_dump()},
        [report], {k: v for k, v in outcome.model_dump().items() if k.endswith("dir") and v})
    publish_links(recipe, {"run-dir": outcome.output_dir, "export": outcome.export_dir})
    return outcome
