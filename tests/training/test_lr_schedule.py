"""get_cosine_schedule_with_warmup: the formula at warm-up, peak and end; no rise after the planned total."""

import math

import pytest
import torch

from mirotrain.training import get_cosine_schedule_with_warmup


def _lrs(total, steps, **kw):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
    sched = get_cosine_schedule_with_warmup(opt, num_training_steps=total, **kw)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_peak_and_end_follow_the_formula():
    total, ratio = 100, 0.1
    lrs = _lrs(total, total, warmup_ratio=ratio, num_cycles=0.5)
    warmup = int(ratio * total)
    assert lrs[0] == 0.0
    assert lrs[5] == pytest.approx(2.0 * 5 / warmup)
    assert lrs[warmup] == pytest.approx(2.0)  # peak right after warm-up
    t = 60
    p = (t - warmup) / (total - warmup)
    assert lrs[t] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * p)))
    assert lrs[total - 1] == pytest.approx(2.0 * 0.5 * (1 + math.cos(math.pi * (total - 1 - warmup) / (total - warmup))))


def test_never_rises_after_the_planned_total_and_respects_the_floor():
    lrs = _lrs(50, 80, warmup_ratio=0.1, num_cycles=0.5, min_lr_ratio=0.1)
    tail = lrs[50:]
    assert all(v == pytest.approx(0.2) for v in tail)  # floor = 0.1 × base, flat past the end
    assert all(b <= a + 1e-12 for a, b in zip(lrs[5:], lrs[6:]))  # monotone after warm-up


def test_state_dict_round_trip_resumes_the_same_values():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = get_cosine_schedule_with_warmup(opt, num_training_steps=20, warmup_ratio=0.2)
    for _ in range(7):
        opt.step()
        sched.step()
    state = sched.state_dict()
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched2 = get_cosine_schedule_with_warmup(opt2, num_training_steps=20, warmup_ratio=0.2)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = opt.param_groups[0]["lr"]
    for _ in range(5):
        opt.step(), sched.step(), opt2.step(), sched2.step()
        assert opt.param_groups[0]["lr"] == opt2.param_groups[0]["lr"]


def test_bad_arguments_are_rejected():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    with pytest.raises(ValueError, match="warmup_ratio"):
        get_cosine_schedule_with_warmup(opt, num_training_steps=10, warmup_ratio=1.5)
    with pytest.raises(ValueError, match="num_training_steps"):
        get_cosine_schedule_with_warmup(opt, num_training_steps=0)
