"""rl_dapo.py: the DAPO math against float64 references, the token-level loss aggregation, and tiny end-to-end
runs (HF and vLLM engines, --compile, torchrun FSDP2 on gloo, resume, bad input)."""
import json
import math
import os

import pytest
import torch

import rl_dapo
from common.rollout import pack_sequences
from tests._scripts import (assert_finite_row, assert_rows_match, assert_same_weights, metrics,
                            run_script, weights)

# ----------------------------------------------------------------------------- rewards and advantages


def test_overlong_penalty():
    L, B = 20, 4                                          # punished above L - B = 16
    assert rl_dapo.overlong_penalty(10, L, B, 1.0) == 0.0
    assert rl_dapo.overlong_penalty(16, L, B, 1.0) == 0.0                  # at the start of the buffer
    assert rl_dapo.overlong_penalty(17, L, B, 1.0) == pytest.approx(-0.25)
    assert rl_dapo.overlong_penalty(18, L, B, 0.5) == pytest.approx(-0.25)  # factor scales it
    assert rl_dapo.overlong_penalty(20, L, B, 1.0) == pytest.approx(-1.0)   # -factor at L
    assert rl_dapo.overlong_penalty(22, L, B, 1.0) == pytest.approx(-1.5)   # linear past L
    assert rl_dapo.overlong_penalty(20, L, 0, 1.0) == 0.0                   # no buffer: off
    assert rl_dapo.overlong_penalty(20, L, B, 0.0) == 0.0                   # no factor: off


def test_group_advantages_match_float64_reference():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(5, 7, generator=g)
    scores[2] = 0.5                                       # all equal: zero advantage, not nan
    adv = rl_dapo.group_advantages(scores)
    s = scores.double()
    ref = torch.empty_like(s)
    for i in range(s.shape[0]):
        row, n = s[i].tolist(), s.shape[1]
        mean = sum(row) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in row) / (n - 1))        # unbiased
        ref[i] = torch.tensor([(x - mean) / (std + 1e-6) for x in row])
    torch.testing.assert_close(adv.double(), ref, rtol=1e-5, atol=1e-6)
    assert torch.equal(adv[2], torch.zeros(7))
    # +1/-1 rewards: [1, -1] -> +-1/sqrt(2) (unbiased std sqrt(2)), not +-1 (biased std 1)
    pair = rl_dapo.group_advantages(torch.tensor([[1.0, -1.0]]))[0]
    assert pair.tolist() == pytest.approx([1 / (math.sqrt(2) + 1e-6), -1 / (math.sqrt(2) + 1e-6)], rel=1e-6)


def test_keep_group():
    assert not rl_dapo.keep_group([0.0, 0.0, 0.0, 0.0])
    assert not rl_dapo.keep_group([1.0, 1.0, 1.0])
    assert rl_dapo.keep_group([0.0, 1.0])
    assert rl_dapo.keep_group([1.0, 0.0, 1.0, 1.0])


# ----------------------------------------------------------------------------- the PPO-clip token loss

EL, EH, C = 0.2, 0.28, 10.0


def loss_at(ratio, adv, eps_low=EL, eps_high=EH, dual=C, tis=None):
    logp = torch.tensor([math.log(ratio)], dtype=torch.float64)
    out = rl_dapo.dapo_token_loss(logp, torch.zeros(1, dtype=torch.float64), torch.tensor([adv], dtype=torch.float64),
                                  eps_low, eps_high, dual, None if tis is None else torch.tensor([tis], dtype=torch.float64))
    return [out[0].item()] + [bool(m.item()) for m in out[1:]]


@pytest.mark.parametrize("ratio, adv, loss, hi, lo, dual", [
    (1.1, 1.0, -1.1, False, False, False),     # A > 0 inside the range: -A r
    (1.5, 1.0, -1.28, True, False, False),     # A > 0 above 1 + eps_high: capped (no more push up)
    (0.5, 1.0, -0.5, False, False, False),     # A > 0 below 1 - eps_low: not clipped (pessimistic min)
    (0.9, -2.0, 1.8, False, False, False),     # A < 0 inside: -A r
    (0.5, -1.0, 0.8, False, True, False),      # A < 0 below 1 - eps_low: floored
    (1.5, -1.0, 1.5, False, False, False),     # A < 0 above 1 + eps_high: not clipped
    (5.0, -1.0, 5.0, False, False, False),     # A < 0, ratio below the dual bound c
    (20.0, -1.0, 10.0, False, False, True),    # A < 0, huge ratio: dual clip caps the loss at -A c
    (20.0, -0.5, 5.0, False, False, True),
    (20.0, 1.0, -1.28, True, False, False),    # dual clip does not apply to A > 0
    (1.7, 0.0, 0.0, False, False, False),      # A = 0: nothing
])
def test_dapo_token_loss_cases(ratio, adv, loss, hi, lo, dual):
    got = loss_at(ratio, adv)
    assert got[0] == pytest.approx(loss, rel=1e-9, abs=1e-12)
    assert got[1:] == [hi, lo, dual]


def test_dapo_token_loss_clip_higher_and_dual_off_and_tis():
    # clip-higher: with eps_high 0.28 a ratio of 1.25 still moves a positive token; with symmetric 0.2 it is capped
    assert loss_at(1.25, 1.0)[0] == pytest.approx(-1.25)
    assert loss_at(1.25, 1.0, eps_high=0.2)[0] == pytest.approx(-1.2)
    # ... and the lower side is unchanged by it: 0.7 is floored at 0.8 for A < 0 either way
    assert loss_at(0.7, -1.0)[0] == pytest.approx(0.8) == loss_at(0.7, -1.0, eps_high=0.2)[0]
    # dual_clip 0 disables the cap
    assert loss_at(20.0, -1.0, dual=0.0)[0] == pytest.approx(20.0)
    assert not loss_at(20.0, -1.0, dual=0.0)[3]
    # TIS multiplies the per-token loss
    assert loss_at(1.1, 1.0, tis=0.5)[0] == pytest.approx(-0.55)
    assert loss_at(20.0, -1.0, tis=2.0)[0] == pytest.approx(20.0)


def reference_loss(logp, old, adv, eps_low, eps_high, c, w):
    """The DAPO/verl loss written token by token, in the 'pessimistic' form: A > 0: -A min(r, 1+eps_high);
    A < 0: |A| min(max(r, 1-eps_low), c); times the TIS weight."""
    out, hi, lo, dual = [], [], [], []
    for lp, o, a, wt in zip(logp, old, adv, w):
        r = torch.exp(lp - o)
        if a > 0:
            loss = -a * torch.clamp(r, max=1 + eps_high)
        elif a < 0:
            floor = torch.clamp(r, min=1 - eps_low)
            loss = -a * (torch.clamp(floor, max=c) if c > 0 else floor)
        else:
            loss = r * 0
        out.append(loss * wt)
        hi.append(bool(a > 0 and r > 1 + eps_high))
        lo.append(bool(a < 0 and r < 1 - eps_low))
        dual.append(bool(c > 0 and a < 0 and max(r.item(), 1 - eps_low) > c))
    return torch.stack(out), torch.tensor(hi), torch.tensor(lo), torch.tensor(dual)


@pytest.mark.parametrize("dual_clip, with_tis", [(10.0, False), (3.0, True), (0.0, False)])
def test_dapo_token_loss_matches_float64_reference(dual_clip, with_tis):
    g = torch.Generator().manual_seed(1)
    n = 400
    old = -torch.rand(n, generator=g, dtype=torch.float64) * 3
    logp = (old + torch.randn(n, generator=g, dtype=torch.float64) * 1.2).requires_grad_(True)
    adv = torch.randn(n, generator=g, dtype=torch.float64)
    adv[:10] = 0.0
    w = torch.rand(n, generator=g, dtype=torch.float64) * 2 if with_tis else torch.ones(n, dtype=torch.float64)
    loss, hi, lo, dual = rl_dapo.dapo_token_loss(logp, old, adv, EL, EH, dual_clip, w if with_tis else None)
    (grad,) = torch.autograd.grad(loss.sum(), logp)
    ref, ref_hi, ref_lo, ref_dual = reference_loss(logp, old, adv, EL, EH, dual_clip, w)
    (ref_grad,) = torch.autograd.grad(ref.sum(), logp)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-12, atol=1e-12)
    assert torch.equal(hi, ref_hi) and torch.equal(lo, ref_lo) and torch.equal(dual, ref_dual)
    assert hi.any() and lo.any() and (dual.any() or dual_clip == 0)        # every branch was exercised
    assert (grad[hi] == 0).all() and (grad[lo] == 0).all() and (grad[dual] == 0).all()   # clipped: no gradient


# ----------------------------------------------------------------------------- loss aggregation


def test_microbatch_split_gives_the_global_token_mean_gradient():
    """The script's `loss_tok.sum() / mb_tokens * world_size` per micro-batch, summed by backward (and averaged
    over ranks by DDP/FSDP), is the gradient of the token mean over the whole mini-batch, not the mean of the
    micro-batch means, nor the mean of the per-sequence means. A linear policy on sequences of different lengths."""
    g = torch.Generator().manual_seed(0)
    H, V, lengths = 8, 13, [3, 11, 1, 6, 4, 9]
    w0 = torch.randn(V, H, generator=g, dtype=torch.float64)
    hid = [torch.randn(n, H, generator=g, dtype=torch.float64) for n in lengths]
    tgt = [torch.randint(V, (n,), generator=g) for n in lengths]
    adv = [1.0, -0.7, 2.0, -1.5, 0.3, -0.2]
    old = [torch.log_softmax(h @ w0.T, -1).gather(1, t[:, None])[:, 0] + 0.3 * torch.randn(len(t), generator=g,
                                                                                         dtype=torch.float64)
           for h, t in zip(hid, tgt)]

    def token_losses(w, idx):                             # [tokens of the sequences idx]
        logp = torch.cat([torch.log_softmax(hid[i] @ w.T, -1).gather(1, tgt[i][:, None])[:, 0] for i in idx])
        o = torch.cat([old[i] for i in idx])
        a = torch.cat([torch.full((lengths[i],), adv[i], dtype=torch.float64) for i in idx])
        return rl_dapo.dapo_token_loss(logp, o, a, EL, EH, C)[0]

    def grad_of(fn):
        w = w0.clone().requires_grad_(True)
        fn(w)
        return w.grad

    everything = range(len(lengths))
    reference = grad_of(lambda w: token_losses(w, everything).mean().backward())
    total = sum(lengths)

    def script_pattern(w, micro):                       # one process, micro-batches of `micro` sequences
        for s in range(0, len(lengths), micro):
            (token_losses(w, range(s, min(s + micro, len(lengths)))).sum() / total * 1).backward()
    for micro in (1, 2, 4):
        torch.testing.assert_close(grad_of(lambda w: script_pattern(w, micro)), reference, rtol=1e-10, atol=1e-12)

    # two "ranks" with different token counts: each scales by world_size, DDP/FSDP average the gradients
    ranks = [[0, 1, 2], [3, 4, 5]]
    per_rank = [grad_of(lambda w, r=r: (token_losses(w, r).sum() / total * 2).backward()) for r in ranks]
    torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, reference, rtol=1e-10, atol=1e-12)

    # the aggregations it must not be
    mean_of_micro_means = grad_of(lambda w: sum(token_losses(w, range(s, s + 2)).mean() / 3
                                                for s in (0, 2, 4)).backward())
    mean_of_seq_means = grad_of(lambda w: sum(token_losses(w, [i]).mean() / len(lengths)
                                              for i in everything).backward())
    assert not torch.allclose(mean_of_micro_means, reference, rtol=1e-3)
    assert not torch.allclose(mean_of_seq_means, reference, rtol=1e-3)


def test_pack_sequences_masks_exactly_the_response_predictions():
    seqs = [([5, 6, 7], [8, 9]), ([1], [2, 3, 4]), ([11, 12, 13, 14], [15])]
    ids, attn, pred, targets = pack_sequences(seqs, pad_id=0, device="cpu")
    assert ids.tolist() == [[5, 6, 7, 8, 9], [1, 2, 3, 4, 0], [11, 12, 13, 14, 15]]
    assert attn.tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]
    for i, (p, r) in enumerate(seqs):
        for t in range(ids.shape[1]):
            # position t reads token t+1: in the loss iff t+1 is a response token
            assert bool(pred[i, t]) == (len(p) <= t + 1 < len(p) + len(r)), (i, t)
        assert targets[i][pred[i]].tolist() == r
    assert targets[pred].tolist() == [t for _, r in seqs for t in r]      # flattened in sequence order
    assert int(pred.sum()) == sum(len(r) for _, r in seqs)


# ----------------------------------------------------------------------------- end to end

# One step = 4 groups of 4 responses, trained as 2 mini-batches of 2 groups (so the second one is off-policy:
# old log-probs recomputed, ratios != 1) in packed micro-batches of at most 64 tokens (2-3 sequences, uneven). The warm model gets
# ~half its answers right, so 4 of the 8 prompts drawn per generation batch have mixed groups (asserted).
STEP_METRICS = ["train/lr", "rollout/accuracy", "rollout/reward_mean", "rollout/response_len_mean",
                "rollout/response_len_max", "rollout/clipped_frac", "rollout/distinct_answers", "rollout/groups_seen",
                "rollout/groups_kept", "rollout/groups_filtered", "rollout/groups_used", "rollout/gen_batches",
                "rollout/groups_all_right", "rollout/groups_all_wrong", "rollout/uniform_frac", "rollout/entropy_est",
                "time/rollout", "time/grading", "perf/rollout_tokens_per_s", "train/pg_loss", "train/clip_frac_upper",
                "train/clip_frac_lower", "train/clip_frac_dual", "train/approx_kl", "train/entropy",
                "train/entropy_t1", "train/grad_norm", "train/updates", "train/updates_skipped", "train/tokens",
                "rollout/logprob_diff_mean", "rollout/logprob_diff_max", "time/update", "time/weight_sync",
                "time/step"]
COMPARED = ["train/pg_loss", "train/grad_norm", "train/entropy", "train/entropy_t1", "train/tokens",
            "train/approx_kl", "train/clip_frac_lower", "train/clip_frac_upper", "rollout/accuracy",
            "rollout/groups_kept", "rollout/groups_used", "rollout/response_len_mean"]


def rl_args(warm, out, name, *extra, engine="hf", steps=2):
    args = ["--model", warm["model"], "--data", warm["train"], "--prompt-style", "plain", "--grade-workers", "0",
            "--rollout-engine", engine, "--steps", steps, "--group-size", 4, "--prompts-per-step", 4,
            "--gen-batch-prompts", 8, "--max-gen-batches", 3, "--max-response-len", 24, "--overlong-buffer", 8,
            "--ppo-mini-batch", 2, "--micro-batch-tokens", 64, "--lr", 1e-3, "--warmup-steps", 1,
            "--out", out, "--run-name", name]
    if engine == "vllm":
        args += ["--vllm-kv-cache-gib", 0.125, "--rollout-temperature", 1.2]
    return args + [str(a) for a in extra]


def check_run(run_dir, steps, prompts_per_step=4):
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert_finite_row(r, STEP_METRICS)
        assert 0 <= r["rollout/accuracy"] <= 1
        assert r["rollout/reward_mean"] == pytest.approx(2 * r["rollout/accuracy"] - 1)
        assert r["rollout/groups_used"] == prompts_per_step         # the tests below rely on full batches
        assert r["rollout/groups_kept"] + r["rollout/groups_filtered"] == r["rollout/groups_seen"]
        assert r["rollout/groups_all_right"] + r["rollout/groups_all_wrong"] == r["rollout/groups_filtered"]
        assert r["rollout/uniform_frac"] == pytest.approx(r["rollout/groups_filtered"] / r["rollout/groups_seen"])
        assert r["rollout/entropy_est"] > 0
        assert r["train/updates"] == 2 and r["train/updates_skipped"] == 0
        assert r["train/tokens"] >= 4 * 4                           # every response has at least one token
        assert r["train/entropy"] > 0 and r["train/grad_norm"] > 0
        # the engine's log-probs of its samples vs the trainer's, before the step's first update (step 2 and
        # later: after a weight sync)
        assert r["rollout/logprob_diff_max"] < 1e-3
    for name in ("config.json", "env.json", "command.txt", "rl_dapo.py"):
        assert os.path.isfile(os.path.join(run_dir, name)), name
    return rows


def check_loads_in_transformers(model_dir, like_dir=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok("What is 3+4?\n").input_ids])
    with torch.no_grad():
        assert torch.isfinite(lm(ids).logits).all()
    if like_dir is not None:                              # the checkpoint's weights are the final ones
        assert_same_weights(model_dir, like_dir, atol=0)


@pytest.fixture(scope="module")
def hf_run(tiny_warm, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("rl_hf"))
    run_script("rl_dapo.py", rl_args(tiny_warm, out, "hf", "--no-compile", "--save-every", 1))
    return os.path.join(out, "hf")


@pytest.fixture(scope="module")
def vllm_run(tiny_warm, tmp_path_factory):
    pytest.importorskip("vllm")
    out = str(tmp_path_factory.mktemp("rl_vllm"))
    run_script("rl_dapo.py", rl_args(tiny_warm, out, "vllm", "--no-compile", "--val-data", tiny_warm["test"],
                                     "--val-max-problems", 4, "--val-every", 0, engine="vllm"))
    return os.path.join(out, "vllm")


@pytest.mark.slow
def test_e2e_hf_engine(hf_run):
    rows = check_run(hf_run, 2)
    assert any(r["train/approx_kl"] > 0 for r in rows)          # the second mini-batch is off-policy
    ckpts = sorted(os.listdir(os.path.join(hf_run, "checkpoints")))
    assert ckpts == ["step_000001", "step_000002"]              # --save-every 1, --keep-last 2
    check_loads_in_transformers(os.path.join(hf_run, "checkpoints", "step_000002"), os.path.join(hf_run, "final"))
    # training moved the weights
    start = weights(json.load(open(os.path.join(hf_run, "config.json")))["model_path"])
    end = weights(os.path.join(hf_run, "final"))
    assert max((start[k] - end[k]).abs().max().item() for k in start) > 1e-4


@pytest.mark.slow
def test_e2e_vllm_engine(vllm_run):
    rows = check_run(vllm_run, 2)
    # sampled at T=1.2: the trainer's log-probs and entropy use logits / T, the T=1 entropy is logged apart
    assert all(r["train/entropy"] > r["train/entropy_t1"] for r in rows)
    assert "val/accuracy" in rows[-1] and 0 <= rows[-1]["val/accuracy"] <= 1 and rows[-1]["val/response_len"] > 0
    check_loads_in_transformers(os.path.join(vllm_run, "final"), os.path.join(vllm_run, "checkpoints", "step_000002"))


@pytest.mark.slow
def test_microbatch_size_and_compile_do_not_change_the_step(hf_run, tiny_warm, tmp_path):
    """Step 1 again with the whole mini-batch in one packed micro-batch, with every sequence alone, and with the
    compiled head: the same update (a token mean over the mini-batch, whatever the split; the compiled head is
    the eager one's twin)."""
    ref = metrics(hf_run)[0]
    for name, extra in (("whole", ["--no-compile", "--micro-batch-tokens", 4096]),
                        ("alone", ["--no-compile", "--micro-batch-tokens", 1]), ("compiled", ["--compile"])):
        run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), name, *extra, steps=1))
        row = metrics(os.path.join(tmp_path, name))[0]
        for k in COMPARED:
            rel = 1e-4 if name == "compiled" else 1e-5             # another split only reorders fp32 sums
            assert row[k] == pytest.approx(ref[k], rel=rel, abs=1e-7), f"{name}: {k}: {row[k]} vs {ref[k]}"


@pytest.mark.slow
def test_torchrun_fsdp2_matches_one_process(vllm_run, tiny_warm, tmp_path):
    """2 processes, FSDP2 on gloo: each samples half the prompts with the same per-position seeds, and each
    global mini-batch is split over the ranks, so step 1 reproduces the 1-process step (same kept groups,
    same global token-mean gradient: grad_norm is taken after the cross-rank reduction)."""
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "ddp2", "--no-compile", "--sharding", "fsdp",
                                     engine="vllm", steps=1), nproc=2)
    two = metrics(os.path.join(tmp_path, "ddp2"))[0]
    one = metrics(vllm_run)[0]
    assert two["rollout/groups_used"] == one["rollout/groups_used"] == 4
    for k in COMPARED:
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), f"{k}: 2 processes {two[k]} vs 1 process {one[k]}"
    assert two["rollout/logprob_diff_mean"] == pytest.approx(one["rollout/logprob_diff_mean"], abs=1e-6)  # fp32 noise
    assert json.load(open(os.path.join(tmp_path, "ddp2", "config.json")))["world_size"] == 2


@pytest.mark.slow
def test_vllm_tensor_parallel_matches_one_process(vllm_run, tiny_warm, tmp_path):
    """--vllm-tp 2 on 2 processes: one vLLM engine split over both ranks (its TP group built inside our process
    group by the external launcher), both ranks serving the same prompts. Same seeds, same samples: step 1 is
    the 1-process step, and after the weight sync (step 2's rollout) vLLM's log-probs still match the
    trainer's, so every TP shard received its slice of the new weights."""
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "tp2", "--no-compile", "--sharding", "fsdp",
                                     "--vllm-tp", 2, engine="vllm", steps=2), nproc=2)
    rows, ref = metrics(os.path.join(tmp_path, "tp2")), metrics(vllm_run)
    for k in COMPARED:
        assert rows[0][k] == pytest.approx(ref[0][k], rel=1e-4, abs=1e-6), f"{k}: TP=2 {rows[0][k]} vs 1 process {ref[0][k]}"
    assert rows[1]["rollout/logprob_diff_max"] < 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["fsdp", "ddp"])
def test_bf16_compute_is_close_to_fp32(vllm_run, tiny_warm, tmp_path, sharding):
    """--bf16, the GPU default, run on CPU: FSDP2 with MixedPrecisionPolicy(bf16 params, fp32 reduce), or DDP
    under bf16 autocast. The rollout (fp32 vLLM, same seeds) is the 1-process fp32 run's; the trainer's
    numbers move by bf16 rounding only, and the engine-vs-trainer log-prob gap shows that the trainer did
    compute in bf16 (fp32 vs fp32 is ~1e-6)."""
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), sharding, "--no-compile", "--sharding", sharding,
                                     "--bf16", engine="vllm", steps=1), nproc=2)
    row, ref = metrics(os.path.join(tmp_path, sharding))[0], metrics(vllm_run)[0]
    for k in ("rollout/accuracy", "rollout/groups_used", "train/tokens", "rollout/response_len_mean"):
        assert row[k] == ref[k], k                                  # same samples
    assert 1e-4 < row["rollout/logprob_diff_mean"] < 0.01       # measured ~9e-4
    assert row["train/entropy"] == pytest.approx(ref["train/entropy"], rel=0.02)
    # grad_norm is the mean over the step's 2 mini-batches, and the second follows an Adam step at lr 1e-3 whose
    # first update is ~lr x sign(g): bf16 rounding of near-zero gradient coordinates flips some of those signs.
    # Measured (FSDP2 bf16, 2 processes): one mini-batch 1.2% from fp32, independent of --micro-batch-tokens
    # (1 / 64 / 4096 within 0.2% of each other); two mini-batches 9%. DDP (bf16 autocast): within 3%.
    assert row["train/grad_norm"] == pytest.approx(ref["train/grad_norm"], rel=0.03 if sharding == "ddp" else 0.12)
    # |pg_loss| ~1e-2; the second mini-batch moves with grad_norm's sign effect above (FSDP2: 1.2e-3 seen)
    assert row["train/pg_loss"] == pytest.approx(ref["train/pg_loss"], abs=1e-3 if sharding == "ddp" else 3e-3)


@pytest.mark.slow
def test_resume_reproduces_the_straight_run(vllm_run, tiny_warm, tmp_path):
    """1 step + checkpoint, then a new process with --resume (and --steps 2): the same metrics and the same
    final weights as the straight 2-step run (vLLM seeds per prompt position, data order from the cursor,
    optimizer state and RNGs from the checkpoint, the engine re-synced to the resumed weights)."""
    split = os.path.join(tmp_path, "vllm")
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "vllm", "--no-compile", "--val-data", tiny_warm["test"],
                                     "--val-max-problems", 4, "--val-every", 0, "--save-every", 1,
                                     engine="vllm", steps=1))
    assert os.listdir(os.path.join(split, "checkpoints")) == ["step_000001"]
    run_script("rl_dapo.py", ["--resume", split, "--steps", 2])
    straight, resumed = metrics(vllm_run), metrics(split)
    # the 1-step run validated at its last step; the straight run did not at step 1
    resumed[0] = {k: v for k, v in resumed[0].items() if not k.startswith("val/")}
    assert_rows_match(straight, resumed, rel=1e-6)
    assert_same_weights(os.path.join(vllm_run, "final"), os.path.join(split, "final"), atol=1e-6)


# ----------------------------------------------------------------------------- bad input: clear, early, non-zero


@pytest.mark.parametrize("case, message", [
    ("missing_model", "does not exist"),
    ("missing_data", "data file not found"),
    ("group_size_1", "--group-size must be at least 2"),
    ("bad_engine", "invalid choice"),
    ("dual_clip_le_1", "--dual-clip must be > 1"),
    ("mini_batch_split", "must be a multiple of --ppo-mini-batch"),
    ("too_long", "more than the model's max_position_embeddings"),      # the tiny model's limit is 1024
    ("lr_nan", "--lr must be a finite number, got nan"),
])
def test_bad_input_fails_before_compute(case, message, tiny, tmp_path, capsys):
    out = tmp_path / "runs"
    args = {"missing_model": ["--model", str(tmp_path / "no_such_model"), "--data", tiny["train"]],
            "missing_data": ["--model", tiny["model"], "--data", str(tmp_path / "missing.jsonl")],
            "group_size_1": ["--model", tiny["model"], "--data", tiny["train"], "--group-size", "1"],
            "bad_engine": ["--model", tiny["model"], "--data", tiny["train"], "--rollout-engine", "sglang"],
            "dual_clip_le_1": ["--model", tiny["model"], "--data", tiny["train"], "--dual-clip", "0.5"],
            "mini_batch_split": ["--model", tiny["model"], "--data", tiny["train"], "--prompts-per-step", "48",
                                 "--ppo-mini-batch", "32"],
            "too_long": ["--model", tiny["model"], "--data", tiny["train"]],              # default 20480 tokens
            "lr_nan": ["--model", tiny["model"], "--data", tiny["train"], "--lr", "nan"]}[case]
    with pytest.raises(SystemExit) as e:
        rl_dapo.main(args + ["--prompt-style", "plain", "--out", str(out)])
    assert e.value.code not in (0, None)
    text = str(e.value.code) + capsys.readouterr().err
    assert message in text
    assert not out.exists()                                  # no run directory, nothing loaded


def test_bad_input_exit_status_from_the_command_line(tmp_path):
    proc = run_script("rl_dapo.py", ["--model", str(tmp_path / "nope"), "--out", str(tmp_path)], check=False, timeout=120)
    assert proc.returncode == 1 and "checkpoint directory does not exist" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.slow
def test_non_finite_loss_skips_the_update_and_never_saves_bad_weights(tiny_warm, tmp_path, monkeypatch, capsys):
    """A NaN loss (here: every token's, from step 2 on) stops that update with a message; the weights and the
    checkpoint after it are the last good ones, finite; the skipped updates are counted in the metrics."""
    calls = {"step": 0}
    real = rl_dapo.dapo_token_loss

    def poisoned(*a, **k):
        loss, *rest = real(*a, **k)
        return (loss * float("nan") if calls["step"] >= 1 else loss), *rest

    real_sync = rl_dapo.make_engine

    def counting_engine(*a, **k):                     # the step count, from the weight syncs at each step's end
        engine = real_sync(*a, **k)
        sync = engine.sync_weights

        def sync_and_count(model):
            sync(model)
            calls["step"] += 1
        engine.sync_weights = sync_and_count
        return engine

    monkeypatch.setattr(rl_dapo, "dapo_token_loss", poisoned)
    monkeypatch.setattr(rl_dapo, "make_engine", counting_engine)
    args = rl_args(tiny_warm, str(tmp_path), "nan", "--no-compile", "--save-every", 1, "--keep-last", 3)
    rl_dapo.main([str(a) for a in args])
    run = os.path.join(tmp_path, "nan")
    rows = metrics(run)
    assert rows[0]["train/updates"] == 2 and rows[0]["train/updates_skipped"] == 0
    assert rows[1]["train/updates"] == 0 and rows[1]["train/updates_skipped"] == 2
    assert "non-finite loss/gradient" in capsys.readouterr().out
    after1, after2 = weights(os.path.join(run, "checkpoints", "step_000001")), weights(os.path.join(run, "final"))
    for k in after1:
        assert torch.isfinite(after2[k]).all(), k
        assert torch.equal(after1[k], after2[k]), k                  # step 2 changed nothing
    assert after2.keys() == weights(os.path.join(run, "checkpoints", "step_000002")).keys()


def test_sharding_none_under_several_processes_is_an_error():
    from common.dist import DistInfo, check_sharding
    check_sharding("none", DistInfo())                       # one process: fine
    check_sharding("fsdp", DistInfo(rank=0, world_size=2))
    with pytest.raises(SystemExit, match="no gradient sync"):
        check_sharding("none", DistInfo(rank=0, world_size=2))


def test_log_ratio_is_clamped_so_an_overflowing_ratio_gives_finite_gradients():
    """exp(100) overflows float32 to inf; unclamped, inf x 0 in the clipped branch gives a NaN gradient."""
    logp = torch.tensor([100.0, -100.0, 0.1], requires_grad=True)
    old = torch.zeros(3)
    adv = torch.tensor([-1.0, 1.0, 1.0])
    loss, *_ = rl_dapo.dapo_token_loss(logp, old, adv, 0.2, 0.28, 10.0)
    loss.sum().backward()
    assert torch.isfinite(loss).all() and torch.isfinite(logp.grad).all()
    assert logp.grad[0] == 0 and logp.grad[1] == 0             # outside [-20, 20]: no gradient (as verl)
    assert loss[0].item() == pytest.approx(10.0)                # dual clip caps -A r at -A c


def test_logprob_mismatch_warns_loudly(capsys):
    from common.runlog import warn_logprob_mismatch
    assert not warn_logprob_mismatch(0.01, 3)
    assert warn_logprob_mismatch(0.2, 3)
    out = capsys.readouterr().out
    assert "0.200" in out and "VLLM_USE_V2_MODEL_RUNNER=0" in out and "weight sync" not in out
    assert warn_logprob_mismatch(0.2, 1, first_after_sync=True)
    assert "first step sampled after vLLM's sleep / wake / weight sync" in capsys.readouterr().out


@pytest.mark.slow
def test_entropy_is_the_sampling_policys_and_only_whole_mini_batches_train(hf_run, tiny_warm, tmp_path):
    """With 2 mini-batches the entropy is taken in the pre-update pass, so step 1 logs the same entropy as one
    mini-batch of the same samples (not the entropy after the first update). And a step cut short by
    --max-gen-batches trains on its whole mini-batches of kept groups only."""
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "one_mini", "--no-compile", "--ppo-mini-batch", 4,
                                     steps=1))
    one, two = metrics(os.path.join(tmp_path, "one_mini"))[0], metrics(hf_run)[0]
    assert one["train/updates"] == 1 and two["train/updates"] == 2
    for k in ("train/entropy", "train/entropy_t1", "train/tokens"):
        assert one[k] == pytest.approx(two[k], rel=1e-5), k
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "short", "--no-compile", "--max-gen-batches", 1,
                                     "--gen-batch-prompts", 5, steps=1))
    r = metrics(os.path.join(tmp_path, "short"))[0]
    assert r["rollout/gen_batches"] == 1
    assert r["rollout/groups_used"] == min(r["rollout/groups_kept"], 4) // 2 * 2
    assert r.get("train/updates", 0) == r["rollout/groups_used"] // 2



def _entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z.double(), -1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_entropy_est_is_the_entropy_of_the_law_sampled_from(temperature):
    """rollout/entropy_est = mean -log p(sampled token) over every sampled token: E[-log p(x)] under x ~ p is
    H(p), so over many tokens it matches the exact full-vocabulary entropy of softmax(z / T) at the same
    positions (float64 reference); at T=1.5 it is clearly not the entropy at T=1."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common.dist import DistInfo
    from common.rollout import HFEngine
    model_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny_math", "model")
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = HFEngine(lm, tok, DistInfo(), batch_size=256)
    prompts = [f"What is {a}+{b}-{c}?" for a, b, c in [(3, 14, 5), (22, 7, 9), (11, 4, 18), (27, 19, 6)]]
    groups = engine.generate(prompts, n=64, temperature=temperature, max_tokens=32, seeds=[1, 2, 3, 4])
    nll, ent_t, ent_1, count = 0.0, 0.0, 0.0, 0
    with torch.no_grad():
        for s in (s for g in groups for s in g):
            z = lm(torch.tensor([s.prompt_ids + s.response_ids])).logits[0, len(s.prompt_ids) - 1:-1]
            ent_t += _entropy(z / temperature).sum().item()       # the states that predict each response token
            ent_1 += _entropy(z).sum().item()
            nll -= sum(s.logprobs)
            count += len(s.response_ids)
    est, exact = nll / count, ent_t / count
    assert count > 2000
    assert est == pytest.approx(exact, rel=0.1), (est, exact)
    if temperature != 1.0:
        assert abs(est - ent_1 / count) > 0.3 * exact, (est, ent_1 / count)
