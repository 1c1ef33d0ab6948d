"""MiroTrain v0.1 recipe configs, read unchanged: the few keys that work differently here are rewritten once,
each with a one-line notice that says what changed.

:func:`translate_mirotrain` runs on every resolved config (``load_config``, ``parse_config``), before the
checks; a translated config needs no second translation, so it is idempotent. Everything else a MiroTrain config
writes is read as it is: the aliases of its ``_component_`` names live in :mod:`mirotrain.config.registry`,
the meaning of its keys in :mod:`mirotrain.config.schema`. docs/compatibility.md lists what differs and why.
"""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any, Callable

log = logging.getLogger("mirotrain.config")

Rule = Callable[[dict], "list[str]"]


def _resume_from_checkpoint(cfg: dict) -> list[str]:
    """MiroTrain resumed a whole epoch from ``recipe_state.pt``; here resuming means the step checkpoints."""
    notices = []
    for where, node in (("resume_from_checkpoint", cfg), ("checkpointer.resume_from_checkpoint", cfg.get("checkpointer"))):
        if isinstance(node, dict) and node.get("resume_from_checkpoint") is True:
            del node["resume_from_checkpoint"]
            cfg["auto_resume"] = True
            notices.append(f"config key '{where}': True is read as auto_resume: True: training resumes from the "
                           "newest complete step checkpoint under output_dir/checkpoints (written every "
                           "checkpoint_steps_for_auto_resume steps), not from an epoch's recipe_state.pt")
    return notices


def _preference_row_length(cfg: dict) -> list[str]:
    """MiroTrain padded each DPO pair to max_seq_len; here pairs are packed into rows, which need a length."""
    node, tokenizer = cfg.get("dataset"), cfg.get("tokenizer")
    if not isinstance(node, dict) or not isinstance(tokenizer, dict) or "packed_seq_len" in node or "shard_dir" in node:
        return []
    max_seq_len = tokenizer.get("max_seq_len")
    if not isinstance(max_seq_len, int) or isinstance(max_seq_len, bool) or not _makes_pairs(node):
        return []
    cfg["dataset"] = {**node, "packed_seq_len": 2 * max_seq_len}
    if cfg.get("one_pair_per_row") is True:
        return [f"config key 'dataset.packed_seq_len': not set, so {2 * max_seq_len} (2 × tokenizer.max_seq_len): "
                "each preference pair (chosen and rejected) is one row of up to that many tokens "
                "(one_pair_per_row), so a step trains batch_size × gradient_accumulation_steps × data-parallel "
                "pairs, as in MiroTrain"]
    return [f"config key 'dataset.packed_seq_len': not set, so {2 * max_seq_len} (2 × tokenizer.max_seq_len): "
            "preference pairs are packed into rows of that many tokens, a pair's chosen and rejected in one row "
            "and several short pairs per row, so batch_size counts rows, not pairs (`mirotrain validate` prints "
            "the pairs per optimizer step); one_pair_per_row: true puts one pair in each row, as MiroTrain did"]


def _makes_pairs(node: dict) -> bool:
    from mirotrain.config.registry import resolve_component

    try:
        return resolve_component(node.get("_component_", "")).__name__ == "preference_dataset"
    except (ValueError, ImportError):
        return False  # an unknown builder is reported by the checks


RULES: tuple[Rule, ...] = (_resume_from_checkpoint, _preference_row_length)


def master_weights_notice(dtype: str, written: Collection[str]) -> str | None:
    """The one line said where a run starts (and by `mirotrain validate`) when ``dtype: bf16`` leaves
    ``master_weights`` unset: MiroTrain kept bf16 weights and AdamW state, here the default keeps fp32 masters.
    Not a rewrite (shipped configs keep their meaning), so not one of ``RULES``."""
    if dtype != "bf16" or "master_weights" in written:
        return None
    return ("dtype: bf16 computes in bf16 and keeps fp32 master weights and AdamW state (16 bytes/param; "
            "MiroTrain kept them in bf16, 8); master_weights: bf16 keeps bf16 ones with compensated updates "
            "(10 bytes/param), master_weights: bf16_plain rounds updates to nearest as MiroTrain did")


def translate_mirotrain(raw: dict) -> tuple[dict, list[str]]:
    """``raw`` with MiroTrain's differently-working keys rewritten (a copy) and one notice per rewrite."""
    cfg: dict[str, Any] = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
    notices = [notice for rule in RULES for notice in rule(cfg)]
    return (cfg if notices else raw), notices


def translate_and_report(raw: dict, source: str | None = None) -> dict:
    """:func:`translate_mirotrain`, logging each notice as a warning (the one place they are reported)."""
    cfg, notices = translate_mirotrain(raw)
    for notice in notices:
        log.warning("%s%s", f"{source}: " if source else "", notice)
    return cfg


__all__ = ["RULES", "master_weights_notice", "translate_and_report", "translate_mirotrain"]
