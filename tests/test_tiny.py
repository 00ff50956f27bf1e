"""The tiny fixture: deterministic, Qwen3-shaped, loadable and generating in transformers and vLLM."""
import hashlib
import json
import os

import pytest
import torch

from common.tiny import ENDOFTEXT, IM_END, make_splits, write_fixture


def _digest(model_dir):
    h = hashlib.sha256()
    for name in sorted(os.listdir(model_dir)):
        with open(os.path.join(model_dir, name), "rb") as f:
            h.update(name.encode() + f.read())
    return h.hexdigest()


def test_fixture_is_deterministic_in_seed(tmp_path):
    a = write_fixture(str(tmp_path / "a"), seed=3, n_train=200, n_test=20)
    b = write_fixture(str(tmp_path / "b"), seed=3, n_train=200, n_test=20)
    c = write_fixture(str(tmp_path / "c"), seed=4, n_train=200, n_test=20)
    assert _digest(a["model"]) == _digest(b["model"])
    assert open(a["train"]).read() == open(b["train"]).read()
    assert _digest(a["model"]) != _digest(c["model"])


def test_splits_are_disjoint_and_answers_are_right():
    train, test = make_splits(500, 100, seed=0)
    assert len(train) == 500 and len(test) == 100
    assert not {p["problem"] for p in train} & {p["problem"] for p in test}
    for p in train[:50] + test[:50]:
        expr = p["problem"].removeprefix("What is ").removesuffix("?")
        assert str(eval(expr)) == p["answer"]          # the ground truth is the expression's value
        assert p["solution"].splitlines()[-1] == f"Answer: {p['answer']}"


def test_tokenizer_is_qwen_like(tiny):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    assert tok.eos_token == IM_END and tok.pad_token == ENDOFTEXT
    assert tok.convert_tokens_to_ids(ENDOFTEXT) != tok.convert_tokens_to_ids(IM_END)
    # digits are single tokens, so "93" never merges
    assert [t for t in tok.tokenize("123456") if t.strip("Ġ")] == list("123456")
    # byte-level: arbitrary text, including non-ASCII and control bytes, round-trips
    for text in ["What is 3+22?\nAnswer: 25", "héllo ∑ 🙂 \x00\x07", "\\boxed{\\frac{1}{2}}"]:
        assert tok.decode(tok(text).input_ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_model_config_and_generate_transformers(which, request):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    paths = request.getfixturevalue(which)
    model = AutoModelForCausalLM.from_pretrained(paths["model"])
    tok = AutoTokenizer.from_pretrained(paths["model"])
    cfg = model.config
    assert cfg.model_type == "qwen3" and cfg.head_dim in (32, 64, 80, 96, 112, 128)
    assert cfg.vocab_size >= len(tok) and cfg.vocab_size % 64 == 0
    assert cfg.tie_word_embeddings == (which == "tiny")
    same = model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert same == (which == "tiny")
    n_params = sum(p.numel() for p in model.parameters())
    assert 1e5 < n_params < 2e6
    # both Qwen3 stop tokens are in the generation config
    eos = set(model.generation_config.eos_token_id)
    assert eos == {tok.convert_tokens_to_ids(IM_END), tok.convert_tokens_to_ids(ENDOFTEXT)}
    torch.manual_seed(0)
    ids = tok("What is 3+22?\n", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=8, do_sample=True)
    assert out.shape[1] > ids.shape[1]


def test_vllm_cpu_loads_and_generates(tiny_untied):
    """vLLM's CPU backend accepts the fixture (head_dim 32) and samples from it."""
    vllm = pytest.importorskip("vllm")
    llm = vllm.LLM(model=tiny_untied["model"], dtype="float32", max_model_len=256, enforce_eager=True,
                   seed=0, kv_cache_memory_bytes=64 << 20)
    out = llm.generate(["What is 3+22?\n"], vllm.SamplingParams(max_tokens=12, n=3, logprobs=0), use_tqdm=False)
    assert len(out[0].outputs) == 3
    for c in out[0].outputs:
        assert 1 <= len(c.token_ids) <= 12 and len(c.logprobs) == len(c.token_ids)
        assert all(lp[t].logprob <= 0 for lp, t in zip(c.logprobs, c.token_ids))
