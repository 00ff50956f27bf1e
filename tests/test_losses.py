"""common/losses.py against plain float64 references with full [N, V] logits and torch.autograd.

Fast tier: eager runs on small shapes, plus a handful of compiled runs (each compile costs a few seconds
on CPU), so the whole file stays well under a minute with OMP_NUM_THREADS=1.
"""

import pytest
import torch

from common import losses
from common.losses import chunked_logprob_entropy, entropy_from_hidden, fused_linear_kl

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")


# ----------------------------------------------------------------------------- references

def naive_divergence(hs, ws, ht, wt, tau, divergence, beta):
    """Per-token divergence [N] with full logits; differentiable in every input."""
    logp_s = (hs @ ws.T).log_softmax(-1)
    logp_t = ((ht @ wt.T) / tau).log_softmax(-1)
    p_s, p_t = logp_s.exp(), logp_t.exp()
    if divergence == "reverse_kl":
        return (p_s * (logp_s - logp_t)).sum(-1)
    if divergence == "forward_kl":
        return (p_t * (logp_t - logp_s)).sum(-1)
    m = (1 - beta) * p_s + beta * p_t
    return beta * (p_t * (logp_t - m.log())).sum(-1) + (1 - beta) * (p_s * (logp_s - m.log())).sum(-1)


def naive_loss(hs, ws, ht, wt, mask, tau, divergence, beta):
    div = naive_divergence(hs, ws, ht, wt, tau, divergence, beta)
    return (div * mask).sum() / mask.sum().clamp(min=1)


def make_inputs(n=37, hs_dim=16, ht_dim=24, vocab=50, dtype=torch.float64, seed=0, valid_frac=0.7):
    """Student and teacher of different hidden sizes; logits of std ~2-3, like a trained lm_head."""
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(n, hs_dim, generator=g, dtype=torch.float64)
    ws = torch.randn(vocab, hs_dim, generator=g, dtype=torch.float64) * (2.5 / hs_dim ** 0.5)
    ht = torch.randn(n, ht_dim, generator=g, dtype=torch.float64)
    wt = torch.randn(vocab, ht_dim, generator=g, dtype=torch.float64) * (2.5 / ht_dim ** 0.5)
    mask = torch.rand(n, generator=g) < valid_frac
    return [x.to(dtype) for x in (hs, ws, ht, wt)] + [mask]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300)).item()


def ours_and_reference(dtype, divergence, tau=1.5, beta=0.5, chunk_size=8, compiled=False, **kw):
    """(loss, d hs, d ws) from fused_linear_kl in `dtype` and from the float64 reference on the same values."""
    hs, ws, ht, wt, mask = make_inputs(dtype=dtype, **kw)
    hs.requires_grad_(), ws.requires_grad_()
    loss = fused_linear_kl(hs, ws, ht, wt, mask, tau=tau, divergence=divergence, beta=beta,
                           chunk_size=chunk_size, compiled=compiled)
    grads = torch.autograd.grad(loss, (hs, ws))
    ref_in = [x.detach().double().requires_grad_() for x in (hs, ws)]
    ref = naive_loss(*ref_in, ht.double(), wt.double(), mask, tau, divergence, beta)
    ref_grads = torch.autograd.grad(ref, ref_in)
    return (loss, *grads), (ref, *ref_grads)


# ----------------------------------------------------------------------------- fused_linear_kl: values and grads

@pytest.mark.parametrize("divergence", DIVERGENCES)
@pytest.mark.parametrize("tau", [0.6, 1.0, 1.5])
@pytest.mark.parametrize("valid_frac", [1.0, 0.6])
def test_kl_matches_reference_float64(divergence, tau, valid_frac):
    # n=37 and chunk 8: the last chunk is padded, with or without masked tokens
    ours, ref = ours_and_reference(torch.float64, divergence, tau=tau, beta=0.3, valid_frac=valid_frac)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-10


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kl_matches_reference_float32(divergence):
    ours, ref = ours_and_reference(torch.float32, divergence, tau=0.8, beta=0.7)
    assert [x.dtype for x in ours] == [torch.float32] * 3
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kl_bf16_within_tolerance(divergence):
    # bf16 logits (8-bit mantissa) then fp32 math: ~1% relative error on the grads, the loss is better
    ours, ref = ours_and_reference(torch.bfloat16, divergence, n=64, hs_dim=32, ht_dim=32, vocab=300)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == torch.bfloat16
    assert rel_err(ours[0], ref[0]) < 5e-3
    for a, b in zip(ours[1:], ref[1:]):
        assert rel_err(a, b) < 3e-2


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_kl_chunk_size_does_not_matter(chunk_size):
    ours, ref = ours_and_reference(torch.float64, "jsd", chunk_size=chunk_size)
    for a, b in zip(ours, ref):
        assert rel_err(a, b) < 1e-10


def test_kl_cpu_row_blocks(monkeypatch):
    # The CPU path splits each chunk into row blocks; force blocks of 2 rows on a small vocabulary.
    monkeypatch.setattr(losses, "_CPU_BLOCK_ELEMS", 2 * 50)
    assert losses._row_block(8, 50, torch.device("cpu")) == 2
    assert losses._row_block(12, 10 ** 7, torch.device("cpu")) == 1
    for divergence in DIVERGENCES:
        ours, ref = ours_and_reference(torch.float64, divergence)
        for a, b in zip(ours, ref):
            assert rel_err(a, b) < 1e-10


def test_kl_all_masked_is_zero_with_zero_grads():
    hs, ws, ht, wt, mask = make_inputs(dtype=torch.float32)
    hs.requires_grad_(), ws.requires_grad_()
    loss, stats = fused_linear_kl(hs, ws, ht, wt, torch.zeros_like(mask), chunk_size=8, compiled=False,
                                  return_stats=True)
    loss.backward()
    assert loss.item() == 0.0
    for t in (hs.grad, ws.grad, *stats.values()):
        assert torch.isfinite(t).all() and (t == 0).all()


def test_kl_teacher_gets_no_grad_and_grad_output_scales():
    hs, ws, ht, wt, mask = make_inputs()
    for x in (hs, ws, ht, wt):
        x.requires_grad_()
    loss = fused_linear_kl(hs, ws, ht, wt, mask, tau=1.5, chunk_size=8, compiled=False)
    g1 = torch.autograd.grad(loss, (hs, ws), retain_graph=True)
    (3.0 * loss).backward()
    assert ht.grad is None and wt.grad is None
    assert torch.allclose(hs.grad, 3 * g1[0]) and torch.allclose(ws.grad, 3 * g1[1])
    # no grad needed, no grad computed, no autograd graph
    with torch.no_grad():
        assert not fused_linear_kl(hs, ws, ht, wt, mask, chunk_size=8, compiled=False).requires_grad


@pytest.mark.parametrize("divergence", DIVERGENCES)
def test_kl_gradcheck(divergence):
    hs, ws, ht, wt, mask = make_inputs(n=7, hs_dim=3, ht_dim=4, vocab=6, seed=1)
    hs.requires_grad_(), ws.requires_grad_()

    def f(hs, ws):
        return fused_linear_kl(hs, ws, ht, wt, mask, tau=0.7, divergence=divergence, beta=0.4, chunk_size=3,
                               compiled=False)
    assert torch.autograd.gradcheck(f, (hs, ws))


def test_kl_stats_match_reference():
    hs, ws, _, _, mask = make_inputs()
    g = torch.Generator().manual_seed(3)  # a teacher near the student, so top-1 agrees on some tokens only
    ht = hs + 0.5 * torch.randn(hs.shape, generator=g, dtype=hs.dtype)
    wt = ws + 0.5 * torch.randn(ws.shape, generator=g, dtype=ws.dtype)
    tau = 1.5
    for divergence in DIVERGENCES:
        _, stats = fused_linear_kl(hs, ws, ht, wt, mask, tau=tau, divergence=divergence, beta=0.3,
                                   chunk_size=8, compiled=False, return_stats=True)
        assert set(stats) == set(losses.STAT_NAMES)
        assert all(s.dtype == torch.float32 and s.shape == mask.shape and not s.requires_grad for s in stats.values())
        zs, zt = hs @ ws.T, (ht @ wt.T) / tau
        logp_s, logp_t = zs.log_softmax(-1), zt.log_softmax(-1)
        expected = {
            "student_entropy": -(logp_s.exp() * logp_s).sum(-1),
            "teacher_entropy": -(logp_t.exp() * logp_t).sum(-1),
            "divergence": naive_divergence(hs, ws, ht, wt, tau, divergence, 0.3),
            "top1_agree": (zs.argmax(-1) == zt.argmax(-1)).double(),
        }
        for name, want in expected.items():
            torch.testing.assert_close(stats[name], (want * mask).float(), rtol=1e-6, atol=1e-6)
        assert 0 < stats["top1_agree"].sum() < mask.sum()  # the check above is not vacuous


def test_kl_argument_validation():
    hs, ws, ht, wt, mask = make_inputs()
    cases = [
        (dict(divergence="kl"), "divergence"),
        (dict(tau=0.0), "tau"),
        (dict(tau=-1.0), "tau"),
        (dict(divergence="jsd", beta=0.0), "beta"),
        (dict(divergence="jsd", beta=1.0), "beta"),
        (dict(chunk_size=0), "chunk_size"),
    ]
    for kwargs, word in cases:
        with pytest.raises(ValueError, match=word):
            fused_linear_kl(hs, ws, ht, wt, mask, **kwargs)
    bad_inputs = [
        ((hs[:-1], ws, ht, wt, mask), "tokens"),
        ((hs, ws[:, :-1], ht, wt, mask), "student_weight"),
        ((hs, ws, ht, wt[:, :-1], mask), "teacher_weight"),
        ((hs, ws, ht, wt[:-1], mask), "vocab"),
        ((hs, ws, ht, wt, mask[:-1]), "mask"),
        ((hs, ws, ht, wt, mask.long()), "mask"),
        ((hs[None], ws, ht, wt, mask), r"\[N, H\]"),
        ((hs, ws.float(), ht, wt, mask), "dtype"),
    ]
    for args, word in bad_inputs:
        with pytest.raises(ValueError, match=word):
            fused_linear_kl(*args)


def test_kl_compiled_matches_eager():
    # float32, every divergence, with stats: the compiled kernels against the same function run eagerly
    hs, ws, ht, wt, mask = make_inputs(dtype=torch.float32, n=45, vocab=96)
    for divergence in DIVERGENCES:
        results = []
        for compiled in (False, True):
            a, b = hs.clone().requires_grad_(), ws.clone().requires_grad_()
            loss, stats = fused_linear_kl(a, b, ht, wt, mask, tau=1.5, divergence=divergence, chunk_size=16,
                                          compiled=compiled, return_stats=True)
            results.append((loss, *torch.autograd.grad(loss, (a, b)), *stats.values()))
        for x, y in zip(*results):
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- chunked_logprob_entropy

def logprob_reference(h, w, targets, temperature):
    logp = ((h @ w.T) / temperature).log_softmax(-1)
    return logp.gather(1, targets[:, None]).squeeze(1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.3])
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_logprob_entropy_matches_reference(temperature, dtype, tol):
    hs, ws, _, _, _ = make_inputs(dtype=dtype)
    targets = torch.randint(0, ws.shape[0], (hs.shape[0],), generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(hs.shape[0], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    logprobs, entropy = chunked_logprob_entropy(h, w, targets, temperature=temperature, chunk_size=8,
                                                compiled=False)
    assert not entropy.requires_grad and logprobs.requires_grad
    grads = torch.autograd.grad((logprobs * upstream.to(logprobs.dtype)).sum(), (h, w))
    assert grads[0].dtype == grads[1].dtype == dtype
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref_lp, ref_ent = logprob_reference(h64, w64, targets, temperature)
    ref_grads = torch.autograd.grad((ref_lp * upstream).sum(), (h64, w64))
    assert rel_err(logprobs, ref_lp) < tol and rel_err(entropy, ref_ent) < tol
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < tol
    torch.testing.assert_close(entropy_from_hidden(hs, ws, temperature, chunk_size=8, compiled=False), entropy)


def test_logprob_bf16_and_row_blocks(monkeypatch):
    monkeypatch.setattr(losses, "_CPU_BLOCK_ELEMS", 2 * 300)  # 2-row blocks in each 8-row chunk
    hs, ws, _, _, _ = make_inputs(n=64, hs_dim=32, vocab=300, dtype=torch.bfloat16)
    targets = torch.randint(0, 300, (64,), generator=torch.Generator().manual_seed(0))
    h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    logprobs, entropy = chunked_logprob_entropy(h, w, targets, temperature=1.2, chunk_size=8, compiled=False)
    grads = torch.autograd.grad(logprobs.sum(), (h, w))
    assert logprobs.dtype == torch.float32 and grads[1].dtype == torch.bfloat16
    h64, w64 = hs.double().requires_grad_(), ws.double().requires_grad_()
    ref_lp, ref_ent = logprob_reference(h64, w64, targets, 1.2)
    ref_grads = torch.autograd.grad(ref_lp.sum(), (h64, w64))
    assert rel_err(logprobs, ref_lp) < 1e-2 and rel_err(entropy, ref_ent) < 1e-2
    for a, b in zip(grads, ref_grads):
        assert rel_err(a, b) < 3e-2


def test_logprob_gradcheck():
    hs, ws, _, _, _ = make_inputs(n=7, hs_dim=3, vocab=6, seed=2)
    targets = torch.tensor([0, 5, 2, 2, 1, 3, 4])
    f = lambda h, w: chunked_logprob_entropy(h, w, targets, temperature=0.8, chunk_size=3, compiled=False)[0]
    assert torch.autograd.gradcheck(f, (hs.requires_grad_(), ws.requires_grad_()))


def test_logprob_compiled_matches_eager():
    hs, ws, _, _, _ = make_inputs(dtype=torch.float32, n=45, vocab=96)
    targets = torch.randint(0, 96, (45,), generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(45, generator=torch.Generator().manual_seed(1))
    results = []
    for compiled in (False, True):
        h, w = hs.clone().requires_grad_(), ws.clone().requires_grad_()
        lp, ent = chunked_logprob_entropy(h, w, targets, temperature=1.3, chunk_size=16, compiled=compiled)
        results.append((lp, ent, *torch.autograd.grad((lp * upstream).sum(), (h, w))))
    for x, y in zip(*results):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


def test_logprob_argument_validation():
    hs, ws, _, _, _ = make_inputs()
    targets = torch.zeros(hs.shape[0], dtype=torch.long)
    for kwargs, word in [(dict(temperature=0.0), "temperature"), (dict(chunk_size=-1), "chunk_size")]:
        with pytest.raises(ValueError, match=word):
            chunked_logprob_entropy(hs, ws, targets, **kwargs)
    with pytest.raises(ValueError, match="targets"):
        chunked_logprob_entropy(hs, ws, targets[:-1])
    with pytest.raises(ValueError, match="weight"):
        chunked_logprob_entropy(hs, ws.T, targets)


def test_kl_loss_scale_equals_scaling_the_loss():
    """loss_scale (reheat's per-micro-batch weight, applied in forward) == multiplying the returned loss."""
    hs, ws, ht, wt, mask = make_inputs()
    hs.requires_grad_(), ws.requires_grad_()
    ref = 0.37 * fused_linear_kl(hs, ws, ht, wt, mask, tau=1.5, chunk_size=8, compiled=False)
    g_ref = torch.autograd.grad(ref, (hs, ws))
    got = fused_linear_kl(hs, ws, ht, wt, mask, tau=1.5, chunk_size=8, compiled=False, loss_scale=0.37)
    g = torch.autograd.grad(got, (hs, ws))
    torch.testing.assert_close(got, ref)
    for a, b in zip(g, g_ref):
        torch.testing.assert_close(a, b)
