"""Rollout engines: shapes of the output, stop tokens, and the log-probs they report vs the trainer's. Each engine is
built as the scripts build it: common.rollout.make_engine, around the training scripts' model
(common.loading.load_sharded) or evaluate.py's inference model (evaluate.hf_model)."""
import math
import os

import pytest
import torch
from transformers import AutoTokenizer

from common.dist import DistInfo, full_params, unwrap
from common.loading import load_sharded
from common.rollout import make_engine, stop_token_ids

PROMPTS = ["What is 3+22?\n", "What is 51-7+9?\n"]


def engine_for(kind, model, model_path, tok, info=None, *, max_model_len=256, **kwargs):
    """The engine as rl_dapo.py / reheat_tsopsd.py / evaluate.py make it (common.rollout.make_engine)."""
    return make_engine(kind, model=model, model_path=model_path, tokenizer=tok, info=info or DistInfo(),
                       max_model_len=max_model_len, seed=0, **kwargs)


def eval_model(path):
    """evaluate.py's inference model for the HF engine (fp32 on a CPU, eval mode, frozen)."""
    import evaluate
    return evaluate.hf_model(path, torch.device("cpu"))


def trainer_logprobs(lm, sample, temperature, top_p=1.0):
    """float64 log-probs of the sample's tokens under softmax(logits / T), restricted to the top-p nucleus."""
    ids = torch.tensor([sample.prompt_ids + sample.response_ids])
    with torch.no_grad():
        logits = lm(ids).logits[0, len(sample.prompt_ids) - 1:-1].double() / temperature
    if top_p < 1.0:
        for row in logits:                          # plain loop: keep the likeliest tokens until mass >= top_p
            probs = row.softmax(-1)
            mass, keep = 0.0, torch.zeros_like(row, dtype=torch.bool)
            for j in probs.argsort(descending=True).tolist():
                if mass >= top_p:
                    break
                keep[j], mass = True, mass + probs[j].item()
            row[~keep] = -math.inf
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


@pytest.mark.parametrize("temperature, top_p", [(1.0, 1.0), (1.7, 1.0), (1.3, 0.7)])
def test_hf_engine_logprobs_match_trainer(tiny, temperature, top_p, monkeypatch):
    """The HF engine's per-token log-probs are those of the law it sampled from (temperature, then the top-p
    nucleus), computed in float64 from the trainer's logits; fixed seeds give the same samples again."""
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    model = load_sharded(tiny["model"], DistInfo(), "fsdp")       # the training scripts' model, in training mode
    lm = unwrap(model)
    # sampling defaults a checkpoint may carry (Qwen3's instruct models do): none of them may reach the sampler
    cfg = lm.generation_config
    cfg.temperature, cfg.top_k, cfg.min_p, cfg.typical_p, cfg.repetition_penalty = 0.6, 20, 0.2, 0.5, 1.3
    built, build = [], lm._get_logits_processor

    def spy(*args, **kwargs):                         # the processors generate() runs before sampling
        procs = build(*args, **kwargs)
        built.append([type(p).__name__ for p in procs])
        return procs
    monkeypatch.setattr(lm, "_get_logits_processor", spy)
    engine = engine_for("hf", model, tiny["model"], tok, hf_batch_size=5)
    assert engine.name == "hf"
    groups = engine.generate(PROMPTS, n=3, temperature=temperature, top_p=top_p, max_tokens=16, seeds=[1, 2])
    assert built and all(b == ["_SampledLogprobs"] for b in built), built
    check_samples(groups, tok, 3, 16)
    for g in groups:
        for s in g:
            ref = trainer_logprobs(lm, s, temperature, top_p)
            assert torch.isfinite(ref).all()            # every sampled token is inside the nucleus
            torch.testing.assert_close(torch.tensor(s.logprobs, dtype=torch.float64), ref, atol=1e-4, rtol=0)
    assert model.training                               # generate() hands the training model back as it found it
    again = engine.generate(PROMPTS, n=3, temperature=temperature, top_p=top_p, max_tokens=16, seeds=[1, 2])
    assert [[s.response_ids for s in g] for g in again] == [[s.response_ids for s in g] for g in groups]


def test_hf_engine_samples_depend_on_the_prompt_seed_only_and_follow_the_law(tiny):
    """Each sampled row has its own random stream (prompt seed, sample index): a prompt's samples are the same
    alone or batched with others, at any batch size (what evaluate.py's rank independence needs); and the
    exponential-race draw is the softmax(z / T) law: first-token frequencies of 4000 samples within 0.03 total
    variation of the float64 probabilities."""
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    lm = eval_model(tiny["model"])
    small, big = (engine_for("hf", lm, tiny["model"], tok, hf_batch_size=b) for b in (4, 64))
    assert (small.batch_size, big.batch_size) == (4, 64)         # --hf-batch-size reaches the engine
    kw = dict(n=6, temperature=1.3, max_tokens=12)
    both = small.generate(PROMPTS, seeds=[7, 8], **kw)
    alone = big.generate(PROMPTS[1:], seeds=[8], **kw)
    assert [s.response_ids for s in both[1]] == [s.response_ids for s in alone[0]]
    assert [s.response_ids for s in both[0]] != [s.response_ids for s in both[1]]
    # the law, on the shipped tiny math model (peaked, so 4000 draws pin it down): "What is 12+19?" -> "12+19 = 31"
    shipped = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny_math", "model")
    tok, lm = AutoTokenizer.from_pretrained(shipped), eval_model(shipped)
    prompt = "What is 12+19?\n12+19 = "
    draws = engine_for("hf", lm, shipped, tok, hf_batch_size=1000).generate([prompt], n=4000, temperature=1.3,
                                                                            max_tokens=1, seeds=[3])[0]
    ids = torch.tensor([tok(prompt, add_special_tokens=False).input_ids])
    with torch.no_grad():
        z = lm(ids).logits[0, -1].double()
    freq = torch.bincount(torch.tensor([s.response_ids[0] for s in draws]), minlength=z.numel()).double() / 4000
    tv = lambda p: 0.5 * float((freq - p).abs().sum())   # noqa: E731
    assert tv(torch.softmax(z / 1.3, -1)) < 0.03, tv(torch.softmax(z / 1.3, -1))
    assert tv(torch.softmax(z, -1)) > 2 * tv(torch.softmax(z / 1.3, -1))   # and not the T=1 law
    assert (freq > 0).sum() > 1


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_vllm_engine_sync_weights_matches_trainer(which, request):
    """After sync_weights, vLLM's log-probs of its samples equal the trainer's within 1e-4, for tied (the
    lm_head is the embedding) and untied (a separate lm_head that must be pushed too) models, including
    the prompt KV that the prefix cache would otherwise reuse."""
    pytest.importorskip("vllm")
    paths = request.getfixturevalue(which)
    tok = AutoTokenizer.from_pretrained(paths["model"])
    model = load_sharded(paths["model"], DistInfo(), "fsdp")       # the training scripts' model
    lm = unwrap(model)
    engine = engine_for("vllm", model, paths["model"], tok, vllm_kv_cache_gib=0.0625)
    assert engine.name == "vllm"
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



def test_vllm_engine_close_frees_the_engine_even_when_something_still_holds_it(tiny):
    """close() shuts vLLM's executor down itself (its worker drops the model and KV cache), instead of hoping a
    finalizer runs on `del`: here a second reference to the LLM keeps it alive, and the model is gone anyway."""
    pytest.importorskip("vllm")
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    engine = engine_for("vllm", None, tiny["model"], tok, max_model_len=64, vllm_kv_cache_gib=0.0625)
    engine.generate(PROMPTS, n=1, temperature=1.0, max_tokens=4, seeds=[0, 1])
    held = engine.llm                                            # e.g. a user's handle, or a reference cycle
    runner = held.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    assert runner.model is not None
    engine.close()
    assert runner.model is None and not hasattr(engine, "llm")
    del held


def test_only_the_expected_reload_warnings_are_dropped():
    """A weight sync makes vLLM warn 'RotaryEmbedding: Failed to load weights' (computed, never in a checkpoint) and,
    for tied embeddings, 'ParallelLMHead: ...' (the head is the embedding, which is loaded): both dropped; the
    head's warning stays for an untied model, and any other layer's always."""
    import logging
    from common.rollout import _ExpectedReloadWarnings

    def shown(layer, tied):
        f = _ExpectedReloadWarnings()
        f.tied = tied
        return f.filter(logging.LogRecord("vllm", logging.WARNING, "x", 1, "%s: Failed to load weights", (layer,), None))
    assert not shown("RotaryEmbedding", False) and not shown("ParallelLMHead", True)
    assert shown("ParallelLMHead", False) and shown("QKVParallelLinear", True) and shown("RMSNorm", True)


class _FakeLLM:
    """Records the calls VLLMEngine makes, in order, and which of its memory pools would be asleep: lets the
    CUDA-only sleep/wake sequence be checked on CPU (vLLM's own sleep mode needs a GPU)."""

    def __init__(self, **kwargs):
        self.kwargs, self.calls, self.asleep = kwargs, [], set()

    def sleep(self, level):
        self.calls.append(("sleep", level))
        self.asleep = {"weights", "kv_cache"}

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tuple(tags) if tags else None))
        self.asleep -= set(tags or self.asleep)

    def collective_rpc(self, method, kwargs=None):
        if callable(method):                         # the CPU-only repack of a tied lm_head
            self.calls.append(("rpc", method.__name__))
            return
        assert method == "reload_weights" and "weights" not in self.asleep, (method, self.asleep)
        names = [name for name, _ in kwargs["weights_iterator"]]           # consumed here, as vLLM does
        self.calls.append(("reload_weights", len(names), tuple(sorted(self.asleep))))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))

    def generate(self, prompts, params, use_tqdm=False):
        assert not self.asleep, f"generate while {self.asleep} asleep"
        self.calls.append(("generate", len(prompts)))
        from types import SimpleNamespace
        out = SimpleNamespace(token_ids=[5], logprobs=[{5: SimpleNamespace(logprob=-0.5)}], finish_reason="length",
                              text="x")
        return [SimpleNamespace(outputs=[out] * p.n) for p in params]


@pytest.mark.parametrize("device, sleep", [("cuda", True), ("cuda", False), ("cpu", True)])
def test_vllm_sleep_wake_sequence(tiny, monkeypatch, device, sleep):
    """--vllm-sleep on CUDA: sleep(level=2) after the rollout; the sync wakes the weights alone, reloads them
    (the KV cache still asleep, so the gathered weights have room), then wakes the KV cache and drops the
    prefix cache; a generate on a sleeping engine (weights dropped, not yet synced) is an error. Off, or on
    CPU (where vLLM has no sleep mode), nothing sleeps, and on CPU the tied lm_head is repacked after each
    reload."""
    vllm = pytest.importorskip("vllm")
    monkeypatch.setattr(vllm, "LLM", _FakeLLM)
    tok = AutoTokenizer.from_pretrained(tiny["model"])
    model = load_sharded(tiny["model"], DistInfo(), "fsdp")       # the training scripts' model (on the CPU)
    engine = engine_for("vllm", model, tiny["model"], tok, DistInfo(device=torch.device(device)), max_model_len=64,
                        vllm_sleep=sleep)
    llm, on = engine.llm, sleep and device == "cuda"
    assert llm.kwargs["enable_sleep_mode"] is on
    assert llm.kwargs["dtype"] == ("bfloat16" if device == "cuda" else "float32")
    n = len(list(full_params(model)))                # tied: the lm_head is sent once, as the embedding
    for _ in range(2):                               # rollout, train, sync: twice
        engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=4, seeds=[0, 1])
        engine.sleep()
        engine.sync_weights(model)
    engine.sleep()
    if on:                                           # level 2 dropped the weights: a generate without a sync
        with pytest.raises(RuntimeError, match="call sync_weights"):
            engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=4, seeds=[0, 1])
        step = [("generate", 2), ("sleep", 2), ("wake_up", ("weights",)), ("reload_weights", n, ("kv_cache",)),
                ("wake_up", ("kv_cache",)), ("reset_prefix_cache",)]
        tail = [("sleep", 2)]
    else:
        engine.generate(PROMPTS, n=2, temperature=1.0, max_tokens=4, seeds=[0, 1])
        step = [("generate", 2), ("reload_weights", n, ())] + [("rpc", "_repack_tied_lm_head")] * (device == "cpu") + \
               [("reset_prefix_cache",)]
        tail = [("generate", 2)]
    assert llm.calls == step * 2 + tail


def test_vllm_memory_rule_on_cuda_is_checked_before_the_engine_starts():
    """vLLM 0.32 needs FREE >= gpu_memory_utilization x TOTAL at start-up, even with an explicit KV size."""
    from common.rollout import vllm_memory_kwargs
    gib = 2 ** 30
    # 80 GB card, 20 GiB of training state resident: an explicit KV size gets a utilisation that is free now
    kw = vllm_memory_kwargs(60 * gib, 80 * gib, 0.5, 8.0)
    assert kw["kv_cache_memory_bytes"] == 8 * gib and kw["gpu_memory_utilization"] * 80 * gib <= 60 * gib
    assert vllm_memory_kwargs(60 * gib, 80 * gib, 0.5, None) == {"gpu_memory_utilization": 0.5}
    with pytest.raises(SystemExit, match=r"--vllm-gpu-memory 0.9 .* use at most 0.72"):
        vllm_memory_kwargs(60 * gib, 80 * gib, 0.9, None)
    with pytest.raises(SystemExit, match="--vllm-kv-cache-gib 70"):
        vllm_memory_kwargs(60 * gib, 80 * gib, 0.5, 70.0)
