"""Typed batches: what moves to the device, what stays on the host, and what SP sharding keeps."""

import numpy as np
import torch

from mirotrain.data.collate import collate_packed, padded_collate_dpo, padded_collate_sft
from mirotrain.parallel.ulysses import shard_batch_for_sp

ROW = {"input_ids": np.array([1, 2, 3, 4, 5]), "labels": np.array([2, 3, -100, 5, -100]),
       "position_ids": np.array([0, 1, 2, 0, 1]), "seq_lens": np.array([3, 2])}


def test_to_moves_the_model_inputs_and_keeps_the_host_batch():
    batch = collate_packed([ROW], pad_id=0, packed_seq_len=8)
    moved = batch.to(torch.device("meta"))
    assert {moved.input_ids.device.type, moved.position_ids.device.type, moved.token_mask.device.type,
            moved.cu_seqlens.device.type} == {"meta"}
    assert moved.labels.device.type == "cpu" and moved.host is batch
    assert moved.num_targets() == batch.num_targets() == 3
    assert moved.doc_lengths() == batch.doc_lengths() == [3, 2, 3]  # the padding is a document of its own


def test_unpacked_rows_are_one_document_each():
    rows = [{"input_ids": np.array([1, 2, 3]), "labels": np.array([2, 3, -100])},
            {"input_ids": np.array([4]), "labels": np.array([-100])}]
    batch = padded_collate_sft(rows, pad_id=0)
    assert batch.cu_seqlens is None and batch.doc_lengths() == [3, 3] and batch.num_targets() == 2


def test_sp_sharding_keeps_the_pair_fields():
    row = dict(ROW, pair_ids=np.array([7]), chosen_index=np.array([0]), rejected_index=np.array([1]),
               ref_chosen_logp=np.array([-1.5]), ref_rejected_logp=np.array([-2.5]))
    batch = padded_collate_dpo([row], pad_id=0, packed_seq_len=7)
    assert batch.num_pairs == 1 and batch.pair_columns["ref_chosen_logp"].tolist() == [-1.5]
    halves = [batch.replace(**shard_batch_for_sp(batch.token_fields(), r, 2, pad_id=0)) for r in range(2)]
    assert [h.input_ids.shape[1] for h in halves] == [4, 4]
    assert torch.equal(torch.cat([h.labels for h in halves], 1)[:, :7], batch.labels)
    for half in halves:
        assert half.pair_ids.tolist() == [7] and half.chosen_index.tolist() == [0]
        assert half.cu_seqlens.tolist() == [0, 3, 5, 7, 8]  # global, plus the sp padding as its own document
