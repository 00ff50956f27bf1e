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
