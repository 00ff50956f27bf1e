"""The science through the scripts' own wiring, where a unit test of a function cannot see a wrong sign in the
code that calls it (issue 21; bench/mutants.py names the mutants each of these kills).

Each script's main() runs in this process with only its rollout engine replaced, by one that returns FIXED
responses (right, wrong, right but cut at the length limit) from the shipped tiny model's tokenizer: the rewards,
dynamic sampling, advantages, loss, normaliser and optimizer are the script's own, and nothing depends on sampling.
- rl_dapo: one step must raise the log-probability of the right responses and lower that of the wrong ones
  (float64, transformers, the saved checkpoint against the start model); the scores it hands to group_advantages
  must be the DAPO rewards of those responses; its gradient must not depend on the micro-batch split.
- reheat_tsopsd: what one step logs must be the start model's entropies at T=1 and T=tau and its reverse KL,
  computed here in float64, and the step must move the student toward softmax(z / tau).
"""
import os
import random

import pytest
import torch

import reheat_tsopsd
import rl_dapo
from common.rollout import Sample
from tests._scripts import ROOT, metrics

MODEL = os.path.join(ROOT, "assets", "tiny_math", "model")

# ----------------------------------------------------------------------------- the fixed-response RL step

GROUP = 4                       # responses per prompt (--group-size)


def dapo_reward(right: bool, finished: bool, n_tokens: int, max_len: int, buffer: int) -> float:
    """DAPO's reward, written out here: +1 for a right answer that stopped, -1 otherwise (a response cut at the
    length limit is wrong whatever it says), minus the soft overlong penalty (l - (L - B)) / B above L - B."""
    return (1.0 if right and finished else -1.0) - max(0, n_tokens - (max_len - buffer)) / buffer


class FixedResponses:
    """A rollout engine that answers each prompt with a fixed group of responses, behind the interface the scripts
    use (common/rollout.py: generate, sleep, sync_weights, close, the dp/tp ranks). Its sampler log-probs are
    placeholders: with one mini-batch per step the old log-probs are the trainer's own and TIS is off, so they
    reach only the logged diagnostics (rollout/logprob_diff_*, entropy_est)."""

    name = "fixed"
    dp_rank, dp_size, tp_rank, tp = 0, 1, 0, 1

    def __init__(self, tokenizer, groups):
        self.tok, self.groups = tokenizer, groups

    def generate(self, prompts, *, n, temperature, top_p=1.0, max_tokens, seeds):
        out = []
        for p in prompts:
            ids = self.tok(p, add_special_tokens=False).input_ids
            group = self.groups[p]
            assert len(group) == n and all(len(r) <= max_tokens for _, r, _, _ in group)
            out.append([Sample(ids, list(r), [-0.5] * len(r), reason, text) for text, r, reason, _ in group])
        return out

    def sleep(self):
        pass

    def sync_weights(self, model):
        pass

    def close(self):
        pass


def fixed_problems(tmp, n_problems, make_group):
    """n_problems three-operand problems (answers 10-99) written as a training file, and their fixed groups:
    make_group(tokenizer, problem dict, index) -> [(text, token ids, finish reason, right on its text)] * GROUP.
    Returns the file, {prompt: group} and {prompt: problem dict}."""
    from transformers import AutoTokenizer
    from common.data import load_problems, render_prompt
    from common.tiny import make_problem, to_dapo_row, write_jsonl
    rng, seen, problems = random.Random(3), set(), []
    while len(problems) < n_problems:
        p = make_problem(rng, min_terms=3, max_terms=3, max_operand=30)
        if p["problem"] not in seen and 10 <= int(p["answer"]) <= 99:
            seen.add(p["problem"])
            problems.append(p)
    os.makedirs(tmp, exist_ok=True)
    data = os.path.join(tmp, "train.jsonl")
    write_jsonl([to_dapo_row(p, i, "train") for i, p in enumerate(problems)], data)
    tok = AutoTokenizer.from_pretrained(MODEL)
    prompts = [render_prompt(q, tok, "plain") for q in load_problems(data)]
    groups = {prompt: make_group(tok, p, i) for i, (prompt, p) in enumerate(zip(prompts, problems))}
    return data, groups, dict(zip(prompts, problems))


def run_on_fixed_responses(module, argv, groups, **patches):
    """module.main(argv) in this process with its make_engine (and any other names in `patches`) replaced: the
    rest, and everything it builds, is the script's own."""
    precision = torch.get_float32_matmul_precision()          # main() sets it for the rest of the process
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(module, "make_engine", lambda *a, tokenizer, **k: FixedResponses(tokenizer, groups))
        for name, value in patches.items():
            mp.setattr(module, name, value)
        try:
            module.main([str(a) for a in argv])
        finally:
            torch.set_float32_matmul_precision(precision)


def fixed_rl_step(tmp, n_problems, make_group, max_len, buffer, extra=()):
    """One rl_dapo.main step on fixed_problems(tmp, n_problems, make_group). Returns the run directory, the groups,
    the problems (both by prompt) and the scores the step passed to group_advantages (a spy around the script's
    own function)."""
    data, groups, problems = fixed_problems(tmp, n_problems, make_group)
    scores, real_advantages = [], rl_dapo.group_advantages

    def spy(s):
        scores.extend(s.tolist())
        return real_advantages(s)

    argv = ["--model", MODEL, "--data", data, "--prompt-style", "plain", "--grade-workers", 0, "--no-compile",
            "--steps", 1, "--group-size", GROUP, "--gen-batch-prompts", n_problems, "--max-gen-batches", 1,
            "--max-response-len", max_len, "--overlong-buffer", buffer, "--warmup-steps", 1,
            "--weight-decay", 0, "--out", tmp, "--run-name", "rl", *extra]
    run_on_fixed_responses(rl_dapo, argv, groups, group_advantages=spy)
    return os.path.join(tmp, "rl"), groups, problems, scores


def finished(tok, text):
    from common.tiny import IM_END
    return text, tok(text + IM_END, add_special_tokens=False).input_ids, "stop"


def right_and_wrong(tok, p):
    """The worked solution ("13+16=29\\n29-7=22\\nAnswer: 22") and two wrong ones that slip at the last step
    ("...29-7=51\\nAnswer: 51"), each ended by <|im_end|>. A wrong result differs from the right one in every
    digit (digits are tokens: a shared one would get both advantages' pushes at the same place)."""
    value = p["answer"]
    wrong = [str(int(value) + d) for d in (11, 22, 33, 44, 55, -11, -22, -33, -44)]
    wrong = [w for w in wrong if len(w) == len(value) and all(a != b for a, b in zip(w, value))][:2]
    lines = p["solution"].split("\n")
    slip = ["\n".join(lines[:-2] + [lines[-2].rsplit("=", 1)[0] + "=" + w, "Answer: " + w]) for w in wrong]
    return finished(tok, p["solution"]) + (True,), [finished(tok, text) + (False,) for text in slip]


def sequence_logprob(model_dir, pairs):
    """Sum over the response tokens of log p(token | prefix), float64, one value per (prompt ids, response ids)."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    out = []
    with torch.no_grad():
        for p, r in pairs:
            logp = torch.log_softmax(lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1], -1)
            out.append(logp.gather(1, torch.tensor(r)[:, None]).sum().item())
    return out


def test_rl_step_raises_log_p_of_right_answers_and_lowers_wrong(tmp_path):
    """The direction of learning through rl_dapo.main's own wiring (rewards, advantages, loss, normaliser,
    optimizer): after one step on fixed groups of 2 right and 2 wrong responses, the right responses are likelier
    and the wrong ones less likely than under the start model (mean log p of the whole response, float64,
    transformers, the saved checkpoint), and in every group the gap between them widened. With the reward's sign
    flipped, all of it reverses. lr 1e-5: Adam's first step moves every weight by about lr
    whatever its gradient, and from 1e-4 on that step leaves the linear regime: right responses, which share
    their "Answer: " tokens with the wrong ones pushed down, were seen to fall there."""
    def group(tok, p, i):
        right, wrong = right_and_wrong(tok, p)
        return [right, wrong[0], right, wrong[1]]
    run, groups, _, _ = fixed_rl_step(str(tmp_path), 4, group, 32, 4, ["--prompts-per-step", 4,
                                                                        "--ppo-mini-batch", 4, "--lr", 1e-5])
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL)
    right, wrong = [], []
    for prompt, g in groups.items():
        p = tok(prompt, add_special_tokens=False).input_ids
        right.append((p, g[0][1]))
        wrong += [(p, g[1][1]), (p, g[3][1])]
    final = os.path.join(run, "final")
    d_right = [b - a for a, b in zip(sequence_logprob(MODEL, right), sequence_logprob(final, right))]
    d_wrong = [b - a for a, b in zip(sequence_logprob(MODEL, wrong), sequence_logprob(final, wrong))]
    # seen: right +0.008 .. +0.065 each, wrong -0.02 .. -0.22 each; with the reward flipped, the opposite signs
    assert sum(d_right) / len(d_right) > 0.005, f"log p(right) changes {d_right}"
    assert sum(d_wrong) / len(d_wrong) < -0.05, f"log p(wrong) changes {d_wrong}"
    gaps = [r - (a + b) / 2 for r, a, b in zip(d_right, d_wrong[0::2], d_wrong[1::2])]
    assert all(g > 0 for g in gaps), f"right - wrong gap changes per group {gaps}"


def test_rl_step_scores_are_the_dapo_rewards_and_only_mixed_groups_train(tmp_path):
    """What the step hands to group_advantages: one row per mixed group, +1 right / -1 wrong, a response cut at
    the length limit -1 although its text is right, each minus its overlong penalty (every response here is
    longer than L - B); the all-right and all-wrong groups filtered out by dynamic sampling."""
    L, B = 40, 32

    def group(tok, p, i):
        right, wrong = right_and_wrong(tok, p)
        # the right answer, then on without stopping until the limit: right on its text, wrong by the rule
        ids = tok(p["solution"] + "\n" + "1+1=2\n" * L, add_special_tokens=False).input_ids[:L]
        cut = (tok.decode(ids, skip_special_tokens=True), ids, "length", True)
        return [right, wrong[0], cut, right] if i < 3 else [right] * GROUP if i == 3 else [wrong[0], wrong[1]] * 2
    run, groups, problems, scores = fixed_rl_step(str(tmp_path), 5, group, L, B, ["--prompts-per-step", 3,
                                                                                  "--ppo-mini-batch", 3])
    from common.grading import extract_answer
    mixed = {p: g for p, g in groups.items() if len({ok for *_, ok in g}) == 2}
    assert len(mixed) == 3
    for p, g in mixed.items():
        assert extract_answer(g[2][0]) == problems[p]["answer"]       # the cut response is right on its text
    expected = [[dapo_reward(ok, reason == "stop", len(ids), L, B) for _, ids, reason, ok in g] for g in mixed.values()]
    assert len(scores) == len(expected)
    for got, want in zip(sorted(scores), sorted(expected)):           # rows in the stream's order
        assert got == pytest.approx(want, abs=1e-6), (got, want)
    row = metrics(run)[0]
    assert row["rollout/groups_kept"] == row["rollout/groups_used"] == 3
    assert row["rollout/groups_all_right"] == 1 and row["rollout/groups_all_wrong"] == 1
    # right and stopped: 2 per mixed group and the all-right group; the cut one counts wrong
    assert row["rollout/accuracy"] == pytest.approx((2 * 3 + GROUP) / (GROUP * 5))


def test_rl_step_does_not_depend_on_the_micro_batch_split(tmp_path):
    """The loss is the token mean over the whole mini-batch however it is cut into micro-batches: the same fixed
    step with the mini-batch in one micro-batch, and in micro-batches of one or two sequences, has the same
    gradient (train/grad_norm, before clipping; the loss itself is ~0 on policy). A per-micro-batch mean would
    weigh the tokens of a short micro-batch more and multiply the gradient by about the number of micro-batches."""
    def group(tok, p, i):
        right, wrong = right_and_wrong(tok, p)
        return [right, wrong[0], right, wrong[1]]
    rows = {}
    for tokens in (4096, 64, 1):                           # 64: two sequences of ~30 tokens; 1: each alone
        run, _, _, _ = fixed_rl_step(str(tmp_path / str(tokens)), 4, group, 32, 4, [
            "--prompts-per-step", 4, "--ppo-mini-batch", 4, "--lr", 1e-5, "--micro-batch-tokens", tokens])
        rows[tokens] = metrics(run)[0]
    for tokens in (64, 1):
        for k in ("train/grad_norm", "train/pg_loss", "train/tokens"):
            assert rows[tokens][k] == pytest.approx(rows[4096][k], rel=1e-5, abs=1e-7), (tokens, k)


# ----------------------------------------------------------------------------- the fixed-response reheat step

def response_logits(model_dir, pairs):
    """float64 logits at the positions that predict each response token: [sum of response lengths, V]."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    with torch.no_grad():
        return torch.cat([lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1] for p, r in pairs])


def entropy(logp):
    return -(logp.exp() * logp).sum(-1)


def reverse_kl(logp_s, logp_t):
    return (logp_s.exp() * (logp_s - logp_t)).sum(-1)


def test_reheat_step_distils_toward_the_tempered_start_model(tmp_path):
    """reheat_tsopsd.main in this process, its rollouts replaced by fixed responses, --tau 2, frozen teacher,
    reverse KL, one step. What it logs for that step is, at the same response positions, what a float64 forward of
    the start model gives: the student's entropy of softmax(z), the teacher's of softmax(z / 2) (so tau reaches
    the teacher's logits and only them), KL(softmax(z) || softmax(z / 2)) (the reverse direction), top-1 agreement 1.
    And the step moved the student toward that target: a smaller KL to it, a higher entropy (lr 1e-4: Adam's
    first step moves every weight by about lr, and from 3e-4 on it overshoots, the KL to the target rising)."""
    tau = 2.0

    def group(tok, p, i):
        right, wrong = right_and_wrong(tok, p)
        return [right, wrong[0], right, wrong[1]]
    data, groups, _ = fixed_problems(str(tmp_path), 4, group)
    argv = ["--ckpt", MODEL, "--data", data, "--prompt-style", "plain", "--grade-workers", 0, "--no-compile",
            "--steps", 1, "--group-size", GROUP, "--prompts-per-step", 4, "--max-response-len", 32, "--tau", tau,
            "--lr", 1e-4, "--out", tmp_path, "--run-name", "reheat"]
    run_on_fixed_responses(reheat_tsopsd, argv, groups)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(MODEL)
    pairs = [(tok(prompt, add_special_tokens=False).input_ids, r) for prompt, g in groups.items() for _, r, _, _ in g]
    z0 = response_logits(MODEL, pairs)
    student, teacher = torch.log_softmax(z0, -1), torch.log_softmax(z0 / tau, -1)
    row = metrics(os.path.join(tmp_path, "reheat"))[0]
    assert row["train/tokens"] == z0.shape[0]
    assert row["reheat/student_entropy"] == pytest.approx(entropy(student).mean().item(), rel=1e-4)
    assert row["reheat/teacher_entropy"] == pytest.approx(entropy(teacher).mean().item(), rel=1e-4)
    kl0 = reverse_kl(student, teacher).mean().item()
    assert row["reheat/divergence"] == pytest.approx(kl0, rel=1e-3)
    assert row["reheat/top1_agree"] == 1.0
    after = torch.log_softmax(response_logits(os.path.join(tmp_path, "reheat", "final"), pairs), -1)
    kl1 = reverse_kl(after, teacher).mean().item()
    h0, h1 = entropy(student).mean().item(), entropy(after).mean().item()
    assert kl1 < 0.99 * kl0, (kl0, kl1)                 # seen: 0.281 -> 0.273
    assert h1 > h0 + 0.01, (h0, h1)                     # seen: 0.139 -> 0.174


# ----------------------------------------------------------------------------- stop tokens


@pytest.mark.parametrize("eos", ["<|endoftext|>", "<|im_end|>"])
def test_stop_ids_hold_both_qwen_endings_whichever_is_eos(eos):
    """Qwen3-Base's eos is <|endoftext|>, a chat turn ends with <|im_end|>: a rollout must stop on both, so
    neither may come only from eos_token_id (the tiny tokenizer's eos is <|im_end|>, hiding a missing one)."""
    from transformers import AutoTokenizer
    from common.rollout import stop_token_ids
    tok = AutoTokenizer.from_pretrained(MODEL)
    tok.eos_token = eos
    assert tok.eos_token_id == tok.convert_tokens_to_ids(eos)
    assert set(stop_token_ids(tok)) == {tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")}
