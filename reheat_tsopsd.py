"""TS-OPSD: reheat an entropy-collapsed policy by on-policy self-distillation from its own softened logits.

Temperature-Scaled On-Policy Self-Distillation (arXiv 2606.00755). Start from a collapsed RL checkpoint
theta_0. Per step:

  1. the student pi_theta (initialised at theta_0) samples n responses per prompt at temperature 1 (on-policy)
  2. the teacher at every response position is softmax(z_t / tau), z_t the logits of the FROZEN theta_0
     (`--teacher frozen`, the paper's) or of the current student, detached (`--teacher online`)
  3. loss = mean over all response tokens (of all ranks) of D(student || teacher) over the FULL vocabulary,
     computed in chunks without ever holding [tokens x vocab] (common/losses.py: fused_linear_kl)
  4. optimizer step; push the weights into the rollout engine
  5. stop after `--steps`, or once the student's mean token entropy on its own rollouts reaches
     `--target-entropy`; save the reheated checkpoint. Then continue RL from it with rl_dapo.py.

The temperature acts on the final logits only: hidden states are untouched by the target. With a frozen
teacher the exact optimum is theta_0 at temperature tau, which `--closed-form` writes without training
(the final RMSNorm weight scaled by 1/tau; correct for tied embeddings too, where scaling lm_head would
also scale the input embedding). Comparing the two checkpoints (evaluate.py --compare) shows what the
gradient-based reheat does beyond pure temperature.

Choices the paper leaves open, and our defaults:
- teacher: frozen (its optimum is well defined: the tau-tempered collapsed model; an online teacher keeps
  moving, so the entropy keeps rising every step and `--target-entropy` is what stops it).
- divergence: reverse KL, KL(student || teacher): on-policy distillation's standard (mode-seeking, and its
  gradient is the policy-gradient of the per-token log-ratio on the student's own samples); forward KL
  and JSD(beta) are one flag away.

    python reheat_tsopsd.py --ckpt runs/rl_tiny/final --data assets/tiny_math/data/train.jsonl --prompt-style plain
    torchrun --nproc_per_node=8 reheat_tsopsd.py --ckpt COLLAPSED --tau 1.5
    python reheat_tsopsd.py --ckpt COLLAPSED --tau 1.5 --closed-form --out runs/closed_form
    ... --run-name reheat --resume auto      # a relaunch of this same command (SLURM --requeue) continues it

Logged metrics (metrics.jsonl; README.md#metrics): reheat/student_entropy, reheat/stop_entropy,
reheat/teacher_entropy, reheat/divergence, reheat/top1_agree, rollout/accuracy, rollout/distinct_answers, rollout/response_len_mean,
train/grad_norm, train/lr, time/*.
"""
import dataclasses
import json
import os
import time

import torch
from tqdm import tqdm

from common.batching import default_micro_batch_tokens, pack_padding_free, plan_micro_batches
from common.calibrate import solve_tau, tempered_entropy
from common.checkpoint import (check_disk_space, drop_snapshots_after, latest_checkpoint, load_checkpoint,
                               save_checkpoint, save_hf, save_snapshot, stored_dtype)
from common.cli import arg, check_context_length, parse_args, resolve_resume, with_resumed_config
from common.data import PROMPT_STYLES, DataError, cycle_problems, load_problems, render_prompt
from common.dist import (all_reduce, check_sharding, cleanup_distributed, derive_seed, full_params, init_distributed,
                         print0, resolve_model_path, seed_everything, unwrap, use_bf16)
from common.grading import extract_answer, grade_batch, truncated_is_wrong
from common.loading import frozen_copy, load_sharded, make_optimizer, param_count
from common.preflight import materialize_optimizer_state, oom_hint, preflight, preflight_sequences
from common.losses import DIVERGENCES, fused_linear_kl
from common.rollout import make_engine
from common.runlog import MetricsLogger, make_run_dir
from common.stats import distinct_count


# ----------------------------------------------------------------------------- arguments

@dataclasses.dataclass
class Args:
    # the method
    ckpt: str = arg("", "HF checkpoint to reheat, usually the collapsed RL policy (rl_dapo.py's final/)", group="method")
    tau: float = arg(1.5, "teacher temperature: the target is softmax(z / tau) (paper: 1.5; < 1 sharpens instead)", group="method")
    teacher: str = arg("frozen", "frozen: a copy of the starting weights (paper); online: the student's own detached logits",
                       group="method", choices=("frozen", "online"))
    divergence: str = arg("reverse_kl", "per-token divergence D(student, teacher) over the full vocabulary", group="method",
                          choices=DIVERGENCES)
    beta: float = arg(0.5, "JSD mixture weight of the teacher, M = (1-beta) p_s + beta p_t (jsd only)", group="method")
    steps: int = arg(50, "reheat steps at most (ours: the paper stops after a fixed number of steps or at a target "
                     "entropy, and neither is visible. At --lr 2e-6 an AdamW step moves a weight by ~lr at most, so "
                     "50 steps move each by <= 1e-4: watch reheat/student_entropy against reheat/teacher_entropy, "
                     "or stop on --target-entropy)", group="method")
    target_entropy: float | None = arg(None, "stop once the student's mean token entropy at T=1 on its rollouts reaches "
                                       "this (nats); None: run all steps", group="method")
    target_window: int = arg(1, "--target-entropy is reached when the mean of the last this-many steps' "
                             "reheat/student_entropy is (after at least that many steps; logged as "
                             "reheat/stop_entropy). 1: the last step's. A small batch's entropy is noisy and, rising "
                             "slowly, first crosses the target on an upward blip: a window of a few steps stops where "
                             "the entropy itself is (the demo: 16 prompts a step, window 5)", group="method")
    closed_form: bool = arg(False, "write the exact tau-tempered checkpoint (final norm / tau) to --out and exit", group="method")
    calibrate_tau: bool = arg(False, "choose tau instead of taking --tau: the tau at which the starting model's mean "
                              "token entropy of softmax(z / tau), at the response positions of one batch of its own "
                              "samples (the first step's prompts and seeds; round 1 at T=1, later rounds at the tau "
                              "found, see --calibrate-rounds), equals --target-entropy (common/calibrate.py: a "
                              "bisection, no training); printed and logged as reheat/tau. With --closed-form: the "
                              "closed form at that tau (needs --data, samples like a reheat run)", group="method")
    calibrate_rounds: int = arg(2, "--calibrate-tau rounds: 1 measures at the positions of T=1 samples (the tempered "
                                "model, sampling more widely, then sees more entropy than H); each further round "
                                "resamples at the tau found", group="method")
    calibrate_tokens: int = arg(4096, "response tokens per rank kept (evenly spaced over the batch) for "
                                "--calibrate-tau: each bisection step is one lm_head pass over them (Qwen3-8B: 4096 x "
                                "151936 x 4096 x 2 FLOP ~ 5e15), ~15 per round", group="method")
    teacher_entropy: float | None = arg(None, "with --calibrate-tau: the entropy the teacher's tau is calibrated to "
                                        "(default: --target-entropy). The student approaches its teacher's entropy "
                                        "from below and, in the demo, levels off short of it; a hotter teacher "
                                        "(e.g. 2x --target-entropy) makes it cross --target-entropy in tens of "
                                        "steps, as the paper's tau 1.5 does with a fixed budget", group="method")
    # data and rollout
    data: str = arg("dapo17k", "prompts: a name from common/data.py or a .jsonl/.parquet file", group="data and rollout")
    prompt_style: str = arg("dapo_chat", "dapo_chat, dapo_raw, or plain (see rl_dapo.py)", group="data and rollout",
                            choices=PROMPT_STYLES)
    group_size: int = arg(8, "responses sampled per prompt, n (ours: the loss needs no groups, having no advantages; "
                          "8 samples per prompt give rollout/distinct_answers, the diversity monitor, its meaning)",
                          group="data and rollout")
    prompts_per_step: int = arg(64, "prompts per step (all ranks together; ours: 64 x 8 = 512 responses, 1/16 of an "
                                "RL step's 512 x 16: every response token carries a full-vocabulary target, not one "
                                "reward per response, so far fewer samples give a steady gradient)",
                                group="data and rollout")
    max_response_len: int = arg(20480, "max tokens per response (rl_dapo.py's L: the student's own rollouts then have "
                                "the lengths its RL produced, where 8192 would cut the long tail of a policy trained "
                                "at 20480. Memory: the default 32768-token micro-batch already holds a whole 20480-"
                                "token response; bench/results/memory_defaults.json, reheat at 32768 tokens: 22.7 GiB "
                                "per GPU for Qwen3-4B, 38.8 for 8B at 8 ranks)", group="data and rollout")
    rollout_engine: str = arg("auto", "vllm, hf, or auto", group="data and rollout", choices=("auto", "vllm", "hf"))
    vllm_gpu_memory: float | None = arg(None, "fraction of the GPU's total memory for vLLM (default: all that is free "
                                        "with the training state resident, less 2 GiB; README.md#memory-plan)",
                                        group="data and rollout")
    vllm_kv_cache_gib: float | None = arg(None, "KV cache size in GiB (overrides --vllm-gpu-memory)", group="data and rollout")
    vllm_tp: int = arg(1, "vLLM tensor parallel size", group="data and rollout")
    vllm_sleep: bool = arg(True, "free vLLM's GPU memory during training (CUDA only)", group="data and rollout")
    hf_batch_size: int = arg(256, "sequences per generate call with the HF engine", group="data and rollout")
    grade_workers: int | None = arg(None, "grading processes for the accuracy monitor (0: inline)", group="data and rollout")
    grade_truncated: bool = arg(False, "the accuracy monitor grades responses cut at --max-response-len on their text "
                                "(default: they count as wrong, as in rl_dapo.py)", group="data and rollout")
    # optimizer
    lr: float = arg(2e-6, "AdamW learning rate (the paper's only reported rate, Appendix A: 2e-6 for its DAPO RL; "
                    "the reheat's own is not visible. See --steps for how far it moves the weights)", group="optimizer")
    warmup_steps: int = arg(0, "linear warmup steps (ours: the paper's 10 are its RL's; the reheat's target is well "
                            "defined from step 1 and an AdamW step is ~lr at most whatever the gradient, so 10 steps "
                            "of warmup would spend a fifth of the 50 on a ramp)", group="optimizer")
    weight_decay: float = arg(0.0, "AdamW weight decay (ours: 0, so only the distillation moves the weights: decay "
                              "would shrink every weight, a change no temperature explains, and blur the comparison "
                              "with --closed-form)", group="optimizer")
    grad_clip: float = arg(1.0, "global gradient-norm clip (DAPO's verl recipe: actor.grad_clip 1.0, as rl_dapo.py)",
                           group="optimizer")
    micro_batch_tokens: int | None = arg(None, "tokens (prompt + response) per padding-free forward/backward; a "
                                         "longer sequence runs alone (memory knob; does not change the math). "
                                         "Default: 32768 on CUDA, 512 on CPU", group="optimizer")
    chunk_size: int = arg(1024, "tokens per chunk of the fused KL head", group="optimizer")
    compile: bool = arg(True, "torch.compile the per-chunk KL math (eager twin otherwise)", group="optimizer")
    # systems and run
    device: str = arg("auto", "cuda, cpu, or auto", group="systems", choices=("auto", "cpu", "cuda"))
    sharding: str = arg("fsdp", "fsdp (FSDP2), ddp, or none", group="systems", choices=("fsdp", "ddp", "none"))
    bf16: bool | None = arg(None, "bf16 compute (default: CUDA yes, CPU no)", group="systems")
    activation_checkpointing: bool | None = arg(None, "recompute decoder activations in backward (default: on for CUDA, "
                                                "off on CPU; bench/estimate_memory.py shows the paper's 20k-token "
                                                "responses need it on 80 GB)", group="systems")
    preflight: bool | None = arg(None, "before vLLM starts: one forward/backward (teacher and student) of a full "
                                 "--micro-batch-tokens micro-batch, its peak memory printed and an OOM reported in the "
                                 "first minute (default: on for CUDA; common/preflight.py)", group="systems")
    seed: int = arg(0, "seed", group="systems")
    out: str = arg("runs", "root of run directories; with --closed-form, the output checkpoint directory", group="run")
    run_name: str = arg("", "run directory name (default: reheat_tsopsd__<seed>__<time>)", group="run")
    resume: str = arg("", "run directory to continue from its last complete checkpoint; auto: OUT/RUN_NAME (needs "
                      "--run-name) is continued if it holds a complete checkpoint, else the run starts there, so "
                      "launching the same command again (a SLURM --requeue) continues it, and a finished run "
                      "stays finished", group="run")
    save_every: int = arg(10, "steps between checkpoints besides the one at the end (0: only that one). 10: at the "
                          "paper's scale a step takes minutes (512 responses of up to 20k tokens), and --resume "
                          "needs a checkpoint; each costs 14 B/param (56 GB for Qwen3-4B, 115 GB for 8B), at most "
                          "--keep-last + 1 on disk", group="run")
    keep_last: int = arg(2, "complete checkpoints to keep", group="run")
    snapshot_every: int = arg(0, "every this many steps also write the student alone (HF weights in the start "
                              "checkpoint's dtype, config, tokenizer; no optimizer or resume state; loads in "
                              "transformers and vLLM) to RUN_DIR/snapshots/step_XXXXXX/, never deleted by "
                              "--keep-last: to choose how far to reheat after the run (evaluate.py on each). Disk per "
                              "snapshot 2 B/param in bf16: 8.0 GB for Qwen3-4B, 16.4 GB for Qwen3-8B. 0: off",
                              group="run")
    wandb_project: str = arg("", "also log to this wandb project (empty: off)", group="run")
    tensorboard: bool = arg(False, "also write tensorboard scalars to RUN_DIR/tb (needs the tensorboard package)",
                            group="run")


def check_args(a: Args):
    if a.resume == "auto" and not a.run_name:
        raise SystemExit("--resume auto needs --run-name: the run directory OUT/RUN_NAME that launching the same "
                         "command again continues (a default name holds the launch time)")
    if a.resume and a.resume != "auto":
        if not os.path.isdir(a.resume) or latest_checkpoint(a.resume) is None:
            raise SystemExit(f"--resume {a.resume}: not a run directory with a complete checkpoint")
    elif not a.ckpt:
        raise SystemExit("--ckpt is required: the HF checkpoint to reheat")
    if not a.tau > 0:
        raise SystemExit(f"--tau must be > 0, got {a.tau}")
    if a.micro_batch_tokens is not None and a.micro_batch_tokens <= 0:
        raise SystemExit(f"--micro-batch-tokens must be positive, got {a.micro_batch_tokens}")
    if a.calibrate_rounds < 1 or a.calibrate_tokens < 1:
        raise SystemExit("--calibrate-rounds and --calibrate-tokens must be >= 1")
    if a.calibrate_tau and not (calibration_entropy(a) or 0) > 0:
        raise SystemExit("--calibrate-tau needs --target-entropy H > 0 (nats), or --teacher-entropy: the entropy tau "
                         "is chosen to give")
    if a.teacher_entropy is not None and not a.calibrate_tau:
        raise SystemExit("--teacher-entropy needs --calibrate-tau (it is the entropy tau is calibrated to)")
    if a.target_window < 1:
        raise SystemExit(f"--target-window must be >= 1, got {a.target_window}")
    if a.save_every < 0 or a.snapshot_every < 0:
        raise SystemExit("--save-every and --snapshot-every must be >= 0 (0: off)")
    if a.tau == 1.0 and a.teacher == "frozen" and not a.closed_form and not a.calibrate_tau:
        raise SystemExit("--tau 1 with a frozen teacher: the student already equals its teacher, so the objective is "
                         "at its minimum (0) and nothing would change. Use tau > 1 to reheat (or < 1 to sharpen).")
    if a.divergence == "jsd" and not 0 < a.beta < 1:
        raise SystemExit(f"--beta must be in (0, 1) for jsd, got {a.beta}")
    for name in ("steps", "group_size", "prompts_per_step", "max_response_len", "chunk_size"):
        if getattr(a, name) <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {getattr(a, name)}")


# ----------------------------------------------------------------------------- the closed form

def closed_form_reheat(ckpt: str, tau: float, out: str, provenance: dict | None = None):
    """theta_0 at temperature tau, exactly: logits = lm_head(norm(h)) and RMSNorm's weight multiplies its output,
    so norm.weight / tau divides every logit by tau and changes nothing else.

    Written in float32 whatever the source's dtype: a bf16 source's weights are upcast exactly, and only
    norm.weight / tau is rounded, to float32 (relative 6e-8). In bf16 that rounding would be up to 2^-8 per
    channel, a per-channel logit scale that is no temperature (tau* and `explained` off in --compare); the price
    is twice a bf16 source's size on disk. Exact only where it is read in float32: evaluate.py scores in float32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    lm = AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32)   # also fixes the saved dtype (config.json)
    with torch.no_grad():
        lm.model.norm.weight.div_(tau)
    save_hf(out, lm, AutoTokenizer.from_pretrained(ckpt))
    with open(os.path.join(out, "closed_form.json"), "w") as f:      # provenance (common/curves.py reads it)
        json.dump({"source": os.path.abspath(ckpt), "tau": tau, "method": "model.norm.weight / tau"} | (provenance or {}),
                  f, indent=1)
    print(f"[reheat_tsopsd] closed-form tau={tau} checkpoint written to {out}")
    return out


def calibration_entropy(args) -> float | None:
    """The entropy --calibrate-tau calibrates tau to: --teacher-entropy, else --target-entropy."""
    return args.teacher_entropy if args.teacher_entropy is not None else args.target_entropy


def calibrated_tau(model, engine, problems, tokenizer, args, info) -> float:
    """--calibrate-tau: one batch of the starting model's own samples (the first step's prompts and seeds), its final
    hidden states at the response positions (at most --calibrate-tokens per rank, evenly spaced), and the tau at which
    the mean entropy of softmax(z / tau) over them is calibration_entropy(args) (common/calibrate.py). Round 1 samples at T=1;
    each further round (--calibrate-rounds) samples at the tau found so far, so that the positions are those the
    tempered model itself visits: the fixed point is a tau whose own samples have entropy H."""
    batch = cycle_problems(problems, args.seed, 0, args.prompts_per_step)[engine.dp_rank::engine.dp_size]
    seeds = [derive_seed(args.seed, pos, 0, 1) for pos in range(args.prompts_per_step)][engine.dp_rank::engine.dp_size]
    lm = unwrap(model)
    head_name = "model.embed_tokens.weight" if lm.config.tie_word_embeddings else "lm_head.weight"
    weight, tau = None, 1.0
    compute_dtype = torch.bfloat16 if use_bf16(info, args.bf16) else torch.float32   # the same on every rank
    for round_ in range(args.calibrate_rounds):
        if round_:
            engine.sync_weights(model)                  # wakes a sleeping vLLM (the weights are unchanged)
        groups = engine.generate([render_prompt(p, tokenizer, args.prompt_style) for p in batch], n=args.group_size,
                                 temperature=tau, top_p=1.0, max_tokens=args.max_response_len, seeds=seeds)
        engine.sleep()
        seqs = [(s.prompt_ids, s.response_ids) for g in groups for s in g][engine.tp_rank::engine.tp]
        # one stride for every rank: each token of the batch weighs the same in the mean over ranks
        total = int(all_reduce(sum(len(r) for _, r in seqs)).item())
        stride = max(1, -(-total // (args.calibrate_tokens * info.world_size)))
        micro = plan_micro_batches([len(p) + len(r) for p, r in seqs], args.micro_batch_tokens, 1)[0]
        micro += [None] * (int(all_reduce(len(micro), "max").item()) - len(micro))   # FSDP: the same count everywhere
        hiddens = []
        for part in micro:
            ids, pos, pred, _ = pack_padding_free([seqs[i] for i in part or []], info.device)
            with torch.no_grad():
                h = model(ids, position_ids=pos, head=lambda hid, w: hid[pred][::stride].detach().clone())
            if part is not None:
                hiddens.append(h)
        if weight is None:
            weight = next(t for _, t in full_params(model, dtype=compute_dtype, names={head_name})).to(info.device)
        entropy_at = tempered_entropy(hiddens, weight, chunk_size=args.chunk_size)
        sampled_at = tau
        try:
            tau = solve_tau(entropy_at, calibration_entropy(args), rel_tol=1e-3)
        except ValueError as e:
            raise SystemExit(f"[reheat_tsopsd] --calibrate-tau: {e}")
        print0(f"[reheat_tsopsd] --calibrate-tau round {round_ + 1}: samples at T={sampled_at:.4f} have entropy "
               f"{entropy_at(sampled_at):.4f}; {calibration_entropy(args)} at tau {tau:.4f}")
    del hiddens, weight
    engine.sync_weights(model)                          # awake for the first step (vLLM slept after sampling)
    return tau


def setup(args):
    """What every mode runs before weights load: the process group, seeds, data, tokenizer and the context check.
    Returns (info, ckpt path, problems, tokenizer, longest prompt, the model's max positions)."""
    info = init_distributed(args.device)
    check_sharding(args.sharding, info)
    args.micro_batch_tokens = args.micro_batch_tokens or default_micro_batch_tokens(info.device.type)
    seed_everything(derive_seed(args.seed, info.rank))
    ckpt = resolve_model_path(args.ckpt)
    try:                                                # before the run directory: a typo leaves no empty run
        problems = load_problems(args.data)
    except DataError as e:
        raise SystemExit(f"[reheat_tsopsd] {e}")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(ckpt)
    max_prompt = max(len(tokenizer(render_prompt(p, tokenizer, args.prompt_style)).input_ids) for p in problems)
    max_positions = check_context_length(ckpt, max_prompt, args.max_response_len)   # before any weights load
    return info, ckpt, problems, tokenizer, max_prompt, max_positions


def rollout_engine(args, model, ckpt, tokenizer, info, max_prompt, max_positions, sleep: bool):
    """The rollout engine (common/rollout.py) for `model`, sized for the longest prompt plus a response."""
    return make_engine(args.rollout_engine, model=model, model_path=ckpt, tokenizer=tokenizer, info=info,
                       max_model_len=min(max_prompt + args.max_response_len + 8, max_positions or 1 << 30),
                       seed=args.seed, hf_batch_size=args.hf_batch_size, vllm_gpu_memory=args.vllm_gpu_memory,
                       vllm_kv_cache_gib=args.vllm_kv_cache_gib, vllm_tp=args.vllm_tp, vllm_sleep=sleep)


def calibrated_closed_form(args):
    """--closed-form --calibrate-tau: sample like a reheat run's first step, find tau, write the closed form."""
    info, ckpt, problems, tokenizer, max_prompt, max_positions = setup(args)
    model = load_sharded(ckpt, info, args.sharding, bf16=args.bf16, requires_grad=False)
    engine = rollout_engine(args, model, ckpt, tokenizer, info, max_prompt, max_positions, sleep=False)
    tau = calibrated_tau(model, engine, problems, tokenizer, args, info)
    if info.is_main:
        closed_form_reheat(ckpt, tau, args.out, {"calibrated": {"target_entropy": calibration_entropy(args),
                                                                "data": args.data, "seed": args.seed}})
    engine.close()
    cleanup_distributed()
    return args.out


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__)
    check_args(args)
    if args.closed_form and not args.calibrate_tau:
        return closed_form_reheat(resolve_model_path(args.ckpt), args.tau, args.out)
    if args.closed_form:
        return calibrated_closed_form(args)
    args = with_resumed_config(resolve_resume(args, "reheat_tsopsd"))   # --resume auto; a taken --run-name refused

    # ------------------------------------------------------------------------- setup
    info, ckpt, problems, tokenizer, max_prompt, max_positions = setup(args)
    config = dataclasses.asdict(args) | {"ckpt_path": ckpt, "world_size": info.world_size}
    if args.resume:                                     # same directory; a changed config is written beside
        config["run_name"] = os.path.basename(os.path.normpath(args.resume))
    run_dir = make_run_dir(os.path.dirname(os.path.normpath(args.resume)) if args.resume else args.out, "reheat_tsopsd",
                           config, rank=info.rank)
    print0(f"[reheat_tsopsd] run directory: {run_dir}")
    # checkpoints: fp32 resume state (DCP) + the HF export in the dtype the model came in (bf16 for Qwen3)
    export_dtype = stored_dtype(ckpt)
    check_disk_space(run_dir, param_count(ckpt), export_dtype, args.keep_last,   # before any weights load
                     snapshot=args.snapshot_every > 0)

    # ------------------------------------------------------------------------- models: student and teacher
    # the student built on the meta device, sharded, then filled from rank 0's read of the checkpoint
    # (common/loading.py); the teacher a frozen copy of its shards, made before a resume moves the student
    student = load_sharded(ckpt, info, args.sharding, bf16=args.bf16, activation_checkpointing=args.activation_checkpointing)
    teacher, teacher_weight = None, None
    if args.teacher == "frozen":
        # theta_0, sharded like the student, no gradients, eval mode. Its lm_head never changes: gathered once.
        teacher = frozen_copy(student, info, args.sharding, bf16=args.bf16)
        head_name = "model.embed_tokens.weight" if unwrap(teacher).config.tie_word_embeddings else "lm_head.weight"
        compute_dtype = torch.bfloat16 if use_bf16(info, args.bf16) else torch.float32      # cast once, then gathered
        teacher_weight = next(t for name, t in full_params(teacher, dtype=compute_dtype, names={head_name})).to(info.device)
    optimizer = make_optimizer(student, lr=args.lr, weight_decay=args.weight_decay)
    start_step, cursor, entropies = 0, 0, []            # entropies: the last --target-window steps' student entropy
    if args.resume:
        resumed = latest_checkpoint(args.resume)
        state = load_checkpoint(resumed, student, optimizer)
        start_step, cursor = state["step"], state["cursor"]
        last = state.get("student_entropy")            # what checkpoints before --target-window held
        entropies = state.get("entropies", [] if last is None else [last])
        args.tau = state.get("tau", args.tau)           # a calibrated tau is part of the run's state
        print0(f"[reheat_tsopsd] resumed from {resumed} at step {start_step}")
    logger = MetricsLogger(run_dir, enabled=info.is_main, wandb_project=args.wandb_project or None,
                           tensorboard=args.tensorboard)
    if args.resume:                                     # the killed run's steps after its checkpoint are redone
        logger.truncate_after(start_step)
        drop_snapshots_after(run_dir, start_step)

    # ------------------------------------------------------------------------- loss: the self-distillation head
    def teacher_hidden(ids, pos, pred):
        """Frozen theta_0's final hidden states at the response positions, [N, H] (no grad)."""
        with torch.no_grad():
            return teacher(ids, position_ids=pos, head=lambda h, w: h[pred].detach().clone())

    def kl_head(pred, t_hidden, scale):
        """Inside the student's forward: D(p_student || softmax(z_teacher / tau)) over the full vocabulary."""
        def head(hidden, weight):
            h = hidden[pred]                                                 # [N, H] response positions
            if args.teacher == "frozen":
                th, tw = t_hidden.to(h.dtype), teacher_weight.to(h.dtype)
            else:                                                            # online: the student's own logits
                th, tw = h.detach(), weight.detach()
            mask = torch.ones(h.shape[0], dtype=torch.bool, device=h.device)
            return fused_linear_kl(h, weight, th, tw, mask, tau=args.tau, divergence=args.divergence, beta=args.beta,
                                   chunk_size=args.chunk_size, compiled=args.compile, return_stats=True,
                                   loss_scale=scale)
        return head

    # ------------------------------------------------------------------------- preflight (common/preflight.py)
    # AdamW's moments now, so vLLM's memory check sees them; one update of the largest micro-batch a run meets
    materialize_optimizer_state(optimizer)
    longest = min(max_prompt + args.max_response_len, max_positions or 1 << 30)     # a longer one runs alone
    largest = max(args.micro_batch_tokens, longest)                                  # the largest micro-batch

    def preflight_step():
        ids, pos, pred, _ = pack_padding_free(preflight_sequences(largest, longest), info.device)
        t_h = teacher_hidden(ids, pos, pred) if teacher is not None else None
        student(ids, position_ids=pos, head=kl_head(pred, t_h, 1.0))[0].backward()
        optimizer.zero_grad(set_to_none=True)

    preflight(preflight_step, largest, info, enabled=args.preflight,
              name="reheat_tsopsd", hint=oom_hint(args.micro_batch_tokens, longest, args.activation_checkpointing, info))

    # ------------------------------------------------------------------------- rollout engine
    engine = rollout_engine(args, student, ckpt, tokenizer, info, max_prompt, max_positions, sleep=args.vllm_sleep)
    torch.set_float32_matmul_precision("high")         # TF32 for fp32 matmuls; after vLLM, which resets it
    if args.resume:
        engine.sync_weights(student)
    elif args.calibrate_tau:                            # the starting model is the student (and the frozen teacher)
        args.tau = calibrated_tau(student, engine, problems, tokenizer, args, info)
    print0(f"[reheat_tsopsd] tau={args.tau} teacher={args.teacher} divergence={args.divergence} engine={engine.name} "
           f"world={info.world_size} problems={len(problems)}")

    # ------------------------------------------------------------------------- loop
    def stop_entropy(entropies) -> float | None:
        """The mean of the last --target-window steps' student entropy (None before that many steps)."""
        window = entropies[-args.target_window:]
        return sum(window) / len(window) if len(window) == args.target_window else None

    def target_reached(entropies) -> bool:
        """--target-entropy reached by the student's mean token entropy on its own rollouts (of the policy that
        sampled them, before that step's update), averaged over the last --target-window steps."""
        e = stop_entropy(entropies)
        return args.target_entropy is not None and e is not None and e >= args.target_entropy

    # resuming a run that stopped on the target (re-checked against this run's --target-entropy) or at --steps:
    # nothing to do, save as is
    end_step = start_step if target_reached(entropies) else args.steps
    pbar = tqdm(range(start_step, end_step), initial=start_step, total=args.steps, disable=not info.is_main,
                desc="reheat", dynamic_ncols=True)
    step = start_step - 1
    for step in pbar:
        t_step = time.time()
        lr_now = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        m = {"train/lr": lr_now}

        # ---- 1: on-policy rollouts at T=1
        t0 = time.time()
        batch = cycle_problems(problems, args.seed, cursor, args.prompts_per_step)[engine.dp_rank::engine.dp_size]
        seeds = [derive_seed(args.seed, pos, 0, 1) for pos in range(cursor, cursor + args.prompts_per_step)]
        seeds = seeds[engine.dp_rank::engine.dp_size]
        cursor += args.prompts_per_step
        groups = engine.generate([render_prompt(p, tokenizer, args.prompt_style) for p in batch], n=args.group_size,
                                 temperature=1.0, top_p=1.0, max_tokens=args.max_response_len,
                                 seeds=seeds)
        engine.sleep()
        m["time/rollout"] = time.time() - t0
        t0 = time.time()
        correct = grade_batch([s.text for g in groups for s in g], [p.answer for p, g in zip(batch, groups) for _ in g],
                              is_choice=[p.is_choice for p, g in zip(batch, groups) for _ in g],
                              num_workers=args.grade_workers)
        correct = truncated_is_wrong(correct, [s.finish_reason for g in groups for s in g], args.grade_truncated)
        distinct = [distinct_count([extract_answer(s.text) for s in g]) for g in groups]
        m["time/grading"] = time.time() - t0
        # the ranks of a vLLM tensor-parallel group hold the same samples: each trains on its share of them
        seqs = [(s.prompt_ids, s.response_ids) for g in groups for s in g][engine.tp_rank::engine.tp]
        # this rank's own samples in token-budget micro-batches, padded with dummies (None) to the largest count
        # over ranks (FSDP's collectives); a one-rank plan of common/batching.py
        micro = plan_micro_batches([len(p) + len(r) for p, r in seqs], args.micro_batch_tokens, 1)[0]
        micro += [None] * (int(all_reduce(len(micro), "max").item()) - len(micro))

        # ---- 2-4: self-distillation update
        t0 = time.time()
        n_tok_global = all_reduce(sum(len(r) for _, r in seqs)).item()
        optimizer.zero_grad(set_to_none=True)
        names = ("student_entropy", "teacher_entropy", "divergence", "top1_agree")
        sums = torch.zeros(len(names), dtype=torch.float64, device=info.device)   # one host sync per step
        for part in micro:
            ids, pos, pred, _ = pack_padding_free([seqs[i] for i in part or []], info.device)   # [1, T] packed
            t_h = teacher_hidden(ids, pos, pred) if teacher is not None else None
            n_tok = int(pred.sum()) if part is not None else 0            # a dummy adds 0 to the loss and the stats
            # fused_linear_kl is a mean over this micro-batch; re-weight to the mean over all tokens of all ranks
            loss, stats = student(ids, position_ids=pos,
                                  head=kl_head(pred, t_h, n_tok / max(n_tok_global, 1) * info.world_size))
            loss.backward()
            sums += torch.stack([stats[k].double().sum() for k in names]).to(sums.device) * (part is not None)
        gn = torch.nn.utils.clip_grad_norm_(student.parameters(), args.grad_clip)
        gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
        if torch.isfinite(gn):
            optimizer.step()
        else:
            print0(f"[reheat_tsopsd] step {step}: non-finite gradient norm; update skipped")
        optimizer.zero_grad(set_to_none=True)           # no gradients held while vLLM wakes up for the next rollout
        m["time/update"] = time.time() - t0
        t0 = time.time()
        engine.sync_weights(student)
        m["time/weight_sync"] = time.time() - t0

        own = engine.tp_rank == 0
        tot = all_reduce(sums.tolist() + [sum(correct) * own, len(correct) * own, sum(distinct) * own,
                                                    len(distinct) * own,
                                                    sum(len(s.response_ids) for g in groups for s in g) * own])
        ntok = max(n_tok_global, 1)
        m |= {f"reheat/{k}": tot[j].item() / ntok for j, k in enumerate(names)}
        m |= {"reheat/tau": args.tau, "rollout/accuracy": tot[4].item() / max(tot[5].item(), 1),
              "rollout/distinct_answers": tot[6].item() / max(tot[7].item(), 1),
              "rollout/response_len_mean": tot[8].item() / max(tot[5].item(), 1),
              "train/grad_norm": gn.item(), "train/tokens": n_tok_global, "time/step": time.time() - t_step}
        entropies = (entropies + [m["reheat/student_entropy"]])[-args.target_window:]
        if (e := stop_entropy(entropies)) is not None:
            m["reheat/stop_entropy"] = e
        logger.log(step + 1, m)
        pbar.set_postfix(ent=f"{m['reheat/student_entropy']:.3f}", kl=f"{m['reheat/divergence']:.4f}",
                         acc=f"{m['rollout/accuracy']:.3f}")
        done = step + 1
        if args.snapshot_every and done % args.snapshot_every == 0:        # before the checkpoint of its step
            save_snapshot(run_dir, done, student, tokenizer, dtype=export_dtype)
        if args.save_every and done % args.save_every == 0 and done < args.steps:
            save_checkpoint(run_dir, done, student, tokenizer, optimizer,
                            {"step": done, "cursor": cursor, "entropies": entropies, "tau": args.tau},
                            keep_last=args.keep_last, dtype=export_dtype)
        if target_reached(entropies):
            print0(f"[reheat_tsopsd] student entropy {stop_entropy(entropies):.4f} (mean of the last "
                   f"{args.target_window} steps) >= target {args.target_entropy}: stopping")
            break

    # ------------------------------------------------------------------------- save
    save_checkpoint(run_dir, step + 1, student, tokenizer, optimizer,
                    {"step": step + 1, "cursor": cursor, "entropies": entropies, "tau": args.tau},
                    keep_last=args.keep_last, dtype=export_dtype)
    final = os.path.join(run_dir, "final")
    save_hf(final, student, tokenizer, dtype=export_dtype)
    print0(f"[reheat_tsopsd] done: reheated policy in {final}")
    logger.close()
    engine.close()
    cleanup_distributed()
    return run_dir


if __name__ == "__main__":
    main()
