"""flex_attention on packed padding-free micro-batches: how many compiled variants a run meets (issue 17).

On CUDA the training scripts run packed rows (common/batching.py: one row [1, T], position ids restarting at 0
per sequence, no attention mask) through transformers' flex_attention (batching.attention_implementation).
transformers compiles two frames with torch.compile's defaults (automatic dynamic shapes): torch's
`flex_attention` (transformers/integrations/flex_attention.py: WrappedFlexAttention) and `create_block_mask`
(transformers/masking_utils.py: flex_attention_mask, `_compile=True`). Each frame gets one compiled variant
per combination of its guards. Past torch._dynamo.config.recompile_limit (8 in torch 2.13) dynamo stops
compiling the frame, and a micro-batch that matches no variant runs it EAGER: eager flex_attention
materialises the B x H x T x T scores (137 GB at 32k tokens of Qwen3-8B), an OOM on a long micro-batch.

What splits the variants (the recompile reasons, TORCH_LOGS=recompiles):
  - grad mode: the policy update (grad) vs rl_dapo's old-log-prob pass or the frozen teacher (no_grad);
  - one sequence in the row (a lone long sequence, the 2-token dummy) vs several: transformers adds the
    packed-sequence mask only when position_ids restart, so the mask_mod's code differs;
  - one 128-token block vs several: dynamo specialises sizes 0 and 1 (`2 <= block_mask.kv_indices.size()[2]`);
  - automatic dynamic shapes: the first length seen of a tensor (Q_LEN; the packed sequence ids) compiles
    static, the next one dynamic.
On the stream below (both scripts' passes, two ranks' plans, dummies, lone long and short rows) each frame
compiles 10 variants: over the default limit. The training scripts' flex setup must raise the limit.

CPU: torch 2.13 runs compiled flex_attention on CPU for inference only (`_validate_device` refuses inputs that
require grad; inductor has no CPU lowering of its backward). So
  - test_flex_attention_variants_of_a_training_run_stay_under_recompile_limit runs the whole stream (grad +
    backward with activation checkpointing, no_grad, the teacher in eval mode) with both frames compiled by
    the `aot_eager` backend: the same dynamo front end (guards, cache entries, recompile limit), with the
    CPU-only requires_grad refusal skipped; with create_block_mask on inductor the counts are the same.
  - test_flex_attention_inductor_kernel_matches_sdpa_on_packed_rows runs inductor's real CPU kernel (no_grad).
  - test_flex_attention_recompile_check_detects_an_eager_fallback: the checks do catch a fallback.
Inductor's CUDA lowering may add guards of its own that no CPU test sees: TORCH_LOGS=recompiles on a GPU run
shows them. Select these tests with `pytest tests/test_flex_attention.py` (or `-k flex_attention`).
"""
import contextlib
import importlib.util
import logging
import math
import os
import random

import pytest
import torch
import torch._inductor.config

from common.batching import attention_implementation, pack_padding_free, plan_micro_batches
from common.dist import DistInfo, shard_model

flex_mod = pytest.importorskip("torch.nn.attention.flex_attention")
MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "tiny_math", "model")
BLOCK = 128                       # flex_attention's sparse block size (_DEFAULT_SPARSE_BLOCK_SIZE)
FRAMES = {"flex_attention": flex_mod.flex_attention, "create_block_mask": flex_mod.create_block_mask}

# attention_implementation("cuda") picks flash-attention when it is installed (then there is no flex frame);
# asked without calling it, which may configure dynamo for flex outside a test
needs_flex = pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None,
                                reason="flash_attn installed: CUDA runs would not use flex_attention")


def head(hidden, weight):
    """A loss that reads every position and the lm_head weight, and the hidden states to compare."""
    return (hidden @ weight.T).float().logsumexp(-1).sum(), hidden.detach().clone()


# ----------------------------------------------------------------------------- the micro-batches of a run

# the rare rows, each one micro-batch: a lone sequence over the budget, a lone short one (one block), a short
# pack (one block), the 2-token dummy of a rank with fewer micro-batches than the others
LONE_LONG = [([5] * 40, [6] * 700)]
LONE_SHORT = [([5] * 20, [6] * 30)]
SHORT_PACK = [([5] * 20, [6] * 10), ([5] * 20, [6] * 30)]
DUMMY = []


def _seq(rng):
    prompt = [rng.randrange(3, 300) for _ in range(rng.randint(20, 50))]
    n = rng.choice([rng.randint(1, 40)] * 3 + [rng.randint(40, 250)] * 5 + [rng.randint(250, 600)] * 2)
    return prompt, [rng.randrange(3, 300) for _ in range(n)]


def training_stream(seed=0, steps=5, per_step=12, budget=384, world=2):
    """The micro-batches of a run, step by step, as lists of (prompt, response): the plans of `world` ranks
    (rows packed up to the budget, lone sequences; both ranks' rows run here, a superset of one rank's),
    then, in the last step, the rare rows."""
    rng = random.Random(seed)
    out = []
    for _ in range(steps):
        batch = [_seq(rng) for _ in range(per_step)]
        plan = plan_micro_batches([len(p) + len(r) for p, r in batch], budget, world)
        out.append([[batch[i] for i in mb] if mb is not None else [] for rank in plan for mb in rank])
    out[-1] += [LONE_LONG, LONE_SHORT, SHORT_PACK, DUMMY]
    return out


def kind(seqs) -> tuple[bool, bool]:
    """(several sequences in the row, several 128-token blocks) of a micro-batch."""
    t = sum(len(p) + len(r) for p, r in seqs) if seqs else 2
    return len(seqs) > 1, math.ceil(t / BLOCK) > 1


# ----------------------------------------------------------------------------- counting compiled variants

def cache_entries(fn) -> int:
    """Compiled variants dynamo holds for fn's code object: what recompile_limit is checked against."""
    return len(torch._dynamo.eval_frame._debug_get_cache_entry_list(fn.__code__))


class _LimitHits(logging.Handler):
    """Dynamo's warning 'torch._dynamo hit config.recompile_limit (8)' (logged at the default log level)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        msg = record.getMessage()
        if "hit config." in msg and "recompile_limit" in msg:
            self.messages.append(msg)


@contextlib.contextmanager
def fresh_dynamo(backend=None):
    """A clean dynamo (caches, automatic-dynamic state, transformers' compiled-flex singleton); inside it
    dynamo's limit-hit warnings are recorded and eager runs of the two frames counted. `backend`: the
    torch.compile backend of both frames instead of inductor (then flex_attention also accepts CPU inputs
    that require grad). Restores everything, recompile_limit included, on exit."""
    from transformers.integrations import flex_attention as hf_flex
    mp = pytest.MonkeyPatch()
    torch._dynamo.reset()
    mp.setattr(hf_flex.WrappedFlexAttention, "_instance", None)
    eager = {"flex_attention": 0, "create_block_mask": 0}
    real_env, real_create_mask = flex_mod.setup_compilation_env, flex_mod.create_mask

    def counted_env():                           # only flex_attention running outside a compiled frame gets here
        eager["flex_attention"] += 1
        return real_env()

    def counted_create_mask(*args, **kwargs):    # traced, not counted, inside a compiled create_block_mask
        if not torch.compiler.is_compiling():
            eager["create_block_mask"] += 1
        return real_create_mask(*args, **kwargs)

    mp.setattr(flex_mod, "setup_compilation_env", counted_env)
    mp.setattr(flex_mod, "create_mask", counted_create_mask)
    if backend is not None:
        real_compile, real_validate = torch.compile, flex_mod._validate_device

        def compile_(model=None, **kwargs):      # transformers' and torch's own torch.compile(...) calls
            if model is flex_mod.flex_attention or model is flex_mod.create_block_mask:
                kwargs["backend"] = backend
            return real_compile(model, **kwargs)

        mp.setattr(torch, "compile", compile_)
        # the CPU-only refusal of inputs that require grad (CUDA has the kernel); the other checks still run
        mp.setattr(flex_mod, "_validate_device", lambda q, k, v: real_validate(q.detach(), k.detach(), v.detach()))
    # torch's structured trace (TORCH_TRACE) logs every compile at DEBUG to its logger's handlers, pytest's
    # capture among them: thousands of lines in a failure report
    mp.setattr(logging.getLogger("torch.__trace"), "handlers", [])
    hits = _LimitHits()
    dynamo_log = logging.getLogger("torch._dynamo")
    dynamo_log.addHandler(hits)
    try:
        # compile_threads=1: inductor compiles in this process (no pool of compile worker processes)
        with torch._dynamo.config.patch(recompile_limit=torch._dynamo.config.recompile_limit), \
                torch._inductor.config.patch(compile_threads=1):
            yield hits, eager
    finally:
        dynamo_log.removeHandler(hits)
        mp.undo()
        torch._dynamo.reset()
        hf_flex.WrappedFlexAttention._instance = None


def load(attn: str, requires_grad=True):
    """The tiny model wrapped as the one-process scripts wrap it; attn 'flex': the call shard_model makes on
    CUDA (after which dynamo's config is the one a CUDA run has)."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(MODEL, dtype=torch.float32)
    # activation checkpointing, on by default on CUDA: its recompute calls flex_attention again in backward
    model = shard_model(lm, DistInfo(), "none", activation_checkpointing=requires_grad, requires_grad=requires_grad)
    if attn == "flex":
        lm.set_attn_implementation(attention_implementation("cuda"))
    assert lm.config._attn_implementation == ("flex_attention" if attn == "flex" else "sdpa")
    return model


class Runner:
    """Runs micro-batches through flex models and their sdpa twins (same weights), compares them, and notes
    which micro-batch compiled a new variant of which frame."""

    def __init__(self, teacher: bool):
        self.flex, self.ref = {"student": load("flex")}, {"student": load("sdpa")}
        if teacher:                                      # reheat_tsopsd's frozen teacher: eval mode, no grad
            self.flex["teacher"], self.ref["teacher"] = load("flex", False).eval(), load("sdpa", False).eval()
        self.seen, self.compiles, self.forwards = set(), [], 0
        self.max_diff = {"hidden": 0.0, "loss": 0.0, "grad": 0.0}

    def forward(self, who, seqs, grad):
        ids, pos, _, _ = pack_padding_free(seqs, "cpu")
        before = {n: cache_entries(f) for n, f in FRAMES.items()}
        flex, ref = self.flex[who], self.ref[who]
        with torch.set_grad_enabled(grad):
            loss, hid = flex(ids, position_ids=pos, head=head)
            loss_ref, hid_ref = ref(ids, position_ids=pos, head=head)
        if grad:
            loss.backward()
            loss_ref.backward()
            # all gradients as one vector: one parameter's can be all rounding noise (the dummy's two equal
            # tokens give the attention scores no gradient; q_proj and k_proj get ~1e-8 either way)
            g, g_ref = (torch.cat([p.grad.flatten() for p in m.parameters()]) for m in (flex, ref))
            self.max_diff["grad"] = max(self.max_diff["grad"], ((g - g_ref).norm() / g_ref.norm()).item())
            flex.zero_grad(set_to_none=True)
            ref.zero_grad(set_to_none=True)
        self.max_diff["hidden"] = max(self.max_diff["hidden"], (hid - hid_ref).abs().max().item())
        self.max_diff["loss"] = max(self.max_diff["loss"], abs(loss.item() / loss_ref.item() - 1))
        several, blocks = kind(seqs)
        tag = ("grad" if grad else "no_grad", "packed" if several else "single", "blocks>1" if blocks else "1 block")
        self.seen.add(tag)
        for n, f in FRAMES.items():
            if cache_entries(f) > before[n]:
                self.compiles.append(f"{n} #{cache_entries(f)}: {'/'.join(tag)} T={ids.shape[1]}")
        self.forwards += 1

    def report(self, hits, eager):
        entries = {n: cache_entries(f) for n, f in FRAMES.items()}
        return (f"compiled variants {entries} (recompile_limit {torch._dynamo.config.recompile_limit}); eager runs "
                f"{eager}; limit hits {len(hits.messages)}; forwards {self.forwards}; max diff vs sdpa "
                f"{self.max_diff}\nnew variants, by the micro-batch that compiled them:\n  " + "\n  ".join(self.compiles)
                + "\n(TORCH_LOGS=recompiles prints the guard each one failed)")

    def check(self, hits, eager, report):
        limit = torch._dynamo.config.recompile_limit
        for name, fn in FRAMES.items():
            n = cache_entries(fn)
            assert n >= 2, f"{name} compiled {n} variant(s): flex_attention did not run compiled?\n{report}"
            assert n < limit, f"{name}: {n} compiled variants, recompile_limit {limit}\n{report}"
        assert not hits.messages, f"dynamo hit the recompile limit: {hits.messages[0]}\n{report}"
        assert eager == {"flex_attention": 0, "create_block_mask": 0}, f"a frame ran eager\n{report}"
        assert self.max_diff["hidden"] < 1e-4 and self.max_diff["loss"] < 1e-5, f"flex != sdpa\n{report}"
        assert self.max_diff["grad"] < 1e-4, f"flex's gradients != sdpa's\n{report}"


# ----------------------------------------------------------------------------- tests

@needs_flex
def test_flex_attention_variants_of_a_training_run_stay_under_recompile_limit():
    """The micro-batches of a run, in the passes the scripts make, compile fewer variants of each flex frame
    than the recompile_limit the project's flex setup leaves, none runs eager, and flex computes what sdpa
    computes on the packed rows: hidden states, loss, every parameter's gradient."""
    stream = training_stream()
    with fresh_dynamo(backend="aot_eager") as (hits, eager):
        run = Runner(teacher=True)
        for step, mbs in enumerate(stream):
            if step % 2 == 0:     # reheat_tsopsd: the frozen teacher (eval, no_grad), then the student's update
                for seqs in mbs:
                    run.forward("teacher", seqs, grad=False)
                    run.forward("student", seqs, grad=True)
            else:                 # rl_dapo with several mini-batches: old log-probs (train mode, no_grad) first
                for seqs in mbs:
                    run.forward("student", seqs, grad=False)
                for seqs in mbs:
                    run.forward("student", seqs, grad=True)
        report = run.report(hits, eager)
        print(report)
        every_kind = {(g, s, b) for g in ("grad", "no_grad") for s in ("packed", "single")
                      for b in ("blocks>1", "1 block")}
        assert run.seen == every_kind, f"the stream no longer has every kind of row: {run.seen}\n{report}"
        assert sum(len(mbs) for mbs in stream) >= 30, report
        run.check(hits, eager, report)


@needs_flex
def test_flex_attention_inductor_kernel_matches_sdpa_on_packed_rows():
    """Inductor's compiled CPU kernel (no_grad: all it supports on CPU) on packed rows, the static first and a
    dynamic second length, and on a lone long sequence computes what sdpa computes, without falling back."""
    packed = [mb for mb in training_stream()[0] if kind(mb) == (True, True)]
    with fresh_dynamo() as (hits, eager):
        run = Runner(teacher=False)
        for seqs in (packed[0], LONE_LONG, packed[1]):
            run.forward("student", seqs, grad=False)
        report = run.report(hits, eager)
        print(report)
        run.check(hits, eager, report)


@needs_flex
@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
def test_flex_attention_recompile_check_detects_an_eager_fallback():
    """With a limit below what the rows need, the checks above fire: the limit-hit warning, eager runs of
    both frames, variants stuck at the limit; and eager flex still computes the packed rows right."""
    packed = next(mb for mb in training_stream()[0] if kind(mb) == (True, True))
    with fresh_dynamo(backend="aot_eager") as (hits, eager):
        run = Runner(teacher=False)
        torch._dynamo.config.recompile_limit = 2      # after the project's flex setup, which may raise it
        for seqs in (packed, LONE_LONG, SHORT_PACK, DUMMY):
            run.forward("student", seqs, grad=False)
        report = run.report(hits, eager)
        assert hits.messages, report
        assert eager["flex_attention"] > 0 and eager["create_block_mask"] > 0, report
        assert all(cache_entries(fn) == 2 for fn in FRAMES.values()), report
        with pytest.raises(AssertionError, match="recompile_limit 2"):
            run.check(hits, eager, report)
        assert run.max_diff["hidden"] < 1e-4, report
