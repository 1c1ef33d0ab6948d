"""Packed-pair log-probs from the fused path equal unpacked per-pair full-logits log-probs (fp32 CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mirotrain.data.collate import padded_collate_dpo
from mirotrain.data.datasets import Encoded, EncodedPair
from mirotrain.data.preference import build_dpo_row
from mirotrain.models.qwen3.builders import qwen3
from mirotrain.models.qwen3.tiny import TINY_ARGS
from mirotrain.training.reference import forward_pair_logprobs


def _doc(rng: np.random.Generator, prompt: np.ndarray, vocab: int) -> Encoded:
    response = rng.integers(0, vocab, size=int(rng.integers(3, 12)))
    ids = np.concatenate([prompt, response]).astype(np.int32)
    labels = np.full(len(ids), -100, dtype=np.int32)
    labels[len(prompt) - 1: -1] = ids[len(prompt):]  # shifted: position t predicts t+1
    return Encoded(ids, labels)


def _pairs(n: int, vocab: int, seed: int = 0) -> list[tuple[int, EncodedPair]]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        prompt = rng.integers(0, vocab, size=int(rng.integers(2, 10)))
        out.append((10 + 3 * i, EncodedPair(_doc(rng, prompt, vocab), _doc(rng, prompt, vocab))))
    return out


def _unpacked_logp(model, doc: Encoded) -> float:
    """Plain reference: full logits of the document alone, log_softmax, gather, masked sum (float64 sum)."""
    ids = torch.from_numpy(doc.input_ids.astype(np.int64))[None]
    logits = model(ids)[0]
    logp = torch.log_softmax(logits.float(), dim=-1)
    labels = torch.from_numpy(doc.labels.astype(np.int64))
    mask = labels != -100
    return float(logp[mask].gather(1, labels[mask][:, None]).double().sum())


@pytest.mark.parametrize("chunk_size", [5, 2048])
def test_packed_equals_unpacked(chunk_size):
    torch.manual_seed(0)
    model = qwen3(**TINY_ARGS)
    model.init_weights(seed=0)
    model.eval()
    pairs = _pairs(5, TINY_ARGS["vocab_size"])
    rows = [build_dpo_row(pairs[:3]), build_dpo_row(pairs[3:])]
    # two rows concatenated into one batch, padded to a fixed length: padding is its own segment
    batch = padded_collate_dpo(rows, pad_id=151643, packed_seq_len=96)
    with torch.no_grad():
        got = forward_pair_logprobs(model, batch, chunk_size=chunk_size)
        want_c = [_unpacked_logp(model, enc.chosen) for _, enc in pairs]
        want_r = [_unpacked_logp(model, enc.rejected) for _, enc in pairs]
    assert batch.pair_ids.tolist() == [pid for pid, _ in pairs]
    assert batch.cu_seqlens.numel() - 1 > 2 * len(pairs), "the rows should carry padding segments"
    torch.testing.assert_close(got["chosen_logps"].double(), torch.tensor(want_c, dtype=torch.float64), atol=1e-5, rtol=0)
    torch.testing.assert_close(got["rejected_logps"].double(), torch.tensor(want_r, dtype=torch.float64), atol=1e-5, rtol=0)
    assert got["chosen_tokens"].tolist() == [int((e.chosen.labels != -100).sum()) for _, e in pairs]
    assert got["rejected_tokens"].tolist() == [int((e.rejected.labels != -100).sum()) for _, e in pairs]


def test_packed_gradients_equal_unpacked():
    """d(sum of pair log-probs)/d(weights) through the packed fused path equals the unpacked full-logits one."""
    model = qwen3(**(TINY_ARGS | {"vocab_size": 512}))
    model.init_weights(seed=1)
    pairs = _pairs(3, 512, seed=1)
    batch = padded_collate_dpo([build_dpo_row(pairs)], pad_id=0, packed_seq_len=100)
    w = torch.tensor([0.3, -1.2, 0.7])
    out = forward_pair_logprobs(model, batch, chunk_size=7)
    ((out["chosen_logps"] - out["rejected_logps"]) * w).sum().backward()
    packed = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    total = 0.0
    for k, (_, enc) in enumerate(pairs):
        for doc, sign in ((enc.chosen, 1.0), (enc.rejected, -1.0)):
            ids = torch.from_numpy(doc.input_ids.astype(np.int64))[None]
            logp = torch.log_softmax(model(ids)[0], dim=-1)
            labels = torch.from_numpy(doc.labels.astype(np.int64))
            m = labels != -100
            total = total + sign * w[k] * logp[m].gather(1, labels[m][:, None]).sum()
    total.backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(packed[n], p.grad, atol=5e-5, rtol=1e-4, msg=n)
