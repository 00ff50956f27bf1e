"""common/preflight.py and the vLLM budget it makes honest (issue 17, points 2-4): AdamW's state created before
vLLM's memory check without changing the first update, the preflight micro-batch, the one-line OOM error, the
scripts' --preflight on CPU (the plumbing: the same run with and without it), and the default vLLM budget."""
import os

import pytest
import torch

from common.dist import DistInfo
from common.preflight import materialize_optimizer_state, oom_hint, preflight, preflight_sequences
from common.rollout import VLLM_MARGIN_GIB, vllm_memory_kwargs
from tests._scripts import deterministic, metrics, run_script
from tests.test_rl_dapo import rl_args

GIB = 2 ** 30


def _model_and_grads(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(7, 5), torch.nn.Tanh(), torch.nn.Linear(5, 3))
    grads = [torch.randn_like(p) for p in model.parameters()]
    return model, grads


def _first_steps(materialize: bool, steps=2, **adamw):
    model, grads = _model_and_grads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, **adamw)
    if materialize:
        before = [p.detach().clone() for p in model.parameters()]
        materialize_optimizer_state(opt)
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))      # nothing moved
        for p in model.parameters():
            st = opt.state[p]
            assert float(st["step"]) == 0 and not st["exp_avg"].any() and not st["exp_avg_sq"].any()
            assert p.grad is None
    out = []
    for k in range(steps):
        for p, g in zip(model.parameters(), grads):
            p.grad = g * (k + 1)
        opt.step()
        out.append([p.detach().clone() for p in model.parameters()])
    return out, opt


@pytest.mark.parametrize("adamw", [{}, {"foreach": False}, {"amsgrad": True}], ids=["foreach", "for_loop", "amsgrad"])
def test_materialized_optimizer_state_leaves_the_first_updates_unchanged(adamw):
    ref, _ = _first_steps(False, **adamw)
    got, opt = _first_steps(True, **adamw)
    for step_ref, step_got in zip(ref, got):
        for a, b in zip(step_ref, step_got):
            torch.testing.assert_close(b, a, rtol=0, atol=1e-6)
    assert all(float(st["step"]) == 2 for st in opt.state.values())


def test_materialize_keeps_restored_state():
    model, grads = _model_and_grads()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for p, g in zip(model.parameters(), grads):
        p.grad = g
    opt.step()
    opt.zero_grad(set_to_none=True)
    saved = {k: v.clone() for k, v in opt.state[next(model.parameters())].items()}
    materialize_optimizer_state(opt)                              # a resumed run: nothing to do
    for k, v in opt.state[next(model.parameters())].items():
        assert torch.equal(v, saved[k]), k


def test_preflight_sequences_fill_the_micro_batch_with_loss_positions():
    seqs = preflight_sequences(32768, 20680)
    assert [len(p) + len(r) for p, r in seqs] == [20680, 12088]
    assert all(len(p) == 1 for p, _ in seqs)
    assert sum(len(p) + len(r) for p, r in preflight_sequences(64, 1000)) == 64


def test_preflight_runs_on_request_and_reports_an_oom_in_one_line(capsys):
    ran = []
    assert preflight(lambda: ran.append(1), 64, DistInfo(), enabled=None, name="x", hint="h") == {"ran": False}
    assert not ran                                                # CPU default: off
    assert preflight(lambda: ran.append(1), 64, DistInfo(), enabled=True, name="x", hint="h")["ran"] and ran
    assert "[x] preflight: one forward/backward of a 64-token micro-batch ran on cpu" in capsys.readouterr().out

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64 GiB")
    hint = oom_hint(32768, 20680, None, DistInfo(device=torch.device("cuda")))
    with pytest.raises(SystemExit) as e:
        preflight(oom, 32768, DistInfo(), enabled=True, name="rl_dapo", hint=hint)
    msg = str(e.value)
    assert "\n" not in msg and "32768-token micro-batch" in msg and "--micro-batch-tokens (now 32768)" in msg
    assert "--activation-checkpointing" not in msg                # on by default on CUDA: not the fix to name
    assert "--activation-checkpointing" in oom_hint(32768, 20680, False, DistInfo(device=torch.device("cuda")))
    assert "--max-response-len" in oom_hint(8192, 20680, None, DistInfo())


def test_default_vllm_budget_is_what_is_free_less_the_margin():
    total, free = 80 * GIB, 60 * GIB
    auto = vllm_memory_kwargs(free, total, None, None)["gpu_memory_utilization"]
    assert auto == pytest.approx((free - VLLM_MARGIN_GIB * GIB) / total, abs=1e-4)
    assert auto * total <= free                                   # vLLM's start-up rule: the budget must be free
    assert vllm_memory_kwargs(free, total, 0.5, None) == {"gpu_memory_utilization": 0.5}
    with pytest.raises(SystemExit, match="at most 0.72"):        # an explicit ask that is not free
        vllm_memory_kwargs(free, total, 0.8, None)
    with pytest.raises(SystemExit, match="no room for vLLM"):
        vllm_memory_kwargs(3 * GIB, total, None, None)


@pytest.mark.slow
def test_rl_dapo_preflight_on_cpu_changes_nothing(tiny_warm, tmp_path):
    """--preflight on CPU runs the script's own forward/backward on a full micro-batch before the engine starts;
    the run is the same as without it, to the bit."""
    out = str(tmp_path)
    plain = run_script("rl_dapo.py", rl_args(tiny_warm, out, "plain", "--no-compile", "--no-preflight", steps=1))
    pre = run_script("rl_dapo.py", rl_args(tiny_warm, out, "pre", "--no-compile", "--preflight", steps=1))
    assert "[rl_dapo] preflight:" not in plain.stdout
    assert "[rl_dapo] preflight: one forward/backward of a 64-token micro-batch ran on cpu" in pre.stdout
    a, b = metrics(os.path.join(out, "plain")), metrics(os.path.join(out, "pre"))
    assert [deterministic(r) for r in a] == [deterministic(r) for r in b]
