"""bench/estimate_memory.py on a small Qwen3 config, in-process, over a fake 2-rank process group."""
import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench"))
import estimate_memory as em  # noqa: E402

SMALL = {"architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3", "hidden_size": 256, "intermediate_size": 512,
         "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 64,
         "vocab_size": 4096, "tie_word_embeddings": False, "max_position_embeddings": 8192, "rope_theta": 1e6,
         "rms_norm_eps": 1e-6}


@pytest.fixture(scope="module")
def cfg(tmp_path_factory):
    d = tmp_path_factory.mktemp("qwen3_small")
    (d / "config.json").write_text(json.dumps(SMALL))
    em.register_attention()
    return em.load_config(str(d), "varlen")


def test_activations_grow_with_tokens_and_checkpointing_lowers_them(cfg):
    r = {(t, ac): em.simulate(cfg, "rl", 2, t, ac) for t in (1024, 4096) for ac in (False, True)}
    assert r[4096, False]["activations"] > 2 * r[1024, False]["activations"]
    assert r[4096, True]["activations"] < 0.7 * r[4096, False]["activations"]
    assert r[4096, True]["peak"] < r[4096, False]["peak"]


def test_sharded_state_matches_param_count(cfg):
    """At the peak of a steady-state step every rank holds its 1/W of the fp32 masters and the two AdamW moments
    (the peak is in backward, where the sharded grads may be partly allocated)."""
    n = sum(p.numel() for p in em.make_lm(cfg).parameters())
    r = em.simulate(cfg, "rl", 2, 1024, False)
    assert r["optim"] == pytest.approx(n / 2 * 8, rel=0.01)
    assert n / 2 * 4 <= r["params"] <= n / 2 * 4 + n * 2      # + at most the gathered bf16 copies
    assert r["grads"] <= n / 2 * 4 + n * 4


def test_cuda_weight_grad_temporary_is_counted(cfg):
    """The CUDA branch of the chunked head's dW accumulation holds one more fp32 [V, H] than an in-place one."""
    vh = SMALL["vocab_size"] * SMALL["hidden_size"] * 4
    cuda = em.simulate(cfg, "rl", 2, 2048, True, wgrad="cuda")["head_dw"]
    inplace = em.simulate(cfg, "rl", 2, 2048, True, wgrad="inplace")["head_dw"]
    assert cuda - inplace == pytest.approx(vh, rel=0.01)


def test_packed_sdpa_row_pays_for_the_mask(cfg, tmp_path):
    """transformers' sdpa builds a [1, 1, T, T] mask for a packed row, none for a single sequence; the varlen
    kernel model needs none either way. Also the CLI: table and JSON."""
    d = tmp_path / "cfg"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(SMALL))
    out = tmp_path / "m.json"
    em.main(["--config", str(d), "--world", "2", "--stage", "rl", "reheat", "eval", "--tokens", "8192", "--ac", "off",
             "--attention", "both", "--packing", "both", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    peak = {(r["stage"], r["attention"], r["packing"]): r["peak_gib"] for r in rows}
    t = 8192                                            # two packed sequences of 4096
    assert peak["rl", "sdpa", "packed"] - peak["rl", "sdpa", "single"] > t * t * 1 / em.GIB   # at least the bool mask
    assert peak["rl", "varlen", "packed"] <= peak["rl", "sdpa", "single"] + 1e-3
    assert all(r["fits_80gb"] for r in rows) and {r["stage"] for r in rows} == {"rl", "reheat", "eval"}


def test_the_simulation_runs_the_scripts_own_loader(cfg, monkeypatch):
    """The model comes from common.loading.load_sharded (issue 17): left in eval mode by the scripts' own code, as
    it once was, checkpointing recomputes nothing and the simulated activations are those of no checkpointing."""
    import common.loading as loading
    real = loading.shard_model
    ok = em.simulate(cfg, "rl", 2, 4096, True)
    off = em.simulate(cfg, "rl", 2, 4096, False)
    monkeypatch.setattr(loading, "shard_model", lambda *a, **kw: real(*a, **kw).eval())
    bug = em.simulate(cfg, "rl", 2, 4096, True)
    assert ok["activations"] < 0.7 * bug["activations"]
    assert bug["activations"] == pytest.approx(off["activations"], rel=0.01)


def test_rollout_budget_is_what_is_free_less_the_margin(cfg):
    from common.rollout import VLLM_MARGIN_GIB
    n = sum(p.numel() for p in em.make_lm(cfg).parameters())
    r = em.rollout_budget(cfg, "rl", 2, 80.0, 1.0, 3.0)
    assert r["params"] == n and r["resident_gib"] == pytest.approx(n * 12 / 2 / em.GIB)
    assert r["budget_gib"] == pytest.approx(80.0 - 1.0 - r["resident_gib"] - VLLM_MARGIN_GIB)
    per_token = 2 * SMALL["num_hidden_layers"] * SMALL["num_key_value_heads"] * SMALL["head_dim"] * 2
    assert r["kv_tokens"] == pytest.approx((r["budget_gib"] - n * 2 / em.GIB - 3.0) * em.GIB / per_token)
    reheat = em.rollout_budget(cfg, "reheat", 2, 80.0, 1.0, 3.0)    # + the teacher's shards and its bf16 head
    head = SMALL["vocab_size"] * SMALL["hidden_size"]
    assert reheat["resident_gib"] - r["resident_gib"] == pytest.approx((n * 4 / 2 + head * 2) / em.GIB)
