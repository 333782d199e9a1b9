"""Property tests of the set-level losses (the last section of mrpo.py): n = 2 equals the pair losses of
mrpo.py (losses, rewards, gradients), K = 1 or eps = 0 equals MPO against reference 1, invariance to permuting a
set, to shifting its policy log-probs and to padding with garbage (nan, inf) in masked slots, sets without
preference, MPO and MRPO on sets against plain-Python float64 re-derivations, and set_pairs and the ranking metrics
against brute force (Kendall's tau-b by hand). Every tensor is float64 and tiny; masked slots always hold garbage."""

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import mrpo
from mrpo import mpo_loss, mrpo_set_loss, set_adaptive_eps, set_pairs, set_ranking_metrics

SETTINGS = settings(deadline=None, max_examples=40)
LOGP = st.floats(-1e3, 0.0, allow_nan=False, allow_infinity=False, allow_subnormal=False)
SCORE = st.integers(-2, 2).map(float)  # integers: ties are common and the mean is compared exactly
GARBAGE = st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 5.0, -1e30])
WEIGHTINGS = ["none", "deviation", "signed"]


@st.composite
def sets(draw, k_min=1, k_max=4, n_max=5, pad=True, score=SCORE):
    """B sets padded to N slots: policy (B, N), refs (K, B, N), scores (B, N), mask (B, N) with 2..N real responses
    at random slots per set (all N if not pad); garbage in every masked slot."""
    K, B, N = draw(st.integers(k_min, k_max)), draw(st.integers(1, 3)), draw(st.integers(2, n_max))
    mask = torch.zeros(B, N, dtype=torch.bool)
    for b in range(B):
        mask[b, draw(st.permutations(range(N)))[:draw(st.integers(2, N)) if pad else N]] = True

    def tensor(elements, *shape):
        values = draw(st.lists(elements, min_size=math.prod(shape), max_size=math.prod(shape)))
        return torch.tensor(values, dtype=torch.float64).view(*shape)

    alpha = tensor(st.floats(0.01, 1.0), K)
    return dict(policy=torch.where(mask, tensor(LOGP, B, N), tensor(GARBAGE, B, N)),
                refs=torch.where(mask, tensor(LOGP, K, B, N), tensor(GARBAGE, K, B, N)),
                scores=torch.where(mask, tensor(score, B, N), tensor(GARBAGE, B, N)), mask=mask,
                beta=draw(st.floats(1e-2, 5.0)), gamma=draw(st.floats(0.0, 3.0)), alpha=alpha / alpha.sum())


def run(loss_fn, policy, *args, **kw):
    """(losses, rewards, has_preference, d sum(losses) / d policy_logps)."""
    policy = policy.clone().requires_grad_(True)
    losses, rewards, has_preference = loss_fn(policy, *args, **kw)
    losses.sum().backward()
    return losses.detach(), rewards, has_preference, policy.grad


def set_loss(name, b, policy=None, **kw):
    """mpo_loss against reference 1, or mrpo_set_loss against all K (defaults: ARWC, adaptive eps), on batch b."""
    policy = b["policy"] if policy is None else policy
    kw.setdefault("weighting", "none")
    if name == "mpo":
        return run(mpo_loss, policy, b["refs"][0], b["scores"], b["mask"], b["beta"], gamma=b["gamma"], **kw)
    return run(mrpo_set_loss, policy, b["refs"], b["scores"], b["mask"], b["beta"], gamma=b["gamma"], **kw)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-8)


# --------------------------------------------------------------------------------------------------------------
# n = 2: the pair losses of mrpo.py, exactly (to float tolerance)


@st.composite
def pairs(draw, k_max=4):
    """Sets of 2, no padding, distinct scores; the better response in slot 0 or 1 at random."""
    b = draw(sets(k_max=k_max, n_max=2, pad=False))
    B = b["mask"].shape[0]
    low = torch.tensor(draw(st.lists(st.floats(-5, 5), min_size=B, max_size=B)), dtype=torch.float64)
    gap = torch.tensor(draw(st.lists(st.floats(0.5, 5), min_size=B, max_size=B)), dtype=torch.float64)
    first = torch.tensor(draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    b["scores"] = torch.stack([low + gap * first, low + gap * ~first], 1)
    return b


def pair_view(b):
    """(rows, slot of y_w, slot of y_l, policy_chosen, policy_rejected, ref_chosen (K, B), ref_rejected (K, B))."""
    rows, w = torch.arange(b["scores"].shape[0]), b["scores"].argmax(1)
    policy, refs = b["policy"], b["refs"]
    return rows, w, 1 - w, policy[rows, w], policy[rows, 1 - w], refs[:, rows, w], refs[:, rows, 1 - w]


def assert_equals_pair_loss(got, pair_fn, b, ref_args, **kw):
    """got (a set loss at n = 2) equals pair_fn on (y_w, y_l): losses, rewards, gradients."""
    rows, w, l, pc, pr, rc, rr = pair_view(b)
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    losses, chosen_rewards, rejected_rewards = pair_fn(pc, pr, *ref_args(rc, rr), b["beta"], **kw)
    losses.sum().backward()
    set_losses, rewards, has_preference, grad = got
    assert bool(has_preference.all())
    close(set_losses, losses.detach())
    close(rewards[rows, w], chosen_rewards)
    close(rewards[rows, l], rejected_rewards)
    close(grad[rows, w], pc.grad)
    close(grad[rows, l], pr.grad)


@SETTINGS
@given(pairs(k_max=1), st.sampled_from(["none", "deviation"]))
def test_pair_mpo_equals_dpo(b, weighting):
    """n = 2: "none" is DPO (Eq. 5); "deviation" too, its two weights being equal."""
    got = set_loss("mpo", b, weighting=weighting)
    assert_equals_pair_loss(got, mrpo.dpo_loss, b, lambda rc, rr: (rc[0], rr[0]))


@SETTINGS
@given(pairs(k_max=1))
def test_pair_signed_mpo_is_dpo_with_a_score_margin(b):
    rows, w, l, pc, pr, rc, rr = pair_view(b)
    pc, pr = pc.clone().requires_grad_(True), pr.clone().requires_grad_(True)
    margin = b["gamma"] * (b["scores"][rows, w] - b["scores"][rows, l])
    want = -torch.nn.functional.logsigmoid(b["beta"] * ((pc - rc[0]) - (pr - rr[0])) + margin)
    want.sum().backward()
    losses, _, _, grad = set_loss("mpo", b, weighting="signed")
    close(losses, want.detach())
    close(grad[rows, w], pc.grad)
    close(grad[rows, l], pr.grad)


@SETTINGS
@given(pairs(), st.sampled_from(["arwc", "uniform", "given"]), st.sampled_from(["adaptive", "fixed", "off"]),
       st.floats(0.0, 0.5))
def test_pair_mrpo_set_equals_mrpo_loss(b, alpha, trust, eps):
    """n = 2, weighting none: mrpo_loss (Eq. 7) with ARWC (Eq. 10), adaptive (Eq. 9) or fixed eps or no CTRO."""
    alpha = b["alpha"] if alpha == "given" else alpha
    kw = dict(alpha=alpha, eps_max=eps, eps=eps if trust == "fixed" else None, clip=trust != "off")
    got = set_loss("mrpo", b, **kw)
    assert_equals_pair_loss(got, mrpo.mrpo_loss, b, lambda rc, rr: (rc, rr), **kw)


@SETTINGS
@given(pairs(), st.floats(0.0, 0.5))
def test_pair_adaptive_eps_equals_eq9(b, eps_max):
    rows, w, l, _, _, rc, rr = pair_view(b)
    eps = set_adaptive_eps(b["refs"], b["mask"], eps_max)
    eps_w, eps_l = mrpo.adaptive_eps(rc, rr, eps_max)
    close(eps[rows, w], eps_w)
    close(eps[rows, l], eps_l)


# --------------------------------------------------------------------------------------------------------------
# Identities and invariances of the set losses


@SETTINGS
@given(sets(), st.sampled_from(WEIGHTINGS), st.sampled_from(["K=1", "eps=0", "eps_max=0"]),
       st.sampled_from(["arwc", "uniform"]))
def test_one_reference_or_eps_zero_gives_mpo_against_reference_1(b, weighting, case, alpha):
    kw = {"K=1": {}, "eps=0": {"eps": 0.0}, "eps_max=0": {"eps_max": 0.0}}[case]
    refs = b["refs"][:1] if case == "K=1" else b["refs"]
    got = set_loss("mrpo", dict(b, refs=refs), weighting=weighting, alpha=alpha, **kw)
    want = set_loss("mpo", b, weighting=weighting)
    for g, w in zip(got, want):
        close(g, w)


@SETTINGS
@given(sets(), st.sampled_from(WEIGHTINGS), st.sampled_from(["mpo", "mrpo"]), st.data())
def test_permuting_the_responses_of_a_set_changes_nothing(b, weighting, name, data):
    B, N = b["mask"].shape
    perm = torch.tensor([data.draw(st.permutations(range(N))) for _ in range(B)])  # (B, N), one per set
    permute = lambda t: t.gather(-1, perm.expand_as(t))  # noqa: E731
    permuted = {key: permute(value) if key in ("policy", "refs", "scores", "mask") else value
                for key, value in b.items()}
    losses, rewards, has_preference, grad = set_loss(name, b, weighting=weighting)
    p_losses, p_rewards, p_has_preference, p_grad = set_loss(name, permuted, weighting=weighting)
    close(p_losses, losses)
    close(p_rewards, permute(rewards))
    close(p_grad, permute(grad))
    assert torch.equal(p_has_preference, has_preference)


@SETTINGS
@given(sets(), st.sampled_from(WEIGHTINGS), st.sampled_from(["mpo", "mrpo"]), st.data())
def test_shifting_a_sets_policy_logps_changes_no_loss(b, weighting, name, data):
    B = b["mask"].shape[0]
    shift = torch.tensor(data.draw(st.lists(st.floats(-100, 100), min_size=B, max_size=B)), dtype=torch.float64)
    losses, rewards, _, grad = set_loss(name, b, weighting=weighting)
    s_losses, s_rewards, _, s_grad = set_loss(name, b, policy=b["policy"] + shift[:, None], weighting=weighting)
    close(s_losses, losses)
    close(s_grad, grad)
    close(s_rewards, rewards + b["beta"] * shift[:, None] * b["mask"])


@SETTINGS
@given(sets(n_max=6), st.sampled_from(WEIGHTINGS), st.sampled_from(["mpo", "mrpo"]))
def test_padding_with_garbage_changes_nothing(b, weighting, name):
    """Each set of the padded batch (nan, inf, ... in masked slots) gives what it gives alone, unpadded; masked
    slots get reward 0 and gradient exactly 0."""
    losses, rewards, has_preference, grad = set_loss(name, b, weighting=weighting)
    for i, real in enumerate(b["mask"]):
        alone = dict(b, policy=b["policy"][i, real][None], refs=b["refs"][:, i, real][:, None],
                     scores=b["scores"][i, real][None], mask=torch.ones(1, int(real.sum()), dtype=torch.bool))
        a_losses, a_rewards, a_has_preference, a_grad = set_loss(name, alone, weighting=weighting)
        close(losses[i], a_losses[0])
        close(rewards[i, real], a_rewards[0])
        close(grad[i, real], a_grad[0])
        assert bool(has_preference[i]) == bool(a_has_preference[0])
    assert torch.equal(rewards[~b["mask"]], torch.zeros_like(rewards[~b["mask"]]))
    assert torch.equal(grad[~b["mask"]], torch.zeros_like(grad[~b["mask"]]))


@SETTINGS
@given(sets(), st.sampled_from(WEIGHTINGS), st.sampled_from(["mpo", "mrpo"]), st.floats(-1e3, 1e3), st.data())
def test_sets_with_all_scores_equal_are_skipped(b, weighting, name, score, data):
    """Loss exactly 0, has_preference False, gradient exactly 0 (never nan); the other sets are unaffected."""
    B = b["mask"].shape[0]
    tied = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B, max_size=B)))
    scores = torch.where(tied[:, None] & b["mask"], score, b["scores"])
    losses, _, has_preference, grad = set_loss(name, dict(b, scores=scores), weighting=weighting)
    assert torch.equal(losses[tied], torch.zeros_like(losses[tied]))
    assert not bool(has_preference[tied].any())
    assert bool(torch.isfinite(grad).all()) and torch.equal(grad[tied], torch.zeros_like(grad[tied]))
    assert bool((losses[has_preference] >= 0).all())


@SETTINGS
@given(sets(k_max=1))
def test_policy_equal_to_reference_gives_log_n_over_chosen(b):
    """The set version of DPO's ln 2: every s_i = 0, so loss = log(n / |Y+|) without weights."""
    losses, rewards, has_preference, _ = set_loss("mpo", b, policy=b["refs"][0])
    for i, real in enumerate(b["mask"]):
        scores = b["scores"][i, real]
        n_chosen = int((scores > scores.mean()).sum())
        assert math.isclose(float(losses[i]), math.log(len(scores) / n_chosen) if n_chosen else 0.0, abs_tol=1e-12)
    assert torch.equal(rewards, torch.zeros_like(rewards))


# --------------------------------------------------------------------------------------------------------------
# MPO against an independent plain-Python float64 re-derivation


def logsumexp(xs):
    top = max(xs)
    return top + math.log(sum(math.exp(x - top) for x in xs))


def mpo_by_hand(policy, ref, scores, beta, weighting, gamma):
    """One set's MPO loss and its gradient w.r.t. the policy log-probs, in Python floats; Y+ from the exact mean."""
    mean = sum(Fraction(r) for r in scores) / len(scores)
    chosen = [Fraction(r) > mean for r in scores]
    if not any(chosen):
        return 0.0, [0.0] * len(scores)
    deviation = [float(Fraction(r) - mean) for r in scores]
    log_w = [{"none": 0.0, "deviation": gamma * abs(d), "signed": gamma * d}[weighting] for d in deviation]
    s = [beta * (p - r) + lw for p, r, lw in zip(policy, ref, log_w)]  # s_i + log w_i
    every, best = logsumexp(s), logsumexp([x for x, c in zip(s, chosen) if c])
    grad = [beta * (math.exp(x - every) - (math.exp(x - best) if c else 0.0)) for x, c in zip(s, chosen)]
    return every - best, grad


def check_by_hand(b, weighting):
    losses, _, _, grad = set_loss("mpo", b, weighting=weighting)
    for i, real in enumerate(b["mask"]):
        loss, g = mpo_by_hand(b["policy"][i, real].tolist(), b["refs"][0, i, real].tolist(),
                              b["scores"][i, real].tolist(), b["beta"], weighting, b["gamma"])
        assert math.isclose(float(losses[i]), loss, rel_tol=1e-9, abs_tol=1e-9)
        close(grad[i, real], torch.tensor(g, dtype=torch.float64))


@SETTINGS
@given(sets(k_max=1, n_max=6), st.sampled_from(WEIGHTINGS))
def test_mpo_equals_a_plain_python_re_derivation(b, weighting):
    check_by_hand(b, weighting)


@SETTINGS
@given(sets(k_max=1, n_max=6, pad=False), st.sampled_from(WEIGHTINGS), st.floats(-10, 10), st.data())
def test_mpo_near_ties_keep_best_in_and_worst_out(b, weighting, low, data):
    """Two adjacent floats per set: the rounded mean often equals one of them; Y+ must still be the best ones."""
    B, N = b["mask"].shape
    best = torch.tensor(data.draw(st.lists(st.lists(st.booleans(), min_size=N, max_size=N).filter(
        lambda row: 0 < sum(row) < len(row)), min_size=B, max_size=B)))
    high, low = (torch.tensor(x, dtype=torch.float64) for x in (math.nextafter(low, math.inf), low))
    check_by_hand(dict(b, scores=torch.where(best, high, low)), weighting)


def mrpo_set_by_hand(policy, refs, scores, beta, eps_max, weighting, gamma):
    """One set's mrpo_set_loss (ARWC, adaptive eps) in Python floats: ARWC (Eq. 10) on the means over Y+ and Y-,
    Eq. 9 over the whole set, CTRO (Eq. 8), the harmonic virtual reference (Prop. 1), then mpo_by_hand."""
    K, n = len(refs), len(scores)
    mean = sum(Fraction(r) for r in scores) / n
    chosen = [Fraction(r) > mean for r in scores]
    average = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    margins = [abs(average([x for x, c in zip(ref, chosen) if c]) - average([x for x, c in zip(ref, chosen) if not c]))
               for ref in refs]
    alpha = [m / sum(margins) for m in margins] if sum(margins) > 0 else [1 / K] * K
    mass = [abs(sum(ref[i] for ref in refs)) for i in range(n)]
    eps = [eps_max * m / sum(mass) if sum(mass) > 0 else eps_max / n for m in mass]
    clipped = [refs[0]] + [[min(max(x, (1 + e) * r1), (1 - e) * r1) for x, e, r1 in zip(ref, eps, refs[0])]
                           for ref in refs[1:]]
    virtual = [-logsumexp([math.log(a) - ref[i] for a, ref in zip(alpha, clipped) if a > 0]) for i in range(n)]
    return mpo_by_hand(policy, virtual, scores, beta, weighting, gamma)


@SETTINGS
@given(sets(k_min=2, n_max=6), st.sampled_from(WEIGHTINGS), st.floats(0.0, 0.5))
def test_mrpo_set_equals_a_plain_python_re_derivation(b, weighting, eps_max):
    losses, _, _, grad = set_loss("mrpo", b, weighting=weighting, eps_max=eps_max)
    for i, real in enumerate(b["mask"]):
        loss, g = mrpo_set_by_hand(b["policy"][i, real].tolist(), b["refs"][:, i, real].tolist(),
                                   b["scores"][i, real].tolist(), b["beta"], eps_max, weighting, b["gamma"])
        assert math.isclose(float(losses[i]), loss, rel_tol=1e-9, abs_tol=1e-8)
        close(grad[i, real], torch.tensor(g, dtype=torch.float64))


def test_bad_inputs_say_what_is_wrong():
    policy, refs, scores = torch.zeros(2, 3), torch.zeros(2, 2, 3), torch.tensor([[1.0, 2, 3], [1, 2, 3]])
    one_real = torch.tensor([[True, True, True], [True, False, False]])
    with pytest.raises(ValueError, match="fewer than 2 real responses"):
        mpo_loss(policy, refs[0], scores, one_real, 0.1)
    with pytest.raises(ValueError, match="weighting"):
        mpo_loss(policy, refs[0], scores, torch.ones(2, 3, dtype=torch.bool), 0.1, weighting="alpha")
    with pytest.raises(ValueError, match="finite"):
        mrpo_set_loss(policy, refs.index_put((torch.tensor(1), torch.tensor(0), torch.tensor(2)),
                                             torch.tensor(-math.inf)), scores, torch.ones(2, 3, dtype=torch.bool), 0.1)
    with pytest.raises(ValueError, match=r"\(K, B, N\)"):
        mrpo_set_loss(policy, refs[0], scores, torch.ones(2, 3, dtype=torch.bool), 0.1)


# --------------------------------------------------------------------------------------------------------------
# set_pairs and the ranking metrics against brute force


@SETTINGS
@given(sets(n_max=6), st.sampled_from(["all", "best_worst"]))
def test_set_pairs_against_brute_force(b, mode):
    want = []
    for i, real in enumerate(b["mask"].tolist()):
        r = {j: s for j, (s, m) in enumerate(zip(b["scores"][i].tolist(), real)) if m}
        if mode == "all":
            want += [(i, j, k) for j in r for k in r if r[j] > r[k]]
        elif max(r.values()) > min(r.values()):
            want.append((i, min(j for j in r if r[j] == max(r.values())), min(j for j in r if r[j] == min(r.values()))))
    got = set_pairs(b["scores"], b["mask"], mode)
    assert all(t.dtype == torch.long for t in got)
    assert list(zip(*(t.tolist() for t in got))) == want


def metrics_by_hand(values, scores, tol):
    """Pairwise accuracy, top-1 accuracy and Kendall's tau-b of one set, from its real values and scores."""
    n = len(scores)
    tie = lambda i, j: abs(values[i] - values[j]) < tol  # noqa: E731
    ordered = [(i, j) for i in range(n) for j in range(n) if scores[i] > scores[j]]
    accuracy = sum(0.5 if tie(i, j) else float(values[i] > values[j]) for i, j in ordered) / max(len(ordered), 1)
    top = [i for i in range(n) if not any(values[j] - values[i] >= tol for j in range(n))]
    top1 = sum(scores[i] == max(scores) for i in top) / len(top)
    concordant = discordant = tied_scores = tied_values = 0
    for i in range(n):
        for j in range(i + 1, n):
            tied_scores += scores[i] == scores[j]
            tied_values += tie(i, j)
            if scores[i] != scores[j] and not tie(i, j):
                if (scores[i] > scores[j]) == (values[i] > values[j]):
                    concordant += 1
                else:
                    discordant += 1
    n0 = n * (n - 1) // 2
    denominator = math.sqrt((n0 - tied_scores) * (n0 - tied_values))
    return accuracy, top1, (concordant - discordant) / denominator if denominator else 0.0


@SETTINGS
@given(sets(n_max=6), st.data(), st.sampled_from([1.0, 0.1]))
def test_ranking_metrics_against_brute_force(b, data, beta):
    """Values on a grid of 0.5 plus jitter under TIE_NATS, so that ties by tolerance are common and unambiguous."""
    B, N = b["mask"].shape
    grid = data.draw(st.lists(st.integers(0, 3), min_size=B * N, max_size=B * N))
    jitter = data.draw(st.lists(st.sampled_from([0.0, 3e-5, -3e-5]), min_size=B * N, max_size=B * N))
    values = beta * (0.5 * torch.tensor(grid, dtype=torch.float64) + torch.tensor(jitter, dtype=torch.float64))
    values = torch.where(b["mask"], values.view(B, N), b["policy"])  # garbage in masked slots
    got = set_ranking_metrics(values, b["scores"], b["mask"], beta=beta)
    for i, real in enumerate(b["mask"]):
        scores = b["scores"][i, real].tolist()
        want = metrics_by_hand((values[i, real] / beta).tolist(), scores, mrpo.TIE_NATS)
        for key, w in zip(["pairwise_accuracy", "top1_accuracy", "kendall_tau_b"], want):
            assert math.isclose(float(got[key][i]), w, abs_tol=1e-6), (key, scores)
        assert bool(got["has_preference"][i]) == (max(scores) > min(scores))
