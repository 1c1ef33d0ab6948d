"""MiroTrain: post-training for Qwen3 dense and MoE models.

The engine (this package) is native PyTorch and never imports Prefect; the pipeline lives in
``tasks/`` and ``pipelines/`` and calls the engine.
"""

__version__ = "0.2.0"
