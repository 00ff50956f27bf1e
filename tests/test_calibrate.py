"""common/calibrate.py: the tau at which the own-sample token entropy reaches a target (issue 20)."""
import math

import pytest
import torch

from common.calibrate import solve_tau, tempered_entropy


def reference_entropy(h, w, tau):
    """Mean token entropy of softmax(h W^T / tau), dense float64."""
    logp = ((h.double() @ w.double().T) / tau).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean().item()


def inputs(seed=0, n=300, hdim=16, vocab=200, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hdim, generator=g) * scale, torch.randn(vocab, hdim, generator=g)


def test_tempered_entropy_matches_float64_reference():
    h, w = inputs()
    entropy_at = tempered_entropy([h[:100], h[100:], h[:0]], w, chunk_size=7)
    for tau in (0.3, 1.0, 1.5, 4.0):
        assert entropy_at(tau) == pytest.approx(reference_entropy(h, w, tau), rel=1e-5)


@pytest.mark.parametrize("tau_true", [0.5, 1.0, 1.5, 3.0])
def test_the_tau_found_for_a_tempered_entropy_is_that_tau(tau_true):
    """H = the mean entropy at a known tau (float64 reference) -> solve_tau recovers that tau."""
    h, w = inputs(seed=1)
    target = reference_entropy(h, w, tau_true)
    tau = solve_tau(tempered_entropy([h], w, chunk_size=64), target, rel_tol=1e-6)
    assert tau == pytest.approx(tau_true, rel=1e-4)
    assert reference_entropy(h, w, tau) == pytest.approx(target, rel=1e-4)


def test_bisection_on_a_known_monotone_function():
    """On entropy_at(tau) = log(tau): the root of log(tau) = 0.7 is e^0.7; iterations stop at the tolerance."""
    calls = []

    def f(tau):
        calls.append(tau)
        return math.log(tau)
    assert solve_tau(f, 0.7, rel_tol=1e-8) == pytest.approx(math.exp(0.7), rel=1e-8)
    assert len(calls) < 60


def test_unreachable_targets_say_what_is_reachable():
    h, w = inputs(seed=2, vocab=50)
    entropy_at = tempered_entropy([h], w)
    with pytest.raises(ValueError, match="outside what tau"):
        solve_tau(entropy_at, math.log(50) + 0.1)         # above the uniform law's entropy
    with pytest.raises(ValueError, match="positive"):
        solve_tau(entropy_at, 0.0)
    with pytest.raises(ValueError, match="no hidden states"):
        tempered_entropy([h[:0]], w)
