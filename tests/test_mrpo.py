"""Property tests of mrpo.py: identities (K=1, eps=0, identical references, policy = reference), an independent
float64 re-derivation of the virtual reference, CTRO and ARWC invariants, and Proposition 2 with its exact
conditions, a bound under CTRO and a pinned counterexample to the printed statement."""

import math

import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import mrpo
from precompute import parse_alpha

settings.register_profile("mrpo", deadline=None, max_examples=150)
settings.load_profile("mrpo")

LOGP = st.floats(-1e4, 0.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
BETA = st.floats(1e-3, 5.0)
LOSS_NAMES = ["mrpo", "multi_dpo", "mean_ref"]


@st.composite
def batches(draw, k_min=1, k_max=8):
    """Policy (B,) and reference (K, B) log-probs in [-1e4, 0], float64, with random weights alpha (K,)."""
    K, B = draw(st.integers(k_min, k_max)), draw(st.integers(1, 16))
    vec = lambda n: draw(st.lists(LOGP, min_size=n, max_size=n))  # noqa: E731
    t = lambda rows: torch.tensor(rows, dtype=torch.float64)  # noqa: E731
    alpha = t([draw(st.floats(0.01, 1.0)) for _ in range(K)])
    return dict(pc=t(vec(B)), pr=t(vec(B)), rc=t([vec(B) for _ in range(K)]), rr=t([vec(B) for _ in range(K)]),
                alpha=alpha / alpha.sum(), beta=draw(BETA))


def with_grad(x):
    return x.clone().requires_grad_(True)


def loss_and_grads(name, b, **kw):
    """Summed loss and its gradient w.r.t. the policy log-probs."""
    pc, pr = with_grad(b["pc"]), with_grad(b["pr"])
    losses, rc, rr = mrpo.compute_loss(name, pc, pr, b["rc"], b["rr"], b["beta"], **kw)
    losses.sum().backward()
    return losses.detach(), pc.grad, pr.grad, rc, rr


def close(a, b, **kw):
    torch.testing.assert_close(a, b, rtol=kw.get("rtol", 1e-9), atol=kw.get("atol", 1e-9))


# --------------------------------------------------------------------------------------------------------------
# Identities


@given(batches(k_min=1, k_max=1), st.sampled_from(["arwc", "uniform"]), st.booleans())
def test_k1_mrpo_equals_dpo_values_and_gradients(b, alpha, clip):
    got = loss_and_grads("mrpo", b, alpha=alpha, clip=clip)
    want = loss_and_grads("dpo", b)
    for g, w in zip(got, want):
        close(g, w)


@given(batches(), st.sampled_from(["arwc", "uniform", "given"]), st.sampled_from(["eps", "eps_max"]))
def test_eps_zero_mrpo_equals_dpo_against_reference_1(b, alpha, zero):
    """A fixed eps = 0, or the adaptive eps (Eq. 9) with eps_max = 0, collapses every reference onto reference 1."""
    alpha = b["alpha"] if alpha == "given" else alpha
    got = loss_and_grads("mrpo", b, alpha=alpha, **{zero: 0.0})
    want = loss_and_grads("dpo", b)
    for g, w in zip(got, want):
        close(g, w, rtol=1e-7, atol=1e-7)


@given(batches(), st.sampled_from(LOSS_NAMES), st.sampled_from(["arwc", "uniform", "given"]), st.booleans())
def test_identical_references_reduce_every_loss_to_dpo(b, name, alpha, clip):
    K = b["rc"].shape[0]
    b = dict(b, rc=b["rc"][:1].expand(K, -1), rr=b["rr"][:1].expand(K, -1))
    alpha = b["alpha"] if alpha == "given" else alpha
    got = loss_and_grads(name, b, alpha=alpha, clip=clip)
    want = loss_and_grads("dpo", b)
    for g, w in zip(got, want):
        close(g, w, rtol=1e-7, atol=1e-7)


def virtual_pair_py(chosen, rejected, alpha, eps_max):
    """The virtual reference of one pair in plain Python floats, from the paper's equations, not mrpo's helpers:
    alpha by Eq. 10 (or 1/K) and eps by Eq. 9 on the raw log-probs, CTRO (Eq. 8) on references k > 1, Prop. 1."""
    K = len(chosen)
    if alpha == "uniform":
        weights = [1 / K] * K
    else:
        confidence = [abs(c - r) for c, r in zip(chosen, rejected)]
        weights = [x / sum(confidence) for x in confidence] if sum(confidence) > 0 else [1 / K] * K
    mass_w, mass_l = abs(sum(chosen)), abs(sum(rejected))
    share_w = mass_w / (mass_w + mass_l) if mass_w + mass_l > 0 else 0.5
    out = []
    for logps, eps in ((chosen, eps_max * share_w), (rejected, eps_max * (1 - share_w))):
        low, high = (1 + eps) * logps[0], (1 - eps) * logps[0]
        clipped = [logps[0]] + [min(max(x, low), high) for x in logps[1:]]
        out.append(harmonic_logp(clipped, weights))
    return out


@given(batches(), st.sampled_from(["arwc", "uniform", "given"]), st.sampled_from([None, 0.0, 0.2]), st.booleans(),
       st.sampled_from(mrpo.LOSS_TYPES), st.floats(0.0, 1.0))
def test_mrpo_is_dpo_against_virtual_reference_pair(b, alpha, eps, clip, loss_type, eps_max):
    """The references reach MRPO only through virtual_reference_pair, so DPO against that pair is MRPO bit for bit,
    values and gradients (what precompute.py --export-trl hands to TRL); the pair carries no gradient."""
    kw = dict(alpha=b["alpha"] if alpha == "given" else alpha, eps_max=eps_max, eps=eps, clip=clip)
    rc, rr = with_grad(b["rc"]), with_grad(b["rr"])
    virtual_chosen, virtual_rejected = mrpo.virtual_reference_pair(rc, rr, **kw)
    assert virtual_chosen.shape == virtual_rejected.shape == b["pc"].shape and not virtual_chosen.requires_grad
    got = loss_and_grads("mrpo", b, loss_type=loss_type, **kw)
    want = loss_and_grads("dpo", dict(b, rc=virtual_chosen[None], rr=virtual_rejected[None]), loss_type=loss_type)
    for g, w in zip(got, want):
        assert torch.equal(g, w)


@given(batches(), st.sampled_from(["arwc", "uniform"]), st.floats(0.0, 1.0))
def test_policy_equal_to_virtual_reference_gives_ln2_and_zero_rewards(b, alpha, eps_max):
    pairs = [virtual_pair_py(c, r, alpha, eps_max) for c, r in zip(b["rc"].T.tolist(), b["rr"].T.tolist())]
    pc = torch.tensor([w for w, _ in pairs], dtype=torch.float64)
    pr = torch.tensor([l for _, l in pairs], dtype=torch.float64)
    losses, rc, rr = mrpo.mrpo_loss(pc, pr, b["rc"], b["rr"], b["beta"], alpha=alpha, eps_max=eps_max)
    close(losses, torch.full_like(losses, math.log(2)), rtol=1e-9, atol=1e-9 * (1 + b["beta"]))
    close(rc, torch.zeros_like(rc), rtol=0, atol=1e-11 * b["beta"] * (1 + pc.abs().max().item()))
    close(rr, torch.zeros_like(rr), rtol=0, atol=1e-11 * b["beta"] * (1 + pr.abs().max().item()))


def test_dpo_sanity_value():
    z = torch.tensor([-12.0, -3.5])
    losses, rc, rr = mrpo.dpo_loss(z, z - 1, z, z - 1, beta=0.1)
    close(losses, torch.full((2,), math.log(2)), rtol=1e-6, atol=1e-6)
    assert rc.abs().max() == 0 and rr.abs().max() == 0


# --------------------------------------------------------------------------------------------------------------
# The virtual reference against an independent computation


def harmonic_logp(ref_logps, alpha):
    """log (sum_k alpha_k / pi_k)^-1 in plain Python float64, with a manual max shift."""
    terms = [math.log(a) - r for a, r in zip(alpha, ref_logps) if a > 0]
    top = max(terms)
    return -(top + math.log(sum(math.exp(t - top) for t in terms)))


@given(batches())
def test_virtual_reference_matches_float64_harmonic_mean_and_lies_between_min_and_max(b):
    got = mrpo.virtual_reference_logps(b["rc"], b["alpha"])
    a = b["alpha"].tolist()
    want = torch.tensor([harmonic_logp(col, a) for col in b["rc"].T.tolist()], dtype=torch.float64)
    close(got, want, rtol=1e-12, atol=1e-9)
    assert bool((got >= b["rc"].min(0).values - 1e-9).all())
    assert bool((got <= b["rc"].max(0).values + 1e-9).all())
    # Dominated by the least likely reference: log pi_tilde <= min_k (log pi_k - log alpha_k).
    assert bool((got <= (b["rc"] - b["alpha"].log()[:, None]).min(0).values + 1e-9).all())


@given(batches(k_min=2))
def test_zero_weight_drops_a_reference(b):
    alpha = b["alpha"].clone()
    alpha[-1] = 0.0
    alpha = alpha / alpha.sum()
    close(mrpo.virtual_reference_logps(b["rc"], alpha), mrpo.virtual_reference_logps(b["rc"][:-1], alpha[:-1]))


@given(batches())
def test_float32_agrees_with_float64(b):
    # Inputs on a 1e-3 grid: a margin like 1e-45 would give an alpha that float32 flushes to 0, a real but
    # different effect (Mean-Ref is sensitive to tiny weights) from the rounding this test measures.
    f32 = {k: ((v * 1e3).round() / 1e3).float() if torch.is_tensor(v) else v for k, v in b.items()}
    f64 = {k: (v.double() if torch.is_tensor(v) else v) for k, v in f32.items()}  # same inputs, exactly
    for name in ["dpo"] + LOSS_NAMES:
        lo32 = mrpo.compute_loss(name, f32["pc"], f32["pr"], f32["rc"], f32["rr"], b["beta"])[0]
        lo64 = mrpo.compute_loss(name, f64["pc"], f64["pr"], f64["rc"], f64["rr"], b["beta"])[0]
        assert lo32.dtype == torch.float32
        # float32 carries ~1e-3 nats of rounding at |log p| ~ 1e4; the logit scales it by beta.
        torch.testing.assert_close(lo32.double(), lo64, rtol=1e-5, atol=2e-2 * b["beta"] + 1e-5)


# --------------------------------------------------------------------------------------------------------------
# CTRO (Eq. 8) and the adaptive eps (Eq. 9)


@given(batches(), st.floats(0.0, 2.0))
def test_ctro_region_idempotent_and_reference_1_untouched(b, eps):
    clipped = mrpo.ctro_clip(b["rc"], eps)
    ref1 = b["rc"][0]
    assert torch.equal(clipped[0], ref1)
    assert bool((clipped >= (1 + eps) * ref1 - 1e-9).all()) and bool((clipped <= (1 - eps) * ref1 + 1e-9).all())
    assert torch.equal(mrpo.ctro_clip(clipped, eps), clipped)
    inside = (b["rc"] >= (1 + eps) * ref1) & (b["rc"] <= (1 - eps) * ref1)
    assert torch.equal(clipped[inside], b["rc"][inside])  # references already inside are not moved


@given(batches())
def test_ctro_eps_zero_collapses_onto_reference_1(b):
    clipped = mrpo.ctro_clip(b["rc"], 0.0)
    assert torch.equal(clipped, b["rc"][:1].expand_as(b["rc"]))


@given(batches(), st.floats(0.0, 1.0))
def test_adaptive_eps_shares_eps_max_by_log_prob_mass(b, eps_max):
    eps_w, eps_l = mrpo.adaptive_eps(b["rc"], b["rr"], eps_max)
    close(eps_w + eps_l, torch.full_like(eps_w, eps_max))
    mw, ml = b["rc"].sum(0).abs(), b["rr"].sum(0).abs()
    nonzero = (mw + ml) > 0
    close(eps_w[nonzero], eps_max * mw[nonzero] / (mw + ml)[nonzero])


def test_adaptive_eps_all_zero_pair_splits_evenly():
    zeros = torch.zeros(3, 2)
    eps_w, eps_l = mrpo.adaptive_eps(zeros, zeros, 0.1)
    close(eps_w, torch.full((2,), 0.05)), close(eps_l, torch.full((2,), 0.05))


def test_ctro_maps_minus_inf_of_other_references_into_the_region_but_losses_refuse_it():
    ref = torch.tensor([[-10.0], [-math.inf]])
    assert mrpo.ctro_clip(ref, 0.1)[1].item() == pytest.approx(-11.0)
    policy = torch.tensor([-5.0])
    for name in LOSS_NAMES:
        with pytest.raises(ValueError, match="finite"):
            mrpo.compute_loss(name, policy, policy, ref, ref - 1, 0.1)


# --------------------------------------------------------------------------------------------------------------
# ARWC (Eq. 10)


@given(batches(), st.randoms(use_true_random=False))
def test_arwc_weights_are_a_distribution_and_permutation_equivariant(b, rnd):
    alpha = mrpo.arwc_weights(b["rc"], b["rr"])
    assert bool((alpha >= 0).all())
    close(alpha.sum(0), torch.ones(alpha.shape[1], dtype=alpha.dtype))
    margins = (b["rc"] - b["rr"]).abs()
    denominators = margins.sum(0)
    ok = denominators > 0
    close(alpha[:, ok], margins[:, ok] / denominators[ok])
    perm = list(range(alpha.shape[0]))
    rnd.shuffle(perm)
    close(mrpo.arwc_weights(b["rc"][perm], b["rr"][perm]), alpha[perm])


def test_arwc_uniform_for_zero_margins_and_carries_no_gradient():
    rc = torch.tensor([[-3.0, -1.0], [-7.0, -2.0], [-5.0, -4.0]], requires_grad=True)
    alpha = mrpo.arwc_weights(rc, rc.detach().clone())
    close(alpha, torch.full((3, 2), 1 / 3))
    assert not alpha.requires_grad


def test_given_alpha_is_validated_and_normalised():
    rc, rr = torch.full((2, 3), -5.0), torch.full((2, 3), -6.0)
    close(mrpo.resolve_alpha([1.0, 3.0], rc, rr), torch.tensor([[0.25] * 3, [0.75] * 3]))
    with pytest.raises(ValueError, match="K=2"):
        mrpo.resolve_alpha([1.0, 1.0, 1.0], rc, rr)
    with pytest.raises(ValueError, match="non-negative"):
        mrpo.resolve_alpha([1.0, -1.0], rc, rr)
    with pytest.raises(ValueError, match="arwc"):
        mrpo.resolve_alpha("harmonic", rc, rr)
    with pytest.raises(ValueError, match="unknown loss"):
        mrpo.compute_loss("ipo", rc[0], rr[0], rc, rr, 0.1)


# --------------------------------------------------------------------------------------------------------------
# Gradients at extreme inputs


@pytest.mark.parametrize("name", ["dpo"] + LOSS_NAMES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gradients_finite_at_extreme_inputs(name, dtype):
    extremes = torch.tensor([-1e4, 0.0, -1e-8, -5e3], dtype=dtype)
    pc, pr = with_grad(extremes), with_grad(extremes.flip(0))
    rc = torch.stack([extremes.flip(0), extremes, torch.zeros_like(extremes)])
    rr = torch.stack([extremes, extremes.flip(0), torch.full_like(extremes, -1e4)])
    losses, _, _ = mrpo.compute_loss(name, pc, pr, rc, rr, beta=5.0)
    losses.sum().backward()
    assert bool(torch.isfinite(losses).all())
    assert bool(torch.isfinite(pc.grad).all()) and bool(torch.isfinite(pr.grad).all())


# --------------------------------------------------------------------------------------------------------------
# Proposition 2: |grad MRPO| vs |grad Multi-DPO| when every d_k = beta (m_k - h) has the same sign


@st.composite
def same_sign_batches(draw, sign):
    """References drawn freely; the policy margin h placed so that every d_k has the given sign (or is 0)."""
    b = draw(batches(k_min=1, k_max=8))
    margins = b["rc"] - b["rr"]  # m_k, (K, B)
    offset = torch.tensor(draw(st.lists(st.floats(0.0, 50.0), min_size=margins.shape[1],
                                        max_size=margins.shape[1])), dtype=torch.float64)
    h = margins.min(0).values - offset if sign > 0 else margins.max(0).values + offset
    b["pr"] = b["pc"] - h  # policy margin log pi(y_w) - log pi(y_l) = h
    return b


def grad_magnitudes(b, clip, alpha=None):
    """|dL/d log pi(y_w)| per example for MRPO and Multi-DPO (equal to beta * sigma(d) terms)."""
    kw = dict(alpha=b["alpha"] if alpha is None else alpha, clip=clip)
    g_mrpo = loss_and_grads("mrpo", b, **kw)[1].abs()
    g_multi = loss_and_grads("multi_dpo", b, **kw)[1].abs()
    return g_mrpo, g_multi


@given(same_sign_batches(+1), st.sampled_from([+1, -1]))
def test_prop2_holds_exactly_for_the_geometric_mean_reference(b, sign):
    if sign < 0:  # mirror: make every d_k <= 0
        h = (b["rc"] - b["rr"]).max(0).values + 1.0
        b = dict(b, pr=b["pc"] - h)
    pc = with_grad(b["pc"])
    geo_w, geo_l = (b["alpha"][:, None] * b["rc"]).sum(0), (b["alpha"][:, None] * b["rr"]).sum(0)
    mrpo.dpo_loss(pc, b["pr"], geo_w, geo_l, b["beta"])[0].sum().backward()
    g_geo = pc.grad.abs()
    g_multi = loss_and_grads("multi_dpo", b, alpha=b["alpha"], clip=False)[1].abs()
    if sign > 0:
        assert bool((g_geo >= g_multi - 1e-12).all())
    else:
        assert bool((g_geo <= g_multi + 1e-12).all())


@st.composite
def prop2_cases(draw, sign):
    """K >= 2 references whose Jensen gap has the sign of Prop. 2's exact condition BY CONSTRUCTION, and a policy
    margin h that makes every d_k = beta (m_k - h) share that sign.

    Per pair, both responses' reference log-probs deviate from a level by one pattern p (p_0 = -1, p_1 = +1, so it is
    never constant): log pi_k(y_w) = c_w - s_w p_k, log pi_k(y_l) = c_l - s_l p_k. J is shift invariant and
    J(t p) is convex in t, 0 at t = 0 and > 0 for t > 0, hence strictly increasing in t >= 0: s_l > s_w gives
    J(b) > J(a) (sign +1), s_w > s_l gives J(b) < J(a) (sign -1)."""
    K, B = draw(st.integers(2, 8)), draw(st.integers(1, 16))
    f = lambda lo, hi: draw(st.floats(lo, hi))  # noqa: E731
    alpha = torch.tensor([f(0.05, 1.0) for _ in range(K)], dtype=torch.float64)
    rc, rr, h = torch.empty(K, B, dtype=torch.float64), torch.empty(K, B, dtype=torch.float64), []
    for j in range(B):
        p = torch.tensor([-1.0, 1.0] + [f(-1.0, 1.0) for _ in range(K - 2)], dtype=torch.float64)
        small = f(0.0, 20.0)
        big = small + f(0.5, 50.0)
        s_w, s_l = (small, big) if sign > 0 else (big, small)
        rc[:, j], rr[:, j] = f(-5000.0, -100.0) - s_w * p, f(-5000.0, -100.0) - s_l * p
        margins = rc[:, j] - rr[:, j]
        offset = f(0.0, 50.0)
        h.append(float(margins.min()) - offset if sign > 0 else float(margins.max()) + offset)
    pc = torch.tensor([f(-5000.0, -1.0) for _ in range(B)], dtype=torch.float64)
    event(f"K={K}")
    return dict(pc=pc, pr=pc - torch.tensor(h, dtype=torch.float64), rc=rc, rr=rr, alpha=alpha / alpha.sum(),
                beta=draw(BETA))


@given(prop2_cases(+1))
def test_prop2_positive_side_holds_for_mrpo_when_references_disagree_more_on_rejected(b):
    gap = mrpo.prop2_bound(b["rc"], b["rr"], b["alpha"][:, None].expand_as(b["rc"]))
    assert bool((gap > 1e-6).all())  # every pair is a non-trivial case (K >= 2, J(b) > J(a))
    g_mrpo, g_multi = grad_magnitudes(b, clip=False)
    assert bool((g_mrpo >= g_multi - 1e-12).all())


@given(prop2_cases(-1))
def test_prop2_negative_side_holds_for_mrpo_when_references_disagree_more_on_chosen(b):
    gap = mrpo.prop2_bound(b["rc"], b["rr"], b["alpha"][:, None].expand_as(b["rc"]))
    assert bool((gap < -1e-6).all())  # every pair is a non-trivial case (K >= 2, J(b) < J(a))
    g_mrpo, g_multi = grad_magnitudes(b, clip=False)
    assert bool((g_mrpo <= g_multi + 1e-12).all())


def test_prop2_cases_are_all_non_trivial_and_many():
    """Counts the cases the two tests above check: every drawn pair has K >= 2 and a Jensen gap of the right sign."""
    checked = []

    @settings(max_examples=100, database=None)
    @given(prop2_cases(+1), prop2_cases(-1))
    def count(positive, negative):
        for b, sign in ((positive, 1), (negative, -1)):
            gap = mrpo.prop2_bound(b["rc"], b["rr"], b["alpha"][:, None].expand_as(b["rc"]))
            checked.append(int((sign * gap > 1e-6).sum()))
    count()
    print(f"Prop. 2: {sum(checked)} non-trivial pairs in {len(checked)} batches")
    assert len(checked) >= 100 and sum(checked) >= len(checked)  # at least one pair per batch, 6 on average


@given(batches(k_min=1, k_max=8), st.floats(0.0, 0.5), st.floats(0.0, 50.0), st.sampled_from([+1, -1]))
def test_prop2_under_ctro_fails_by_at_most_beta_delta_over_4(b, eps, offset, sign):
    rc, rr = mrpo.ctro_clip(b["rc"], eps), mrpo.ctro_clip(b["rr"], eps)  # the references the losses will see
    margins = rc - rr
    h = margins.min(0).values - offset if sign > 0 else margins.max(0).values + offset
    b = dict(b, pr=b["pc"] - h)
    kw = dict(alpha=b["alpha"], eps=eps)
    g_mrpo = loss_and_grads("mrpo", b, **kw)[1].abs()
    g_multi = loss_and_grads("multi_dpo", b, **kw)[1].abs()
    delta = 2 * eps * torch.maximum(-b["rc"][0], -b["rr"][0])  # 2 max(eps a_1, eps b_1)
    slack = b["beta"] * (b["beta"] * delta / 4) + 1e-9  # gradients carry one more factor beta
    if sign > 0:
        assert bool((g_mrpo >= g_multi - slack).all())
    else:
        assert bool((g_mrpo <= g_multi + slack).all())


def test_prop2_as_printed_fails_on_a_pinned_counterexample():
    """K=2, alpha=(0.5, 0.5), beta=0.1: both d_k > 0, yet MRPO's gradient is smaller than Multi-DPO's."""
    b = dict(pc=torch.tensor([-50.0], dtype=torch.float64), pr=torch.tensor([-60.0], dtype=torch.float64),
             rc=torch.tensor([[-67.0], [-32.0]], dtype=torch.float64),
             rr=torch.tensor([[-78.0], [-70.0]], dtype=torch.float64),
             alpha=torch.tensor([0.5, 0.5], dtype=torch.float64), beta=0.1)
    h = (b["pc"] - b["pr"]).item()
    d = [b["beta"] * ((b["rc"][k] - b["rr"][k]).item() - h) for k in range(2)]
    assert d == pytest.approx([0.1, 2.8]) and min(d) > 0
    g_mrpo, g_multi = grad_magnitudes(b, clip=False)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert g_multi.item() == pytest.approx(b["beta"] * (sig(d[0]) + sig(d[1])) / 2)  # 0.1 * 0.734
    assert g_mrpo.item() == pytest.approx(b["beta"] * 0.525, abs=1e-3)
    assert g_mrpo.item() < g_multi.item()
    alpha = b["alpha"][:, None].expand_as(b["rc"])
    assert mrpo.prop2_bound(b["rc"], b["rr"], alpha).item() < 0  # the condition of the exact statement fails


# --------------------------------------------------------------------------------------------------------------
# Inputs the losses must handle: a scalar alpha, low-precision log-probs, references that carry a gradient


def test_scalar_alpha_is_the_weight_of_reference_1_for_two_references():
    rc = torch.tensor([[-40.0, -12.0], [-55.0, -9.0]])
    rr = torch.tensor([[-47.0, -15.0], [-50.0, -10.0]])
    pc, pr = torch.tensor([-41.0, -11.0]), torch.tensor([-48.0, -16.0])
    got = mrpo.mrpo_loss(pc, pr, rc, rr, 0.1, alpha=0.3)
    want = mrpo.mrpo_loss(pc, pr, rc, rr, 0.1, alpha=[0.3, 0.7])
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=0)
    for name in LOSS_NAMES:  # every loss reads it the same way
        torch.testing.assert_close(mrpo.compute_loss(name, pc, pr, rc, rr, 0.1, alpha=torch.tensor(0.3))[0],
                                   mrpo.compute_loss(name, pc, pr, rc, rr, 0.1, alpha=[0.3, 0.7])[0])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        mrpo.mrpo_loss(pc, pr, rc, rr, 0.1, alpha=1.5)
    with pytest.raises(ValueError, match="K=3"):
        mrpo.mrpo_loss(pc, pr, torch.cat([rc, rc[:1]]), torch.cat([rr, rr[:1]]), 0.1, alpha=0.5)


@pytest.mark.parametrize("name", ["dpo"] + LOSS_NAMES)
@pytest.mark.parametrize("low", [torch.bfloat16, torch.float16])
def test_low_precision_inputs_are_computed_in_float32(name, low):
    g = torch.Generator().manual_seed(0)
    K, B = 3, 64
    x = lambda *shape: (-300 + 20 * torch.rand(*shape, generator=g)).to(low)  # noqa: E731, log-probs near -300
    pc, pr, rc, rr = x(B), x(B), x(K, B), x(K, B)
    got = mrpo.compute_loss(name, pc, pr, rc, rr, 0.5, alpha="uniform", eps_max=0.5)
    want = mrpo.compute_loss(name, pc.float(), pr.float(), rc.float(), rr.float(), 0.5, alpha="uniform",
                             eps_max=0.5)  # the same values, exactly, in float32
    for gt, w in zip(got, want):
        assert gt.dtype == torch.float32
        torch.testing.assert_close(gt, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", ["dpo"] + LOSS_NAMES)
@pytest.mark.parametrize("eps", [None, 0.2])
def test_reference_log_probs_are_constants(name, eps):
    g = torch.Generator().manual_seed(1)
    K, B = 3, 5
    rc, rr = -50 * torch.rand(K, B, generator=g), -50 * torch.rand(K, B, generator=g)
    policy = -50 * torch.rand(2, B, generator=g)
    grads = []
    for refs_need_grad in (True, False):
        pc, pr = with_grad(policy[0]), with_grad(policy[1])
        rc_, rr_ = (with_grad(rc), with_grad(rr)) if refs_need_grad else (rc, rr)
        losses = mrpo.compute_loss(name, pc, pr, rc_, rr_, 0.5, alpha="arwc", eps_max=0.3, eps=eps)[0]
        losses.sum().backward()
        if refs_need_grad:
            assert rc_.grad is None and rr_.grad is None
        grads.append((pc.grad, pr.grad))
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=0)


# --------------------------------------------------------------------------------------------------------------
# The reward accuracy metric and the --alpha parser shared by train.py and eval.py


def test_reward_accuracy_counts_ties_half():
    chosen = torch.tensor([1.0, 0.0, 0.2, 0.3, -1.0])
    rejected = torch.tensor([0.0, 1.0, 0.2, 0.3 + 0.5e-5, -1.0 + 2e-5])
    # beta 0.1: the tolerance 1e-4 nats is 1e-5 in reward units; pair 4 is a tie, pair 5 is not
    assert mrpo.reward_accuracy(chosen, rejected, beta=0.1).tolist() == [1.0, 0.0, 0.5, 0.5, 0.0]
    assert mrpo.reward_accuracy(chosen, rejected).tolist() == [1.0, 0.0, 0.5, 0.5, 0.5]  # beta 1: 2e-5 < 1e-4


def test_parse_alpha():
    assert parse_alpha("arwc", 3) == "arwc" and parse_alpha("uniform", 2) == "uniform"
    assert parse_alpha("1,3", 2) == [1.0, 3.0]
    for text, match in (("0.2,0.3,0.5", "3 weights"), ("1,-1", "non-negative"), ("0,0", "positive sum"),
                        ("a,b", "comma-separated"), ("1,nan", "finite")):
        with pytest.raises(ValueError, match=match):
            parse_alpha(text, 2)
