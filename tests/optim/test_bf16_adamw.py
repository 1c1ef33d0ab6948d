"""The bf16 AdamW modes against a float64 AdamW when every update is far below a bf16 ulp of the weight.

Weights near 1 (bf16 ulp 2^-7, updates lost below ~0.004) take AdamW steps of ~lr = 1e-4; after 400 steps the
gradient scale drops tenfold, so a second moment that cannot decay in bf16 would shrink the steps tenfold too.
The compensated optimizer (weights and second moment) must follow the reference; torch's AdamW on bf16 weights (rounded to nearest) must
not move them at all.
"""

import math

import pytest
import torch

from mirotrain.optim.bf16_adamw import CompensatedAdamW, stochastic_round_bf16

N, STEPS, DROP_AT, LR, WD, BETAS, EPS = 512, 1200, 400, 1e-4, 0.01, (0.9, 0.999), 1e-8


def _gradients(seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(N, generator=gen) < 0.5, -1.0, 1.0)
    grads = []
    for t in range(STEPS):
        scale = 1.0 if t < DROP_AT else 0.1
        grads.append((scale * (sign + 0.3 * torch.randn(N, generator=gen))).bfloat16())
    return grads


def _reference(p0: torch.Tensor, grads: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """AdamW in float64, torch's formula (decoupled weight decay, bias-corrected moments): weights and second
    moment."""
    p, m, v = p0.double(), torch.zeros(N, dtype=torch.float64), torch.zeros(N, dtype=torch.float64)
    for t, g in enumerate(grads, start=1):
        g = g.double()
        p = p * (1 - LR * WD)
        m = BETAS[0] * m + (1 - BETAS[0]) * g
        v = BETAS[1] * v + (1 - BETAS[1]) * g * g
        denom = (v / (1 - BETAS[1] ** t)).sqrt() + EPS
        p = p - LR * (m / (1 - BETAS[0] ** t)) / denom
    return p, v


def _train(optimizer_cls, p0: torch.Tensor, grads: list[torch.Tensor], **kwargs) -> tuple[torch.Tensor, dict]:
    p = torch.nn.Parameter(p0.clone())
    opt = optimizer_cls([p], lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, **kwargs)
    for g in grads:
        p.grad = g.clone()
        opt.step()
    return p.detach(), opt.state[p]


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_compensated_adamw_follows_float64_where_plain_bf16_stays_stuck(compiled: bool):
    """Eager (flat buffers) and compiled (one kernel per shard) alike."""
    torch.manual_seed(0)
    p0 = (1 + 0.5 * torch.rand(N, generator=torch.Generator().manual_seed(1))).bfloat16()
    grads = _gradients()
    ref, ref_v = _reference(p0, grads)
    moved = (ref - p0.double()).abs().mean().item()
    assert moved > 10 * 2**-8  # the reference travels many half-ulps (2^-8 for weights in [1, 2))

    compensated, state = _train(CompensatedAdamW, p0, grads, compiled=compiled)
    assert {k: v.dtype for k, v in state.items()} == {"step": torch.float32, "exp_avg": torch.bfloat16,
                                                     "exp_avg_sq": torch.bfloat16, "compensation": torch.bfloat16}
    error = ((compensated.double() + state["compensation"].double()) - ref).abs().mean().item()
    assert error < 0.02 * moved, (error, moved)
    # the second moment decayed with the gradients (rounded to nearest it would stay ~2x too high)
    assert abs((state["exp_avg_sq"].double() / ref_v).mean().item() - 1) < 0.02
    assert (compensated.double() - ref).abs().mean().item() < 2**-8  # the bf16 weight itself: within half an ulp

    plain, _ = _train(torch.optim.AdamW, p0, grads, fused=True)
    assert torch.equal(plain, p0)  # every update rounded away
    assert (plain.double() - ref).abs().mean().item() > 0.99 * moved


def test_stochastic_rounding_is_unbiased_between_neighbours():
    torch.manual_seed(0)
    value = torch.full((200_000,), 1.0 + 0.3 * 2**-7)  # 30% of the way from 1.0 to the next bf16
    out = stochastic_round_bf16(value)
    assert set(out.float().unique().tolist()) == {1.0, 1.0 + 2**-7}
    assert math.isclose(out.double().mean().item(), float(value[0]), rel_tol=0, abs_tol=2e-5)
    assert torch.equal(value, torch.full_like(value, 1.0 + 0.3 * 2**-7))  # the input is left alone


def test_parameters_split_into_chunks_update_as_one_flat_buffer(monkeypatch):
    """Shards of several shapes are concatenated, updated and written back; a chunk limit that splits them into
    single parameters gives the same weights and state bit for bit (fp32 here: no random rounding)."""
    import mirotrain.optim.bf16_adamw as bf16_adamw

    gen = torch.Generator().manual_seed(2)
    shapes = [(7, 5), (3,), (4, 2, 3)]
    start = [torch.randn(s, generator=gen) for s in shapes]
    grads = [[torch.randn(s, generator=gen) for s in shapes] for _ in range(5)]

    def train() -> list[torch.Tensor]:
        params = [torch.nn.Parameter(t.clone()) for t in start]
        opt = CompensatedAdamW(params, lr=1e-2, weight_decay=0.1)
        for step in grads:
            for p, g in zip(params, step):
                p.grad = g.clone()
            opt.step()
        return [t for p in params for t in (p.detach(), *(v for k, v in opt.state[p].items() if k != "step"))]

    together = train()
    monkeypatch.setattr(bf16_adamw, "CHUNK_ELEMENTS", 1)
    apart = train()
    assert all(torch.equal(a, b) for a, b in zip(together, apart))
    assert not torch.equal(together[0], start[0])


def _train_bf16(offload_state: bool, steps: int = 6, compiled: bool = False, seed: int = 0
                ) -> tuple[list[torch.nn.Parameter], CompensatedAdamW]:
    """Two parameter groups of bf16 shards (one empty) updated ``steps`` times with fixed gradients, the default
    generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(4)
    shapes = [(7, 5), (3,), (0, 4), (4, 2, 3)]
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).bfloat16()) for s in shapes]
    opt = CompensatedAdamW([{"params": params[:2]}, {"params": params[2:], "weight_decay": 0.0}], lr=1e-2,
                           weight_decay=0.1, offload_state=offload_state, compiled=compiled)
    torch.manual_seed(seed)  # the stochastic rounding's bits
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen).bfloat16()
        opt.step()
    return params, opt


def test_offloaded_state_updates_bitwise_as_the_resident_state(monkeypatch):
    """offload_state keeps the moments and compensation in their own host tensors and streams them through the
    chunked update (mirotrain/optim/host_state.py); weights and state equal the resident run's bit for bit, with
    chunks of whole flat buffers and of single parameters."""
    import mirotrain.optim.bf16_adamw as bf16_adamw

    for chunk in (bf16_adamw.CHUNK_ELEMENTS, 1):
        monkeypatch.setattr(bf16_adamw, "CHUNK_ELEMENTS", chunk)
        (resident, ref), (offloaded, opt) = _train_bf16(False), _train_bf16(True)
        for p, q in zip(resident, offloaded):
            assert torch.equal(p, q)
            assert ref.state[p].keys() == opt.state[q].keys()
            for name, value in ref.state[p].items():
                assert opt.state[q][name].dtype == value.dtype and torch.equal(opt.state[q][name], value), name
    assert not torch.equal(opt.state[offloaded[0]]["compensation"], torch.zeros(7, 5, dtype=torch.bfloat16))


def test_loading_offloaded_state_copies_into_the_host_tensors():
    """torch's Optimizer.load_state_dict moves state to the parameter's device; with offload_state the loaded
    values are copied into the live host tensors instead (DCP's in-place load hands those same tensors back),
    and the run goes on as the uninterrupted one."""
    params, opt = _train_bf16(True, steps=3)
    live = {id(p): {k: v for k, v in opt.state[p].items() if k != "step"} for p in params}
    saved = {pid: {k: v.clone() for k, v in values.items()} for pid, values in opt.state_dict()["state"].items()}
    for values in opt.state.values():  # scribble: the load must bring the saved values back
        for name in ("exp_avg", "exp_avg_sq", "compensation"):
            values[name].fill_(3.0)
    opt.load_state_dict({"state": saved, "param_groups": opt.state_dict()["param_groups"]})
    for pid, p in enumerate(params):
        for name, tensor in live[id(p)].items():
            assert opt.state[p][name] is tensor and torch.equal(tensor, saved[pid][name]), name
        assert torch.equal(opt.state[p]["step"], saved[pid]["step"])


@pytest.mark.parametrize("offload_state", [False, True], ids=["per-shard", "offloaded-flat"])
def test_compiled_update_agrees_with_the_eager_one(offload_state: bool):
    """The compiled kernel (per shard; with offload_state on each streamed chunk's flat buffers) over two groups,
    one with no weight decay, and an empty shard, against the eager flat buffers: the same arithmetic but for the stochastic rounding's random bits. A second moment a few bf16 steps
    (2^-7 each) apart moves a step's update (~lr) by ~lr·2^-8 per step, so after 6 steps the weights plus their compensation
    agree within 6·lr·2^-8 (2.3e-4), below the bf16 ulp of most weights; a compensation lost to Inductor keeping
    the rounded weight in fp32 would be off by up to half an ulp."""
    (eager, ref), (compiled, opt) = _train_bf16(False), _train_bf16(offload_state, compiled=True)
    for p, q in zip(eager, compiled):
        assert opt.state[q].keys() == ref.state[p].keys() and q.dtype == torch.bfloat16
        exact_p = p.double() + ref.state[p]["compensation"].double()
        exact_q = q.double() + opt.state[q]["compensation"].double()
        assert torch.allclose(exact_q, exact_p, rtol=0, atol=6 * 1e-2 * 2**-8), (exact_q - exact_p).abs().max()
        assert torch.equal(opt.state[q]["exp_avg"], ref.state[p]["exp_avg"])
        v_p, v_q = ref.state[p]["exp_avg_sq"].double(), opt.state[q]["exp_avg_sq"].double()
        # each step's stochastic rounding may land one bf16 step (2^-7) apart, and v keeps ~all of its past
        assert torch.allclose(v_q, v_p, rtol=6 * 2**-7, atol=0)
    assert opt.state[compiled[0]]["compensation"].abs().max() > 0


def test_compiled_step_takes_its_random_bits_from_the_default_generator():
    """The compiled kernel seeds its stochastic rounding from torch's default generator at every call (none of it
    fixed when the kernel is built), so the generator state that step checkpoints restore decides the bits: the
    same seed repeats the second moment bit for bit, another seed changes it."""
    (first, a), (again, b), (other, c) = (_train_bf16(False, compiled=True, seed=seed) for seed in (0, 0, 1))
    for p, q, r in zip(first, again, other):
        assert torch.equal(p, q)
        assert all(torch.equal(a.state[p][name], b.state[q][name]) for name in a.state[p])
    assert not torch.equal(a.state[first[0]]["exp_avg_sq"], c.state[other[0]]["exp_avg_sq"])


def test_compiled_step_builds_one_kernel_for_shards_of_every_length():
    """One graph with a symbolic length serves every shard of two elements or more (a Qwen3 layer's norms,
    projections and embedding alike). A graph per length would soon reach Dynamo's recompile limit (8 per
    function), past which the update silently runs eager, slower and with other random bits."""
    from torch._dynamo.utils import counters

    from mirotrain.optim.bf16_adamw import compiled_compensated_adamw

    step = compiled_compensated_adamw()
    coefficients = torch.tensor([-1e-3, 0.05, 1e-5])

    def call(n: int) -> None:
        weight, grad = torch.randn(n).bfloat16(), torch.randn(n).bfloat16()
        step(weight, grad, *(torch.zeros(n, dtype=torch.bfloat16) for _ in range(3)), coefficients, 0.9, 0.999,
             1e-8, torch.bfloat16)

    call(16)  # builds the graph unless an earlier test did
    built = counters["stats"]["unique_graphs"]
    for n in (2, 3, 64, 128 * 3, 1024 * 2048 // 64, 151936 * 1024 // 1024):
        call(n)
    assert counters["stats"]["unique_graphs"] == built
