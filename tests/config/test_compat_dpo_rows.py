"""compat.py's DPO row notice names the option that restores MiroTrain's one pair per micro-batch."""

from __future__ import annotations

from mirotrain.config.compat import translate_mirotrain

MIROTRAIN_DPO = {"tokenizer": {"_component_": "mirotrain.models.qwen3.qwen3_tokenizer_auto", "max_seq_len": 1000},
                 "dataset": {"_component_": "torchtune.datasets.preference_dataset", "source": "json"},
                 "batch_size": 1, "gradient_accumulation_steps": 4}


def test_packed_rows_notice_points_at_one_pair_per_row():
    cfg, [notice] = translate_mirotrain(MIROTRAIN_DPO)
    assert cfg["dataset"]["packed_seq_len"] == 2000
    assert "several short pairs per row, so batch_size counts rows, not pairs (`mirotrain validate` prints the " \
           "pairs per optimizer step); one_pair_per_row: true puts one pair in each row, as MiroTrain did" in notice


def test_with_one_pair_per_row_the_notice_counts_pairs_per_step():
    cfg, [notice] = translate_mirotrain({**MIROTRAIN_DPO, "one_pair_per_row": True})
    assert cfg["dataset"]["packed_seq_len"] == 2000
    assert notice.endswith("each preference pair (chosen and rejected) is one row of up to that many tokens "
                           "(one_pair_per_row), so a step trains batch_size × gradient_accumulation_steps × "
                           "data-parallel pairs, as in MiroTrain")
