"""The loss-curve plot of a run: ``metrics.jsonl`` in, ``loss_curve.png`` out.

One implementation for both callers: the trainer draws it into the output_dir at the end of ``mirotrain
sft`` / ``mirotrain dpo`` (rank 0), and the pipeline's report task (tasks/report_run.py) draws the same plot
for its artifact. matplotlib belongs to the ``pipeline`` extra, so it is imported only here, when a plot is
drawn; without it the plot is skipped with one notice and nothing else changes.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss_curve.png"
LOSS_KEYS = ("loss", "train_loss", "train/loss")
VAL_KEYS = ("val_loss", "eval_loss")


def read_metrics(output_dir: str | Path) -> list[dict[str, Any]]:
    """Every JSON line of ``metrics.jsonl`` (lines that do not parse are skipped: a run may be mid-write)."""
    rows = []
    p = Path(output_dir) / METRICS_FILE
    if p.is_file():
        for line in p.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return rows


def loss_key(rows: list[dict[str, Any]]) -> str | None:
    """The name the training loss is logged under, or None when no row has one."""
    for k in LOSS_KEYS:
        if any(k in r for r in rows):
            return k
    return None


def plot_loss(rows: list[dict[str, Any]], out_png: Path, title: str) -> Path | None:
    """Loss (and validation loss, when logged) against step; None when there is nothing to plot.

    Raises ImportError when matplotlib is not installed.
    """
    key = loss_key(rows)
    if key is None:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pts = [(r.get("step", i), r[key]) for i, r in enumerate(rows) if isinstance(r.get(key), (int, float))]
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key, lw=1.5)
    val = [(r.get("step", i), r[k]) for i, r in enumerate(rows) for k in VAL_KEYS if isinstance(r.get(k), (int, float))]
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


def write_loss_curve(output_dir: str | Path, title: str) -> Path | None:
    """``output_dir/loss_curve.png`` from ``output_dir/metrics.jsonl``; None when there is no loss to plot or
    matplotlib is missing (then one notice says so)."""
    try:
        return plot_loss(read_metrics(output_dir), Path(output_dir) / PLOT_FILE, title)
    except ImportError:
        log.info("matplotlib is not installed (pip install 'mirotrain[pipeline]'): no %s plot in %s",
                 PLOT_FILE, output_dir)
        return None
