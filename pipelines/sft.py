"""Flow ``sft``: [download weights] -> pack the SFT data -> train (torchrun) -> report [-> HF export].

Run it locally with ``python -m pipelines.sft --help``-free defaults via a deployment
(``prefect deployment run 'sft/adhoc' --param train='{...}'``) or call ``sft(...)`` from Python.
"""

from typing import Optional

from prefect import flow

from pipelines._common import StageOutcome, finish_stage, launch_kwargs, prepare_stage, retry_options
from pipelines.params import Launch, ModelSource, StageConfig
from tasks.train import train as train_task


@flow(name="sft", persist_result=True, log_prints=True)
def sft(train: StageConfig, model: Optional[ModelSource] = None, model_dir: Optional[str] = None,
        launch: Launch = Launch(), export_dir: Optional[str] = None) -> StageOutcome:
    """Supervised fine-tuning of the model in ``model`` (downloaded) or ``model_dir`` (already local).

    Steps: download_weights (if ``model``) -> pack_dataset (train and validation sections) -> train ->
    report_run -> convert_checkpoint (if ``export_dir``). Weights reach the engine through the config keys
    in ``train.model_keys``.
    """
    model_dir, overrides, shards = prepare_stage(train, model, model_dir)
    result = train_task.with_options(**retry_options(launch))("sft", train.config, overrides, **launch_kwargs(launch))
    return finish_stage("sft", "SFT run", result, train, launch, model_dir, shards, export_dir)
