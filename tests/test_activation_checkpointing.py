"""Activation checkpointing runs where the scripts train (issue 17, point 1): transformers recomputes a decoder layer
in backward only when `gradient_checkpointing and training`, and the scripts' models once came back in eval mode,
so the flag was on and nothing was recomputed (the first GPU run would have needed 133-175 GiB per rank).

Counted, not inferred from flags: a counter wrapped around the forward of every decoder layer of the objects the scripts themselves build
(load_sharded / frozen_copy as the scripts call them, and the scripts' own main() in 1 and 2 processes) tells a
layer forward run with grad from one run again inside autograd's backward. With checkpointing every grad forward
is recomputed exactly once; without it, none is.
"""
import json
import os

import pytest
import torch

from common.batching import pack_padding_free
from common.dist import DistInfo, LayerCalls, unwrap
from common.loading import frozen_copy, load_sharded
from tests._scripts import ROOT, run_script
from tests.test_rl_dapo import rl_args


def count_layer_calls(model, run):
    """{'grad': ..., 'recomputed': ...} of model's decoder layers while run() executes (common.dist.LayerCalls)."""
    calls = LayerCalls(model)
    try:
        run()
    finally:
        calls.close()
    return {k: calls.counts[k] for k in ("grad", "recomputed")}


def forward_backward(model):
    ids, pos, pred, targets = pack_padding_free([([1, 2, 3], [4, 5, 6, 7]), ([8, 9], [10, 11, 12])], "cpu")
    loss = model(ids, position_ids=pos, head=lambda h, w: (h[pred] @ w.T).logsumexp(-1).sum())
    loss.backward()


@pytest.mark.parametrize("ac", [True, False], ids=["checkpointing", "no_checkpointing"])
def test_the_loaded_model_recomputes_every_layer_in_backward(tiny, ac):
    """The one-process path of load_sharded (from_pretrained + shard_model), as the scripts call it."""
    model = load_sharded(tiny["model"], DistInfo(), "fsdp", activation_checkpointing=ac)
    layers = len(unwrap(model).model.layers)
    assert model.training and all(layer.training for layer in unwrap(model).model.layers)
    n = count_layer_calls(model, lambda: forward_backward(model))
    assert n == {"grad": layers, "recomputed": layers if ac else 0}


def test_the_frozen_teacher_is_an_eval_copy_of_the_students_shards(tiny):
    student = load_sharded(tiny["model"], DistInfo(), "fsdp", activation_checkpointing=True)
    with torch.no_grad():
        for p in student.parameters():              # a student that is no longer the checkpoint
            p.add_(0.01 * torch.randn_like(p))
    teacher = frozen_copy(student, DistInfo(), "fsdp")
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    s, t = unwrap(student), unwrap(teacher)
    assert dict(s.named_parameters()).keys() == dict(t.named_parameters()).keys()
    for (name, a), (_, b) in zip(list(s.named_parameters()) + list(s.named_buffers()),
                                 list(t.named_parameters()) + list(t.named_buffers())):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    assert t.lm_head.weight is t.model.embed_tokens.weight          # still tied, one tensor
    ids = torch.tensor([[1, 5, 9, 4, 2]])
    with torch.no_grad():
        torch.testing.assert_close(teacher(ids, head=lambda h, w: h @ w.T), student(ids, head=lambda h, w: h @ w.T),
                                   rtol=0, atol=0)


def read_counts(out, nproc):
    return [json.load(open(os.path.join(out, f"ac_rank{r}.json"))) for r in range(nproc)]


@pytest.mark.slow
@pytest.mark.parametrize("script,nproc", [("rl_dapo", 2), ("reheat_tsopsd", 2), ("rl_dapo", 1)],
                         ids=["rl_dapo_fsdp2", "reheat_fsdp2", "rl_dapo_one_process"])
def test_the_scripts_own_models_recompute_every_layer(tiny_warm, tmp_path, script, nproc):
    """The scripts' own main(), 1 and 2 processes (FSDP2 on gloo), --activation-checkpointing and --preflight on
    CPU: every grad forward of the trained model's layers is recomputed once in backward, the frozen teacher
    (reheat) is in eval mode, takes no gradient and is never recomputed."""
    out = str(tmp_path)
    if script == "rl_dapo":
        argv = rl_args(tiny_warm, out, "run", "--no-compile", steps=1)
    else:
        argv = ["--ckpt", tiny_warm["model"], "--data", tiny_warm["train"], "--prompt-style", "plain", "--tau", "2",
                "--steps", "1", "--prompts-per-step", "4", "--group-size", "2", "--max-response-len", "16",
                "--rollout-engine", "hf", "--grade-workers", "0", "--micro-batch-tokens", "64", "--no-compile",
                "--lr", "1e-3", "--out", out, "--run-name", "run"]
    run_script(os.path.join(ROOT, "tests", "_ac_worker.py"),
               [script, out, *argv, "--activation-checkpointing", "--preflight"], nproc=nproc)
    for rank in read_counts(out, nproc):
        trained = [m for m in rank["models"] if m["role"] == "trained"]
        assert len(trained) == 1
        t = trained[0]
        assert t["root_training"] and all(t["layers_training"]) and t["requires_grad"]
        # the preflight's micro-batch and the step's: at least two grad forwards per layer, each recomputed
        assert t["grad_forwards"] >= 2 * t["layers"] and t["recomputed"] == t["grad_forwards"], t
        for m in rank["models"]:
            if m["role"] == "teacher":
                assert not m["root_training"] and not any(m["layers_training"]) and not m["requires_grad"], m
                assert m["no_grad_forwards"] > 0 and m["grad_forwards"] == 0 and m["recomputed"] == 0, m
        if script == "reheat_tsopsd":
            assert [m["role"] for m in rank["models"]] == ["trained", "teacher"]
