"""Flow ``sft``: [download weights] -> pack the SFT data -> train (torchrun) -> report [-> HF export].

Run it locally with ``python -m pipelines.sft --help``-free defaults via a deployment
(``prefect deployment run 'sft/adhoc' --param train='{...}'``) or call ``sft(...)`` from Python.
"""

from typing import Optional

from prefect import flow

from pipelines._common import StageOutcome, launch_kwargs, retry_options
from pipelines.params import Launch, ModelSource, StageConfig, stage_overrides
from tasks.convert_checkpoint import convert_checkpoint
from tasks.download_weights import download_weights
from tasks.pack_dataset import dataset_sections, pack_dataset
from tasks.report_run import publish_summary, report_run
from tasks.train import train as train_task


@flow(name="sft", persist_result=True, log_prints=True)
def sft(train: StageConfig, model: Optional[ModelSource] = None, model_dir: Optional[str] = None,
        launch: Launch = Launch(), export_dir: Optional[str] = None) -> StageOutcome:
    """Supervised fine-tuning of the model in ``model`` (downloaded) or ``model_dir`` (already local).

    Steps: download_weights (if ``model``) -> pack_dataset (train and validation sections) -> train ->
    report_run -> convert_checkpoint (if ``export_dir``). Weights reach the engine through the config keys
    in ``train.model_keys``.
    """
    if model is not None:
        model_dir = download_weights(model.source, model.output_dir, revision=model.revision,
                                     hf_token_secret=model.hf_token_secret).path
    overrides = stage_overrides(train, model_dir)
    packed = {section: pack_dataset(train.config, overrides, section).path
              for section in dataset_sections(train.config, overrides)}
    shards = list(packed.values())
    # Train on exactly the shards just packed (and cached), never a second packing inside the trainer.
    overrides = overrides + [f"{section}.shard_dir={path}" for section, path in packed.items()]
    result = train_task.with_options(**retry_options(launch))("sft", train.config, overrides, **launch_kwargs(launch))
    report = report_run(result.output_dir, key="sft")
    export = convert_checkpoint(result.output_dir, export_dir, config=train.config).path if export_dir else None
    outcome = StageOutcome(recipe="sft", output_dir=result.output_dir, hf_dir=result.hf_dir, export_dir=export,
                           steps=report.steps, final_loss=report.final_loss, first_loss=report.first_loss,
                           shards=shards, model_dir=model_dir, loss_curve_png=report.loss_curve_png)
    publish_summary("SFT run", "sft", {"train": train.model_dump(), "model_dir": model_dir, "launch": launch.model_dump()},
                    [report], {k: v for k, v in outcome.model_dump().items() if k.endswith("dir") and v})
    return outcome
