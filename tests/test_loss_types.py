"""The loss types of a pair's implicit-reward margin (mrpo.margin_loss): sigmoid (DPO, cDPO), IPO, hinge, robust (rDPO).

Checked against independent formulas in plain Python (math module) at fixed inputs, values and gradients; sigmoid
with no smoothing is the DPO loss exactly, bit for bit, values and gradients; and every loss type reaches every
multi-reference loss: against one reference MRPO and Mean-Ref give the DPO loss of that type, and Multi-DPO is the
alpha-weighted sum of its per-reference terms.
"""

import math

import pytest
import torch
import torch.nn.functional as F

import mrpo

H = [-30.0, -2.5, -0.3, 0.0, 0.4, 1.7, 12.0]  # margins h = log-ratio(y_w) - log-ratio(y_l), in nats
BETA = 0.1


def log_sigmoid(x):
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def reference(h, loss_type, eps):
    """The published formulas, written out for one pair."""
    z = BETA * h
    if loss_type == "sigmoid":
        return -(1 - eps) * log_sigmoid(z) - eps * log_sigmoid(-z)
    if loss_type == "ipo":
        return (h - 1 / (2 * BETA)) ** 2
    if loss_type == "hinge":
        return max(0.0, 1 - z)
    return (-(1 - eps) * log_sigmoid(z) + eps * log_sigmoid(-z)) / (1 - 2 * eps)


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.0), ("sigmoid", 0.1), ("sigmoid", 0.3), ("ipo", 0.0),
                                            ("hinge", 0.0), ("robust", 0.0), ("robust", 0.1), ("robust", 0.3)])
def test_each_loss_type_is_its_formula(loss_type, eps):
    h = torch.tensor(H, dtype=torch.float64, requires_grad=True)
    losses = mrpo.margin_loss(h, BETA, loss_type, eps)
    want = [reference(x, loss_type, eps) for x in H]
    assert losses.tolist() == pytest.approx(want, rel=1e-12, abs=1e-12)
    grad, = torch.autograd.grad(losses.sum(), h)
    step = 1e-6  # central differences of the plain-Python formula
    numeric = [(reference(x + step, loss_type, eps) - reference(x - step, loss_type, eps)) / (2 * step) for x in H]
    assert grad.tolist() == pytest.approx(numeric, rel=1e-5, abs=1e-8)


def test_sigmoid_without_smoothing_is_dpo_bit_for_bit():
    g = torch.Generator().manual_seed(0)
    pc, pr, rc, rr = (-torch.rand(16, generator=g, dtype=torch.float32) * 200 for _ in range(4))
    pc.requires_grad_(True)
    plain = -F.logsigmoid(BETA * ((pc - rc) - (pr - rr)))  # Eq. 5 as written
    losses, _, _ = mrpo.dpo_loss(pc, pr, rc, rr, BETA, "sigmoid", 0.0)
    assert torch.equal(losses, plain)
    assert torch.equal(torch.autograd.grad(losses.sum(), pc)[0], torch.autograd.grad(plain.sum(), pc)[0])


@pytest.mark.parametrize("loss_type, eps", [("sigmoid", 0.2), ("ipo", 0.0), ("hinge", 0.0), ("robust", 0.2)])
def test_every_multi_reference_loss_takes_the_loss_type(loss_type, eps):
    g = torch.Generator().manual_seed(1)
    pc, pr = (-torch.rand(8, generator=g, dtype=torch.float64) * 50 for _ in range(2))
    rc, rr = (-torch.rand(3, 8, generator=g, dtype=torch.float64) * 50 for _ in range(2))
    dpo, _, _ = mrpo.dpo_loss(pc, pr, rc[0], rr[0], BETA, loss_type, eps)
    for name in ("mrpo", "mean_ref", "multi_dpo"):  # one reference: each is DPO of that type
        one, _, _ = mrpo.compute_loss(name, pc, pr, rc[:1], rr[:1], BETA, loss_type=loss_type, label_smoothing=eps)
        torch.testing.assert_close(one, dpo, rtol=1e-12, atol=1e-12)
    alpha = torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64)
    multi, _, _ = mrpo.multi_dpo_loss(pc, pr, rc, rr, BETA, alpha=alpha, clip=False, loss_type=loss_type,
                                      label_smoothing=eps)
    terms = [mrpo.dpo_loss(pc, pr, rc[k], rr[k], BETA, loss_type, eps)[0] for k in range(3)]
    torch.testing.assert_close(multi, sum(a * t for a, t in zip(alpha, terms)), rtol=1e-12, atol=1e-12)
    default, _, _ = mrpo.mrpo_loss(pc, pr, rc, rr, BETA)
    typed, _, _ = mrpo.mrpo_loss(pc, pr, rc, rr, BETA, loss_type=loss_type, label_smoothing=eps)
    assert not torch.allclose(default, typed)  # the type reached the loss


def test_bad_loss_type_or_smoothing_is_refused():
    h = torch.zeros(2)
    for loss_type, eps in (("exo", 0.0), ("sigmoid", 0.5), ("robust", -0.1), ("ipo", 0.1), ("hinge", 0.2)):
        with pytest.raises(ValueError):
            mrpo.margin_loss(h, BETA, loss_type, eps)
