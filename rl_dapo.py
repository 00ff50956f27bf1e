"""DAPO: RL from verifiable rewards on math problems, with vLLM rollouts in the training process.

The RL stage of the TS-OPSD paper: it produces the entropy-collapsed checkpoint, and continues RL from it
(plain, at a higher rollout temperature, or from a reheated checkpoint). Per step:

  1. rollout: draw prompts, sample n responses each at temperature T (vLLM in this process, or HF generate)
  2. reward: +1 if the final answer verifies against the ground truth, -1 otherwise (common/grading.py; a
     response cut at the length limit is wrong, unless --grade-truncated), plus
     DAPO's overlong shaping: with max length L and buffer B, a response of length l > L-B gets
     -(l-(L-B))/B * factor
  3. dynamic sampling: drop groups whose n answers are all right or all wrong (their advantages are 0); keep
     generating until the batch has `--prompts-per-step` groups or `--max-gen-batches` batches were drawn (then
     only whole mini-batches of the kept groups train: every optimizer step averages the same number of groups)
  4. advantage: (r - mean_group(r)) / (std_group(r) + 1e-6), the same for every token of a response
  5. update: PPO-clip with decoupled ranges (eps_low 0.2, eps_high 0.28, "clip-higher") and dual-clip c=10
     for negative advantages, log-ratio clamped to [-20, 20]; no KL term; loss = sum over ALL response tokens
     of the mini-batch (every micro-batch, every rank) / their global count ("token-level" mean); one epoch of
     mini-batches. Micro-batches are padding-free packed rows of at most --micro-batch-tokens tokens, the
     mini-batch's sequences dealt to the ranks by tokens (common/batching.py); that changes no number above.
  6. push the new weights into the rollout engine

Departures from DAPO/verl, on purpose: one process group does both training and generation (no Ray);
log-probs and ratios use logits / T, the distribution actually sampled from; groups are filtered on
correctness (verl's `filter_groups.metric=acc`); with one mini-batch per step the old log-probs are the
training forward's own (detached: the ratio is exactly 1, one forward saved), otherwise recomputed.

    python rl_dapo.py --model runs/tiny/model --data runs/tiny/data/train.jsonl --prompt-style plain   # 1 CPU
    torchrun --nproc_per_node=8 rl_dapo.py --model Qwen/Qwen3-4B-Base --data dapo17k --val-data aime24
    python rl_dapo.py --resume runs/rl_dapo__0__20261126-120000     # continue a run from its last checkpoint

Logged metrics (metrics.jsonl in the run directory; documented in README.md#metrics).
"""
import dataclasses
import os
import time

import torch
from tqdm import tqdm

from common.batching import default_micro_batch_tokens, exchange_sequences, pack_padding_free, plan_micro_batches
from common.checkpoint import (check_disk_space, latest_checkpoint, load_checkpoint, save_checkpoint, save_hf,
                               stored_dtype)
from common.cli import arg, check_context_length, parse_args, with_resumed_config
from common.data import PROMPT_STYLES, DataError, cycle_problems, load_problems, render_prompt
from common.dist import (all_gather_objects, all_reduce, check_model_path, check_sharding, cleanup_distributed, derive_seed,
                         init_distributed, print0, resolve_model_path, seed_everything)
from common.grading import extract_answer, grade_batch, truncated_is_wrong
from common.loading import load_sharded, param_count
from common.preflight import materialize_optimizer_state, oom_hint, preflight, preflight_sequences
from common.losses import chunked_logprob_entropy, entropy_from_hidden
from common.rollout import make_engine
from common.runlog import MetricsLogger, make_run_dir, warn_logprob_mismatch
from common.stats import distinct_count


# ----------------------------------------------------------------------------- arguments

@dataclasses.dataclass
class Args:
    # model and data
    model: str = arg("", "HF checkpoint dir or hub id of the policy to train (e.g. Qwen/Qwen3-4B-Base)", group="model and data")
    data: str = arg("dapo17k", "training prompts: a name from common/data.py (dapo17k) or a .jsonl/.parquet file", group="model and data")
    val_data: str = arg("", "held-out set for periodic validation (name or file); empty: no validation", group="model and data")
    prompt_style: str = arg("dapo_chat", "how a problem becomes a prompt: dapo_chat (DAPO instruction in the chat template), "
                            "dapo_raw (no template), plain (problem only; the tiny demo model)", group="model and data",
                            choices=PROMPT_STYLES)
    # rollout
    group_size: int = arg(16, "responses sampled per prompt, n (DAPO: 16)", group="rollout")
    prompts_per_step: int = arg(512, "groups (prompts) kept per training step after dynamic sampling (DAPO: 512)", group="rollout")
    gen_batch_prompts: int = arg(1536, "prompts drawn per generation batch while filling a step (DAPO: 3 x 512)", group="rollout")
    max_gen_batches: int = arg(10, "generation batches per step at most; then train on what was kept and log it", group="rollout")
    max_response_len: int = arg(20480, "max tokens per response, L (DAPO: 20480)", group="rollout")
    overlong_buffer: int = arg(4096, "soft overlong punishment buffer B: responses longer than L-B lose up to `factor` (DAPO: 4096)", group="rollout")
    overlong_factor: float = arg(1.0, "overlong penalty at length L (DAPO: 1.0); 0 disables", group="rollout")
    rollout_temperature: float = arg(1.0, "sampling temperature T; log-probs and ratios use logits/T. T>1 is the paper's "
                                     "rollout-level reheating baseline", group="rollout")
    top_p: float = arg(1.0, "nucleus sampling (1.0: off, as in DAPO training)", group="rollout")
    rollout_engine: str = arg("auto", "vllm, hf (transformers generate), or auto (vllm if installed)", group="rollout",
                              choices=("auto", "vllm", "hf"))
    vllm_gpu_memory: float | None = arg(None, "fraction of the GPU's total memory vLLM may take for its weights + KV "
                                        "cache (default: all that is free with the training state resident, less 2 "
                                        "GiB; README.md#memory-plan)", group="rollout")
    vllm_kv_cache_gib: float | None = arg(None, "KV cache size in GiB (overrides --vllm-gpu-memory; useful on CPU)", group="rollout")
    vllm_tp: int = arg(1, "vLLM tensor parallel size (ranks of one group share prompts)", group="rollout")
    vllm_sleep: bool = arg(True, "free vLLM's GPU memory during training (CUDA only; sleep level 2)", group="rollout")
    hf_batch_size: int = arg(256, "sequences per generate call with the HF engine", group="rollout")
    grade_workers: int | None = arg(None, "grading processes (None: a default from the core count; 0: inline)", group="rollout")
    grade_timeout: float = arg(5.0, "seconds per graded response before it counts as wrong", group="rollout")
    grade_truncated: bool = arg(False, "grade responses cut at --max-response-len on their text (default: they count "
                                "as wrong, so answering then rambling to the limit earns no reward)", group="rollout")
    # loss
    eps_low: float = arg(0.2, "PPO clip range below 1 (DAPO: 0.2)", group="loss")
    eps_high: float = arg(0.28, "PPO clip range above 1, 'clip-higher' (DAPO: 0.28)", group="loss")
    dual_clip: float = arg(10.0, "dual-clip bound c > 1 for negative advantages (DAPO's recipes: 10; verl's default "
                           "clip_ratio_c: 3; 0 disables)", group="loss")
    tis_cap: float = arg(0.0, "truncated importance sampling for sampler/trainer mismatch: weight min(exp(old-sampler), cap); 0 off (try 2.0)", group="loss")
    ppo_mini_batch: int = arg(32, "prompts per optimizer step; a training step does prompts_per_step / this updates (DAPO: 32)", group="loss")
    micro_batch_tokens: int | None = arg(None, "tokens (prompt + response) per padding-free forward/backward; a "
                                         "longer sequence runs alone (memory knob; does not change the math). "
                                         "Default: 32768 on CUDA, 512 on CPU", group="loss")
    chunk_size: int = arg(1024, "tokens per chunk of the vocabulary-wide log-prob/entropy head", group="loss")
    compile: bool = arg(True, "torch.compile the chunked log-prob/entropy hot path (eager twin otherwise)", group="loss")
    # optimizer
    lr: float = arg(2e-6, "AdamW learning rate (paper: 2e-6 for Qwen3-4B/8B)", group="optimizer")
    warmup_steps: int = arg(10, "linear warmup over this many training steps (paper: 10)", group="optimizer")
    weight_decay: float = arg(0.1, "AdamW weight decay (verl/DAPO: 0.1)", group="optimizer")
    grad_clip: float = arg(1.0, "global gradient-norm clip", group="optimizer")
    # systems
    steps: int = arg(100, "training steps", group="systems")
    device: str = arg("auto", "cuda, cpu, or auto", group="systems", choices=("auto", "cpu", "cuda"))
    sharding: str = arg("fsdp", "fsdp (FSDP2), ddp, or none; ignored in a single process", group="systems",
                        choices=("fsdp", "ddp", "none"))
    bf16: bool | None = arg(None, "bf16 compute (default: on CUDA yes, on CPU no)", group="systems")
    activation_checkpointing: bool | None = arg(None, "recompute decoder activations in backward (default: on for CUDA, "
                                                "off on CPU; bench/estimate_memory.py shows the paper's 20k-token "
                                                "responses need it on 80 GB)", group="systems")
    preflight: bool | None = arg(None, "before vLLM starts: one forward/backward of a full --micro-batch-tokens "
                                 "micro-batch, its peak memory printed and an OOM reported in the first minute, not "
                                 "after a rollout (default: on for CUDA; common/preflight.py)", group="systems")
    seed: int = arg(0, "seed; every rank/step derives its own from it", group="systems")
    # run directory
    out: str = arg("runs", "root directory of run directories", group="run")
    run_name: str = arg("", "run directory name (default: rl_dapo__<seed>__<time>)", group="run")
    resume: str = arg("", "run directory to continue from its last complete checkpoint", group="run")
    save_every: int = arg(50, "steps between checkpoints (0: only at the end)", group="run")
    keep_last: int = arg(2, "complete checkpoints to keep", group="run")
    val_every: int = arg(10, "steps between validations (0: only at the end)", group="run")
    val_n: int = arg(1, "samples per validation problem", group="run")
    val_temperature: float = arg(1.0, "validation sampling temperature", group="run")
    val_max_problems: int = arg(0, "validate on the first this-many problems (0: all)", group="run")
    wandb_project: str = arg("", "also log to this wandb project (empty: off)", group="run")
    tensorboard: bool = arg(False, "also write tensorboard scalars to RUN_DIR/tb (needs the tensorboard package)",
                            group="run")


def check_args(a: Args):
    """Clear errors before any compute."""
    if a.resume:
        if not os.path.isdir(a.resume):
            raise SystemExit(f"--resume {a.resume}: no such run directory")
        if latest_checkpoint(a.resume) is None:
            raise SystemExit(f"--resume {a.resume}: it has no complete checkpoint under checkpoints/")
    elif not a.model:
        raise SystemExit("--model is required: a HF checkpoint directory or a hub id like Qwen/Qwen3-4B-Base")
    else:
        check_model_path(a.model)
    positive = dict(group_size=a.group_size, prompts_per_step=a.prompts_per_step, gen_batch_prompts=a.gen_batch_prompts,
                    max_gen_batches=a.max_gen_batches, max_response_len=a.max_response_len, ppo_mini_batch=a.ppo_mini_batch,
                    chunk_size=a.chunk_size, steps=a.steps)
    for name, v in positive.items():
        if v <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {v}")
    if a.micro_batch_tokens is not None and a.micro_batch_tokens <= 0:
        raise SystemExit(f"--micro-batch-tokens must be positive, got {a.micro_batch_tokens}")
    if a.group_size < 2:
        raise SystemExit("--group-size must be at least 2: group-normalised advantages need several samples per prompt")
    if not 0 <= a.overlong_buffer < a.max_response_len:
        raise SystemExit("--overlong-buffer must be in [0, --max-response-len)")
    if a.rollout_temperature <= 0 or a.val_temperature <= 0:
        raise SystemExit("temperatures must be > 0")
    if not 0 < a.top_p <= 1:
        raise SystemExit("--top-p must be in (0, 1]")
    if a.eps_low < 0 or a.eps_high < 0 or a.lr <= 0:
        raise SystemExit("--eps-low, --eps-high must be >= 0 and --lr > 0")
    if 0 < a.dual_clip <= 1 or a.dual_clip < 0:
        raise SystemExit(f"--dual-clip must be > 1 (it caps the loss of negative advantages at c x |A|; c <= 1 would "
                         f"cap the ordinary clipped loss) or 0 to disable, got {a.dual_clip}")
    if a.prompts_per_step % a.ppo_mini_batch:
        raise SystemExit(f"--prompts-per-step ({a.prompts_per_step}) must be a multiple of --ppo-mini-batch "
                         f"({a.ppo_mini_batch}): every optimizer step averages the same number of groups")


# ----------------------------------------------------------------------------- rewards and advantages (the science)

def overlong_penalty(length: int, max_len: int, buffer: int, factor: float) -> float:
    """DAPO's soft overlong punishment: 0 up to L-B, then linear down to -factor at L."""
    if buffer <= 0 or factor == 0 or length <= max_len - buffer:
        return 0.0
    return -(length - (max_len - buffer)) / buffer * factor


def group_advantages(scores: torch.Tensor) -> torch.Tensor:
    """[groups, n] scores -> [groups, n] advantages, normalised within each group (GRPO/DAPO)."""
    mean = scores.mean(dim=1, keepdim=True)
    std = scores.std(dim=1, keepdim=True)           # unbiased, as verl
    return (scores - mean) / (std + 1e-6)


def keep_group(correct: list[float]) -> bool:
    """Dynamic sampling: a group whose answers are all right or all wrong has zero advantage everywhere."""
    return 0 < sum(correct) < len(correct)


def dapo_token_loss(logp, old_logp, adv, eps_low, eps_high, dual_clip, tis_weight=None):
    """Per-token PPO-clip loss with decoupled ranges and dual-clip; returns (loss [N], clip stats [N] x3).

    ratio r = exp(logp - old); clipped = max(-A r, -A clip(r, 1-eps_low, 1+eps_high)); for A < 0 the loss is
    additionally capped at -A c (dual clip), so a huge ratio on a negative token cannot blow up the update.
    The log-ratio is clamped to [-20, 20] before exp (as verl): an overflowing ratio would otherwise give inf * 0
    = NaN gradients through the clipped branch and cost the whole mini-batch.
    """
    ratio = torch.exp((logp - old_logp).clamp(-20.0, 20.0))
    pg1 = -adv * ratio
    pg2 = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
    clipped = torch.maximum(pg1, pg2)
    loss = clipped
    dual_hit = torch.zeros_like(ratio, dtype=torch.bool)
    if dual_clip > 0:
        pg3 = -adv * dual_clip
        dual_hit = (adv < 0) & (pg3 < clipped)
        loss = torch.where(adv < 0, torch.minimum(clipped, pg3), clipped)
    if tis_weight is not None:
        loss = loss * tis_weight
    clip_hi = (adv > 0) & (ratio > 1 + eps_high)
    clip_lo = (adv < 0) & (ratio < 1 - eps_low)
    return loss, clip_hi, clip_lo, dual_hit


def token_mean_scales(n_resp: list[int], per_mini: int, world_size: int) -> list[float]:
    """Per mini-batch of `per_mini` consecutive sequences (n_resp: response tokens of each sequence of the step),
    the factor that makes a micro-batch's summed token losses its share of the token mean over its whole
    mini-batch: every micro-batch of it, on every rank. DDP/FSDP average the gradients over ranks, so the factor
    is world_size / (the mini-batch's response tokens, all ranks): that average is then the global sum / count."""
    return [world_size / sum(n_resp[lo:lo + per_mini]) for lo in range(0, len(n_resp), per_mini)]


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__)
    check_args(args)
    args = with_resumed_config(args)

    # ------------------------------------------------------------------------- setup
    info = init_distributed(args.device)
    check_sharding(args.sharding, info)
    args.micro_batch_tokens = args.micro_batch_tokens or default_micro_batch_tokens(info.device.type)
    seed_everything(derive_seed(args.seed, info.rank))
    model_path = resolve_model_path(args.model)
    try:                                                # before the run directory: a typo leaves no empty run
        train_problems = load_problems(args.data)
        val_problems = load_problems(args.val_data, limit=args.val_max_problems or None) if args.val_data else []
    except DataError as e:
        raise SystemExit(f"[rl_dapo] {e}")
    from transformers import AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    max_prompt = max(len(tokenizer(render_prompt(p, tokenizer, args.prompt_style)).input_ids)
                     for p in train_problems + val_problems)    # vLLM rejects longer prompts
    max_positions = check_context_length(model_path, max_prompt, args.max_response_len)   # before any weights load
    config = dataclasses.asdict(args) | {"model_path": model_path, "world_size": info.world_size}
    if args.resume:                                     # same directory; a changed config is written beside
        config["run_name"] = os.path.basename(os.path.normpath(args.resume))
    run_dir = make_run_dir(os.path.dirname(os.path.normpath(args.resume)) if args.resume else args.out, "rl_dapo",
                           config, rank=info.rank)
    print0(f"[rl_dapo] run directory: {run_dir}")
    # checkpoints: fp32 resume state (DCP) + the HF export in the dtype the model came in (bf16 for Qwen3)
    export_dtype = stored_dtype(model_path)
    check_disk_space(run_dir, param_count(model_path), export_dtype, args.keep_last)   # before any weights load

    if len(train_problems) < args.gen_batch_prompts:
        print0(f"[rl_dapo] note: {len(train_problems)} training problems < --gen-batch-prompts {args.gen_batch_prompts}: "
               f"each generation batch wraps around the data set")

    # ------------------------------------------------------------------------- model
    # built on the meta device, sharded, then filled from rank 0's read of the checkpoint (common/loading.py)
    model = load_sharded(model_path, info, args.sharding, bf16=args.bf16,
                         activation_checkpointing=args.activation_checkpointing)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    start_step, cursor = 0, 0
    if args.resume:
        ckpt = latest_checkpoint(args.resume)
        state = load_checkpoint(ckpt, model, optimizer)
        start_step, cursor = state["step"], state["cursor"]
        print0(f"[rl_dapo] resumed from {ckpt} at step {start_step}")
    logger = MetricsLogger(run_dir, enabled=info.is_main, wandb_project=args.wandb_project or None,
                           tensorboard=args.tensorboard)
    if args.resume:
        logger.truncate_after(start_step)

    # ------------------------------------------------------------------------- loss: forward heads
    T = args.rollout_temperature

    def logprob_head(targets_sel, pred_mask, with_entropy_t1):
        """Head run inside the model's forward: log p(response token) at temperature T (with grad), entropy at
        T and, when T != 1, at T=1 (detached), all over response positions only: [N] each."""
        def head(hidden, weight):
            h = hidden[pred_mask]                                           # [N, H]
            logp, ent = chunked_logprob_entropy(h, weight, targets_sel, temperature=T, chunk_size=args.chunk_size,
                                                compiled=args.compile)
            ent1 = ent
            if with_entropy_t1 and T != 1.0:
                with torch.no_grad():
                    ent1 = entropy_from_hidden(h.detach(), weight.detach(), 1.0, chunk_size=args.chunk_size,
                                               compiled=args.compile)
            return logp, ent, ent1
        return head

    def forward_logprobs(seqs, grad: bool):
        """One padding-free packed micro-batch (common/batching.py) -> (logp, entropy at T, entropy at T=1),
        each [N] over its response tokens in sequence order. [] runs the one-token dummy forward."""
        ids, pos, pred, targets = pack_padding_free(seqs, info.device)
        with torch.set_grad_enabled(grad):
            return model(ids, position_ids=pos, head=logprob_head(targets[pred], pred, True))

    # ------------------------------------------------------------------------- preflight (common/preflight.py)
    # the moments AdamW would create at its first step, now: vLLM's memory check below sees every byte training
    # holds; then one update of the largest micro-batch a run meets, so an OOM shows in the first minute
    materialize_optimizer_state(optimizer)
    longest = min(max_prompt + args.max_response_len, max_positions or 1 << 30)     # a longer one runs alone
    largest = max(args.micro_batch_tokens, longest)                                  # the largest micro-batch

    def preflight_step():
        logp, _, _ = forward_logprobs(preflight_sequences(largest, longest), grad=True)
        logp.float().sum().backward()
        optimizer.zero_grad(set_to_none=True)

    preflight(preflight_step, largest, info, enabled=args.preflight, name="rl_dapo",
              hint=oom_hint(args.micro_batch_tokens, longest, args.activation_checkpointing, info))

    # ------------------------------------------------------------------------- rollout engine
    engine = make_engine(args.rollout_engine, model=model, model_path=model_path, tokenizer=tokenizer, info=info,
                         max_model_len=min(max_prompt + args.max_response_len + 8, max_positions or 1 << 30), seed=args.seed,
                         hf_batch_size=args.hf_batch_size, vllm_gpu_memory=args.vllm_gpu_memory,
                         vllm_kv_cache_gib=args.vllm_kv_cache_gib, vllm_tp=args.vllm_tp, vllm_sleep=args.vllm_sleep)
    torch.set_float32_matmul_precision("high")         # TF32 for fp32 matmuls; after vLLM, which resets it
    if args.resume:
        engine.sync_weights(model)                      # vLLM loaded the original weights from disk
    print0(f"[rl_dapo] engine={engine.name} world={info.world_size} device={info.device} "
           f"train={len(train_problems)} val={len(val_problems)} problems")

    def draw_prompts(cursor: int, count: int):
        """This engine replica's share of the next `count` problems (common/data.py: cycle_problems), with
        their global stream positions (which name them: sampling seeds and the batch order derive from them)."""
        positions = list(range(cursor, cursor + count))[engine.dp_rank::engine.dp_size]
        return cycle_problems(train_problems, args.seed, cursor, count)[engine.dp_rank::engine.dp_size], positions

    def grade_groups(problems, groups):
        """Correctness (0/1) per sample, flattened in group order; a response cut at the length limit is wrong
        unless --grade-truncated (verl's DAPO scorer reads only its last 300 characters: almost always wrong)."""
        responses = [s.text for g in groups for s in g]
        truths = [p.answer for p, g in zip(problems, groups) for _ in g]
        choice = [p.is_choice for p, g in zip(problems, groups) for _ in g]
        correct = grade_batch(responses, truths, is_choice=choice, num_workers=args.grade_workers,
                              timeout_s=args.grade_timeout)
        return truncated_is_wrong(correct, [s.finish_reason for g in groups for s in g], args.grade_truncated)

    # ------------------------------------------------------------------------- validation
    def validate(step: int) -> dict:
        if not val_problems:
            return {}
        mine = val_problems[engine.dp_rank::engine.dp_size]
        seeds = [derive_seed(args.seed, i, step, 2) for i in range(len(val_problems))][engine.dp_rank::engine.dp_size]
        groups = engine.generate([render_prompt(p, tokenizer, args.prompt_style) for p in mine], n=args.val_n,
                                 temperature=args.val_temperature, top_p=1.0, max_tokens=args.max_response_len,
                                 seeds=seeds) if mine else []
        correct = grade_groups(mine, groups) if mine else []
        lengths = [len(s.response_ids) for g in groups for s in g]
        own = engine.tp_rank == 0
        tot = all_reduce([sum(correct) * own, len(correct) * own, sum(lengths) * own])
        return {"val/accuracy": tot[0].item() / max(tot[1].item(), 1), "val/response_len": tot[2].item() / max(tot[1].item(), 1)}

    # ------------------------------------------------------------------------- training loop
    L, B = args.max_response_len, args.overlong_buffer
    pbar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not info.is_main,
                desc="rl_dapo", dynamic_ncols=True)
    for step in pbar:
        t_step = time.time()
        lr_now = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        m = {"train/lr": lr_now}

        # ---- 1-3: rollout, reward, dynamic sampling
        kept, t_gen, t_grade, gen_tokens = [], 0.0, 0.0, 0
        all_acc, all_len, all_trunc, distinct, groups_seen, gen_batches = [], [], [], [], 0, 0
        sampled_nll, all_right, all_wrong = 0.0, 0, 0
        while True:
            problems, positions = draw_prompts(cursor, args.gen_batch_prompts)
            cursor += args.gen_batch_prompts
            t0 = time.time()
            groups = engine.generate([render_prompt(p, tokenizer, args.prompt_style) for p in problems], n=args.group_size,
                                     temperature=T, top_p=args.top_p, max_tokens=L,
                                     seeds=[derive_seed(args.seed, pos, 0, 1) for pos in positions])
            t_gen += time.time() - t0
            t0 = time.time()
            correct = grade_groups(problems, groups)
            t_grade += time.time() - t0
            gen_batches += 1
            for gi, (p, g, pos) in enumerate(zip(problems, groups, positions)):
                acc = correct[gi * args.group_size:(gi + 1) * args.group_size]
                lengths = [len(s.response_ids) for s in g]
                gen_tokens += sum(lengths)
                all_acc += acc
                all_len += lengths
                all_trunc += [s.finish_reason == "length" for s in g]
                distinct.append(distinct_count([extract_answer(s.text) for s in g]))
                sampled_nll -= sum(sum(s.logprobs) for s in g)
                all_right, all_wrong = all_right + all(a > 0 for a in acc), all_wrong + all(a <= 0 for a in acc)
                groups_seen += 1
                if keep_group(acc):
                    scores = [(1.0 if a > 0 else -1.0) + overlong_penalty(n_tok, L, B, args.overlong_factor)
                              for a, n_tok in zip(acc, lengths)]
                    kept.append({"position": pos, "scores": scores, "rank": info.rank,          # metadata ...
                                 "sizes": [(len(s.prompt_ids) + len(s.response_ids), len(s.response_ids)) for s in g],
                                 "tensors": [(torch.tensor(s.prompt_ids + s.response_ids),   # ... and the data
                                              torch.tensor(s.logprobs, dtype=torch.float32)) for s in g]})
            n_kept = all_reduce(len(kept) if engine.tp_rank == 0 else 0).item()
            if n_kept >= args.prompts_per_step or gen_batches >= args.max_gen_batches:
                break
        engine.sleep()

        # The batch: the first prompts_per_step kept groups in stream order, whichever rank sampled them, as whole
        # mini-batches of ppo_mini_batch groups. A step that hit --max-gen-batches short of prompts_per_step trains
        # on its whole mini-batches only (none if it kept fewer than ppo_mini_batch groups), so every optimizer step
        # averages the same number of groups; verl raises instead, which ends a long run for one hard batch.
        # The ranks agree on it from metadata alone (positions, scores, lengths); token ids and sampler log-probs
        # stay on the rank that sampled them until the plan below sends each sequence to the rank that trains it.
        meta = [{k: v for k, v in g.items() if k != "tensors"} for g in kept] if engine.tp_rank == 0 else []
        pool = sorted((g for part in all_gather_objects(meta) for g in part), key=lambda g: g["position"])
        n_use = min(len(pool), args.prompts_per_step) // args.ppo_mini_batch * args.ppo_mini_batch
        own = engine.tp_rank == 0
        tot = all_reduce([sum(all_acc) * own, len(all_acc) * own, sum(all_len) * own, sum(all_trunc) * own,
                          sum(distinct) * own, groups_seen * own, gen_tokens * own, sampled_nll * own,
                          all_right * own, all_wrong * own])
        mx = all_reduce([max(all_len, default=0)], "max")
        m |= {"rollout/accuracy": tot[0].item() / max(tot[1].item(), 1),
              "rollout/reward_mean": (2 * tot[0].item() - tot[1].item()) / max(tot[1].item(), 1),
              "rollout/response_len_mean": tot[2].item() / max(tot[1].item(), 1),
              "rollout/response_len_max": mx[0].item(),
              "rollout/clipped_frac": tot[3].item() / max(tot[1].item(), 1),
              "rollout/distinct_answers": tot[4].item() / max(tot[5].item(), 1),
              "rollout/groups_seen": tot[5].item(), "rollout/groups_kept": len(pool),
              "rollout/groups_filtered": tot[5].item() - len(pool), "rollout/groups_used": n_use,
              "rollout/groups_all_right": tot[8].item(), "rollout/groups_all_wrong": tot[9].item(),
              "rollout/uniform_frac": (tot[8].item() + tot[9].item()) / max(tot[5].item(), 1),
              "rollout/entropy_est": tot[7].item() / max(tot[6].item(), 1),
              "rollout/gen_batches": gen_batches,
              "time/rollout": t_gen, "time/grading": t_grade,
              "perf/rollout_tokens_per_s": tot[6].item() / max(all_reduce(t_gen, "max").item(), 1e-9)}

        # ---- 4-5: advantages and the PPO update
        t0 = time.time()
        if n_use == 0:
            print0(f"[rl_dapo] step {step}: {len(pool)} groups with mixed answers after {gen_batches} generation "
                   f"batches, fewer than --ppo-mini-batch {args.ppo_mini_batch}; no update")
        else:
            # every sequence of the batch by index i: its group's advantages, owner rank, (tokens, response tokens)
            advs, owner, sizes = [], [], []
            for g in pool[:n_use]:
                advs += group_advantages(torch.tensor([g["scores"]], dtype=torch.float32))[0].tolist()
                owner += [g["rank"]] * len(g["sizes"])
                sizes += g["sizes"]
            n_resp = [r for _, r in sizes]
            n_mini, per_mini = n_use // args.ppo_mini_batch, args.ppo_mini_batch * args.group_size
            # plan[mb]: this rank's micro-batches of mini-batch mb, as indices i (None: a dummy forward). Every rank
            # derives the same plan from the lengths (common/batching.py: token-balanced over ranks, token-budget
            # micro-batches, the same count on every rank for FSDP's collectives); dest[i]: who trains sequence i.
            plan, dest = [], [0] * len(sizes)
            for lo in range(0, len(sizes), per_mini):
                every = plan_micro_batches([t for t, _ in sizes[lo:lo + per_mini]], args.micro_batch_tokens, info.world_size)
                for r, mbs in enumerate(every):
                    for j in (j for mb in mbs if mb is not None for j in mb):
                        dest[lo + j] = r
                plan.append([[lo + j for j in mb] if mb is not None else None for mb in every[info.rank]])
            by_pos = {g["position"]: g["tensors"] for g in kept}
            local, i = {}, 0
            for g in pool[:n_use]:
                for j in range(len(g["sizes"])):
                    if g["rank"] == info.rank and engine.tp_rank == 0:
                        local[i] = by_pos[g["position"]][j]
                    i += 1
            data = exchange_sequences(owner, dest, sizes, local, info.rank, info.world_size,
                                      device=info.device if info.device.type == "cuda" else None)
            seqs = {i: (ids[:t - r].tolist(), ids[t - r:].tolist()) for i, (ids, _) in data.items()
                    for t, r in [sizes[i]]}                      # this rank's sequences: (prompt ids, response ids)
            sampler_lp = {i: lps for i, (_, lps) in data.items()}
            # per-step sums kept on the device (one host sync per step, not one per micro-batch): loss, clip_hi,
            # clip_lo, dual, kl, tokens, entropy, entropy_t1 (both of the policy that sampled), logprob diff sum,
            # logprob diff max
            stats = torch.zeros(10, dtype=torch.float64, device=info.device)
            grad_norms, skipped = [], 0

            old_lp = {}
            if n_mini > 1:          # off-policy after the first update: pre-update log-probs (and entropies) first
                for part in (mb for mini in plan for mb in mini):
                    logp, ent, ent1 = forward_logprobs([seqs[i] for i in part or []], grad=False)
                    old_lp |= dict(zip(part or [], logp.float().split([n_resp[i] for i in part or []])))
                    stats[6:8] += torch.stack([ent.sum(), ent1.sum()]).to(stats) * bool(part)

            scales = token_mean_scales(n_resp, per_mini, info.world_size)   # from global counts: every rank knows them
            for mb in range(n_mini):
                optimizer.zero_grad(set_to_none=True)
                for part in plan[mb]:
                    idx, real = part or [], float(part is not None)   # a dummy adds 0 to the loss and the stats
                    logp, ent, ent1 = forward_logprobs([seqs[i] for i in idx], grad=True)
                    dev = logp.device
                    tok_adv = torch.tensor([advs[i] for i in idx for _ in range(n_resp[i])] or [0.0], device=dev)
                    slp = torch.cat([sampler_lp[i] for i in idx]).to(dev) if idx else torch.zeros(1, device=dev)
                    old = torch.cat([old_lp[i] for i in idx]).to(dev) if old_lp and idx else logp.detach().float()
                    tis = (old - slp).exp().clamp(max=args.tis_cap) if args.tis_cap > 0 else None
                    loss_tok, c_hi, c_lo, dual = dapo_token_loss(logp.float(), old, tok_adv, args.eps_low, args.eps_high,
                                                                 args.dual_clip, tis)
                    # token-level mean over the whole mini-batch on all ranks (token_mean_scales)
                    loss = loss_tok.sum() * real * scales[mb]
                    loss.backward()
                    with torch.no_grad():
                        ratio = torch.exp((logp.float() - old).clamp(-20.0, 20.0))
                        diff = (old - slp).abs()
                        first = mb == 0          # before any update: the engine's and the trainer's log-probs
                        parts = [loss_tok.sum(), c_hi.sum(), c_lo.sum(), dual.sum(), ((ratio - 1) - torch.log(ratio)).sum(),
                                 torch.tensor(len(logp)), ent.sum(), ent1.sum(), diff.sum() * first]
                        parts = torch.stack([x.to(stats.device, torch.float64) for x in parts]) * real
                        if n_mini > 1:
                            parts[6:8] = 0       # entropies were taken in the pre-update pass
                        stats[:9] += parts
                        if first and real:
                            stats[9] = torch.maximum(stats[9], diff.max().to(stats.device, torch.float64))
                gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
                if not torch.isfinite(gn):
                    print0(f"[rl_dapo] step {step} mini-batch {mb}: non-finite loss/gradient (norm {gn.item()}); update skipped")
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
                optimizer.step()
                grad_norms.append(gn.item())
            stats = stats.tolist()
            tot = all_reduce(stats[:9])
            ntok = max(tot[5].item(), 1)
            first_mb_tokens = sum(n_resp[:per_mini])
            m |= {"train/pg_loss": tot[0].item() / ntok, "train/clip_frac_upper": tot[1].item() / ntok,
                  "train/clip_frac_lower": tot[2].item() / ntok, "train/clip_frac_dual": tot[3].item() / ntok,
                  "train/approx_kl": tot[4].item() / ntok, "train/entropy": tot[6].item() / ntok,
                  "train/entropy_t1": tot[7].item() / ntok,
                  "train/grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "train/updates": len(grad_norms),
                  "train/updates_skipped": skipped, "train/tokens": ntok,
                  "rollout/logprob_diff_mean": tot[8].item() / max(first_mb_tokens, 1),
                  "rollout/logprob_diff_max": all_reduce([stats[9]], "max")[0].item()}
            # a fresh run's first step samples from weights vLLM read from disk; later ones from the trainer's sync
            warn_logprob_mismatch(m["rollout/logprob_diff_mean"], step,
                                  first_after_sync=step == start_step + (0 if args.resume else 1))
        optimizer.zero_grad(set_to_none=True)           # no gradients held while vLLM wakes up for the next rollout
        m["time/update"] = time.time() - t0

        # ---- 6: weight sync
        t0 = time.time()
        engine.sync_weights(model)
        m["time/weight_sync"] = time.time() - t0
        done = step + 1
        if (args.val_every and done % args.val_every == 0) or done == args.steps:
            t0 = time.time()
            m |= validate(done)
            m["time/validation"] = time.time() - t0
        m["time/step"] = time.time() - t_step
        logger.log(done, m)
        pbar.set_postfix(acc=f"{m['rollout/accuracy']:.3f}", ent=f"{m.get('train/entropy_t1', float('nan')):.3f}",
                         kept=f"{m['rollout/groups_used']}")
        if (args.save_every and done % args.save_every == 0) or done == args.steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, {"step": done, "cursor": cursor},
                            keep_last=args.keep_last, dtype=export_dtype)

    # ------------------------------------------------------------------------- save
    final = os.path.join(run_dir, "final")
    save_hf(final, model, tokenizer, dtype=export_dtype)
    print0(f"[rl_dapo] done: final policy in {final}")
    logger.close()
    engine.close()
    cleanup_distributed()
    return run_dir


if __name__ == "__main__":
    main()
