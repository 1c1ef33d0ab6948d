"""Task ``report_run``: turn a training run's files into Prefect artifacts.

Reads what the engine wrote (``metrics.jsonl``, ``summary.json``; docs/contracts.md) and publishes:

- ``<key>-metrics``: a table artifact of the logged steps (subsampled to at most ``max_rows``);
- ``<key>-loss-curve``: a markdown artifact with the loss curve as an inline PNG, drawn by the engine's
  ``mirotrain.training.loss_curve`` (the same plot ``mirotrain sft``/``dpo`` leave in the output_dir) and
  saved as ``output_dir/loss_curve.png`` so it outlives the Prefect database.

The flows' markdown run summary is built from the returned :class:`RunReport` by :func:`publish_summary`.

    python -m tasks.report_run --output-dir outputs/sft --key sft
"""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel

from mirotrain.training.loss_curve import loss_key, read_metrics, write_loss_curve
from tasks._runtime import in_run, run_logger


class RunReport(BaseModel):
    """What a summary needs from one training run."""

    key: str
    output_dir: str
    steps: int | None
    final_loss: float | None
    first_loss: float | None
    loss_curve_png: str | None
    metrics_rows: int
    summary: dict[str, Any]


def _table(rows: list[dict[str, Any]], max_rows: int) -> list[dict[str, Any]]:
    if len(rows) > max_rows:  # keep first and last, evenly spaced in between
        stride = (len(rows) - 1) / (max_rows - 1)
        rows = [rows[round(i * stride)] for i in range(max_rows)]
    cols: list[str] = []
    for r in rows:
        cols += [k for k, v in r.items() if k not in cols and isinstance(v, (int, float, str, type(None)))]
    return [{c: (round(r[c], 6) if isinstance(r.get(c), float) else r.get(c)) for c in cols} for r in rows]


@task(name="report_run", cache_policy=NO_CACHE, retries=0)
def report_run(output_dir: str, key: str, max_rows: int = 100) -> RunReport:
    """Publish the metrics table and loss-curve artifacts of one training run.

    Args:
        output_dir: The training run's output_dir.
        key: Artifact key prefix (lowercase letters, digits, dashes), e.g. sft or dpo.
        max_rows: Most rows in the metrics table.
    """
    logger = run_logger()
    rows = read_metrics(output_dir)
    summary_path = Path(output_dir) / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    lk = loss_key(rows)
    losses = [r[lk] for r in rows if lk and isinstance(r.get(lk), (int, float))]
    png = write_loss_curve(output_dir, f"{key}: training loss")
    if in_run():
        from prefect.artifacts import create_markdown_artifact, create_table_artifact

        if rows:
            create_table_artifact(table=_table(rows, max_rows), key=f"{key}-metrics",
                                  description=f"{key} metrics per logged step ({output_dir}/metrics.jsonl)")
        if png:
            b64 = base64.b64encode(png.read_bytes()).decode()
            create_markdown_artifact(markdown=f"### {key} loss\n\n![{key} loss curve](data:image/png;base64,{b64})\n\n`{png}`",
                                     key=f"{key}-loss-curve", description=f"{key} loss curve")
    logger.info(f"{key}: {len(rows)} metric rows, final loss {losses[-1] if losses else None}, plot {png}")
    return RunReport(key=key, output_dir=str(output_dir), steps=summary.get("steps") or (rows[-1].get("step") if rows else None),
                     final_loss=summary.get("final_loss", losses[-1] if losses else None),
                     first_loss=losses[0] if losses else None, loss_curve_png=str(png) if png else None,
                     metrics_rows=len(rows), summary=summary)


def summary_markdown(title: str, params: dict[str, Any], reports: list[RunReport], outputs: dict[str, str]) -> str:
    """The run summary: parameters, per-stage steps and losses, and where every output is."""
    lines = [f"# {title}", "", "## Stages", "", "| stage | steps | first loss | final loss | output_dir |", "|---|---|---|---|---|"]
    for r in reports:
        fmt = lambda x: f"{x:.4f}" if isinstance(x, float) else str(x)  # noqa: E731
        lines.append(f"| {r.key} | {r.steps} | {fmt(r.first_loss)} | {fmt(r.final_loss)} | `{r.output_dir}` |")
    lines += ["", "## Outputs", ""] + [f"- **{k}**: `{v}`" for k, v in outputs.items()]
    lines += ["", "## Parameters", "", "```json", json.dumps(params, indent=2, default=str), "```"]
    return "\n".join(lines)


def publish_summary(title: str, key: str, params: dict[str, Any], reports: list[RunReport], outputs: dict[str, str]) -> str:
    """Create the ``<key>-summary`` markdown artifact (inside a run) and return its text."""
    text = summary_markdown(title, params, reports, outputs)
    if in_run():
        from prefect.artifacts import create_markdown_artifact

        create_markdown_artifact(markdown=text, key=f"{key}-summary", description=title)
    return text


def main(argv: list[str] | None = None) -> int:
    from tasks._cli import run_task_cli

    return run_task_cli(report_run, argv, module="report_run")


if __name__ == "__main__":
    raise SystemExit(main())
