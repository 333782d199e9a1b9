r"""Multi-Reference Preference Optimization (MRPO): the losses, as pure functions of log-prob tensors.

Paper: Le et al., "Multi-Reference Preference Optimization for Large Language Models", AAAI 2025,
https://arxiv.org/abs/2405.16388; equation numbers are the paper's. This file imports only torch: copy it into any
trainer. DPO (Eq. 5) keeps a policy close to one reference model; MRPO keeps it close to K references, weighted by
alpha_k, through a virtual reference, the weighted harmonic mean of their probabilities (Prop. 1), inside the DPO
loss (Eq. 7). CTRO (Eq. 8) clips references k > 1 into a trust region around reference 1 whose size eps is set per
response (Eq. 9); ARWC (Eq. 10) sets alpha per pair from each reference's confidence. Baselines: Multi-DPO
(Eq. 11) and Mean-Ref (the arithmetic mixture). After the core: Proposition 2 as it holds, the weightings of
arXiv:2512.10040 (VDW, VAW, SWCW, TSW), and losses over sets of N scored responses (MPO, arXiv:2412.04628).

Shapes: B pairs, K references (row 0 is reference 1, the model the policy starts from). Every log-prob is a summed
sequence log-prob log pi(y|x) <= 0, computed in float32 at least (bf16/fp16 inputs are upcast, float64 stays).
The pair losses take policy_chosen_logps, policy_rejected_logps (B,), ref_chosen_logps, ref_rejected_logps (K, B)
(dpo_loss: (B,)) and beta; the multi-reference ones also alpha ("arwc" | "uniform" | weights: resolve_alpha), eps_max
(Eq. 9's bound, for the adaptive eps), eps (a fixed eps instead, float or (B,)) and clip (False: no CTRO); all take
loss_type and label_smoothing (margin_loss). Each returns (losses, chosen_rewards, rejected_rewards), (B,) each, the
implicit rewards beta (log pi_theta - log pi_ref) detached; the caller reduces. The losses detach the references.

Where this code and its scripts depart from the paper, the authors' code (github.com/thaihungle/MRPO) or their
setup, and why (this is the one list; the README links here):
- ARWC: Eq. 10 and Prop. 1 attach alpha_k to reference k's own term; the authors' K=2 code weights the OTHER
  reference's term with it. We follow the equations, the only reading that extends to K > 2;
  alpha=arwc_weights(rc, rr).flip(0) reproduces the authors' K=2 runs.
- Raw (unclipped) log-probs feed Eq. 9 and Eq. 10, as in the authors' code. A given alpha is normalised to sum to 1
  (Prop. 1 assumes it). Eq. 9's 0/0 (every reference log-prob of a pair 0) gives each response eps_max / 2.
- Proposition 2 as printed does not hold for every input: it holds exactly for the geometric-mean reference, and for
  the harmonic one when J(rejected) >= J(chosen) (resp. <=), see prop2_bound; CTRO bounds how far it can fail.
- Non-finite reference log-probs raise ValueError: a reference that gives a response probability 0 is a data error.
- The scripts: truncation (the prompt's end, then the response's start, as in the DPO reference code) is per
  response, so precompute.py and train.py encode a response alike; base-model dropout is off and a batch is whole
  rows of the cache, so the policy starts at reference 1 exactly (docs/exact-start.md), and no fp32 upcast of a 4-bit
  model (peft's prepare_model_for_kbit_training) moves that start; a tie (margin < 1e-4 nats) counts half in
  rewards/accuracies (TRL: wrong); the CPU demo uses lr 5e-4 (the paper's 1e-5 barely moves a 135M model).
"""

import torch
import torch.nn.functional as F

# ----------------------------------------------------------------------------------------------------------------
# Building blocks: the virtual reference (Prop. 1), CTRO (Eq. 8, 9) and ARWC (Eq. 10)

def virtual_reference_logps(ref_logps, alpha):
    r"""Log-prob of the virtual reference, Prop. 1: a weighted harmonic mean of the references' probabilities.
    ref_logps: (K, B). alpha: (K, B) or (K,), summing to 1 over k; alpha_k = 0 drops reference k (log 0 = -inf in
    the logsumexp). Returns (B,). Stable for any log-probs (e^-5000 is never formed outside log space). Bounds:
    min_k log pi_k <= log pi_tilde <= min_k (log pi_k - log alpha_k): the reference that finds y least likely rules.

    .. math::
        \tilde\pi_{ref}(y|x) = \Big(\sum_{k=1}^{K} \frac{\alpha_k}{\pi_{ref}^k(y|x)}\Big)^{-1},
        \qquad
        \log\tilde\pi_{ref}(y|x) = -\operatorname{logsumexp}_k\big(\log\alpha_k - \log\pi_{ref}^k(y|x)\big)
    """
    alpha = alpha if alpha.dim() == 2 else alpha[:, None].expand_as(ref_logps)  # (K,) -> (K, B)
    return -torch.logsumexp(torch.log(alpha) - ref_logps, dim=0)  # Prop. 1


def adaptive_eps(ref_chosen_logps, ref_rejected_logps, eps_max):
    r"""Per-response trust-region size, Eq. 9, from the RAW (unclipped) reference log-probs.
    Returns (eps_chosen (B,), eps_rejected (B,)), which sum to eps_max: the response with more log-prob mass
    (usually the longer one) gets the wider region. A pair whose reference log-probs are all 0 gets eps_max / 2 each.

    .. math::
        \epsilon(y|x) = \epsilon_{max}\,
            \frac{\big|\sum_k \log\pi_{ref}^k(y|x)\big|}
                 {\sum_{y' \in \{y_w, y_l\}} \big|\sum_k \log\pi_{ref}^k(y'|x)\big|}
    """
    mass_w, mass_l = ref_chosen_logps.sum(0).abs(), ref_rejected_logps.sum(0).abs()  # |sum_k log pi_k(y|x)|, (B,)
    total = mass_w + mass_l
    share_w = torch.where(total > 0, mass_w / torch.where(total > 0, total, 1.0), 0.5)  # Eq. 9; 0/0 -> 1/2
    return eps_max * share_w, eps_max * (1 - share_w)


def ctro_clip(ref_logps, eps):
    r"""Clipped Trust-Region Optimisation, Eq. 8: clip references k > 1 into a region around reference 1.
    Log-probs are <= 0, so (1+eps) log pi_1 is the LOWER end. ref_logps: (K, B); eps >= 0. Returns (K, B), row 0
    unchanged; eps = 0 collapses every reference onto reference 1.

    .. math::
        \log\hat\pi_{ref}^k(y|x) = \operatorname{clip}\big(\log\pi_{ref}^k(y|x),\;
            (1+\epsilon)\log\pi_{ref}^1(y|x),\; (1-\epsilon)\log\pi_{ref}^1(y|x)\big), \quad k > 1
    """
    ref1, eps = ref_logps[0], torch.as_tensor(eps, dtype=ref_logps.dtype, device=ref_logps.device)  # (B,), eps
    lower, upper = (1 + eps) * ref1, (1 - eps) * ref1  # Eq. 8, (B,) each
    others = torch.clamp(ref_logps[1:], min=lower, max=upper)  # (K-1, B), broadcast over k
    return torch.cat([ref_logps[:1], others], dim=0)


@torch.no_grad()
def arwc_weights(ref_chosen_logps, ref_rejected_logps):
    r"""Adaptive Reference Weighting Coefficients, Eq. 10: each reference's confidence on this pair, normalised.
    From the RAW log-probs. Returns alpha (K, B), without gradient; every margin 0 gives uniform weights 1/K.
    alpha_k weights reference k's OWN term in Prop. 1 (the module docstring gives the authors' K=2 variant).

    .. math::
        \alpha_k = \frac{\big|\log\pi_{ref}^k(y_w|x) - \log\pi_{ref}^k(y_l|x)\big|}
                        {\sum_{j=1}^{K} \big|\log\pi_{ref}^j(y_w|x) - \log\pi_{ref}^j(y_l|x)\big|}
    """
    confidence = (ref_chosen_logps - ref_rejected_logps).abs()  # (K, B), Eq. 10 numerator
    total = confidence.sum(0, keepdim=True)  # (1, B)
    uniform = torch.full_like(confidence, 1.0 / confidence.shape[0])
    return torch.where(total > 0, confidence / torch.where(total > 0, total, 1.0), uniform)


def resolve_alpha(alpha, ref_chosen_logps, ref_rejected_logps):
    r"""Turn the alpha option into weights (K, B) that sum to 1 over k: "arwc" (Eq. 10, per pair), "uniform" (1/K),
    or non-negative weights (K,) or (K, B), normalised over k. A single number (the paper's fixed-alpha runs), for
    K = 2 only, is the weight of reference 1 in [0, 1], as in the authors' code (reference 1 is their initial model):
    :math:`\tilde\pi_{ref} = (\alpha / \pi_{ref}^1 + (1-\alpha) / \pi_{ref}^2)^{-1}`.
    """
    K, B = ref_chosen_logps.shape
    if isinstance(alpha, str):
        if alpha == "arwc":
            return arwc_weights(ref_chosen_logps, ref_rejected_logps)
        if alpha == "uniform":
            return torch.full((K, B), 1.0 / K, dtype=ref_chosen_logps.dtype, device=ref_chosen_logps.device)
        raise ValueError(f"alpha must be 'arwc', 'uniform' or K={K} weights, got {alpha!r}")
    alpha = torch.as_tensor(alpha, dtype=ref_chosen_logps.dtype, device=ref_chosen_logps.device)
    if alpha.dim() == 0:  # a scalar: the weight of reference 1, for K = 2
        if K != 2:
            raise ValueError(f"a single number alpha={float(alpha)} is the weight of reference 1 for K=2 references "
                             f"only, but there are K={K}; give K={K} weights, 'arwc' or 'uniform'")
        if not 0 <= float(alpha) <= 1:
            raise ValueError(f"alpha={float(alpha)} (the weight of reference 1, reference 2 gets 1 - alpha) must lie "
                             f"in [0, 1]")
        alpha = torch.stack([alpha, 1 - alpha])
    if alpha.shape[0] != K or alpha.dim() > 2 or (alpha.dim() == 2 and alpha.shape[1] != B):
        raise ValueError(f"alpha has shape {tuple(alpha.shape)} but there are K={K} references and B={B} pairs; "
                         f"give K weights (one per reference) or a (K, B) tensor")
    alpha = alpha if alpha.dim() == 2 else alpha[:, None].expand(K, B)  # (K,) -> (K, B)
    if bool((alpha < 0).any()) or bool((alpha.sum(0) <= 0).any()):
        raise ValueError(f"alpha must be non-negative with a positive sum over the K={K} references, "
                         f"got {alpha[:, 0].tolist()}")
    return alpha / alpha.sum(0, keepdim=True)


def _up(x):
    return x.to(torch.promote_types(x.dtype, torch.float32))  # float32 at least: bf16/fp16 upcast, float64 kept


def _check_refs(ref_chosen_logps, ref_rejected_logps):
    """(K, B) reference log-probs, finite; returns K."""
    if ref_chosen_logps.dim() != 2 or ref_chosen_logps.shape != ref_rejected_logps.shape:
        raise ValueError(f"reference log-probs must both be (K, B); got {tuple(ref_chosen_logps.shape)} and "
                         f"{tuple(ref_rejected_logps.shape)}")
    if not (bool(torch.isfinite(ref_chosen_logps).all()) and bool(torch.isfinite(ref_rejected_logps).all())):
        raise ValueError("reference log-probs must be finite: a reference that gives a response probability 0 "
                         "(-inf) makes the virtual reference -inf; check the precomputed reference cache")
    return ref_chosen_logps.shape[0]


def _references(ref_chosen_logps, ref_rejected_logps, alpha, eps_max, eps, clip):
    """What the multi-reference losses share: the references checked, float32+ and detached, alpha (K, B) resolved
    on their RAW log-probs, then CTRO on both responses. Returns (alpha, ref_w, ref_l), (K, B) each."""
    ref_chosen_logps, ref_rejected_logps = _up(ref_chosen_logps).detach(), _up(ref_rejected_logps).detach()
    _check_refs(ref_chosen_logps, ref_rejected_logps)
    alpha = resolve_alpha(alpha, ref_chosen_logps, ref_rejected_logps)  # Eq. 10 on raw log-probs
    if not clip:
        return alpha, ref_chosen_logps, ref_rejected_logps
    eps_w, eps_l = adaptive_eps(ref_chosen_logps, ref_rejected_logps, eps_max) if eps is None else (eps, eps)  # Eq. 9
    return alpha, ctro_clip(ref_chosen_logps, eps_w), ctro_clip(ref_rejected_logps, eps_l)  # Eq. 8


def virtual_reference_pair(ref_chosen_logps, ref_rejected_logps, alpha="arwc", eps_max=0.1, eps=None, clip=True):
    r"""The virtual reference of a pair's two responses as MRPO (Eq. 7) uses it: alpha on the RAW log-probs (ARWC,
    Eq. 10, by default), CTRO (Eq. 8, 9), then Prop. 1 on the clipped log-probs.
    Returns (virtual_chosen_logps, virtual_rejected_logps), (B,) each, detached. MRPO is DPO against it:
    mrpo_loss(pc, pr, rc, rr, beta) = dpo_loss(pc, pr, *virtual_reference_pair(rc, rr), beta) (precompute.py's
    --export-trl serves TRL so).

    .. math::
        \log\tilde\pi_{ref}(y|x) = -\operatorname{logsumexp}_k\big(\log\alpha_k - \log\hat\pi_{ref}^k(y|x)\big),
        \qquad y \in \{y_w, y_l\}
    """
    alpha, ref_w, ref_l = _references(ref_chosen_logps, ref_rejected_logps, alpha, eps_max, eps, clip)
    return virtual_reference_logps(ref_w, alpha), virtual_reference_logps(ref_l, alpha)  # Prop. 1, (B,) each


# ----------------------------------------------------------------------------------------------------------------
# Losses: their arguments and what they return are in the module docstring

LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust")


def margin_loss(logits, beta, loss_type="sigmoid", label_smoothing=0.0):
    r"""A pair's loss as a function of h = log(pi_theta/pi_ref)(y_w) - log(pi_theta/pi_ref)(y_l): (B,) -> (B,).
    sigmoid is DPO's Eq. 5 (arXiv:2305.18290), with label smoothing eps > 0 cDPO (each label flipped with probability
    eps); ipo is IPO's Eq. 17 (arXiv:2310.12036v2); hinge is SLiC's and RSO's (arXiv:2305.10425, 2309.06657); robust
    is rDPO's unbiased loss for labels flipped with probability eps < 1/2 (arXiv:2403.00409), as TRL's loss_types.

    .. math::
        \text{sigmoid: } -(1-\varepsilon)\log\sigma(\beta h) - \varepsilon\log\sigma(-\beta h) \qquad
        \text{ipo: } \big(h - \tfrac{1}{2\beta}\big)^2 \qquad \text{hinge: } \max(0,\ 1 - \beta h) \qquad
        \text{robust: } \frac{-(1-\varepsilon)\log\sigma(\beta h) + \varepsilon\log\sigma(-\beta h)}{1 - 2\varepsilon}
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if not 0 <= label_smoothing < 0.5 or (label_smoothing and loss_type in ("ipo", "hinge")):
        raise ValueError(f"label_smoothing {label_smoothing} must lie in [0, 0.5), and be 0 for ipo and hinge")
    if loss_type == "ipo":
        return (logits - 1 / (2 * beta)) ** 2  # IPO, Eq. 17
    if loss_type == "hinge":
        return torch.relu(1 - beta * logits)
    if label_smoothing == 0:
        return -F.logsigmoid(beta * logits)  # Eq. 5 (robust reduces to it too)
    flipped = F.logsigmoid(-beta * logits) * label_smoothing
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * logits) * (1 - label_smoothing) - flipped  # cDPO
    return (-F.logsigmoid(beta * logits) * (1 - label_smoothing) + flipped) / (1 - 2 * label_smoothing)  # rDPO


def dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
             loss_type="sigmoid", label_smoothing=0.0):
    r"""DPO, Eq. 5, against one reference: every log-prob (B,). Policy equal to reference: loss = ln 2, rewards 0.

    .. math::
        \mathcal{L}_{DPO} = -\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\pi_{ref}(y_w|x)}
                                          - \beta\log\frac{\pi_\theta(y_l|x)}{\pi_{ref}(y_l|x)}\Big)
    """
    policy_chosen_logps, policy_rejected_logps = _up(policy_chosen_logps), _up(policy_rejected_logps)
    ref_chosen_logps, ref_rejected_logps = _up(ref_chosen_logps).detach(), _up(ref_rejected_logps).detach()
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # log pi_theta(y_w)/pi_ref(y_w)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps
    losses = margin_loss(chosen_logratios - rejected_logratios, beta, loss_type, label_smoothing)  # Eq. 5
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()


def mrpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
              alpha="arwc", eps_max=0.1, eps=None, clip=True, loss_type="sigmoid", label_smoothing=0.0):
    r"""MRPO, Eq. 7: DPO against the virtual reference of Prop. 1, with CTRO (Eq. 8, 9; \hat\pi^k the clipped
    references) and ARWC (Eq. 10). K = 1 or eps = 0 gives exactly DPO against reference 1. Rewards are against the
    virtual reference.

    .. math::
        \mathcal{L}_{MRPO} = -\log\sigma\Big(\beta\log\frac{\pi_\theta(y_w|x)}{\tilde\pi_{ref}(y_w|x)}
                                           - \beta\log\frac{\pi_\theta(y_l|x)}{\tilde\pi_{ref}(y_l|x)}\Big),
        \quad \tilde\pi_{ref} = \Big(\sum_k \frac{\alpha_k}{\hat\pi_{ref}^k}\Big)^{-1}
    """
    virtual_w, virtual_l = virtual_reference_pair(ref_chosen_logps, ref_rejected_logps, alpha, eps_max, eps, clip)
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, virtual_w, virtual_l, beta, loss_type,
                    label_smoothing)  # Eq. 7 against Prop. 1's virtual reference (Eq. 8, 9, 10 inside)


def multi_dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                   alpha="arwc", eps_max=0.1, eps=None, clip=True, loss_type="sigmoid", label_smoothing=0.0):
    r"""Multi-DPO baseline, Eq. 11: the alpha-weighted sum of K DPO losses, one per (clipped) reference.
    With CTRO and alpha as in mrpo_loss (the paper's baseline uses them too). Rewards are the alpha-weighted mean of
    the per-reference rewards, i.e. against the geometric mixture sum_k alpha_k log pi_k.

    .. math::
        \mathcal{L}_{Multi\text{-}DPO} = \sum_{k=1}^{K} \alpha_k\, \mathcal{L}_{DPO}(\pi_\theta; \hat\pi_{ref}^k)
    """
    policy_chosen_logps, policy_rejected_logps = _up(policy_chosen_logps), _up(policy_rejected_logps)
    alpha, ref_w, ref_l = _references(ref_chosen_logps, ref_rejected_logps, alpha, eps_max, eps, clip)  # (K, B)
    losses_k, _, _ = dpo_loss(policy_chosen_logps.expand_as(ref_w), policy_rejected_logps.expand_as(ref_l),
                              ref_w, ref_l, beta, loss_type, label_smoothing)  # (K, B): one DPO loss per reference
    losses = (alpha * losses_k).sum(0)  # Eq. 11
    geo_w, geo_l = (alpha * ref_w).sum(0), (alpha * ref_l).sum(0)  # sum_k alpha_k log pi_k, (B,)
    return losses, (beta * (policy_chosen_logps - geo_w)).detach(), (beta * (policy_rejected_logps - geo_l)).detach()


def mean_ref_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                  alpha="arwc", eps_max=0.1, eps=None, clip=True, loss_type="sigmoid", label_smoothing=0.0):
    r"""Mean-Ref baseline: DPO against the arithmetic mixture of the (clipped) references, which the reference that
    finds y MOST likely dominates (the opposite of the harmonic virtual reference).

    .. math::
        \log\bar\pi_{ref}(y|x) = \log\sum_k \alpha_k\,\hat\pi_{ref}^k(y|x)
                               = \operatorname{logsumexp}_k\big(\log\alpha_k + \log\hat\pi_{ref}^k(y|x)\big)
    """
    alpha, ref_w, ref_l = _references(ref_chosen_logps, ref_rejected_logps, alpha, eps_max, eps, clip)  # (K, B)
    mean_w, mean_l = (torch.logsumexp(torch.log(alpha) + ref, dim=0) for ref in (ref_w, ref_l))  # (B,) each
    return dpo_loss(policy_chosen_logps, policy_rejected_logps, mean_w, mean_l, beta, loss_type, label_smoothing)


LOSSES = {"dpo": dpo_loss, "mrpo": mrpo_loss, "multi_dpo": multi_dpo_loss, "mean_ref": mean_ref_loss}


def compute_loss(name, policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                 alpha="arwc", eps_max=0.1, eps=None, clip=True, loss_type="sigmoid", label_smoothing=0.0):
    """Dispatch by name over LOSSES with (K, B) references; "dpo" uses reference 1 (row 0) only."""
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; choose one of {sorted(LOSSES)}")
    if name == "dpo":
        return dpo_loss(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps[0], ref_rejected_logps[0], beta,
                        loss_type, label_smoothing)
    return LOSSES[name](policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta,
                        alpha, eps_max, eps, clip, loss_type, label_smoothing)


# ================================================================================================================
# Beyond the paper's core: the accuracy metric, Proposition 2 as it holds, the weightings of arXiv:2512.10040 and
# losses over sets of scored responses (MPO)

TIE_NATS = 1e-4  # a margin under this many nats is a tie: float noise, e.g. between the same policy in other rows


def reward_accuracy(chosen_rewards, rejected_rewards, beta=1.0, tol=TIE_NATS):
    r"""Preference accuracy (TRL's rewards/accuracies) per pair, from rewards (B,) with their beta or log-probs with
    beta = 1: 1/2 for a tie, a margin under tol nats, so that a policy equal to its reference scores 0.5, not 0:
    acc = 1[m >= tol] + 1[|m| < tol] / 2, with m = (r(x, y_w) - r(x, y_l)) / beta."""
    margin = (chosen_rewards.float() - rejected_rewards.float()) / beta  # (B,) in nats
    return torch.where(margin.abs() < tol, 0.5, (margin > 0).float())  # (B,) float32; the mean is the accuracy


def prop2_bound(ref_chosen_logps, ref_rejected_logps, alpha):
    r"""Prop. 2 as it holds: is MRPO's gradient larger (or smaller) than Multi-DPO's? Inputs (K, B), clipped if CTRO
    is on. With the policy margin h, reference k's margin m_k and d_k = beta (m_k - h), dL_k/dh = -beta sigmoid(d_k):
    |grad| is beta sum_k alpha_k sigmoid(d_k) |grad h| for Multi-DPO (Eq. 11), beta sigmoid(d_tilde) |grad h| for
    MRPO, d_tilde = beta (m_tilde - h). Prop. 2 as printed compares them when all d_k share a sign. What is true:
    (a) Geometric mean, m_geo = sum_k alpha_k m_k: d_geo = sum_k alpha_k d_k, and sigmoid is concave on [0, inf),
        convex on (-inf, 0], so by Jensen all d_k >= 0 => sigmoid(d_geo) >= sum_k alpha_k sigmoid(d_k) (<= if <= 0).
    (b) Harmonic (Prop. 1): with a_k = -log pi_k(y_w), b_k = -log pi_k(y_l), log pi_tilde(y_w) =
        -logsumexp_k(log alpha_k + a_k) = -sum_k alpha_k a_k - J_alpha(a), so d_tilde = sum_k alpha_k d_k +
        beta (J(b) - J(a)): (a) carries over exactly when all d_k >= 0 and J(b) >= J(a) (all <= 0 and J(b) <= J(a)),
        and can fail otherwise: references that disagree more on y_w than on y_l pull m_tilde below m_geo.
    (c) With CTRO every a_k lies in [(1-eps_w) a_1, (1+eps_w) a_1] (likewise b) and J(x) <= max x - min x, so
        |J(b) - J(a)| <= 2 max(eps_w a_1, eps_l b_1) =: delta; sigmoid being 1/4-Lipschitz, the printed inequalities
        hold up to beta delta / 4, exactly at eps = 0. Returns J(b) - J(a), (B,): d_tilde's shift, divided by beta.
    Here J_alpha(a) = logsumexp_k(log alpha_k + a_k) - sum_k alpha_k a_k >= 0 (Jensen's gap of log-sum-exp), zero
    iff all a_k with alpha_k > 0 are equal, at most max_k a_k - min_k a_k.
    """
    gap = lambda a: torch.logsumexp(torch.log(alpha) + a, dim=0) - (alpha * a).sum(0)  # noqa: E731  J_alpha, (B,)
    return gap(-ref_rejected_logps) - gap(-ref_chosen_logps)


# ----------------------------------------------------------------------------------------------------------------
# Weightings that never look at the pair being trained on (Echarghaoui and Wu, arXiv:2512.10040), with m_k reference
# k's margin: VDW and VAW fix alpha (K,) from M held-out pairs, SWCW sets it each step from the batches trained on,
# TSW picks one reference per step (a bandit). alpha_k = 0 drops reference k from Prop. 1 exactly, but k > 1 still
# counts in Eq. 9's adaptive eps: pass a fixed eps, or leave its row out.

def _margins(ref_chosen_logps, ref_rejected_logps, validation=False):
    """m_k: (K, N) -> (K, N), float64 on the CPU (sums over many pairs); validation: M >= 1 finite pairs."""
    if validation:
        _check_refs(ref_chosen_logps, ref_rejected_logps)
        if ref_chosen_logps.shape[1] == 0:
            raise ValueError("no validation pairs (M = 0): VDW and VAW need the references' log-probs on at least "
                             "one held-out pair; give (K, M) tensors with M >= 1")
    return ref_chosen_logps.detach().to("cpu", torch.float64) - ref_rejected_logps.detach().to("cpu", torch.float64)


def _normalise(scores, like=None):
    """Scores (K,) >= 0 -> weights (K,) summing to 1 (in like's dtype and device); all 0 -> uniform 1/K."""
    total = scores.sum()
    alpha = scores / total if total > 0 else torch.full_like(scores, 1.0 / scores.shape[0])
    return alpha if like is None else alpha.to(like.device, like.dtype)


@torch.no_grad()
def vdw_weights(val_chosen_logps, val_rejected_logps):
    r"""Validation-set discrimination weighting (VDW, arXiv:2512.10040): ARWC's confidence, summed over a held-out set.
    val_*: (K, M) RAW reference log-probs on M validation pairs, never the training ones. Returns alpha (K,) in their
    dtype and device, fixed for the run; M = 1 is ARWC (Eq. 10). Like ARWC it rewards large margins, right or wrong.

    .. math::
        \alpha_k = \frac{\sum_{i=1}^{M} \big|m_k^{(i)}\big|}{\sum_{j=1}^{K} \sum_{i=1}^{M} \big|m_j^{(i)}\big|},
        \qquad m_k^{(i)} = \log\pi_{ref}^k(y_w^{(i)}|x^{(i)}) - \log\pi_{ref}^k(y_l^{(i)}|x^{(i)})
    """
    margins = _margins(val_chosen_logps, val_rejected_logps, validation=True)  # (K, M)
    return _normalise(margins.abs().sum(1), like=val_chosen_logps)  # VDW, (K,)


@torch.no_grad()
def vaw_weights(val_chosen_logps, val_rejected_logps):
    r"""Validation-set accuracy weighting (VAW, arXiv:2512.10040): each reference's preference accuracy, normalised.
    val_*, alpha as in vdw_weights. A tie counts as wrong; no reference ever right (swapped labels?) gives 1/K each.

    .. math::
        \alpha_k = \frac{n_k}{\sum_{j=1}^{K} n_j}, \qquad n_k = \#\{i : m_k^{(i)} > 0\}
    """
    margins = _margins(val_chosen_logps, val_rejected_logps, validation=True)  # (K, M)
    return _normalise((margins > 0).sum(1).to(torch.float64), like=val_chosen_logps)  # VAW, (K,)


class SlidingWindowWeights:
    r"""Sliding-window confidence weighting (SWCW, arXiv:2512.10040): ARWC's confidence pooled over the last W batches.
    N_t (below) counts the pairs of batches t-W .. t-1: step t's weights never see batch t (ARWC's do). Per step:
    alpha = sw.alpha() (uniform at first); the loss on batch t; sw.update(ref_chosen_t, ref_rejected_t).
    state_dict() is plain Python (weights_only-safe): a checkpoint resumes exactly.

    .. math::
        c_k^{(t)} = \frac{1}{N_t} \sum_{s=t-W}^{t-1} \sum_{i \in \text{batch } s} \big|m_k^{(i)}\big|,
        \qquad \alpha_k^{(t)} = \frac{c_k^{(t)}}{\sum_{j=1}^{K} c_j^{(t)}}
    """

    def __init__(self, K, window=1):
        if K < 1 or window < 1:
            raise ValueError(f"SlidingWindowWeights needs K >= 1 and window >= 1, got K={K}, window={window}")
        self.K, self.window = K, window
        self.sums, self.counts = [], []  # per batch of the window, oldest first: [sum_i |m_k(i)| for k], its pairs

    def confidence(self):
        """c_k: mean |m_k| per pair over the window, (K,) float64; zeros before any update."""
        if sum(self.counts) == 0:
            return torch.zeros(self.K, dtype=torch.float64)
        return torch.tensor(self.sums, dtype=torch.float64).sum(0) / sum(self.counts)  # (K,)

    def alpha(self, dtype=torch.float32):
        """alpha (K,) for the coming step, from the batches already passed to update()."""
        return _normalise(self.confidence()).to(dtype)  # SWCW

    @torch.no_grad()
    def update(self, ref_chosen_logps, ref_rejected_logps):
        """Record a batch AFTER its step: (K, B) RAW reference log-probs. Keeps the last `window` batches."""
        K = _check_refs(ref_chosen_logps, ref_rejected_logps)
        if K != self.K:
            raise ValueError(f"SlidingWindowWeights was built for K={self.K} references but this batch has K={K}")
        margins = _margins(ref_chosen_logps, ref_rejected_logps)  # (K, B)
        self.sums.append(margins.abs().sum(1).tolist())  # (K,) as floats
        self.counts.append(margins.shape[1])
        del self.sums[:-self.window], self.counts[:-self.window]

    def state_dict(self):
        return {"K": self.K, "window": self.window, "sums": [list(s) for s in self.sums], "counts": list(self.counts)}

    def load_state_dict(self, state):
        if (state["K"], state["window"]) != (self.K, self.window):
            raise ValueError(f"the checkpoint's sliding window has K={state['K']}, window={state['window']} but this "
                             f"run has K={self.K}, window={self.window}; resume with the same references and window")
        self.sums, self.counts = [list(s) for s in state["sums"]], list(state["counts"])


class ThompsonSamplingWeights:
    r"""Thompson-sampling weighting (TSW, arXiv:2512.10040): reference choice as a K-armed Bernoulli bandit.
    Beta(a_k, b_k) is the posterior on "a step against reference k helps". Per step: k, alpha = choose(); DPO against
    k alone (mrpo_loss, alpha = e_k, clip=False); update(k, reward), reward 1 if held-out accuracy on a random
    validation subset rose (strictly). state_dict() (weights_only-safe) resumes the choices within a torch version.

    .. math::
        \theta_k \sim \mathrm{Beta}(a_k, b_k), \quad k^* = \arg\max_k \theta_k, \quad \alpha = e_{k^*};
        \qquad a_{k^*} \mathrel{+}= r, \quad b_{k^*} \mathrel{+}= 1 - r
    """

    def __init__(self, K, prior=(5.0, 5.0), seed=0):
        a0, b0 = (float(p) for p in prior)
        if K < 1 or not (a0 > 0 and b0 > 0):
            raise ValueError(f"ThompsonSamplingWeights needs K >= 1 and a Beta prior with both parameters > 0, "
                             f"got K={K}, prior={tuple(prior)}")
        self.K, self.prior = K, (a0, b0)
        self.a, self.b = [a0] * K, [b0] * K  # posterior Beta(a_k, b_k) per reference
        self.generator = torch.Generator().manual_seed(seed)

    def choose(self, dtype=torch.float32):
        """-> (k*, alpha): the reference to train against this step and its one-hot weights (K,). theta is drawn from
        this object's generator alone: the global RNG is left as it was."""
        seed = int(torch.randint(0, 2**62, (), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(seed)
            theta = torch.distributions.Beta(*(torch.tensor(x, dtype=torch.float64) for x in (self.a, self.b))).sample()
        k = int(theta.argmax())  # TSW
        return k, F.one_hot(torch.tensor(k), self.K).to(dtype)

    def update(self, k, reward):
        """Bernoulli reward for the reference chosen this step: success adds 1 to a_k, failure 1 to b_k."""
        if not 0 <= int(k) < self.K or reward not in (True, False):
            raise ValueError(f"update(k, reward) needs 0 <= k < K={self.K} and a bool reward, got {k!r}, {reward!r}")
        (self.a if reward else self.b)[int(k)] += 1.0

    def posterior_mean(self):
        """E[theta_k] = a_k / (a_k + b_k), (K,) float64: each reference's estimated chance of helping a step."""
        return torch.tensor([a / (a + b) for a, b in zip(self.a, self.b)], dtype=torch.float64)

    def state_dict(self):
        return {"K": self.K, "prior": self.prior, "a": list(self.a), "b": list(self.b),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state):
        if (state["K"], tuple(state["prior"])) != (self.K, self.prior):
            raise ValueError(f"the checkpoint's Thompson sampler has K={state['K']}, prior={tuple(state['prior'])} but "
                             f"this run has K={self.K}, prior={self.prior}; resume with the same references and prior")
        self.a, self.b = list(state["a"]), list(state["b"])
        self.generator.set_state(state["generator"])


# ----------------------------------------------------------------------------------------------------------------
# Sets of scored responses: MPO (Gupta et al., "Multi-Preference Optimization: Generalizing DPO via Set-Level
# Contrasts", https://arxiv.org/abs/2412.04628v4), against one reference or K. A prompt has n >= 2 responses y_i
# scored r_i (higher is better); those above the mean r_bar form Y+, the rest Y-. B sets padded to N slots: mask
# (B, N) bool marks the real responses; policy_logps, scores, rewards (B, N); ref_logps (B, N), or (K, B, N) for K;
# alpha (K, B); losses, has_preference (B,). Masked slots may hold nan or inf: they reach no loss, reward or gradient.
# A set whose real scores all tie has no preference: loss 0, gradient 0. Fewer than 2 real responses: ValueError.

def _set_scores(scores, mask):
    """Checks a padded batch of sets; returns the scores (float32 at least, 0 in masked slots) and each set's best
    and worst real score, (B,) each: best > worst iff the set has a preference."""
    if mask.dtype != torch.bool or mask.dim() != 2 or scores.shape != mask.shape:
        raise ValueError(f"scores and mask must both be (B, N), mask of dtype bool; got {tuple(scores.shape)} and "
                         f"{tuple(mask.shape)} {mask.dtype}")
    short = (mask.sum(1) < 2).nonzero().flatten().tolist()
    if short:
        raise ValueError(f"sets {short[:8]} have fewer than 2 real responses in mask; a set needs at least 2 to "
                         f"compare: drop those prompts, or score more responses for them")
    scores = torch.where(mask, _up(scores), 0.0)
    if not bool(torch.isfinite(scores).all()):
        raise ValueError("scores of real responses must be finite; check the reward model's scores")
    return scores, torch.where(mask, scores, -torch.inf).amax(1), torch.where(mask, scores, torch.inf).amin(1)


def _set_partition(scores, mask, weighting, gamma):
    """Y+ (B, N) bool, has_preference (B,) and the log-weights log w_i (B, N), -inf in masked slots."""
    if weighting not in ("none", "deviation", "signed"):
        raise ValueError(f"weighting must be 'none', 'deviation' or 'signed', got {weighting!r}")
    scores, best, worst = _set_scores(scores, mask)
    mean = scores.sum(1, keepdim=True) / mask.sum(1, keepdim=True)  # r_bar over the real responses, (B, 1)
    # Y+ = {i : r_i > r_bar}. The guards act only if rounding puts r_bar outside (worst, best), e.g. for near-ties.
    chosen = mask & ((scores > mean) | (scores == best[:, None])) & (scores > worst[:, None])
    deviation = scores - mean
    log_w = {"none": 0 * deviation, "deviation": gamma * deviation.abs(), "signed": gamma * deviation}[weighting]
    return chosen, best > worst, torch.where(mask, log_w, -torch.inf)


def mpo_loss(policy_logps, ref_logps, scores, mask, beta, weighting="none", gamma=1.0):
    r"""MPO: a set-level Bradley-Terry loss, Y+ against all n responses of the prompt, against one reference.
    weighting: "none" (w_i = 1, MPO), "deviation" (e^{gamma |r_i - r_bar|}, W-MPO as the ICLR 2026 reviews describe
    it, openreview.net/forum?id=iXo8oV3Pz0) or "signed" (e^{gamma (r_i - r_bar)}, as SWEPO, v1, and REFA,
    arXiv:2412.16378v4 Eq. 5, write it); gamma is the paper's alpha. n = 2: "none" and "deviation" give DPO (Eq. 5),
    "signed" -log sigma(s_w - s_l + gamma (r_w - r_l)). Returns (losses, rewards s_i detached, has_preference).

    .. math::
        \mathcal{L}_{MPO} = -\log\frac{\sum_{i \in Y^+} w_i\, e^{s_i}}{\sum_{i=1}^{n} w_i\, e^{s_i}},
        \qquad s_i = \beta\log\frac{\pi_\theta(y_i|x)}{\pi_{ref}(y_i|x)},
        \qquad Y^+ = \{i : r_i > \bar r\}, \quad \bar r = \tfrac1n \sum_{i=1}^{n} r_i
    """
    if policy_logps.shape != mask.shape or ref_logps.shape != mask.shape:
        raise ValueError(f"policy_logps and ref_logps must be (B, N) like mask {tuple(mask.shape)}; got "
                         f"{tuple(policy_logps.shape)} and {tuple(ref_logps.shape)}")
    chosen, has_preference, log_w = _set_partition(scores, mask, weighting, gamma)
    rewards = beta * torch.where(mask, _up(policy_logps) - _up(ref_logps).detach(), 0.0)  # s_i; masked slots -> 0
    log_w_chosen = torch.where(chosen | ~has_preference[:, None], log_w, -torch.inf)  # no Y+: numerator = denominator
    losses = torch.logsumexp(rewards + log_w, 1) - torch.logsumexp(rewards + log_w_chosen, 1)  # MPO
    return losses, rewards.detach(), has_preference


def set_adaptive_eps(ref_logps, mask, eps_max):
    r"""Eq. 9 over a set: each response's share of the reference log-prob mass of ALL the prompt's real responses.
    The paper sums over "all possible outputs": y_w and y_l for a pair, n responses for a set, whose eps then sum to
    eps_max. ref_logps: (K, B, N) RAW. Returns eps (B, N), 0 in masked slots; all-zero mass: eps_max / n each.

    .. math::
        \epsilon(y_i|x) = \epsilon_{max}\,\frac{\big|\sum_k \log\pi_{ref}^k(y_i|x)\big|}
                                              {\sum_{j=1}^{n} \big|\sum_k \log\pi_{ref}^k(y_j|x)\big|}
    """
    mass = torch.where(mask, ref_logps.sum(0).abs(), 0.0)  # |sum_k log pi_k(y_i|x)|, (B, N)
    total = mass.sum(1, keepdim=True)  # over the real responses of the set, (B, 1)
    uniform = mask / mask.sum(1, keepdim=True)
    return eps_max * torch.where(total > 0, mass / torch.where(total > 0, total, 1.0), uniform)  # Eq. 9


def mrpo_set_loss(policy_logps, ref_logps, scores, mask, beta, alpha="arwc", eps_max=0.1, eps=None, clip=True,
                  weighting="none", gamma=1.0):
    r"""mpo_loss against the virtual reference (Prop. 1) of K CTRO-clipped references (Eq. 8, 9) weighted by ARWC
    (Eq. 10): Eq. 7 with MPO's loss, each choice the pair version's at n = 2. Each response has its own virtual
    reference and CTRO region (eps from set_adaptive_eps), a set one alpha; m_k is reference k's margin on the
    contrast trained, Y+ against Y-, |mean| so that an inconsistent ordering earns no confidence. Options as
    mrpo_loss's; eps may be (B, N). ref_logps: (K, B, N). Returns mpo_loss's triple; K = 1 or eps = 0: mpo_loss.

    .. math::
        \log\tilde\pi_{ref}(y_i|x) = -\operatorname{logsumexp}_k\big(\log\alpha_k - \log\hat\pi_{ref}^k(y_i|x)\big),
        \qquad \alpha_k = \frac{|m_k|}{\sum_j |m_j|}, \quad
        m_k = \frac{1}{|Y^+|}\sum_{i \in Y^+}\log\pi_{ref}^k(y_i|x)
            - \frac{1}{|Y^-|}\sum_{i \in Y^-}\log\pi_{ref}^k(y_i|x)
    """
    if ref_logps.dim() != 3 or ref_logps.shape[1:] != mask.shape:
        raise ValueError(f"ref_logps must be (K, B, N) with (B, N) = mask's {tuple(mask.shape)}; got "
                         f"{tuple(ref_logps.shape)} (one reference: ref_logps[None])")
    chosen, _, _ = _set_partition(scores, mask, weighting, gamma)
    ref_logps = torch.where(mask, _up(ref_logps).detach(), 0.0)  # (K, B, N)
    _check_refs(ref_logps[:, mask], ref_logps[:, mask])  # the real slots, (K, M), must be finite
    K, B, N = ref_logps.shape
    rejected = mask & ~chosen  # Y-
    mean_chosen = (ref_logps * chosen).sum(2) / chosen.sum(1).clamp(min=1)  # mean_{Y+} log pi_k, (K, B)
    mean_rejected = (ref_logps * rejected).sum(2) / rejected.sum(1).clamp(min=1)
    alpha = resolve_alpha(alpha, mean_chosen, mean_rejected)  # Eq. 10 on the set means, (K, B)
    if clip:
        eps = set_adaptive_eps(ref_logps, mask, eps_max) if eps is None else eps  # Eq. 9, (B, N)
        eps = torch.as_tensor(eps, dtype=ref_logps.dtype, device=ref_logps.device)
        ref_logps = ctro_clip(ref_logps, eps[:, None] if eps.dim() == 1 else eps)  # Eq. 8, (K, B, N)
    alpha = alpha[:, :, None].expand(K, B, N).reshape(K, B * N)  # each response gets its set's alpha
    virtual = virtual_reference_logps(ref_logps.reshape(K, B * N), alpha).view(B, N)  # Prop. 1
    return mpo_loss(policy_logps, virtual, scores, mask, beta, weighting, gamma)  # Eq. 7, set-level


def set_pairs(scores, mask, mode="all"):
    """The pairs of each set for the pair losses: (s, w, l), LongTensors (P,) of set, better and worse indices: "all",
    every pair of real responses with r_i > r_j, by set, then i, then j; "best_worst", a set's best against its worst
    (the lowest index among ties); none from a tie. mrpo_loss then takes policy_logps[s, w], ref_logps[:, s, w], ..."""
    scores, best, worst = _set_scores(scores, mask)
    if mode == "all":
        better = mask[:, :, None] & mask[:, None, :] & (scores[:, :, None] > scores[:, None, :])  # (B, N, N): i > j
        return better.nonzero(as_tuple=True)
    if mode == "best_worst":
        sets = (best > worst).nonzero().flatten()
        best_idx = torch.where(mask, scores, -torch.inf).argmax(1)  # argmax/argmin return the first of tied values
        worst_idx = torch.where(mask, scores, torch.inf).argmin(1)
        return sets, best_idx[sets], worst_idx[sets]
    raise ValueError(f"mode must be 'all' or 'best_worst', got {mode!r}")


@torch.no_grad()
def set_ranking_metrics(values, scores, mask, beta=1.0, tol=TIE_NATS):
    r"""How well values (B, N) rank each set by score: implicit rewards with their beta, or log-probs. Per set (B,),
    with ties in values as in reward_accuracy: pairwise_accuracy, reward_accuracy over the pairs with r_i > r_j;
    top1_accuracy, the share of top-valued responses (none beaten by tol) with the best score (chance if all tie);
    kendall_tau_b (0 if all values tie), with n_c, n_d concordant and discordant pairs, n_1, n_2 tied in scores, in
    values; and has_preference, the sets to average over: m["kendall_tau_b"][m["has_preference"]].mean().

    .. math::
        \tau_b = \frac{n_c - n_d}{\sqrt{(n_0 - n_1)(n_0 - n_2)}}, \qquad n_0 = \tbinom{n}{2}
    """
    scores, best, worst = _set_scores(scores, mask)
    values = torch.where(mask, values, 0.0)
    pair = mask[:, :, None] & mask[:, None, :]  # (B, N, N): (i, j) both real
    better = pair & (scores[:, :, None] > scores[:, None, :])
    accuracy = reward_accuracy(values[:, :, None], values[:, None, :], beta, tol)  # (B, N, N)
    margin = (values.float()[:, :, None] - values.float()[:, None, :]) / beta  # v_i - v_j, as reward_accuracy
    sign_values = torch.where(margin.abs() < tol, 0.0, margin.sign()) * pair
    sign_scores = (scores[:, :, None] - scores[:, None, :]).sign().float() * pair
    top = mask & ~(pair & (margin >= tol)).any(1)  # no real j has v_j - v_i >= tol
    norm = (sign_scores.square().sum((1, 2)) * sign_values.square().sum((1, 2))).sqrt()  # 2 sqrt((n0-n1)(n0-n2))
    tau = (sign_scores * sign_values).sum((1, 2)) / norm.clamp(min=1)  # 2 (n_c - n_d) / norm
    return {"pairwise_accuracy": (accuracy * better).sum((1, 2)) / better.sum((1, 2)).clamp(min=1),
            "top1_accuracy": (top & (scores == best[:, None])).sum(1) / top.sum(1),
            "kendall_tau_b": torch.where(norm > 0, tau, 0.0), "has_preference": best > worst}
