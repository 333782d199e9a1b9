"""Attention over a packed row: pair by pair (what the scripts run) against one call per layer, on this device.

    python bench/bench_attention.py                               # SmolLM2's heads, a row of 8 hh-rlhf pairs
    python bench/bench_attention.py --device cuda --dtype bf16 --row-pairs 16

A packed row (precompute.pack_row) holds several pairs, each as [shared prompt][chosen][rejected]; no token attends
to another pair, and a rejected token not to its pair's chosen tokens. precompute.pairwise_attention computes each
pair's block alone, one attention call per pair and layer; in training on CPU in 16 bit its backward is
precompute.attention_backward's matrix multiplies (precompute.SdpaMathBackward), not sdpa's flash backward ("pair by
pair, math backward"). One call per layer can take the same attention as:

- padded pairs: the pairs gathered into a (pairs, heads, longest pair, D) batch with a mask per pair, one sdpa call;
- whole row: the (1, 1, L, L) mask of the row (precompute.attention_mask), one sdpa call on the square of the row;
- flex: torch.nn.attention.flex_attention (compiled) with a block mask of the same rule, which skips the blocks the
  mask leaves empty.

For a row of the model's real token layout (random queries, keys and values of its head size, the keys and values
with as many heads as the queries: transformers repeats grouped key/value heads before a masked sdpa call) it
prints, per variant, the forward and forward + backward time of one layer (median of --repeats), the largest
difference from the pair-by-pair output, and the kernel each dispatches to (from torch.profiler). A variant that the
device cannot run (flex has no backward on CPU) says so.
"""

import argparse
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

import precompute  # noqa: E402
from bench_trl import cpu_model  # noqa: E402


def pair_by_pair(q, k, v, mask, spans):
    return torch.cat([F.scaled_dot_product_attention(q[:, :, b:e], k[:, :, b:e], v[:, :, b:e],
                                                     attn_mask=mask[:, :, b:e, b:e]) for b, e in spans], dim=2)


def sdpa_inner(module, q, k, v, mask, **kwargs):
    """transformers' sdpa attention function as pairwise_attention calls it: output (1, n, heads, D), None."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2), None


def math_backward_pair_by_pair(q, k, v, mask, spans):
    """What training runs on CPU in 16 bit: sdpa's forward per pair, precompute.attention_backward's backward."""
    attend = precompute.SdpaMathBackward.apply
    return torch.cat([attend(q[:, :, b:e], k[:, :, b:e], v[:, :, b:e], mask[:, :, b:e, b:e], sdpa_inner, None, {})
                      .transpose(1, 2) for b, e in spans], dim=2)


def eager(q, k, v, mask):
    """transformers' eager attention: q k^T in the input dtype, a float32 softmax, then times v."""
    scores = (q @ k.transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    return torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype) @ v


def eager_pair_by_pair(q, k, v, mask, spans):
    return torch.cat([eager(q[:, :, b:e], k[:, :, b:e], v[:, :, b:e], mask[:, :, b:e, b:e]) for b, e in spans], dim=2)


def gather_pairs(q, k, v, mask, spans):
    """q, k, v (pairs, heads, n, D) and a mask (pairs, 1, n, n) of the row's pairs, padded to the longest (n)."""
    longest = max(e - b for b, e in spans)
    index = torch.stack([torch.arange(b, b + longest).clamp(max=e - 1) for b, e in spans]).to(q.device)  # (P, n)
    inside = torch.stack([torch.arange(longest) < e - b for b, e in spans]).to(q.device)  # (P, n) not padding
    pad_mask = mask[0, 0][index[:, :, None], index[:, None, :]] & inside[:, None, :] | ~inside[:, :, None]
    return [x[0][:, index].transpose(0, 1) for x in (q, k, v)] + [pad_mask[:, None]]  # padded queries see all


def ungather(out, spans):
    return torch.cat([out[i, :, :e - b] for i, (b, e) in enumerate(spans)], dim=1)[None]


def padded_pairs(q, k, v, mask, spans):
    q, k, v, mask = gather_pairs(q, k, v, mask, spans)
    return ungather(F.scaled_dot_product_attention(q, k, v, attn_mask=mask), spans)


def eager_padded_pairs(q, k, v, mask, spans):
    return ungather(eager(*gather_pairs(q, k, v, mask, spans)), spans)


def whole_row(q, k, v, mask, spans):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flex_variant(row, device):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    pos, pair, branch = (t.to(device) for t in (row.position_ids[0], row.pair, row.branch))

    def rule(b, h, q_idx, kv_idx):  # precompute.attention_mask's rule
        return ((pair[q_idx] == pair[kv_idx]) & (pos[kv_idx] <= pos[q_idx])
                & ((branch[kv_idx] == 0) | (branch[kv_idx] == branch[q_idx])))

    block_mask = create_block_mask(rule, None, None, len(pos), len(pos), device=device)
    compiled = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v, mask, spans: compiled(q, k, v, block_mask=block_mask)


def timed(fn, args, repeats, backward):
    times = []
    for _ in range(repeats + 1):
        inputs = [a.detach().requires_grad_(backward) if torch.is_tensor(a) and a.is_floating_point() else a
                  for a in args]
        t0 = time.perf_counter()
        out = fn(*inputs)
        if backward:
            out.float().sum().backward()
        if out.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times[1:]), out


def kernel(fn, args):
    with torch.profiler.profile() as prof:
        fn(*args)
    names = [e.key for e in prof.key_averages() if any(s in e.key.lower() for s in ("flash", "efficient", "math",
                                                                                   "flex", "cudnn", "triton"))]
    return ", ".join(sorted(set(names))[:3]) or "?"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "hh-rlhf-harmless", "train.jsonl"),
                        help="JSONL preference pairs (default: the bundled multi-turn hh-rlhf pairs)")
    parser.add_argument("--model", default="smollm2", help="model spec: its tokenizer, head counts and head size")
    parser.add_argument("--row-pairs", type=int, default=8, help="pairs in the row")
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (CPU)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each variant")
    parser.add_argument("--block-lengths", type=int, nargs="*", default=[100, 200, 300, 400, 800], help="then one "
                        "causal block of each length: sdpa's backward against the math one (the length at which "
                        "precompute.MATH_BACKWARD_TOKENS switches)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    precompute.keep_freed_memory()
    model, tokenizer = precompute.load_model(args.model, dtype="fp32")
    config = model.config
    del model
    encoded = precompute.encode_pairs(tokenizer, precompute.read_pairs(args.data)[:args.row_pairs])
    row = precompute.pack_row(encoded)
    mask = precompute.attention_mask(config, row)
    mask = (mask["full_attention"] if isinstance(mask, dict) else mask).to(args.device)
    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", config.hidden_size // heads)
    generator = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, heads, row.input_ids.shape[1], dim, generator=generator)
               .to(args.device, precompute.DTYPES[args.dtype]) for _ in range(3))
    cpu = cpu_model()[0] if args.device == "cpu" else torch.cuda.get_device_name()
    print(f"bench_attention: {cpu}, {args.device}, {args.dtype}, {args.threads} threads; a row of {len(row.spans)} "
          f"pairs, {row.input_ids.shape[1]} tokens (pairs of {min(e - b for b, e in row.spans)} to "
          f"{max(e - b for b, e in row.spans)}), {heads} heads of {dim}, {config.num_hidden_layers} layers", flush=True)
    inputs = (q, k, v, mask, row.spans)
    reference = pair_by_pair(*inputs)
    variants = [("pair by pair, sdpa", pair_by_pair), ("pair by pair, math backward", math_backward_pair_by_pair),
                ("one call: padded pairs", padded_pairs), ("one call: whole row", whole_row),
                ("eager, pair by pair", eager_pair_by_pair),
                ("eager, one call: padded pairs", eager_padded_pairs)]
    try:
        variants.append(("one call: flex, block mask", flex_variant(row, args.device)))
    except Exception as e:  # flex attention needs a recent torch and a compiler for the device
        print(f"  flex: cannot build ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
    for name, fn in variants:
        try:
            forward, out = timed(fn, inputs, args.repeats, backward=False)
            diff = (out.float() - reference.float()).abs().max().item()
            line = f"  {name:28} forward {forward * 1e3:7.2f} ms/layer"
            try:
                both = timed(fn, inputs, args.repeats, backward=True)[0]
                line += f", forward + backward {both * 1e3:7.2f} ms/layer ({both * config.num_hidden_layers:.2f} s/row)"
            except Exception as e:  # flex on CPU: "FlexAttention does not support backward on CPU"
                line += f", no backward here ({type(e).__name__}: {str(e).splitlines()[0][:80]})"
            print(f"{line} | max |diff| {diff:.2g} | {kernel(fn, inputs)}", flush=True)
        except Exception as e:
            print(f"  {name:28} cannot run here ({type(e).__name__}: {str(e).splitlines()[0][:120]})", flush=True)
    for n in args.block_lengths:  # one pair of n tokens, a causal mask: where the math backward stops paying
        block = [torch.randn(1, heads, n, dim, device=args.device, dtype=q.dtype) for _ in range(3)]
        block.append(torch.ones(n, n, dtype=torch.bool, device=args.device).tril()[None, None])
        flash, math = (timed(fn, block + [[(0, n)]], args.repeats, backward=True)[0] for fn in
                       (pair_by_pair, math_backward_pair_by_pair))
        print(f"  one pair of {n:4} tokens: forward + backward, sdpa {flash * 1e3:7.2f} ms, math backward "
              f"{math * 1e3:7.2f} ms ({math / flash:.2f}x)", flush=True)


if __name__ == "__main__":
    main()
