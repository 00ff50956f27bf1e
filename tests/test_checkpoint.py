"""common/checkpoint.py: exact round trips (from the fp32 DCP weights, whatever the export dtype; from the HF
weights of the old layout), HF/vLLM loadability of fp32 and bf16 exports, tying, atomicity, pruning, sizes and
the disk check, and the same under torchrun (FSDP2 and DDP on gloo, tests/_ckpt_worker.py)."""
import json
import os
import random
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open

import common.checkpoint
from common.checkpoint import (check_disk_space, checkpoint_bytes, count_params, drop_snapshots_after,
                               latest_checkpoint, load_checkpoint, save_checkpoint, save_hf, save_snapshot,
                               stored_dtype)
from common.loading import make_optimizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def draws():
    return [random.random(), float(np.random.rand()), torch.rand(3).tolist()]


def safetensors_keys(ckpt):
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        return set(f.keys())


def safetensors_dtypes(ckpt):
    with safe_open(os.path.join(ckpt, "model.safetensors"), "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


def dir_bytes(path):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(path) for f in files)


def adam_state(model, opt):
    """{HF name: {exp_avg, exp_avg_sq, step}} of a one-process model."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
    return get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True))["state"]


def lm_loss(model, ids):
    """Next-token cross-entropy of the scripts' root, computed by a head inside its forward as the scripts' are."""
    import torch.nn.functional as F
    return model(ids, head=lambda h, w: F.cross_entropy((h[:, :-1] @ w.T).flatten(0, 1), ids[:, 1:].flatten()))


def fresh_model(model_dir):
    """The scripts' one-process model as loaded (common.loading.load_sharded), untrained."""
    from common.dist import DistInfo
    from common.loading import load_sharded
    return load_sharded(model_dir, DistInfo(), "fsdp")


def hf(model):
    """The HF model inside the scripts' root (common.dist.unwrap), for what only a HF model has."""
    from common.dist import unwrap
    return unwrap(model)


def scripts_model_trained(model_dir, steps=2):
    """The scripts' one-process model (load_sharded: from_pretrained, then shard_model's LMWithHead root) after a few
    AdamW steps (as the scripts build their optimizer: on the root's parameters)."""
    from transformers import AutoTokenizer
    from common.dist import DistInfo
    from common.loading import load_sharded
    model = load_sharded(model_dir, DistInfo(), "fsdp")
    opt = make_optimizer(model, lr=1e-2, weight_decay=0.1)            # the scripts' optimizer
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        lm_loss(model, torch.randint(0, 300, (2, 12), generator=g)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model, AutoTokenizer.from_pretrained(model_dir), opt


def hf_names(state):
    """A state dict of the scripts' root keyed by HF names (without LMWithHead's "lm.")."""
    return {k.removeprefix("lm."): v for k, v in state.items()}


@pytest.mark.parametrize("export", [None, torch.bfloat16], ids=["fp32_export", "bf16_export"])
def test_round_trip_restores_weights_optimizer_rng_and_state(export, tiny, tmp_path):
    """Exact (bitwise fp32 weights) from resume/model/ even when the HF export next to it is bf16; the scripts'
    one-process model (load_sharded: the LMWithHead root, names with its "lm." prefix) and optimizer."""
    from common.dist import DistInfo
    from common.loading import load_sharded
    model, tok, opt = scripts_model_trained(tiny["model"])
    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    ckpt = save_checkpoint(str(tmp_path), 7, model, tok, opt, {"cursor": 123, "config": {"lr": 1e-2}}, dtype=export)
    assert safetensors_dtypes(ckpt) == {"BF16" if export else "F32"}
    if export is not None:      # the export alone could not give the weights back
        assert not all(torch.equal(p, p.to(export).float()) for p in model.parameters())
    assert ckpt == str(tmp_path / "checkpoints" / "step_000007") == latest_checkpoint(str(tmp_path))
    expected = draws()

    fresh = load_sharded(tiny["model"], DistInfo(), "fsdp")
    fresh_opt = make_optimizer(fresh, lr=5.0, weight_decay=0.01)
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
        lm_loss(m, ids).backward()
        o.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_hf_dir_loads_as_is_with_same_logits_and_tying(which, request, tmp_path):
    from transformers import AutoModelForCausalLM
    model, tok, opt = scripts_model_trained(request.getfixturevalue(which)["model"])
    ckpt = save_checkpoint(str(tmp_path), 2, model, tok, opt)
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= set(os.listdir(ckpt))
    loaded = AutoModelForCausalLM.from_pretrained(ckpt)
    ids = torch.arange(2, 26).view(2, 12)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, hf(model)(input_ids=ids).logits)
    assert loaded.generation_config.eos_token_id == hf(model).generation_config.eos_token_id
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


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_bf16_export_is_the_weights_rounded_and_loads_as_bf16(which, request, tmp_path):
    """dtype=torch.bfloat16: the checkpoint's and save_hf's HF dirs hold bf16 tensors (a tied head once), say
    "bfloat16" in config.json, and from_pretrained loads them as bf16 equal to the fp32 weights rounded."""
    from transformers import AutoModelForCausalLM
    model, tok, opt = scripts_model_trained(request.getfixturevalue(which)["model"])
    assert stored_dtype(request.getfixturevalue(which)["model"]) == torch.float32
    ckpt = save_checkpoint(str(tmp_path), 2, model, tok, opt, dtype=torch.bfloat16)
    final = save_hf(str(tmp_path / "final"), model, tok, dtype=torch.bfloat16)
    assert all(p.dtype == torch.float32 for p in model.parameters())    # the export did not touch the model
    tied = which == "tiny"
    for out in (ckpt, final):
        assert json.load(open(os.path.join(out, "config.json")))["dtype"] == "bfloat16"
        assert stored_dtype(out) == torch.bfloat16
        assert safetensors_dtypes(out) == {"BF16"}
        assert ("lm_head.weight" in safetensors_keys(out)) == (not tied)
        loaded = AutoModelForCausalLM.from_pretrained(out)               # dtype "auto": the config's
        assert loaded.dtype == torch.bfloat16
        assert (loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()) == tied
        got = dict(loaded.named_parameters(remove_duplicate=False))
        for name, p in hf(model).named_parameters(remove_duplicate=False):
            assert torch.equal(got[name], p.detach().to(torch.bfloat16)), (out, name)
    # half the bytes of the fp32 export
    fp32 = save_hf(str(tmp_path / "final32"), model, tok)
    assert os.path.getsize(os.path.join(fp32, "model.safetensors")) > 1.9 * os.path.getsize(
        os.path.join(final, "model.safetensors"))


def test_old_layout_resumes_from_its_hf_weights(tiny, tmp_path):
    """A checkpoint written before resume/model/ existed (fp32 HF export + resume/optimizer/, ...): load_checkpoint
    reads the HF weights, exactly; a bf16 export in that layout resumes rounded, with a warning."""
    model, tok, opt = scripts_model_trained(tiny["model"])
    old = save_checkpoint(str(tmp_path), 3, model, tok, opt)   # the export as held (fp32), as the old layout wrote it
    shutil.rmtree(os.path.join(old, "resume", "model"))        # which had no DCP weights
    assert sorted(os.listdir(os.path.join(old, "resume"))) == ["optimizer", "rng_rank0.pt", "trainer_state.json"]
    fresh = fresh_model(tiny["model"])
    fresh_opt = make_optimizer(fresh, lr=5.0, weight_decay=0.01)
    with warnings.catch_warnings():
        warnings.simplefilter("error")                          # fp32 on disk and in the model: no warning
        assert load_checkpoint(old, fresh, fresh_opt)["step"] == 3
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a, b), name
    want, got = adam_state(model, opt), adam_state(fresh, fresh_opt)
    assert want.keys() == got.keys() and all(torch.equal(want[k][n], got[k][n]) for k in want for n in want[k])

    rounded = save_checkpoint(str(tmp_path), 4, model, tok, dtype=torch.bfloat16)
    shutil.rmtree(os.path.join(rounded, "resume", "model"))
    with pytest.warns(UserWarning, match="rounded"):
        load_checkpoint(rounded, fresh)
    for (name, a), b in zip(model.named_parameters(), fresh.parameters()):
        assert torch.equal(a.detach().to(torch.bfloat16).float(), b), name


def hand_count(config: dict) -> int:
    """Qwen3's parameters from its config.json, by hand: embeddings, per layer q/k/v/o (+ q/k RMSNorm), the
    SwiGLU MLP and two RMSNorms, the final norm, an untied head."""
    h, i, v, d = config["hidden_size"], config["intermediate_size"], config["vocab_size"], config["head_dim"]
    q, kv = config["num_attention_heads"] * d, config["num_key_value_heads"] * d
    layer = h * q + 2 * h * kv + q * h + 2 * d + 3 * h * i + 2 * h
    return v * h + config["num_hidden_layers"] * layer + h + (0 if config["tie_word_embeddings"] else v * h)


@pytest.mark.parametrize("which", ["tiny", "tiny_untied"])
def test_sizes_count_params_and_checkpoint_bytes(which, request, tmp_path):
    """count_params and checkpoint_bytes against a hand count, and against what save_checkpoint writes."""
    model_dir = request.getfixturevalue(which)["model"]
    n = hand_count(json.load(open(os.path.join(model_dir, "config.json"))))
    model, tok, opt = scripts_model_trained(model_dir, steps=1)
    assert count_params(model) == n
    assert checkpoint_bytes(n, torch.bfloat16) == n * (4 + 4 + 4 + 2)      # fp32 weights, exp_avg, exp_avg_sq, bf16
    assert checkpoint_bytes(n, None) == checkpoint_bytes(n, torch.float32) == n * 16
    assert checkpoint_bytes(n, torch.bfloat16, optimizer=False) == n * 6
    ckpt = save_checkpoint(str(tmp_path), 1, model, tok, opt, dtype=torch.bfloat16)
    # on disk: each part is its share of checkpoint_bytes plus its headers / DCP metadata / step counters (measured:
    # 4, 62 and 206 KiB); a tied head written twice would add its 192 KiB (fp32) / 96 KiB (bf16)
    parts = {"model.safetensors": (2 * n, 16), "resume/model": (4 * n, 128), "resume/optimizer": (8 * n, 320)}
    for part, (want, slack_kib) in parts.items():
        got = dir_bytes(os.path.join(ckpt, part)) if os.path.isdir(os.path.join(ckpt, part)) else \
            os.path.getsize(os.path.join(ckpt, part))
        assert want <= got < want + (slack_kib << 10), (part, got, want)

    # Qwen3 at full size on the meta device: the numbers in the module docstring
    from transformers import AutoConfig, AutoModelForCausalLM
    for name, params, tied, before, now in (("qwen3-8b-base", 8_190_735_360, False, "98.3 GB", "114.7 GB"),
                                            ("qwen3-4b-base", 4_022_468_096, True, "48.3 GB", "56.3 GB")):
        path = os.path.join(ROOT, "assets", "configs", name)
        config = AutoConfig.from_pretrained(path)
        with torch.device("meta"):
            lm = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        assert count_params(lm) == hand_count(json.load(open(os.path.join(path, "config.json")))) == params
        assert config.tie_word_embeddings == tied and stored_dtype(path) == torch.bfloat16
        assert f"{12 * params / 1e9:.1f} GB" == before             # the old layout: fp32 export + moments
        assert f"{checkpoint_bytes(params, torch.bfloat16) / 1e9:.1f} GB" == now
        assert before in common.checkpoint.__doc__ and now in common.checkpoint.__doc__


def test_stored_dtype(tmp_path):
    assert stored_dtype(os.path.join(ROOT, "assets", "tiny_math", "model")) == torch.float32
    for config, want in (({"dtype": "bfloat16"}, torch.bfloat16), ({"torch_dtype": "float16"}, torch.float16),
                         ({"torch_dtype": "torch.bfloat16"}, torch.bfloat16), ({}, torch.float32)):
        (tmp_path / "config.json").write_text(json.dumps(config))
        assert stored_dtype(str(tmp_path)) == want, config
    (tmp_path / "config.json").write_text(json.dumps({"dtype": "int8"}))
    with pytest.raises(ValueError, match="int8"):
        stored_dtype(str(tmp_path))


def test_check_disk_space_exits_with_one_line(tmp_path, monkeypatch):
    n = 8_190_735_360
    need = checkpoint_bytes(n, torch.bfloat16)
    asked, free = [], {"bytes": need}

    def disk_usage(path):
        asked.append(path)
        return shutil._ntuple_diskusage(total=10 * need, used=10 * need - free["bytes"], free=free["bytes"])

    monkeypatch.setattr(common.checkpoint.shutil, "disk_usage", disk_usage)
    run_dir = str(tmp_path / "runs" / "not_yet")                # not made yet: its filesystem is asked
    assert check_disk_space(run_dir, n, torch.bfloat16, keep_last=2) is None    # exactly one checkpoint fits
    assert asked == [str(tmp_path)]
    free["bytes"] = need - 1
    with pytest.raises(SystemExit) as exc:
        check_disk_space(run_dir, n, torch.bfloat16, keep_last=2)
    msg = str(exc.value)
    assert "\n" not in msg and exc.value.code == msg                # one line, exit status 1
    for part in (str(tmp_path), f"{(need - 1) / 1e9:.1f} GB free", f"needs {need / 1e9:.1f} GB", "bfloat16 export",
                 "--out", "--keep-last 2", "3 checkpoints", f"{3 * need / 1e9:.1f} GB"):
        assert part in msg, (part, msg)
    with pytest.raises(SystemExit, match="keeps every checkpoint"):
        check_disk_space(run_dir, n, torch.bfloat16, keep_last=0)
    # without the optimizer (a frozen model's run) the need is smaller and fits
    check_disk_space(run_dir, n, torch.bfloat16, keep_last=2, optimizer=False)
    # --snapshot-every: one snapshot (the bf16 export alone, 2 B/param) on top of the checkpoint
    free["bytes"] = need + 2 * n
    check_disk_space(run_dir, n, torch.bfloat16, keep_last=2, snapshot=True)
    free["bytes"] = need + 2 * n - 1
    with pytest.raises(SystemExit, match=rf"needs {(need + 2 * n) / 1e9:.1f} GB .*\+ a bfloat16 snapshot"):
        check_disk_space(run_dir, n, torch.bfloat16, keep_last=2, snapshot=True)


def test_crash_mid_save_leaves_only_tmp_and_next_save_cleans_up(tiny, tmp_path, monkeypatch):
    model, tok, opt = scripts_model_trained(tiny["model"], steps=1)
    run = str(tmp_path)
    first = save_checkpoint(run, 1, model, tok, opt)

    original = type(hf(model)).save_pretrained

    def crash(self, *args, **kwargs):                # the weights get written, then the process "dies"
        original(self, *args, **kwargs)
        raise RuntimeError("killed mid-save")

    monkeypatch.setattr(type(hf(model)), "save_pretrained", crash)
    with pytest.raises(RuntimeError, match="killed mid-save"):
        save_checkpoint(run, 2, model, tok, opt)
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000001", "step_000002.tmp"]
    assert latest_checkpoint(run) == first

    third = save_checkpoint(run, 3, model, tok, opt)
    assert sorted(os.listdir(os.path.join(run, "checkpoints"))) == ["step_000001", "step_000003"]
    assert latest_checkpoint(run) == third


def test_keep_last_prunes_oldest_and_resave_replaces(tiny, tmp_path):
    model, tok, _ = scripts_model_trained(tiny["model"], steps=1)
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


def test_snapshots_are_hf_dirs_kept_by_keep_last_and_dropped_after_a_resumed_step(tiny, tmp_path):
    """save_snapshot: the HF export alone (bf16 here, no resume/), which keep_last never prunes; drop_snapshots_after
    removes the later steps' (and a killed write's .tmp), as a run resumed from an earlier checkpoint does."""
    model, tok, opt = scripts_model_trained(tiny["model"], steps=1)
    run = str(tmp_path)
    for step in (1, 2, 3):
        save_snapshot(run, step, model, tok, dtype=torch.bfloat16)
        save_checkpoint(run, step, model, tok, opt, keep_last=1)
    assert os.listdir(os.path.join(run, "checkpoints")) == ["step_000003"]
    snaps = os.path.join(run, "snapshots")
    assert sorted(os.listdir(snaps)) == ["step_000001", "step_000002", "step_000003"]
    one = os.path.join(snaps, "step_000001")
    assert "resume" not in os.listdir(one) and safetensors_dtypes(one) == {"BF16"}
    assert stored_dtype(one) == torch.bfloat16
    os.makedirs(os.path.join(snaps, "step_000004.tmp"))
    drop_snapshots_after(run, 1)
    assert os.listdir(snaps) == ["step_000001"]


def test_clear_errors(tiny, tmp_path):
    model, tok, opt = scripts_model_trained(tiny["model"], steps=1)
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
    """2 processes on gloo, the scripts' own model (load_sharded) under FSDP2 and DDP: round trips (FSDP2 with a
    bf16 export), FSDP2 -> DDP resharding, a checkpoint of the scripts' one-process model resumed under FSDP2, HF
    exports (see the worker); then the FSDP2 checkpoint resumed here, into the one-process model, without a
    process group."""
    model, tok, opt = scripts_model_trained(tiny["model"])
    plain_ckpt = save_checkpoint(str(tmp_path / "plain"), 2, model, tok, opt, dtype=torch.bfloat16)
    torch.save({"params": hf_names(model.state_dict()), "optim": hf_names(adam_state(model, opt))},
               tmp_path / "plain" / "full.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_ckpt_worker.py"), tiny["model"], str(tmp_path), plain_ckpt]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = {}
    for rank in (0, 1):
        path = tmp_path / f"result_rank{rank}.json"
        results[rank] = json.loads(path.read_text()) if path.exists() else None
    failed = {rank: [k for k, v in r.items() if not v] for rank, r in results.items() if r}
    assert proc.returncode == 0 and all(results.values()), (failed, proc.stdout[-3000:], proc.stderr[-3000:])
    assert {k for k, v in results[0].items() if v} >= {
        "fsdp_params", "fsdp_optim", "fsdp_rng", "fsdp_cast_before_gather", "hf_bf16_export", "count_params",
        "hf_logits", "tied_written_once", "ddp_params", "cross_params", "cross_optim", "plain_to_fsdp_params",
        "plain_to_fsdp_optim"}

    fsdp = torch.load(tmp_path / "fsdp_full.pt", weights_only=True)
    from common.dist import DistInfo
    from common.loading import load_sharded
    one = load_sharded(tiny["model"], DistInfo(), "fsdp")
    one_opt = make_optimizer(one, lr=5.0, weight_decay=0.01)
    load_checkpoint(fsdp["ckpt"], one, one_opt)
    got = hf_names(one.state_dict())
    assert got.keys() == fsdp["params"].keys() and all(torch.equal(got[k], fsdp["params"][k]) for k in got)
    got = hf_names(adam_state(one, one_opt))
    assert got.keys() == fsdp["optim"].keys() and all(
        torch.equal(got[k][n], fsdp["optim"][k][n]) for k in got for n in ("exp_avg", "exp_avg_sq", "step"))


@pytest.mark.parametrize("export", [None, torch.bfloat16], ids=["fp32_export", "bf16_export"])
def test_vllm_loads_checkpoint_as_is(export, tiny, tmp_path):
    """vLLM reads a step dir (resume/ inside and all) and scores a prompt as the saved model does (a bf16
    export: as the saved model rounded to bf16 does). The tied fixture: vLLM must re-tie the head that is
    not on disk. dtype="float32" as common/rollout.py runs vLLM on a CPU."""
    vllm = pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM
    model, tok, opt = scripts_model_trained(tiny["model"])
    ckpt = save_checkpoint(str(tmp_path), 2, model, tok, opt, dtype=export)
    if export is not None:      # the reference: the export read back in fp32, i.e. the weights rounded to bf16
        rounded = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)
        assert not all(torch.equal(a, b) for a, b in zip(rounded.parameters(), hf(model).parameters()))
        model = rounded
    else:
        model = hf(model)
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
