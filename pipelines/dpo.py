"""Flow ``dpo``: [download weights] -> pack the preference data -> reference log-probs -> DPO train
-> report [-> HF export]. In ``post_train`` the model is the SFT run's HF export."""

from typing import Optional

from prefect import flow

from pipelines._common import StageOutcome, finish_stage, launch_kwargs, prepare_stage, retry_options
from pipelines.params import Launch, ModelSource, StageConfig
from tasks.reference_logprobs import reference_logprobs
from tasks.train import train as train_task


@flow(name="dpo", persist_result=True, log_prints=True)
def dpo(train: StageConfig, model: Optional[ModelSource] = None, model_dir: Optional[str] = None,
        launch: Launch = Launch(), precompute_reference: bool = True,
        export_dir: Optional[str] = None) -> StageOutcome:
    """Direct preference optimisation starting from ``model`` (downloaded) or ``model_dir`` (local).

    Steps: download_weights (if ``model``) -> pack_dataset -> reference_logprobs (if
    ``precompute_reference``; the policy's starting weights are the reference) -> train -> report_run ->
    convert_checkpoint (if ``export_dir``).
    """
    model_dir, overrides, shards = prepare_stage(train, model, model_dir)
    if precompute_reference:
        reference_logprobs.with_options(**retry_options(launch))(train.config, overrides, **launch_kwargs(launch))
    result = train_task.with_options(**retry_options(launch))("dpo", train.config, overrides, **launch_kwargs(launch))
    return finish_stage("dpo", "DPO run", result, train, launch, model_dir, shards, export_dir)
