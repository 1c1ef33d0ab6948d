"""Flow ``post-train``: download -> pack SFT data -> SFT -> pack preference data -> DPO from the SFT
weights -> HF export, with a run summary, per-stage summaries, links, metrics tables, loss curves and live
progress as artifacts.

Run identity (``pipelines/runs.py``, docs/pipeline.md): each flow run is one training run named
``<flow-run-name>-<id8>``; SFT trains into ``<sft output_dir>/<run>``, DPO into ``<dpo output_dir>/<run>``,
the export goes to ``<export_dir>/<run>``. A second flow run of the same deployment starts a new run;
``resume_from`` continues an earlier one.

Failure handling is layered (docs/pipeline.md):

- a failed training attempt is retried by its task and resumes from the newest complete step checkpoint of
  this run's directory;
- a failed flow is retried once (``retries=1``): download and pack come back from the cache, completed
  subflows from their persisted results, and training resumes again (same flow run, same run directory);
- a *crashed* flow (SIGKILL, OOM, lost node) is not retried by Prefect; ``prefect flow-run retry <run>`` or
  the crash automation re-runs the same flow run, which resumes the same run directories.
"""

import re
from typing import Optional

from prefect import flow
from pydantic import BaseModel

from pipelines._common import StageOutcome, validate_stage
from pipelines._recovery import close_crashed_attempts
from pipelines.dpo import dpo
from pipelines.outputs import inline_png, publish_links, publish_markdown
from pipelines.params import Launch, ModelSource, StageConfig
from pipelines.runs import run_name, stage_base, under
from pipelines.sft import sft
from tasks.convert_checkpoint import convert_checkpoint
from tasks.download_weights import download_weights
from tasks._retry import no_flow_retry_on_permanent
from tasks.report_run import RunReport, publish_summary


class PostTrainOutcome(BaseModel):
    run_name: str
    model_dir: str
    sft: StageOutcome
    dpo: StageOutcome
    export_dir: str


def _as_report(stage: StageOutcome) -> RunReport:
    return RunReport(key=stage.recipe, output_dir=stage.output_dir, steps=stage.steps, final_loss=stage.final_loss,
                     first_loss=stage.first_loss, loss_curve_png=stage.loss_curve_png, metrics_rows=0, summary={})


def stages_markdown(run: str, stages: list[StageOutcome]) -> str:
    """Each stage's own summary (what its subflow page shows) plus its loss curve, for the parent run."""
    parts = [f"# Stages of run {run}"]
    for s in stages:
        parts += ["", "---", "", re.sub(r"(?m)^(#+) ", r"#\1 ", s.summary_markdown), "",  # one level down
                  inline_png(s.loss_curve_png, f"{s.recipe} loss curve")]
    return "\n".join(parts)


def _stage_line(s: StageOutcome) -> str:
    resumed = f", resumed from {s.resumed_from}" if s.resumed_from else ""
    return f"{s.recipe}: {s.steps} steps, loss {s.first_loss} -> {s.final_loss}{resumed}; run dir {s.output_dir}"


@flow(name="post-train", retries=1, retry_delay_seconds=30, persist_result=True, log_prints=True)
@no_flow_retry_on_permanent
def post_train(model: ModelSource, sft_stage: StageConfig, dpo_stage: StageConfig, export_dir: str,
               launch: Launch = Launch(), precompute_reference: bool = True,
               resume_from: Optional[str] = None) -> PostTrainOutcome:
    """SFT then DPO from the SFT weights, exported to ``<export_dir>/<run name>`` as HF safetensors.

    Steps: download_weights -> sft (pack, train, report) -> dpo (pack, reference log-probs, train, report)
    -> convert_checkpoint of DPO's final step -> run summary, per-stage summaries and link artifacts.

    Args:
        model: The starting weights: where to download them from and where to keep them.
        sft_stage: The SFT stage: engine config, overrides, and the directory its runs go under.
        dpo_stage: The DPO stage (starts from the SFT run's weights): config, overrides, run base directory.
        export_dir: Base directory of the HF exports; this run's export is ``<export_dir>/<run name>``.
        launch: How the trainers are launched and retried.
        precompute_reference: Compute DPO's reference log-probs in a pass of their own before training.
        resume_from: Continue this earlier run (its run name, its flow-run name, or its SFT or DPO run
            directory) instead of starting a new one. Empty: a new run named after this flow run.
    """
    close_crashed_attempts()  # a rerun after a crash first closes what the crashed attempt left open
    validate_stage(sft_stage, model.output_dir, model_pending=True, launch=launch)  # fail fast: before any download
    validate_stage(dpo_stage, None, model_pending=True, launch=launch)  # its model is SFT's export
    run = run_name(stage_base(sft_stage), resume_from)
    print(f"run {run}: " + ("continuing an earlier run" if resume_from else "a new run"))
    model_dir = download_weights(model.source, model.output_dir, revision=model.revision,
                                 hf_token_secret=model.hf_token_secret).path
    resume = run if resume_from else None  # the stages resolve the same name themselves from this flow run
    sft_out = sft(train=sft_stage, model_dir=model_dir, launch=launch, resume_from=resume)
    print(_stage_line(sft_out))
    if not sft_out.hf_dir:
        raise RuntimeError(f"SFT finished without an HF export under {sft_out.output_dir}/hf; DPO has no start weights")
    dpo_out = dpo(train=dpo_stage, model_dir=sft_out.hf_dir, launch=launch, precompute_reference=precompute_reference,
                  resume_from=resume)
    print(_stage_line(dpo_out))
    export = convert_checkpoint(dpo_out.output_dir, under(export_dir, run), config=dpo_stage.config)
    outcome = PostTrainOutcome(run_name=run, model_dir=sft_out.model_dir, sft=sft_out, dpo=dpo_out,
                               export_dir=export.path)
    publish_summary(f"Post-training run {run} (SFT -> DPO)", "post-train",
                    {"model": model.model_dump(), "sft_stage": sft_stage.model_dump(),
                     "dpo_stage": dpo_stage.model_dump(), "launch": launch.model_dump(),
                     "precompute_reference": precompute_reference, "resume_from": resume_from},
                    [_as_report(sft_out), _as_report(dpo_out)],
                    {"base model": outcome.model_dir, "sft run": sft_out.output_dir, "sft hf": str(sft_out.hf_dir),
                     "dpo run": dpo_out.output_dir, "hf export": export.path})
    publish_markdown("post-train-stages", stages_markdown(run, [sft_out, dpo_out]), f"SFT and DPO stages of run {run}")
    publish_links("post-train", {"export": export.path, "sft-run-dir": sft_out.output_dir,
                                 "dpo-run-dir": dpo_out.output_dir})
    print(f"run {run}: HF export {export.path}")
    return outcome
