"""common/calibrate.py: the tau at which the own-sample token entropy reaches a target (issue 20)."""
import math

import pytest
import torch

from common.calibrate import solve_tau, tempered_entropy


def reference_entropy(h, w, tau):
    """Mean token entropy of softmax(h W^T / tau), dense float64."""
    logp = ((h.double() @ w.double().T) / tau).log_softmax(-1)
    return -(logp.exp() * logp).sum(-1).mean().item()


def inputs(seed=0, n=300, hdim=16, vocab=200, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, hdim, generator=g) * scale, torch.randn(vocab, hdim, generator=g)


def test_tempered_entropy_matches_float64_reference():
    h, w = inputs()
    entropy_at = tempered_entropy([h[:100], h[100:], h[:0]], w, chunk_size=7)
    for tau in (0.3, 1.0, 1.5, 4.0):
        assert entropy_at(tau) == pytest.approx(reference_entropy(h, w, tau), rel=1e-5)


@pytest.mark.parametrize("tau_true", [0.5, 1.0, 1.5, 3.0])
def test_the_tau_found_for_a_tempered_entropy_is_that_tau(tau_true):
    """H = the mean entropy at a known tau (float64 reference) -> solve_tau recovers that tau."""
    h, w = inputs(seed=1)
    target = reference_entropy(h, w, tau_true)
    tau = solve_tau(tempered_entropy([h], w, chunk_size=64), target, rel_tol=1e-6)
    assert tau == pytest.approx(tau_true, rel=1e-4)
    assert reference_entropy(h, w, tau) == pytest.approx(target, rel=1e-4)


def test_bisection_on_a_known_monotone_function():
    """On entropy_at(tau) = log(tau): the root of log(tau) = 0.7 is e^0.7; iterations stop at the tolerance."""
    calls = []

    def f(tau):
        calls.append(tau)
        return math.log(tau)
    assert solve_tau(f, 0.7, rel_tol=1e-8) == pytest.approx(math.exp(0.7), rel=1e-8)
    assert len(calls) < 60


def test_unreachable_targets_say_what_is_reachable():
    h, w = inputs(seed=2, vocab=50)
    entropy_at = tempered_entropy([h], w)
    with pytest.raises(ValueError, match="outside what tau"):
        solve_tau(entropy_at, math.log(50) + 0.1)         # above the uniform law's entropy
    with pytest.raises(ValueError, match="positive"):
        solve_tau(entropy_at, 0.0)
    with pytest.raises(ValueError, match="no hidden states"):
        tempered_entropy([h[:0]], w)


# ----------------------------------------------------------------------------- reheat_tsopsd --calibrate-tau

def tempered_entropy_of_samples(model_dir, samples, tau):
    """Mean over the response positions of the recorded samples of the entropy of softmax(z / tau), float64,
    transformers, each sample alone."""
    from transformers import AutoModelForCausalLM
    lm = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for s in samples:
            p, r = s["prompt_ids"], s["response_ids"]
            logp = (lm(torch.tensor([p + r])).logits[0, len(p) - 1:-1] / tau).log_softmax(-1)
            total -= (logp.exp() * logp).sum().item()
            count += len(r)
    return total / count


def test_reheat_calibrates_tau_on_its_own_samples(tmp_path):
    """reheat_tsopsd.main --closed-form --calibrate-tau, in this process: on the very samples it drew (recorded from
    its own engine), the mean entropy of softmax(z / tau) at the tau it wrote is the target (float64, transformers);
    the closed form divides the final norm by that tau; a reheat run with the same seed and data finds the same tau
    and logs it every step; so does one given the target as --teacher-entropy (and another --target-entropy)."""
    import json
    import os
    import reheat_tsopsd
    from safetensors.torch import load_file
    from tests._scripts import ROOT, metrics, run_in_process
    model = os.path.join(ROOT, "assets", "tiny_math", "model")
    data = os.path.join(ROOT, "assets", "tiny_math", "data", "test.jsonl")
    common = ["--ckpt", model, "--data", data, "--prompt-style", "plain", "--rollout-engine", "hf", "--group-size", 4,
              "--prompts-per-step", 8, "--max-response-len", 32, "--calibrate-tau", "--target-entropy", 0.3,
              "--no-compile", "--grade-workers", 0]
    calls = run_in_process(reheat_tsopsd, [*common, "--closed-form", "--out", tmp_path / "closed"])
    tau = json.load(open(tmp_path / "closed" / "closed_form.json"))["tau"]
    assert tau > 1                                  # the tiny model's own-sample entropy is ~0.1 at T=1
    # round 1 samples at T=1, round 2 at round 1's tau; the tau written is round 2's, on round 2's samples
    assert [c["temperature"] for c in calls][0] == 1.0 and len(calls) == 2 and calls[1]["temperature"] > 1
    samples = [s for g in calls[1]["groups"] for s in g]
    assert tempered_entropy_of_samples(model, samples, tau) == pytest.approx(0.3, rel=1e-3)
    assert tempered_entropy_of_samples(model, samples, 1.0) < 0.25
    before, after = load_file(os.path.join(model, "model.safetensors")), load_file(tmp_path / "closed" / "model.safetensors")
    torch.testing.assert_close(after["model.norm.weight"], before["model.norm.weight"] / tau)
    run_in_process(reheat_tsopsd, [*common, "--steps", 2, "--lr", 1e-4, "--out", tmp_path, "--run-name", "r"])
    assert [r["reheat/tau"] for r in metrics(tmp_path / "r")] == pytest.approx([tau, tau], rel=1e-9)
    # --teacher-entropy: tau calibrated to it, not to --target-entropy (the stop; here under the start's, so 1 step)
    other = [str(x) for x in common]
    other[other.index("--target-entropy") + 1] = "0.01"
    run_in_process(reheat_tsopsd, [*other, "--teacher-entropy", 0.3, "--steps", 2, "--lr", 1e-4, "--out", tmp_path,
                                   "--run-name", "t"])
    assert [r["reheat/tau"] for r in metrics(tmp_path / "t")] == pytest.approx([tau], rel=1e-9)
