"""Per-step statistics by name: accumulate on each rank, reduce over all ranks in one place.

A training step adds many small quantities (tokens, clipped tokens, entropy sums, correct answers, ...) per
micro-batch or per generation batch, and the logged metrics are global ratios of them. `Tally` keeps the
running sums (and maxima) by name, on the device when they are tensors, so a micro-batch costs no host sync;
`reduce()` stacks them in name order and runs one all_reduce for the sums and one for the maxima.

    t = Tally(device)
    t.add(tokens=len(logp), clipped=clip.sum())          # numbers or 0-d tensors, any number of calls
    t.max(logprob_diff=diff.max())
    total = t.reduce()                                    # {'tokens': ..., 'clipped': ..., 'logprob_diff': ...}
    total.ratio('clipped', 'tokens')                      # clipped / max(tokens, 1)

Every rank must add the same names (a rank with nothing to add adds 0, as the scripts' dummy micro-batches
do): the reduction is positional, in sorted-name order. `reduce()` checks that the ranks agree on the names
and raises if they do not, rather than summing one name into another.
"""
import zlib

import torch

from common.dist import all_reduce


class Totals(dict):
    """The reduced totals: a dict name -> float with a guarded ratio."""

    def ratio(self, num: str, den: str) -> float:
        return self[num] / max(self[den], 1)


class Tally:
    def __init__(self, device=None, weight: float = 1.0):
        """device: where the running sums live; weight: multiplies every added value (0 for a rank whose
        numbers another rank already counts, e.g. the other ranks of one vLLM tensor-parallel replica)."""
        self.device = device if device is not None else torch.device("cpu")
        self.weight = weight
        self._sum: dict[str, torch.Tensor] = {}
        self._max: dict[str, torch.Tensor] = {}

    def _acc(self, store: dict, name: str, value, op):
        v = torch.as_tensor(value).to(self.device, torch.float64).reshape(())
        store[name] = v if name not in store else op(store[name], v)

    def add(self, **values):
        """Add each value to its running sum (numbers, or 0-d tensors kept on the device)."""
        for k, v in values.items():
            self._acc(self._sum, k, torch.as_tensor(v, dtype=torch.float64) * self.weight, torch.add)

    def max(self, **values):
        """Keep each name's running maximum."""
        for k, v in values.items():
            self._acc(self._max, k, v, torch.maximum)

    def local(self, name: str) -> float:
        """This rank's running value (sum or max) of one name, unreduced."""
        return float((self._sum.get(name) if name in self._sum else self._max[name]).item())

    def reduce(self) -> Totals:
        """{name: total over ranks}: sums summed, maxima maxed; one collective each (and one for the names)."""
        names_sum, names_max = sorted(self._sum), sorted(self._max)
        sig = zlib.crc32(repr((names_sum, names_max)).encode())
        agree = all_reduce([sig, -sig], "max")                  # max(sig) == -max(-sig) iff every rank has sig
        if agree[0].item() != -agree[1].item():
            raise RuntimeError(f"Tally.reduce: the ranks added different names (this rank: {names_sum} {names_max})")
        out = Totals()
        if names_sum:
            out.update(zip(names_sum, all_reduce(torch.stack([self._sum[k] for k in names_sum]).cpu()).tolist()))
        if names_max:
            out.update(zip(names_max, all_reduce(torch.stack([self._max[k] for k in names_max]).cpu(), "max").tolist()))
        return out
