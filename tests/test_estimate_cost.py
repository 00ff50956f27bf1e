"""bench/estimate_cost.py against hand computations (meta-device models only: no weights, a few seconds)."""
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import estimate_cost as ec  # noqa: E402

CFG_4B = json.load(open(os.path.join(ROOT, "assets", "configs", "qwen3-4b-base", "config.json")))
CFG_8B = json.load(open(os.path.join(ROOT, "assets", "configs", "qwen3-8b-base", "config.json")))

# Every time assumption pinned, so the arithmetic can be done by hand: a fixed decode rate, no tail, no overheads,
# every response exactly 4000 tokens, no attention FLOPs unless a test turns them on.
PINNED = ["--configs", "4b", "--decode-tok-s", "4000", "--no-tail", "--no-attention-flops", "--length-cv", "0",
          "--mean-response", "4000", "--prompt-tokens", "200", "--step-overhead-s", "0", "--startup-s", "0",
          "--mfu", "0.4", "--peak-tflops", "1000", "--gen-batches-collapse", "2", "--gen-batches-arms", "3",
          "--val-problems", "0"]


def params_by_hand(c: dict) -> int:
    """Qwen3 parameters from the config's dimensions: embedding, per layer q/k/v/o + q/k RMSNorm + SwiGLU MLP +
    two RMSNorms, the final norm, and an lm_head unless tied."""
    h, i, v, hd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * hd, c["num_key_value_heads"] * hd
    layer = h * q + 2 * h * kv + q * h + 2 * hd + 3 * h * i + 2 * h
    return v * h + c["num_hidden_layers"] * layer + h + (0 if c["tie_word_embeddings"] else v * h)


def run(tmp_path, *extra, name="out.json"):
    out = tmp_path / name
    res = ec.main([*PINNED, *extra, "--json", str(out)])
    return res, json.loads(out.read_text())


def stage(res, name, config="4b"):
    return next(r for r in res["stages"] if r["stage"] == name and r["config"] == config)


def test_parameter_counts_match_the_configs():
    a = ec.build_parser(*ec._script_defaults())[0].parse_args([])
    for spec, cfg in (("4b", CFG_4B), ("8b", CFG_8B)):
        m = ec.model_facts(spec, a)
        assert m["params"] == params_by_hand(cfg)
        embed = cfg["vocab_size"] * cfg["hidden_size"]
        assert m["matmul_params"] == params_by_hand(cfg) - (0 if cfg["tie_word_embeddings"] else embed)
        # K and V, every layer, every KV head, bf16
        assert m["kv_bytes_per_token"] == 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * \
            cfg["head_dim"] * 2 == 147456
    assert params_by_hand(CFG_4B) == 4_022_468_096 and params_by_hand(CFG_8B) == 8_190_735_360


def test_stage_arithmetic_by_hand(tmp_path):
    res, js = run(tmp_path)
    n = params_by_hand(CFG_4B)                    # tied: every counted parameter is in a matmul
    # collapse: 2 generation batches of 1536 prompts x 16 responses of 4000 tokens, at 4000 tok/s on each of 8 GPUs
    col = stage(res, "collapse")
    gen = 2 * 1536 * 16 * 4000
    assert col["gen_tokens_per_step"] == pytest.approx(gen)
    assert col["rollout_h_per_step"] == pytest.approx(gen / (4000 * 8) / 3600)
    # update: 512 x 16 sequences of 200 + 4000 tokens; 6N (forward + backward) + 2N (recompute) + 2N (old log-probs)
    tokens = 512 * 16 * 4200
    assert col["train_tokens_per_step"] == pytest.approx(tokens)
    train_s = 10 * n * tokens / (8 * 1000e12 * 0.4)
    assert col["train_h_per_step"] == pytest.approx(train_s / 3600)
    assert col["wall_h"] == pytest.approx(300 * (gen / 32000 + train_s) / 3600)
    assert col["gpu_h"] == pytest.approx(8 * col["wall_h"])
    # reheat: one batch of 64 x 8 responses, cut at reheat's 8192 (4000 is below), the teacher's forward: 10N again
    rh = stage(res, "reheat")
    assert rh["gen_tokens_per_step"] == pytest.approx(64 * 8 * 4000)
    assert rh["train_h_per_step"] == pytest.approx(10 * n * 64 * 8 * 4200 / (8 * 1000e12 * 0.4) / 3600)
    assert rh["steps"] == 50 and rh["runs"] == 1
    # arms: 3 arms x 200 steps, 3 generation batches per step
    arms = stage(res, "arms")
    assert arms["runs"] == 3 and arms["steps"] == 200
    assert arms["wall_h"] == pytest.approx(3 * 200 * (3 * 1536 * 16 * 4000 / 32000 + train_s) / 3600)
    # evaluate: 1744 problems x k 16 x 4000 tokens per checkpoint; collapsed + reheated + 3 arms = 5 checkpoints
    ev = stage(res, "evaluate")
    assert sum(ec.BENCHMARK_SIZES.values()) == 1744
    assert ev["gen_tokens_per_step"] == pytest.approx(1744 * 16 * 4000)
    assert ev["steps"] == 5
    # each rank samples its ceil(problems / 8) of every round of 64 x 8 problems, the slowest rank sets the pace
    per_rank = sum(-(-min(512, n_b - s) // 8) for n_b in ec.BENCHMARK_SIZES.values() for s in range(0, n_b, 512))
    assert ev["rollout_h_per_step"] == pytest.approx(per_rank * 16 * 4000 / 4000 / 3600)
    # validation: 30 AIME problems dealt to 8 GPUs (4 on the busiest) x --val-n 12, every 5 steps
    val, _ = run(tmp_path, "--val-problems", "30", "--val-n", "12", "--val-every", "5", name="val.json")
    assert stage(val, "collapse")["h_per_step"] - col["h_per_step"] == pytest.approx(4 * 12 * 4000 / 4000 / 5 / 3600)
    # the JSON holds the same rows and every assumption with a source
    assert js["stages"][0]["gen_tokens_per_step"] == pytest.approx(gen)
    assert all(v["source"] for v in js["assumptions"].values())
    assert js["assumptions"]["mfu"]["value"] == 0.4


def test_attention_flops_from_the_config(tmp_path):
    off, _ = run(tmp_path, name="off.json")
    on, _ = run(tmp_path, "--attention-flops", name="on.json")
    # per sequence of T = 4200 tokens, causal: sum over positions of 4 x layers x (heads x head_dim) x t
    t = 4200
    attn = 2 * CFG_4B["num_hidden_layers"] * CFG_4B["num_attention_heads"] * CFG_4B["head_dim"] * t * t
    extra_s = 5 * 512 * 16 * attn / (8 * 1000e12 * 0.4)       # forward, backward x2, recompute, old log-probs
    d = stage(on, "collapse")["train_h_per_step"] - stage(off, "collapse")["train_h_per_step"]
    assert d * 3600 == pytest.approx(extra_s, rel=1e-6)


def test_doubling_gpus_halves_wall_time(tmp_path):
    r8, _ = run(tmp_path, "--gpus", "8", name="g8.json")
    r16, _ = run(tmp_path, "--gpus", "16", name="g16.json")
    for name in ("collapse", "reheat", "arms"):
        assert stage(r16, name)["wall_h"] == pytest.approx(stage(r8, name)["wall_h"] / 2, rel=1e-9)
        assert stage(r16, name)["gpu_h"] == pytest.approx(stage(r8, name)["gpu_h"], rel=1e-9)
    # evaluation rounds split problems by rank (a ceiling): about half
    assert stage(r16, "evaluate")["wall_h"] == pytest.approx(stage(r8, "evaluate")["wall_h"] / 2, rel=0.1)


def test_disk_per_checkpoint_and_per_run(tmp_path):
    res, _ = run(tmp_path)
    n = params_by_hand(CFG_4B)
    d = res["disk"][0]
    tokenizer_gb = 20e6 / 1e9                                        # --extra-mb 20
    assert d["checkpoint_gb"] == pytest.approx(14 * n / 1e9, abs=tokenizer_gb + 1e-9)
    assert d["checkpoint_gb"] == pytest.approx(56.3, abs=0.1)        # common/checkpoint.py's docstring: 56.3 GB
    assert d["final_gb"] == d["snapshot_gb"] == pytest.approx(2 * n / 1e9, abs=tokenizer_gb + 1e-9)
    ck, hf = d["checkpoint_gb"], d["final_gb"]
    # collapse: 300 steps, saves every 50 (6), --keep-last 2: 3 on disk during a save, 2 + final/ at the end;
    # a snapshot every 25 steps: 12
    col = d["runs"]["collapse"]
    assert (col["saves"], col["checkpoints_at_end"], col["snapshots"]) == (6, 2, 12)
    assert col["peak_gb"] == pytest.approx(3 * ck + 12 * hf)
    assert col["end_gb"] == pytest.approx(2 * ck + hf + 12 * hf)
    # reheat at its --save-every (checkpoints every k steps and at the end), --keep-last 2, + final/
    every = ec._script_defaults()[1].save_every
    saves = len(set(range(every, 51, every)) | {50}) if every else 1
    assert d["runs"]["reheat"]["saves"] == saves
    assert d["runs"]["reheat"]["end_gb"] == pytest.approx(min(saves, 2) * ck + hf)
    assert d["runs"]["reheat"]["peak_gb"] == pytest.approx(max(min(saves, 3) * ck, min(saves, 2) * ck + hf))
    # everything at the end: collapse + 1 reheat + 3 arms (each 2 checkpoints + final/)
    assert d["reproduction_end_gb"] == pytest.approx(col["end_gb"] + d["runs"]["reheat"]["end_gb"] + 3 * (2 * ck + hf))
    res8, _ = run(tmp_path, "--configs", "8b", name="8b.json")
    assert res8["disk"][0]["checkpoint_gb"] == pytest.approx(14 * params_by_hand(CFG_8B) / 1e9, abs=0.03)


def test_length_distribution_against_sampling():
    """The clipped gamma's moments against numpy samples, and the mean hit where it is asked for (at L=20480)."""
    lengths = ec.Lengths.for_mean(4000, 0.7, 20480)
    assert lengths.moments(20480)[0] == pytest.approx(4000, rel=1e-6)
    rng = np.random.default_rng(0)
    x = rng.gamma(1 / 0.49, lengths.theta, size=400_000)
    for limit in (20480, 8192, 2048):
        m1, m2, cut = lengths.moments(limit)
        c = np.minimum(x, limit)
        assert m1 == pytest.approx(c.mean(), rel=0.01)
        assert m2 == pytest.approx((c ** 2).mean(), rel=0.02)
        assert cut == pytest.approx((x >= limit).mean(), abs=0.005)
    assert lengths.longest(1000, 20480) == pytest.approx(np.quantile(x, 1 - 1 / 1000), rel=0.03)
    fixed = ec.Lengths.for_mean(3000, 0, 20480)
    assert fixed.moments(20480) == (3000, 9e6, 0.0) and fixed.moments(2000)[0] == 2000


def test_bandwidth_decode_model_scales_as_stated(tmp_path):
    """Without --decode-tok-s the rate comes from HBM bandwidth: memory-bound, so it is proportional to the assumed
    efficiency, and the 8B (twice the weights to read per step, less KV cache left) decodes slower than the 4B."""
    i = PINNED.index("--decode-tok-s")
    base = PINNED[:i] + PINNED[i + 2:]
    out = tmp_path / "bw.json"
    r1 = ec.main([*base, "--configs", "4b", "8b", "--json", str(out)])
    r2 = ec.main([*base, "--configs", "4b", "8b", "--hbm-efficiency", "0.3", "--json", str(out)])
    for cfg in ("4b", "8b"):
        assert stage(r2, "collapse", cfg)["decode_tok_s_per_gpu"] == \
            pytest.approx(stage(r1, "collapse", cfg)["decode_tok_s_per_gpu"] / 2, rel=1e-9)
    assert stage(r1, "collapse", "8b")["decode_tok_s_per_gpu"] < \
        stage(r1, "collapse", "4b")["decode_tok_s_per_gpu"]


def test_default_run_end_to_end(tmp_path, capsys):
    """The script as a user runs it: defaults, both models, a table with every assumption and a JSON."""
    out = tmp_path / "estimate_cost.json"
    ec.main(["--json", str(out)])
    text = capsys.readouterr().out
    assert "ESTIMATES" in text and "--mean-response = 4000.0" in text and "ASSUMPTION" in text
    js = json.loads(out.read_text())
    assert {r["stage"] for r in js["stages"]} == {"collapse", "reheat", "arms", "evaluate"}
    assert {r["config"] for r in js["stages"]} == {"4b", "8b"}
    assert all(r["wall_h"] > 0 and r["gpu_h"] == pytest.approx(8 * r["wall_h"]) for r in js["stages"])
    with pytest.raises(SystemExit):
        ec.main(["--mfu", "0", "--json", str(out)])
