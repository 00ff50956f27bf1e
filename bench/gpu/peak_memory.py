"""Measured peak CUDA memory of a tiny-model training run beside bench/estimate_memory.py's prediction for it.

    python bench/gpu/peak_memory.py measure rl.json rl_dapo --model ... (the script's own flags)
    python bench/gpu/peak_memory.py estimate memory.json rl.json reheat.json --config assets/tiny_math/model

measure: runs rl_dapo.py's or reheat_tsopsd.py's main(argv) in this process and writes what it allocated.
The estimator models one update (forward, backward and AdamW step of one packed micro-batch, with the weights and
optimizer state resident), so that window is measured on its own: both scripts call engine.sleep() when a step's
rollout ends and engine.sync_weights() when its update is done; the CUDA peak is reset at the one and read at the
other, every step (the first also holds torch.compile's work). Also recorded: the whole run's peak (rollouts
included), the memory reserved by the allocator over the window (its overhead: the estimator's --fragmentation),
what is in use when the update starts, and the longest packed row it ran (the estimate's tokens). Without CUDA the
script still runs and the memory is "skipped: no CUDA". Also recorded, on the model the script itself builds: the
decoder-layer forwards run with grad and those run again inside backward (activation checkpointing recomputes each
once: `ac_ok`), and what the script's preflight (common/preflight.py) measured before vLLM started.

estimate: estimate_memory.simulate for each measured run at its longest row, with the run's activation
checkpointing, head and chunk size, in exact bytes (the CLI's JSON rounds to 1 MiB), and a table of both. World 1:
a one-process run is not sharded (common/dist.shard_model) but FSDPMemTracker follows FSDP modules only, so the
estimator's own `--world 1` cannot run; FSDP2 over one rank holds what the one-process run holds (fp32 weights and
moments, fp32 grads, bf16 compute copies: autocast's instead of FSDP's, at most one bf16 copy of the model apart).
"""
import importlib
import json
import os
import sys
from unittest import mock

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path[:0] = [ROOT, os.path.join(ROOT, "bench")]
MIB = 2 ** 20
SCRIPTS = {"rl_dapo": "rl", "reheat_tsopsd": "reheat"}      # script -> the estimator's stage


def measure(out: str, script: str, argv: list[str]):
    from common.dist import LayerCalls
    mod = importlib.import_module(script)
    cuda = torch.cuda.is_available()
    rec = {"script": script, "stage": SCRIPTS[script], "cuda": cuda, "steps": [], "max_row_tokens": 0,
           "max_row_response": 0, "run_peak_bytes": 0}
    window = {}                                             # the open update window of this step
    real_make_engine, real_pack = mod.make_engine, mod.pack_padding_free

    def pack(seqs, device):
        ids, pos, pred, targets = real_pack(seqs, device)
        if window:
            window["rows"] = window.get("rows", 0) + 1
            rec["max_row_tokens"] = max(rec["max_row_tokens"], ids.shape[1])
            rec["max_row_response"] = max(rec["max_row_response"], int(pred.sum()))
        return ids, pos, pred, targets

    def make_engine(*args, **kwargs):
        engine = real_make_engine(*args, **kwargs)
        sleep, sync = engine.sleep, engine.sync_weights

        def sleep_then_reset():
            sleep()
            window["open"] = True
            if cuda:
                torch.cuda.synchronize()
                rec["run_peak_bytes"] = max(rec["run_peak_bytes"], torch.cuda.max_memory_allocated())
                torch.cuda.reset_peak_memory_stats()
                window["start_bytes"] = torch.cuda.memory_allocated()

        def read_then_sync(model):
            if window.get("rows") and cuda:                 # a step without an update (no mixed groups) ran none
                torch.cuda.synchronize()
                rec["steps"].append({"start_bytes": window["start_bytes"],
                                     "peak_bytes": torch.cuda.max_memory_allocated(),
                                     "reserved_bytes": torch.cuda.max_memory_reserved()})
            window.clear()
            sync(model)
        engine.sleep, engine.sync_weights = sleep_then_reset, read_then_sync
        return engine

    # activation checkpointing counted on the model the script builds: a layer forward run with grad outside
    # backward, and one run again inside it (the recomputation); with checkpointing on, every one is recomputed
    counters, real_load, real_preflight = [], mod.load_sharded, mod.preflight

    def load_sharded(*args, **kwargs):
        model = real_load(*args, **kwargs)
        counters.append(LayerCalls(model))
        return model

    def preflight(*args, **kwargs):
        rec["preflight"] = real_preflight(*args, **kwargs)
        return rec["preflight"]

    with mock.patch.object(mod, "make_engine", make_engine), mock.patch.object(mod, "pack_padding_free", pack), \
            mock.patch.object(mod, "load_sharded", load_sharded), mock.patch.object(mod, "preflight", preflight):
        run_dir = mod.main(argv)
    c = counters[0].counts
    ac = rec["ac_counts"] = {"grad_forwards": c["grad"], "recomputed": c["recomputed"]}
    with open(os.path.join(run_dir, "config.json")) as f:
        cfg = json.load(f)
    on = cuda if cfg["activation_checkpointing"] is None else cfg["activation_checkpointing"]
    rec |= {"run_dir": run_dir, "activation_checkpointing": on, "compile": cfg["compile"],
            "chunk_size": cfg["chunk_size"], "micro_batch_tokens": cfg["micro_batch_tokens"]}
    rec["ac_ok"] = ac["grad_forwards"] > 0 and ac["recomputed"] == (ac["grad_forwards"] if on else 0)
    print(f"[peak_memory] {script}: activation checkpointing {'on' if on else 'off'}: {ac['grad_forwards']} layer "
          f"forwards with grad, {ac['recomputed']} recomputed in backward: {'OK' if rec['ac_ok'] else 'FAIL'}; "
          f"preflight {rec.get('preflight', {'ran': False})}")
    peaks = [s["peak_bytes"] for s in rec["steps"]]
    if cuda:
        rec["run_peak_bytes"] = max(rec["run_peak_bytes"], torch.cuda.max_memory_allocated())
    if peaks:
        print(f"[peak_memory] {script}: update peak {max(peaks[1:] or peaks) / MIB:.1f} MiB after the first step "
              f"({peaks[0] / MIB:.1f} MiB in it), whole run {rec['run_peak_bytes'] / MIB:.1f} MiB, longest row "
              f"{rec['max_row_tokens']} tokens")
    else:
        print(f"[peak_memory] {script}: {'no update ran' if cuda else 'skipped: no CUDA'}")
    with open(out, "w") as f:
        json.dump(rec, f, indent=1)


def estimate(out: str, measured: list[str], config: str):
    import estimate_memory as em
    from common.dist import DistInfo

    class OneRankFSDP(DistInfo):
        distributed = True                                  # shard_model then wraps in FSDP2 over the 1-rank group

    real_fake_world = em.fake_world

    def one_rank(world):
        real_fake_world(world)
        return OneRankFSDP(rank=0, world_size=1, device=torch.device("cpu"))

    em.register_attention()
    cfg = em.load_config(config, "varlen")                  # on CUDA: flash-attention varlen or flex (same memory)
    rows = []
    for path in measured:
        with open(path) as f:
            m = json.load(f)
        tokens = m["max_row_tokens"] or m["micro_batch_tokens"]      # no update ran: the budget
        with mock.patch.object(em, "fake_world", one_rank):
            est = em.simulate(cfg, m["stage"], 1, tokens, m["activation_checkpointing"], wgrad="cuda",
                              head="compiled" if m["compile"] else "eager", chunk_size=m["chunk_size"])
        peaks = [s["peak_bytes"] for s in m["steps"]]
        steady = max(peaks[1:] or peaks) if peaks else None
        rows.append({"stage": m["stage"], "tokens": tokens, "activation_checkpointing": m["activation_checkpointing"],
                     "estimate_bytes": est, "measured_steady_peak_bytes": steady,
                     "measured_first_step_peak_bytes": peaks[0] if peaks else None,
                     "measured_start_bytes": m["steps"][-1]["start_bytes"] if peaks else None,
                     "measured_reserved_bytes": max(s["reserved_bytes"] for s in m["steps"]) if peaks else None,
                     "measured_run_peak_bytes": m["run_peak_bytes"] if m["cuda"] else None, "cuda": m["cuda"]})
    print_table(rows)
    with open(out, "w") as f:
        json.dump({"config": config, "rows": rows, "measured": [json.load(open(p)) for p in measured]}, f, indent=1)


def print_table(rows: list[dict]):
    mib = lambda b: "-" if b is None else f"{b / MIB:.1f}"  # noqa: E731
    print("| stage | row tokens | AC | estimate: peak (params / grads / optim / activ / temps) | measured update peak: "
          "steady (first step) | reserved | whole run | measured / estimate |\n|---|---|---|---|---|---|---|---|")
    for r in rows:
        e, s = r["estimate_bytes"], r["measured_steady_peak_bytes"]
        parts = " / ".join(mib(e[k]) for k in ("params", "grads", "optim", "activations", "temps"))
        meas = f"{mib(s)} ({mib(r['measured_first_step_peak_bytes'])})" if r["cuda"] else "skipped: no CUDA"
        ratio = f"{s / e['peak']:.2f}" if s else "-"
        print(f"| {r['stage']} | {r['tokens']} | {'on' if r['activation_checkpointing'] else 'off'} | "
              f"{mib(e['peak'])} ({parts}) | {meas} | {mib(r['measured_reserved_bytes'])} | "
              f"{mib(r['measured_run_peak_bytes'])} | {ratio} |")
    print("(MiB; measured = torch.cuda.max_memory_allocated between a step's rollout and its weight sync; reserved: "
          "the allocator's peak there, vs the estimator's --fragmentation 1.10)")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) >= 3 and argv[0] == "measure" and argv[2] in SCRIPTS:
        return measure(argv[1], argv[2], argv[3:])
    if len(argv) >= 5 and argv[0] == "estimate" and argv[-2] == "--config":
        return estimate(argv[1], argv[2:-2], argv[-1])
    raise SystemExit(f"usage: {__doc__.splitlines()[2].strip()}\n       {__doc__.splitlines()[3].strip()}\n"
                     f"(measure runs one of {sorted(SCRIPTS)}; estimate takes measure's JSONs and a --config)")


if __name__ == "__main__":
    main()
