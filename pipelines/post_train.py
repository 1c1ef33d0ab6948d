"""Flow ``post-train``: download -> pack SFT data -> SFT -> pack preference data -> DPO from the SFT
weights -> HF export, with a run summary, metrics tables, loss curves and live progress as artifacts.

Failure handling is layered (docs/pipeline.md):

- a failed training attempt is retried by its task and resumes from the newest complete step checkpoint;
- a failed flow is retried once (``retries=1``): download and pack come back from the cache, completed
  subflows from their persisted results, and training resumes again;
- a *crashed* flow (SIGKILL, OOM, lost node) is not retried by Prefect; ``prefect flow-run retry <run>``
  re-runs it with the same parameters and the same effect.
"""

from typing import Optional

from prefect import flow
from pydantic import BaseModel

from pipelines._common import StageOutcome, validate_stage
from pipelines.dpo import dpo
from pipelines.params import Launch, ModelSource, StageConfig
from pipelines.sft import sft
from tasks.convert_checkpoint import convert_checkpoint
from tasks.download_weights import download_weights
from tasks._retry import no_flow_retry_on_permanent
from tasks.report_run import RunReport, publish_summary


class PostTrainOutcome(BaseModel):
    model_dir: str
    sft: StageOutcome
    dpo: StageOutcome
    export_dir: str


def _as_report(stage: StageOutcome) -> RunReport:
    return RunReport(key=stage.recipe, output_dir=stage.output_dir, steps=stage.steps, final_loss=stage.final_loss,
                     first_loss=stage.first_loss, loss_curve_png=stage.loss_curve_png, metrics_rows=0, summary={})


@flow(name="post-train", retries=1, retry_delay_seconds=30, persist_result=True, log_prints=True)
@no_flow_retry_on_permanent
def post_train(model: ModelSource, sft_stage: StageConfig, dpo_stage: StageConfig, export_dir: str,
               launch: Launch = Launch(), precompute_reference: bool = True) -> PostTrainOutcome:
    """SFT then DPO from the SFT weights, exported to ``export_dir`` as HF safetensors.

    Steps: download_weights -> sft (pack, train, report) -> dpo (pack, reference log-probs, train, report)
    -> convert_checkpoint of DPO's newest complete step -> run summary artifact.
    """
    validate_stage(sft_stage, model.output_dir, model_pending=True, launch=launch)  # fail fast: before any download
    validate_stage(dpo_stage, None, model_pending=True, launch=launch)  # its model is SFT's export
    model_dir = download_weights(model.source, model.output_dir, revision=model.revision,
                                 hf_token_secret=model.hf_token_secret).path
    sft_out = sft(train=sft_stage, model_dir=model_dir, launch=launch)
    if not sft_out.hf_dir:
        raise RuntimeError(f"SFT finished without an HF export under {sft_out.output_dir}/hf; DPO has no start weights")
    dpo_out = dpo(train=dpo_stage, model_dir=sft_out.hf_dir, launch=launch, precompute_reference=precompute_reference)
    export = convert_checkpoint(dpo_out.output_dir, export_dir, config=dpo_stage.config)
    outcome = PostTrainOutcome(model_dir=model_dir, sft=sft_out, dpo=dpo_out, export_dir=export.path)
    publish_summary("Post-training run (SFT -> DPO)", "post-train",
                    {"model": model.model_dump(), "sft_stage": sft_stage.model_dump(), "dpo_stage": dpo_stage.model_dump(),
                     "launch": launch.model_dump(), "precompute_reference": precompute_reference},
                    [_as_report(sft_out), _as_report(dpo_out)],
                    {"base model": model_dir, "sft output": sft_out.output_dir, "sft hf": str(sft_out.hf_dir),
                     "dpo output": dpo_out.output_dir, "hf export": export.path})
    return outcome
