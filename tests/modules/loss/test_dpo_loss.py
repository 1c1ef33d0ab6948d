"""DPOLoss against an independent float64 implementation of the published formulas (<= 1e-6)."""

from __future__ import annotations

import math

import pytest
import torch

from mirotrain.config import instantiate
from mirotrain.modules.loss.dpo import LOSS_TYPES, DPOLoss


def _logsig(x: float) -> float:
    # numerically stable log(sigmoid(x)) in float64
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference_losses(pc, pr, rc, rr, n_c, beta, eps, types, delta_state):
    """Plain-Python float64 per-pair losses; ``delta_state`` = [sum, count] of all rewards seen so far."""
    out = {t: [] for t in types}
    rew_c = [beta * (a - b) for a, b in zip(pc, rc)]
    rew_r = [beta * (a - b) for a, b in zip(pr, rr)]
    if "bco_pair" in types:
        delta_state[0] += sum(rew_c) + sum(rew_r)
        delta_state[1] += len(rew_c) + len(rew_r)
        delta = delta_state[0] / delta_state[1]
    for i in range(len(pc)):
        z = (pc[i] - pr[i]) - (rc[i] - rr[i])
        for t in types:
            if t == "sigmoid":
                v = -(1 - eps) * _logsig(beta * z) - eps * _logsig(-beta * z)
            elif t == "ipo":
                v = (z - 1 / (2 * beta)) ** 2
            elif t == "hinge":
                v = max(0.0, 1 - beta * z)
            elif t == "bco_pair":
                v = -_logsig(rew_c[i] - delta) - _logsig(-(rew_r[i] - delta))
            else:
                v = -pc[i] / n_c[i]
            out[t].append(v)
    return out, rew_c, rew_r


def _batch(seed: int, pairs: int = 7):
    g = torch.Generator().manual_seed(seed)
    pc = -torch.rand(pairs, generator=g, dtype=torch.float64) * 80 - 5
    pr = -torch.rand(pairs, generator=g, dtype=torch.float64) * 80 - 5
    rc = pc + torch.randn(pairs, generator=g, dtype=torch.float64) * 6
    rr = pr + torch.randn(pairs, generator=g, dtype=torch.float64) * 6
    n = torch.randint(1, 60, (pairs,), generator=g)
    return pc, pr, rc, rr, n


CONFIGS = [{t: 1.0} for t in LOSS_TYPES] + [
    {"sigmoid": 1.0, "sft": 0.1},
    {"sigmoid": 0.5, "ipo": 0.25, "hinge": 2.0, "bco_pair": 0.7, "sft": 0.3},
]


@pytest.mark.parametrize("loss_config", CONFIGS, ids=lambda c: "+".join(c))
@pytest.mark.parametrize("beta,eps", [(0.1, 0.0), (0.5, 0.2)])
def test_matches_float64_formulas(loss_config, beta, eps):
    loss_fn = DPOLoss(beta=beta, label_smoothing=eps, loss_config=loss_config)
    delta_state = [0.0, 0.0]
    for step in range(3):  # several steps: bco_pair's running mean carries over
        pc, pr, rc, rr, n = _batch(step)
        out = loss_fn(pc.float(), pr.float(), rc.float(), rr.float(), chosen_token_counts=n)
        # the float64 reference sees exactly the fp32 inputs the loss saw
        args = [t.float().double().tolist() for t in (pc, pr, rc, rr)]
        ref, rew_c, rew_r = reference_losses(*args, n.tolist(), beta, eps, list(loss_config), delta_state)
        total = [sum(w * ref[t][i] for t, w in loss_config.items()) for i in range(len(pc))]
        torch.testing.assert_close(out.pair_losses.double(), torch.tensor(total, dtype=torch.float64),
                                   atol=1e-6, rtol=1e-6)
        assert abs(float(out.loss) - sum(total) / len(total)) <= 1e-6 * max(1.0, abs(sum(total) / len(total)))
        for t in loss_config:
            torch.testing.assert_close(out.components[t].double(), torch.tensor(ref[t], dtype=torch.float64),
                                       atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(out.chosen_rewards.double(), torch.tensor(rew_c, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        torch.testing.assert_close(out.rejected_rewards.double(), torch.tensor(rew_r, dtype=torch.float64),
                                   atol=1e-6, rtol=0)
        m = out.metrics()
        acc = sum(a > b for a, b in zip(rew_c, rew_r)) / len(rew_c)
        margin = sum(a - b for a, b in zip(rew_c, rew_r)) / len(rew_c)
        assert m["rewards/accuracies"] == pytest.approx(acc, abs=1e-6)
        assert m["rewards/margins"] == pytest.approx(margin, abs=1e-6)
        assert m["rewards/chosen"] == pytest.approx(sum(rew_c) / len(rew_c), abs=1e-6)
        assert m["rewards/rejected"] == pytest.approx(sum(rew_r) / len(rew_r), abs=1e-6)
        assert m["logps/chosen"] == pytest.approx(sum(args[0]) / len(rew_c), rel=1e-6)
        assert m["logps/rejected"] == pytest.approx(sum(args[1]) / len(rew_c), rel=1e-6)
        for t in loss_config:
            assert m[f"loss/{t}"] == pytest.approx(sum(ref[t]) / len(ref[t]), rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("loss_config", CONFIGS, ids=lambda c: "+".join(c))
def test_gradients_match_float64_autograd(loss_config):
    """d loss / d policy log-probs equals float64 autograd of the same formulas."""
    pc, pr, rc, rr, n = _batch(11)
    p32 = [pc.float().requires_grad_(), pr.float().requires_grad_()]
    out = DPOLoss(beta=0.2, label_smoothing=0.1, loss_config=loss_config)(*p32, rc.float(), rr.float(), n)
    out.loss.backward()
    p64 = [pc.float().double().requires_grad_(), pr.float().double().requires_grad_()]
    rc64, rr64 = rc.float().double(), rr.float().double()
    ref = DPOLoss(beta=0.2, label_smoothing=0.1, loss_config=loss_config)
    # float64 path through torch for gradients only (values were checked against plain Python above)
    z = (p64[0] - rc64) - (p64[1] - rr64)
    beta, eps = 0.2, 0.1
    rwc, rwr = beta * (p64[0] - rc64), beta * (p64[1] - rr64)
    delta = (rwc.detach().sum() + rwr.detach().sum()) / (2 * len(pc))
    terms = {
        "sigmoid": -(1 - eps) * torch.nn.functional.logsigmoid(beta * z) - eps * torch.nn.functional.logsigmoid(-beta * z),
        "ipo": (z - 1 / (2 * beta)) ** 2,
        "hinge": torch.relu(1 - beta * z),
        "bco_pair": -torch.nn.functional.logsigmoid(rwc - delta) - torch.nn.functional.logsigmoid(-(rwr - delta)),
        "sft": -p64[0] / n.double(),
    }
    total = sum(w * terms[t] for t, w in ref.loss_config.items()).mean()
    total.backward()
    for a, b in zip(p32, p64):
        ga = torch.zeros_like(b) if a.grad is None else a.grad.double()
        gb = torch.zeros_like(b) if b.grad is None else b.grad
        torch.testing.assert_close(ga, gb, atol=1e-6, rtol=1e-5)


def test_unknown_type_names_it():
    with pytest.raises(ValueError, match="kto_pair"):
        DPOLoss(loss_config={"sigmoid": 1.0, "kto_pair": 1.0})


def test_sft_needs_counts():
    with pytest.raises(ValueError, match="chosen_token_counts"):
        DPOLoss(loss_config={"sft": 1.0})(*torch.zeros(4, 3))


def test_registry_names_build_it():
    for name in ("mirotrain.modules.loss.DPOLoss", "torchtune.rlhf.loss.DPOLoss"):
        loss = instantiate({"_component_": name, "beta": 0.1, "label_smoothing": 0.0, "loss_config": {"sigmoid": 1.0}})
        assert isinstance(loss, DPOLoss) and loss.loss_config == {"sigmoid": 1.0}


def test_bco_running_mean_is_in_state_dict():
    a = DPOLoss(loss_config={"bco_pair": 1.0})
    pc, pr, rc, rr, n = _batch(3)
    a(pc.float(), pr.float(), rc.float(), rr.float())
    b = DPOLoss(loss_config={"bco_pair": 1.0})
    b.load_state_dict(a.state_dict())
    pc, pr, rc, rr, n = _batch(4)
    oa, ob = a(pc.float(), pr.float(), rc.float(), rr.float()), b(pc.float(), pr.float(), rc.float(), rr.float())
    assert torch.equal(oa.pair_losses, ob.pair_losses) and oa.metrics() == ob.metrics()
