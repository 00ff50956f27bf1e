"""Helpers for the end-to-end tests of the training scripts: run one in a subprocess (plain or under
torchrun on gloo), in this process with its rollouts recorded (run_in_process), or killed by SIGKILL at a chosen
point (run_killed), read what it wrote, and compare two runs; `python tests/_scripts.py SCRIPT OUT ARGV...` runs a
script with the models it builds inspected."""
import dataclasses
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


def run_killed(script: str, args: list, kill_at: str, *, timeout: int = 420):
    """`python script args` as run_script runs it, but SIGKILLed (no cleanup, no flush, as a node failure or a
    SLURM preemption) at the N-th call of a function: kill_at = "module:function:N", e.g.
    "common.checkpoint:_save_optimizer:2" dies inside the second save_checkpoint, its files half written. The
    script sees the same sys.argv as a plain run (its run directory records `python script args`). Returns the
    CompletedProcess; AssertionError unless it died by SIGKILL."""
    import signal
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, os.path.abspath(__file__), "--kill-at", kill_at, script] + [str(a) for a in args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != -signal.SIGKILL:
        raise AssertionError(f"{' '.join(cmd)}\nexited {proc.returncode}, not by SIGKILL at {kill_at}\n--- stdout\n"
                             f"{proc.stdout[-3000:]}\n--- stderr\n{proc.stderr[-8000:]}")
    return proc


def _killed_main():
    """`python tests/_scripts.py --kill-at MODULE:FUNCTION:N SCRIPT ARGV...` (run_killed)."""
    import importlib
    import signal
    sys.path.insert(0, ROOT)
    _, where, script, *argv = sys.argv[1:]
    module_name, function, n = where.split(":")
    module, calls = importlib.import_module(module_name), [0]
    real = getattr(module, function)

    def killer(*a, **kw):
        calls[0] += 1
        if calls[0] == int(n):
            print(f"[run_killed] SIGKILL at call {n} of {module_name}.{function}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*a, **kw)
    setattr(module, function, killer)
    mod = importlib.import_module(os.path.splitext(script)[0])
    if module is not mod and hasattr(mod, function) and getattr(mod, function) is real:
        setattr(mod, function, killer)          # a name the script imported from the module
    sys.argv = [script, *argv]                  # as `python script ...` from ROOT (run_script's cwd)
    mod.main(argv)


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


# ----------------------------------------------------------------------------- a script's own main(), in this process

def run_in_process(module, argv: list) -> list[dict]:
    """module.main(argv) in this process (one thread, as run_script's subprocess), recording every generate call of
    the rollout engine it builds itself (its own make_engine): [{"step": weight syncs before the call (the steps
    done), "prompts", "n", "temperature", "seeds", "groups": [[sample as a dict]]}]. Nothing of the script is
    re-created; the records are what it sampled, for tests to recount what it logs."""
    calls, syncs = [], [0]
    real_make = module.make_engine

    def recording_engine(*a, **kw):
        engine = real_make(*a, **kw)
        generate, sync = engine.generate, engine.sync_weights

        def recorded_generate(prompts, *, n, temperature, seeds, **rest):
            groups = generate(prompts, n=n, temperature=temperature, seeds=seeds, **rest)
            calls.append({"step": syncs[0], "prompts": list(prompts), "n": n, "temperature": temperature,
                          "seeds": list(seeds), "groups": [[dataclasses.asdict(s) for s in g] for g in groups]})
            return groups

        def counted_sync(model):
            sync(model)
            syncs[0] += 1
        engine.generate, engine.sync_weights = recorded_generate, counted_sync
        return engine

    threads, precision, sys_argv = torch.get_num_threads(), torch.get_float32_matmul_precision(), sys.argv
    module.make_engine = recording_engine
    torch.set_num_threads(1)
    sys.argv = [module.__file__, *map(str, argv)]           # the run directory records the command and the script
    try:
        module.main([str(a) for a in argv])
    finally:
        module.make_engine, sys.argv = real_make, sys_argv
        torch.set_num_threads(threads)
        torch.set_float32_matmul_precision(precision)
    return calls


def grade_recorded(calls: list[dict], data_path: str) -> list[list[list[float]]]:
    """Correctness (1/0) of every recorded sample, [call][group][sample], graded here against the data file's
    answers (prompt style plain: the prompt is the problem text and a newline; a response cut at the length limit
    is wrong, the scripts' default)."""
    from common.data import load_problems, render_prompt
    from common.grading import grade_batch, truncated_is_wrong
    answer = {render_prompt(p, None, "plain"): p.answer for p in load_problems(data_path)}
    out = []
    for c in calls:
        samples = [s for g in c["groups"] for s in g]
        truths = [answer[p] for p, g in zip(c["prompts"], c["groups"]) for _ in g]
        flat = truncated_is_wrong(grade_batch([s["text"] for s in samples], truths, num_workers=0),
                                  [s["finish_reason"] for s in samples])
        it = iter(flat)
        out.append([[next(it) for _ in g] for g in c["groups"]])
    return out


def sampled_nll(model_dir: str, samples: list[dict], temperature: float) -> tuple[float, int]:
    """(sum of -log p(sampled token) under softmax(logits / temperature), token count) over samples, each scored
    alone by a float64 forward of the HF checkpoint model_dir: the sampler's log-probs recomputed independently."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            p, r = s["prompt_ids"], s["response_ids"]
            z = lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1] / temperature
            total -= torch.log_softmax(z, -1).gather(1, torch.tensor(r)[:, None]).sum().item()
            count += len(r)
    return total, count


# ----------------------------------------------------------------------------- the scripts' models, inspected

def inspect_models_main():
    """`python tests/_scripts.py SCRIPT OUT_DIR ARGV...` (plain or under torchrun): the script's own main() with its
    load_sharded wrapped, so what is read is the very object it trains; writes OUT_DIR/models_rank{r}.json, per
    model built: the wrapper, the root's and every decoder layer's FSDP2 MixedPrecisionPolicy (the one its
    gradient reduction uses), the root's bf16-autocast flag, the dtypes its parameters are held in."""
    import importlib
    import json
    sys.path.insert(0, ROOT)
    from common.dist import unwrap
    script, out, *argv = sys.argv[1:]
    mod = importlib.import_module(script)
    models = []

    def policy(module):
        state = getattr(module, "_get_fsdp_state", None)
        if state is None:
            return None
        group = state()._fsdp_param_group
        mp = group.mp_policy if group is not None else state()._mp_policy
        return {"param_dtype": str(mp.param_dtype), "reduce_dtype": str(mp.reduce_dtype)}

    def inspect(model):
        from torch.distributed.fsdp import FSDPModule
        from common.dist import LMWithHead
        ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
        root = model.module if ddp else model
        models.append({"wrapper": "ddp" if ddp else "fsdp" if isinstance(model, FSDPModule) else "none",
                       "root": "LMWithHead" if isinstance(root, LMWithHead) else type(root).__name__,
                       "autocast_bf16": getattr(root, "autocast_bf16", None), "root_policy": policy(root),
                       "layer_policies": [policy(layer) for layer in unwrap(model).model.layers],
                       "param_dtypes": sorted({str(p.dtype) for p in model.parameters()})})
        return model

    real_load = mod.load_sharded
    mod.load_sharded = lambda *a, **kw: inspect(real_load(*a, **kw))
    mod.main(argv)
    with open(os.path.join(out, f"models_rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(models, f)


if __name__ == "__main__":
    _killed_main() if sys.argv[1:2] == ["--kill-at"] else inspect_models_main()
