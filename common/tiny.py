"""The tiny fixture: a Qwen3-architecture model, its tokenizer, and synthetic math data, all built here.

Nothing can be downloaded on CI or a laptop without a hub, so every test and the demo start from what
this module writes, deterministically from a seed:

    python -m common.tiny OUT_DIR [--seed 0] [--untied]

    OUT_DIR/model/         Qwen3ForCausalLM (random init) + tokenizer, loadable by transformers and vLLM
    OUT_DIR/data/train.jsonl, OUT_DIR/data/test.jsonl
                           arithmetic word problems in DAPO-Math-17k's schema (disjoint splits)

The tokenizer is a byte-level BPE (like Qwen's) trained on the synthetic corpus, with digits split one
per token before BPE, as Qwen's pre-tokenizer does: a tiny model learns digit-by-digit arithmetic far
more easily when "93" is always the tokens "9","3" and never a merged "93". Byte-level (not a
character vocabulary) so any text, including hostile model output, round-trips through it. Merges only
shorten the fixed words ("What", "Answer", ...).

The model's shapes are the smallest that vLLM's CPU attention accepts (head_dim must be one of 32, 64,
80, 96, 112, 128, ...: 16 fails at the first generate), with a few hundred thousand parameters.
Qwen3-4B ties the input embedding and lm_head, Qwen3-8B does not: `--untied` builds the latter.
"""
import argparse
import json
import os
import random

# Qwen3's special tokens: base models end with <|endoftext|>, chat turns with <|im_end|>; rollouts
# must stop on both (see common/rollout.py).
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END]
# Qwen-style ChatML template, enough for the DAPO prompt (one user turn, then the assistant).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


# ----------------------------------------------------------------------------- synthetic problems

def make_problem(rng: random.Random, min_terms: int = 2, max_terms: int = 4, max_operand: int = 99) -> dict:
    """One chain of additions and subtractions with an integer answer and its worked solution.

    The solution is the left-to-right chain of partial results, one line each, then DAPO's final line
    `Answer: N`, e.g. for 5+88-2: "5+88=93\\n93-2=91\\nAnswer: 91".
    """
    n_terms = rng.randint(min_terms, max_terms)
    terms = [rng.randint(1, max_operand) for _ in range(n_terms)]
    ops = [rng.choice("+-") for _ in range(n_terms - 1)]
    expr, value, lines = str(terms[0]), terms[0], []
    for op, t in zip(ops, terms[1:]):
        new = value + t if op == "+" else value - t
        lines.append(f"{value}{op}{t}={new}")
        expr += f"{op}{t}"
        value = new
    lines.append(f"Answer: {value}")
    return {"problem": f"What is {expr}?", "answer": str(value), "solution": "\n".join(lines)}


def make_splits(n_train: int, n_test: int, seed: int = 0, **kw) -> tuple[list[dict], list[dict]]:
    """Disjoint train/test problem lists (no problem text in both), deterministic in `seed`."""
    rng, seen, problems = random.Random(seed), set(), []
    for _ in range(100 * (n_train + n_test)):
        if len(problems) == n_train + n_test:
            break
        p = make_problem(rng, **kw)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            problems.append(p)
    if len(problems) < n_train + n_test:
        raise ValueError(f"only {len(problems)} distinct problems exist for these settings; "
                         f"ask for fewer than {n_train}+{n_test} or widen the operand range")
    return problems[n_test:], problems[:n_test]


def to_dapo_row(p: dict, index: int, split: str) -> dict:
    """DAPO-Math-17k's schema: the prompt is a chat list whose user turn wraps the problem in DAPO's
    instruction; the verifier reads reward_model.ground_truth. The worked solution rides in extra_info
    (used only to pre-train the demo's tiny model)."""
    from common.data import dapo_instruction
    return {
        "data_source": "synthetic_arith",
        "prompt": [{"role": "user", "content": dapo_instruction(p["problem"])}],
        "ability": "MATH",
        "reward_model": {"ground_truth": p["answer"], "style": "rule-lighteval/MATH_v2"},
        "extra_info": {"index": f"{split}-{index}", "solution": p["solution"]},
    }


def write_jsonl(rows: list[dict], path: str) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


# ----------------------------------------------------------------------------- tokenizer and model

def build_tokenizer(corpus: list[str], vocab_size: int = 384):
    """Byte-level BPE trained on `corpus`, digits isolated, wrapped as a PreTrainedTokenizerFast."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                   chat_template=CHAT_TEMPLATE, model_max_length=4096)


def build_model(tokenizer, *, tied: bool = True, seed: int = 0, hidden_size: int = 128, layers: int = 3,
                heads: int = 4, kv_heads: int = 2, head_dim: int = 32, intermediate_size: int = 384,
                max_positions: int = 1024):
    """A randomly initialised Qwen3ForCausalLM; vocab padded to a multiple of 64 (like Qwen's)."""
    import torch
    from transformers import GenerationConfig, Qwen3Config, Qwen3ForCausalLM

    vocab = -(-len(tokenizer) // 64) * 64
    eos_ids = [tokenizer.convert_tokens_to_ids(IM_END), tokenizer.convert_tokens_to_ids(ENDOFTEXT)]
    config = Qwen3Config(
        vocab_size=vocab, hidden_size=hidden_size, intermediate_size=intermediate_size,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
        max_position_embeddings=max_positions, rope_theta=10000.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tied, bos_token_id=None, eos_token_id=eos_ids[0],
        pad_token_id=tokenizer.pad_token_id, dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen3ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id,
                                               do_sample=True, temperature=1.0, top_p=1.0, top_k=0)
    return model


def write_fixture(out_dir: str, *, seed: int = 0, tied: bool = True, n_train: int = 2000, n_test: int = 200,
                  vocab_size: int = 384, max_operand: int = 99) -> dict:
    """Write model/ and data/ under out_dir; returns their paths."""
    train, test = make_splits(n_train, n_test, seed=seed, max_operand=max_operand)
    train_rows = [to_dapo_row(p, i, "train") for i, p in enumerate(train)]
    test_rows = [to_dapo_row(p, i, "test") for i, p in enumerate(test)]
    data_dir, model_dir = os.path.join(out_dir, "data"), os.path.join(out_dir, "model")
    write_jsonl(train_rows, os.path.join(data_dir, "train.jsonl"))
    write_jsonl(test_rows, os.path.join(data_dir, "test.jsonl"))

    # The BPE is trained on what the model will read and write: prompts, solutions and chat markup.
    from common.data import dapo_instruction
    corpus = [dapo_instruction(p["problem"]) + "\n" + p["solution"] for p in train]
    corpus += ["user\nassistant\n", "Q: A: Answer:"]
    tokenizer = build_tokenizer(corpus, vocab_size=vocab_size)
    model = build_model(tokenizer, tied=tied, seed=seed)
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return {"model": model_dir, "train": os.path.join(data_dir, "train.jsonl"),
            "test": os.path.join(data_dir, "test.jsonl")}


# ----------------------------------------------------------------------------- supervised warm start

def noisy_solution(problem: str, rng: random.Random, slip: float) -> str:
    """A worked solution of "What is a+b-c?" in which each line has probability `slip` of a small arithmetic
    error, the chain continuing from the wrong value. Supervising on these gives a policy that is right
    only part of the time and for reasons RL can sharpen (one bit per sample cannot teach a model to
    add; it can teach it to stop slipping), and with real entropy for RL to collapse."""
    import re
    nums = [int(x) for x in re.findall(r"\d+", problem)]
    ops = re.findall(r"(?<=\d)[+-]", problem)
    value, lines = nums[0], []
    for op, t in zip(ops, nums[1:]):
        new = value + t if op == "+" else value - t
        if rng.random() < slip:
            new += rng.choice([-1, 1]) * rng.randint(1, 10)
        lines.append(f"{value}{op}{t}={new}")
        value = new
    lines.append(f"Answer: {value}")
    return "\n".join(lines)


def sft(model_dir: str, train_path: str, *, steps: int = 600, batch_size: int = 64, lr: float = 2e-3,
        slip: float = 0.3, seed: int = 0, log_every: int = 100) -> None:
    """Supervise the fixture on (noisy) worked solutions with the `plain` prompt style, in place."""
    import math
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common.data import load_problems, render_prompt
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    problems = load_problems(train_path)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    model.train()
    for step in range(steps):
        cur_lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        for g in opt.param_groups:
            g["lr"] = cur_lr
        rows = []
        for p in rng.choices(problems, k=batch_size):
            prompt = tok(render_prompt(p, None, "plain"), add_special_tokens=False).input_ids
            target = tok(noisy_solution(p.problem, rng, slip) + IM_END, add_special_tokens=False).input_ids
            rows.append((prompt, target))
        width = max(len(a) + len(b) for a, b in rows)
        ids = torch.full((batch_size, width), tok.pad_token_id)
        labels = torch.full((batch_size, width), -100)
        for i, (a, b) in enumerate(rows):
            ids[i, :len(a) + len(b)] = torch.tensor(a + b)
            labels[i, len(a):len(a) + len(b)] = torch.tensor(b)
        loss = model(input_ids=ids, attention_mask=(labels != -100) | (torch.arange(width) < torch.tensor(
            [len(a) for a, _ in rows])[:, None]), labels=labels).loss
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if log_every and (step % log_every == 0 or step == steps - 1):
            print(f"[tiny sft] step {step} loss {loss.item():.4f} lr {cur_lr:.2e}", flush=True)
    model.save_pretrained(model_dir)


def probe(model_dir: str, data_path: str, *, problems: int = 64, n: int = 8, max_tokens: int = 64, seed: int = 0) -> dict:
    """Is RL on this model worthwhile? Accuracy at T=1 and greedy-ish (T=0.01), and the fraction of groups of n
    samples that are mixed (neither all right nor all wrong: only those carry a DAPO gradient)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from common.data import load_problems, render_prompt
    from common.dist import DistInfo
    from common.grading import grade_batch
    from common.rollout import HFEngine
    tok = AutoTokenizer.from_pretrained(model_dir)
    engine = HFEngine(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), tok, DistInfo())
    probs = load_problems(data_path, limit=problems)
    prompts = [render_prompt(p, None, "plain") for p in probs]
    out = {}
    for name, temp, k in (("t1", 1.0, n), ("greedy", 0.01, 1)):
        groups = engine.generate(prompts, n=k, temperature=temp, max_tokens=max_tokens,
                                 seeds=[seed * 100_003 + i for i in range(len(prompts))])
        correct = grade_batch([s.text for g in groups for s in g], [p.answer for p, g in zip(probs, groups) for _ in g],
                              num_workers=0)
        out[f"accuracy_{name}"] = sum(correct) / len(correct)
        if k > 1:
            per = [correct[i * k:(i + 1) * k] for i in range(len(groups))]
            out["mixed_groups"] = sum(0 < sum(c) < k for c in per) / len(per)
            out["mean_logprob_per_token"] = (sum(sum(s.logprobs) for g in groups for s in g)
                                             / sum(len(s.logprobs) for g in groups for s in g))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", help="directory to write model/ and data/ into")
    ap.add_argument("--seed", type=int, default=0, help="seed for the data, the tokenizer corpus and the init")
    ap.add_argument("--untied", action="store_true", help="separate lm_head (like Qwen3-8B); default tied (Qwen3-4B)")
    ap.add_argument("--n-train", type=int, default=2000, help="training problems")
    ap.add_argument("--n-test", type=int, default=200, help="held-out problems (disjoint from train)")
    ap.add_argument("--vocab-size", type=int, default=384, help="BPE vocabulary size incl. 256 bytes + specials")
    ap.add_argument("--max-operand", type=int, default=99, help="operands are drawn from 1..this")
    ap.add_argument("--sft-steps", type=int, default=0, help="then supervise on noisy worked solutions for this many steps")
    ap.add_argument("--sft-lr", type=float, default=2e-3, help="peak learning rate of the supervision (cosine)")
    ap.add_argument("--sft-batch", type=int, default=64, help="sequences per supervision step")
    ap.add_argument("--sft-slip", type=float, default=0.3, help="chance of an arithmetic slip per solution line")
    args = ap.parse_args(argv)
    paths = write_fixture(args.out_dir, seed=args.seed, tied=not args.untied, n_train=args.n_train,
                          n_test=args.n_test, vocab_size=args.vocab_size, max_operand=args.max_operand)
    if args.sft_steps:
        sft(paths["model"], paths["train"], steps=args.sft_steps, batch_size=args.sft_batch, lr=args.sft_lr,
            slip=args.sft_slip, seed=args.seed)
        print("[tiny] probe on the held-out split:", json.dumps(probe(paths["model"], paths["test"], seed=args.seed)))
    print(json.dumps(paths, indent=1))


if __name__ == "__main__":
    main()
