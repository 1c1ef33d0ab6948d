"""The engine's loss-curve plot (mirotrain.training.loss_curve), which `mirotrain sft`/`dpo` and the pipeline's
report share: drawn from metrics.jsonl, and skipped with one notice when matplotlib (the pipeline extra) is
missing."""

import json
import logging
import sys

from mirotrain.training.loss_curve import write_loss_curve


def _metrics(tmp_path, n: int = 10) -> None:
    rows = [{"step": i, "loss": 2.0 / i} for i in range(1, n + 1)] + [{"step": n, "val_loss": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n{partial")


def test_loss_curve_is_drawn_from_metrics_jsonl(tmp_path):
    _metrics(tmp_path)
    png = write_loss_curve(tmp_path, "sft: training loss")
    assert png == tmp_path / "loss_curve.png" and png.read_bytes()[:4] == b"\x89PNG"


def test_no_loss_no_plot(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "val_loss": 1.0}) + "\n")
    assert write_loss_curve(tmp_path, "t") is None and not (tmp_path / "loss_curve.png").exists()


def test_without_matplotlib_the_plot_is_skipped_with_one_notice(tmp_path, monkeypatch, caplog):
    _metrics(tmp_path)
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # what `import matplotlib` meets when it is not installed
    caplog.set_level(logging.INFO, logger="mirotrain")
    assert write_loss_curve(tmp_path, "t") is None
    assert not (tmp_path / "loss_curve.png").exists()
    notices = [r.getMessage() for r in caplog.records if "matplotlib" in r.getMessage()]
    assert notices == ["matplotlib is not installed (pip install 'mirotrain[pipeline]'): no loss_curve.png plot "
                       f"in {tmp_path}"]
