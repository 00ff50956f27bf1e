"""Entropy-calibrated temperature: the tau at which a model's own-sample token entropy reaches a target.

The paper reheats with tau = 1.5, a value chosen for Qwen3; for another model (or the demo's tiny one) the same tau
may barely reheat or overshoot the entropy the collapse took away. What TS-OPSD restores is an entropy, so the
natural knob is the entropy: given the collapsed model's final hidden states h at the response positions of its own
samples, the mean token entropy of softmax(h W^T / tau) is increasing in tau (each distribution's entropy is,
for non-constant logits), and a bisection in log tau finds the tau that gives a target H. No training, a few dozen
chunked entropy passes over the stored hidden states (never [tokens x vocab]).

    entropy_at = tempered_entropy(hiddens, weight, chunk_size=1024)     # tau -> mean entropy over all ranks
    tau = solve_tau(entropy_at, target=0.13)

The same tau serves the closed form (final norm / tau) and TS-OPSD's teacher softmax(z / tau), and, read as a
sampling temperature, the rollout temperature whose sampling law has that entropy.
"""
import math

import torch

from common.dist import all_reduce
from common.losses import entropy_from_hidden


def tempered_entropy(hiddens: list[torch.Tensor], weight: torch.Tensor, *, chunk_size: int = 1024,
                     compiled: bool = False):
    """tau -> mean over every row of `hiddens` (all ranks) of the entropy of softmax(h W^T / tau), float64.
    hiddens: [N_i, H] tensors (final hidden states at response positions); weight [V, H] (the lm_head)."""
    count = all_reduce([sum(h.shape[0] for h in hiddens)])[0].item()
    if count == 0:
        raise ValueError("no hidden states to calibrate on (no response tokens sampled)")

    def entropy_at(tau: float) -> float:
        total = sum(float(entropy_from_hidden(h.to(weight.device, weight.dtype), weight, tau, chunk_size=chunk_size,
                                              compiled=compiled).double().sum()) for h in hiddens if h.shape[0])
        return all_reduce([total])[0].item() / count
    return entropy_at


def solve_tau(entropy_at, target: float, *, lo: float = 0.05, hi: float = 20.0, rel_tol: float = 1e-4,
              max_iter: int = 60) -> float:
    """The tau in [lo, hi] with entropy_at(tau) = target (entropy_at increasing), by bisection in log tau until
    the bracket's ratio is within 1 + rel_tol. Raises ValueError with the reachable range when the target is
    outside [entropy_at(lo), entropy_at(hi)]."""
    if not (math.isfinite(target) and target > 0):
        raise ValueError(f"target entropy must be a positive number of nats, got {target}")
    e_lo, e_hi = entropy_at(lo), entropy_at(hi)
    if not e_lo <= target <= e_hi:
        raise ValueError(f"target entropy {target:.4g} nats is outside what tau in [{lo}, {hi}] reaches "
                         f"([{e_lo:.4g}, {e_hi:.4g}] on these samples)")
    a, b = math.log(lo), math.log(hi)
    for _ in range(max_iter):
        if b - a <= math.log1p(rel_tol):
            break
        mid = (a + b) / 2
        if entropy_at(math.exp(mid)) < target:
            a = mid
        else:
            b = mid
    return math.exp((a + b) / 2)
