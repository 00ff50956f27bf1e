"""Shared fixtures: the tiny Qwen3 model + synthetic data, built once per test session (a few seconds)."""
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# vLLM in the test process itself (no engine subprocess), as the training scripts use it.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """Paths of a tied-embedding tiny fixture: {'model', 'train', 'test'}."""
    from common.tiny import write_fixture
    return write_fixture(str(tmp_path_factory.mktemp("tiny_tied")), seed=0, tied=True, n_train=400, n_test=64)


@pytest.fixture(scope="session")
def tiny_untied(tmp_path_factory):
    from common.tiny import write_fixture
    return write_fixture(str(tmp_path_factory.mktemp("tiny_untied")), seed=0, tied=False, n_train=400, n_test=64)


@pytest.fixture(scope="session")
def tiny_warm(tmp_path_factory):
    """A tied tiny model supervised until its T=1 samples are right about half the time, with its data:
    {'model', 'train', 'test'}. RL needs groups with mixed answers (a random model gets every group
    all-wrong and dynamic sampling drops them all). Cheap (~20 s on one thread) because the task is small:
    32 one-step problems with single-digit operands ("What is 7-3?"), supervised on worked solutions
    that slip 30% of the time (common/tiny.py: sft), 300 steps of 32 at lr 5e-3."""
    import random
    from common.tiny import make_problem, sft, to_dapo_row, write_fixture, write_jsonl
    root = str(tmp_path_factory.mktemp("tiny_warm"))
    paths = write_fixture(root, seed=0, tied=True, n_train=64, n_test=16)
    rng, seen, problems = random.Random(1), set(), []
    while len(problems) < 32:
        p = make_problem(rng, min_terms=2, max_terms=2, max_operand=9)
        if p["problem"] not in seen:
            seen.add(p["problem"])
            problems.append(p)
    train = os.path.join(root, "data", "easy.jsonl")
    write_jsonl([to_dapo_row(p, i, "train") for i, p in enumerate(problems)], train)
    sft(paths["model"], train, steps=300, batch_size=32, lr=5e-3, slip=0.3, seed=0, log_every=0)
    return {"model": paths["model"], "train": train, "test": paths["test"]}


@pytest.fixture(scope="session")
def rehearsal(tmp_path_factory):
    """The rehearsal fixture (common/rehearsal.py): Qwen3's real tokenizer and chat template, Qwen3-4B/8B-Base's
    configs at 2 layers x 64 wide, warmed up until its groups are mixed, and data in the real schemas:
    {'tied', 'untied', 'data': {name: path}, 'timings'}. ~60 s on one thread, once per session; for local reruns,
    REHEARSAL_FIXTURE_DIR=DIR keeps it in DIR/<hash of common/rehearsal.py> between sessions."""
    import hashlib
    import json
    from common.rehearsal import write_fixture
    keep = os.environ.get("REHEARSAL_FIXTURE_DIR")
    if not keep:
        return write_fixture(str(tmp_path_factory.mktemp("rehearsal")))
    digest = hashlib.sha256(open(os.path.join(ROOT, "common", "rehearsal.py"), "rb").read()).hexdigest()[:16]
    out, index = os.path.join(keep, digest), os.path.join(keep, digest, "paths.json")
    if not os.path.isfile(index):
        paths = write_fixture(out)
        with open(index, "w") as f:
            json.dump(paths, f)
    return json.load(open(index))
