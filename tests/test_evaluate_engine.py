"""evaluate.py samples every checkpoint with one engine, switching weights in place: under torchrun a second
vLLM engine used to crash (the first one's shutdown destroys the default process group)."""
import json
import os

import pytest

import evaluate
from tests._scripts import ROOT, run_script

MODEL = os.path.join(ROOT, "assets", "tiny_math", "model")
TEST = os.path.join(ROOT, "assets", "tiny_math", "data", "test.jsonl")
EVAL = ["--benchmarks", f"heldout={TEST}", "--max-problems", "8", "--k", "2", "--prompt-style", "plain",
        "--max-tokens", "48", "--gen-chunk", "4", "--rollout-engine", "vllm", "--vllm-kv-cache-gib", "0.0625",
        "--grade-workers", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """The shipped tiny model and its closed-form tau=1.5 and tau=0.7 copies: one architecture, three policies."""
    from reheat_tsopsd import closed_form_reheat
    root = tmp_path_factory.mktemp("ckpts")
    return {"base": MODEL, "hot": closed_form_reheat(MODEL, 1.5, str(root / "hot")),
            "cold": closed_form_reheat(MODEL, 0.7, str(root / "cold"))}


def outcome(out, label):
    """What a checkpoint's evaluation produced: its cached samples and its accuracy numbers."""
    (cache,) = (out / "generations" / label).glob("*.jsonl")
    (res,) = (out / "results").glob(f"{label}__*.json")
    r = json.loads(res.read_text())
    return evaluate.read_cache(str(cache)), {k: r[k] for k in ("benchmarks", "macro", "per_problem")}


@pytest.mark.slow
def test_torchrun_three_checkpoints_equal_their_own_runs(checkpoints, tmp_path):
    pytest.importorskip("vllm")
    together = tmp_path / "together"
    run_script("evaluate.py", ["--ckpt", *[f"{k}={v}" for k, v in checkpoints.items()], *EVAL,
                               "--out", together], nproc=2, timeout=300)
    alone = {}
    for label, path in checkpoints.items():
        run_script("evaluate.py", ["--ckpt", f"{label}={path}", *EVAL, "--out", tmp_path / label], timeout=300)
        alone[label] = outcome(tmp_path / label, label)
        assert outcome(together, label) == alone[label], f"{label}: 2 ranks, one engine != its own 1-process run"
    texts = {label: [s["text"] for r in samples.values() for s in r["samples"]]
             for label, (samples, _) in alone.items()}
    assert texts["base"] != texts["hot"] != texts["cold"] != texts["base"]   # the weights really were switched


def variant(src, dst, config=None, chat_template=None):
    """A copy of checkpoint src with config fields or the chat template changed."""
    import shutil
    shutil.copytree(src, dst)
    if config:
        conf = json.loads((dst / "config.json").read_text())
        (dst / "config.json").write_text(json.dumps(conf | config))
    if chat_template:
        (dst / "chat_template.jinja").write_text(chat_template)
    return str(dst)


def test_architecture_difference(checkpoints, tmp_path):
    base = checkpoints["base"]
    assert evaluate.architecture_difference(base, checkpoints["hot"]) == ""
    assert evaluate.architecture_difference(base, variant(base, tmp_path / "v", {"transformers_version": "0"})) == ""
    eps = variant(base, tmp_path / "eps", {"rms_norm_eps": 1e-5, "num_hidden_layers": 4})
    assert evaluate.architecture_difference(base, eps) == "their config.json differ in num_hidden_layers, rms_norm_eps"
    template = variant(base, tmp_path / "template", chat_template="{{ messages[0]['content'] }}")
    assert evaluate.architecture_difference(base, template) == "their tokenizers differ"


@pytest.mark.slow
def test_checkpoints_one_engine_cannot_serve(checkpoints, tmp_path):
    """Refused under torchrun before anything is sampled; one process builds a fresh engine for the second."""
    pytest.importorskip("vllm")
    eps = variant(checkpoints["base"], tmp_path / "eps", {"rms_norm_eps": 1e-5})
    argv = ["--ckpt", f"a={checkpoints['base']}", f"b={eps}", *EVAL, "--out", tmp_path / "out"]
    proc = run_script("evaluate.py", argv, nproc=2, timeout=300, check=False)
    assert proc.returncode != 0
    assert "a and b cannot share it (their config.json differ in rms_norm_eps)" in proc.stderr
    assert not (tmp_path / "out" / "generations").exists()
    proc = run_script("evaluate.py", argv, timeout=300)
    assert proc.stdout.count("Initializing a V1 LLM engine") + proc.stderr.count("Initializing a V1 LLM engine") == 2
    assert all(outcome(tmp_path / "out", label)[1]["macro"]["n_problems"] == 8 for label in ("a", "b"))
