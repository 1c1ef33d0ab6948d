"""FP8 training (mirotrain/parallel/float8.py) on CPU through torchao's emulation (``emulate=True``: the same
casts and scales, a float matmul instead of ``torch._scaled_mm``): which Linears it converts, that names and
state-dict keys stay, the quantize-dequantize math against a float64 reference, the distance to the plain
model, and (gloo) the FSDP fp8 all-gather against the unsharded float8 model, with DCP checkpoints the plain
model reads and HF exports equal to the plain model's. The float8 GEMMs themselves are compared on GPU in
tests/gpu/test_float8_gpu.py."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn
from torchao.float8.float8_linear import Float8Linear
from torchao.float8.fsdp_utils import WeightWithDynamicFloat8CastTensor

from mirotrain.models.qwen3.builders import qwen3
from mirotrain.models.qwen3_moe.builders import qwen3_moe
from mirotrain.parallel.float8 import apply_float8_training, fp8_device_problem, is_fp8_linear

from gloo_ranks import run_on_gloo_ranks

DENSE = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, hidden_dim=96, max_seq_len=64)
E4M3_MAX = torch.finfo(torch.float8_e4m3fn).max


def _dense(seed: int = 0) -> nn.Module:
    model = qwen3(**DENSE)
    model.init_weights(seed=seed)
    return model


def test_decoder_linears_convert_and_keys_stay():
    model = _dense()
    keys, shapes = list(model.state_dict()), {k: v.shape for k, v in model.state_dict().items()}
    converted = apply_float8_training(model, "tensorwise", sharded=False, emulate=True)
    expected = [f"layers.{i}.{name}" for i in range(DENSE["n_layers"]) for name in
                ("attention.wq", "attention.wk", "attention.wv", "attention.wo",
                 "feed_forward.w1", "feed_forward.w3", "feed_forward.w2")]
    assert sorted(converted) == sorted(expected)
    float8 = {fqn for fqn, m in model.named_modules() if isinstance(m, Float8Linear)}
    assert float8 == set(expected)  # not the embedding, the LM head or anything outside the layers
    assert list(model.state_dict()) == keys
    assert {k: v.shape for k, v in model.state_dict().items()} == shapes


def test_moe_router_and_experts_stay():
    model = qwen3_moe(vocab_size=64, dim=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, num_experts=4,
                      moe_hidden_dim=16, num_experts_per_tok=2)
    keys = list(model.state_dict())
    converted = apply_float8_training(model, "rowwise", sharded=False, emulate=True)
    assert sorted(converted) == [f"layers.0.attention.{w}" for w in ("wk", "wo", "wq", "wv")]
    assert list(model.state_dict()) == keys


def test_linears_with_dims_scaled_mm_refuses_stay():
    assert is_fp8_linear(nn.Linear(64, 32, bias=False), "layers.0.attention.wq")
    assert not is_fp8_linear(nn.Linear(64, 24, bias=False), "layers.0.attention.wq")  # 24 % 16
    assert not is_fp8_linear(nn.Linear(64, 32, bias=False), "output")


def test_cpu_is_refused_naming_the_requirement():
    assert "compute capability >= 8.9" in fp8_device_problem(torch.device("cpu"))


def _e4m3(x: torch.Tensor, amax: torch.Tensor) -> torch.Tensor:
    """Dynamic quantize-dequantize, in float64 after the fp32 cast: scale = e4m3 max / amax (fp32), values
    saturated to the e4m3 range and rounded to e4m3, then divided by the scale again."""
    scale = E4M3_MAX / amax.float().clamp(min=1e-12)
    q = (x.float() * scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn)
    return q.double() / scale.double()


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_emulated_forward_is_the_quantize_dequantize_math(recipe):
    torch.manual_seed(0)
    linear = nn.Linear(64, 32, bias=False)
    x = torch.randn(24, 64) * torch.logspace(-2, 1, 24)[:, None]  # rows of very different ranges
    model = nn.ModuleDict({"layers": nn.ModuleDict({"0": copy.deepcopy(linear)})})
    apply_float8_training(model, recipe, sharded=False, emulate=True)
    out = model["layers"]["0"](x)
    w = linear.weight.detach()
    if recipe == "tensorwise":
        xq, wq = _e4m3(x, x.abs().amax()), _e4m3(w, w.abs().amax())
    else:  # one scale per row of the input and per output row of the weight, rounded down to a power of 2
        def pow2_amax(t: torch.Tensor) -> torch.Tensor:
            scale = torch.exp2(torch.floor(torch.log2(E4M3_MAX / t.abs().amax(-1, keepdim=True).float())))
            return E4M3_MAX / scale
        xq, wq = _e4m3(x, pow2_amax(x)), _e4m3(w, pow2_amax(w))
    reference = xq @ wq.T
    torch.testing.assert_close(out.double(), reference, rtol=1e-5, atol=1e-6)
    # and it is not the plain matmul: e4m3 keeps 3 mantissa bits
    assert not torch.allclose(out.double(), x.double() @ w.double().T, rtol=1e-3, atol=0)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise", "rowwise_with_gw_hp"])
def test_emulated_model_stays_close_to_plain(recipe):
    """e4m3 rounds each operand by at most 2^-4 relative (3 mantissa bits), e5m2 each output gradient by 2^-3:
    the hidden states stay within 2^-3 of the plain model's (relative L2) and the gradients within 2^-2."""
    plain = _dense()
    float8 = copy.deepcopy(plain)
    apply_float8_training(float8, recipe, sharded=False, emulate=True)
    ids = torch.randint(0, DENSE["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(1))
    expected, actual = plain.forward_hidden(ids), float8.forward_hidden(ids)
    assert (actual - expected).norm() / expected.norm() < 2**-3
    expected.square().mean().backward()
    actual.square().mean().backward()
    for (name, p), (_, q) in zip(plain.named_parameters(), float8.named_parameters()):
        if p.grad is not None:
            assert (q.grad - p.grad).norm() / p.grad.norm() < 2**-2, name


def _sharded_worker(rank: int, world: int, tmp_dir: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh

    from mirotrain.models.hf_weights import save_pretrained
    from mirotrain.parallel.float8 import attach_scale_precompute
    from mirotrain.parallel.fsdp import apply_fsdp

    mesh = init_device_mesh("cpu", (world,))
    local, sharded, plain = _dense(), _dense(), _dense()
    for model, is_sharded in ((local, False), (sharded, True)):
        apply_float8_training(model, "tensorwise", sharded=is_sharded, emulate=True)
    assert isinstance(sharded.layers[0].attention.wq.weight, WeightWithDynamicFloat8CastTensor)
    apply_fsdp(sharded, mesh, param_dtype=torch.float32)
    apply_fsdp(plain, mesh, param_dtype=torch.float32)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, fused=True) for m in (local, sharded)]  # as the trainer
    attach_scale_precompute(optimizers[1], sharded)
    ids = torch.randint(0, DENSE["vocab_size"], (1, 24), generator=torch.Generator().manual_seed(2))
    for _ in range(3):  # every rank the same rows: the averaged gradient is the local one
        losses = []
        for model, optimizer in zip((local, sharded), optimizers):
            loss = model.forward_hidden(ids).square().mean()
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    state = get_model_state_dict(sharded)
    assert list(state) == list(get_model_state_dict(plain))
    full = {k: v.full_tensor() for k, v in state.items()}
    assert all(type(t) is torch.Tensor and t.dtype == torch.float32 for t in full.values())
    for name, p in local.named_parameters():
        torch.testing.assert_close(full[name], p.detach(), rtol=1e-5, atol=1e-6)
    # a step checkpoint of the float8 model is one of the plain model: the plain model reads it as it is
    dcp.save({"model": state}, checkpoint_id=f"{tmp_dir}/dcp")
    target = {"model": get_model_state_dict(plain)}
    dcp.load(target, checkpoint_id=f"{tmp_dir}/dcp")
    for name, value in target["model"].items():
        assert torch.equal(value.full_tensor(), full[name]), name
    # and the HF export of the float8 model is the plain model's, file for file
    exports = {label: Path(tmp_dir, label) for label in ("fp8", "plain")}
    save_pretrained(sharded, exports["fp8"], dtype=torch.bfloat16)
    save_pretrained(plain, exports["plain"], dtype=torch.bfloat16)
    if rank == 0:
        files = sorted(p.name for p in exports["plain"].iterdir())
        assert sorted(p.name for p in exports["fp8"].iterdir()) == files and "model.safetensors" in files
        for name in files:
            assert (exports["fp8"] / name).read_bytes() == (exports["plain"] / name).read_bytes(), name


@pytest.mark.slow  # 2 processes in one gloo group
def test_fp8_all_gather_matches_unsharded_and_checkpoints_stay_plain(tmp_path):
    run_on_gloo_ranks(_sharded_worker, 2, tmp_path, str(tmp_path))
