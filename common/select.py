"""Token selections over a whole mini-batch, on all ranks: the plumbing behind rl_dapo's Clip-Cov, KL-Cov and
high-entropy (80/20) options.

Those remedies pick tokens by a statistic of the whole batch: the top-k covariance tokens, a random sample of
the tokens in a covariance band, the tokens above an entropy quantile. verl and TRL compute that statistic per
GPU micro-batch, so the tokens chosen (and the update) change with the micro-batch size and the number of GPUs.
Here the selection set is the optimizer step's whole mini-batch on every rank, and every token has a global
id (its sequence's index in the step's batch and its position in the response), so the same tokens are chosen
however the sequences were dealt to ranks and micro-batches. Ties are broken by the global id.

    token_ids(idx, n_resp, offsets)   the global ids of a rank's tokens, in its sequences' order
    global_top_k(scores, ids, k)      bool mask of this rank's tokens among the k largest scores of all ranks
    global_quantile(values, q)        the q-quantile (linear interpolation, as torch.quantile) of all ranks' values

Cheap by construction: the top-k gathers only each rank's own k best (k = ratio x tokens, ~2e-4 of them);
the quantile gathers the values themselves (one float per token of the mini-batch, on the CPU).
"""
import torch

from common.dist import all_gather_objects


def token_ids(idx: list[int], n_resp: list[int], offsets: list[int]) -> torch.Tensor:
    """Global ids of the response tokens of sequences `idx` (concatenated in that order): offsets[i] + t."""
    if not idx:
        return torch.zeros(0, dtype=torch.long)
    return torch.cat([torch.arange(n_resp[i], dtype=torch.long) + offsets[i] for i in idx])


def _order(scores: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Indices sorting by score descending, then id ascending (a total order: ids are unique)."""
    by_id = torch.argsort(ids, stable=True)
    return by_id[torch.argsort(-scores[by_id], stable=True)]


def global_top_k(scores: torch.Tensor, ids: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask over this rank's tokens: those among the k largest `scores` of all ranks (ties: lower global
    id first). scores, ids: [n] on any device. Each rank sends only its own best k."""
    k = max(int(k), 0)
    s, i = scores.detach().double().cpu(), ids.cpu()
    best = _order(s, i)[:k]
    parts = all_gather_objects((s[best], i[best]))
    all_s, all_i = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
    chosen = all_i[_order(all_s, all_i)[:k]]
    return torch.isin(i, chosen).to(scores.device)


def global_quantile(values: torch.Tensor, q: float) -> float:
    """The q-quantile of the values of all ranks, linearly interpolated between order statistics as
    torch.quantile does (TRL's get_high_entropy_mask uses torch.quantile on the gathered entropies); computed
    by sorting, so it has no input-size limit. NaN when no rank has a value."""
    allv = torch.cat([p for p in all_gather_objects(values.detach().double().cpu())])
    if allv.numel() == 0:
        return float("nan")
    s = torch.sort(allv).values
    pos = q * (s.numel() - 1)
    lo = int(pos)
    hi = min(lo + 1, s.numel() - 1)
    return float(s[lo] + (pos - lo) * (s[hi] - s[lo]))


def uniform_keys(idx: list[int], n_resp: list[int], seed: int) -> torch.Tensor:
    """Uniform [0, 1) float64 numbers for the response tokens of sequences idx (concatenated), a function of
    (seed, sequence index, position) only: a token gets the same key on whichever rank and micro-batch it lands
    (Clip-Cov's random choice then does not depend on the partition)."""
    from common.dist import derive_seed
    if not idx:
        return torch.zeros(0, dtype=torch.float64)
    return torch.cat([torch.rand(n_resp[i], generator=torch.Generator().manual_seed(derive_seed(seed, i)),
                                 dtype=torch.float64) for i in idx])
