"""Benchmark of the chunked TS-OPSD loss (common/losses.py) against full logits and Liger-Kernel.

One forward+backward of the distillation loss between student logits h_s W_s^T and teacher logits
h_t W_t^T / tau, mean over tokens, gradients to h_s and W_s. Variants:

    naive     full [N, V] logits through plain autograd (what a first implementation does)
    eager     fused_linear_kl(..., compiled=False): chunked, per-chunk math run eagerly
    compiled  fused_linear_kl(..., compiled=True): the same, per-chunk math through torch.compile
    liger     Liger-Kernel's LigerFusedLinearJSDLoss (chunked, torch.func.grad_and_value + torch.compile).
              Liger applies one temperature to both sides, so the teacher-only tau is passed as
              teacher_weight / tau; weight_hard_loss=0 turns its cross-entropy term off.

Liger only has the JSD, so the comparison runs `--divergence jsd` (beta 0.5) on every variant; TS-OPSD's
default reverse KL is cheaper than the JSD in our kernel (fewer exp/log per element).

    python bench/bench_kl.py                                  # CPU: fp32, two shapes -> bench/results/kl_cpu.json
    python bench/bench_kl.py --shapes 1024x256x32768 --variants compiled,liger --iters 2
    python bench/bench_kl.py --out bench/results/kl_h100.json # GPU: bf16, also the Qwen3-4B shape

Method. Every (shape, variant) runs in its own subprocess, so one variant's allocator state, compile
caches and threads cannot leak into another's numbers, and an out-of-memory in the naive variant is just
a row in the table. Each subprocess gets a fresh, empty TORCHINDUCTOR_CACHE_DIR, so "first call" is a cold
compile plus one step. Then `--iters` timed steps (median reported). Memory is the peak of one further step
above what was resident before it (inputs, weights, compiled code):
  - CPU: glibc's mmap threshold is pinned to 64 KiB (mallopt) and the heap trimmed, so every tensor-sized
    allocation is mmap'ed and unmapped on free, i.e. RSS follows live tensors; then the kernel's peak-RSS
    counter is reset (`echo 5 > /proc/self/clear_refs`) and the step's peak read from VmHWM. This excludes
    what compilation itself allocated, which an ru_maxrss-since-start number would mix in; that number is
    also recorded (`first_call_rss_mb`, peak ru_maxrss minus RSS after allocating inputs) for reference.
  - GPU: torch.cuda.max_memory_allocated after reset_peak_memory_stats, minus memory_allocated before.
The timed steps run with the default allocator settings. On GPU a `gemm` row measures the matmul rate at
this shape in the same run and turns it into the floor 8*N*H*V flops / rate (four [N,H]x[H,V]-sized GEMMs:
student and teacher logits, d hidden, d weight) that no chunked loss can beat.

Results on the CPU this was developed on (2 cores of a Xeon with AVX-512, 2 threads, fp32, chunk 256,
JSD beta 0.5, tau 1.5; other jobs shared the machine, so single steps varied by up to ~30%: see times_s
in the JSON):
    | shape NxHxV | variant | first call s | fwd+bwd s | time / liger | peak MB | mem / liger | loss |
    |---|---|---|---|---|---|---|---|
    | 4096x256x32768 | naive | 9.3 | 8.62 | 2.06 | 6144 | 31.32 | 0.088571 |
    | 4096x256x32768 | eager | 5.0 | 3.87 | 0.92 | 189 | 0.96 | 0.088571 |
    | 4096x256x32768 | compiled | 20.6 | 2.20 | 0.52 | 117 | 0.60 | 0.088571 |
    | 4096x256x32768 | liger | 33.8 | 4.19 | 1.00 | 196 | 1.00 | 0.088571 |
    | 2048x256x151936 | naive | skipped: needs ~15 GB > --naive-max-gb | | | | | |
    | 2048x256x151936 | eager | 10.7 | 11.26 | 0.64 | 498 | 0.48 | 0.088928 |
    | 2048x256x151936 | compiled | 23.2 | 4.38 | 0.25 | 457 | 0.44 | 0.088928 |
    | 2048x256x151936 | liger | 43.7 | 17.49 | 1.00 | 1040 | 1.00 | 0.088928 |
    (reverse_kl, compiled, same settings: 1.73 s / 109 MB and 3.88 s / 453 MB; liger has no reverse KL.)
    Peak MB excludes the inputs; ours is ~ the fp32 d weight [V, H] plus two [chunk, V] logit buffers.

Why ours is faster than Liger on CPU: the gradient w.r.t. the logits is written in closed form
(p_s * (g - <g>_p_s) through the softmax Jacobian) instead of autograd through log_softmax/logsumexp/kl_div,
d weight is accumulated with one in-place addmm_ per chunk (no [V, H] temporary), the [C, V] logit buffers
are reused across chunks (no page faults for fresh allocations), and the elementwise part runs on row
blocks that stay in cache (inductor's C++ reductions sweep the whole [C, V] input once per reduction).
"""
import argparse
import ctypes
import json
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = ("naive", "eager", "compiled", "liger")
QWEN3_4B_SHAPE = (16384, 2560, 151936)  # tokens of one micro-batch, hidden size, vocabulary


# ----------------------------------------------------------------------------- arguments

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    # what to measure
    p.add_argument("--shapes", default="4096x256x32768,2048x256x151936",
                   help="comma-separated NxHxV (tokens x hidden x vocab); on GPU the Qwen3-4B shape "
                        f"{'x'.join(map(str, QWEN3_4B_SHAPE))} is appended unless --no-qwen-shape")
    p.add_argument("--no-qwen-shape", action="store_true", help="GPU only: do not add the Qwen3-4B shape")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {VARIANTS}")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"],
                   help="input dtype (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--divergence", default="jsd", choices=["jsd", "reverse_kl", "forward_kl"],
                   help="liger runs only for jsd")
    p.add_argument("--beta", type=float, default=0.5, help="JSD mixture weight of the teacher")
    p.add_argument("--tau", type=float, default=1.5, help="teacher temperature (the paper's headline 1.5)")
    p.add_argument("--chunk-size", type=int, default=256, help="tokens per chunk, ours and liger's alike")
    # how
    p.add_argument("--iters", type=int, default=3, help="timed steps after the first (compile) call")
    p.add_argument("--threads", type=int, default=None, help="torch threads in the workers (default: torch's)")
    p.add_argument("--naive-max-gb", type=float, default=8.0,
                   help="CPU: skip the naive variant when its peak (~12 [N, V] fp32 tensors, measured) would "
                        "exceed this many GB: 6.1 GB at 4096x32768, ~15 GB at 2048x151936")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per worker subprocess")
    p.add_argument("--out", default=None, help="JSON path (default bench/results/kl_cpu.json or kl_gpu.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one measurement, JSON spec
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- the variants (worker side)

def naive_loss(hs, ws, ht, wt, mask, tau, divergence, beta):
    """Full [N, V] logits, plain autograd: the reference the chunked kernels replace."""
    import torch
    logp_s = (hs @ ws.T).float().log_softmax(-1)
    with torch.no_grad():
        logp_t = ((ht @ wt.T).float() / tau).log_softmax(-1)
    if divergence == "reverse_kl":
        div = (logp_s.exp() * (logp_s - logp_t)).sum(-1)
    elif divergence == "forward_kl":
        div = (logp_t.exp() * (logp_t - logp_s)).sum(-1)
    else:
        log_m = torch.logsumexp(torch.stack([logp_s + math.log(1 - beta), logp_t + math.log(beta)]), 0)
        div = beta * (logp_t.exp() * (logp_t - log_m)).sum(-1) + (1 - beta) * (logp_s.exp() * (logp_s - log_m)).sum(-1)
    return (div * mask).sum() / mask.sum().clamp(min=1)


def make_step(variant, spec, hs, ws, ht, wt, mask):
    """A closure running one forward+backward of `variant` and returning the loss."""
    import torch
    from common.losses import fused_linear_kl
    tau, div, beta, chunk = spec["tau"], spec["divergence"], spec["beta"], spec["chunk_size"]
    if variant == "naive":
        fn = lambda: naive_loss(hs, ws, ht, wt, mask, tau, div, beta)
    elif variant in ("eager", "compiled"):
        fn = lambda: fused_linear_kl(hs, ws, ht, wt, mask, tau=tau, divergence=div, beta=beta, chunk_size=chunk,
                                     compiled=variant == "compiled")
    elif variant == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss  # no triton needed for the chunked losses
        liger = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=beta, temperature=1.0,
                                        chunk_size=chunk, compiled=True)
        labels = torch.where(mask, 0, -100)  # only its ignore_index mask matters with weight_hard_loss=0
        wt_tau = wt / tau  # teacher-only temperature
        fn = lambda: liger(hs, ws, ht, wt_tau, labels)
    else:
        raise ValueError(variant)

    def step():
        hs.grad = ws.grad = None
        loss = fn()
        loss.backward()
        return loss.item()
    return step


def _rss_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def cpu_peak_of(step):
    """Peak RSS (MB) of one call of step() above the RSS just before it; see the module docstring."""
    import gc
    libc = ctypes.CDLL("libc.so.6")
    M_MMAP_THRESHOLD = -3
    libc.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _rss_kb("VmRSS")
    step()
    return (_rss_kb("VmHWM") - before) / 1024


def gemm_rate(n, h, v, dtype, device):
    """Achieved flop/s of an [n, h] x [h, v] matmul, the GEMM shape every variant is made of."""
    import torch
    a = torch.randn(min(n, 4096), h, dtype=dtype, device=device)
    b = torch.randn(h, v, dtype=dtype, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    a @ b
    sync()
    reps, t0 = 0, time.perf_counter()
    while reps < 3 or time.perf_counter() - t0 < 1.0:
        a @ b
        reps += 1
    sync()
    return 2 * a.shape[0] * h * v * reps / (time.perf_counter() - t0)


def run_worker(spec):
    import torch
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    n, h, v = spec["shape"]
    out = {"shape": spec["shape"], "variant": spec["variant"], "device": device, "threads": torch.get_num_threads()}
    if spec["variant"] == "gemm":
        rate = gemm_rate(n, h, v, dtype, device)
        out.update(gemm_tflops=rate / 1e12, floor_s=8 * n * h * v / rate)
        return out

    g = torch.Generator(device=device).manual_seed(0)
    # lm_head-like scale: logits of std ~2, so the softmaxes are neither flat nor one-hot
    hs = torch.randn(n, h, device=device, generator=g).to(dtype).requires_grad_()
    ws = (torch.randn(v, h, device=device, generator=g) * (2 / h ** 0.5)).to(dtype).requires_grad_()
    ht = (hs.detach().float() + 0.3 * torch.randn(n, h, device=device, generator=g)).to(dtype)
    wt = (ws.detach().float() + 0.3 * (2 / h ** 0.5) * torch.randn(v, h, device=device, generator=g)).to(dtype)
    mask = torch.ones(n, dtype=torch.bool, device=device)
    out["inputs_mb"] = sum(x.nbytes for x in (hs, ws, ht, wt, mask)) / 2 ** 20
    step = make_step(spec["variant"], spec, hs, ws, ht, wt, mask)
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rss_inputs = _rss_kb("VmRSS") if device == "cpu" else None  # inputs allocated, libraries imported

    t0 = time.perf_counter()
    out["loss"] = step()
    sync()
    out["first_call_s"] = time.perf_counter() - t0
    if device == "cpu":
        import resource
        out["first_call_rss_mb"] = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_inputs) / 1024

    times = []
    for _ in range(spec["iters"]):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    out["times_s"] = times
    out["time_s"] = statistics.median(times)

    if device == "cuda":
        hs.grad = ws.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        out["peak_mb"] = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    else:
        hs.grad = ws.grad = None
        out["peak_mb"] = cpu_peak_of(step)
    return out


# ----------------------------------------------------------------------------- driver

def machine_info(threads):
    import importlib.metadata
    import torch
    from common.runlog import env_info
    env, _ = env_info(ROOT)
    try:
        liger_version = importlib.metadata.version("liger-kernel")
    except importlib.metadata.PackageNotFoundError:
        liger_version = None
    return {
        "cpu": env["cpu"], "cpu_count": env["cpu_count"], "torch_threads": threads or torch.get_num_threads(),
        "torch": torch.__version__, "liger_kernel": liger_version, "python": env["python"],
        "platform": env["platform"], "cuda": env["cuda"], "gpus": env["gpus"], "git": env["git"],
        "date": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }


def spawn(spec, timeout):
    """Run one measurement in a fresh interpreter with an empty inductor cache; returns its result dict."""
    with tempfile.TemporaryDirectory(prefix="bench_kl_inductor_") as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        try:
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                                  capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    tail = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
    return {"error": f"exit code {proc.returncode}: {tail[-200:]}"}


def format_table(rows):
    """Markdown table, time and memory also relative to liger at the same shape."""
    lines = ["| shape NxHxV | variant | first call s | fwd+bwd s | time / liger | peak MB | mem / liger | loss |",
             "|---|---|---|---|---|---|---|---|"]
    by_shape = {}
    for r in rows:
        by_shape.setdefault(tuple(r["shape"]), []).append(r)
    for shape, rs in by_shape.items():
        liger = next((r for r in rs if r["variant"] == "liger" and "error" not in r), None)
        gemm = next((r for r in rs if r["variant"] == "gemm" and "error" not in r), None)
        name = "x".join(map(str, shape))
        for r in rs:
            if r["variant"] == "gemm":
                continue
            if "error" in r:
                lines.append(f"| {name} | {r['variant']} | {r['error']} | | | | | |")
                continue
            t_rel = f"{r['time_s'] / liger['time_s']:.2f}" if liger else "-"
            m_rel = f"{r['peak_mb'] / liger['peak_mb']:.2f}" if liger and liger["peak_mb"] > 0 else "-"
            lines.append(f"| {name} | {r['variant']} | {r['first_call_s']:.1f} | {r['time_s']:.2f} | {t_rel} | "
                         f"{r['peak_mb']:.0f} | {m_rel} | {r['loss']:.6f} |")
        if gemm:
            lines.append(f"| {name} | GEMM floor | | {gemm['floor_s']:.2f} | "
                         f"{gemm['floor_s'] / liger['time_s']:.2f} | | | ({gemm['gemm_tflops']:.2f} TFLOP/s) |"
                         if liger else f"| {name} | GEMM floor | | {gemm['floor_s']:.2f} | | | | |")
    return "\n".join(lines)


def main():
    args = parse_args()
    if args.worker:
        print("RESULT " + json.dumps(run_worker(json.loads(args.worker))), flush=True)
        return
    import torch
    cuda = torch.cuda.is_available()
    dtype = args.dtype or ("bf16" if cuda else "fp32")
    shapes = [tuple(int(x) for x in s.split("x")) for s in args.shapes.split(",")]
    if cuda and not args.no_qwen_shape and QWEN3_4B_SHAPE not in shapes:
        shapes.append(QWEN3_4B_SHAPE)
    variants = args.variants.split(",")
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        raise SystemExit(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")
    out_path = args.out or os.path.join(ROOT, "bench", "results", "kl_gpu.json" if cuda else "kl_cpu.json")
    config = {k: v for k, v in vars(args).items() if k != "worker"} | {"dtype": dtype}

    rows = []
    for shape in shapes:
        n, h, v = shape
        todo = variants + (["gemm"] if cuda else [])
        for variant in todo:
            spec = dict(shape=shape, variant=variant, dtype=dtype, divergence=args.divergence, beta=args.beta,
                        tau=args.tau, chunk_size=args.chunk_size, iters=args.iters, threads=args.threads)
            if variant == "liger" and args.divergence != "jsd":
                result = {"error": "liger has no fused reverse/forward KL"}
            elif variant == "naive" and not cuda and 12 * n * v * 4 / 1e9 > args.naive_max_gb:
                result = {"error": f"skipped: needs ~{12 * n * v * 4 / 1e9:.0f} GB > --naive-max-gb"}
            else:
                print(f"[bench_kl] {'x'.join(map(str, shape))} {variant} ...", flush=True)
                result = spawn(spec, args.timeout)
            rows.append({"shape": list(shape), "variant": variant} | result)
            brief = {k: (round(x, 3) if isinstance(x, float) else x) for k, x in rows[-1].items() if k != "times_s"}
            print(f"[bench_kl]   {brief}", flush=True)

    table = format_table(rows)
    print(table)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump({"machine": machine_info(args.threads), "config": config, "results": rows, "table": table},
                  f, indent=1)
    print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
