"""evaluate.py on the tiny fixture: the analyses on constructed checkpoints with known answers, accuracy from a
hand-written cache, resume without regeneration, rank independence, plots, bad input; one run with vLLM."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import evaluate
from common.data import load_problems
from common.stats import hierarchical_bootstrap, mean_ci, paired_bootstrap, paired_seed_t, pass_at_k

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--prompt-style", "plain", "--rollout-engine", "hf", "--grade-workers", "0", "--device", "cpu"]


def run(out, *argv):
    return evaluate.main([*argv, *FAST, "--out", str(out)])


def load(path):
    with open(path) as f:
        return json.load(f)


def forbid_generation(monkeypatch):
    def no_engine(*a, **kw):
        raise AssertionError("everything is cached: no engine may be built")
    monkeypatch.setattr(evaluate, "make_engine", no_engine)


def write_jsonl(path, rows):
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


# ----------------------------------------------------------------------------- the comparison


def test_compare_closed_form_tau_copy_and_self(tiny, tmp_path):
    """A closed-form tau-scaled copy is BASE at temperature tau exactly: tau* = tau, the same top-k sets, the same
    hidden states up to the final norm (whose output is only rescaled); only the final norm moved. BASE against
    itself: tau* 1, overlap 1, CKA 1, no displacement."""
    from reheat_tsopsd import closed_form_reheat
    closed = closed_form_reheat(tiny["model"], 1.5, str(tmp_path / "closed"))
    out = tmp_path / "out"
    common = ["--benchmarks", f"test={tiny['test']}", "--compare-problems", "4", "--compare-n", "2",
              "--max-tokens", "16"]
    run(out, "--compare", f"base={tiny['model']}", closed, *common, "--analysis-tokens", "40")
    r = load(out / "compare__base__vs__closed.json")
    et = r["effective_temperature"]
    assert et["tau"] == pytest.approx(1.5, abs=1e-3) and et["kl"] < 1e-8 and et["explained"] > 0.999
    assert et["per_token"]["p10"] == pytest.approx(1.5, abs=1e-3) and et["per_token"]["p90"] == pytest.approx(1.5, abs=1e-3)
    assert r["topk_overlap"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    assert [x["name"] for x in r["layers"]] == ["embed", "layer_1", "layer_2", "layer_3", "final_norm"]
    for layer in r["layers"]:
        assert layer["cosine"] == pytest.approx(1, abs=1e-6) and layer["cka"] == pytest.approx(1, abs=1e-6)
    assert r["entropy"]["other"] > r["entropy"]["base"]
    assert r["sharpness"]["other"]["logit_std"] == pytest.approx(r["sharpness"]["base"]["logit_std"] / 1.5, rel=1e-5)
    moved = {d["name"]: d["delta_norm"] for d in r["displacement"]["per_layer"]}
    assert moved.pop("final_norm") > 0 and all(v == 0 for v in moved.values())
    assert r["n_tokens"] == 40 and r["n_sequences"] >= 3            # 40 positions drawn over the 4 prompts' samples
    assert r["diversity"]["base"]["n_groups"] == 4 and r["diversity"]["base"]["n"] == 2
    for kind in ("entropy", "tau", "layers"):
        png = out / "plots" / f"compare__base__vs__closed_{kind}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    run(out, "--compare", f"base={tiny['model']}", f"base={tiny['model']}", *common)
    r = load(out / "compare__base__vs__base.json")
    assert r["effective_temperature"]["tau"] == pytest.approx(1.0, abs=1e-6)
    assert r["effective_temperature"]["kl_at_1"] == pytest.approx(0, abs=1e-12)
    assert r["topk_overlap"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    assert all(x["cka"] == pytest.approx(1, abs=1e-9) and x["cosine"] == pytest.approx(1, abs=1e-9) for x in r["layers"])
    assert r["displacement"]["delta_norm"] == 0 and r["diversity"]["base"] == r["diversity"]["other"]
    assert r["n_sequences"] == 4 and r["n_tokens"] > 40                # under the budget: every response token
    md = (out / "results.md").read_text()
    assert "## Comparison: closed vs base (BASE)" in md and "## Comparison: base vs base (BASE)" in md


@pytest.mark.parametrize("which", ["fixture", "shipped"])
def test_compare_scores_in_float32_where_generation_runs_in_bf16(which, tiny, tmp_path, monkeypatch):
    """On CUDA hf_model's default is bf16 (HF-engine generation); the comparison must still score in float32, or
    bf16 rounding (of norm.weight / tau per channel, of every activation) shows up as a change that is not a
    temperature (bf16 scoring gave tau* 1.4971 on the random fixture; KL at tau* 3e-7 and top-10 overlap 0.9975 on
    the shipped model). Emulated by making bf16 the default on the CPU, on a bf16 copy of each model: its closed
    form is written in float32 (every other weight an exact upcast), so the comparison must be exact."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from reheat_tsopsd import closed_form_reheat
    model, test = ((tiny["model"], tiny["test"]) if which == "fixture" else
                   (os.path.join(ROOT, "assets", "tiny_math", "model"),
                    os.path.join(ROOT, "assets", "tiny_math", "data", "test.jsonl")))
    base = tmp_path / "bf16"
    AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16).save_pretrained(base)
    AutoTokenizer.from_pretrained(model).save_pretrained(base)
    closed = closed_form_reheat(str(base), 1.5, str(tmp_path / "closed"))
    with safe_open(os.path.join(closed, "model.safetensors"), "pt") as f, \
            safe_open(os.path.join(base, "model.safetensors"), "pt") as g:
        for name in g.keys():
            want = g.get_tensor(name).float() / (1.5 if name == "model.norm.weight" else 1.0)
            assert f.get_tensor(name).dtype == torch.float32 and torch.equal(f.get_tensor(name), want), name
    real = evaluate.hf_model
    monkeypatch.setattr(evaluate, "hf_model",
                        lambda path, device, dtype=None: real(path, device, dtype or torch.bfloat16))   # CUDA's default
    out = tmp_path / "out"
    run(out, "--compare", f"base={base}", closed, "--benchmarks", f"test={test}", "--compare-problems", "4",
        "--compare-n", "2", "--max-tokens", "16", "--analysis-tokens", "40")
    r = load(out / "compare__base__vs__closed.json")
    et = r["effective_temperature"]
    assert et["tau"] == pytest.approx(1.5, abs=1e-3) and et["explained"] >= 0.999 and et["kl"] < 1e-8
    assert r["topk_overlap"] == {"1": 1.0, "5": 1.0, "10": 1.0}
    assert r["sharpness"]["other"]["logit_std"] == pytest.approx(r["sharpness"]["base"]["logit_std"] / 1.5, rel=1e-5)


def test_displacement_of_constructed_checkpoints(tiny, tmp_path):
    """LOW = BASE - 0.9 d + noise, HIGH = BASE + d: LOW undoes 0.9 of HIGH. Sign convention: cosine is
    cos(Delta_low, -Delta_high) and the coefficient <Delta_low, -Delta_high> / ||Delta_high||^2, both ~ +0.9/1."""
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    lm = AutoModelForCausalLM.from_pretrained(tiny["model"])
    base = {k: v.clone() for k, v in lm.state_dict().items()}
    d = {k: torch.randn_like(v) * 0.01 for k, v in base.items()}
    for name, delta in (("low", lambda k: -0.9 * d[k] + 0.0005 * torch.randn_like(d[k])), ("high", lambda k: d[k])):
        with torch.no_grad():
            for k, p in lm.state_dict().items():
                p.copy_(base[k] + delta(k))
        lm.save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    evaluate.main(["--displacement", tiny["model"], str(tmp_path / "low"), str(tmp_path / "high"), "--out", str(out)])
    (f,) = [p for p in out.iterdir() if p.name.startswith("displacement__")]
    r = load(f)
    assert r["cosine"] == pytest.approx(1, abs=5e-3) and r["cos_low_high"] == pytest.approx(-1, abs=5e-3)
    assert r["reverse_coef"] == pytest.approx(0.9, abs=5e-3) and r["norm_ratio"] == pytest.approx(0.9, abs=5e-3)
    assert {x["name"] for x in r["per_layer"]} == {"embed", "layer_1", "layer_2", "layer_3", "final_norm"}
    assert all(x["cosine"] == pytest.approx(1, abs=2e-2) for x in r["per_layer"])
    assert "## Displacement: LOW low, HIGH high" in (out / "results.md").read_text()


# ----------------------------------------------------------------------------- accuracy from caches

def cache_path(out, label, bench, k, **kw):
    a = evaluate.Args(k=k, prompt_style="plain", **kw)
    return out / "generations" / label / f"{bench}__{evaluate.settings_tag(a, k)}.jsonl"


def sample(answer, correct, length=5, finish="stop"):
    return {"text": f"... Answer: {answer}", "answer": answer, "correct": float(correct), "length": length,
            "finish_reason": finish}


def test_accuracy_from_hand_written_cache(tiny, tmp_path, monkeypatch):
    qa, one = tmp_path / "qa.jsonl", tmp_path / "one.jsonl"
    write_jsonl(qa, [{"id": i, "problem": f"problem {i}", "answer": "5"} for i in range(3)])
    write_jsonl(one, [{"id": 0, "problem": "easy", "answer": "2"}])
    ids = [p.id for p in load_problems(str(qa))]
    out = tmp_path / "out"
    rows = [
        {"id": ids[0], "samples": [sample("5", 1, 10), sample("7", 0, 20), sample("5", 1, 30), sample("7", 0, 40)]},
        {"id": ids[1], "samples": [sample(None, 0, 16, "length"), sample("3", 0, 16, "length"),
                                   sample("3", 0, 16, "length"), sample("4", 0, 16, "length")]},
        {"id": ids[2], "samples": [sample("9", 1, 1), sample("9", 1, 2), sample("9", 1, 3), sample("8", 0, 4)]},
    ]
    os.makedirs(cache_path(out, "hand", "qa", 4).parent)
    write_jsonl(cache_path(out, "hand", "qa", 4), rows)
    write_jsonl(cache_path(out, "hand", "one", 4), [{"id": load_problems(str(one))[0].id, "samples": [sample("2", 1)] * 4}])
    forbid_generation(monkeypatch)
    run(out, "--ckpt", f"hand={tiny['model']}", "--benchmarks", f"{qa},{one}", "--k", "4")

    r = load(next((out / "results").glob("hand__*.json")))
    m = r["benchmarks"]["qa"]
    assert m["avg@4"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert m["pass@1"] == pytest.approx((0.5 + 0 + 0.75) / 3)
    assert m["pass@2"] == pytest.approx((1 - 1 / 6 + 0 + 1) / 3)          # 1 - C(2,2)/C(4,2) for problem 0
    assert pass_at_k(4, 2, 2) == pytest.approx(5 / 6)
    assert m["pass@4"] == pytest.approx(2 / 3)
    assert m["maj@4"] == pytest.approx(2 / 3)           # tie 5/7 goes to the first (5, right); 3 is wrong; 9 right
    assert m["distinct@4"] == pytest.approx(2)
    assert m["len"] == pytest.approx((100 + 64 + 10) / 12)
    assert m["trunc"] == pytest.approx(4 / 12) and m["no_ans"] == pytest.approx(1 / 12) and m["n_problems"] == 3
    assert r["benchmarks"]["one"]["avg@4"] == 1 and r["benchmarks"]["one"]["distinct@4"] == 1
    assert r["macro"]["avg@4"] == pytest.approx(((0.5 + 0.75) / 3 + 1) / 2)
    assert r["macro"]["trunc"] == pytest.approx((1 / 3 + 0) / 2) and r["macro"]["n_problems"] == 4
    assert r["per_problem"]["qa"] == {ids[0]: 0.5, ids[1]: 0.0, ids[2]: 0.75}
    md = (out / "results.md").read_text()
    assert "| hand | qa | 0.417 | 0.417 | 0.611 | 0.667 | 0.667 | 2.000 |" in md and "| hand | macro avg |" in md


def test_arms_ci_and_paired_bootstrap(tiny, tmp_path, monkeypatch):
    qa = tmp_path / "qa.jsonl"
    write_jsonl(qa, [{"id": i, "problem": f"problem {i}", "answer": "1"} for i in range(6)])
    ids = [p.id for p in load_problems(str(qa))]
    out = tmp_path / "out"
    g = torch.Generator().manual_seed(0)
    arms = {"a": [], "b": [], "c": []}
    scores = {}
    for arm, p_right, n_seeds in (("a", 0.3, 3), ("b", 0.7, 3), ("c", 0.5, 2)):
        for s in range(n_seeds):
            path = tmp_path / f"{arm}{s}"
            shutil.copytree(tiny["model"], path)
            arms[arm].append(str(path))
            correct = (torch.rand(6, 4, generator=g) < p_right).float().tolist()
            scores[f"{arm}_s{s}"] = correct
            f = cache_path(out, f"{arm}_s{s}", "qa", 4)
            os.makedirs(f.parent, exist_ok=True)
            write_jsonl(f, [{"id": i, "samples": [sample(str(c), c) for c in cs]} for i, cs in zip(ids, correct)])
    forbid_generation(monkeypatch)
    run(out, "--arms", *[f"{arm}=" + ",".join(paths) for arm, paths in arms.items()], "--benchmarks", str(qa),
        "--k", "4", "--n-boot", "2000")
    r = load(next(out.glob("arms__*.json")))
    per_seed = {lab: [sum(c) / 4 for c in cs] for lab, cs in scores.items()}
    for arm in ("a", "b"):
        vals = [sum(per_seed[f"{arm}_s{s}"]) / 6 for s in range(3)]
        mean, lo, hi = mean_ci(vals)
        got = r["arms"][arm]["qa"]
        assert (got["mean"], got["lo"], got["hi"]) == pytest.approx((mean, lo, hi))
        assert r["arms"][arm]["macro"]["mean"] == pytest.approx(mean)
    avg = {arm: [sum(per_seed[f"{arm}_s{s}"][i] for s in range(3)) / 3 for i in range(6)] for arm in ("a", "b")}
    want = paired_bootstrap(avg["a"], avg["b"], n_boot=2000, seed=0)
    test, _, _ = [t for t in r["tests"] if t["benchmark"] == "qa"]
    assert (test["a"], test["b"]) == ("a", "b") and test["diff"] == pytest.approx(want["diff"])
    assert test["p_value"] == pytest.approx(want["p_value"]) and test["ci"] == pytest.approx(list(want["ci"]))
    # seed-aware: each arm's [seeds, problems] matrix, seed s of a paired with seed s of b
    seeds = {arm: [per_seed[f"{arm}_s{s}"] for s in range(len(arms[arm]))] for arm in arms}
    boot = hierarchical_bootstrap(seeds["a"], seeds["b"], n_boot=2000, seed=0)
    paired = paired_seed_t(seeds["a"], seeds["b"])
    assert test["seed_bootstrap"]["diff"] == pytest.approx(want["diff"])
    assert test["seed_bootstrap"]["ci"] == pytest.approx(list(boot["ci"]))
    assert test["seed_bootstrap"]["p_value"] == pytest.approx(boot["p_value"])
    assert test["seed_bootstrap"]["n_seeds_a"] == test["seed_bootstrap"]["n_seeds_b"] == 3
    assert test["seed_paired_t"]["ci"] == pytest.approx(list(paired["ci"]))
    assert test["seed_paired_t"]["p_value"] == pytest.approx(paired["p_value"]) and test["seed_paired_t"]["dof"] == 2
    uneven = [t for t in r["tests"] if t["b"] == "c"]             # 3 seeds against 2: nothing to pair
    assert len(uneven) == 4 and all(t["seed_paired_t"] is None and t["seed_bootstrap"]["n_seeds_b"] == 2
                                    for t in uneven)
    assert "## Seeds" in (out / "results.md").read_text()
    row = next(l for l in (out / "results.md").read_text().splitlines() if l.startswith(f"| a - b | {test['benchmark']} |"))
    assert f"{test['seed_bootstrap']['p_value']:.4f}" in row and f"{test['seed_paired_t']['p_value']:.4f}" in row


# ----------------------------------------------------------------------------- resume, ranks, engines

RESUME = ["--benchmarks", "test={test}", "--max-problems", "4", "--k", "2", "--max-tokens", "8", "--gen-chunk", "1"]


@pytest.fixture(scope="module")
def one_process_eval(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_one")
    run(out, "--ckpt", f"m={tiny['model']}", *[a.format(test=tiny["test"]) for a in RESUME])
    return out


def metrics_of(out):
    r = load(next((out / "results").glob("m__*.json")))
    return {k: r[k] for k in ("benchmarks", "macro", "per_problem")}


def test_resume_regenerates_only_what_is_missing(tiny, one_process_eval, tmp_path, monkeypatch):
    out = tmp_path / "out"
    shutil.copytree(one_process_eval / "generations", out / "generations")
    (cache,) = (out / "generations" / "m").glob("*.jsonl")
    lines = cache.read_text().splitlines(keepends=True)
    assert len(lines) == 4
    cache.write_text("".join(lines[:3]) + lines[3][:len(lines[3]) // 2])     # killed while writing problem 4

    made = []
    real = evaluate.make_engine

    def counting(*a, **kw):
        engine = real(*a, **kw)
        generate = engine.generate

        def gen(prompts, **k):
            made.extend(prompts)
            return generate(prompts, **k)
        engine.generate = gen
        return engine
    monkeypatch.setattr(evaluate, "make_engine", counting)
    argv = ["--ckpt", f"m={tiny['model']}", *[a.format(test=tiny["test"]) for a in RESUME]]
    run(out, *argv)
    assert len(made) == 1                                # only the problem whose line was cut
    assert cache.read_text() == "".join(lines)           # the same samples, byte for byte
    assert metrics_of(out) == metrics_of(one_process_eval)
    assert load(next((out / "results").glob("m__*.json")))["generated"] == {"test": 1}

    forbid_generation(monkeypatch)
    run(out, *argv)
    assert metrics_of(out) == metrics_of(one_process_eval)

    # the same weights under another path keep the cache (nothing generated: forbid_generation still holds) ...
    same = shutil.copytree(tiny["model"], tmp_path / "same")
    run(out, *argv[:1], f"m={same}", *argv[2:])
    # ... weights one training step away do not: a cache sampled from other weights is refused
    with pytest.raises(SystemExit, match="other weights"):
        run(out, *argv[:1], f"m={trained_copy(tiny['model'], tmp_path / 'stepped')}", *argv[2:])


def trained_copy(model_dir, dst):
    """model_dir after one AdamW step (weight decay 0.1: every weight moves, as in training), saved to dst."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    opt = torch.optim.AdamW(lm.parameters(), lr=1e-4, weight_decay=0.1)
    ids = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    lm(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    lm.save_pretrained(dst)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(dst)
    return str(dst)


@pytest.mark.parametrize("branch", ["whole", "sampled"])
def test_fingerprint_changes_with_the_weights(branch, tiny, tmp_path, monkeypatch):
    """fingerprint() (the cache's guard against samples of other weights): equal for a copy of the same weights,
    different after one training step; also in the branch a real 4B/8B safetensors file takes (larger than
    FINGERPRINT_WHOLE_BYTES: size + 64 sampled blocks), run here by lowering the threshold below the file's size."""
    import common.eval_io as eval_io
    model = tiny["model"]
    whole = eval_io.fingerprint(model)
    size = os.path.getsize(os.path.join(model, "model.safetensors"))
    if branch == "sampled":
        monkeypatch.setattr(eval_io, "FINGERPRINT_WHOLE_BYTES", size // 100)
        assert eval_io.fingerprint(model) != whole                     # other bytes hashed: the other branch ran
    else:
        assert size <= eval_io.FINGERPRINT_WHOLE_BYTES
    copy = shutil.copytree(model, tmp_path / "copy")
    stepped = trained_copy(model, tmp_path / "stepped")
    assert os.path.getsize(os.path.join(stepped, "model.safetensors")) == size   # same layout, only values moved
    assert eval_io.fingerprint(copy) == eval_io.fingerprint(model)
    assert eval_io.fingerprint(stepped) != eval_io.fingerprint(model)


def test_the_seed_changes_the_samples_and_the_same_seed_repeats_them(tiny, one_process_eval, tmp_path):
    """--seed reaches every problem's sampling seed: another seed, other samples (else `--arms` over training seeds
    would compare identical samples); the same seed in a fresh output directory, the same samples."""
    argv = ["--ckpt", f"m={tiny['model']}", *[a.format(test=tiny["test"]) for a in RESUME]]
    run(tmp_path / "s0", *argv)
    run(tmp_path / "s1", *argv, "--seed", "1")
    read = lambda o: evaluate.read_cache(str(next((o / "generations" / "m").glob("*.jsonl"))))   # noqa: E731
    base, again, other = read(one_process_eval), read(tmp_path / "s0"), read(tmp_path / "s1")
    assert again == base
    assert other.keys() == base.keys()                                   # the same problems ...
    texts = lambda rows: [s["text"] for pid in sorted(rows) for s in rows[pid]["samples"]]   # noqa: E731
    assert texts(other) != texts(base)                                   # ... sampled otherwise


def test_two_ranks_sample_what_one_rank_samples(tiny, one_process_eval, tmp_path):
    """Per-problem seeds: torchrun with 2 ranks writes the same samples as 1 process."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "evaluate.py"), "--ckpt", f"m={tiny['model']}",
           *[a.format(test=tiny["test"]) for a in RESUME], *FAST, "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    read = lambda o: evaluate.read_cache(str(next((o / "generations" / "m").glob("*.jsonl"))))   # noqa: E731
    assert read(out) == read(one_process_eval)
    assert metrics_of(out) == metrics_of(one_process_eval)


def test_vllm_engine_end_to_end(tiny, tmp_path):
    pytest.importorskip("vllm")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", tiny["model"], "--benchmarks",
           f"test={tiny['test']}", "--max-problems", "6", "--k", "3", "--max-tokens", "12", "--gen-chunk", "4",
           "--prompt-style", "plain", "--rollout-engine", "vllm", "--vllm-kv-cache-gib", "0.0625",
           "--grade-workers", "0", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert res.returncode == 0, res.stderr[-3000:]
    (cache,) = (out / "generations").glob("*/*.jsonl")
    rows = evaluate.read_cache(str(cache))
    assert len(rows) == 6 and all(len(r["samples"]) == 3 for r in rows.values())
    assert all(1 <= s["length"] <= 12 and s["finish_reason"] in ("stop", "length") for r in rows.values()
               for s in r["samples"])
    assert load(str(cache).removesuffix(".jsonl") + ".meta.json")["engine"] == "vllm"
    r = load(next((out / "results").glob("*.json")))
    assert r["benchmarks"]["test"]["n_problems"] == 6 and 0 <= r["macro"]["avg@3"] <= 1


# ----------------------------------------------------------------------------- runs and bad input

def test_own_sample_entropy_matches_a_float64_reference(tiny, tmp_path):
    """ent_t1 (--entropy-samples N): the mean T=1 entropy over the response tokens of each checkpoint's own first
    N samples per problem, equal to a float64 forward of every sequence alone; the entropy-scaled closed form
    (tau 2) has a higher one."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common.data import render_prompt
    from common.eval_io import read_cache
    from reheat_tsopsd import closed_form_reheat
    hot = closed_form_reheat(tiny["model"], 2.0, str(tmp_path / "hot"))
    out = tmp_path / "out"
    run(out, "--ckpt", f"base={tiny['model']}", f"hot={hot}", "--benchmarks", f"test={tiny['test']}",
        "--max-problems", "4", "--k", "3", "--max-tokens", "12", "--entropy-samples", "2")
    problems = load_problems(tiny["test"], limit=4)
    got = {}
    for label, path in (("base", tiny["model"]), ("hot", hot)):
        [res] = [load(p) for p in (out / "results").glob(f"{label}__*.json")]
        got[label] = res["benchmarks"]["test"]["ent_t1"]
        assert res["macro"]["ent_t1"] == got[label]
        [cache] = (out / "generations" / label).glob("test__*_ids.jsonl")     # the ids are cached for it
        rows = read_cache(str(cache))
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
        tok = AutoTokenizer.from_pretrained(path)
        total, count = 0.0, 0
        with torch.no_grad():
            for p in problems:
                prompt = tok(render_prompt(p, tok, "plain"), add_special_tokens=False).input_ids
                for smp in rows[p.id]["samples"][:2]:
                    z = lm(torch.tensor([prompt + smp["ids"]])).logits[0, len(prompt) - 1:-1]
                    lp = torch.log_softmax(z, -1)
                    total += float(-(lp.exp() * lp).sum())
                    count += len(smp["ids"])
        assert got[label] == pytest.approx(total / count, rel=1e-5)
    assert got["hot"] > got["base"] > 0
    assert "ent_t1" in (out / "results.md").read_text()


def test_run_curves_are_plotted(tmp_path):
    rl, reheat = tmp_path / "rl_dapo__0__x", tmp_path / "reheat"
    for d, keys in ((rl, ("train/entropy_t1", "rollout/entropy_est", "rollout/uniform_frac", "rollout/accuracy",
                          "val/accuracy", "rollout/response_len_mean")),
                    (reheat, ("reheat/student_entropy", "rollout/accuracy", "rollout/response_len_mean"))):
        d.mkdir()
        write_jsonl(d / "metrics.jsonl", [{"step": s, **{k: 1 / s + 0.01 * i for i, k in enumerate(keys)}}
                                          for s in range(1, 11)] + [{"step": 11, "val/accuracy": "nan"}])
    out = tmp_path / "out"
    evaluate.main(["--runs", str(rl), f"reheat={reheat}", "--out", str(out)])
    for name in ("entropy", "entropy_trained", "accuracy", "uniform_groups", "response_len", "summary"):
        png = (out / "plots" / f"runs_{name}.png").read_bytes()
        assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "runs_entropy.png" in (out / "results.md").read_text()


@pytest.mark.parametrize("argv, message", [
    (["--ckpt", "{tmp}/missing"], "checkpoint not found"),
    (["--ckpt", "{model}", "--benchmarks", "aime24,nonesuch"], "unknown benchmark 'nonesuch'"),
    (["--ckpt", "{model}", "--benchmarks", "math500={tmp}/absent.jsonl"], "benchmark file not found"),
    (["--compare", "{model}"], "--compare takes two checkpoints"),
    (["--arms", "a={model},{tmp}/gone"], "checkpoint not found"),
    (["--runs", "{tmp}"], "no metrics.jsonl"),
    (["--k", "4"], "nothing to do"),
])
def test_bad_input_fails_before_compute(tiny, tmp_path, argv, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        evaluate.main([a.format(tmp=tmp_path, model=tiny["model"]) for a in argv] + ["--out", str(out)])
    assert not out.exists()


def test_cli_reports_a_missing_checkpoint(tmp_path):
    res = subprocess.run([sys.executable, os.path.join(ROOT, "evaluate.py"), "--ckpt", str(tmp_path / "nope"),
                          "--out", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert res.returncode != 0 and "checkpoint not found" in res.stderr


# ----------------------------------------------------------------------------- truncated responses

class _CannedEngine:
    """Returns fixed samples: right and stopped, right but cut at the limit, wrong and stopped."""
    name, dp_rank, dp_size, tp_rank = "hf", 0, 1, 0

    def generate(self, prompts, *, n, seeds, **kw):
        from common.rollout import Sample
        canned = [("Answer: 4", "stop"), ("Answer: 4\nand then it rambled on and on", "length"), ("Answer: 5", "stop")]
        return [[Sample([1], [2, 3], [-0.1, -0.2], f, t) for t, f in canned[:n]] for _ in prompts]


@pytest.mark.parametrize("grade_truncated, want", [(False, [1.0, 0.0, 0.0]), (True, [1.0, 1.0, 0.0])])
def test_truncated_responses_count_as_wrong_unless_asked(grade_truncated, want):
    from common.data import Problem
    a = evaluate.Args(k=3, prompt_style="plain", grade_workers=0, grade_truncated=grade_truncated)
    problem = Problem(id="p0", problem="What is 2+2?", answer="4", source="t")
    rows = evaluate.sample_and_grade(a, _CannedEngine(), None, "qa", [problem], 3, False)
    assert [s["correct"] for s in rows[0]["samples"]] == want
    assert [s["finish_reason"] for s in rows[0]["samples"]] == ["stop", "length", "stop"]


def test_truncated_is_wrong_rule():
    from common.grading import truncated_is_wrong
    assert truncated_is_wrong([1.0, 1.0, 0.0], ["stop", "length", "length"]) == [1.0, 0.0, 0.0]
    assert truncated_is_wrong([1.0, 1.0, 0.0], ["stop", "length", "length"], True) == [1.0, 1.0, 0.0]
    with pytest.raises(ValueError):
        truncated_is_wrong([1.0], ["stop", "stop"])


def test_packed_scoring_equals_one_sequence_at_a_time(tiny):
    """--compare's scoring forward on padding-free packed rows: every layer's states at the picked positions
    equal those of each sequence scored alone (where nothing else can be attended to), fp32, 1e-5."""
    import random
    import numpy as np
    rng = random.Random(0)
    seqs = [([rng.randrange(3, 200) for _ in range(rng.randint(2, 9))], [rng.randrange(3, 200) for _ in range(12)],
             np.array(sorted(rng.sample(range(12), 4)))) for _ in range(7)]
    alone = evaluate.score_sequences(tiny["model"], seqs, evaluate.Args(micro_batch_tokens=1), torch.device("cpu"))
    packed = evaluate.score_sequences(tiny["model"], seqs, evaluate.Args(micro_batch_tokens=64), torch.device("cpu"))
    assert packed["final"].shape == (7 * 4, alone["final"].shape[1])
    torch.testing.assert_close(packed["final"], alone["final"], rtol=1e-5, atol=1e-5)
    for a, b in zip(packed["hidden"], alone["hidden"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
