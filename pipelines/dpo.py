"""Flow ``dpo``: [download weights] -> pack the preference data -> reference log-probs -> DPO train
-> report [-> HF export]. In ``post_train`` the model is the SFT run's HF export.

Each flow run trains into a run directory of its own, ``<output_dir>/<run name>`` (``pipelines/runs.py``);
its retries resume there, and ``resume_from`` continues an earlier run.
"""

from typing import Optional

from prefect import flow

from pipelines._common import StageOutcome, finish_stage, launch_kwargs, prepare_stage, retry_options
from pipelines._recovery import close_crashed_attempts
from pipelines.params import Launch, ModelSource, StageConfig
from pipelines.runs import stage_run_dir
from tasks.reference_logprobs import reference_logprobs
from tasks.train import train as train_task


@flow(name="dpo", persist_result=True, log_prints=True)
def dpo(train: StageConfig, model: Optional[ModelSource] = None, model_dir: Optional[str] = None,
        launch: Launch = Launch(), precompute_reference: bool = True,
        export_dir: Optional[str] = None, resume_from: Optional[str] = None) -> StageOutcome:
    """Direct preference optimisation starting from ``model`` (downloaded) or ``model_dir`` (local).

    Steps: download_weights (if ``model``) -> pack_dataset -> reference_logprobs (if
    ``precompute_reference``; the policy's starting weights are the reference) -> train -> report_run ->
    convert_checkpoint (if ``export_dir``).

    Args:
        train: The DPO stage: engine config, overrides, and the directory its runs go under.
        model: Weights to download first (leave empty when ``model_dir`` is given).
        model_dir: Local HF directory to start from (instead of ``model``); also the reference model.
        launch: How the trainer is launched and retried.
        precompute_reference: Compute the reference log-probs in a pass of their own before training.
        export_dir: If set, the run's final weights are also exported to ``<export_dir>/<run name>``.
        resume_from: Continue this earlier run (its run name, or its run directory) instead of starting one.
    """
    close_crashed_attempts()  # a rerun after a crash first closes what the crashed attempt left open
    out = stage_run_dir(train, resume_from)
    model_dir, overrides, shards = prepare_stage(train, model, model_dir, launch)
    if precompute_reference:
        reference_logprobs.with_options(**retry_options(launch))(train.config, [*overrides, f"output_dir={out}"],
                                                                 **launch_kwargs(launch))
    result = train_task.with_options(**retry_options(launch))("dpo", train.config, overrides, output_dir=out,
                                                             **launch_kwargs(launch))
    return finish_stage("dpo", "DPO run", result, train, launch, model_dir, shards, export_dir)
