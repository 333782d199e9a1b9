"""precompute.pair_logps (prefix sharing, packed rows, output layer on scored positions only) against a plain
forward of each sequence alone: the same per-pair log-probs, the same loss for every loss of mrpo.LOSSES, and the
same LoRA gradients, to float32 rounding.

The reference here is deliberately naive: each sequence is run alone through model(input_ids).logits over the whole
vocabulary at every position, and its response tokens t >= max(start, 1) are summed, nothing shared or skipped.
"""

import os

import pytest
import torch

import mrpo
import precompute
from precompute import Encoded

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_logps(model, encoded_pairs):
    """(chosen (B,), rejected (B,)): every sequence alone, full logits, summed response log-probs."""
    out = []
    for seq in [c for c, _ in encoded_pairs] + [r for _, r in encoded_pairs]:
        logits = model(input_ids=torch.tensor([seq.ids])).logits[0].float()  # (T, V)
        logps = torch.log_softmax(logits, dim=-1)
        out.append(sum((logps[t - 1, seq.ids[t]] for t in range(max(seq.start, 1), len(seq.ids))), torch.tensor(0.0)))
    out = torch.stack(out)
    return out[:len(encoded_pairs)], out[len(encoded_pairs):]


def random_pairs(vocab, seed=0):
    """Pairs that cover the layouts pair_logps must handle: a shared prompt; prompts that differ at the start
    (truncation kept different ends); prompts that differ only near the end; different prompt lengths; one response
    far longer than the other; a one-token response; and an empty (fully truncated) response."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    p, q = ids(20), ids(14)
    return [
        (Encoded(p + ids(6), 20, False), Encoded(p + ids(9), 20, False)),
        (Encoded(ids(12) + ids(5), 12, True), Encoded(ids(12) + ids(7), 12, True)),  # prompts differ from token 0
        (Encoded(q + ids(3), 14, False), Encoded(q[:11] + ids(3) + ids(4), 14, True)),  # differ from token 11
        (Encoded(q + ids(5), 14, False), Encoded(q[:10] + ids(6), 10, True)),  # different prompt lengths
        (Encoded(p[:8] + ids(60), 8, False), Encoded(p[:8] + ids(2), 8, False)),  # one response much longer
        (Encoded(p[:5] + ids(1), 5, False), Encoded(p[:5] + ids(4), 5, False)),  # a one-token response
        (Encoded(p[:9], 9, True), Encoded(p[:9] + ids(3), 9, False)),  # nothing left to score on one side
    ]


def tiny_llama(attn):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(attn):
    """Gemma 3 with a sliding window of 6 positions in every other layer (so it binds in these short sequences)
    and a final logit soft-cap, both of which pair_logps must reproduce."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig
    torch.manual_seed(0)
    config = Gemma3TextConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
                              sliding_window=6, layer_types=["sliding_attention", "full_attention"] * 2,
                              final_logit_softcapping=5.0, query_pre_attn_scalar=8, attn_implementation=attn)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():  # the random init is near zero; make the logits large enough for the soft-cap to matter
        model.lm_head.weight.mul_(40)
    return model


def tiny_qwen2(attn):
    from transformers import Qwen2Config, Qwen2ForCausalLM
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         attn_implementation=attn)
    return Qwen2ForCausalLM(config).eval()


MODELS = {"llama": tiny_llama, "gemma3": tiny_gemma3, "qwen2": tiny_qwen2}


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("row_tokens", [1, 100, 10_000])  # a row per pair, a few pairs per row, all in one row
def test_pair_logps_equal_plain_forward(name, attn, row_tokens):
    model = MODELS[name](attn)
    pairs = random_pairs(model.config.vocab_size)
    with torch.no_grad():
        fast = precompute.pair_logps(model, pairs, row_tokens=row_tokens)
        plain = plain_logps(model, pairs)
    for f, p in zip(fast, plain):
        assert f.dtype == torch.float32 and f.shape == (len(pairs),)
        torch.testing.assert_close(f, p, rtol=1e-5, atol=1e-4)
    assert fast[0][-1] == 0 and plain[0][-1] == 0  # the fully truncated response scores nothing


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_pairwise_attention_leaves_plain_forwards_and_generation_alone(name, attn):
    """pair_logps installs pairwise_attention in the model for good; a plain forward (with a padded batch and its
    2D mask) and greedy generation afterwards give what they gave before it, and pair_logps still matches them."""
    model = MODELS[name](attn)
    pairs = random_pairs(model.config.vocab_size)
    ids = torch.tensor([pairs[0][0].ids[:12], [0] * 3 + pairs[1][0].ids[:9]])  # the second row left-padded
    mask = torch.tensor([[1] * 12, [0] * 3 + [1] * 9])
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
        generated = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False)
        plain = plain_logps(model, pairs)
        fast = precompute.pair_logps(model, pairs)
        assert model.config._attn_implementation == "pairwise_" + attn
        assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, logits)
        assert torch.equal(model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False),
                           generated)
        torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(precompute.pair_logps(model, pairs), fast, rtol=0, atol=0)


def test_token_logps_of_a_position_do_not_depend_on_its_neighbours():
    """fp32, 26 vs 24 scored positions: each position gets the same bits whichever rows are scored with it. The
    chunks are nearly equal (13 + 13, not 24 + 2): an fp32 matmul of fewer than 12 rows gives other last bits on the
    CPUs this project is measured on, which would make the cached and the policy's log-probs differ by batching."""
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)  # sizes at which the short-matmul difference shows (it does not at hidden size 32)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=1000, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2)).eval()
    with torch.no_grad():  # logits of a trained model's size, so that last-bit differences survive the log-softmax
        model.lm_head.weight.mul_(50)
    hidden = torch.randn(26, model.config.hidden_size)
    targets = torch.randint(0, model.config.vocab_size, (26,))
    chunk = 24 * model.config.vocab_size  # 24 rows a chunk
    with torch.no_grad():
        all_26 = precompute.token_logps(model, hidden, targets, chunk=chunk)
        last_24 = precompute.token_logps(model, hidden[2:], targets[2:], chunk=chunk)
        plain = torch.log_softmax(model.lm_head(hidden), dim=-1)[torch.arange(26), targets]
    assert torch.equal(all_26[2:], last_24)
    torch.testing.assert_close(all_26, plain, rtol=1e-6, atol=1e-6)


def test_gemma3_window_and_softcap_are_not_dropped():
    """The test above would pass vacuously if the window or the soft-cap did nothing: show both change the result."""
    model = tiny_gemma3("sdpa")
    pairs = random_pairs(model.config.vocab_size)
    with torch.no_grad():
        reference = plain_logps(model, pairs)[0]
        model.config.sliding_window = 10_000
        no_window = plain_logps(model, pairs)[0]
        model.config.sliding_window = 6
        model.config.final_logit_softcapping = None
        no_cap = plain_logps(model, pairs)[0]
    assert (reference - no_window).abs().max() > 1e-2
    assert (reference - no_cap).abs().max() > 1e-2


def test_layout_of_a_packed_row():
    """Hand-checked row: pair 0 shares 2 prompt tokens, pair 1 shares none (its prompts differ at token 0)."""
    pairs = [(Encoded([1, 2, 3, 4], 2, False), Encoded([1, 2, 5], 2, False)),
             (Encoded([7, 8], 1, False), Encoded([6, 9], 1, False))]
    row = precompute.pack_row(pairs)
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5, 7, 8, 6, 9]]
    assert row.position_ids.tolist() == [[0, 1, 2, 3, 2, 0, 1, 0, 1]]
    assert row.branch.tolist() == [0, 0, 1, 1, 2, 1, 1, 2, 2]
    assert row.predictors.tolist() == [1, 2, 1, 5, 7]  # 3 after 2, 4 after 3, 5 after 2, 8 after 7, 9 after 6
    assert row.targets.tolist() == [3, 4, 5, 8, 9]
    assert row.sequence.tolist() == [0, 0, 1, 2, 3]
    mask = precompute.attention_mask(tiny_llama("sdpa").config, row)[0, 0]
    assert mask[4].tolist() == [True, True, False, False, True, False, False, False, False]  # 5 sees 1 2 5 only
    assert mask[7].tolist() == [False] * 7 + [True, False]  # pair 1's rejected token 6 sees itself only


def random_sets(vocab, seed=0):
    """Sets of 3 and 4 responses: a shared prompt, prompts that differ near the end (truncation), a one-token and an
    empty response, and a pair among them (a pair is never split)."""
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(1, vocab, (n,), generator=g).tolist()

    p, q = ids(16), ids(10)
    return [(Encoded(p + ids(7), 16, False), Encoded(p + ids(12), 16, False), Encoded(p + ids(1), 16, False)),
            (Encoded(q + ids(5), 10, False), Encoded(q[:8] + ids(4), 8, True), Encoded(q + ids(9), 10, False),
             Encoded(q, 10, True)),
            (Encoded(p[:6] + ids(4), 6, False), Encoded(p[:6] + ids(3), 6, False))]


def plain_set_logps(model, groups):
    """Every response of every set alone (plain_logps's reference for sets): (responses,) in order."""
    out = []
    for e in (e for group in groups for e in group):
        logps = torch.log_softmax(model(input_ids=torch.tensor([e.ids])).logits[0].float(), dim=-1)
        out.append(sum((logps[t - 1, e.ids[t]] for t in range(max(e.start, 1), len(e.ids))), torch.tensor(0.0)))
    return torch.stack(out)


def test_layout_of_a_split_set(monkeypatch):
    """Hand-checked: a set of three over a 2-token prompt, split; its first sequence is one block, each later
    response another whose keys are the prompt's and its own; the pair after it stays one block."""
    monkeypatch.setattr(precompute, "SPLIT_TOKENS", 0)
    groups = [(Encoded([1, 2, 3, 4], 2, False), Encoded([1, 2, 5], 2, False), Encoded([1, 2, 6, 7], 2, False)),
              (Encoded([8, 9], 1, False), Encoded([8, 3], 1, False))]
    row = precompute.pack_row(groups)
    assert row.input_ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 3]]
    assert row.spans == [(0, 7), (7, 10)]
    assert row.blocks == [(0, 4, None), (4, 5, (0, 2)), (5, 7, (0, 2)), (7, 10, None)]
    monkeypatch.setattr(precompute, "SPLIT_TOKENS", 7)  # the set's packed length: not longer, not split
    assert precompute.pack_row(groups).blocks == [(0, 7, None), (7, 10, None)]


@pytest.mark.parametrize("split", [0, 33, 10_000])  # every set split (packed 36 and 32 tokens), the longer one, none
def test_blocks_hold_every_key_a_query_may_see(split, monkeypatch):
    """Each token is the query of exactly one block, and every key the row's mask lets it see is among that block's
    keys: a block computed alone is the row's attention restricted to it."""
    monkeypatch.setattr(precompute, "SPLIT_TOKENS", split)
    row = precompute.pack_row(random_sets(96) + random_pairs(96)[:3])
    allowed = precompute.attention_mask(tiny_llama("sdpa").config, row)[0, 0]  # (L, L)
    covered = torch.zeros_like(allowed)
    for begin, end, prompt in row.blocks:
        covered[begin:end, begin:end] = True
        if prompt is not None:
            covered[begin:end, prompt[0]:prompt[1]] = True
    queries = [q for begin, end, _ in row.blocks for q in range(begin, end)]
    assert queries == list(range(row.input_ids.shape[1]))
    assert not (allowed & ~covered).any()
    assert sum(p is not None for *_, p in row.blocks) == {0: 5, 33: 2, 10_000: 0}[split]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["llama", "gemma3"])
@pytest.mark.parametrize("split", [0, 10_000])
def test_set_logps_equal_plain_forward(name, attn, split, monkeypatch):
    """Sets, split response by response or whole, give each response's log-probs alone (Gemma 3: with its window)."""
    monkeypatch.setattr(precompute, "SPLIT_TOKENS", split)
    model = MODELS[name](attn)
    groups = random_sets(model.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(precompute.response_logps(model, groups), plain_set_logps(model, groups),
                                   rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_split_set_lora_gradients_equal_plain_forward(name, monkeypatch):
    """The MPO loss's LoRA gradients through split sets, with the math backward on (in float32, as in
    test_math_backward_lora_gradients_equal_plain_forward) over its rectangular blocks, equal a plain forward's."""
    monkeypatch.setattr(precompute, "SPLIT_TOKENS", 0)
    model = lora(MODELS[name]("sdpa"))
    groups = random_sets(model.config.vocab_size, seed=4)[:2]
    mask = torch.tensor([[True, True, True, False], [True] * 4])
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 4.0, 2.0, 3.0]])
    ref = torch.randn(2, 4, generator=torch.Generator().manual_seed(5)) - 20
    shapes, backward = [], precompute.attention_backward
    monkeypatch.setattr(precompute, "attention_backward", lambda q, k, *a: shapes.append((q.shape[2], k.shape[2]))
                        or backward(q, k, *a))
    grads = []
    for forward, dtypes in ((precompute.response_logps, (torch.float32,)), (plain_set_logps, ())):
        monkeypatch.setattr(precompute, "MATH_BACKWARD", {"cpu": dtypes})
        model.zero_grad(set_to_none=True)
        table = torch.stack([precompute.padded(x, 4) for x in forward(model, groups).split([3, 4])])  # (2, 4)
        mrpo.mpo_loss(table, ref, scores, mask, beta=0.1)[0].sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad})
    assert max(g.abs().max() for g in grads[1].values()) > 1e-4
    assert any(queries < keys for queries, keys in shapes)  # a later response against the prompt's keys and its own
    for n in grads[1]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-4, atol=1e-6, msg=n)


def lora(model):
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                              "o_proj", "gate_proj", "up_proj",
                                                                              "down_proj"]))
    with torch.no_grad():  # LoRA B starts at zero; give it values so the gradients of A are not all zero
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model


@pytest.mark.parametrize("loss", sorted(mrpo.LOSSES))
@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_every_loss_and_lora_gradient_equal_plain_forward(name, loss):
    model = lora(MODELS[name]("sdpa"))
    pairs = random_pairs(model.config.vocab_size, seed=1)[:6]  # K=2 fake references around the policy's log-probs
    g = torch.Generator().manual_seed(2)
    ref_chosen, ref_rejected = torch.randn(2, len(pairs), generator=g) - 30, torch.randn(2, len(pairs), generator=g) - 30
    results = []
    for forward in (precompute.pair_logps, plain_logps):
        model.zero_grad(set_to_none=True)
        pc, pr = forward(model, pairs)
        losses, _, _ = mrpo.compute_loss(loss, pc, pr, ref_chosen, ref_rejected, beta=0.1)
        losses.mean().backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        results.append((pc.detach(), pr.detach(), losses.detach(), grads))
    (fc, fr, fl, fg), (pc, pr, pl, pg) = results
    torch.testing.assert_close(fc, pc, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fr, pr, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(fl, pl, rtol=1e-5, atol=1e-6)
    assert len(fg) > 0 and fg.keys() == pg.keys()
    assert max(g.abs().max() for g in pg.values()) > 1e-4  # the gradients are not all zero
    for n in pg:
        torch.testing.assert_close(fg[n], pg[n], rtol=1e-4, atol=1e-6, msg=n)


def test_smollm2_real_pairs_equal_plain_forward(smollm2):
    """Two real hh-rlhf pairs (multi-turn chat) through SmolLM2, one of them truncated so its prompts differ."""
    model, tokenizer = smollm2
    rows = precompute.read_pairs(os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"))[:2]
    pairs = [(precompute.encode(tokenizer, p["prompt"], p["chosen"], 96, 48),
              precompute.encode(tokenizer, p["prompt"], p["rejected"], 96, 48)) for p in rows]
    pairs.append((precompute.encode(tokenizer, rows[1]["prompt"], rows[1]["chosen"]),
                  precompute.encode(tokenizer, rows[1]["prompt"], rows[1]["rejected"])))
    assert any(c.truncated or r.truncated for c, r in pairs)
    with torch.no_grad():
        fast, plain = precompute.pair_logps(model, pairs), plain_logps(model, pairs)
    for f, p in zip(fast, plain):
        torch.testing.assert_close(f, p, rtol=1e-5, atol=2e-4)


def eager_attention(query, key, value, mask, scale):
    """softmax(scale q k^T where mask, else -inf) v with each key/value head repeated for its query heads (as
    transformers' repeat_kv): the formula precompute.attention_backward differentiates, left to autograd here."""
    groups = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scores = (query @ k.transpose(-1, -2) * scale).masked_fill(~mask, -torch.inf)
    return (torch.softmax(scores, dim=-1) @ v).transpose(1, 2)  # (1, n, heads, D) as transformers returns it


def test_attention_backward_equals_autograd_of_the_formula():
    """In float64 the hand-written backward gives autograd's gradients of the attention formula, with grouped
    key/value heads, a scale other than 1/sqrt(D) and a packed row's mask (prefix sharing, two pairs)."""
    pairs = [(Encoded([1, 2, 3, 4, 5], 2, False), Encoded([1, 2, 6, 7], 2, False)),
             (Encoded([7, 8, 9], 1, False), Encoded([7, 3], 1, False))]
    row = precompute.pack_row(pairs)
    mask = precompute.attention_mask(tiny_llama("sdpa").config, row)
    g = torch.Generator().manual_seed(0)
    n, scale = row.input_ids.shape[1], 0.3
    query, key, value = (torch.randn(1, h, n, 8, generator=g, dtype=torch.float64, requires_grad=True)
                         for h in (6, 2, 2))
    out = eager_attention(query, key, value, mask, scale)
    grad = torch.randn(out.shape, generator=g, dtype=torch.float64)
    out.backward(grad)
    mine = precompute.attention_backward(query.detach(), key.detach(), value.detach(), mask, out.detach(), grad, scale)
    for got, x in zip(mine, (query, key, value)):
        assert got.shape == x.shape
        torch.testing.assert_close(got, x.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", ["llama", "gemma3"])
def test_math_backward_lora_gradients_equal_plain_forward(name, monkeypatch):
    """The attention backward that training runs on CPU in 16 bit (precompute.SdpaMathBackward), turned on here in
    float32 so that it can be held to float32 rounding: the LoRA gradients of the MRPO loss equal those of a plain
    forward, the log-probs are the same bits as the flash backward's run (its forward is sdpa's own), and it ran.
    Every layer's attention scale is set to 0.2, not 1/sqrt(D), so the scale must reach the backward."""
    model = lora(MODELS[name]("sdpa"))
    for module in model.modules():
        if hasattr(module, "scaling") and hasattr(module, "q_proj"):
            module.scaling = 0.2
    pairs = random_pairs(model.config.vocab_size, seed=1)[:6]
    g = torch.Generator().manual_seed(2)
    ref_chosen, ref_rejected = torch.randn(2, len(pairs), generator=g) - 30, torch.randn(2, len(pairs), generator=g) - 30
    calls = []
    backward = precompute.attention_backward
    monkeypatch.setattr(precompute, "attention_backward", lambda *a: calls.append(1) or backward(*a))
    results = []
    for forward, dtypes in ((precompute.pair_logps, ()), (precompute.pair_logps, (torch.float32,)), (plain_logps, ())):
        monkeypatch.setattr(precompute, "MATH_BACKWARD", {"cpu": dtypes})
        model.zero_grad(set_to_none=True)
        pc, pr = forward(model, pairs)
        mrpo.mrpo_loss(pc, pr, ref_chosen, ref_rejected, beta=0.1)[0].mean().backward()
        results.append((pc.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert len(calls) == (len(results) >= 2) * model.config.num_hidden_layers * len(pairs)  # one per pair, layer
    (flash, flash_grads), (math, math_grads), (plain, plain_grads) = results
    assert torch.equal(math, flash)
    for n in plain_grads:
        torch.testing.assert_close(math_grads[n], plain_grads[n], rtol=1e-4, atol=1e-6, msg=n)


def test_math_backward_runs_only_when_it_is_differentiated():
    """In bf16 on CPU: SdpaMathBackward under gradients, sdpa alone under no_grad (precompute, eval), and the same
    log-prob bits either way, the exact start."""
    model = lora(tiny_llama("sdpa").to(torch.bfloat16))
    pairs = random_pairs(model.config.vocab_size, seed=3)[:3]
    with torch.no_grad():
        cached = precompute.pair_logps(model, pairs)
    first = precompute.pair_logps(model, pairs)
    assert all(torch.equal(a, b.detach()) for a, b in zip(cached, first))
    assert _reaches(first[0].grad_fn, "SdpaMathBackward") and not _reaches(first[0].grad_fn, "Flash")
    first[0].sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters() if p.requires_grad)


def test_math_backward_only_for_pairs_up_to_its_length(monkeypatch):
    """A pair longer than precompute.MATH_BACKWARD_TOKENS keeps sdpa's own backward, a shorter one in the same row
    gets SdpaMathBackward's; the log-probs are the same bits either way."""
    model = lora(tiny_llama("sdpa").to(torch.bfloat16))
    pairs = random_pairs(model.config.vocab_size, seed=3)[:3]
    lengths = sorted(e - b for b, e in precompute.pack_row(pairs).spans)  # 24, 35, 36 tokens
    calls = []
    backward = precompute.attention_backward
    monkeypatch.setattr(precompute, "attention_backward", lambda *a: calls.append(1) or backward(*a))
    monkeypatch.setattr(precompute, "MATH_BACKWARD_TOKENS", lengths[0])  # only the shortest pair (and its equals)
    first = precompute.pair_logps(model, pairs, row_tokens=1 << 20)  # one row
    with torch.no_grad():
        cached = precompute.pair_logps(model, pairs, row_tokens=1 << 20)
    assert all(torch.equal(a.detach(), b) for a, b in zip(first, cached))
    assert _reaches(first[0].grad_fn, "SdpaMathBackward") and _reaches(first[0].grad_fn, "Flash")
    (first[0].sum() + first[1].sum()).backward()
    assert len(calls) == model.config.num_hidden_layers * lengths.count(lengths[0])


def _reaches(fn, name, seen=None):
    """Whether the autograd graph below fn holds a node whose name contains `name`."""
    seen = set() if seen is None else seen
    if fn is None or fn in seen:
        return False
    seen.add(fn)
    return name in type(fn).__name__ or any(_reaches(f, name, seen) for f, _ in fn.next_functions)


def test_compiled_layers_give_the_eager_log_probs_and_lora_gradients(monkeypatch):
    """precompute.compile_layers (the scripts' --compile) changes how a layer's kernels round, not what they compute:
    in fp32 the log-probs and LoRA gradients of packed pairs equal the eager ones to rounding, with the 16-bit
    attention backward forced on (it runs eagerly between the compiled parts of each layer)."""
    from torch._dynamo.utils import counters
    monkeypatch.setattr(precompute, "MATH_BACKWARD", {"cpu": (torch.float32,)})
    model = lora(MODELS["llama"]("sdpa"))
    pairs = random_pairs(model.config.vocab_size, seed=3)[:4]
    results = []
    for compiled in (False, True):
        if compiled:
            graphs = counters["stats"]["unique_graphs"]
            precompute.compile_layers(model)
        model.zero_grad(set_to_none=True)
        chosen, rejected = precompute.pair_logps(model, pairs)
        mrpo.dpo_loss(chosen, rejected, chosen.detach() - 1, rejected.detach(), 0.1)[0].sum().backward()
        results.append((torch.stack([chosen, rejected]).detach(),
                        {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    assert counters["stats"]["unique_graphs"] > graphs  # the layers did run compiled
    (eager, eager_grads), (fused, fused_grads) = results
    torch.testing.assert_close(fused, eager, rtol=1e-5, atol=1e-4)
    assert max(g.abs().max() for g in eager_grads.values()) > 1e-4
    for n in eager_grads:
        torch.testing.assert_close(fused_grads[n], eager_grads[n], rtol=1e-4, atol=1e-6, msg=n)
