"""Prefect flows that only chain tasks: ``sft``, ``dpo`` and ``post_train`` (plus the embedded ``demo``).

Flow modules deliberately avoid ``from __future__ import annotations``: with it, Prefect 3.9.1 could not
resolve the pydantic parameter models when a flow is served (the string annotations stay unresolved).
"""
