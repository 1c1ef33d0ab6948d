"""Task ``convert_checkpoint``: a DCP step checkpoint to HF safetensors (`mirotrain convert`).

``checkpoint`` may name a step directory (``OUT/checkpoints/step_N``) or a training output directory, passed
as is to `mirotrain convert`, which picks the newest complete step checkpoint itself -- the same rule
auto-resume follows (``mirotrain/checkpoint/layout.py``, ``resolve_checkpoint``). A failed
conversion removes its half-written output so no caller ever loads a partial export.

    python -m tasks.convert_checkpoint --checkpoint outputs/sft --output exports/sft-hf
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from mirotrain.hub import verify_dir
from tasks._retry import retry_unless_permanent
from tasks._runtime import run_logger
from tasks._subprocess import run_streaming


class ConvertResult(BaseModel):
    """The HF directory (loads with transformers.AutoModelForCausalLM.from_pretrained) and its source step."""

    path: str
    checkpoint: str
    files: list[str]


@task(name="convert_checkpoint", retries=1, retry_delay_seconds=10, cache_policy=NO_CACHE, persist_result=True,
      retry_condition_fn=retry_unless_permanent)
def convert_checkpoint(checkpoint: str, output: str, config: str | None = None) -> ConvertResult:
    """Convert a step checkpoint (or a run's newest complete one) to an HF safetensors directory.

    Args:
        checkpoint: OUT/checkpoints/step_N, or a training output_dir (newest complete step is used).
        output: Destination HF directory.
        config: The training config (tells the converter the model and tokenizer if the checkpoint does not).
    """
    from mirotrain.checkpoint.layout import resolve_checkpoint

    logger = run_logger()
    cmd = [sys.executable, "-m", "mirotrain", "convert", "--checkpoint", checkpoint, "--output", output]
    if config:
        cmd += ["--config", config]
    try:
        run_streaming(cmd, log=logger.info)
        problems = verify_dir(output)
        if problems:
            raise RuntimeError("converted checkpoint failed verification: " + "; ".join(problems))
    except BaseException:
        shutil.rmtree(output, ignore_errors=True)
        raise
    ckpt = resolve_checkpoint(checkpoint).path  # the step the converter chose, for the record
    files = sorted(str(p.relative_to(output)) for p in Path(output).rglob("*") if p.is_file())
    logger.info(f"converted {ckpt} -> {output} ({len(files)} files)")
    return ConvertResult(path=str(Path(output).resolve()), checkpoint=str(ckpt), files=files)


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(convert_checkpoint, argv, module="convert_checkpoint")


if __name__ == "__main__":
    raise SystemExit(main())
