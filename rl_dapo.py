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
     Optional objective-side entropy remedies, all off by default (README.md#entropy-remedies): an entropy
     bonus (fixed or adaptive), Clip-Cov / KL-Cov, high-entropy-token selection; tokens are selected over the
     whole mini-batch on all ranks.
  6. push the new weights into the rollout engine

Departures from DAPO/verl, on purpose: one process group does both training and generation (no Ray); groups
are filtered on correctness (verl's `filter_groups.metric=acc`); with one mini-batch per step the old log-probs
are the training forward's own (detached: the ratio is exactly 1, one forward saved), otherwise recomputed.
As in verl's actor, log-probs, ratios and entropies use logits / T, the distribution actually sampled from.

    python rl_dapo.py --model assets/tiny_math/model --data assets/tiny_math/data/train.jsonl --prompt-style plain  # CPU
    torchrun --nproc_per_node=8 rl_dapo.py --model Qwen/Qwen3-4B-Base --data dapo17k --val-data aime24
    python rl_dapo.py --resume runs/rl_dapo__0__20261126-120000     # continue a run from its last checkpoint
    ... --run-name collapse --resume auto       # a relaunch of this same command (SLURM --requeue) continues it

Logged metrics (metrics.jsonl in the run directory; documented in README.md#metrics).
"""
import dataclasses
import os
import time

import torch
from tqdm import tqdm

from common.batching import agree_on_groups, build_step_batch, concat, default_micro_batch_tokens, pack_padding_free
from common.checkpoint import (check_disk_space, drop_snapshots_after, latest_checkpoint, load_checkpoint,
                               save_checkpoint, save_hf, save_snapshot, stored_dtype)
from common.cli import arg, check_context_length, parse_args, resolve_resume, with_resumed_config
from common.data import PROMPT_STYLES, DataError, cycle_problems, load_problems, render_prompt
from common.dist import (all_reduce, check_model_path, check_sharding, cleanup_distributed, derive_seed,
                         init_distributed, print0, resolve_model_path, seed_everything)
from common.grading import extract_answer, grade_batch, truncated_is_wrong
from common.loading import load_sharded, make_optimizer, param_count
from common.preflight import materialize_optimizer_state, oom_hint, preflight, preflight_sequences
from common.losses import chunked_logprob_entropy, entropy_from_hidden
from common.rollout import make_engine
from common.runlog import MetricsLogger, make_run_dir, warn_logprob_mismatch
from common.select import global_quantile, global_top_k, token_ids, uniform_keys
from common.stats import distinct_count
from common.tally import Tally


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
    # objective-side entropy remedies (README.md#entropy-remedies); all off by default: the DAPO loss above
    policy_loss: str = arg("dapo", "dapo; clip_cov (Cui et al. 2505.22617: drop the gradient of k = max(1, "
                           "--cov-ratio x the mini-batch's tokens) tokens drawn among those whose covariance lies in "
                           "(--clip-cov-lb, --clip-cov-ub) and that are not already clipped); "
                           "kl_cov (same paper: no PPO clip, + --kl-cov-coef |log ratio| on the top --cov-ratio "
                           "tokens by covariance; a no-op when a step has one mini-batch). verl selects per GPU "
                           "micro-batch; here over the whole mini-batch on all ranks, so the tokens chosen do not "
                           "depend on --micro-batch-tokens or the number of GPUs", group="entropy remedies",
                           choices=("dapo", "clip_cov", "kl_cov"))
    cov_ratio: float = arg(2e-4, "fraction of the mini-batch's tokens Clip-Cov / KL-Cov pick (verl: clip_cov_ratio, "
                           "kl_cov_ratio; 2e-4; at least one token unless 0)", group="entropy remedies")
    clip_cov_lb: float = arg(1.0, "Clip-Cov: covariance band lower bound (verl clip_cov_lb: 1)", group="entropy remedies")
    clip_cov_ub: float = arg(5.0, "Clip-Cov: covariance band upper bound (verl clip_cov_ub: 5)", group="entropy remedies")
    kl_cov_coef: float = arg(1.0, "KL-Cov: weight of |log ratio| on the picked tokens (verl ppo_kl_coef; the "
                             "paper's recipes: 1)", group="entropy remedies")
    entropy_coef: float = arg(0.0, "entropy bonus c: loss = policy loss - c x token-mean entropy at T, over the "
                              "tokens and with the normaliser of the policy loss (verl actor.entropy_coeff, TRL "
                              "entropy_coef; 0: off). With --entropy-target: the controller's starting value",
                              group="entropy remedies")
    entropy_target: float | None = arg(None, "adaptive entropy control (Skywork-OR1 2505.22312, TRL "
                                       "use_adaptive_entropy): after each optimizer step c += delta if that "
                                       "step's entropy <= this target else c -= delta, within [--entropy-coef-min, "
                                       "--entropy-coef-max]; the bonus applies only while the last measured entropy "
                                       "is <= target. The entropy measured is the update's token-mean entropy at T "
                                       "over the tokens that get the policy gradient (all, or the 80/20 selection), "
                                       "logged as train/entropy_controlled. No default: set it from the run's own "
                                       "early train/entropy (math RL: ~0.1-0.3 nats)", group="entropy remedies")
    entropy_coef_delta: float = arg(0.005, "adaptive control step (TRL: 0.005)", group="entropy remedies")
    entropy_coef_min: float = arg(0.0, "adaptive control lower bound (TRL: 0)", group="entropy remedies")
    entropy_coef_max: float = arg(1.0, "adaptive control upper bound (TRL: 1)", group="entropy remedies")
    top_entropy_quantile: float = arg(1.0, "rho: only tokens whose entropy is >= the (1-rho) quantile of the "
                                      "mini-batch's token entropies (all ranks) get the policy gradient (Wang et "
                                      "al. 2506.01939 '80/20': 0.2; TRL/ms-swift top_entropy_quantile; 1.0: all "
                                      "tokens)", group="entropy remedies")
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
    resume: str = arg("", "run directory to continue from its last complete checkpoint; auto: OUT/RUN_NAME (needs "
                      "--run-name) is continued if it holds a complete checkpoint, else the run starts there, so "
                      "launching the same command again (a SLURM --requeue) continues it, and a finished run "
                      "stays finished", group="run")
    save_every: int = arg(50, "steps between checkpoints (0: only at the end)", group="run")
    keep_last: int = arg(2, "complete checkpoints to keep", group="run")
    snapshot_every: int = arg(0, "every this many steps also write the policy alone (HF weights in the start "
                              "model's dtype, config, tokenizer; no optimizer or resume state; loads in "
                              "transformers and vLLM) to RUN_DIR/snapshots/step_XXXXXX/, never deleted by "
                              "--keep-last: to pick the collapse point after the run (evaluate.py on each). Disk "
                              "per snapshot 2 B/param in bf16: 8.0 GB for Qwen3-4B, 16.4 GB for Qwen3-8B "
                              "(300 steps at 10: 30 of them, 241 GB for 4B). 0: off", group="run")
    val_every: int = arg(10, "steps between validations (0: only at the end)", group="run")
    val_n: int = arg(16, "samples per validation problem; val/accuracy is their mean (avg@n). 16, as evaluate.py's "
                     "--k: on AIME's 30 problems one sample each leaves up to +-9.1 points of sampling noise (one "
                     "sd, sqrt(0.25 / 30)), 16 up to +-2.3; 30 x 16 = 480 responses, 1/50 of one generation "
                     "batch (1536 x 16)", group="run")
    val_temperature: float = arg(1.0, "validation sampling temperature", group="run")
    val_max_problems: int = arg(0, "validate on the first this-many problems (0: all)", group="run")
    wandb_project: str = arg("", "also log to this wandb project (empty: off)", group="run")
    tensorboard: bool = arg(False, "also write tensorboard scalars to RUN_DIR/tb (needs the tensorboard package)",
                            group="run")


def check_args(a: Args):
    """Clear errors before any compute."""
    if a.resume == "auto" and not a.run_name:
        raise SystemExit("--resume auto needs --run-name: the run directory OUT/RUN_NAME that launching the same "
                         "command again continues (a default name holds the launch time)")
    if a.resume and a.resume != "auto":
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
                    chunk_size=a.chunk_size, steps=a.steps, val_n=a.val_n)
    for name, v in positive.items():
        if v <= 0:
            raise SystemExit(f"--{name.replace('_', '-')} must be positive, got {v}")
    if a.micro_batch_tokens is not None and a.micro_batch_tokens <= 0:
        raise SystemExit(f"--micro-batch-tokens must be positive, got {a.micro_batch_tokens}")
    if a.save_every < 0 or a.snapshot_every < 0:
        raise SystemExit("--save-every and --snapshot-every must be >= 0 (0: off)")
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
    if not 0 < a.top_entropy_quantile <= 1:
        raise SystemExit(f"--top-entropy-quantile must be in (0, 1], got {a.top_entropy_quantile}")
    if not 0 <= a.cov_ratio <= 1 or a.clip_cov_lb >= a.clip_cov_ub or a.kl_cov_coef < 0:
        raise SystemExit("--cov-ratio must be in [0, 1], --clip-cov-lb < --clip-cov-ub, --kl-cov-coef >= 0")
    if a.entropy_coef < 0 or not 0 <= a.entropy_coef_min <= a.entropy_coef_max or a.entropy_coef_delta < 0:
        raise SystemExit("--entropy-coef must be >= 0 and 0 <= --entropy-coef-min <= --entropy-coef-max, delta >= 0")
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


def policy_token_loss(mode, logp, old_logp, adv, picked, *, eps_low, eps_high, dual_clip, kl_cov_coef,
                      tis_weight=None):
    """Per-token policy-gradient loss of --policy-loss `mode`; `picked` [N] bool: the tokens the covariance rule
    chose (cov_pick). Returns (loss [N], clip stats [N] x3) as dapo_token_loss.

    dapo      dapo_token_loss.
    clip_cov  Clip-Cov (Cui et al. 2505.22617; verl compute_policy_loss_clip_cov): dapo_token_loss with the
              picked tokens' loss, and so their gradient, set to 0.
    kl_cov    KL-Cov (same paper; verl compute_policy_loss_kl_cov): no clipping, -A r on every token, plus
              kl_cov_coef |log r| on the picked ones (r = pi / pi_old; log r clamped to [-20, 20] as above).
    """
    if mode == "kl_cov":
        log_ratio = (logp - old_logp).clamp(-20.0, 20.0)
        loss = -adv * log_ratio.exp() + kl_cov_coef * log_ratio.abs() * picked
        if tis_weight is not None:
            loss = loss * tis_weight
        none = torch.zeros_like(loss, dtype=torch.bool)
        return loss, none, none, none
    loss, c_hi, c_lo, dual = dapo_token_loss(logp, old_logp, adv, eps_low, eps_high, dual_clip, tis_weight)
    if mode == "clip_cov":
        loss = loss * ~picked
    return loss, c_hi, c_lo, dual


def covariance(adv, logp, mean_adv: float, mean_logp: float):
    """Cui et al.'s per-token covariance term (A - mean A)(log pi - mean log pi), the means over the tokens of the
    selection set (here the whole mini-batch, all ranks): large where a confident token is rewarded."""
    return (adv - mean_adv) * (logp - mean_logp)


def cov_pick(mode, cov, ids, keys, already_clipped, n_tokens: int, ratio: float, lb: float, ub: float):
    """The tokens Clip-Cov / KL-Cov act on, over the whole mini-batch on all ranks (common/select.py), as bool [N].
    k = max(1, int(ratio x the mini-batch's tokens)) (as verl), 0 for ratio 0.
    kl_cov:   the k tokens of largest covariance.
    clip_cov: k tokens drawn uniformly (by their `keys`, uniform numbers fixed per token) among those with
              lb < cov < ub whose loss is not already clipped (zero gradient: clip range or dual clip)."""
    k = max(1, int(n_tokens * ratio)) if ratio > 0 else 0
    if mode == "kl_cov":
        return global_top_k(cov, ids, k)
    band = (cov > lb) & (cov < ub) & ~already_clipped
    picked = torch.zeros_like(band)
    picked[band] = global_top_k(-keys[band], ids[band], k)
    return picked


def high_entropy_tokens(entropy, rho: float):
    """80/20 (Wang et al. 2506.01939; TRL's get_high_entropy_mask): the tokens whose entropy is at or above the
    (1 - rho) quantile of the mini-batch's token entropies, all ranks (linear interpolation, as torch.quantile)."""
    return entropy.double() >= global_quantile(entropy, 1.0 - rho)


def adapt_entropy_coef(coef: float, entropy: float, target: float, delta: float, lo: float, hi: float) -> float:
    """Adaptive entropy control (Skywork-OR1 2505.22312; TRL use_adaptive_entropy), after an optimizer step whose
    token-mean entropy was `entropy`: c + delta (at most hi) while at or below the target, else c - delta (at
    least lo)."""
    return min(coef + delta, hi) if entropy <= target else max(coef - delta, lo)


def token_mean_scales(n_resp: list[int], per_mini: int, world_size: int) -> list[float]:
    """Per mini-batch of `per_mini` consecutive sequences (n_resp: response tokens of each sequence of the step),
    the factor that makes a micro-batch's summed token losses its share of the token mean over its whole
    mini-batch: every micro-batch of it, on every rank. DDP/FSDP average the gradients over ranks, so the factor
    is world_size / (the mini-batch's response tokens, all ranks): that average is then the global sum / count."""
    return [world_size / sum(n_resp[lo:lo + per_mini]) for lo in range(0, len(n_resp), per_mini)]


def main(argv=None):
    args = parse_args(Args, argv, description=__doc__)
    check_args(args)
    args = with_resumed_config(resolve_resume(args, "rl_dapo"))   # --resume auto; a taken --run-name refused

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
    check_disk_space(run_dir, param_count(model_path), export_dtype, args.keep_last,    # before any weights load
                     snapshot=args.snapshot_every > 0)

    if args.policy_loss == "kl_cov" and args.prompts_per_step == args.ppo_mini_batch:
        print0("[rl_dapo] warning: --policy-loss kl_cov with one mini-batch per step does nothing: the only update "
               "is on-policy (ratio exactly 1, |log ratio| = 0); use --ppo-mini-batch < --prompts-per-step")
    if len(train_problems) < args.gen_batch_prompts:
        print0(f"[rl_dapo] note: {len(train_problems)} training problems < --gen-batch-prompts {args.gen_batch_prompts}: "
               f"each generation batch wraps around the data set")

    # ------------------------------------------------------------------------- model
    # built on the meta device, sharded, then filled from rank 0's read of the checkpoint (common/loading.py)
    model = load_sharded(model_path, info, args.sharding, bf16=args.bf16,
                         activation_checkpointing=args.activation_checkpointing)
    optimizer = make_optimizer(model, lr=args.lr, weight_decay=args.weight_decay)
    start_step, cursor = 0, 0
    control = {"entropy_coef": args.entropy_coef, "entropy_last": None}    # the adaptive entropy controller's state
    if args.resume:
        ckpt = latest_checkpoint(args.resume)
        state = load_checkpoint(ckpt, model, optimizer)
        start_step, cursor = state["step"], state["cursor"]
        control = {k: state.get(k, v) for k, v in control.items()}
        print0(f"[rl_dapo] resumed from {ckpt} at step {start_step}")
    logger = MetricsLogger(run_dir, enabled=info.is_main, wandb_project=args.wandb_project or None,
                           tensorboard=args.tensorboard)
    if args.resume:                                     # the killed run's steps after its checkpoint are redone
        logger.truncate_after(start_step)
        drop_snapshots_after(run_dir, start_step)

    # ------------------------------------------------------------------------- loss: forward heads
    T = args.rollout_temperature

    def logprob_head(targets_sel, pred_mask, with_entropy_t1, entropy_grad=False):
        """Head run inside the model's forward: log p(response token) at temperature T (with grad), entropy at
        T (with grad only for the entropy bonus) and, when T != 1, at T=1 (detached), all over response
        positions only: [N] each."""
        def head(hidden, weight):
            h = hidden[pred_mask]                                           # [N, H]
            logp, ent = chunked_logprob_entropy(h, weight, targets_sel, temperature=T, chunk_size=args.chunk_size,
                                                compiled=args.compile, entropy_grad=entropy_grad)
            ent1 = ent
            if with_entropy_t1 and T != 1.0:
                with torch.no_grad():
                    ent1 = entropy_from_hidden(h.detach(), weight.detach(), 1.0, chunk_size=args.chunk_size,
                                               compiled=args.compile)
            return logp, ent, ent1
        return head

    def forward_logprobs(seqs, grad: bool, entropy_grad: bool = False):
        """One padding-free packed micro-batch (common/batching.py) -> (logp, entropy at T, entropy at T=1),
        each [N] over its response tokens in sequence order. [] runs the one-token dummy forward."""
        ids, pos, pred, targets = pack_padding_free(seqs, info.device)
        with torch.set_grad_enabled(grad):
            return model(ids, position_ids=pos, head=logprob_head(targets[pred], pred, True, entropy_grad))

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

    # ------------------------------------------------------------------------- 1-3: rollout, reward, dynamic sampling
    speaks = engine.tp_rank == 0        # with vLLM tensor parallelism one rank of each replica counts its groups
    L, B = args.max_response_len, args.overlong_buffer

    def collect_groups(cursor: int):
        """Generation batches until --prompts-per-step groups with mixed answers were kept (all ranks) or
        --max-gen-batches were drawn. Returns (this rank's kept groups, the new cursor, rollout metrics)."""
        kept, tally, t_gen, t_grade, gen_batches = [], Tally(weight=float(speaks)), 0.0, 0.0, 0
        tally.add(samples=0, correct=0, tokens=0, truncated=0, distinct=0, groups=0, sampled_nll=0, all_right=0,
                  all_wrong=0)                          # every name on every rank, even one that draws no prompt
        tally.max(len_max=0)
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
                tally.add(samples=len(acc), correct=sum(acc), tokens=sum(lengths), truncated=sum(s.finish_reason == "length" for s in g),
                          distinct=distinct_count([extract_answer(s.text) for s in g]), groups=1,
                          sampled_nll=-sum(sum(s.logprobs) for s in g),
                          all_right=all(a > 0 for a in acc), all_wrong=all(a <= 0 for a in acc))
                tally.max(len_max=max(lengths, default=0))
                if keep_group(acc):
                    scores = [(1.0 if a > 0 else -1.0) + overlong_penalty(n_tok, L, B, args.overlong_factor)
                              for a, n_tok in zip(acc, lengths)]
                    kept.append({"position": pos, "scores": scores, "rank": info.rank,          # metadata ...
                                 "sizes": [(len(s.prompt_ids) + len(s.response_ids), len(s.response_ids)) for s in g],
                                 "tensors": [(torch.tensor(s.prompt_ids + s.response_ids),   # ... and the data
                                              torch.tensor(s.logprobs, dtype=torch.float32)) for s in g]})
            if all_reduce(len(kept) * speaks).item() >= args.prompts_per_step or gen_batches >= args.max_gen_batches:
                break
        tally.max(gen_seconds=t_gen)
        r = tally.reduce()
        return kept, cursor, {
            "rollout/accuracy": r.ratio("correct", "samples"),
            "rollout/reward_mean": (2 * r["correct"] - r["samples"]) / max(r["samples"], 1),
            "rollout/response_len_mean": r.ratio("tokens", "samples"), "rollout/response_len_max": r["len_max"],
            "rollout/clipped_frac": r.ratio("truncated", "samples"),
            "rollout/distinct_answers": r.ratio("distinct", "groups"), "rollout/groups_seen": r["groups"],
            "rollout/groups_all_right": r["all_right"], "rollout/groups_all_wrong": r["all_wrong"],
            "rollout/uniform_frac": (r["all_right"] + r["all_wrong"]) / max(r["groups"], 1),
            "rollout/entropy_est": r.ratio("sampled_nll", "tokens"), "rollout/gen_batches": gen_batches,
            "time/rollout": t_gen, "time/grading": t_grade,
            "perf/rollout_tokens_per_s": r["tokens"] / max(r["gen_seconds"], 1e-9)}

    # ------------------------------------------------------------------------- 5: the update
    def score(batch, parts):
        """No-grad forwards of micro-batches `parts` of the step's batch (None: a dummy, run for FSDP's
        collectives): per sequence i, log-probs and entropies at T as float32 [n_resp[i]] tensors, and the summed
        entropies (at T, at T=1) of the real tokens."""
        lp, ent, sums = {}, {}, torch.zeros(2, dtype=torch.float64, device=info.device)
        for part in parts:
            logp, e, e1 = forward_logprobs([batch.seqs[i] for i in part or []], grad=False)
            sizes = [batch.n_resp[i] for i in part or []]
            n = sum(sizes)                                  # a dummy's one position is dropped here
            lp |= dict(zip(part or [], logp.float()[:n].split(sizes)))
            ent |= dict(zip(part or [], e.float()[:n].split(sizes)))      # on the device: no sync per micro-batch
            sums += torch.stack([e[:n].sum(), e1[:n].sum()]).to(sums)
        return lp, ent, sums

    def choose_tokens(batch, mb, advs, old_lp, old_ent, step):
        """The tokens of mini-batch mb that the covariance rule picks and those the entropy quantile keeps, as
        {i: bool [n_resp[i]]}, chosen over the whole mini-batch on all ranks from the CURRENT policy's log-probs
        and entropies (a no-grad pass; before the first update they are the pre-update pass's)."""
        cur_lp, cur_ent = (old_lp, old_ent) if mb == 0 and old_lp else score(batch, batch.plan[mb])[:2]
        idx = [i for part in batch.plan[mb] if part for i in part]      # this rank's sequences of mini-batch mb
        sizes = [batch.n_resp[i] for i in idx]
        lp, ent = concat(cur_lp, idx).double(), concat(cur_ent, idx)
        picked = keep = None
        if args.top_entropy_quantile < 1.0:
            keep = high_entropy_tokens(ent, args.top_entropy_quantile)
        if args.policy_loss != "dapo":
            adv = torch.tensor([advs[i] for i in idx for _ in range(batch.n_resp[i])], dtype=torch.float64)
            old = concat(old_lp, idx).double() if old_lp else lp
            _, c_hi, c_lo, dual = dapo_token_loss(lp, old, adv, args.eps_low, args.eps_high, args.dual_clip)
            sums = all_reduce([adv.sum().item(), lp.sum().item(), len(adv)])     # the means over all ranks
            cov = covariance(adv, lp, sums[0].item() / max(sums[2].item(), 1), sums[1].item() / max(sums[2].item(), 1))
            keys = uniform_keys(idx, batch.n_resp, derive_seed(args.seed, step, mb, 3)) \
                if args.policy_loss == "clip_cov" else None                       # KL-Cov draws nothing
            picked = cov_pick(args.policy_loss, cov, token_ids(idx, batch.n_resp, batch.token_offsets()), keys,
                              c_hi | c_lo | dual, sum(batch.n_resp[i] for i in batch.mini(mb)), args.cov_ratio,
                              args.clip_cov_lb, args.clip_cov_ub)
        split = lambda mask: dict(zip(idx, mask.split(sizes))) if mask is not None else None    # noqa: E731
        return split(picked), split(keep)

    def bonus_coef() -> float:
        """The entropy bonus's coefficient for the next update: fixed, or the adaptive controller's while the
        last measured entropy is at or below the target (open before the first measurement)."""
        if args.entropy_target is None:
            return args.entropy_coef
        last = control["entropy_last"]
        return control["entropy_coef"] if last is None or last <= args.entropy_target else 0.0

    def update_policy(batch, advs, step) -> dict:
        """One epoch of PPO over the step's mini-batches, one optimizer step each (docstring, step 5)."""
        tally, grad_norms, skipped, applied, controlled = Tally(info.device), [], 0, [], []
        tally.max(diff_max=0.0)
        old_lp, old_ent = {}, {}
        if batch.n_mini > 1:      # off-policy after the first update: pre-update log-probs (and entropies) first
            old_lp, old_ent, sums = score(batch, [mb for mini in batch.plan for mb in mini])
            tally.add(entropy=sums[0], entropy_t1=sums[1])
        selecting = args.policy_loss != "dapo" or args.top_entropy_quantile < 1.0
        scales = token_mean_scales(batch.n_resp, batch.per_mini, info.world_size)  # from global counts
        for mb in range(batch.n_mini):
            picked, keep = choose_tokens(batch, mb, advs, old_lp, old_ent, step) if selecting else (None, None)
            coef = bonus_coef()
            applied.append(coef)
            window = Tally(info.device) if args.entropy_target is not None else None   # for the adaptive control
            optimizer.zero_grad(set_to_none=True)
            for part in batch.plan[mb]:
                idx, real = part or [], float(part is not None)   # a dummy adds 0 to the loss and the stats
                logp, ent, ent1 = forward_logprobs([batch.seqs[i] for i in idx], grad=True, entropy_grad=coef > 0)
                dev = logp.device
                adv = torch.tensor([advs[i] for i in idx for _ in range(batch.n_resp[i])] or [0.0], device=dev)
                slp = concat(batch.sampler_logprobs, idx, dev, fill=0.0)
                old = concat(old_lp, idx, dev, fill=0.0) if old_lp else logp.detach().float()
                tis = (old - slp).exp().clamp(max=args.tis_cap) if args.tis_cap > 0 else None
                pick = concat(picked, idx, dev, fill=False) if picked else torch.zeros_like(adv, dtype=torch.bool)
                loss_tok, c_hi, c_lo, dual = policy_token_loss(
                    args.policy_loss, logp.float(), old, adv, pick, eps_low=args.eps_low, eps_high=args.eps_high,
                    dual_clip=args.dual_clip, kl_cov_coef=args.kl_cov_coef, tis_weight=tis)
                kept_tok = concat(keep, idx, dev, fill=True) if keep else torch.ones_like(pick)
                if keep:
                    loss_tok = loss_tok * kept_tok                # 80/20: only high-entropy tokens learn
                bonus = coef * (ent.float() * kept_tok).sum() if coef > 0 else 0.0   # entropy bonus, same tokens
                # token-level mean over the whole mini-batch on all ranks (token_mean_scales)
                loss = (loss_tok.sum() - bonus) * real * scales[mb]
                loss.backward()
                with torch.no_grad():
                    ratio = torch.exp((logp.float() - old).clamp(-20.0, 20.0))
                    diff = (old - slp).abs()
                    first = mb == 0          # before any update: the engine's and the trainer's log-probs
                    tally.add(**{k: v.sum() * real for k, v in dict(
                        pg_loss=loss_tok, clip_hi=c_hi, clip_lo=c_lo, dual=dual, kl=(ratio - 1) - torch.log(ratio),
                        tokens=torch.ones_like(logp), diff=diff * first, cov_picked=pick,
                        entropy_kept=kept_tok).items()})
                    if batch.n_mini == 1:        # else the pre-update pass measured them
                        tally.add(entropy=ent.sum() * real, entropy_t1=ent1.sum() * real)
                    if first and real:
                        tally.max(diff_max=diff.max())
                    if window is not None:
                        window.add(entropy=(ent * kept_tok).sum() * real, tokens=kept_tok.sum() * real)
            gn = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            gn = gn.full_tensor() if hasattr(gn, "full_tensor") else gn
            if args.entropy_target is not None:
                w = window.reduce()
                control["entropy_last"] = w.ratio("entropy", "tokens")
                controlled.append(control["entropy_last"])
                control["entropy_coef"] = adapt_entropy_coef(control["entropy_coef"], control["entropy_last"],
                                                             args.entropy_target, args.entropy_coef_delta,
                                                             args.entropy_coef_min, args.entropy_coef_max)
            if not torch.isfinite(gn):
                print0(f"[rl_dapo] step {step} mini-batch {mb}: non-finite loss/gradient (norm {gn.item()}); update skipped")
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            optimizer.step()
            grad_norms.append(gn.item())
        r = tally.reduce()
        first_mb_tokens = sum(batch.n_resp[i] for i in batch.mini(0))
        return {"train/pg_loss": r.ratio("pg_loss", "tokens"), "train/clip_frac_upper": r.ratio("clip_hi", "tokens"),
                "train/clip_frac_lower": r.ratio("clip_lo", "tokens"), "train/clip_frac_dual": r.ratio("dual", "tokens"),
                "train/approx_kl": r.ratio("kl", "tokens"), "train/entropy": r.ratio("entropy", "tokens"),
                "train/entropy_t1": r.ratio("entropy_t1", "tokens"),
                "train/grad_norm": sum(grad_norms) / max(len(grad_norms), 1), "train/updates": len(grad_norms),
                "train/updates_skipped": skipped, "train/tokens": max(r["tokens"], 1),
                "train/cov_selected_frac": r.ratio("cov_picked", "tokens"),
                "train/entropy_selected_frac": r.ratio("entropy_kept", "tokens"),
                "train/entropy_coef": control["entropy_coef"] if args.entropy_target is not None else args.entropy_coef,
                "train/entropy_coef_applied": sum(applied) / max(len(applied), 1),
                **({"train/entropy_controlled": sum(controlled) / len(controlled)} if controlled else {}),
                "rollout/logprob_diff_mean": r["diff"] / max(first_mb_tokens, 1),
                "rollout/logprob_diff_max": r["diff_max"]}

    # ------------------------------------------------------------------------- training loop
    pbar = tqdm(range(start_step, args.steps), initial=start_step, total=args.steps, disable=not info.is_main,
                desc="rl_dapo", dynamic_ncols=True)
    for step in pbar:
        t_step = time.time()
        lr_now = args.lr * min(1.0, (step + 1) / max(args.warmup_steps, 1))
        for g in optimizer.param_groups:
            g["lr"] = lr_now
        m = {"train/lr": lr_now}

        # ---- 1-3: rollout, reward, dynamic sampling
        kept, cursor, m_rollout = collect_groups(cursor)
        engine.sleep()
        m |= m_rollout

        # The batch: the first prompts_per_step kept groups in stream order, whichever rank sampled them, as whole
        # mini-batches of ppo_mini_batch groups. A step that hit --max-gen-batches short of prompts_per_step trains
        # on its whole mini-batches only (none if it kept fewer than ppo_mini_batch groups), so every optimizer step
        # averages the same number of groups; verl raises instead, which ends a long run for one hard batch.
        pool = agree_on_groups(kept, speaks)              # metadata only: positions, scores, lengths
        n_use = min(len(pool), args.prompts_per_step) // args.ppo_mini_batch * args.ppo_mini_batch
        m |= {"rollout/groups_kept": len(pool), "rollout/groups_filtered": m["rollout/groups_seen"] - len(pool),
              "rollout/groups_used": n_use}

        # ---- 4-5: advantages and the PPO update
        t0 = time.time()
        if n_use == 0:
            print0(f"[rl_dapo] step {step}: {len(pool)} groups with mixed answers after {m['rollout/gen_batches']} "
                   f"generation batches, fewer than --ppo-mini-batch {args.ppo_mini_batch}; no update")
        else:
            advs = [a for g in pool[:n_use] for a in group_advantages(torch.tensor([g["scores"]], dtype=torch.float32))[0].tolist()]
            # token ids and sampler log-probs go from the rank that sampled each sequence to the rank that trains it
            batch = build_step_batch(pool[:n_use], {g["position"]: g["tensors"] for g in kept} if speaks else {},
                                     args.ppo_mini_batch * args.group_size, args.micro_batch_tokens, info.rank,
                                     info.world_size, device=info.device if info.device.type == "cuda" else None)
            m |= update_policy(batch, advs, step)
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
        if args.snapshot_every and done % args.snapshot_every == 0:        # before the checkpoint of its step
            save_snapshot(run_dir, done, model, tokenizer, dtype=export_dtype)
        if (args.save_every and done % args.save_every == 0) or done == args.steps:
            save_checkpoint(run_dir, done, model, tokenizer, optimizer, {"step": done, "cursor": cursor} | control,
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
