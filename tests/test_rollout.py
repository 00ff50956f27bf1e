"""Rollout engines: shapes of the output, stop tokens, and the log-probs they report vs the trainer's."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from common.dist import DistInfo, shard_model
from common.rollout import HFEngine, stop_token_ids

PROMPTS = ["What is 3+22?\n", "What is 51-7+9?\n"]


def trainer_logprobs(lm, sample, temperature):
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = lm(ids).logits[0, len(sample.prompt_ids) - 1:-1].double() / temperature
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(sample.response_ids)[:, None])[:, 0]


def check_samples(groups, tok, n, max_tokens):
    stops = set(stop_token_ids(tok))
    assert len(groups) == len(PROMPTS) and all(len(g) == n for g in groups)
    for g in groups:
        for s in g:
            assert 1 <= len(s.response_ids) <= max_tokens and len(s.logprobs) == len(s.response_ids)
            if s.finish_reason == "stop":
                assert s.response_ids[-1] in stops and not stops & set(s.response_ids[:-1])
            else:
                assert len(s.response_ids) == max_tokens and not stops & set(s.response_ids)


def test_stop_tokens_cover_both_qwen_endings(tiny):
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    assert set(stop_token_ids(tok)) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}


@pytest.mark.parametrize("temperature", [1.0, 1.7])
def test_hf_engine_logprobs_match_trainer(tiny, temperature):
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    lm = AutoModelForCausalLM.from_pretrained(tiny["model"])
    engine = HFEngine(shard_model(lm, DistInfo(), "none"), tok, DistInfo(), batch_size=5)
    groups = engine.generate(PROMPTS, n=3, temperature=temperature, max_tokens=16, seeds=[1, 2])
    check_samples(groups, tok, 3, 16)
    for g in groups:
        for s in g:
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                                       trainer_logprobs(lm, s, temperature), atol=1e-4, rtol=0)
    again = engine.generate(PROMPTS, n=3, temperature=temperature, max_tokens=16, seeds=[1, 2])
    assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in groups]


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_vllm_engine_sync_weights_matches_trainer(which, request):
    """After sync_weights, vLLM's log-probs of its samples equal the trainer's within 1e-4, for tied (the
    lm_head is the embedding) and untied (a separate lm_head that must be pushed too) models, including
    the prompt KV that the prefix cache would otherwise reuse."""
    pytest.importorskip("vllm")
    from common.rollout import VLLMEngine
    paths = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    lm = AutoModelForCausalLM.from_pretrained(paths["model"])
    model = shard_model(lm, DistInfo(), "none")
    engine = VLLMEngine(paths["model"], tok, DistInfo(), max_model_len=256, kv_cache_gib=0.0625)
    for round_ in range(2):
        groups = engine.generate(PROMPTS, n=2, temperature=1.3, max_tokens=12, seeds=[round_, 7])
        check_samples(groups, tok, 2, 12)
        for g in groups:
            for s in g:
                torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64),
                                           trainer_logprobs(lm, s, 1.3), atol=1e-4, rtol=0)
        with torch.no_grad():                        # a large change of every weight, as after training
            for p in lm.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        engine.sync_weights(model)
