"""Flow ``sft``: [download weights] -> pack the SFT data -> train (torchrun) -> report [-> HF export].

Each flow run trains into a run directory of its own, ``<output_dir>/<run name>`` (``pipelines/runs.py``);
its retries resume there, and ``resume_from`` continues an earlier run. Run it through a deployment
(``prefect deployment run 'sft/adhoc' --param train='{...}'``) or call ``sft(...)`` from Python.
"""

from typing import Optional

from prefect import flow

from pipelines._common import StageOutcome, finish_stage, launch_kwargs, prepare_stage, retry_options
from pipelines._recovery import close_crashed_attempts
from pipelines.params import Launch, ModelSource, StageConfig
from pipelines.runs import stage_run_dir
from tasks.train import train as train_task


@flow(name="sft", persist_result=True, log_prints=True)
def sft(train: StageConfig, model: Optional[ModelSource] = None, model_dir: Optional[str] = None,
        launch: Launch = Launch(), export_dir: Optional[str] = None,
        resume_from: Optional[str] = None) -> StageOutcome:
    """Supervised fine-tuning of the model in ``model`` (downloaded) or ``model_dir`` (already local).

    Steps: download_weights (if ``model``) -> pack_dataset (train and validation sections) -> train ->
    report_run -> convert_checkpoint (if ``export_dir``). Weights reach the engine through the config keys
    in ``train.model_keys``.

    Args:
        train: The SFT stage: engine config, overrides, and the directory its runs go under.
        model: Weights to download first (leave empty when ``model_dir`` is given).
        model_dir: Local HF directory to start from (instead of ``model``).
        launch: How the trainer is launched and retried.
        export_dir: If set, the run's final weights are also exported to ``<export_dir>/<run name>``.
        resume_from: Continue this earlier run (its run name, or its run directory) instead of starting one.
    """
    close_crashed_attempts()  # a rerun after a crash first closes what the crashed attempt left open
    out = stage_run_dir(train, resume_from)
    model_dir, overrides, shards = prepare_stage(train, model, model_dir, launch)
    result = train_task.with_options(**retry_options(launch))("sft", train.config, overrides, output_dir=out,
                                                             **launch_kwargs(launch))
    return finish_stage("sft", "SFT run", result, train, launch, model_dir, shards, export_dir)
