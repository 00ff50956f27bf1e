"""common/dist.py in one process: the training root (LMWithHead), activation checkpointing, bf16 autocast,
the weight-sync iterator, seeds, and the checkpoint-path check. The model under test is the scripts' own:
common.loading.load_sharded, which in one process is from_pretrained (fp32) then shard_model; a plain
from_pretrained model is only ever the reference. (Multi-process sharding is exercised by the torchrun tests of
each script.)"""
import pytest
import torch
from transformers import AutoModelForCausalLM

from common.dist import DistInfo, check_model_path, derive_seed, full_params, unwrap
from common.loading import load_sharded


def _loss_head(targets):
    def head(hidden, weight):                   # a plain full-logit cross entropy, in fp32
        logits = hidden.float() @ weight.float().T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
    return head


def _grads(model_dir, ids, **shard_kwargs):
    torch.manual_seed(0)
    model = load_sharded(model_dir, DistInfo(), "fsdp", **shard_kwargs)     # as the scripts build it
    assert model.training                       # shard_model's own mode: from_pretrained returns eval
    loss = model(ids[:, :-1], attention_mask=torch.ones_like(ids[:, :-1]), head=_loss_head(ids[:, 1:]))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in unwrap(model).named_parameters()}, unwrap(model)


def test_head_sees_the_lm_head_weight_and_matches_the_hf_logits(tiny):
    lm = AutoModelForCausalLM.from_pretrained(tiny["model"], dtype=torch.float32)       # the reference
    ids = torch.randint(0, lm.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    model = load_sharded(tiny["model"], DistInfo(), "fsdp", bf16=False)
    with torch.no_grad():
        ref = lm(ids).logits
        got = model(ids, head=lambda h, w: h @ w.T)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_activation_checkpointing_gives_the_same_gradients(tiny):
    ids = torch.randint(0, 200, (3, 17), generator=torch.Generator().manual_seed(1))
    loss0, g0, lm0 = _grads(tiny["model"], ids)
    loss1, g1, lm1 = _grads(tiny["model"], ids, activation_checkpointing=True)
    assert lm1.is_gradient_checkpointing and not lm0.is_gradient_checkpointing
    torch.testing.assert_close(loss1, loss0, atol=1e-6, rtol=0)
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], atol=1e-6, rtol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_bf16_autocast_without_fsdp_is_bf16_compute_on_fp32_weights(tiny):
    """--bf16 with DDP / one process: the decoder runs under bf16 autocast and the head gets bf16 hidden
    states and weight; the parameters (and so the optimizer) stay fp32; the loss moves by bf16 rounding only."""
    ids = torch.randint(0, 200, (2, 13), generator=torch.Generator().manual_seed(2))
    seen = {}

    def head(hidden, weight):
        seen["dtypes"] = (hidden.dtype, weight.dtype)
        return _loss_head(ids[:, 1:])(hidden, weight)

    model = load_sharded(tiny["model"], DistInfo(), "fsdp", bf16=True)
    loss = model(ids[:, :-1], head=head)
    loss.backward()
    assert seen["dtypes"] == (torch.bfloat16, torch.bfloat16)
    assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32 for p in unwrap(model).parameters())
    loss32, _, _ = _grads(tiny["model"], ids)
    assert loss.item() == pytest.approx(loss32.item(), rel=2e-2) and loss.item() != loss32.item()


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_full_params_sends_each_weight_once_under_its_hf_name(which, request):
    paths = request.getfixturevalue(which)
    lm = AutoModelForCausalLM.from_pretrained(paths["model"], dtype=torch.float32)     # the reference
    model = load_sharded(paths["model"], DistInfo(), "fsdp")
    sent = list(full_params(model, dtype=torch.bfloat16))
    names = [n for n, _ in sent]
    assert len(names) == len(set(names))
    state = lm.state_dict()
    expected = set(state) - ({"lm_head.weight"} if lm.config.tie_word_embeddings else set())
    assert set(names) == expected                    # tied: the lm_head is the embedding, sent once
    for name, t in sent:
        assert t.dtype == torch.bfloat16 and torch.equal(t, state[name].to(torch.bfloat16)), name
    only = [n for n, _ in full_params(model, names={"model.norm.weight"})]
    assert only == ["model.norm.weight"]


def test_derive_seed_is_stable_and_distinct():
    seeds = {derive_seed(s, r, t, k) for s in range(3) for r in range(4) for t in range(5) for k in range(3)}
    assert len(seeds) == 3 * 4 * 5 * 3
    assert derive_seed(1, 2, 3, 4) == derive_seed(1, 2, 3, 4)
    assert all(0 <= s < 2**32 for s in seeds)


def test_check_model_path(tiny, tmp_path):
    check_model_path(tiny["model"])                  # a HF checkpoint directory
    check_model_path("Qwen/Qwen3-4B-Base")           # looks like a hub id: not checked here (no network)
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="without config.json"):
        check_model_path(str(tmp_path / "empty"))
    for bad in (str(tmp_path / "missing"), "./runs/x/final", "runs/x/final", "~/nope"):
        with pytest.raises(SystemExit, match="does not exist"):
            check_model_path(bad)


def test_shard_model_rejects_an_unknown_mode(tiny):
    with pytest.raises(ValueError, match="--sharding must be fsdp, ddp or none"):
        load_sharded(tiny["model"], DistInfo(), "zero3")
