"""common/checkpoint.py: exact round trips, HF/vLLM loadability, tying, atomicity, pruning, and the same
under torchrun (FSDP2 and DDP on gloo, tests/_ckpt_worker.py)."""
import json
import os
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

from common.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    return AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)


def trained(model_dir, steps=2):
    """The fixture model after a few AdamW steps, so weights and optimizer moments are non-trivial."""
    model, tok = load(model_dir)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 12), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, tok, opt


def draws():
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def safetensors_keys(ckpt):
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        return set(f.keys())


def test_round_trip_restores_weights_optimizer_rng_and_state(tiny, tmp_path):
    model, tok, opt = trained(tiny["model"])
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt = save_checkpoint(str(tmp_path), 7, model, tok, opt, {"cursor": 123, "config": {"lr": 1e-2}})
    assert ckpt == str(tmp_path / "checkpoints" / "step_000007") == latest_checkpoint(str(tmp_path))
    expected = draws()

    fresh, _ = load(tiny["model"])
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=5.0)
    draws()                                         # move every generator on; loading must rewind them
    state = load_checkpoint(ckpt, fresh, fresh_opt)
    assert state == {"step": 7, "cursor": 123, "config": {"lr": 1e-2}}
    assert draws() == expected
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    s0, s1 = opt.state_dict(), fresh_opt.state_dict()
    assert s1["param_groups"][0]["lr"] == 1e-2 and s0["state"].keys() == s1["state"].keys()
    for k in s0["state"]:
        for n in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s0["state"][k][n], s1["state"][k][n]), (k, n)
    # and the resumed optimizer takes the same next step
    ids = torch.arange(2, 14).view(1, 12)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        m(input_ids=ids, labels=ids).loss.backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_hf_dir_loads_as_is_with_same_logits_and_tying(which, request, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok, opt = trained(request.getfixturevalue(which)["model"])
    ckpt = save_checkpoint(str(tmp_path), 2, model, tok, opt)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(ckpt))
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.arange(2, 26).view(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded.generation_config.eos_token_id == model.generation_config.eos_token_id
    tied = which == "tiny"
    # Qwen3-4B style: one tensor on disk, re-tied on load; Qwen3-8B style: both on disk, separate.
    assert ("lm_head.weight" in safetensors_keys(ckpt)) == (not tied)
    assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
    # save_hf writes the same HF files, without resume/, and replaces an older copy in one rename
    out = tmp_path / "final"
    for _ in range(2):
        save_hf(str(out), model, tok)
    assert not os.path.exists(str(out) + ".tmp") and "resume" not in os.listdir(out)
    assert safetensors_keys(str(out)) == safetensors_keys(ckpt)


def test_crash_mid_save_leaves_only_tmp_and_next_save_cleans_up(tiny, tmp_path, monkeypatch):
    model, tok, opt = trained(tiny["model"], steps=1)
    run = str(tmp_path)
    first = save_checkpoint(run, 1, model, tok, opt)

    original = type(model).save_pretrained

    def crash(self, *args, **kwargs):                # the weights get written, then the process "dies"
        original(self, *args, **kwargs)
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint(run, 2, model, tok, opt)
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000001", "step_000002.tmp"]
    assert latest_checkpoint(run) == first

    third = save_checkpoint(run, 3, model, tok, opt)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000001", "step_000003"]
    assert latest_checkpoint(run) == third


def test_keep_last_prunes_oldest_and_resave_replaces(tiny, tmp_path):
    model, tok, _ = trained(tiny["model"], steps=1)
    run = str(tmp_path)
    for step in (1, 2, 3):
        save_checkpoint(run, step, model, tok, keep_last=2)   # no optimizer: weights, RNG, state only
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000002", "step_000003"]
    save_checkpoint(run, 3, model, tok, state={"again": True}, keep_last=2)   # same step again: replaced
    assert load_checkpoint(latest_checkpoint(run), model)["again"] is True
    for step in (4, 5):
        save_checkpoint(run, step, model, tok, keep_last=0)   # <= 0 keeps all
    assert len(os.listdir(os.path.join(run, "checkpoints"))) == 4
    assert latest_checkpoint(str(tmp_path / "nothing_here")) is None


def test_clear_errors(tiny, tmp_path):
    model, tok, opt = trained(tiny["model"], steps=1)
    with pytest.raises(FileNotFoundError, match="latest_checkpoint"):
        load_checkpoint(str(tmp_path / "checkpoints" / "step_000009"), model)
    hf_only = save_hf(str(tmp_path / "final"), model, tok)
    with pytest.raises(FileNotFoundError, match="from_pretrained"):
        load_checkpoint(hf_only, model, opt)
    no_optim = save_checkpoint(str(tmp_path), 1, model, tok)
    with pytest.raises(FileNotFoundError, match="without an optimizer"):
        load_checkpoint(no_optim, model, opt)
    with pytest.raises(TypeError):                    # a state JSON cannot hold fails before any file is written
        save_checkpoint(str(tmp_path), 2, model, tok, state={"bad": object()})
    assert not os.path.exists(tmp_path / "checkpoints" / "step_000002.tmp")


def test_torchrun_fsdp2_and_ddp(tiny, tmp_path):
    """2 processes on gloo: FSDP2 and DDP round trips, FSDP2 -> DDP resharding, HF logits (see the worker)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_ckpt_worker.py"), tiny["model"], str(tmp_path)]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = {}
    for rank in (0, 1):
        path = tmp_path / f"result_rank{rank}.json"
        results[rank] = json.loads(path.read_text()) if path.exists() else None
    assert proc.returncode == 0 and all(results.values()), (results, proc.stdout[-3000:], proc.stderr[-3000:])
    assert {k for k, v in results[0].items() if v} >= {"fsdp_params", "fsdp_optim", "fsdp_rng", "hf_logits",
                                                       "tied_written_once", "ddp_params", "cross_optim"}


def test_vllm_loads_checkpoint_as_is(tiny, tmp_path):
    """vLLM reads a step dir (resume/ inside and all) and scores a prompt as the saved model does.
    The tied fixture: vLLM must re-tie the head that is not on disk."""
    vllm = pytest.importorskip("vllm")
    model, tok, opt = trained(tiny["model"])
    ckpt = save_checkpoint(str(tmp_path), 2, model, tok, opt)
    ids = tok("What is 3+22?\nAnswer: 25").input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
    want = logp.gather(1, torch.tensor(ids[1:])[:, None])[:, 0]           # [len(ids) - 1]
    llm = vllm.LLM(model=ckpt, dtype="float32", max_model_len=128, enforce_eager=True, seed=0,
                   kv_cache_memory_bytes=32 << 20)
    out = llm.generate([{"prompt_token_ids": ids}], vllm.SamplingParams(max_tokens=1, prompt_logprobs=0),
                       use_tqdm=False)
    got = torch.tensor([lp[t].logprob for lp, t in zip(out[0].prompt_logprobs[1:], ids[1:])], dtype=torch.float64)
    assert torch.allclose(got, want, atol=1e-3), (got, want)
