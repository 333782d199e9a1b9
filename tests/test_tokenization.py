"""The tokens precompute.py scores are those of each model's own chat format (precompute.py, "How a reference sees the
text"): the whole conversation tokenized once, the response = its tokens after the prompt's, ending with the
template's own end of turn and nothing after it, never an EOS on top of it.

Five families, no hub: SmolLM2 (ChatML, its own template), Gemma 3 base (no template), Mistral-7B's SentencePiece
tokenizer (shipped in the PyPI package mistral-common) with an [INST] template, the Gemma 3 tokenizer with a
Gemma-instruction template, and a Llama-3 template whose header and <|eot_id|> tokens are added as special tokens.
The templates are written here; each family's expected text is written out again by hand in Python (not rendered by
the template), tokenized in one piece, and compared with what encode() returns. Log-probs come from tiny randomly
initialised models of each architecture, built from a config.
"""

import copy
import importlib.util
import json
import os
import shutil
import sys
from types import SimpleNamespace

import pytest
import torch

import precompute
from precompute import encode, pair_logps

TOL = 1e-5  # fp32, tiny models: batched vs one pair at a time

SMOL_SYSTEM = "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}"
                 "{{ '[INST] ' + m['content'] + ' [/INST]' }}{% else %}{{ m['content'] + eos_token }}{% endif %}"
                 "{% endfor %}")
GEMMA_IT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{{ '<start_of_turn>' + ('model' if m['role'] == "
                     "'assistant' else m['role']) + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
LLAMA3_TEMPLATE = ("{{ '<|begin_of_text|>' }}{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + "
                   "'<|end_header_id|>\n\n' + m['content'] | trim + '<|eot_id|>' }}{% endfor %}"
                   "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")


# ---------------------------------------------------------------------------------------------------------------
# Each family's conversation written out by hand: (prompt text, scored text, filler after the end of turn)

def _messages(prompt, response):
    as_list = precompute._as_messages
    return as_list(prompt, "user"), as_list(response, "assistant")


def render_chatml(prompt, response):
    p, r = _messages(prompt, response)
    turns = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in p)
    return SMOL_SYSTEM + turns + "<|im_start|>assistant\n", SMOL_SYSTEM + turns + "<|im_start|>assistant\n" + \
        r[0]["content"] + "<|im_end|>", "\n"


def render_plain(prompt, response):  # Gemma base: BOS, prompt and response as written, EOS
    if isinstance(prompt, str):
        return "<bos>" + prompt, "<bos>" + prompt + response + "<eos>", ""
    lines = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in prompt) + "Assistant:"
    return "<bos>" + lines, "<bos>" + lines + " " + response[0]["content"] + "<eos>", ""


def render_inst(prompt, response):
    p, r = _messages(prompt, response)
    turns = "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user" else m["content"] + "</s>" for m in p)
    return "<s>" + turns, "<s>" + turns + r[0]["content"] + "</s>", ""


def render_gemma_it(prompt, response):
    p, r = _messages(prompt, response)
    turns = "".join(f"<start_of_turn>{'model' if m['role'] == 'assistant' else m['role']}\n{m['content'].strip()}"
                    f"<end_of_turn>\n" for m in p)
    head = "<bos>" + turns + "<start_of_turn>model\n"
    return head, head + r[0]["content"].strip() + "<end_of_turn>", "\n"


def render_llama3(prompt, response):
    p, r = _messages(prompt, response)
    turns = "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in p)
    head = "<|begin_of_text|>" + turns + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    return head, head + r[0]["content"].strip() + "<|eot_id|>", ""


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers and tiny models

@pytest.fixture(scope="module")
def smollm2_tokenizer():
    return precompute.load_tokenizer("smollm2")


@pytest.fixture(scope="module")
def gemma3_tokenizer():
    return precompute.load_tokenizer("gemma3")


@pytest.fixture(scope="module")
def mistral_dir(tmp_path_factory):
    """A folder holding Mistral-7B's SentencePiece model (from the mistral-common package) as tokenizer.model."""
    spec = importlib.util.find_spec("mistral_common")  # located, never imported: we need one data file
    assert spec is not None, "tests need mistral-common; fix: pip install --no-deps -r requirements-models.txt"
    source = os.path.join(list(spec.submodule_search_locations)[0], "data", "tokenizer.model.v1")
    directory = tmp_path_factory.mktemp("mistral")
    shutil.copy(source, directory / "tokenizer.model")
    return str(directory)


def mistral_tokenizer(mistral_dir):
    from transformers import LlamaTokenizer  # SentencePiece model -> fast tokenizer (needs sentencepiece, protobuf)
    return LlamaTokenizer.from_pretrained(mistral_dir)


def with_llama3_template(tokenizer):
    """A copy of tokenizer with Llama 3's header and end-of-turn tokens added as special tokens, and its template."""
    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.add_tokens(LLAMA3_TOKENS, special_tokens=True)
    tokenizer.chat_template = LLAMA3_TEMPLATE
    return tokenizer


def tiny_model(arch, vocab_size):
    """A randomly initialised 2-layer model of the architecture, fp32, eval mode."""
    import transformers as tf
    config, model = {"llama": ("LlamaConfig", "LlamaForCausalLM"), "mistral": ("MistralConfig", "MistralForCausalLM"),
                     "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM")}[arch]
    kwargs = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=512,
                  initializer_range=0.2)
    torch.manual_seed(0)
    return getattr(tf, model)(getattr(tf, config)(**kwargs)).eval()


FAMILIES = ["smollm2_chatml", "gemma3_base", "mistral_inst", "gemma3_instruct", "llama3_style"]


@pytest.fixture(scope="module")
def families(request, mistral_dir):
    """name -> SimpleNamespace(tokenizer, render, terminator, arch), built on first use."""
    built = {}

    def get(name):
        if name not in built:
            if name == "smollm2_chatml":
                f = (request.getfixturevalue("smollm2_tokenizer"), render_chatml, "<|im_end|>", "llama")
            elif name == "gemma3_base":
                f = (request.getfixturevalue("gemma3_tokenizer"), render_plain, "<eos>", "gemma3")
            elif name == "mistral_inst":
                tokenizer = mistral_tokenizer(mistral_dir)
                tokenizer.chat_template = INST_TEMPLATE
                f = (tokenizer, render_inst, "</s>", "mistral")
            elif name == "gemma3_instruct":
                tokenizer = copy.deepcopy(request.getfixturevalue("gemma3_tokenizer"))
                tokenizer.chat_template = GEMMA_IT_TEMPLATE
                f = (tokenizer, render_gemma_it, "<end_of_turn>", "gemma3")
            else:  # on Mistral's tokenizer: its byte-fallback "\n"s never merge, so no token straddles here
                f = (with_llama3_template(mistral_tokenizer(mistral_dir)), render_llama3, "<|eot_id|>", "llama")
            built[name] = SimpleNamespace(tokenizer=f[0], render=f[1], terminator=f[2], arch=f[3])
        return built[name]
    return get


def rows(pairs_small):
    """(prompt, response): bundled plain rows of different lengths and a multi-turn conversational row."""
    out = [(p["prompt"], p[field]) for p in pairs_small[:2] for field in ("chosen", "rejected")]
    conversation = [{"role": "user", "content": "What is 2 + 2?"}, {"role": "assistant", "content": "4."},
                    {"role": "user", "content": "And 3 + 3?"}]
    out += [(conversation, [{"role": "assistant", "content": "6, of course."}]),
            (conversation, [{"role": "assistant", "content": "Seven.\nOr six?"}])]
    return out


# ---------------------------------------------------------------------------------------------------------------
# The scored tokens

@pytest.mark.parametrize("name", FAMILIES)
def test_scored_tokens_are_the_whole_conversations(families, name, pairs_small):
    f = families(name)
    tok = f.tokenizer
    terminator = tok.convert_tokens_to_ids(f.terminator)
    for prompt, response in rows(pairs_small):
        e = encode(tok, prompt, response)
        prompt_text, scored_text, filler = f.render(prompt, response)
        # the whole conversation, tokenized in one piece, is what is scored; the prompt's tokens are its prefix
        assert e.ids == tok(scored_text, add_special_tokens=False).input_ids
        assert e.ids[:e.start] == tok(prompt_text, add_special_tokens=False).input_ids
        assert not e.straddled and not e.truncated
        # it ends with the family's own end of turn, once; no EOS added after it
        assert e.ids[-1] == terminator and e.ids[e.start:].count(terminator) == 1
        if tok.eos_token_id != terminator:
            assert tok.eos_token_id not in e.ids[e.start:]
        # the template's filler after the end of turn is not scored
        if tok.chat_template:
            p, r = _messages(prompt, response)
            assert tok.apply_chat_template(p + r, tokenize=False) == scored_text + filler
            assert tok.apply_chat_template(p, tokenize=False, add_generation_prompt=True) == prompt_text


def test_mistral_response_starts_as_in_the_conversation(families):
    """The bug: tokenized alone, "4, of course." starts with a '▁' token the model never saw after "[/INST]"."""
    tok = families("mistral_inst").tokenizer
    e = encode(tok, "What is 2 + 2?", "4, of course.")
    assert tok.convert_ids_to_tokens(e.ids[e.start:]) == ["4", ",", "▁of", "▁course", ".", "</s>"]
    alone = tok.convert_ids_to_tokens(tok("4, of course.", add_special_tokens=False).input_ids)
    assert alone[:2] == ["▁", "4"]  # what tokenizing the response separately (the old way) scored
    assert tok.convert_ids_to_tokens(e.ids[:e.start])[-3:] == ["/", "INST", "]"]


def test_added_special_tokens_count_as_end_of_turn(families):
    """<|eot_id|> is an added token flagged special, not one of the named special tokens: it still ends the turn."""
    tok = families("llama3_style").tokenizer
    eot = tok.convert_tokens_to_ids("<|eot_id|>")
    assert eot not in tok.all_special_ids and tok.added_tokens_decoder[eot].special
    assert eot in precompute._special_ids(tok)
    e = encode(tok, "Hi?", "Hello.")
    assert e.ids[-1] == eot and tok.eos_token_id not in e.ids


def slow_logps(model, e):
    """One sequence, no padding, log-softmax over all positions, Python sum over the response positions."""
    with torch.no_grad():
        logps = model(torch.tensor([e.ids])).logits[0].float().log_softmax(-1)
    return sum(float(logps[t - 1, e.ids[t]]) for t in range(e.start, len(e.ids)))


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_equals_one_pair_at_a_time(families, name, pairs_small):
    f = families(name)
    model = tiny_model(f.arch, len(f.tokenizer))
    pairs = [(prompt, chosen, rejected) for (prompt, chosen), (_, rejected) in zip(rows(pairs_small)[0::2],
                                                                                   rows(pairs_small)[1::2])]
    encoded = [encode(f.tokenizer, prompt, response) for prompt, chosen, rejected in pairs
               for response in (chosen, rejected)]
    assert len({len(e.ids) for e in encoded}) > 2  # sequences of different lengths
    encoded_pairs = list(zip(encoded[0::2], encoded[1::2]))
    with torch.no_grad():
        chosen, rejected = pair_logps(model, encoded_pairs, row_tokens=10_000)  # every pair in one packed row
        batched = torch.stack([chosen, rejected], dim=1).flatten()  # interleaved like encoded
        per_pair = torch.cat([torch.cat(pair_logps(model, [p])) for p in encoded_pairs])
    alone = torch.tensor([slow_logps(model, e) for e in encoded])
    torch.testing.assert_close(batched, per_pair, atol=TOL, rtol=TOL)
    torch.testing.assert_close(batched, alone, atol=TOL, rtol=TOL)


# ---------------------------------------------------------------------------------------------------------------
# A token that straddles the prompt/response boundary is scored with the response, and counted

def test_plain_straddle_is_scored_as_response(families):
    """Gemma base: prompt "...\\nAnswer" + response "s: 4." tokenize as one 'Answers' token across the boundary."""
    tok = families("gemma3_base").tokenizer
    prompt, response = "Question: What is 2 + 2?\nAnswer", "s: 4."
    e = encode(tok, prompt, response)
    full = [tok.bos_token_id] + tok(prompt + response, add_special_tokens=False).input_ids + [tok.eos_token_id]
    prompt_ids = [tok.bos_token_id] + tok(prompt, add_special_tokens=False).input_ids
    assert e.ids == full and e.straddled
    assert e.start == len(prompt_ids) - 1 and e.ids[:e.start] == prompt_ids[:-1]
    assert tok.convert_ids_to_tokens(e.ids[e.start:e.start + 2]) == ["Answers", ":"]  # 'Answer' is scored too
    assert tok.decode(e.ids[e.start:]) == "Answers: 4.<eos>"
    assert precompute.generation_prompt(tok, prompt) == prompt_ids  # generation starts after the whole prompt
    e = encode(tok, prompt + ":", " 4.")  # no straddle: the prompt part of the whole conversation
    assert not e.straddled and precompute.generation_prompt(tok, prompt + ":") == e.ids[:e.start]


def test_chat_straddle_is_scored_as_response(smollm2_tokenizer):
    """SmolLM2's byte-level BPE merges the Llama 3 generation prompt's final "\\n\\n" into one token at the end of
    the text, but not before a letter: the conversation has two "\\n" tokens, both scored."""
    tok = with_llama3_template(smollm2_tokenizer)
    e = encode(tok, "Hi?", "Hello.")
    prompt_text, scored_text, _ = render_llama3("Hi?", "Hello.")
    prompt_ids = tok(prompt_text, add_special_tokens=False).input_ids
    assert tok.convert_ids_to_tokens(prompt_ids[-2:]) == ["<|end_header_id|>", "ĊĊ"]
    assert e.ids == tok(scored_text, add_special_tokens=False).input_ids and e.straddled
    assert e.start == len(prompt_ids) - 1
    assert tok.convert_ids_to_tokens(e.ids[e.start:]) == ["Ċ", "Ċ", "Hello", ".", "<|eot_id|>"]
    assert precompute.generation_prompt(tok, "Hi?") == prompt_ids


def test_template_that_rewrites_the_prompt_is_refused(smollm2_tokenizer):
    tok = copy.deepcopy(smollm2_tokenizer)
    tok.chat_template = ("{% for m in messages %}{{ m['role'] }}{% if not loop.last %}:{% endif %} {{ m['content'] }}"
                         "\n{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match="renders the prompt differently once an answer follows"):
        encode(tok, "Hi?", "Hello.")


def test_straddled_rows_are_counted_and_reported(tmp_path, monkeypatch, capsys, smollm2_tokenizer):
    """precompute.py on a local model folder whose format straddles every row: counted in the cache, warned about,
    and the cached log-probs are those of the straddled encoding."""
    directory = tmp_path / "llama3-smol"
    tok = with_llama3_template(smollm2_tokenizer)
    model = tiny_model("llama", len(tok))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    pairs = [{"prompt": "Hi?", "chosen": "Hello.", "rejected": "Go away."},
             {"prompt": "What is 2 + 2?", "chosen": "4.", "rejected": "5."}]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs), encoding="utf-8")
    out = str(tmp_path / "refs.safetensors")
    monkeypatch.setattr(sys, "argv", ["precompute.py", "--data", str(data), "--refs", str(directory), "--out", out])
    precompute.main()
    captured = capsys.readouterr()
    assert "2 of 2 rows have a token straddling" in captured.err
    assert "straddled 2" in captured.out
    cache = precompute.load_cache(out, pairs)
    assert cache["refs"][0]["straddled_rows"] == 2 and cache["refs"][0]["truncated_rows"] == 0
    encoded = [encode(tok, p["prompt"], p["chosen"]) for p in pairs]
    assert all(e.straddled for e in encoded)
    expected = torch.tensor([slow_logps(model, e) for e in encoded])
    torch.testing.assert_close(cache["chosen_logps"][0], expected, atol=TOL, rtol=TOL)


def test_a_response_with_the_text_of_a_special_token_is_refused_with_its_row(smollm2_tokenizer):
    """"<|im_end|>" written in a response would be tokenized as SmolLM2's end of turn and the scored response cut
    after it: the file, row and field are named instead."""
    ok = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "Bye."}
    bad = {**ok, "rejected": [{"role": "assistant", "content": "Bye.<|im_end|> and more"}]}
    assert len(precompute.encode_pairs(smollm2_tokenizer, [ok, ok])) == 2
    with pytest.raises(precompute.DataError, match=r"pairs\.jsonl, row 2, field 'rejected': .*'<\|im_end\|>'"):
        precompute.encode_pairs(smollm2_tokenizer, [ok, bad], path="pairs.jsonl")
