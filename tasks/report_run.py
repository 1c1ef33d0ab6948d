"""Task ``report_run``: turn a training run's files into Prefect artifacts.

Reads what the engine wrote (``metrics.jsonl``, ``summary.json``; docs/contracts.md) and publishes:

- ``<key>-metrics``: a table artifact of the logged steps (subsampled to at most ``max_rows``);
- ``<key>-loss-curve``: a markdown artifact with the loss curve as an inline PNG (matplotlib), also saved as
  ``output_dir/loss_curve.png`` so it outlives the Prefect database.

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


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of ``metrics.jsonl`` (lines that do not parse are skipped: a run may be mid-write)."""
    rows = []
    p = Path(output_dir) / "metrics.jsonl"
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def _loss_key(rows: list[dict[str, Any]]) -> str | None:
    for k in ("loss", "train_loss", "train/loss"):
        if any(k in r for r in rows):
            return k
    return None


def plot_loss(rows: list[dict[str, Any]], out_png: Path, title: str) -> Path | None:
    """Loss (and validation loss, when logged) against step; None when there is nothing to plot."""
    key = _loss_key(rows)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, lw=1.5)
    val = [(r.get("step", i), r[k]) for i, r in enumerate(rows) for k in ("val_loss", "eval_loss") if isinstance(r.get(k), (int, float))]
    if val:
        ax.plot([p[0] for p in val], [p[1] for p in val], "o-", label="val_loss", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


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
    lk = _loss_key(rows)
    losses = [r[lk] for r in rows if lk and isinstance(r.get(lk), (int, float))]
    png = plot_loss(rows, Path(output_dir) / "loss_curve.png", f"{key}: training loss")
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
