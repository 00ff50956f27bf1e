"""Estimators and analysis metrics for evaluation: pure functions of numbers and tensors, no models.

Accuracy (inputs are per-sample answers and grades, as common/grading.py produces them)
    pass_at_k(n, c, k)                   unbiased pass@k of one problem from n samples, c correct
    avg_at_k(correct)                    mean over problems of the per-problem mean score
    maj_at_k(answers, correct, k)        majority vote over the first k samples of one problem
    summarize(samples_per_problem)       avg@k, pass@1,2,4,..,k, maj@k, distinct@k of one benchmark
    normalize_answer(answer)             the string key answers are voted and counted under
    distinct_count(items)                number of distinct normalised answers (None not counted)

Seeds and significance (the review asks for both)
    t_quantile(p, dof)                   Student t quantile, from the t CDF (regularised incomplete beta)
    mean_ci(values, confidence)          (mean, lo, hi), t interval across seeds
    paired_bootstrap(scores_a, scores_b) difference of two methods on the same problems, CI and p-value
    hierarchical_bootstrap(a, b)         the same over seeds and problems ([seeds, problems] per method)
    paired_seed_t(a, b)                  paired t-test over seeds the two methods share

Analysis of a reheated policy (torch; logits [..., V] with an optional mask [...], walked in row chunks
so that V = 151,936 never costs more than a few [chunk_size, V] float64 buffers)
    effective_temperature(base, other)   the tau* with softmax(base / tau*) closest to softmax(other)
    topk_overlap(logits_a, logits_b)     how much of the top-k candidate set is kept
    sharpness(logits)                    entropy, max probability, logit std per token
    linear_cka(x, y), mean_cosine(x, y)  hidden-state similarity of one layer
    param_delta(a, b), displacement_metrics(delta_low, delta_high)
                                         is the low-temperature update the reverse of the reheat?

Everything analytic is computed in float64: these numbers end up in tables, and the differences they
measure (a KL of 1e-4, a tau of 1.49 vs 1.5) are below bf16/fp32 rounding of 150k-way softmaxes.
"""
import math
import re
from collections.abc import Mapping, Sequence

import numpy as np
import torch

# ============================================================================= accuracy estimators


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al. 2021): P(at least one of k samples drawn without replacement from
    the n is correct) = 1 - C(n-c, k) / C(n, k).

    The binomials overflow floats for n in the hundreds, so the ratio is the product
    C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i), every factor in [0, 1).
    """
    for name, v in (("n", n), ("c", c), ("k", k)):
        if isinstance(v, bool) or int(v) != v:
            raise ValueError(f"pass_at_k: {name} must be an integer, got {v!r}")
    n, c, k = int(n), int(c), int(k)
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got n={n}, k={k}")
    if n - c < k:  # every k-subset contains a correct sample
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def avg_at_k(correct: Sequence[Sequence[bool | float]]) -> float:
    """Mean over problems of the mean score of each problem's samples (problems weigh equally even if
    their sample counts differ)."""
    if len(correct) == 0:
        raise ValueError("avg_at_k: no problems")
    per_problem = []
    for i, scores in enumerate(correct):
        if len(scores) == 0:
            raise ValueError(f"avg_at_k: problem {i} has no samples")
        per_problem.append(sum(float(s) for s in scores) / len(scores))
    return sum(per_problem) / len(per_problem)


# Spelling differences that never change a final answer. Deliberately string-level and strict: this is
# a cheap key for voting and counting, not grading's math-verify equivalence ("0.5" and "\frac{1}{2}"
# are two different answers here, as they are in verl's maj@k).
_MATH_DELIMITERS = (("$", "$"), ("\\(", "\\)"), ("\\[", "\\]"))
_TEXT_MACRO = re.compile(r"\\(?:text|textbf|mathrm|mathbf|operatorname)\{([^{}]*)\}")
_SPACING = re.compile(r"\\left|\\right|\\[!,;: ]|\s+")


def normalize_answer(answer: str | None) -> str | None:
    """The key an answer is voted and counted under, or None for no answer (None or blank)."""
    if answer is None:
        return None
    answer = answer.strip().removesuffix(".").strip()
    for left, right in _MATH_DELIMITERS:
        if len(answer) >= len(left) + len(right) and answer.startswith(left) and answer.endswith(right):
            answer = answer[len(left):len(answer) - len(right)]
            break
    answer = _TEXT_MACRO.sub(r"\1", answer)
    answer = answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    answer = _SPACING.sub("", answer).removesuffix(".")
    return answer or None


def maj_at_k(answers: Sequence[str | None], correct: Sequence[bool | float], k: int) -> float:
    """Majority-vote accuracy of one problem's first k samples: 1.0 if the most frequent normalised
    answer is correct, else 0.0.

    None (no extractable answer) never takes part in the vote; all None gives 0.0. Ties go to the
    tied answer that appears first among the k samples, so the result is a function of the sample
    order and never of hashing. The winner's grade is that of its first occurrence (samples with the
    same normalised answer are graded alike anyway, up to spellings the normalisation does not merge).
    """
    if len(answers) != len(correct):
        raise ValueError(f"maj_at_k: {len(answers)} answers but {len(correct)} grades")
    if not 1 <= k <= len(answers):
        raise ValueError(f"maj_at_k: need 1 <= k <= {len(answers)} samples, got k={k}")
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for i, answer in enumerate(answers[:k]):
        key = normalize_answer(answer)
        if key is None:
            continue
        counts[key] = counts.get(key, 0) + 1
        first.setdefault(key, i)
    if not counts:
        return 0.0
    # max() keeps the first maximum it meets, and dicts iterate in insertion = first-occurrence order.
    winner = max(counts, key=counts.get)
    return 1.0 if float(correct[first[winner]]) > 0 else 0.0


def distinct_count(items: Sequence[str | None]) -> int:
    """Number of distinct normalised answers; None (and blank) answers are not counted."""
    return len({key for key in map(normalize_answer, items) if key is not None})


def summarize(samples_per_problem: Sequence[Sequence[tuple[str | None, bool | float]]],
              k: int | None = None) -> dict[str, float]:
    """The accuracy table of one benchmark.

    Input: one list per problem, of (answer, correct) per sample in sampling order: answer is the
    extracted final-answer string or None, correct is a bool or a 0/1 grade (> 0 counts as correct).
    Every problem must have at least k samples; k defaults to the smallest sample count.

    Output keys (k = 16 for example):
        avg@16                mean correctness of the first k samples, averaged over problems
        pass@1, pass@2, pass@4, pass@8, pass@16
                              unbiased pass@j for every power of two j <= k, and k itself, each from ALL
                              of a problem's n >= k samples (more samples, less variance), averaged
        maj@16                majority vote over the first k samples (see maj_at_k), averaged
        distinct@16           mean number of distinct normalised answers among the first k samples
        n_problems, k
    """
    if len(samples_per_problem) == 0:
        raise ValueError("summarize: no problems")
    sizes = [len(samples) for samples in samples_per_problem]
    if k is None:
        k = min(sizes)
    if k < 1 or k > min(sizes):
        raise ValueError(f"summarize: need 1 <= k <= the smallest sample count {min(sizes)}, got k={k}")
    js = sorted({2 ** e for e in range(k.bit_length()) if 2 ** e <= k} | {k})
    out = {f"avg@{k}": 0.0, **{f"pass@{j}": 0.0 for j in js}, f"maj@{k}": 0.0, f"distinct@{k}": 0.0}
    for samples in samples_per_problem:
        answers = [a for a, _ in samples]
        grades = [1.0 if float(c) > 0 else 0.0 for _, c in samples]
        n, c = len(samples), int(sum(grades))
        out[f"avg@{k}"] += sum(grades[:k]) / k
        for j in js:
            out[f"pass@{j}"] += pass_at_k(n, c, j)
        out[f"maj@{k}"] += maj_at_k(answers, grades, k)
        out[f"distinct@{k}"] += distinct_count(answers[:k])
    out = {key: value / len(samples_per_problem) for key, value in out.items()}
    out["n_problems"] = len(samples_per_problem)
    out["k"] = k
    return out


# ============================================================================= seeds and significance

def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the incomplete beta function (modified Lentz; Numerical Recipes 6.4)."""
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 1000):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def _betainc(a: float, b: float, x: float) -> float:
    """Regularised incomplete beta I_x(a, b)."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    # The continued fraction converges fast only for x < (a+1)/(a+b+2); use the symmetry otherwise.
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _betacf(a, b, x) / a
    return 1.0 - math.exp(log_front) * _betacf(b, a, 1.0 - x) / b


def t_cdf(t: float, dof: float) -> float:
    """P(T <= t) for Student's t with dof degrees of freedom: tails are I_{dof/(dof+t^2)}(dof/2, 1/2) / 2."""
    tail = 0.5 * _betainc(0.5 * dof, 0.5, dof / (dof + t * t))
    return 1.0 - tail if t > 0 else tail


def t_quantile(p: float, dof: float) -> float:
    """The t with t_cdf(t, dof) = p, by bisection (the CDF is monotone; 200 halvings reach float precision)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"t_quantile: need 0 < p < 1, got {p}")
    if not dof > 0:
        raise ValueError(f"t_quantile: need dof > 0, got {dof}")
    if p < 0.5:
        return -t_quantile(1.0 - p, dof)
    if p == 0.5:
        return 0.0
    lo, hi = 0.0, 1.0
    while t_cdf(hi, dof) < p:
        lo, hi = hi, 2.0 * hi
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        if t_cdf(mid, dof) < p:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-13 * hi:
            break
    return 0.5 * (lo + hi)


def mean_ci(values: Sequence[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, lo, hi): two-sided Student-t interval for the mean of a few seeds' results,
    mean +- t_{(1+confidence)/2, n-1} * s / sqrt(n) with the sample (n-1) standard deviation.
    With a single value the interval is undefined: (value, nan, nan)."""
    x = np.asarray(values, dtype=np.float64).ravel()
    if x.size == 0:
        raise ValueError("mean_ci: no values")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"mean_ci: need 0 < confidence < 1, got {confidence}")
    mean = float(x.mean())
    if x.size == 1:
        return mean, math.nan, math.nan
    half = t_quantile(0.5 * (1.0 + confidence), x.size - 1) * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, mean - half, mean + half


def paired_bootstrap(scores_a: Sequence[float], scores_b: Sequence[float], n_boot: int = 10000,
                     seed: int = 0, confidence: float = 0.95) -> dict:
    """Paired bootstrap over problems: is method a better than method b on the same problems?

    scores_a[i], scores_b[i] are the two methods' scores on problem i (e.g. avg@k of that problem).
    Each replicate resamples problem indices with replacement and keeps the pairs together, so the
    problem-difficulty variance shared by both methods cancels. Returns
        diff      mean(a) - mean(b) on the real data
        ci        percentile interval of the bootstrap diffs at `confidence`
        p_value   two-sided: 2 * (1 + #replicates on the other side of 0, ties at 0 included)
                  / (1 + n_boot), clipped to 1 (the +1 keeps p > 0 from a finite bootstrap)
        n_problems, n_boot
    Deterministic in seed (numpy's PCG64).
    """
    a = np.asarray(scores_a, dtype=np.float64).ravel()
    b = np.asarray(scores_b, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"paired_bootstrap: need two non-empty score lists of one length, got {a.size}, {b.size}")
    if n_boot < 1:
        raise ValueError(f"paired_bootstrap: need n_boot >= 1, got {n_boot}")
    d = a - b
    diff = float(d.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    rows = max(1, (1 << 22) // d.size)  # ~32 MB of indices at a time, whatever the problem count
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        boot[start:stop] = d[rng.integers(0, d.size, size=(stop - start, d.size))].mean(axis=1)
    return {"diff": diff, **_percentile_test(boot, diff, confidence), "n_problems": int(d.size), "n_boot": int(n_boot)}


def _percentile_test(boot: np.ndarray, diff: float, confidence: float) -> dict:
    """Percentile interval and two-sided p-value of bootstrap replicates (see paired_bootstrap)."""
    alpha = 1.0 - confidence
    lo, hi = np.quantile(boot, [alpha / 2, 1.0 - alpha / 2])
    other_side = int((boot <= 0).sum()) if diff >= 0 else int((boot >= 0).sum())
    return {"ci": (float(lo), float(hi)), "p_value": min(1.0, 2.0 * (other_side + 1) / (boot.size + 1))}


def _seed_matrix(scores, name: str, who: str) -> np.ndarray:
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 2 or 0 in x.shape:
        raise ValueError(f"{name}: {who} must be a non-empty [seeds, problems] array, got shape {x.shape}")
    return x


def hierarchical_bootstrap(scores_a, scores_b, n_boot: int = 10000, seed: int = 0,
                           confidence: float = 0.95) -> dict:
    """Two-level bootstrap over training seeds and problems: is method a better than method b, counting both the
    problems that happened to be drawn and the seeds that happened to be trained?

    scores_a [n_seeds_a, n_problems], scores_b [n_seeds_b, n_problems]: seed s's score on problem i, the same
    problems in the same order for both (the seed counts may differ). Each replicate draws each arm's seeds with
    replacement, independently (nothing pairs a's seed s with b's: paired_seed_t does that), then one set of
    problem indices with replacement for both arms (paired over problems, as in paired_bootstrap), and takes
    mean(a) - mean(b) over the drawn seeds and problems. Returns paired_bootstrap's keys (diff = mean(a) - mean(b),
    the same point estimate; ci; p_value, defined as there) and n_seeds_a, n_seeds_b.

    Biases to know (with S seeds, P problems): the seed level's bootstrap variance is (S-1)/S of the sample
    variance and S seeds have only C(2S-1, S) distinct resamples (10 for S = 3), so with 3 seeds the interval is
    somewhat too narrow; resampling both crossed factors counts the seed x problem noise (e.g. the sampling noise
    of a problem's k samples within one seed) about three times instead of once, so the interval is conservative
    where that noise dominates. Both are derived in tests/test_stats.py, whose closed form of the bootstrap
    variance the replicates match.
    Where the arms share seeds, paired_seed_t is exact under normality at any S.
    Deterministic in seed (numpy's PCG64).
    """
    a = _seed_matrix(scores_a, "hierarchical_bootstrap", "scores_a")
    b = _seed_matrix(scores_b, "hierarchical_bootstrap", "scores_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"hierarchical_bootstrap: the arms must share their problems, got {a.shape[1]} and "
                         f"{b.shape[1]} columns")
    if n_boot < 1:
        raise ValueError(f"hierarchical_bootstrap: need n_boot >= 1, got {n_boot}")
    (sa, n), sb = a.shape, b.shape[0]
    diff = float(a.mean() - b.mean())
    rng = np.random.default_rng(seed)
    boot = np.empty(n_boot)
    rows = max(1, (1 << 22) // n)
    for start in range(0, n_boot, rows):
        stop = min(n_boot, start + rows)
        # level 1, seeds: how often each seed is drawn, so each replicate's per-problem arm mean is one product
        d = (rng.multinomial(sa, np.full(sa, 1 / sa), size=stop - start) @ a / sa
             - rng.multinomial(sb, np.full(sb, 1 / sb), size=stop - start) @ b / sb)  # [m, n]
        # level 2, problems: the same indices for both arms
        boot[start:stop] = np.take_along_axis(d, rng.integers(0, n, size=d.shape), 1).mean(1)
    return {"diff": diff, **_percentile_test(boot, diff, confidence), "n_problems": n, "n_boot": int(n_boot),
            "n_seeds_a": sa, "n_seeds_b": sb}


def paired_seed_t(scores_a, scores_b, confidence: float = 0.95) -> dict:
    """Paired t-test over seeds, for arms trained from the same seeds: a's seed s against b's seed s.

    scores_a, scores_b [n_seeds, n_problems] on the same problems, rows in the same seed order. The per-seed
    differences d_s = mean over problems of (a[s] - b[s]) are tested with Student's t on n - 1 degrees of freedom:
    t = mean(d) / (std(d) / sqrt(n)), p two-sided = 2 P(T > |t|), ci = mean(d) +- t_{(1+confidence)/2} std(d) /
    sqrt(n) (mean_ci of d). Exact for normal d at any seed count, where a 3-seed bootstrap is not; but every d_s is
    over the same problems, so it answers "on these problems" (hierarchical_bootstrap adds the problem draw).
    Returns diff, ci, p_value, t, dof, n_seeds, n_problems. std(d) = 0 gives p 1 for diff 0, else 0.
    """
    a = _seed_matrix(scores_a, "paired_seed_t", "scores_a")
    b = _seed_matrix(scores_b, "paired_seed_t", "scores_b")
    if a.shape != b.shape or a.shape[0] < 2:
        raise ValueError(f"paired_seed_t: need the same >= 2 seeds and the same problems in both arms, got shapes "
                         f"{a.shape} and {b.shape}")
    d = a.mean(1) - b.mean(1)
    diff, lo, hi = mean_ci(d, confidence)
    se = float(d.std(ddof=1)) / math.sqrt(d.size)
    if se == 0:
        t, p_value, lo, hi = math.copysign(math.inf, diff) if diff else 0.0, 0.0 if diff else 1.0, diff, diff
    else:
        t = diff / se
        p_value = min(1.0, 2.0 * t_cdf(-abs(t), d.size - 1))
    return {"diff": diff, "ci": (lo, hi), "p_value": p_value, "t": t, "dof": d.size - 1, "n_seeds": int(d.size),
            "n_problems": int(a.shape[1])}


# ============================================================================= analysis metrics (torch)

def _row_index(logits: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """([N, V] view of logits, indices of the rows to use). Rows are gathered one chunk at a time later:
    a boolean-mask selection of the whole tensor would copy all of [N, V] at once."""
    flat = logits.reshape(-1, logits.shape[-1])
    if mask is None:
        return flat, torch.arange(flat.shape[0], device=logits.device)
    if mask.shape != logits.shape[:-1]:
        raise ValueError(f"mask shape {tuple(mask.shape)} must be the logits' leading shape {tuple(logits.shape[:-1])}")
    return flat, mask.reshape(-1).to(device=logits.device).nonzero().squeeze(-1)


def _check_pair(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


# ----------------------------------------------------------------------------- effective temperature
#
# For one token with base logits z and target p = softmax(o), as a function of beta = 1/tau:
#     f(beta)   = KL(p || softmax(beta z)) = sum p log p - beta <p, z> + logsumexp(beta z)
#     f'(beta)  = E_{q_beta}[z] - E_p[z]                 q_beta = softmax(beta z)
#     f''(beta) = Var_{q_beta}[z] >= 0
# so f is convex in beta (logsumexp is convex, the rest is linear), and so is its mean over tokens.
# Newton on beta converges in a handful of steps; a bracket [beta_lo, beta_hi] that every evaluation
# shrinks keeps it safe where f'' is tiny (near one-hot q). Only z changes with beta: p enters through
# two numbers per token (sum p log p and <p, z>), so `other` is read once and each Newton step is one
# pass over `base`.
# Each row's z is shifted by its max (zc = z - max z <= 0, all formulas above are shift-invariant once
# <p, z> is shifted too): exp(beta zc) then never overflows and its largest entry is exactly 1, so
# logsumexp needs no max pass, and the moments are two BLAS dot products per row. This matters on CPU,
# where float64 exp over 151,936 entries per row is the whole cost.

TAU_RANGE = (0.05, 20.0)


def _beta_terms(zc: torch.Tensor, zc_sq: torch.Tensor | None, beta: torch.Tensor):
    """Per row of zc [C, V] (float64, row max exactly 0) at beta [C] (or [1]):
    logsumexp(beta zc) [C], E_q[zc] [C], Var_q[zc] [C] (None without zc_sq = zc**2)."""
    e = torch.mul(zc, beta[:, None]).exp_()  # [C, V], unnormalised q, max entry 1
    total = e.sum(-1)
    mean = (e[:, None, :] @ zc[:, :, None]).view(-1) / total  # batched dot: no [C, V] temporary
    var = None
    if zc_sq is not None:
        var = ((e[:, None, :] @ zc_sq[:, :, None]).view(-1) / total - mean.square()).clamp_(min=0)
    return total.log(), mean, var


def _newton_convex(grad_hess, lo: float, hi: float, shape, device, start: float = 1.0, tol: float = 1e-12,
                   max_iter: int = 200):
    """Minimise convex 1-D functions over [lo, hi], vectorised: grad_hess(beta [R]) -> (f' [R], f'' [R]).

    Safeguarded Newton from beta = start: each evaluation shrinks the bracket [lo_t, hi_t] around the
    minimiser; a step leaving the bracket becomes its geometric midpoint (beta spans orders of
    magnitude), except that a step past a search bound first tries the bound itself, so that a minimum
    outside [lo, hi] lands on the bound in one evaluation instead of ~40 halvings. Returns beta [R]."""
    f64 = {"dtype": torch.float64, "device": device}
    lo_t, hi_t = torch.full(shape, lo, **f64), torch.full(shape, hi, **f64)
    tried_lo = torch.zeros(shape, dtype=torch.bool, device=device)
    tried_hi = torch.zeros_like(tried_lo)
    beta = torch.full(shape, min(max(start, lo), hi), **f64)
    active = torch.ones_like(tried_lo)
    for _ in range(max_iter):
        g, h = grad_hess(beta)
        lo_t = torch.where(active & (g < 0), beta, lo_t)
        hi_t = torch.where(active & (g > 0), beta, hi_t)
        tried_lo |= beta == lo
        tried_hi |= beta == hi
        newton = beta - g / h
        curved = h > 0
        step = torch.where(curved & (newton <= lo_t) & (lo_t == lo) & ~tried_lo, lo_t,
                           torch.where(curved & (newton >= hi_t) & (hi_t == hi) & ~tried_hi, hi_t,
                                       (lo_t * hi_t).sqrt()))
        step = torch.where(curved & (newton > lo_t) & (newton < hi_t), newton, step)
        done = (g == 0) | (hi_t - lo_t <= tol * beta) | ((step - beta).abs() <= tol * beta)
        beta = torch.where(active & (g != 0), step, beta)
        active = active & ~done
        if not bool(active.any()):
            break
    return beta


@torch.no_grad()
def effective_temperature(base_logits: torch.Tensor, other_logits: torch.Tensor, mask: torch.Tensor | None = None,
                          taus: Sequence[float] | None = None, per_token: bool = True,
                          chunk_size: int = 64) -> dict:
    """How much of the change from `base` to `other` is a temperature: the tau* minimising
    mean_t KL(softmax(other_t) || softmax(base_t / tau)), and the KL left at tau*.

    base_logits, other_logits: [..., V] full tensors on any device and in any dtype (e.g. bf16 on the
    GPU): rows are converted to float64 chunk_size at a time, so the working memory is a few
    [chunk_size, V] float64 buffers (~80 MB each for 64 x 151,936) on top of the inputs. The global tau
    needs several passes over all tokens (5-10 Newton steps, each one exp per logit), which is why this
    takes whole tensors rather than a stream. On one CPU thread a pass costs ~3 s per 1000 tokens at
    V = 151,936 and the per-token solve about 5 passes; on a GPU all of it is negligible.
    mask [...]: tokens to use (e.g. response tokens); None = all. Logits must be finite.
    taus: optional temperatures at which to also report the mean KL (a curve for plots).

    Returns
        tau               global tau* in TAU_RANGE = [0.05, 20] (one temperature for all tokens)
        kl                mean KL at tau* (0 iff other is exactly base / tau*)
        kl_at_1           mean KL at tau = 1, i.e. the total change; 1 - kl / kl_at_1 is the share a
                          temperature explains
        tau_at_bound      True if tau* sits on a bound of the range (the true optimum may lie beyond)
        n_tokens
        tau_per_token     [M] float64 on the CPU, each token's own tau* (NaN where the base logits are
                          constant: every tau fits equally), in row order of the selected tokens;
                          only with per_token=True, as are
        kl_per_token      [M] each token's KL at its own tau*
        kl_curve          {tau: mean KL} for the taus asked for
    """
    _check_pair(base_logits, other_logits, "effective_temperature")
    base, rows = _row_index(base_logits, mask)
    other = other_logits.reshape(-1, other_logits.shape[-1])
    device, n_tokens = base.device, int(rows.numel())
    if n_tokens == 0:
        raise ValueError("effective_temperature: no tokens selected")
    beta_lo, beta_hi = 1.0 / TAU_RANGE[1], 1.0 / TAU_RANGE[0]
    chunks = [rows[s:s + chunk_size] for s in range(0, n_tokens, chunk_size)]

    # Pass 1: what `other` contributes, two numbers per token; per-token tau* while the chunk is here.
    row_max, neg_entropy_p, mean_zc_p, tau_tok, kl_tok = [], [], [], [], []
    for idx in chunks:
        zc = base[idx].double()  # [C, V]
        zmax = zc.amax(-1)
        zc.sub_(zmax[:, None])
        logp = torch.log_softmax(other[idx].double(), -1)
        p = logp.exp()
        nh = torch.where(p > 0, p * logp, torch.zeros_like(p)).sum(-1)  # sum p log p
        pzc = (p[:, None, :] @ zc[:, :, None]).view(-1)  # E_p[zc]
        del logp, p
        row_max.append(zmax)
        neg_entropy_p.append(nh)
        mean_zc_p.append(pzc)
        if per_token:
            zc_sq = zc.square()

            def grad_hess(beta, zc=zc, zc_sq=zc_sq, pzc=pzc):
                _, mean, var = _beta_terms(zc, zc_sq, beta)
                return mean - pzc, var
            beta = _newton_convex(grad_hess, beta_lo, beta_hi, (zc.shape[0],), device)
            log_total, _, _ = _beta_terms(zc, None, beta)
            tau = 1.0 / beta
            tau[zc.amin(-1) == 0] = math.nan  # constant row: its max is also its min
            tau_tok.append(tau.cpu())
            kl_tok.append((nh - beta * pzc + log_total).clamp_(min=0).cpu())
            del zc_sq

    def mean_terms(beta: float, need_hess: bool = True):
        """Mean over tokens of f, f', f'' at one beta: one pass over `base`."""
        f = g = h = 0.0
        b = torch.tensor([beta], dtype=torch.float64, device=device)
        for idx, zmax, nh, pzc in zip(chunks, row_max, neg_entropy_p, mean_zc_p):
            zc = base[idx].double().sub_(zmax[:, None])
            log_total, mean, var = _beta_terms(zc, zc.square() if need_hess else None, b)
            f += float((nh - beta * pzc + log_total).sum())
            g += float((mean - pzc).sum())
            h += float(var.sum()) if need_hess else 0.0
        return f / n_tokens, g / n_tokens, h / n_tokens

    def global_grad_hess(beta):
        _, g, h = mean_terms(float(beta[0]))
        return torch.tensor([g], dtype=torch.float64), torch.tensor([h], dtype=torch.float64)

    # The median token's beta is a closer start than 1 (the mean objective is steep at small beta, where
    # Newton from far away overshoots): a few passes fewer.
    start = 1.0
    if per_token and not torch.cat(tau_tok).isnan().all():
        start = float(1.0 / torch.cat(tau_tok).nanmedian())
    beta = float(_newton_convex(global_grad_hess, beta_lo, beta_hi, (1,), "cpu", start=start)[0])
    tau = 1.0 / beta
    out = {
        "tau": tau,
        "kl": max(0.0, mean_terms(beta, need_hess=False)[0]),
        "kl_at_1": max(0.0, mean_terms(1.0, need_hess=False)[0]),
        "tau_at_bound": bool(math.isclose(tau, TAU_RANGE[0], rel_tol=1e-9)
                             or math.isclose(tau, TAU_RANGE[1], rel_tol=1e-9)),
        "n_tokens": n_tokens,
    }
    if per_token:
        out["tau_per_token"] = torch.cat(tau_tok)
        out["kl_per_token"] = torch.cat(kl_tok)
    if taus is not None:
        out["kl_curve"] = {float(t): max(0.0, mean_terms(1.0 / float(t), need_hess=False)[0]) for t in taus}
    return out


# ----------------------------------------------------------------------------- candidates and sharpness

@torch.no_grad()
def topk_overlap(logits_a: torch.Tensor, logits_b: torch.Tensor, ks: Sequence[int] = (1, 5, 10),
                 mask: torch.Tensor | None = None, chunk_size: int = 1024) -> dict[int, float]:
    """{k: mean over tokens of |topk(a) ∩ topk(b)| / k}: is the reheated model still choosing among the
    same candidates? One torch.topk at max(ks) per chunk; the top-k set is its first k entries (ties
    are resolved as torch.topk resolves them)."""
    _check_pair(logits_a, logits_b, "topk_overlap")
    a, rows = _row_index(logits_a, mask)
    b = logits_b.reshape(-1, logits_b.shape[-1])
    if rows.numel() == 0:
        raise ValueError("topk_overlap: no tokens selected")
    ks = [int(k) for k in ks]
    if not all(1 <= k <= a.shape[-1] for k in ks):
        raise ValueError(f"topk_overlap: every k must be in [1, {a.shape[-1]}], got {ks}")
    k_max = max(ks)
    hits = {k: 0.0 for k in ks}
    for s in range(0, rows.numel(), chunk_size):
        idx = rows[s:s + chunk_size]
        top_a = a[idx].topk(k_max, dim=-1).indices  # [C, k_max], sorted by value
        top_b = b[idx].topk(k_max, dim=-1).indices
        for k in ks:
            same = top_a[:, :k, None] == top_b[:, None, :k]  # [C, k, k]
            hits[k] += float(same.any(-1).sum(-1).double().sum()) / k
    return {k: hits[k] / rows.numel() for k in ks}


@torch.no_grad()
def sharpness(logits: torch.Tensor, mask: torch.Tensor | None = None, chunk_size: int = 64) -> dict[str, float]:
    """Means over tokens of the entropy (nats), the top-1 probability and the standard deviation of the
    logits over the vocabulary (population std): dividing logits by tau divides logit_std by tau exactly,
    so it tells a temperature-like change from a reshuffle of the distribution."""
    flat, rows = _row_index(logits, mask)
    if rows.numel() == 0:
        raise ValueError("sharpness: no tokens selected")
    entropy = max_prob = logit_std = 0.0
    for s in range(0, rows.numel(), chunk_size):
        z = flat[rows[s:s + chunk_size]].double()
        logp = torch.log_softmax(z, -1)
        p = logp.exp()
        entropy -= float(torch.where(p > 0, p * logp, torch.zeros_like(p)).sum())
        max_prob += float(p.amax(-1).sum())
        logit_std += float(z.std(-1, correction=0).sum())
    n = rows.numel()
    return {"entropy": entropy / n, "max_prob": max_prob / n, "logit_std": logit_std / n}


# ----------------------------------------------------------------------------- representations

@torch.no_grad()
def linear_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA (Kornblith et al. 2019) of features x [N, D1] and y [N, D2] of the same N inputs:
    HSIC(X, Y) / sqrt(HSIC(X, X) HSIC(Y, Y)) with column-centred X, Y, i.e.
    ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F). 1 for x vs x @ R * s (R orthogonal, s != 0), invariant to
    isotropic scaling but not to arbitrary linear maps. NaN if either x or y is constant over inputs.

    Computed with D x D products when N > D, else with N x N Gram matrices (the same value,
    <X X^T, Y Y^T>_F), in float64: hidden states of thousands of tokens in 4096 dims are fine."""
    if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
        raise ValueError(f"linear_cka: need [N, D1] and [N, D2], got {tuple(x.shape)} and {tuple(y.shape)}")
    x = x.double()
    y = y.to(device=x.device, dtype=torch.float64)
    x = x - x.mean(0, keepdim=True)
    y = y - y.mean(0, keepdim=True)
    if x.shape[0] <= max(x.shape[1], y.shape[1]):
        kx, ky = x @ x.T, y @ y.T  # [N, N]
        cross, self_x, self_y = (kx * ky).sum(), kx.square().sum(), ky.square().sum()
    else:
        cross = (y.T @ x).square().sum()
        self_x, self_y = (x.T @ x).square().sum(), (y.T @ y).square().sum()
    denom = (self_x * self_y).sqrt()
    return float(cross / denom) if float(denom) > 0 else math.nan


@torch.no_grad()
def mean_cosine(x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean over rows of cos(x_i, y_i), float64; x and y [N, D] (any leading shape, same for both).
    A zero row has cosine 0 with anything."""
    _check_pair(x, y, "mean_cosine")
    x = x.reshape(-1, x.shape[-1]).double()
    y = y.reshape(-1, y.shape[-1]).to(device=x.device, dtype=torch.float64)
    dot = (x * y).sum(-1)
    norms = x.norm(dim=-1) * y.norm(dim=-1)
    cos = torch.where(norms > 0, dot / norms.clamp(min=torch.finfo(torch.float64).tiny), torch.zeros_like(dot))
    return float(cos.mean())


# ----------------------------------------------------------------------------- parameter displacement

@torch.no_grad()
def param_delta(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """{name: b - a} for the floating-point tensors present in both state dicts (buffers such as integer
    position ids are skipped), subtracted in float32 and stored in `dtype`: the difference of two bf16
    checkpoints a few hundred steps apart is far below bf16's resolution of the weights themselves, so
    subtracting in bf16 would round much of it away. A shape mismatch on a shared name is an error."""
    delta = {}
    for name, a in state_a.items():
        b = state_b.get(name)
        if b is None or not (a.is_floating_point() and b.is_floating_point()):
            continue
        if a.shape != b.shape:
            raise ValueError(f"param_delta: {name} has shape {tuple(a.shape)} in a but {tuple(b.shape)} in b")
        delta[name] = (b.float() - a.to(b.device).float()).to(dtype)
    return delta


_PIECE = 1 << 24  # elements converted to float64 at a time: an 8B model's embedding would be 5 GB at once


def _dot64(u: torch.Tensor, v: torch.Tensor) -> float:
    """<u, v> accumulated in float64, a slice at a time."""
    u, v = u.reshape(-1), v.reshape(-1).to(u.device)
    return sum(float(torch.dot(u[s:s + _PIECE].double(), v[s:s + _PIECE].double()))
               for s in range(0, u.numel(), _PIECE))


@torch.no_grad()
def displacement_metrics(delta_low: Mapping[str, torch.Tensor], delta_high: Mapping[str, torch.Tensor]) -> dict:
    """Is low-temperature distillation (tau < 1) the reverse of the reheat (tau > 1) in weight space?
    Over the names present in both dicts, flattened into one vector each:

        cosine         cos(delta_low, -delta_high): 1 if the two updates point in exactly opposite ways
        reverse_coef   <delta_low, -delta_high> / ||delta_high||^2: the c in delta_low ~ -c * delta_high
                       plus a part orthogonal to delta_high (the paper: 0.891 on the 8B model)
        norm_ratio     ||delta_low|| / ||delta_high||
        low_norm, high_norm
        per_key        {name: {"low_norm", "high_norm", "cosine"}} (cosine again against -delta_high,
                       NaN where a norm is 0): which layers carry the displacement
        n_keys, n_params
    All sums in float64. A shape mismatch on a shared name is an error.

    Sign check against the paper: it quotes a cosine of -0.878 "between Delta_low and -Delta_high" next to
    a POSITIVE reverse coefficient of 0.891. Both signs cannot hold for one pair of vectors (the coefficient
    and cos(low, -high) share the sign of <low, -high>), so the -0.878 must be cos(Delta_low, Delta_high),
    i.e. -cosine here; compare against +0.878.
    """
    shared = [name for name in delta_high if name in delta_low]
    if not shared:
        raise ValueError("displacement_metrics: the two deltas share no parameter names")
    dot = low_sq = high_sq = 0.0
    n_params = 0
    per_key = {}
    for name in shared:
        low, high = delta_low[name], delta_high[name]
        if low.shape != high.shape:
            raise ValueError(f"displacement_metrics: {name} has shape {tuple(low.shape)} vs {tuple(high.shape)}")
        d, ll, hh = -_dot64(low, high), _dot64(low, low), _dot64(high, high)
        dot, low_sq, high_sq, n_params = dot + d, low_sq + ll, high_sq + hh, n_params + low.numel()
        per_key[name] = {"low_norm": math.sqrt(ll), "high_norm": math.sqrt(hh),
                         "cosine": d / math.sqrt(ll * hh) if ll > 0 and hh > 0 else math.nan}
    low_norm, high_norm = math.sqrt(low_sq), math.sqrt(high_sq)
    return {
        "cosine": dot / (low_norm * high_norm) if low_norm > 0 and high_norm > 0 else math.nan,
        "reverse_coef": dot / high_sq if high_sq > 0 else math.nan,
        "norm_ratio": low_norm / high_norm if high_norm > 0 else math.nan,
        "low_norm": low_norm,
        "high_norm": high_norm,
        "per_key": per_key,
        "n_keys": len(shared),
        "n_params": n_params,
    }


class LogitsFromHidden:
    """[N, V] logits = hidden @ weight.T that exist one row chunk at a time: indexing rows computes them. The
    analysis functions of common/stats.py read their inputs only by row chunks (`x.reshape(-1, V)[rows]`), so this
    view gives them every scored token without ever holding [tokens x vocab]."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor):
        self.hidden, self.weight = hidden, weight                 # [N, H], [V, H] float32 on the device
        self.shape = torch.Size((hidden.shape[0], weight.shape[0]))
        self.device = hidden.device

    def reshape(self, *shape):
        return self

    def __getitem__(self, rows):
        return self.hidden[rows] @ self.weight.T


def quantiles(x: torch.Tensor) -> dict:
    x = x[~x.isnan()].double()
    if x.numel() == 0:
        return {}
    q = torch.quantile(x, torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64))
    return {"mean": float(x.mean()), **{f"p{p}": float(v) for p, v in zip((10, 25, 50, 75, 90), q)}}
