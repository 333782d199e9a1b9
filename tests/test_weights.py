"""Tests of the reference weightings of arXiv:2512.10040 in mrpo.py (VDW, VAW, SWCW, TSW): against plain-Python
re-computations, K = 1, permutation symmetry, scale behaviour, the edge cases each docstring states, SWCW's use of
past batches only, TSW's posterior and exact resume, and every weighting plugged into the losses."""

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mrpo

settings.register_profile("weights", deadline=None, max_examples=100)
settings.load_profile("weights")

# Log-probs in [-1e3, 0], with a few repeated values so that margins of exactly 0 (ties) and references right on no
# pair come up often.
LOGP = st.one_of(st.floats(-1e3, 0.0, allow_nan=False, allow_subnormal=False), st.sampled_from([-1.0, -2.0, 0.0]))


@st.composite
def ref_logps(draw, k_min=1, k_max=6, n_max=12):
    """(chosen, rejected): two (K, M) float64 tensors of reference log-probs."""
    K, M = draw(st.integers(k_min, k_max)), draw(st.integers(1, n_max))
    rows = lambda: [[draw(LOGP) for _ in range(M)] for _ in range(K)]  # noqa: E731
    return torch.tensor(rows(), dtype=torch.float64), torch.tensor(rows(), dtype=torch.float64)


def close(a, b, **kw):
    torch.testing.assert_close(a, torch.as_tensor(b, dtype=a.dtype), rtol=kw.get("rtol", 1e-12),
                               atol=kw.get("atol", 1e-12))


# --------------------------------------------------------------------------------------------------------------
# Independent plain-Python computations (lists of floats, no torch)


def py_normalise(scores):
    total = sum(scores)
    return [s / total for s in scores] if total > 0 else [1.0 / len(scores)] * len(scores)


def py_vdw(chosen, rejected):
    """alpha_k = sum_i |w_ki - l_ki| / sum_j sum_i |w_ji - l_ji|, uniform if all are 0."""
    return py_normalise([sum(abs(w - l) for w, l in zip(ws, ls)) for ws, ls in zip(chosen, rejected)])


def py_vaw(chosen, rejected):
    """alpha_k = #{i : w_ki > l_ki} / sum_j #{...}, uniform if no reference is right on any pair."""
    return py_normalise([float(sum(w - l > 0 for w, l in zip(ws, ls))) for ws, ls in zip(chosen, rejected)])


# --------------------------------------------------------------------------------------------------------------
# VDW and VAW


@given(ref_logps())
def test_vdw_and_vaw_match_plain_python(refs):
    rc, rr = refs
    close(mrpo.vdw_weights(rc, rr), py_vdw(rc.tolist(), rr.tolist()))
    close(mrpo.vaw_weights(rc, rr), py_vaw(rc.tolist(), rr.tolist()))


@given(ref_logps())
def test_weights_are_a_distribution_in_the_inputs_dtype(refs):
    rc, rr = (t.float() for t in refs)
    for alpha in (mrpo.vdw_weights(rc, rr), mrpo.vaw_weights(rc, rr)):
        assert alpha.shape == (rc.shape[0],) and alpha.dtype == torch.float32
        assert bool((alpha >= 0).all())
        close(alpha.sum(), 1.0, rtol=1e-6, atol=1e-6)


@given(ref_logps(k_min=1, k_max=1))
def test_k1_gives_weight_one(refs):
    rc, rr = refs
    for alpha in (mrpo.vdw_weights(rc, rr), mrpo.vaw_weights(rc, rr)):
        assert alpha.tolist() == [1.0]


@given(ref_logps(k_min=2), st.randoms(use_true_random=False))
def test_permuting_references_permutes_alpha(refs, rnd):
    rc, rr = refs
    perm = list(range(rc.shape[0]))
    rnd.shuffle(perm)
    for weights in (mrpo.vdw_weights, mrpo.vaw_weights):
        close(weights(rc[perm], rr[perm]), weights(rc, rr)[perm])


@given(ref_logps(), st.floats(0.01, 100.0))
def test_scale_behaviour(refs, c):
    rc, rr = refs
    # Scaling every log-prob by c > 0 changes neither weighting.
    close(mrpo.vdw_weights(c * rc, c * rr), mrpo.vdw_weights(rc, rr), rtol=1e-9, atol=1e-12)
    close(mrpo.vaw_weights(c * rc, c * rr), mrpo.vaw_weights(rc, rr))
    # Scaling reference 0 alone: VDW's unnormalised weight for it scales by c; VAW only counts signs.
    scale = torch.ones(rc.shape[0], 1, dtype=rc.dtype)
    scale[0] = c
    conf = (rc - rr).abs().sum(1)
    conf[0] *= c
    close(mrpo.vdw_weights(scale * rc, scale * rr), py_normalise(conf.tolist()), rtol=1e-9, atol=1e-12)
    close(mrpo.vaw_weights(scale * rc, scale * rr), mrpo.vaw_weights(rc, rr))


def test_vdw_on_one_pair_is_arwc():
    rc = torch.tensor([[-3.0], [-10.0], [-7.5]], dtype=torch.float64)
    rr = torch.tensor([[-4.0], [-6.0], [-7.5]], dtype=torch.float64)
    close(mrpo.vdw_weights(rc, rr), mrpo.arwc_weights(rc, rr)[:, 0])
    close(mrpo.vdw_weights(rc, rr), [1 / 5, 4 / 5, 0.0])  # margins 1, -4, 0


def test_vdw_uniform_when_every_margin_is_zero():
    rc = torch.tensor([[-3.0, -1.0], [-2.0, -5.0]])
    close(mrpo.vdw_weights(rc, rc.clone()), [0.5, 0.5])


def test_vaw_edge_cases():
    rc = torch.tensor([[-1.0, -1.0, -1.0], [-2.0, -1.0, -3.0], [-1.0, -2.0, -2.0]])
    rr = torch.tensor([[-2.0, -2.0, -1.0], [-1.0, -1.0, -1.0], [-2.0, -1.0, -1.0]])
    # Reference 0: right on 2 pairs (the tie on pair 2 counts as wrong); reference 1: right on none, so weight 0;
    # reference 2: right on 1.
    close(mrpo.vaw_weights(rc, rr), [2 / 3, 0.0, 1 / 3], rtol=1e-6, atol=1e-7)
    # No reference right on any pair (every margin <= 0): uniform.
    rc0, rr0 = torch.minimum(rc, rr), torch.maximum(rc, rr)
    close(mrpo.vaw_weights(rc0, rr0), [1 / 3] * 3, rtol=1e-6, atol=1e-7)


def test_validation_errors_name_the_problem():
    for bad, match in [((torch.zeros(2, 0), torch.zeros(2, 0)), "M = 0"),
                       ((torch.zeros(2, 3), torch.zeros(3, 3)), "must both be"),
                       ((torch.tensor([[float("-inf")]]), torch.zeros(1, 1)), "finite")]:
        for weights in (mrpo.vdw_weights, mrpo.vaw_weights):
            with pytest.raises(ValueError, match=match):
                weights(*bad)


# --------------------------------------------------------------------------------------------------------------
# A weight of 0 drops a reference; every weighting plugs into the losses


@given(ref_logps(k_min=2, n_max=8), st.data())
def test_zero_weight_drops_the_reference_exactly(refs, data):
    rc, rr = refs
    K, B = rc.shape
    drop = data.draw(st.integers(1, K - 1))  # a reference other than reference 1 (CTRO's anchor)
    alpha = torch.tensor([data.draw(st.floats(0.05, 1.0)) for _ in range(K)], dtype=torch.float64)
    alpha[drop] = 0.0
    keep = [k for k in range(K) if k != drop]
    virtual = mrpo.virtual_reference_logps(rc, alpha / alpha.sum())
    assert bool(torch.isfinite(virtual).all())
    close(virtual, mrpo.virtual_reference_logps(rc[keep], alpha[keep] / alpha[keep].sum()), rtol=1e-9, atol=1e-9)
    pc, pr = rc[0] + 0.5, rr[0] - 0.5  # any policy log-probs
    for loss in (mrpo.mrpo_loss, mrpo.multi_dpo_loss, mrpo.mean_ref_loss):
        for trust_region in (dict(clip=False), dict(eps=0.1)):  # CTRO with a fixed eps clips each row on its own
            got = loss(pc, pr, rc, rr, 0.1, alpha=alpha, **trust_region)
            want = loss(pc, pr, rc[keep], rr[keep], 0.1, alpha=alpha[keep], **trust_region)
            for g, w in zip(got, want):
                close(g, w, rtol=1e-9, atol=1e-9)


def test_zero_weight_reference_still_sets_adaptive_eps():
    # Eq. 9 sums the log-prob mass over every reference, weighted or not, so with adaptive eps a zero-weighted
    # reference still moves the trust region (as mrpo.py documents). Reference 2 here changes eps on pair 0 only.
    rc, rr = torch.zeros(3, 2, dtype=torch.float64), torch.zeros(3, 2, dtype=torch.float64)
    rc[0, 0], rr[1, 0], rc[2, 0] = -1.0, -1.0, -2.0
    alpha, keep = torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64), [0, 2]
    pc, pr = rc[0] + 0.5, rr[0] - 0.5
    got, _, _ = mrpo.mrpo_loss(pc, pr, rc, rr, 0.1, alpha=alpha, eps_max=0.5)
    want, _, _ = mrpo.mrpo_loss(pc, pr, rc[keep], rr[keep], 0.1, alpha=alpha[keep], eps_max=0.5)
    assert abs(float(got[0] - want[0])) > 1e-4
    close(got[1], want[1])


def all_weightings(rc, rr):
    """Every weighting of this section computed on (K, B) log-probs, as (name, alpha (K,))."""
    K = rc.shape[0]
    sw = mrpo.SlidingWindowWeights(K, window=2)
    out = [("vdw", mrpo.vdw_weights(rc, rr)), ("vaw", mrpo.vaw_weights(rc, rr)), ("swcw first", sw.alpha())]
    sw.update(rc, rr)
    out.append(("swcw", sw.alpha()))
    out.append(("tsw", mrpo.ThompsonSamplingWeights(K, seed=1).choose()[1]))
    return out


def test_every_weighting_gives_finite_losses():
    torch.manual_seed(0)
    K, B = 3, 6
    rc, rr = -50 * torch.rand(K, B), -50 * torch.rand(K, B)
    rc[1] = rr[1] - 1.0  # reference 2 right on no pair: VAW gives it weight 0
    pc = rc[0] + torch.randn(B)
    pr = rr[0] + torch.randn(B)
    for name, alpha in all_weightings(rc, rr):
        assert alpha.shape == (K,) and abs(float(alpha.sum()) - 1) < 1e-6, name
        for loss in (mrpo.mrpo_loss, mrpo.multi_dpo_loss):
            pcg, prg = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
            losses, rew_w, rew_l = loss(pcg, prg, rc, rr, 0.1, alpha=alpha)
            losses.sum().backward()
            for t in (losses, rew_w, rew_l, pcg.grad, prg.grad):
                assert bool(torch.isfinite(t).all()), (name, loss.__name__)
    assert mrpo.vaw_weights(rc, rr)[1] == 0


@given(ref_logps(k_min=2, n_max=8), st.integers(0, 2**16))
def test_tsw_one_hot_alpha_is_single_reference_dpo(refs, seed):
    rc, rr = refs
    k, alpha = mrpo.ThompsonSamplingWeights(rc.shape[0], seed=seed).choose(dtype=torch.float64)
    assert alpha.tolist() == [1.0 if j == k else 0.0 for j in range(rc.shape[0])]
    pc, pr = rc[0] + 0.25, rr[0] - 0.25
    got = mrpo.mrpo_loss(pc, pr, rc, rr, 0.5, alpha=alpha, clip=False)
    want = mrpo.dpo_loss(pc, pr, rc[k], rr[k], 0.5)
    for g, w in zip(got, want):
        close(g, w, rtol=1e-9, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------
# SWCW: the sliding window


def random_batches(K, sizes, seed=0):
    """One (chosen, rejected) pair of (K, B) log-prob tensors per batch size."""
    g = torch.Generator().manual_seed(seed)
    return [(-20 * torch.rand(K, b, generator=g, dtype=torch.float64),
             -20 * torch.rand(K, b, generator=g, dtype=torch.float64)) for b in sizes]


def swcw_run(batches, K, window):
    """The training-loop protocol: alpha for step t, then update with batch t. Returns every alpha, (T, K)."""
    sw = mrpo.SlidingWindowWeights(K, window)
    alphas = []
    for rc, rr in batches:
        alphas.append(sw.alpha(dtype=torch.float64))
        sw.update(rc, rr)
    return torch.stack(alphas)


def test_swcw_is_uniform_before_any_history():
    assert mrpo.SlidingWindowWeights(4, window=3).alpha().tolist() == [0.25] * 4


@given(ref_logps(k_min=1, k_max=1))
def test_swcw_k1_gives_weight_one(refs):
    sw = mrpo.SlidingWindowWeights(1)
    sw.update(*refs)
    assert sw.alpha().tolist() == [1.0]


@given(ref_logps())
def test_swcw_window_1_after_a_batch_is_vdw_on_that_batch(refs):
    sw = mrpo.SlidingWindowWeights(refs[0].shape[0], window=1)
    sw.update(*random_batches(refs[0].shape[0], [3])[0])  # older history, pushed out of the window
    sw.update(*refs)
    close(sw.alpha(dtype=torch.float64), mrpo.vdw_weights(*refs))


def test_swcw_window_2_pools_the_last_two_batches_by_pair():
    K = 3
    batches = random_batches(K, [4, 1, 6, 2])  # unequal sizes: pooling is per pair, not per batch
    alphas = swcw_run(batches + batches[:1], K, window=2)
    for t in range(1, len(batches) + 1):
        window = batches[max(0, t - 2):t]
        chosen = [sum((rc[k].tolist() for rc, _ in window), []) for k in range(K)]  # (K, pairs in the window)
        rejected = [sum((rr[k].tolist() for _, rr in window), []) for k in range(K)]
        close(alphas[t], py_vdw(chosen, rejected))
        n = sum(rc.shape[1] for rc, _ in window)
        sw = mrpo.SlidingWindowWeights(K, window=2)
        for b in window:
            sw.update(*b)
        close(sw.confidence(), [sum(abs(w - l) for w, l in zip(cs, ls)) / n for cs, ls in zip(chosen, rejected)])


@given(st.integers(1, 3), st.integers(0, 6), st.integers(0, 2**16))
def test_swcw_never_uses_the_current_batch(window, t, seed):
    K, sizes = 3, [2, 5, 3, 4, 1, 2, 3, 4, 2, 3]
    batches = random_batches(K, sizes, seed)
    changed = list(batches)
    changed[t] = random_batches(K, [sizes[t]], seed + 1)[0]  # different values for batch t only
    before, after = swcw_run(batches, K, window), swcw_run(changed, K, window)
    close(after[:t + 1], before[:t + 1])  # alpha for steps 0..t never saw batch t
    assert not torch.allclose(after[t + 1], before[t + 1])  # step t + 1 does
    close(after[t + 1 + window:], before[t + 1 + window:])  # and batch t leaves the window after `window` steps


def test_swcw_ignores_which_response_is_labelled_chosen():
    K = 4
    batches = random_batches(K, [3, 2, 4, 5])
    swapped = [(rr, rc) for rc, rr in batches]  # every label swapped: |m_k| is unchanged
    close(swcw_run(swapped, K, 2), swcw_run(batches, K, 2))


@given(ref_logps(k_min=2), st.randoms(use_true_random=False))
def test_swcw_permuting_references_permutes_alpha(refs, rnd):
    rc, rr = refs
    perm = list(range(rc.shape[0]))
    rnd.shuffle(perm)
    a, b = mrpo.SlidingWindowWeights(rc.shape[0], 2), mrpo.SlidingWindowWeights(rc.shape[0], 2)
    a.update(rc, rr)
    b.update(rc[perm], rr[perm])
    close(b.alpha(dtype=torch.float64), a.alpha(dtype=torch.float64)[perm])


def save_load(state):
    """Round trip through torch.save / torch.load(weights_only=True), as a checkpoint does."""
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def test_swcw_resumes_exactly_from_a_checkpoint():
    K = 3
    batches = random_batches(K, [2, 3, 4, 1, 5, 2])
    want = swcw_run(batches, K, window=3)
    sw = mrpo.SlidingWindowWeights(K, window=3)
    for b in batches[:4]:
        sw.update(*b)
    resumed = mrpo.SlidingWindowWeights(K, window=3)
    resumed.load_state_dict(save_load(sw.state_dict()))
    for t, b in enumerate(batches[4:], start=4):
        assert torch.equal(resumed.alpha(dtype=torch.float64), want[t])
        resumed.update(*b)


def test_swcw_refuses_a_mismatched_checkpoint_or_batch():
    sw = mrpo.SlidingWindowWeights(3, window=2)
    for other in (mrpo.SlidingWindowWeights(3, window=1), mrpo.SlidingWindowWeights(2, window=2)):
        with pytest.raises(ValueError, match="resume with the same references and window"):
            other.load_state_dict(sw.state_dict())
    with pytest.raises(ValueError, match="built for K=3 references but this batch has K=2"):
        sw.update(torch.zeros(2, 4), torch.zeros(2, 4))


# --------------------------------------------------------------------------------------------------------------
# TSW: Thompson sampling


def reward_of(step, k):
    """A fixed, deterministic reward sequence: reference 1 always helps, the others on every third step."""
    return k == 1 or step % 3 == 0


def tsw_run(ts, steps, first_step=0):
    """choose -> update(k, reward) for `steps` steps; returns the chosen references."""
    chosen = []
    for step in range(first_step, first_step + steps):
        k, _ = ts.choose()
        ts.update(k, reward_of(step, k))
        chosen.append(k)
    return chosen


def test_tsw_resumes_exactly_from_a_checkpoint():
    K = 4
    straight = mrpo.ThompsonSamplingWeights(K, seed=123)
    want = tsw_run(straight, 40)
    first = mrpo.ThompsonSamplingWeights(K, seed=123)
    got = tsw_run(first, 17)
    state = save_load(first.state_dict())
    tsw_run(first, 5, first_step=17)  # the run goes on past the checkpoint; resuming must not depend on that
    resumed = mrpo.ThompsonSamplingWeights(K, seed=999)  # the seed is overwritten by the checkpoint
    resumed.load_state_dict(state)
    got += tsw_run(resumed, 23, first_step=17)
    assert got == want
    assert resumed.a == straight.a and resumed.b == straight.b


def test_tsw_posterior_counts_successes_and_failures():
    K, (a0, b0) = 3, (2.0, 7.0)
    ts = mrpo.ThompsonSamplingWeights(K, prior=(a0, b0), seed=5)
    successes, failures = [0] * K, [0] * K
    for step in range(60):
        k, _ = ts.choose()
        r = reward_of(step, k)
        ts.update(k, r)
        successes[k] += r
        failures[k] += not r
    assert ts.a == [a0 + s for s in successes] and ts.b == [b0 + f for f in failures]
    close(ts.posterior_mean(), [(a0 + s) / (a0 + b0 + s + f) for s, f in zip(successes, failures)])


def test_tsw_posterior_means_move_with_the_rewards():
    ts = mrpo.ThompsonSamplingWeights(3)  # Beta(5, 5): every mean starts at 1/2
    for _ in range(3):
        ts.update(0, True)
    ts.update(1, False)
    ts.update(1, 0)
    close(ts.posterior_mean(), [8 / 13, 5 / 12, 1 / 2])


def test_tsw_concentrates_on_the_reference_that_is_always_rewarded():
    K = 4
    ts = mrpo.ThompsonSamplingWeights(K, seed=0)
    chosen = []
    for _ in range(200):
        k, _ = ts.choose()
        ts.update(k, k == 2)
        chosen.append(k)
    mean = ts.posterior_mean()
    assert mean[2] > 0.9
    assert all(mean[k] <= 0.5 for k in range(K) if k != 2)
    assert chosen[-50:].count(2) >= 45


def test_tsw_samples_follow_the_posterior():
    # Equal posteriors: each of two references wins about half the time.
    ts = mrpo.ThompsonSamplingWeights(2, seed=3)
    share = sum(ts.choose()[0] == 0 for _ in range(2000)) / 2000
    assert 0.45 < share < 0.55
    # Beta(30, 10) against Beta(10, 30): reference 0 nearly always wins.
    ts = mrpo.ThompsonSamplingWeights(2, prior=(10, 10), seed=3)
    for _ in range(20):
        ts.update(0, True)
        ts.update(1, False)
    assert sum(ts.choose()[0] == 0 for _ in range(500)) >= 495


def test_tsw_uses_only_its_own_generator():
    def run(global_seed_between):
        ts = mrpo.ThompsonSamplingWeights(5, seed=42)
        out = []
        for step in range(20):
            torch.manual_seed(global_seed_between + step)  # whatever the trainer does with the global RNG
            state = torch.get_rng_state()
            k, _ = ts.choose()
            assert torch.equal(torch.get_rng_state(), state)  # the global CPU RNG is left as it was
            ts.update(k, reward_of(step, k))
            out.append(k)
        return out

    assert run(0) == run(1000)
    assert tsw_run(mrpo.ThompsonSamplingWeights(5, seed=1), 30) != tsw_run(mrpo.ThompsonSamplingWeights(5, seed=2), 30)


def test_tsw_refuses_bad_arguments_and_mismatched_checkpoints():
    ts = mrpo.ThompsonSamplingWeights(3)
    for k, reward in [(3, True), (-1, False), (0, 0.5)]:
        with pytest.raises(ValueError, match="0 <= k < K=3"):
            ts.update(k, reward)
    assert ts.a == [5.0] * 3 and ts.b == [5.0] * 3  # nothing was counted
    for other in (mrpo.ThompsonSamplingWeights(2), mrpo.ThompsonSamplingWeights(3, prior=(1, 1))):
        with pytest.raises(ValueError, match="resume with the same references and prior"):
            other.load_state_dict(ts.state_dict())
    with pytest.raises(ValueError, match="both parameters > 0"):
        mrpo.ThompsonSamplingWeights(2, prior=(0, 5))
