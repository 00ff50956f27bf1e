"""rl_dapo's objective-side entropy remedies (issue 19): entropy bonus (fixed, adaptive), Clip-Cov, KL-Cov, 80/20.

Each remedy against a plain float64 reference written here from its source's definition (verl's
compute_policy_loss_clip_cov / compute_policy_loss_kl_cov, TRL's get_high_entropy_mask and adaptive entropy
control, the entropy's gradient dH/dz = -p (log p + H) / T); the selection over the whole mini-batch on all ranks
(common/select.py) against the same selection on the concatenated data; and the script's own main(): off by
default means today's step exactly, the bonus raises entropy, the selection does not depend on the micro-batch
budget or the number of processes, and the adaptive coefficient survives a resume.
"""
import os

import pytest
import torch

import rl_dapo
from common.losses import chunked_logprob_entropy
from tests._scripts import assert_rows_match, assert_same_weights, metrics, run_in_process, run_script

EL, EH = 0.2, 0.28


def rand(n, seed, scale=1.0):
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale


# ----------------------------------------------------------------------------- the entropy's gradient

@pytest.mark.parametrize("compiled", [False, True])
@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.4])
def test_entropy_gradient_matches_float64_reference(compiled, temperature):
    """d/d(hidden, weight) of sum(g_lp log p(target) + g_H H) through the chunked head with entropy_grad=True
    equals dense float64 autograd; the chunk size (7) does not divide the 45 tokens."""
    g = torch.Generator().manual_seed(0)
    n, hdim, vocab = 45, 12, 96
    hs, ws = torch.randn(n, hdim, generator=g, dtype=torch.float64), torch.randn(vocab, hdim, generator=g, dtype=torch.float64)
    targets = torch.randint(0, vocab, (n,), generator=g)
    g_lp, g_h = rand(n, 1), rand(n, 2)
    dtype, tol = (torch.float32, 2e-5) if compiled else (torch.float64, 1e-10)
    h, w = hs.to(dtype).requires_grad_(), ws.to(dtype).requires_grad_()
    lp, ent = chunked_logprob_entropy(h, w, targets, temperature=temperature, chunk_size=7, compiled=compiled,
                                      entropy_grad=True)
    assert ent.requires_grad
    grads = torch.autograd.grad((lp * g_lp.to(lp.dtype)).sum() + (ent * g_h.to(ent.dtype)).sum(), (h, w))
    h64, w64 = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    logp = ((h64 @ w64.T) / temperature).log_softmax(-1)
    ref_lp, ref_ent = logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)
    ref = torch.autograd.grad((ref_lp * g_lp).sum() + (ref_ent * g_h).sum(), (h64, w64))
    for a, b in zip(grads, ref):
        assert ((a.double() - b).norm() / b.norm()).item() < tol
    # the entropy alone (no log-prob term), and gradcheck of the kernel in float64
    f = lambda h, w: chunked_logprob_entropy(h, w, targets[:7] % 10, temperature=temperature, chunk_size=3,
                                             compiled=False, entropy_grad=True)[1]
    assert torch.autograd.gradcheck(f, (hs[:7, :4].clone().requires_grad_(), ws[:10, :4].clone().requires_grad_()))


def test_entropy_is_detached_unless_asked():
    h, w = torch.randn(5, 4, requires_grad=True), torch.randn(9, 4, requires_grad=True)
    _, ent = chunked_logprob_entropy(h, w, torch.zeros(5, dtype=torch.long), chunk_size=2, compiled=False)
    assert not ent.requires_grad


# ----------------------------------------------------------------------------- Clip-Cov, KL-Cov, 80/20, adaptive

def verl_clip_cov(logp, old, adv, corr):
    """verl's compute_policy_loss_clip_cov per-token loss for a given corr (1 keep, 0 the picked tokens): PPO's
    clipped loss (decoupled ranges, no dual clip) times corr. Float64, written out."""
    ratio = torch.exp(logp - old)
    return torch.maximum(-adv * ratio, -adv * torch.clamp(ratio, 1 - EL, 1 + EH)) * corr


def verl_clip_cov_candidates(logp, old, adv, lb, ub):
    ratio = torch.exp(logp - old)
    clip_by_origin = (-adv * torch.clamp(ratio, 1 - EL, 1 + EH)) > (-adv * ratio)
    cov = (adv - adv.mean()) * (logp - logp.mean())
    return (cov > lb) & (cov < ub) & ~clip_by_origin


def test_clip_cov_matches_verl_on_one_selection_set():
    """One process, one selection set: the picked tokens are a uniform sample of verl's candidates (covariance in
    (lb, ub), not clipped) of verl's size max(1, int(ratio x tokens)); the loss and its gradient are verl's with
    those tokens' corr = 0. Ratio 0 picks none (today's loss)."""
    n = 4000
    adv = rand(n, 0).sign() * (0.5 + rand(n, 1).abs())
    logp = -rand(n, 2).abs() * 2
    old = logp + rand(n, 3, 0.2)
    lb, ub, ratio = 0.2, 3.0, 0.01
    cand = verl_clip_cov_candidates(logp, old, adv, lb, ub)
    assert cand.sum() > 2 * int(n * ratio)
    _, c_hi, c_lo, dual = rl_dapo.dapo_token_loss(logp, old, adv, EL, EH, 0.0)
    cov = rl_dapo.covariance(adv, logp, adv.mean().item(), logp.mean().item())
    ids, keys = torch.arange(n), torch.rand(n, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    picked = rl_dapo.cov_pick("clip_cov", cov, ids, keys, c_hi | c_lo | dual, n, ratio, lb, ub)
    assert picked.sum() == int(n * ratio) and not (picked & ~cand).any()
    assert torch.equal(picked, cand & (keys <= keys[cand].sort().values[int(n * ratio) - 1]))   # the smallest keys
    lp = logp.clone().requires_grad_()
    loss = rl_dapo.policy_token_loss("clip_cov", lp, old, adv, picked, eps_low=EL, eps_high=EH, dual_clip=0.0,
                                     kl_cov_coef=1.0)[0]
    lp_ref = logp.clone().requires_grad_()
    ref = verl_clip_cov(lp_ref, old, adv, (~picked).double())
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), lp)[0], torch.autograd.grad(ref.sum(), lp_ref)[0],
                               rtol=0, atol=1e-12)
    none = rl_dapo.cov_pick("clip_cov", cov, ids, keys, c_hi | c_lo | dual, n, 0.0, lb, ub)
    assert not none.any()
    today = rl_dapo.dapo_token_loss(logp, old, adv, EL, EH, 10.0)[0]
    assert torch.equal(rl_dapo.policy_token_loss("clip_cov", logp, old, adv, none, eps_low=EL, eps_high=EH,
                                                 dual_clip=10.0, kl_cov_coef=1.0)[0], today)


def verl_kl_cov(logp, old, adv, ratio, coef):
    """verl's compute_policy_loss_kl_cov per-token loss, float64, written out: -A r, and on the top
    max(1, int(n ratio)) tokens by (A - mean A)(log pi - mean log pi), -A r + coef |log pi - log pi_old|."""
    r = torch.exp(logp - old)
    loss = -adv * r
    cov = (adv - adv.mean()) * (logp.detach() - logp.detach().mean())
    top = torch.topk(cov, max(1, int(len(cov) * ratio)), largest=True).indices
    kl = -adv * r + coef * (logp - old).abs()
    loss = loss.clone()
    loss[top] = kl[top]
    return loss


def test_kl_cov_matches_verl():
    n, ratio, coef = 3000, 0.02, 1.0
    adv, logp, old = rand(n, 10), -rand(n, 11).abs() * 2, None
    old = logp + rand(n, 12, 0.1)
    cov = rl_dapo.covariance(adv, logp, adv.mean().item(), logp.mean().item())
    picked = rl_dapo.cov_pick("kl_cov", cov, torch.arange(n), None, None, n, ratio, 1.0, 5.0)
    assert picked.sum() == int(n * ratio)
    lp, lp_ref = logp.clone().requires_grad_(), logp.clone().requires_grad_()
    loss = rl_dapo.policy_token_loss("kl_cov", lp, old, adv, picked, eps_low=EL, eps_high=EH, dual_clip=10.0,
                                     kl_cov_coef=coef)[0]
    ref = verl_kl_cov(lp_ref, old, adv, ratio, coef)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(loss.sum(), lp)[0], torch.autograd.grad(ref.sum(), lp_ref)[0],
                               rtol=1e-12, atol=1e-12)
    # on policy (old == logp, the one-mini-batch step) KL-Cov adds nothing: |log r| = 0 with zero gradient
    lp = logp.clone().requires_grad_()
    on = rl_dapo.policy_token_loss("kl_cov", lp, logp, adv, picked, eps_low=EL, eps_high=EH, dual_clip=10.0,
                                   kl_cov_coef=coef)[0]
    torch.testing.assert_close(torch.autograd.grad(on.sum(), lp)[0], -adv)


@pytest.mark.parametrize("rho", [0.2, 0.5, 1.0])
def test_high_entropy_tokens_match_trl(rho):
    """TRL's get_high_entropy_mask: entropy >= torch.quantile(entropies, 1 - rho) (linear interpolation)."""
    ent = rand(1001, 20).abs()
    got = rl_dapo.high_entropy_tokens(ent.float(), rho)
    assert torch.equal(got, ent.float().double() >= torch.quantile(ent.float().double(), 1 - rho))
    assert abs(got.double().mean().item() - rho) < 2e-3


def test_adaptive_entropy_coefficient_trajectory():
    """The controller on a scripted entropy sequence (target 0.2, delta 0.005, bounds [0, 0.012])."""
    coef, out = 0.0, []
    for h in [0.3, 0.1, 0.2, 0.15, 0.1, 0.05, 0.25, 0.3, 0.3, 0.3, 0.1]:
        coef = rl_dapo.adapt_entropy_coef(coef, h, 0.2, 0.005, 0.0, 0.012)
        out.append(coef)
    assert out == pytest.approx([0.0, 0.005, 0.01, 0.012, 0.012, 0.012, 0.007, 0.002, 0.0, 0.0, 0.005])


# ----------------------------------------------------------------------------- selection over all ranks

def _select_worker(rank, world, init, out):
    import torch.distributed as dist
    from common.select import global_quantile, global_top_k
    from common.tally import Tally
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    n = 500
    scores, ids = rand(world * n, 30), torch.randperm(world * n, generator=torch.Generator().manual_seed(1))
    scores[::7] = 0.5                                               # ties, broken by id
    mine = slice(0, n + 3) if rank == 0 else slice(n + 3, 2 * n)     # uneven shares
    res = {"top": global_top_k(scores[mine], ids[mine], 37), "q": global_quantile(scores[mine], 0.8)}
    t = Tally()
    t.add(x=float(rank + 1), y=torch.tensor(2.0))
    t.max(z=float(rank))
    res["tally"] = dict(t.reduce())
    bad = Tally()
    bad.add(**{f"name{rank}": 1.0})
    try:
        bad.reduce()
        res["mismatch"] = "no error"
    except RuntimeError as e:
        res["mismatch"] = str(e)
    torch.save((mine, res), os.path.join(out, f"{rank}.pt"))
    dist.destroy_process_group()


def test_global_selection_equals_the_selection_on_all_tokens(tmp_path):
    """Two gloo processes with uneven shares: the top-k (ties by id) and the quantile are those of the
    concatenated tokens; Tally sums and maxes over ranks and refuses ranks that added different names."""
    import torch.multiprocessing as mp
    mp.spawn(_select_worker, args=(2, f"file://{tmp_path}/init", str(tmp_path)), nprocs=2)
    n = 500
    scores, ids = rand(2 * n, 30), torch.randperm(2 * n, generator=torch.Generator().manual_seed(1))
    scores[::7] = 0.5
    order = sorted(range(2 * n), key=lambda i: (-scores[i].item(), ids[i].item()))[:37]
    want = torch.zeros(2 * n, dtype=torch.bool)
    want[order] = True
    got = torch.zeros(2 * n, dtype=torch.bool)
    for rank in (0, 1):
        mine, res = torch.load(os.path.join(tmp_path, f"{rank}.pt"), weights_only=False)
        got[mine] = res["top"]
        assert res["q"] == pytest.approx(torch.quantile(scores, 0.8).item(), rel=1e-12)
        assert res["tally"] == {"x": 3.0, "y": 4.0, "z": 1.0}
        assert "different names" in res["mismatch"]
    assert torch.equal(got, want)


# ----------------------------------------------------------------------------- the script's own step

def _fixed_step(tmp, extra):
    from tests.test_science import fixed_rl_step, right_and_wrong

    def group(tok, p, i):
        right, wrong = right_and_wrong(tok, p)
        return [right, wrong[0], right, wrong[1]]
    run, _, _, _ = fixed_rl_step(str(tmp), 4, group, 32, 4, ["--prompts-per-step", 4, "--ppo-mini-batch", 2,
                                                            "--lr", 1e-5, *extra])
    return run


def test_off_switches_reproduce_todays_step_exactly(tmp_path):
    """--entropy-coef 0, --policy-loss clip_cov with --cov-ratio 0, --top-entropy-quantile 1.0: the very weights
    of the default step (two mini-batches, fixed responses, rl_dapo.main)."""
    base = _fixed_step(tmp_path / "base", [])
    off = _fixed_step(tmp_path / "off", ["--entropy-coef", 0, "--policy-loss", "clip_cov", "--cov-ratio", 0,
                                         "--top-entropy-quantile", 1.0])
    assert_same_weights(os.path.join(base, "final"), os.path.join(off, "final"), atol=0.0)
    on = _fixed_step(tmp_path / "on", ["--policy-loss", "clip_cov", "--cov-ratio", 0.2, "--clip-cov-lb", -5])
    row = metrics(on)[0]
    assert 0.15 < row["train/cov_selected_frac"] <= 0.2
    with pytest.raises(AssertionError):
        assert_same_weights(os.path.join(base, "final"), os.path.join(on, "final"), atol=1e-9)


def test_entropy_bonus_raises_the_policy_entropy(tmp_path):
    """The bonus's sign through main(): with a large --entropy-coef the step's policy is hotter on the fixed
    responses than the same step without it (entropy measured by the next step's pre-update pass)."""
    ent = {}
    for name, extra in (("plain", []), ("bonus", ["--entropy-coef", 5.0])):
        run = _fixed_step(tmp_path / name, [*extra, "--steps", 2, "--lr", 1e-3])
        rows = metrics(run)
        ent[name] = rows[1]["train/entropy"]
        if name == "bonus":
            assert rows[0]["train/entropy_coef_applied"] == 5.0
    assert ent["bonus"] > ent["plain"] * 1.2, ent


RL = ["--prompt-style", "plain", "--grade-workers", "0", "--rollout-engine", "hf", "--group-size", 4,
      "--prompts-per-step", 4, "--gen-batch-prompts", 8, "--max-gen-batches", 3, "--max-response-len", 24,
      "--overlong-buffer", 8, "--ppo-mini-batch", 2, "--lr", 1e-3, "--warmup-steps", 1, "--no-compile"]
REMEDIES = ["--policy-loss", "clip_cov", "--cov-ratio", 0.1, "--clip-cov-lb", -5, "--top-entropy-quantile", 0.5,
            "--entropy-coef", 0.01, "--entropy-target", 10.0]
SAME = ["train/pg_loss", "train/grad_norm", "train/entropy", "train/tokens", "train/cov_selected_frac",
        "train/entropy_selected_frac", "train/entropy_coef", "train/entropy_coef_applied", "rollout/accuracy"]


@pytest.mark.slow
def test_selection_does_not_depend_on_micro_batches_or_processes(tiny_warm, tmp_path):
    """Clip-Cov + 80/20 + the adaptive bonus together, one step of two mini-batches (the second's selection from
    a fresh no-grad pass after the first update): micro-batch budgets 64 and 4096 in one process and FSDP2 on 2
    processes give the same metrics (1e-5) and weights. verl would pick per micro-batch. One step only: later
    steps sample from weights that differ in the last bits, and entropies that tie at the quantile then fall on
    either side of it (seen: step 2's pg_loss 10% apart at lr 1e-3)."""
    base = ["--model", tiny_warm["model"], "--data", tiny_warm["train"], *RL, *REMEDIES, "--steps", 1,
            "--out", tmp_path]
    run_in_process(rl_dapo, [str(a) for a in base + ["--run-name", "mb64", "--micro-batch-tokens", 64]])
    run_in_process(rl_dapo, [str(a) for a in base + ["--run-name", "mb4096", "--micro-batch-tokens", 4096]])
    run_script("rl_dapo.py", [str(a) for a in base + ["--run-name", "two", "--micro-batch-tokens", 64,
                                                      "--sharding", "fsdp"]], nproc=2)
    ref = metrics(tmp_path / "mb64")
    assert ref[0]["train/entropy_selected_frac"] == pytest.approx(0.5, abs=0.05)
    assert ref[0]["train/entropy_coef"] == pytest.approx(0.01 + 2 * 0.005)        # 2 updates under the target
    assert ref[0]["train/cov_selected_frac"] > 0.05
    for other in ("mb4096", "two"):
        assert_rows_match(ref, metrics(tmp_path / other), keys=SAME, rel=1e-5, abs_=1e-7)
        assert_same_weights(tmp_path / "mb64" / "final", tmp_path / other / "final", atol=1e-5)


@pytest.mark.slow
def test_resume_keeps_the_adaptive_coefficient(tiny_warm, tmp_path):
    """1 step + checkpoint, then --resume to step 2: the straight run's metrics (train/entropy_coef included) and
    weights. A resume that restarted the controller at --entropy-coef would apply 0.01 instead of 0.02 at step 2."""
    base = ["--model", tiny_warm["model"], "--data", tiny_warm["train"], *RL, "--entropy-coef", 0.01,
            "--entropy-target", 10.0, "--policy-loss", "kl_cov", "--cov-ratio", 0.05, "--micro-batch-tokens", 64,
            "--out", tmp_path]
    run_in_process(rl_dapo, [str(a) for a in base + ["--run-name", "straight", "--steps", 2]])
    run_in_process(rl_dapo, [str(a) for a in base + ["--run-name", "split", "--steps", 1, "--save-every", 1]])
    run_in_process(rl_dapo, ["--resume", str(tmp_path / "split"), "--steps", "2"])
    straight, split = metrics(tmp_path / "straight"), metrics(tmp_path / "split")
    assert straight[1]["train/entropy_coef_applied"] == pytest.approx(0.0225)   # 0.02 then 0.025
    assert_rows_match(straight, split, keys=SAME, rel=1e-6)
    assert_same_weights(tmp_path / "straight" / "final", tmp_path / "split" / "final", atol=1e-6)


@pytest.mark.slow
def test_dummy_micro_batches_on_two_processes(tiny_warm, tmp_path):
    """3 sequences per mini-batch, one per micro-batch, on 2 ranks: one rank runs a dummy micro-batch in every pass
    (the pre-update pass of 2 mini-batches, Clip-Cov's selection pass, the update), whose one loss position must be
    dropped, not split among no sequences (that raised on the dummy rank while the other waited in FSDP's
    collectives). The step equals the one-process step."""
    base = ["--model", tiny_warm["model"], "--data", tiny_warm["train"], *RL, "--group-size", 3,
            "--prompts-per-step", 2, "--ppo-mini-batch", 1, "--micro-batch-tokens", 1, "--steps", 1,
            "--policy-loss", "clip_cov", "--cov-ratio", 0.1, "--clip-cov-lb", -5, "--out", tmp_path]
    run_in_process(rl_dapo, [str(a) for a in base + ["--run-name", "one"]])
    run_script("rl_dapo.py", [str(a) for a in base + ["--run-name", "two", "--sharding", "fsdp"]], nproc=2)
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    assert one[0]["train/updates"] == 2
    assert_rows_match(one, two, keys=SAME, rel=1e-5, abs_=1e-7)
