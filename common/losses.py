"""Chunked fused-linear losses over the full vocabulary: never hold [N, V] logits.

Why this exists: Qwen3's vocabulary has 151,936 entries, so the fp32 logits of one 16k-token micro-batch
are 16384 * 151936 * 4 B ~ 10 GB, and autograd keeps several tensors of that size alive (logits,
log-softmax, probabilities, their grads). Both losses below walk over the tokens in chunks of
`chunk_size` rows, build that chunk's logits from the final hidden states and the lm_head weight, reduce
them to what is needed, and drop them: the peak is a few [chunk_size, V] buffers instead of [N, V].

    fused_linear_kl           TS-OPSD distillation: divergence between the student softmax(z_s) and the
                              temperature-scaled self-teacher softmax(z_t / tau), mean over masked
                              tokens, with per-token diagnostics (entropies, divergence, top-1 agreement)
                              from the same pass.
    chunked_logprob_entropy   the RL trainer's log pi(target) (with gradient) and token entropy (optionally
                              with gradient: the entropy bonus).
    entropy_from_hidden       token entropy only, e.g. to monitor reheating or stop at a target entropy.

The per-chunk math lives in plain functions that run either compiled with torch.compile (dynamic=False:
every call has the same static shape, the last chunk is padded) or eagerly: `compiled=False` calls the very
same Python function, so the two can be tested against each other. Matmuls stay outside the compiled
region (they are library GEMMs either way); what compilation buys is fusing the softmax passes. On CPU the
elementwise math runs on cache-sized row blocks of each chunk (see _row_block).

The distillation loss computes its gradients during the forward pass, chunk by chunk (as Liger-Kernel's
fused linear losses do) and keeps only d hidden [N, H] and d weight [V, H]: the loss is a scalar, so its
backward only rescales them by grad_output. The log-prob function cannot do that (its output is per-token
and the upstream gradient is only known in backward), so it saves each token's logsumexp and recomputes
the chunk logits in backward: one extra GEMM, no extra memory.
"""
import math
import warnings

import torch

DIVERGENCES = ("reverse_kl", "forward_kl", "jsd")
STAT_NAMES = ("student_entropy", "teacher_entropy", "divergence", "top1_agree")


# ----------------------------------------------------------------------------- helpers

def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Softmax and accumulation dtype: fp32 for bf16/fp16 inputs, the input's own dtype for fp32/fp64."""
    return torch.promote_types(dtype, torch.float32)


_ADDMM_OUT_DTYPE = "unchecked"   # torch.addmm(..., out_dtype=fp32, out=grad_w): checked on first use (CUDA only)


def _accumulate_weight_grad(grad_w: torch.Tensor, dz: torch.Tensor, h: torch.Tensor) -> None:
    """grad_w [V, H] += dz.T [V, C] @ h [C, H], with grad_w in the accumulation dtype."""
    if dz.dtype == grad_w.dtype:
        grad_w.addmm_(dz.T, h)  # in place: no [V, H] temporary per chunk
    elif dz.is_cuda:
        global _ADDMM_OUT_DTYPE
        if _ADDMM_OUT_DTYPE:   # bf16 GEMM accumulated in place into the fp32 buffer: no [V, H] temporary per chunk
            # checked once per process against the out-of-place form (no GPU has run this code yet)
            ref = grad_w + torch.mm(dz.T, h, out_dtype=grad_w.dtype) if _ADDMM_OUT_DTYPE == "unchecked" else None
            try:
                torch.addmm(grad_w, dz.T, h, out_dtype=grad_w.dtype, out=grad_w)
                if ref is not None:
                    ok = torch.allclose(grad_w, ref, rtol=1e-4, atol=1e-6)
                    if not ok:
                        raise RuntimeError("result differs from mm + add_")
                    _ADDMM_OUT_DTYPE = True
                return
            except (RuntimeError, TypeError) as e:    # not on this build/GPU: the temporary, once per chunk
                _ADDMM_OUT_DTYPE = False
                warnings.warn(f"in-place mixed-dtype addmm unavailable ({e}); the weight gradient of the chunked "
                              f"head uses an fp32 [V, H] temporary per chunk")
                if ref is not None:                   # addmm may have written part of grad_w
                    grad_w.copy_(ref)
                    return
        grad_w.add_(torch.mm(dz.T, h, out_dtype=grad_w.dtype))  # bf16 GEMM, fp32 output, no rounding
    else:
        grad_w.add_(torch.mm(dz.T, h))  # CPU has no mixed-dtype GEMM: one bf16 rounding per chunk


# On CPU, inductor's C++ kernels sweep their whole input once per reduction (max, sum of exp, divergence,
# gradient), so a [256, 151936] fp32 chunk (155 MB) would stream from DRAM four or five times. The elementwise
# math is therefore run on row blocks of about this many elements, which stay in cache: ~2x faster there.
_CPU_BLOCK_ELEMS = 1 << 21


def _row_block(chunk_size: int, vocab: int, device: torch.device) -> int:
    """Rows per call of the elementwise math: a divisor of chunk_size (static shapes); all of it on GPU."""
    if device.type != "cpu":
        return chunk_size
    target = max(1, _CPU_BLOCK_ELEMS // vocab)
    return max(d for d in range(1, min(chunk_size, target) + 1) if chunk_size % d == 0)


def _maybe_compile(fn):
    """torch.compile lazily (nothing is compiled before the first call), static shapes."""
    return torch.compile(fn, dynamic=False)


# ----------------------------------------------------------------------------- distillation: per-chunk math

def _log_softmax(z):
    """log_softmax over the last dim for finite z; torch.logsumexp's inf/nan guards cost a pass we don't need."""
    m = z.amax(-1, keepdim=True)
    return z - (m + (z - m).exp().sum(-1, keepdim=True).log())


def _distill_chunk_(z_s, z_t, row_weight, inv_tau: float, divergence: str, beta: float, with_stats: bool):
    """One block of rows of the TS-OPSD divergence; overwrites z_s with d(loss)/d(z_s).

    z_s [R, V] student logits, z_t [R, V] raw teacher logits (before 1/tau), row_weight [R, 1] = 1 for real
    tokens and 0 for the padding rows of the last chunk (the 1/n_valid of the mean is applied to the
    accumulated gradients at the end: scaling here would push bf16/fp16 gradients toward underflow).
    Writing the gradient into z_s's buffer saves one [R, V] allocation per call.
    Returns (sum of the real rows' divergences, stats tuple or None).
    """
    zs = z_s.to(row_weight.dtype)  # [R, V], fp32 math for bf16 inputs
    zt = z_t.to(row_weight.dtype) * inv_tau  # [R, V]
    logp_s, logp_t = _log_softmax(zs), _log_softmax(zt)
    p_s = logp_s.exp()
    p_t = None
    # d(div)/d(z_s): the softmax Jacobian turns d(div)/d(p_s) = g into p_s * (g - sum(p_s * g)).
    if divergence == "reverse_kl":  # KL(p_s || p_t), mode-seeking
        log_ratio = logp_s - logp_t
        div = (p_s * log_ratio).sum(-1, keepdim=True)  # [R, 1]
        grad = p_s * (log_ratio - div)  # g = log(p_s/p_t) + 1, the +1 cancels
    elif divergence == "forward_kl":  # KL(p_t || p_s), mass-covering
        p_t = logp_t.exp()
        div = (p_t * (logp_t - logp_s)).sum(-1, keepdim=True)
        grad = p_s - p_t
    else:  # generalised JSD with M = (1 - beta) p_s + beta p_t
        p_t = logp_t.exp()
        # log M as a two-term logsumexp of the weighted log-probs, max + log1p(exp(-|a - b|)): finite even
        # where p_s and p_t both underflow to 0 (log of the mixture would give -inf and 0 * inf = nan).
        a, b = logp_s + math.log(1.0 - beta), logp_t + math.log(beta)
        log_m = torch.maximum(a, b) + (-(a - b).abs()).exp().log1p()
        kl_s = (p_s * (logp_s - log_m)).sum(-1, keepdim=True)  # KL(p_s || M)
        kl_t = (p_t * (logp_t - log_m)).sum(-1, keepdim=True)  # KL(p_t || M)
        div = beta * kl_t + (1.0 - beta) * kl_s
        grad = (1.0 - beta) * p_s * (logp_s - log_m - kl_s)  # g = (1-beta) log(p_s/M): the rest cancels
    stats = None
    if with_stats:
        p_t = logp_t.exp() if p_t is None else p_t
        stats = (
            -(p_s * logp_s).sum(-1),  # student_entropy
            -(p_t * logp_t).sum(-1),  # teacher_entropy (of softmax(z_t / tau))
            div.squeeze(-1),
            (zs.argmax(-1) == zt.argmax(-1)).to(row_weight.dtype),  # top1_agree
        )
    # Last: zs may alias z_s (same dtype), and everything above must read the logits, not the gradient.
    z_s.copy_(grad * row_weight)
    return (div * row_weight).sum(), stats


_distill_chunk_compiled = _maybe_compile(_distill_chunk_)


class FusedLinearKL(torch.autograd.Function):
    """Chunked divergence between softmax(h_s W_s^T) and softmax(h_t W_t^T / tau); see fused_linear_kl."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, mask,
                tau, divergence, beta, chunk_size, compiled, return_stats, need_dh, need_dw, loss_scale):
        n_tokens, vocab = student_hidden.shape[0], student_weight.shape[0]
        dtype, device = student_hidden.dtype, student_hidden.device
        acc = _acc_dtype(dtype)
        chunk_fn = _distill_chunk_compiled if compiled else _distill_chunk_

        # Only valid tokens are computed: gather them into dense chunks, so masked prompt tokens (or whole
        # masked sequences) cost nothing. The single host sync here also gives the static chunk count.
        valid_idx = mask.nonzero().squeeze(1)  # [n_valid]
        n_valid = valid_idx.numel()
        n_chunks = -(-n_valid // chunk_size)
        n_rows = n_chunks * chunk_size
        # Pad the last chunk with copies of a real row (finite logits) that get weight 0.
        rows_all = torch.cat([valid_idx, valid_idx[:1].expand(n_rows - n_valid)]) if n_valid else valid_idx
        row_weight = torch.zeros(n_rows, 1, dtype=acc, device=device)
        row_weight[:n_valid] = 1.0

        grad_h = torch.zeros_like(student_hidden) if need_dh else None
        grad_w = torch.zeros(student_weight.shape, dtype=acc, device=device) if need_dw else None
        loss = torch.zeros((), dtype=acc, device=device)
        stats = torch.zeros(len(STAT_NAMES), n_rows, dtype=acc, device=device) if return_stats else None
        # Reused across chunks: the only [C, V] buffers we allocate ourselves.
        z_s = torch.empty(chunk_size, vocab, dtype=dtype, device=device)
        z_t = torch.empty(chunk_size, vocab, dtype=teacher_hidden.dtype, device=device)
        block = _row_block(chunk_size, vocab, device)

        for c in range(n_chunks):
            c0 = c * chunk_size
            rows = rows_all[c0:c0 + chunk_size]  # [C]
            h_s = student_hidden.index_select(0, rows)  # [C, Hs]
            torch.mm(h_s, student_weight.T, out=z_s)
            torch.mm(teacher_hidden.index_select(0, rows), teacher_weight.T, out=z_t)
            for r in range(0, chunk_size, block):
                block_loss, block_stats = chunk_fn(z_s[r:r + block], z_t[r:r + block],
                                                   row_weight[c0 + r:c0 + r + block],
                                                   1.0 / tau, divergence, beta, return_stats)
                loss += block_loss
                if return_stats:
                    stats[:, c0 + r:c0 + r + block] = torch.stack(block_stats)
            dz = z_s  # now holds d(loss)/d(z_s) [C, V]
            if need_dh:
                n_real = min(chunk_size, n_valid - c0)
                grad_h.index_copy_(0, rows[:n_real], (dz @ student_weight)[:n_real])
            if need_dw:
                _accumulate_weight_grad(grad_w, dz, h_s)

        inv_n = loss_scale / max(n_valid, 1)  # mean over valid tokens, times the caller's weight
        loss *= inv_n
        if need_dh:
            grad_h *= inv_n
        if need_dw:
            grad_w = grad_w.mul_(inv_n).to(student_weight.dtype)  # no copy for fp32/fp64
        ctx.save_for_backward(grad_h, grad_w)
        if not return_stats:
            return loss
        stats_full = torch.zeros(len(STAT_NAMES), n_tokens, dtype=torch.float32, device=device)
        stats_full[:, valid_idx] = stats[:, :n_valid].float()
        stats_full = stats_full.unbind(0)
        ctx.mark_non_differentiable(*stats_full)
        return (loss, *stats_full)

    @staticmethod
    def backward(ctx, grad_loss, *unused_stat_grads):
        grad_h, grad_w = ctx.saved_tensors
        # The loss is a scalar, so the chunked forward already did all the work: rescale. Skipping the
        # multiply when grad_loss == 1 (the usual loss.backward()) avoids a second [V, H] buffer; a caller that
        # weighs the loss (reheat_tsopsd.py, per micro-batch) passes `loss_scale` instead, applied in forward.
        if not torch.equal(grad_loss, torch.ones_like(grad_loss)):
            grad_h = grad_h * grad_loss if grad_h is not None else None
            grad_w = grad_w * grad_loss if grad_w is not None else None
        return grad_h, grad_w, None, None, None, None, None, None, None, None, None, None, None, None


def fused_linear_kl(student_hidden, student_weight, teacher_hidden, teacher_weight, mask, *, tau=1.0,
                    divergence="reverse_kl", beta=0.5, chunk_size=256, compiled=True, return_stats=False,
                    loss_scale=1.0):
    """Mean per-token divergence between the student and the temperature-scaled teacher, never holding [N, V].

    student_hidden [N, Hs], student_weight [V, Hs]: z_s = student_hidden @ student_weight.T, p_s = softmax(z_s)
    teacher_hidden [N, Ht], teacher_weight [V, Ht]: z_t = teacher_hidden @ teacher_weight.T / tau,
        p_t = softmax(z_t). Treated as constants (no gradient, even if they require grad).
    mask [N] bool: tokens that count (response tokens); the loss is the mean over them, and 0 with zero
        gradients when there are none.
    loss_scale: the loss (and its gradients, computed in forward) multiplied by this; the same as scaling the
        returned loss, without the [V, H] buffer a scaled backward allocates.
    divergence:
        "reverse_kl"  KL(p_s || p_t) = sum_v p_s (log p_s - log p_t)  (TS-OPSD default)
        "forward_kl"  KL(p_t || p_s)
        "jsd"         beta KL(p_t || M) + (1 - beta) KL(p_s || M), M = (1 - beta) p_s + beta p_t, beta in (0, 1)
    chunk_size: tokens per chunk; the peak extra memory is a few [chunk_size, V] buffers plus d weight.
    compiled: run the per-chunk math through torch.compile (False: the same function, eagerly).
    return_stats: also return a dict of detached float32 [N] per-token diagnostics from the same pass:
        student_entropy, teacher_entropy (of the tau-scaled teacher), divergence, top1_agree
        (argmax z_s == argmax z_t as 0/1); masked tokens read 0.

    Gradients flow to student_hidden and student_weight only. bf16 inputs: logits come out of bf16 GEMMs,
    the softmax math and d weight accumulation are fp32, gradients are returned in the input dtype.
    """
    if divergence not in DIVERGENCES:
        raise ValueError(f"divergence must be one of {DIVERGENCES}, got {divergence!r}")
    if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    if divergence == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"beta must be in (0, 1) for jsd, got {beta!r}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if student_hidden.dim() != 2 or teacher_hidden.dim() != 2:
        raise ValueError(f"hidden states must be [N, H], got student {tuple(student_hidden.shape)} "
                         f"and teacher {tuple(teacher_hidden.shape)}")
    n_tokens = student_hidden.shape[0]
    if teacher_hidden.shape[0] != n_tokens:
        raise ValueError(f"student and teacher hidden states must have the same number of tokens, got "
                         f"{n_tokens} and {teacher_hidden.shape[0]}")
    if student_weight.dim() != 2 or student_weight.shape[1] != student_hidden.shape[1]:
        raise ValueError(f"student_weight must be [V, {student_hidden.shape[1]}], got {tuple(student_weight.shape)}")
    if teacher_weight.dim() != 2 or teacher_weight.shape[1] != teacher_hidden.shape[1]:
        raise ValueError(f"teacher_weight must be [V, {teacher_hidden.shape[1]}], got {tuple(teacher_weight.shape)}")
    if teacher_weight.shape[0] != student_weight.shape[0]:
        raise ValueError(f"student and teacher vocabularies differ: {student_weight.shape[0]} vs "
                         f"{teacher_weight.shape[0]}")
    if mask.dtype != torch.bool or mask.shape != (n_tokens,):
        raise ValueError(f"mask must be a bool tensor of shape ({n_tokens},), got {mask.dtype} {tuple(mask.shape)}")
    if len({t.device for t in (student_hidden, student_weight, teacher_hidden, teacher_weight, mask)}) != 1:
        raise ValueError("all inputs must be on one device")
    if student_weight.dtype != student_hidden.dtype or teacher_weight.dtype != teacher_hidden.dtype:
        raise ValueError("each hidden/weight pair must share a dtype, got student "
                         f"{student_hidden.dtype}/{student_weight.dtype}, teacher {teacher_hidden.dtype}/{teacher_weight.dtype}")

    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and student_hidden.requires_grad
    need_dw = grad_on and student_weight.requires_grad
    out = FusedLinearKL.apply(student_hidden, student_weight, teacher_hidden.detach(), teacher_weight.detach(), mask,
                              float(tau), divergence, float(beta), chunk_size, compiled, return_stats,
                              need_dh, need_dw, float(loss_scale))
    if not return_stats:
        return out
    loss, *stats = out
    return loss, dict(zip(STAT_NAMES, stats))


# ----------------------------------------------------------------------------- log-probs and entropy: per-chunk math

def _logprob_entropy_chunk(z, targets, inv_temp: float):
    """z [R, V] logits (before temperature), targets [R] -> (logprob [R], entropy [R], logsumexp [R]), fp32+."""
    zf = z.to(_acc_dtype(z.dtype)) * inv_temp
    m = zf.amax(-1, keepdim=True)
    lse = m + (zf - m).exp().sum(-1, keepdim=True).log()  # [R, 1]
    logp = zf - lse
    logprob = logp.gather(1, targets[:, None]).squeeze(1)
    entropy = -(logp.exp() * logp).sum(-1)  # not lse - sum(p z), which cancels badly for peaked p
    return logprob, entropy, lse.squeeze(1)


def _logprob_grad_chunk_(z, targets, lse, grad_logprob, inv_temp: float):
    """Overwrites z [R, V] with d(sum_i g_i log p_i(target_i))/d(logits) = g * (onehot - p) / temperature."""
    zf = z.to(lse.dtype) * inv_temp
    p = (zf - lse[:, None]).exp()
    onehot = torch.arange(z.shape[1], device=z.device) == targets[:, None]  # fuses; scatter_ would materialise
    z.copy_((onehot.to(p.dtype) - p) * (grad_logprob * inv_temp)[:, None])


def _logprob_entropy_grad_chunk_(z, targets, lse, entropy, grad_logprob, grad_entropy, inv_temp: float):
    """As _logprob_grad_chunk_, plus the entropy's gradient: with p = softmax(z / T) and H = -sum p log p,
    dH/dz = -p (log p + H) / T, so z becomes (g_lp (onehot - p) - g_H p (log p + H)) / T."""
    zf = z.to(lse.dtype) * inv_temp
    logp = zf - lse[:, None]
    p = logp.exp()
    onehot = torch.arange(z.shape[1], device=z.device) == targets[:, None]
    z.copy_(((onehot.to(p.dtype) - p) * grad_logprob[:, None] - p * (logp + entropy[:, None]) * grad_entropy[:, None])
            * inv_temp)


_logprob_entropy_chunk_compiled = _maybe_compile(_logprob_entropy_chunk)
_logprob_grad_chunk_compiled = _maybe_compile(_logprob_grad_chunk_)
_logprob_entropy_grad_chunk_compiled = _maybe_compile(_logprob_entropy_grad_chunk_)


def _pad_rows(x: torch.Tensor, n_rows: int) -> torch.Tensor:
    """x zero-padded to n_rows rows, so every compiled call sees one static shape."""
    if x.shape[0] == n_rows:
        return x
    return torch.cat([x, x.new_zeros(n_rows - x.shape[0], *x.shape[1:])])


class ChunkedLogprobEntropy(torch.autograd.Function):
    """log softmax(h W^T / T)[target] with gradient, entropy with or without; see chunked_logprob_entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature, chunk_size, compiled, entropy_grad):
        n_tokens, vocab = hidden.shape[0], weight.shape[0]
        acc, device = _acc_dtype(hidden.dtype), hidden.device
        fwd_fn = _logprob_entropy_chunk_compiled if compiled else _logprob_entropy_chunk
        n_rows = -(-n_tokens // chunk_size) * chunk_size
        targets = _pad_rows(targets, n_rows)
        out = torch.empty(3, n_rows, dtype=acc, device=device)  # logprob, entropy, logsumexp
        z = torch.empty(chunk_size, vocab, dtype=hidden.dtype, device=device)  # reused [C, V]
        block = _row_block(chunk_size, vocab, device)
        for c0 in range(0, n_rows, chunk_size):
            torch.mm(_pad_rows(hidden[c0:c0 + chunk_size], chunk_size), weight.T, out=z)
            for r in range(0, chunk_size, block):
                a, b = c0 + r, c0 + r + block
                out[:, a:b] = torch.stack(fwd_fn(z[r:r + block], targets[a:b], 1.0 / temperature))
        logprobs, entropy, lse, ent_rows = out[0, :n_tokens].clone(), out[1, :n_tokens].clone(), out[2], out[1]
        ctx.save_for_backward(hidden, weight, targets, lse, ent_rows)
        ctx.temperature, ctx.chunk_size, ctx.compiled = temperature, chunk_size, compiled
        ctx.set_materialize_grads(False)     # an unused output (usually the entropy) gets no zero-filled grad
        if not entropy_grad:
            ctx.mark_non_differentiable(entropy)
        return logprobs, entropy

    @staticmethod
    def backward(ctx, grad_logprobs, grad_entropy):
        hidden, weight, targets, lse, ent_rows = ctx.saved_tensors  # targets, lse, entropies padded to n_rows
        need_dh, need_dw = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunk_size, n_tokens, n_rows = ctx.chunk_size, hidden.shape[0], lse.shape[0]
        grad_h = torch.empty_like(hidden) if need_dh else None
        grad_w = torch.zeros(weight.shape, dtype=lse.dtype, device=weight.device) if need_dw else None
        # zero upstream gradient on the padding rows makes their dz exactly 0
        grad_logprobs = _pad_rows(grad_logprobs.to(lse.dtype), n_rows) if grad_logprobs is not None else \
            torch.zeros(n_rows, dtype=lse.dtype, device=lse.device)
        if grad_entropy is None:      # the RL loss without an entropy term: the one-term kernel
            grad_fn = _logprob_grad_chunk_compiled if ctx.compiled else _logprob_grad_chunk_
            extra = ()
        else:
            grad_fn = _logprob_entropy_grad_chunk_compiled if ctx.compiled else _logprob_entropy_grad_chunk_
            extra = (_pad_rows(grad_entropy.to(lse.dtype), n_rows),)
        z = torch.empty(chunk_size, weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        block = _row_block(chunk_size, weight.shape[0], hidden.device)
        for c0 in range(0, n_rows, chunk_size):
            h = _pad_rows(hidden[c0:c0 + chunk_size], chunk_size)  # [C, H]
            torch.mm(h, weight.T, out=z)  # recompute the chunk's logits
            for r in range(0, chunk_size, block):
                a, b = c0 + r, c0 + r + block
                if extra:
                    grad_fn(z[r:r + block], targets[a:b], lse[a:b], ent_rows[a:b], grad_logprobs[a:b],
                            extra[0][a:b], 1.0 / ctx.temperature)
                else:
                    grad_fn(z[r:r + block], targets[a:b], lse[a:b], grad_logprobs[a:b], 1.0 / ctx.temperature)
            if need_dh:
                n_real = min(chunk_size, n_tokens - c0)
                grad_h[c0:c0 + n_real] = (z @ weight)[:n_real]
            if need_dw:
                _accumulate_weight_grad(grad_w, z, h)
        if need_dw:
            grad_w = grad_w.to(weight.dtype)
        return grad_h, grad_w, None, None, None, None, None


def _check_logprob_args(hidden, weight, temperature, chunk_size):
    if hidden.dim() != 2 or weight.dim() != 2 or weight.shape[1] != hidden.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")


def chunked_logprob_entropy(hidden, weight, targets, *, temperature=1.0, chunk_size=256, compiled=True,
                            entropy_grad=False):
    """Per-token log-prob of `targets` and full-vocabulary entropy, never holding [N, V] logits.

    hidden [N, H], weight [V, H] (the lm_head), targets [N] long. logits = hidden @ weight.T / temperature.
    Returns (logprobs [N], entropy [N]) in fp32 (fp64 for fp64 inputs): logprobs = log_softmax(logits)[targets]
    carries gradient to hidden and weight; entropy = -sum_v p log p is detached unless `entropy_grad` (rl_dapo's
    --entropy-coef bonus; backward then runs a kernel with the extra term dH/dz = -p (log p + H) / T).

    Why: the RL loss needs log pi(y_t) at every response token and the token entropy is the quantity
    reheating is about, but with Qwen3's 151,936-entry vocabulary one 16k-token micro-batch of fp32 logits
    alone is ~10 GB, before autograd's copies. Here the logits exist one [chunk_size, V] chunk at a time:
    forward keeps only each token's logsumexp, backward recomputes the chunk's logits (one extra GEMM) and
    forms d/d logits = (onehot(target) - p) * grad / temperature in place.
    """
    _check_logprob_args(hidden, weight, temperature, chunk_size)
    if targets.shape != (hidden.shape[0],) or targets.dtype != torch.long:
        raise ValueError(f"targets must be a long tensor of shape ({hidden.shape[0]},), got {targets.dtype} "
                         f"{tuple(targets.shape)}")
    return ChunkedLogprobEntropy.apply(hidden, weight, targets, float(temperature), chunk_size, compiled,
                                       bool(entropy_grad))


@torch.no_grad()
def entropy_from_hidden(hidden, weight, temperature=1.0, *, chunk_size=256, compiled=True):
    """Token entropy [N] of softmax(hidden @ weight.T / temperature), chunked, no gradient."""
    _check_logprob_args(hidden, weight, temperature, chunk_size)
    targets = torch.zeros(hidden.shape[0], dtype=torch.long, device=hidden.device)
    return chunked_logprob_entropy(hidden, weight, targets, temperature=temperature, chunk_size=chunk_size,
                                   compiled=compiled)[1]
