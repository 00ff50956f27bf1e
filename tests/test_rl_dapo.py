"""rl_dapo.py: the DAPO math against float64 references, the token-level loss aggregation, and tiny end-to-end
runs (HF and vLLM engines, --compile, torchrun FSDP2 on gloo, resume, bad input)."""
import json
import math
import os

import pytest
import torch

import rl_dapo
from common.rollout import pack_sequences
from tests._scripts import (ROOT, assert_finite_row, assert_rows_match, assert_same_weights, grade_recorded, metrics,
                            run_in_process, run_script, sampled_nll, weights)

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
    """The script's normaliser, rl_dapo.token_mean_scales, applied as the script applies it (each micro-batch's
    summed token losses times its mini-batch's factor, summed by backward, averaged over ranks by DDP/FSDP), gives
    the gradient of the token mean over each whole mini-batch: not the mean of the micro-batch means, nor of the
    per-sequence means, nor the token mean over the whole step's tokens (which only rescales the gradient, so an
    Adam run cannot see it: the gradients themselves are compared). A linear policy, sequences of different lengths,
    a step of two mini-batches of three sequences."""
    g = torch.Generator().manual_seed(0)
    H, V, lengths, per_mini = 8, 13, [3, 11, 1, 6, 4, 9], 3
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

    minis = [list(range(lo, lo + per_mini)) for lo in range(0, len(lengths), per_mini)]
    assert rl_dapo.token_mean_scales(lengths, per_mini, 1) == pytest.approx([1 / 15, 1 / 19])
    for mb, mini in enumerate(minis):
        reference = grad_of(lambda w: token_losses(w, mini).mean().backward())    # the token mean, float64

        def script_pattern(w, micro, world=1, part=mini):    # micro-batches of `micro` sequences of this rank's part
            scale = rl_dapo.token_mean_scales(lengths, per_mini, world)[mb]
            for s in range(0, len(part), micro):
                (token_losses(w, part[s:s + micro]).sum() * scale).backward()
        for micro in (1, 2, 3):
            torch.testing.assert_close(grad_of(lambda w: script_pattern(w, micro)), reference, rtol=1e-10, atol=1e-12)
        # two "ranks" with different token counts: each scales by its factor, DDP/FSDP average the gradients
        per_rank = [grad_of(lambda w, r=r: script_pattern(w, 1, 2, r)) for r in (mini[:1], mini[1:])]
        torch.testing.assert_close((per_rank[0] + per_rank[1]) / 2, reference, rtol=1e-10, atol=1e-12)

        # the aggregations it must not be
        mean_of_micro_means = grad_of(lambda w: sum(token_losses(w, [i]).mean() / len(mini) for i in mini).backward())
        whole_step = grad_of(lambda w: (token_losses(w, mini).sum() / sum(lengths)).backward())
        assert not torch.allclose(mean_of_micro_means, reference, rtol=1e-3)
        assert not torch.allclose(whole_step, reference, rtol=1e-3)


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


def check_run(run_dir, steps, prompts_per_step=4, gen_batch_prompts=8):
    rows = metrics(run_dir)
    assert [r["step"] for r in rows] == list(range(1, steps + 1))
    for r in rows:
        assert_finite_row(r, STEP_METRICS)
        assert 0 <= r["rollout/accuracy"] <= 1
        assert r["rollout/groups_used"] == prompts_per_step         # the tests below rely on full batches
        assert r["rollout/groups_seen"] == r["rollout/gen_batches"] * gen_batch_prompts    # from the flags
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


def check_rollout_counts(run_dir, calls, data, prompts_per_step=4, seed=0):
    """What a run logs about its rollouts, recounted from the samples it drew (recorded by run_in_process) and graded
    here: the prompts are the data stream's next ones (the cursor advances), accuracy, reward, the uniform and kept
    groups, and the trained tokens are those of the first prompts_per_step mixed groups in stream order."""
    from common.data import cycle_problems, load_problems, render_prompt
    correct = grade_recorded(calls, data)
    drawn = [p for c in calls for p in c["prompts"]]
    assert drawn == [render_prompt(p, None, "plain") for p in cycle_problems(load_problems(data), seed, 0, len(drawn))]
    for r in metrics(run_dir):
        mine = [i for i, c in enumerate(calls) if c["step"] == r["step"] - 1]
        groups = [g for i in mine for g in calls[i]["groups"]]
        right = [g for i in mine for g in correct[i]]                          # [group][sample] 1/0
        flat = [x for g in right for x in g]
        assert r["rollout/groups_seen"] == len(groups) and r["rollout/gen_batches"] == len(mine)
        assert r["rollout/accuracy"] == pytest.approx(sum(flat) / len(flat))
        assert r["rollout/reward_mean"] == pytest.approx(sum(1 if x else -1 for x in flat) / len(flat))
        assert r["rollout/groups_all_right"] == sum(all(g) for g in right)
        assert r["rollout/groups_all_wrong"] == sum(not any(g) for g in right)
        mixed = [i for i, g in enumerate(right) if 0 < sum(g) < len(g)]
        assert r["rollout/groups_kept"] == len(mixed)
        assert r["train/tokens"] == sum(len(s["response_ids"]) for i in mixed[:prompts_per_step] for s in groups[i])
        lengths = [len(s["response_ids"]) for g in groups for s in g]
        assert r["rollout/response_len_mean"] == pytest.approx(sum(lengths) / len(lengths))


def check_loads_in_transformers(model_dir, like_dir=None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir)
    lm = AutoModelForCausalLM.from_pretrained(model_dir)
    ids = torch.tensor([tok("What is 3+4?\n").input_ids])
    with torch.no_grad():
        assert torch.isfinite(lm(ids).logits).all()
    if like_dir is not None:                              # the checkpoint's weights are the final ones
        assert_same_weights(model_dir, like_dir, atol=0)


ROLLOUTS = {}          # run directory -> what its engine sampled (run_in_process), for the runs made in this process


@pytest.fixture(scope="module")
def hf_run(tiny_warm, tmp_path_factory):
    """Two steps, the HF engine, run in this process (its own main()), its rollouts recorded."""
    out = str(tmp_path_factory.mktemp("rl_hf"))
    calls = run_in_process(rl_dapo, rl_args(tiny_warm, out, "hf", "--no-compile", "--save-every", 1))
    ROLLOUTS[os.path.join(out, "hf")] = calls
    return os.path.join(out, "hf")


@pytest.fixture(scope="module")
def short_run(tiny_warm, tmp_path_factory):
    """One step cut short by --max-gen-batches 1: one generation batch of 6 prompts where 8 groups are wanted, in
    mini-batches of 2 groups (the same seed as hf_run: positions 0-5 of its stream), its rollouts recorded."""
    out = str(tmp_path_factory.mktemp("rl_short"))
    calls = run_in_process(rl_dapo, rl_args(tiny_warm, out, "short", "--no-compile", "--prompts-per-step", 8,
                                            "--gen-batch-prompts", 6, "--max-gen-batches", 1, steps=1))
    ROLLOUTS[os.path.join(out, "short")] = calls
    return os.path.join(out, "short")


# validation on the warm model's own 32 problems (the fixture's test set is harder than anything it learned), 16
# samples each at a temperature that is not the rollout's 1.2 (after the 2 steps: avg@16 ~0.07 at 1.6, ~0.19 at 1.2)
VAL = ["--val-every", 0, "--val-n", 16, "--val-temperature", 1.6]


@pytest.fixture(scope="module")
def vllm_run(tiny_warm, tmp_path_factory):
    pytest.importorskip("vllm")
    out = str(tmp_path_factory.mktemp("rl_vllm"))
    run_script("rl_dapo.py", rl_args(tiny_warm, out, "vllm", "--no-compile", "--val-data", tiny_warm["train"], *VAL,
                                     engine="vllm"))
    return os.path.join(out, "vllm")


@pytest.mark.slow
def test_e2e_hf_engine(hf_run, tiny_warm):
    rows = check_run(hf_run, 2)
    check_rollout_counts(hf_run, ROLLOUTS[hf_run], tiny_warm["train"])
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
    check_loads_in_transformers(os.path.join(vllm_run, "final"), os.path.join(vllm_run, "checkpoints", "step_000002"))


@pytest.mark.slow
def test_validation_accuracy_is_evaluates_avg_at_k_on_the_same_checkpoint(vllm_run, tiny_warm, tmp_path):
    """val/accuracy at the last step (--val-n 16 at --val-temperature 1.6, vLLM) against evaluate.py's avg@16 of the
    final checkpoint on the same problems at the same temperature (HF engine, its own seeds): equal within binomial
    noise (4 standard deviations of the difference of two means of 512 samples; validation at the rollout's
    temperature would be ~6 away), and so is the mean response length."""
    import evaluate
    row = metrics(vllm_run)[-1]
    out = tmp_path / "eval"
    evaluate.main(["--ckpt", f"final={os.path.join(vllm_run, 'final')}", "--benchmarks", f"val={tiny_warm['train']}",
                   "--k", "16", "--temperature", "1.6", "--max-tokens", "24", "--prompt-style", "plain",
                   "--rollout-engine", "hf", "--grade-workers", "0", "--device", "cpu", "--out", str(out)])
    (res,) = (out / "results").glob("final__*.json")
    got = json.loads(res.read_text())["benchmarks"]["val"]
    n = got["n_problems"] * 16
    assert n == 32 * 16
    p = (row["val/accuracy"] + got["avg@16"]) / 2
    noise = math.sqrt(max(p * (1 - p), 0.05) * 2 / n)
    assert abs(row["val/accuracy"] - got["avg@16"]) < 4 * noise, (row["val/accuracy"], got["avg@16"], noise)
    assert row["val/response_len"] == pytest.approx(got["len"], abs=1.2), (row["val/response_len"], got["len"])


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
def test_torchrun_fsdp2_hf_engine_matches_one_process(hf_run, tiny_warm, tmp_path):
    """2 processes, FSDP2 on gloo, the HF engine (its FSDP branch: an unsharded copy filled by the weight sync, one
    gathered parameter at a time): each rank samples half the prompts with the same per-position seeds, and each
    global mini-batch is split over the ranks, so both steps reproduce the 1-process run (same kept groups, same
    global token-mean gradient: grad_norm is taken after the cross-rank reduction), and at step 2 the engine's
    log-probs still match the trainer's: the copy received the updated weights."""
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "fsdp2", "--no-compile", "--sharding", "fsdp",
                                     steps=2), nproc=2)
    rows, ref = metrics(os.path.join(tmp_path, "fsdp2")), metrics(hf_run)
    assert [r["rollout/groups_used"] for r in rows] == [r["rollout/groups_used"] for r in ref] == [4, 4]
    for two, one in zip(rows, ref):
        for k in COMPARED:
            assert two[k] == pytest.approx(one[k], rel=1e-4, abs=1e-6), \
                f"step {two['step']}: {k}: 2 processes {two[k]} vs 1 process {one[k]}"
        assert two["rollout/logprob_diff_max"] < 1e-4
    assert json.load(open(os.path.join(tmp_path, "fsdp2", "config.json")))["world_size"] == 2


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
    (fp32 gradients all-reduced) under bf16 autocast, both read off the root the script builds and trains. The
    rollout (fp32 vLLM, same seeds) is the 1-process fp32 run's; the trainer's numbers move by bf16 rounding only,
    and the engine-vs-trainer log-prob gap shows that the trainer did compute in bf16 (fp32 vs fp32 is ~1e-6)."""
    argv = rl_args(tiny_warm, str(tmp_path), sharding, "--no-compile", "--sharding", sharding, "--bf16",
                   engine="vllm", steps=1)
    run_script(os.path.join(ROOT, "tests", "_scripts.py"), ["rl_dapo", tmp_path, *argv], nproc=2)
    # the precision, read off the model the script trains (tests/_scripts.py: inspect_models_main), on both ranks
    for rank in (0, 1):
        [m] = json.load(open(os.path.join(tmp_path, f"models_rank{rank}.json")))
        assert m["root"] == "LMWithHead" and m["param_dtypes"] == ["torch.float32"]        # fp32 master weights
        if sharding == "fsdp":
            bf16_fp32 = {"param_dtype": "torch.bfloat16", "reduce_dtype": "torch.float32"}
            assert m["wrapper"] == "fsdp" and not m["autocast_bf16"]
            assert m["root_policy"] == bf16_fp32 and m["layer_policies"] and all(
                p == bf16_fp32 for p in m["layer_policies"])
        else:       # DDP all-reduces the fp32 parameters' gradients; the forward runs under bf16 autocast
            assert m["wrapper"] == "ddp" and m["autocast_bf16"] is True
            assert m["root_policy"] is None
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
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "vllm", "--no-compile", "--val-data", tiny_warm["train"],
                                     *VAL, "--save-every", 1, engine="vllm", steps=1))
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
def test_entropy_is_the_sampling_policys(hf_run, tiny_warm, tmp_path):
    """With 2 mini-batches the entropy is taken in the pre-update pass, so step 1 logs the same entropy as one
    mini-batch of the same samples (not the entropy after the first update)."""
    run_script("rl_dapo.py", rl_args(tiny_warm, str(tmp_path), "one_mini", "--no-compile", "--ppo-mini-batch", 4,
                                     steps=1))
    one, two = metrics(os.path.join(tmp_path, "one_mini"))[0], metrics(hf_run)[0]
    assert one["train/updates"] == 1 and two["train/updates"] == 2
    for k in ("train/entropy", "train/entropy_t1", "train/tokens"):
        assert one[k] == pytest.approx(two[k], rel=1e-5), k


@pytest.mark.slow
def test_only_whole_mini_batches_train(short_run, tiny_warm):
    """A step cut short by --max-gen-batches keeps an odd number of groups, 5 of its 6 (counted here from what it
    sampled, graded here), for mini-batches of 2: it trains the first 4 in stream order (2 updates, their response
    tokens) and drops the fifth, so every optimizer step averages the same number of groups."""
    calls = ROLLOUTS[short_run]
    r = metrics(short_run)[0]
    [correct] = grade_recorded(calls, tiny_warm["train"])
    mixed = [i for i, g in enumerate(correct) if 0 < sum(g) < len(g)]
    assert len(calls) == 1 and len(correct) == 6
    assert len(mixed) == 5, f"{len(mixed)} mixed groups of 6: the case needs an odd number (re-pick the flags)"
    assert r["rollout/groups_kept"] == 5 and r["rollout/groups_used"] == 4
    assert r["train/updates"] == 2 and r["train/updates_skipped"] == 0
    assert r["train/tokens"] == sum(len(s["response_ids"]) for i in mixed[:4] for s in calls[0]["groups"][i])


@pytest.mark.slow
def test_the_seed_changes_the_run_and_the_same_seed_repeats_it(hf_run, short_run, tiny_warm, tmp_path):
    """--seed reaches the data order and the sampling seeds (else demo.py --seeds 3 and evaluate --arms would compare
    copies of one run): with --seed 1 step 1 draws other problems, with sampling seeds none of which seed 0 used, and
    samples otherwise; with seed 0 and another batch configuration (short_run: 6 prompts per generation batch, not
    8) positions 0-5 get the same problems, seeds and samples as hf_run's."""
    calls = run_in_process(rl_dapo, rl_args(tiny_warm, str(tmp_path), "seed1", "--no-compile", "--seed", 1, steps=1))
    base = [c for c in ROLLOUTS[hf_run] if c["step"] == 0][0]
    short = ROLLOUTS[short_run][0]
    texts = lambda c: [[s["text"] for s in g] for g in c["groups"]]          # noqa: E731
    assert short["prompts"] == base["prompts"][:6] and short["seeds"] == base["seeds"][:6]
    assert texts(short) == texts(base)[:6]
    other = calls[0]
    assert other["prompts"] != base["prompts"]
    assert not set(other["seeds"]) & {x for c in ROLLOUTS[hf_run] for x in c["seeds"]}
    assert texts(other) != texts(base)
    entropy = [metrics(run)[0]["rollout/entropy_est"] for run in (os.path.join(tmp_path, "seed1"), hf_run)]
    assert entropy[0] != entropy[1]


@pytest.mark.slow
def test_entropy_est_is_the_mean_nll_of_every_sampled_token(hf_run, tiny_warm):
    """rollout/entropy_est as hf_run logs it, at both steps, against -log p of every token it sampled (kept and
    dropped groups), recomputed here by a float64 forward of the weights that sampled them (the start model, then
    step 1's checkpoint) at the rollout temperature; it is not the kept groups' mean."""
    calls = ROLLOUTS[hf_run]
    weights_at = [tiny_warm["model"], os.path.join(hf_run, "checkpoints", "step_000001")]
    correct = grade_recorded(calls, tiny_warm["train"])
    for r in metrics(hf_run):
        mine = [i for i, c in enumerate(calls) if c["step"] == r["step"] - 1]
        samples = [s for i in mine for g in calls[i]["groups"] for s in g]
        nll, count = sampled_nll(weights_at[r["step"] - 1], samples, temperature=1.0)
        assert r["rollout/entropy_est"] == pytest.approx(nll / count, rel=1e-4)
        kept = [s for i in mine for g, k in zip(calls[i]["groups"], correct[i]) if 0 < sum(k) < len(k) for s in g]
        kept_nll, kept_count = sampled_nll(weights_at[r["step"] - 1], kept, temperature=1.0)
        assert abs(kept_nll / kept_count - nll / count) > 1e-3 * nll / count      # the two differ: which one is read


def _entropy(z: torch.Tensor) -> torch.Tensor:
    lp = torch.log_softmax(z.double(), -1)
    return -(lp.exp() * lp).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 1.5])
def test_mean_sampled_nll_estimates_the_entropy_of_the_law_sampled_from(temperature):
    """What rollout/entropy_est estimates: the mean -log p(sampled token) (the engine's own log-probs) over many
    tokens matches the exact full-vocabulary entropy of softmax(z / T) at the same positions (float64 reference);
    at T=1.5 it is clearly not the entropy at T=1. The model and the engine are built as rl_dapo.py builds them."""
    from transformers import AutoTokenizer
    from common.dist import DistInfo, unwrap
    from common.loading import load_sharded
    model_dir = os.path.join(ROOT, "assets", "tiny_math", "model")
    model = load_sharded(model_dir, DistInfo(), "fsdp")
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = rl_dapo.make_engine("hf", model=model, model_path=model_dir, tokenizer=tok, info=DistInfo(),
                                 max_model_len=64, seed=0)
    prompts = [f"What is {a}+{b}-{c}?" for a, b, c in [(3, 14, 5), (22, 7, 9), (11, 4, 18), (27, 19, 6)]]
    groups = engine.generate(prompts, n=64, temperature=temperature, max_tokens=32, seeds=[1, 2, 3, 4])
    lm = unwrap(model).eval()
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
