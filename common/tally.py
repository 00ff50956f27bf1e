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
        self._sum: dict = {}           # name -> float or float64 0-d tensor
        self._max: dict = {}

    def add(self, **values):
        """Add each value to its running sum: Python numbers stay Python numbers (no tensor op per call), 0-d
        tensors stay on their device (no host sync)."""
        for k, v in values.items():
            if isinstance(v, torch.Tensor):
                v = v.to(self.device, torch.float64)    # summed in float64, whatever the value's dtype
            v = v * self.weight
            self._sum[k] = self._sum[k] + v if k in self._sum else v

    def max(self, **values):
        """Keep each name's running maximum."""
        for k, v in values.items():
            if k not in self._max:
                self._max[k] = v
            elif isinstance(v, torch.Tensor) or isinstance(self._max[k], torch.Tensor):
                self._max[k] = torch.maximum(torch.as_tensor(self._max[k], dtype=torch.float64, device=self.device),
                                             torch.as_tensor(v, dtype=torch.float64, device=self.device))
            else:
                self._max[k] = max(self._max[k], v)

    def _stack(self, store: dict, names: list) -> torch.Tensor:
        return torch.stack([torch.as_tensor(store[k], dtype=torch.float64, device=self.device).reshape(())
                            for k in names]).cpu()

    def reduce(self) -> Totals:
        """{name: total over ranks}: sums summed, maxima maxed; two collectives, the second also checking that
        every rank added the same names (a signature and its negative ride along with the maxima)."""
        names_sum, names_max = sorted(self._sum), sorted(self._max)
        sig = float(zlib.crc32(repr((names_sum, names_max)).encode()))
        sums = all_reduce(self._stack(self._sum, names_sum)) if names_sum else torch.zeros(0)
        maxes = all_reduce(torch.cat([self._stack(self._max, names_max) if names_max else torch.zeros(0, dtype=torch.float64),
                                      torch.tensor([sig, -sig], dtype=torch.float64)]), "max")
        if maxes[-2].item() != -maxes[-1].item():                # max(sig) == -max(-sig) iff every rank has sig
            raise RuntimeError(f"Tally.reduce: the ranks added different names (this rank: {names_sum} {names_max})")
        out = Totals(zip(names_sum, sums.tolist()))
        out.update(zip(names_max, maxes[:-2].tolist()))
        return out
