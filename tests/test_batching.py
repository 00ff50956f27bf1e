"""Token-budget micro-batches and padding-free packing (common/batching.py): the plan covers every sequence
once within the budget, is balanced and equal-length over ranks; a packed row computes exactly what the
right-padded batch computed (log-probs, entropies, gradients; rl_dapo's head, reheat's student and teacher). The
models are the scripts' own: common.loading.load_sharded (the policy / student) and frozen_copy (the teacher)."""
import random

import pytest
import torch

from common.batching import pack_padding_free, padded_vs_packed_tokens, plan_micro_batches
from common.dist import DistInfo, full_params, unwrap
from common.loading import frozen_copy, load_sharded
from common.losses import chunked_logprob_entropy, fused_linear_kl
from common.rollout import pack_sequences


@pytest.mark.parametrize("world,budget", [(1, 64), (2, 64), (3, 50), (4, 1), (8, 1000)])
def test_plan_covers_each_sequence_once_within_budget_with_equal_counts(world, budget):
    rng = random.Random(world * 1000 + budget)
    lengths = [rng.choice([1, 3, 10, 40, 90]) for _ in range(37)]
    plan = plan_micro_batches(lengths, budget, world)
    assert len(plan) == world and len({len(p) for p in plan}) == 1          # the same count on every rank
    seen = [i for p in plan for mb in p if mb is not None for i in mb]
    assert sorted(seen) == list(range(len(lengths)))                         # each sequence exactly once
    for p in plan:
        for mb in p:
            if mb is not None:
                assert mb == sorted(mb)
                assert sum(lengths[i] for i in mb) <= budget or len(mb) == 1     # a longer one runs alone
        # the dummies are trailing, and only ranks with fewer real micro-batches have them
        real = [mb is not None for mb in p]
        assert real == sorted(real, reverse=True)
    assert plan == plan_micro_batches(lengths, budget, world)                # deterministic: every rank agrees
    loads = [sum(lengths[i] for mb in p if mb for i in mb) for p in plan]
    assert max(loads) - min(loads) <= max(lengths)                           # LPT balance bound


def test_plan_balances_a_long_tail_better_than_stream_order_splits():
    rng = random.Random(0)
    lengths = [min(20480, int(rng.lognormvariate(7.5, 1.0))) for _ in range(256)]
    plan = plan_micro_batches(lengths, 32768, 8)
    loads = [sum(lengths[i] for mb in p if mb for i in mb) for p in plan]
    # the old split: consecutive equal-count slices of the mini-batch
    k = len(lengths) // 8
    old = [sum(lengths[r * k:(r + 1) * k]) for r in range(8)]
    assert max(loads) / (sum(lengths) / 8) < 1.02 < max(old) / (sum(lengths) / 8)


def test_padded_vs_packed_token_counts():
    lengths = [10, 100, 20, 30]
    r = padded_vs_packed_tokens(lengths, micro_batch_size=2, budget=1000)
    assert r["real_tokens"] == 160 and r["padded_computed"] == 2 * 100 + 2 * 30 and r["packed_computed"] == 160


def test_pack_padding_free_layout():
    seqs = [([1, 2, 3], [4, 5]), ([6], [7, 8, 9]), ([10, 11], [12])]
    ids, pos, pred, targets = pack_padding_free(seqs, "cpu")
    assert ids.tolist() == [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]]
    assert pos.tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2]]
    assert targets[pred].tolist() == [4, 5, 7, 8, 9, 12]          # every response token, in sequence order
    ids, pos, pred, _ = pack_padding_free([], "cpu")               # the dummy: one loss position
    assert ids.shape == (1, 2) and int(pred.sum()) == 1


def _sequences(rng, n, vocab):
    return [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 9))],
             [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]) for _ in range(n)]


def _forward_inputs(seqs, packed: bool):
    """(input_ids, forward kwargs, loss positions, targets): one packed row, or the right-padded batch."""
    if packed:
        ids, pos, pred, targets = pack_padding_free(seqs, "cpu")
        return ids, {"position_ids": pos}, pred, targets
    ids, attn, pred, targets = pack_sequences(seqs, 0, "cpu")
    return ids, {"attention_mask": attn}, pred, targets


@pytest.mark.parametrize("fixture", ["tiny", "tiny_untied"])
def test_packed_logprobs_entropies_and_gradients_equal_padded(fixture, request):
    """rl_dapo's head on one packed row vs the right-padded batch with an attention mask (fp32, 1e-5), on
    rl_dapo's model (load_sharded, in the training mode it leaves)."""
    path = request.getfixturevalue(fixture)["model"]
    torch.manual_seed(0)
    seqs = _sequences(random.Random(1), 6, 200)
    results = []
    for packed in (False, True):
        model = load_sharded(path, DistInfo(), "fsdp")             # as rl_dapo.py builds it (one process)
        assert model.training
        ids, kw, pred, targets = _forward_inputs(seqs, packed)

        def head(hidden, weight):
            return chunked_logprob_entropy(hidden[pred], weight, targets[pred], temperature=1.3, chunk_size=7,
                                           compiled=False)
        logp, ent = model(ids, head=head, **kw)
        (logp * torch.linspace(-1, 1, len(logp))).sum().backward()       # a gradient that weighs every token
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((logp.detach(), ent.detach(), grads))
    (lp0, e0, g0), (lp1, e1, g1) = results
    torch.testing.assert_close(lp1, lp0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e1, e0, rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-5, msg=lambda m, n=n: f"{n}: {m}")


def test_packed_without_position_restarts_is_not_the_same(tiny):
    """The check above can fail: a packed row whose positions run on (no restart) attends across sequences."""
    seqs = _sequences(random.Random(2), 4, 200)
    ids, pos, pred, _ = pack_padding_free(seqs, "cpu")
    lm = unwrap(load_sharded(tiny["model"], DistInfo(), "fsdp"))
    with torch.no_grad():
        a = lm.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[pred]
        b = lm.model(input_ids=ids, use_cache=False).last_hidden_state[pred]
    assert (a - b).abs().max() > 1e-2


def test_packed_reheat_student_and_frozen_teacher_equal_padded(tiny_untied):
    """reheat_tsopsd's pattern: the frozen teacher's hidden states at the response positions, then the fused KL
    head in the student's forward; packed vs padded, loss, statistics and gradients (fp32, 1e-5). The student is
    load_sharded's and the teacher frozen_copy's of the unperturbed student, as reheat_tsopsd.py builds them."""
    path = tiny_untied["model"]
    seqs = _sequences(random.Random(3), 5, 200)
    results = []
    for packed in (False, True):
        torch.manual_seed(0)
        student = load_sharded(path, DistInfo(), "fsdp")
        teacher = frozen_copy(student, DistInfo(), "fsdp")   # theta_0, before the student moves
        assert student.training and not teacher.training
        with torch.no_grad():                                # a student a little away from the teacher
            for p in student.parameters():
                p.add_(0.01 * torch.randn_like(p))
        ids, kw, pred, _ = _forward_inputs(seqs, packed)
        with torch.no_grad():
            t_h = teacher(ids, head=lambda h, w: h[pred].clone(), **kw)
        t_w = next(t for _, t in full_params(teacher, names={"lm_head.weight"}))   # the script's teacher_weight

        def head(hidden, weight):
            h = hidden[pred]
            return fused_linear_kl(h, weight, t_h, t_w, torch.ones(len(h), dtype=torch.bool), tau=1.5,
                                   chunk_size=5, compiled=False, return_stats=True)
        loss, stats = student(ids, head=head, **kw)
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in stats.items()},
                        {n: p.grad.clone() for n, p in student.named_parameters()}, t_h))
    (l0, s0, g0, t0), (l1, s1, g1, t1) = results
    torch.testing.assert_close(t1, t0, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    for k in s0:
        torch.testing.assert_close(s1[k].float(), s0[k].float(), rtol=1e-5, atol=1e-5)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=lambda m, n=n: f"{n}: {m}")


def test_flex_attention_confines_a_packed_row_like_the_padded_batch(tiny):
    """The GPU path without flash-attn: transformers' flex_attention block mask built from the restarting
    position ids. CPU flex_attention has no backward, so the forward only (the hidden states at the response
    positions, fp32, vs sdpa on the padded batch)."""
    from common.batching import attention_implementation
    assert attention_implementation("cpu") == "sdpa"
    seqs = _sequences(random.Random(4), 5, 200)
    lm = unwrap(load_sharded(tiny["model"], DistInfo(), "fsdp"))
    ids, attn, pred, _ = pack_sequences(seqs, 0, "cpu")
    with torch.no_grad():
        ref = lm.model(input_ids=ids, attention_mask=attn, use_cache=False).last_hidden_state[pred]
        lm.set_attn_implementation("flex_attention")
        assert lm.config._attn_implementation == "flex_attention"
        ids, pos, pred, _ = pack_padding_free(seqs, "cpu")
        got = lm.model(input_ids=ids, position_ids=pos, use_cache=False).last_hidden_state[pred]
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
