"""common/stats.py against brute force, closed forms and float64 references (a few seconds on CPU)."""
import itertools
import math

import numpy as np
import pytest
import torch

from common.stats import (
    TAU_RANGE, avg_at_k, displacement_metrics, distinct_count, effective_temperature, linear_cka, maj_at_k,
    mean_ci, mean_cosine, normalize_answer, paired_bootstrap, param_delta, pass_at_k, sharpness, summarize,
    t_cdf, t_quantile, topk_overlap,
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
