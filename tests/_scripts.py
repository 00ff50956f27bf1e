"""Helpers for the end-to-end tests of the training scripts: run one in a subprocess (plain or under
torchrun on gloo), read what it wrote, and compare two runs."""
import math
import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(script: str, args: list, *, nproc: int = 1, timeout: int = 420, check: bool = True):
    """`python script args` (or `torchrun --nproc_per_node=nproc`) from the repo root, one thread per process."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    launcher = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                      f"--nproc_per_node={nproc}"]
    cmd = launcher + [script] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)}\nexited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}\n"
                             f"--- stderr\n{proc.stderr[-8000:]}")
    return proc


def metrics(run_dir: str) -> list[dict]:
    from common.runlog import read_metrics
    return read_metrics(run_dir)


def deterministic(row: dict) -> dict:
    """A metrics row without wall-clock values (time, time/*, perf/*)."""
    return {k: v for k, v in row.items() if k != "time" and not k.startswith(("time/", "perf/"))}


def assert_finite_row(row: dict, keys):
    missing = sorted(set(keys) - set(row))
    assert not missing, f"step {row.get('step')}: missing metrics {missing}"
    for k in keys:
        v = row[k]
        assert isinstance(v, (int, float)) and math.isfinite(v), f"step {row['step']}: {k} = {v!r}"


def weights(model_dir: str) -> dict:
    from safetensors.torch import load_file
    out = {}
    for name in sorted(os.listdir(model_dir)):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(model_dir, name)))
    return out


def assert_same_weights(dir_a: str, dir_b: str, atol: float):
    a, b = weights(dir_a), weights(dir_b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=lambda m, k=k: f"{k}: {m}")


def assert_rows_match(rows_a: list, rows_b: list, keys=None, rel: float = 1e-6, abs_: float = 1e-9):
    """Same steps, same values (within rel/abs) for `keys` (default: every deterministic key of either)."""
    assert [r["step"] for r in rows_a] == [r["step"] for r in rows_b]
    for ra, rb in zip(rows_a, rows_b):
        da, db = deterministic(ra), deterministic(rb)
        ks = keys or sorted(set(da) | set(db))
        for k in ks:
            assert k in da and k in db, f"step {ra['step']}: {k} logged by only one run"
            va, vb = da[k], db[k]
            if isinstance(va, (int, float)) and isinstance(vb, (int, float)):
                assert math.isclose(va, vb, rel_tol=rel, abs_tol=abs_), f"step {ra['step']}: {k}: {va} vs {vb}"
            else:
                assert va == vb, f"step {ra['step']}: {k}: {va!r} vs {vb!r}"


def fixed_sequences(model_dir: str, data_path: str, n: int = 16):
    """(prompt ids, worked-solution ids) of the first n problems: fixed text to measure a policy on."""
    from transformers import AutoTokenizer
    from common.data import load_problems, render_prompt
    from common.tiny import IM_END
    tok = AutoTokenizer.from_pretrained(model_dir)
    return [(tok(render_prompt(p, None, "plain"), add_special_tokens=False).input_ids,
             tok(p.solution + IM_END, add_special_tokens=False).input_ids) for p in load_problems(data_path)[:n]], tok


def mean_token_entropy(model_dir: str, seqs, pad_id: int) -> float:
    """Mean entropy (nats, T=1) of the model's next-token distribution at the response positions of seqs."""
    from transformers import AutoModelForCausalLM
    from common.rollout import pack_sequences
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids, attn, pred, _ = pack_sequences(seqs, pad_id, "cpu")
    with torch.no_grad():
        logp = torch.log_softmax(lm(ids, attention_mask=attn).logits[pred].double(), -1)
    return float(-(logp.exp() * logp).sum(-1).mean())


def run_two_nodes(script: str, args: list, *, timeout: int = 420):
    """The script as two 'nodes' of one process each on this machine: two torchrun launchers with node ranks
    0 and 1 meeting at a c10d rendezvous (so LOCAL_RANK is 0 on both; RANK is 0 and 1)."""
    import socket
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
               "--node-rank", str(node), "--rdzv-backend", "c10d", "--rdzv-endpoint", f"localhost:{port}",
               "--rdzv-id", f"twonode{port}", script] + [str(a) for a in args]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outs = []
    for p in procs:
        try:
            outs.append(p.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for node, (p, (out, err)) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            raise AssertionError(f"node {node}: {script} exited {p.returncode}\n--- stdout\n{out[-3000:]}\n"
                                 f"--- stderr\n{err[-6000:]}")
    return outs
