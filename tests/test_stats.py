"""common/stats.py against brute force, closed forms and float64 references (a few seconds on CPU)."""
import itertools
import math

import numpy as np
import pytest
import torch

from common.stats import (
    TAU_RANGE, avg_at_k, displacement_metrics, distinct_count, effective_temperature, linear_cka, maj_at_k,
    hierarchical_bootstrap, mean_ci, mean_cosine, normalize_answer, paired_bootstrap, paired_seed_t, param_delta,
    pass_at_k, sharpness, summarize, t_cdf, t_quantile, topk_overlap,
)

# ----------------------------------------------------------------------------- pass@k, avg@k, maj@k


def _pass_at_k_brute(n, c, k):
    """Fraction of k-subsets of n samples (the first c correct) that contain a correct one."""
    subsets = list(itertools.combinations(range(n), k))
    return sum(any(i < c for i in s) for s in subsets) / len(subsets)


def test_pass_at_k_matches_enumeration():
    for n in range(1, 11):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(_pass_at_k_brute(n, c, k), abs=1e-12), (n, c, k)


def test_pass_at_k_edge_cases_and_large_n():
    assert pass_at_k(5, 0, 3) == 0.0
    assert pass_at_k(5, 5, 1) == 1.0
    assert pass_at_k(5, 3, 3) == 1.0  # n - c = 2 < k
    assert pass_at_k(16, 4, 1) == pytest.approx(4 / 16)
    # n = 1024 overflows the naive binomials in floats; the exact rational answer must still come out.
    exact = 1 - math.comb(1024 - 37, 64) / math.comb(1024, 64)
    assert pass_at_k(1024, 37, 64) == pytest.approx(exact, rel=1e-10)
    for bad in [(4, 5, 1), (4, -1, 1), (4, 2, 0), (4, 2, 5), (4.5, 2, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(*bad)


def test_avg_at_k_weighs_problems_equally():
    assert avg_at_k([[True, False], [1.0, 1.0, 1.0, 0.0]]) == pytest.approx((0.5 + 0.75) / 2)
    with pytest.raises(ValueError):
        avg_at_k([[True], []])


def test_maj_at_k_hand_cases():
    # Plain majority, spelling differences merged by normalisation.
    assert maj_at_k(["5", " $5$ ", "7"], [True, True, False], 3) == 1.0
    assert maj_at_k(["\\dfrac{1}{2}", "\\frac{1}{2}", "3"], [False, False, True], 3) == 0.0
    # Tie 1-1: the answer seen first wins, whichever way round.
    assert maj_at_k(["7", "5"], [False, True], 2) == 0.0
    assert maj_at_k(["5", "7"], [True, False], 2) == 1.0
    # 2-2 tie where the earliest answer is the wrong one.
    assert maj_at_k(["3", "4", "4", "3"], [False, True, True, False], 4) == 0.0
    # None never wins, even when it is the most frequent "answer".
    assert maj_at_k([None, None, None, "5"], [False, False, False, True], 4) == 1.0
    assert maj_at_k([None, None, ""], [False, False, False], 3) == 0.0
    # Only the first k samples vote.
    assert maj_at_k(["1", "2", "2", "2"], [True, False, False, False], 1) == 1.0
    assert maj_at_k(["1", "2", "2", "2"], [True, False, False, False], 4) == 0.0
    with pytest.raises(ValueError):
        maj_at_k(["1"], [True], 2)
    with pytest.raises(ValueError):
        maj_at_k(["1", "2"], [True], 1)


def test_normalize_and_distinct_count():
    assert normalize_answer("  $\\left( 1, 2 \\right)$. ") == "(1,2)"
    assert normalize_answer("\\text{C}") == "C"
    assert normalize_answer("   ") is None
    assert normalize_answer(None) is None
    assert distinct_count(["5", "$5$", "5.", None, "6", "", "\\tfrac{1}{2}", "\\frac12"]) == 4
    assert distinct_count([None, None]) == 0


def test_summarize_hand_table():
    # 3 problems x 4 samples.
    table = [
        [("5", True), ("5", True), ("6", False), (None, False)],        # c = 2, maj "5" correct, 2 distinct
        [("1", False), ("2", True), ("1", False), ("3", False)],        # c = 1, maj "1" wrong, 3 distinct
        [(None, False), (None, False), (None, False), (None, False)],   # c = 0, maj 0, 0 distinct
    ]
    out = summarize(table)
    assert out["k"] == 4 and out["n_problems"] == 3
    assert set(out) == {"avg@4", "pass@1", "pass@2", "pass@4", "maj@4", "distinct@4", "n_problems", "k"}
    assert out["avg@4"] == pytest.approx((0.5 + 0.25 + 0) / 3)
    assert out["pass@1"] == pytest.approx((0.5 + 0.25 + 0) / 3)
    # pass@2: 1 - C(2,2)/C(4,2) = 5/6 for c = 2; 1 - C(3,2)/C(4,2) = 1/2 for c = 1.
    assert out["pass@2"] == pytest.approx((5 / 6 + 1 / 2 + 0) / 3)
    assert out["pass@4"] == pytest.approx(2 / 3)
    assert out["maj@4"] == pytest.approx(1 / 3)
    assert out["distinct@4"] == pytest.approx(5 / 3)
    # k not a power of two: pass@{1,2,4} plus pass@6; avg/maj over the first k only.
    six = [[("1", True)] + [("2", False)] * 7]
    out6 = summarize(six, k=6)
    assert {key for key in out6 if key.startswith("pass@")} == {"pass@1", "pass@2", "pass@4", "pass@6"}
    assert out6["pass@6"] == pytest.approx(6 / 8)  # pass@k from all n = 8 samples
    assert out6["avg@6"] == pytest.approx(1 / 6)
    assert out6["maj@6"] == 0.0
    with pytest.raises(ValueError):
        summarize(six, k=9)


# ----------------------------------------------------------------------------- t intervals and the bootstrap


@pytest.mark.parametrize("p, dof, expected", [
    (0.975, 1, 12.7062), (0.975, 2, 4.3027), (0.975, 4, 2.7764), (0.975, 10, 2.2281),
    (0.975, 30, 2.0423), (0.995, 5, 4.0321), (0.95, 3, 2.3534), (0.975, 1000, 1.9623),
])
def test_t_quantile_known_values(p, dof, expected):
    assert t_quantile(p, dof) == pytest.approx(expected, abs=1e-4)
    assert t_quantile(1 - p, dof) == pytest.approx(-expected, abs=1e-4)
    assert t_cdf(t_quantile(p, dof), dof) == pytest.approx(p, abs=1e-12)


def test_t_cdf_closed_forms():
    # dof = 1 is Cauchy, dof = 2 has F(t) = 1/2 + t / (2 sqrt(2 + t^2)).
    for t in (-3.0, -0.4, 0.0, 0.7, 5.0):
        assert t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
        assert t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)), abs=1e-12)


def test_mean_ci():
    values = [0.40, 0.45, 0.38]
    mean, lo, hi = mean_ci(values)
    s = np.std(values, ddof=1)
    assert mean == pytest.approx(0.41)
    assert hi - mean == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-5)
    assert mean - lo == pytest.approx(hi - mean)
    _, lo90, hi90 = mean_ci(values, confidence=0.90)
    assert lo < lo90 < hi90 < hi
    m1, lo1, hi1 = mean_ci([0.3])
    assert m1 == 0.3 and math.isnan(lo1) and math.isnan(hi1)


def test_paired_bootstrap_identical_arms():
    a = np.random.default_rng(1).random(50)
    out = paired_bootstrap(a, a.copy(), n_boot=2000)
    assert out["diff"] == 0.0 and out["ci"] == (0.0, 0.0) and out["p_value"] == 1.0


def test_paired_bootstrap_better_arm_and_determinism():
    rng = np.random.default_rng(2)
    b = rng.random(200)
    a = b + 0.05 + 0.02 * rng.standard_normal(200)  # better on nearly every problem
    out = paired_bootstrap(a, b, n_boot=5000, seed=3)
    assert out["diff"] == pytest.approx(float(np.mean(a - b)))
    assert 0 < out["ci"][0] < out["diff"] < out["ci"][1]
    assert out["p_value"] == pytest.approx(2 / 5001)  # no replicate at or below 0: only the +1 remains
    reverse = paired_bootstrap(b, a, n_boot=5000, seed=3)
    assert reverse["diff"] == pytest.approx(-out["diff"]) and reverse["p_value"] == out["p_value"]
    assert paired_bootstrap(a, b, n_boot=5000, seed=3) == out
    assert paired_bootstrap(a, b, n_boot=5000, seed=4)["ci"] != out["ci"]
    # Pure noise around 0: the CI covers 0, and the p-value is close to the normal approximation's.
    noisy = b + 0.1 * rng.standard_normal(200)
    noise = paired_bootstrap(noisy, b, n_boot=5000)
    z = noise["diff"] / (np.std(noisy - b, ddof=1) / math.sqrt(200))
    assert noise["ci"][0] < 0 < noise["ci"][1]
    assert noise["p_value"] == pytest.approx(math.erfc(abs(z) / math.sqrt(2)), abs=0.03)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0, 2.0], [1.0])


# ----------------------------------------------------------------------------- seeds and problems together


def _arms(rng, seed_offsets_a, seed_offsets_b, effect, n_problems, noise):
    """[seeds, problems] scores of two arms: shared problem difficulty, per-seed offsets, per-cell noise."""
    difficulty = rng.random(n_problems)
    a, b = (difficulty + np.asarray(offsets)[:, None] + noise * rng.standard_normal((len(offsets), n_problems))
            for offsets in (seed_offsets_a, seed_offsets_b))
    return a + effect, b


def test_seed_variance_dominates_only_the_problem_only_test_is_fooled():
    """Equal arms up to large between-seed differences (seed means of a and b differ by 0.04 only because of which
    seeds were trained), 400 problems: resampling problems alone calls that certain; the seed-aware tests do not."""
    a, b = _arms(np.random.default_rng(0), [0.08, -0.04, 0.02], [-0.05, 0.03, -0.04], 0.0, 400, 0.02)
    problems_only = paired_bootstrap(a.mean(0), b.mean(0), n_boot=4000)
    seeds = hierarchical_bootstrap(a, b, n_boot=4000)
    paired = paired_seed_t(a, b)
    assert problems_only["p_value"] < 1e-3 and problems_only["ci"][0] > 0
    assert seeds["diff"] == pytest.approx(problems_only["diff"]) == pytest.approx(float(a.mean() - b.mean()))
    assert seeds["p_value"] > 0.1 and seeds["ci"][0] < 0 < seeds["ci"][1]
    assert paired["p_value"] > 0.1 and paired["ci"][0] < 0 < paired["ci"][1]
    assert (seeds["n_seeds_a"], seeds["n_seeds_b"], seeds["n_problems"], seeds["n_boot"]) == (3, 3, 400, 4000)


def test_large_effect_small_seed_variance_all_tests_agree():
    a, b = _arms(np.random.default_rng(1), [0.005, -0.004, 0.0], [0.0, 0.004, -0.005], 0.1, 200, 0.05)
    for out in (paired_bootstrap(a.mean(0), b.mean(0), n_boot=4000), hierarchical_bootstrap(a, b, n_boot=4000),
                paired_seed_t(a, b)):
        assert out["p_value"] < 1e-3 and 0.05 < out["ci"][0] < out["diff"] < out["ci"][1] < 0.15
    assert hierarchical_bootstrap(a, b, n_boot=4000)["p_value"] == pytest.approx(2 / 4001)   # no replicate <= 0
    reverse = hierarchical_bootstrap(b, a, n_boot=4000, seed=5)
    assert reverse["diff"] == pytest.approx(-(a.mean() - b.mean())) and reverse["ci"][1] < 0
    assert hierarchical_bootstrap(b, a, n_boot=4000, seed=5) == reverse


def test_hierarchical_bootstrap_variance_matches_closed_form():
    """Given the data, a replicate is D* = w_a^T A v - w_b^T B v, with w = (seed draw counts) / S and
    v = (problem draw counts) / P independent multinomials: E w = 1/S, Cov w = (I - J/S) / S^2 (J all ones), and
    the same for v with P. So, in float64,
        Var D* = c^T Cov(v) c + tr(M Cov v) + 1^T M 1 / P^2,   c = A^T 1/S_a - B^T 1/S_b,  M = A^T Cov(w_a) A + (b).
    (In a model a[s, p] = seed_s + problem_p + noise_sp this is about (S-1)/S^2 var(seed) + var(problem)/P +
    (3 - 1/S) var(noise)/(S P): the biases the docstring names.) Many seeds and problems make D* nearly normal,
    so the 95% interval must be diff +- 1.96 sqrt(Var D*)."""
    rng = np.random.default_rng(2)
    a, b = _arms(rng, 0.05 * rng.standard_normal(12), 0.05 * rng.standard_normal(9), 0.03, 60, 0.1)

    def seed_cov(s):
        return (np.eye(s) - 1.0 / s) / s ** 2
    p = a.shape[1]
    cov_v = seed_cov(p)
    c = a.mean(0) - b.mean(0)
    m = a.T @ seed_cov(len(a)) @ a + b.T @ seed_cov(len(b)) @ b
    var = c @ cov_v @ c + np.trace(m @ cov_v) + m.sum() / p ** 2
    out = hierarchical_bootstrap(a, b, n_boot=40000, seed=1)
    half = 1.959964 * math.sqrt(var)
    assert out["ci"][0] == pytest.approx(out["diff"] - half, abs=0.04 * half)
    assert out["ci"][1] == pytest.approx(out["diff"] + half, abs=0.04 * half)
    # The problem-only interval is the P-level term alone, and much narrower here.
    narrow = paired_bootstrap(a.mean(0), b.mean(0), n_boot=40000, seed=1)
    assert narrow["ci"][1] - narrow["ci"][0] == pytest.approx(2 * 1.959964 * math.sqrt(c @ cov_v @ c), rel=0.04)
    assert narrow["ci"][1] - narrow["ci"][0] < 0.6 * (out["ci"][1] - out["ci"][0])


def test_paired_seed_t_closed_forms():
    """t on dof = 2 (3 seeds) and dof = 1 (2 seeds) has a closed-form CDF: P(|T| > t) = 1 - t / sqrt(2 + t^2),
    and 1 - 2 atan(t) / pi; the 95% quantiles are 4.302653 and 12.706205."""
    rng = np.random.default_rng(3)
    for n_seeds, p_of, q in ((3, lambda t: 1 - t / math.sqrt(2 + t * t), 4.302653),
                             (2, lambda t: 1 - 2 * math.atan(t) / math.pi, 12.706205)):
        a, b = rng.random((n_seeds, 7)), rng.random((n_seeds, 7))
        d = [sum(a[s] - b[s]) / 7 for s in range(n_seeds)]
        mean = sum(d) / n_seeds
        se = math.sqrt(sum((x - mean) ** 2 for x in d) / (n_seeds - 1) / n_seeds)
        out = paired_seed_t(a, b)
        assert out["diff"] == pytest.approx(mean, rel=1e-12) and out["t"] == pytest.approx(mean / se, rel=1e-12)
        assert out["p_value"] == pytest.approx(p_of(abs(mean / se)), rel=1e-9, abs=1e-12)
        assert out["ci"] == pytest.approx((mean - q * se, mean + q * se), rel=1e-6)
        assert (out["dof"], out["n_seeds"], out["n_problems"]) == (n_seeds - 1, n_seeds, 7)
    same = paired_seed_t(a, a)
    assert same["diff"] == 0 and same["p_value"] == 1.0 and same["ci"] == (0.0, 0.0)
    shifted = paired_seed_t(a + 0.25, a)                      # the same difference on every seed
    assert shifted["p_value"] < 1e-6 and shifted["ci"] == pytest.approx((0.25, 0.25))


def test_seed_aware_intervals_cover_at_about_the_nominal_rate():
    """200 simulated experiments, 6 seeds per arm, 40 problems: a[s, p] = mu_a + seed_s + problem_p +
    arm-problem_p + noise. The two-level bootstrap targets mu_a - mu_b (new seeds and new problems); the paired t,
    which conditions on the problems, targets mu_a - mu_b + mean_p (arm-problem_a - arm-problem_b). With 6 seeds the
    bootstrap's interval is a little short (its seed variance is 5/6 of the sample's, and not t-widened)."""
    rng = np.random.default_rng(4)
    hits_boot = hits_t = 0
    n_sims, n_seeds, n_problems, mu = 200, 6, 40, 0.02
    for sim in range(n_sims):
        problem = 0.2 * rng.standard_normal(n_problems)
        arm_problem = 0.05 * rng.standard_normal((2, n_problems))
        a, b = (problem + arm_problem[i] + 0.05 * rng.standard_normal((n_seeds, 1))
                + 0.05 * rng.standard_normal((n_seeds, n_problems)) for i in range(2))
        a += mu
        lo, hi = hierarchical_bootstrap(a, b, n_boot=400, seed=sim)["ci"]
        hits_boot += lo <= mu <= hi
        lo, hi = paired_seed_t(a, b)["ci"]
        hits_t += lo <= mu + arm_problem[0].mean() - arm_problem[1].mean() <= hi
    assert 0.86 <= hits_boot / n_sims <= 0.99
    assert 0.90 <= hits_t / n_sims <= 0.99


def test_seed_tests_reject_bad_shapes():
    good = np.zeros((3, 5))
    for bad, fn in ((np.zeros(5), hierarchical_bootstrap), (np.zeros((3, 4)), hierarchical_bootstrap),
                    (np.zeros((0, 5)), hierarchical_bootstrap), (np.zeros((2, 5)), paired_seed_t),
                    (np.zeros((3, 4)), paired_seed_t)):
        with pytest.raises(ValueError, match=fn.__name__):
            fn(good, bad)
    with pytest.raises(ValueError, match=">= 2 seeds"):
        paired_seed_t(np.zeros((1, 5)), np.zeros((1, 5)))


# ----------------------------------------------------------------------------- effective temperature


def _kl_rows(other, base, tau):
    """Per-row KL(softmax(other) || softmax(base / tau)) in float64, directly."""
    logp = torch.log_softmax(other.double(), -1)
    logq = torch.log_softmax(base.double() / tau, -1)
    return (logp.exp() * (logp - logq)).sum(-1)


def _logits(n, v, seed, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(n, v, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("tau", [0.3, 0.7, 1.5, 2.0, 4.0])
def test_effective_temperature_recovers_pure_scaling(tau):
    base = _logits(40, 300, seed=0)
    out = effective_temperature(base, base / tau, chunk_size=16)
    assert out["tau"] == pytest.approx(tau, abs=1e-4)
    assert out["kl"] < 1e-10 and not out["tau_at_bound"] and out["n_tokens"] == 40
    assert torch.allclose(out["tau_per_token"], torch.full((40,), tau, dtype=torch.float64), atol=1e-4)
    assert out["kl_per_token"].max() < 1e-10
    assert out["kl_at_1"] == pytest.approx(float(_kl_rows(base / tau, base, 1.0).mean()), rel=1e-9)


def test_effective_temperature_collapsed_logits():
    """An entropy-collapsed policy: top-1 probability ~1 on most tokens, so f'' is tiny at tau = 1."""
    base = _logits(30, 2000, seed=9, scale=2.0)
    base[:, 0] += torch.linspace(8.0, 40.0, 30, dtype=torch.float64)
    out = effective_temperature(base.float(), base / 1.5, chunk_size=8)
    assert out["tau"] == pytest.approx(1.5, abs=1e-4) and out["kl"] < 1e-8
    assert torch.allclose(out["tau_per_token"], torch.full((30,), 1.5, dtype=torch.float64), atol=1e-4)


def test_effective_temperature_identity_and_float32_inputs():
    base = _logits(10, 200, seed=1).float()
    out = effective_temperature(base, base.clone())
    assert out["tau"] == pytest.approx(1.0, abs=1e-6) and out["kl"] < 1e-12 and out["kl_at_1"] < 1e-12
    assert torch.allclose(out["tau_per_token"], torch.ones(10, dtype=torch.float64), atol=1e-6)


def test_effective_temperature_matches_grid_search():
    """Not a temperature change (other has its own noise, and per-token temperatures differ): tau* must
    be the minimiser of the float64 objective, found here by brute force on a fine grid."""
    base = _logits(24, 100, seed=2)
    token_tau = torch.linspace(0.8, 2.5, 24, dtype=torch.float64)[:, None]
    other = base / token_tau + 0.7 * _logits(24, 100, seed=3, scale=1.0)
    mask = torch.ones(24, dtype=torch.bool)
    mask[::5] = False
    out = effective_temperature(base, other, mask=mask, taus=[0.5, 1.0, 2.0], chunk_size=7)

    grid = torch.exp(torch.linspace(math.log(0.2), math.log(10.0), 40001, dtype=torch.float64))
    kl = torch.stack([_kl_rows(other[mask], base[mask], t) for t in grid])  # [G, M]
    best = int(kl.mean(1).argmin())
    step = float(grid[best + 1] - grid[best])
    assert out["tau"] == pytest.approx(float(grid[best]), abs=step)
    assert out["kl"] == pytest.approx(float(kl.mean(1)[best]), rel=1e-6)
    assert out["kl"] > 1e-2  # the noise is not a temperature: a residual remains
    assert out["kl"] < out["kl_at_1"]
    assert out["kl_curve"][1.0] == pytest.approx(out["kl_at_1"])
    assert out["kl_curve"][2.0] == pytest.approx(float(_kl_rows(other[mask], base[mask], 2.0).mean()), rel=1e-9)
    # Per token: each row's own minimiser, and its KL is never above the global tau's.
    per_best = kl.argmin(0)
    assert torch.allclose(out["tau_per_token"], grid[per_best], rtol=3e-4)
    assert torch.allclose(out["kl_per_token"], kl.min(0).values, rtol=1e-6, atol=1e-12)
    assert (out["kl_per_token"] <= _kl_rows(other[mask], base[mask], out["tau"]) + 1e-12).all()
    # The per-token temperatures follow the ones planted.
    assert torch.corrcoef(torch.stack([out["tau_per_token"], token_tau[mask, 0]]))[0, 1] > 0.9


def test_effective_temperature_bounds_and_leading_dims():
    base = _logits(6, 50, seed=4)
    out = effective_temperature(base, base / 50.0)  # beyond the range: stops on the bound
    assert out["tau"] == pytest.approx(TAU_RANGE[1]) and out["tau_at_bound"]
    b3 = base.reshape(2, 3, 50)
    out3 = effective_temperature(b3, b3 / 1.7, mask=torch.tensor([[True, False, True], [True, True, False]]))
    assert out3["n_tokens"] == 4 and out3["tau"] == pytest.approx(1.7, abs=1e-4)
    flat = torch.zeros(2, 50, dtype=torch.float64)
    flat[1] = base[0]
    out_flat = effective_temperature(flat, flat.clone())
    assert math.isnan(out_flat["tau_per_token"][0]) and out_flat["tau_per_token"][1] == pytest.approx(1.0, abs=1e-6)


# ----------------------------------------------------------------------------- top-k overlap and sharpness


def test_topk_overlap_self_and_constructed():
    a = _logits(5, 40, seed=5)
    assert topk_overlap(a, a.clone(), ks=(1, 5, 10)) == {1: 1.0, 5: 1.0, 10: 1.0}
    # Row logits with top-5 = {0..4}; b keeps exactly 3 of them (0, 1, 2) and promotes 10, 11.
    v = 20
    a = torch.arange(v, 0, -1, dtype=torch.float64).repeat(2, 1)  # top-5 of a: 0, 1, 2, 3, 4
    b = a.clone()
    b[:, 10], b[:, 11] = 100.0, 99.0
    b[:, 3], b[:, 4] = -100.0, -99.0
    out = topk_overlap(a, b, ks=(1, 3, 5))
    assert out[1] == 0.0 and out[3] == pytest.approx(1 / 3) and out[5] == pytest.approx(3 / 5)
    # The mask drops the second row, which differs completely.
    b2 = a.clone()
    b2[1] = -a[1]
    assert topk_overlap(a, b2, ks=(5,), mask=torch.tensor([True, False])) == {5: 1.0}
    assert topk_overlap(a, b2, ks=(5,)) == {5: 0.5}


def test_sharpness_matches_float64_reference_and_temperature():
    z = _logits(37, 500, seed=6).float()
    mask = torch.rand(37, generator=torch.Generator().manual_seed(0)) > 0.3
    out = sharpness(z, mask=mask, chunk_size=8)
    zm = z[mask].double()
    p = torch.softmax(zm, -1)
    assert out["entropy"] == pytest.approx(float(-(p * p.log()).sum(-1).mean()), rel=1e-10)
    assert out["max_prob"] == pytest.approx(float(p.max(-1).values.mean()), rel=1e-10)
    assert out["logit_std"] == pytest.approx(float(zm.std(-1, unbiased=False).mean()), rel=1e-10)
    hot = sharpness(z / 2, mask=mask)
    assert hot["logit_std"] == pytest.approx(out["logit_std"] / 2, rel=1e-6)
    assert hot["entropy"] > out["entropy"] and hot["max_prob"] < out["max_prob"]


# ----------------------------------------------------------------------------- representations


def test_linear_cka():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(300, 16, generator=g)
    q, _ = torch.linalg.qr(torch.randn(16, 16, generator=g, dtype=torch.float64))
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, (x.double() @ q) * 3.7 + 5.0) == pytest.approx(1.0, abs=1e-10)
    # Wider y: embedding x into more dimensions changes nothing.
    assert linear_cka(x, torch.cat([x, torch.zeros(300, 8)], 1)) == pytest.approx(1.0, abs=1e-10)
    # Independent features: small; a non-isotropic rescale: below 1.
    assert linear_cka(x, torch.randn(300, 16, generator=g)) < 0.15
    stretched = x.clone()
    stretched[:, 0] *= 10
    assert linear_cka(x, stretched) < 0.5
    # N < D takes the Gram-matrix route: must agree with the D x D route on the same data.
    small_x, small_y = torch.randn(10, 40, generator=g), torch.randn(10, 40, generator=g)
    xc = small_x.double() - small_x.double().mean(0)
    yc = small_y.double() - small_y.double().mean(0)
    ref = (yc.T @ xc).square().sum() / ((xc.T @ xc).square().sum() * (yc.T @ yc).square().sum()).sqrt()
    assert linear_cka(small_x, small_y) == pytest.approx(float(ref), rel=1e-10)
    assert math.isnan(linear_cka(torch.ones(5, 3), x[:5]))


def test_mean_cosine():
    x = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 4.0], [0.0, 0.0]])
    y = torch.tensor([[2.0, 0.0], [0.0, -1.0], [4.0, -3.0], [1.0, 1.0]])
    assert mean_cosine(x, y) == pytest.approx((1 - 1 + 0 + 0) / 4)
    assert mean_cosine(x[:3], 5 * x[:3]) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- parameter displacement


def test_param_delta():
    a = {"w": torch.ones(3, 2, dtype=torch.bfloat16), "ids": torch.arange(4), "only_a": torch.zeros(1)}
    b = {"w": torch.full((3, 2), 1.0078125, dtype=torch.bfloat16), "ids": torch.arange(4) + 1}
    d = param_delta(a, b)
    assert set(d) == {"w"} and d["w"].dtype == torch.float32
    assert torch.equal(d["w"], torch.full((3, 2), 0.0078125))
    with pytest.raises(ValueError):
        param_delta({"w": torch.zeros(2)}, {"w": torch.zeros(3)})


def test_displacement_metrics_analytic():
    # delta_low = -0.9 delta_high + e with e orthogonal to delta_high, spread over two "layers":
    # cos(low, -high) = 0.9 |h| / sqrt(0.81 |h|^2 + |e|^2), coefficient 0.9, norm ratio sqrt(0.81 + |e|^2/|h|^2).
    g = torch.Generator().manual_seed(8)
    h = torch.randn(1000, generator=g, dtype=torch.float64)
    e = torch.randn(1000, generator=g, dtype=torch.float64)
    e -= (e @ h) / (h @ h) * h
    e *= 0.5 * h.norm() / e.norm()  # |e| = |h| / 2
    low = -0.9 * h + e
    high_dict = {"layer0": h[:600].reshape(20, 30).float(), "layer1": h[600:].float(), "extra": torch.ones(3)}
    low_dict = {"layer0": low[:600].reshape(20, 30).float(), "layer1": low[600:].float()}
    out = displacement_metrics(low_dict, high_dict)
    assert out["n_keys"] == 2 and out["n_params"] == 1000
    assert out["cosine"] == pytest.approx(0.9 / math.sqrt(0.81 + 0.25), rel=1e-6)
    assert out["reverse_coef"] == pytest.approx(0.9, rel=1e-6)
    assert out["norm_ratio"] == pytest.approx(math.sqrt(0.81 + 0.25), rel=1e-6)
    assert out["high_norm"] == pytest.approx(float(h.norm()), rel=1e-6)
    layer0 = out["per_key"]["layer0"]
    assert layer0["low_norm"] == pytest.approx(float(low[:600].norm()), rel=1e-6)
    assert layer0["high_norm"] == pytest.approx(float(h[:600].norm()), rel=1e-6)
    assert layer0["cosine"] == pytest.approx(float(-(low[:600] @ h[:600]) / (low[:600].norm() * h[:600].norm())),
                                             rel=1e-5)
    # Exactly opposite updates: cosine 1, coefficient = the scale.
    same = displacement_metrics({"w": -2 * h}, {"w": h})
    assert same["cosine"] == pytest.approx(1.0) and same["reverse_coef"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        displacement_metrics({"w": h}, {"w": h[:10]})
    with pytest.raises(ValueError):
        displacement_metrics({"a": h}, {"b": h})
