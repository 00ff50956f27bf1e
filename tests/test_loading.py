"""common/loading.py: a checkpoint loaded straight into FSDP2 shards (2 processes on gloo, tests/_load_worker.py),
and the one-process path."""
import json
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path, *, tied: bool, dtype: torch.dtype, max_shard_size="5GB") -> str:
    """A ~100M-parameter Qwen3 with random weights. The vocabulary is small for its width so that no single
    tensor is a large share of the model: a rank's transient during the load is one full tensor."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    config = Qwen3Config(vocab_size=16384, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=12, num_key_value_heads=4, head_dim=64, max_position_embeddings=256,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    Qwen3ForCausalLM(config).to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return str(path)


def run_worker(model_dir, out_dir, *flags) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "tests", "_load_worker.py"), model_dir, str(out_dir), *flags]
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    results = {}
    for rank in (0, 1):
        path = out_dir / f"result_rank{rank}.json"
        results[rank] = json.loads(path.read_text()) if path.exists() else None
    assert proc.returncode == 0 and all(results.values()), (results, proc.stdout[-3000:], proc.stderr[-3000:])
    return results


def excess_growth(result: dict) -> float:
    """Peak RSS growth over the load beyond the rank's own shards, as a share of the fp32 model: with 2 ranks a
    rank must hold half the model, so what the bound limits is everything it holds besides."""
    return (result["growth_bytes"] - result["shard_bytes"]) / result["model_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("tied,dtype,files", [(False, torch.bfloat16, 1), (True, torch.float32, 3)],
                         ids=["untied_bf16", "tied_fp32_3_files"])
def test_sharded_load_keeps_rank1_small_and_equals_the_checkpoint(tmp_path, tied, dtype, files):
    from common.loading import checkpoint_files
    model_dir = write_checkpoint(tmp_path / "model", tied=tied, dtype=dtype,
                                 max_shard_size="5GB" if files == 1 else "150MB")
    assert len(checkpoint_files(model_dir)) == files
    results = run_worker(model_dir, tmp_path)
    r0, r1 = results[0], results[1]
    assert r1["model_bytes"] > 300e6                  # the ~100M parameters really are there, in fp32
    assert r1["shard_bytes"] == pytest.approx(r1["model_bytes"] / 2, rel=0.01)
    assert excess_growth(r1) < 1 / 3, r1
    for r in (r0, r1):
        assert r["trainable"] and r["teacher_frozen"] and r["tied_is_one_param"] and r["checkpointing"], r
        assert r["training_mode"], r
    assert r0["state_dict_exact"] and r0["teacher_head_exact"] and r0["rotary_exact"] and r0["configs_equal"], r0
    assert r0["logits_max_diff"] < 1e-5 and r0["teacher_logits_max_diff"] < 1e-5, r0
    assert r0["grads_same_names"] and r0["grads_max_diff"] < 1e-5, r0     # it trains as the plain model does


@pytest.mark.slow
def test_loading_full_models_on_every_rank_breaks_the_bound(tmp_path):
    """The measurement above can fail: from_pretrained on every rank then shard_model (the scripts' old path)
    makes rank 1 hold the whole model besides its shards."""
    model_dir = write_checkpoint(tmp_path / "model", tied=False, dtype=torch.bfloat16)
    results = run_worker(model_dir, tmp_path, "--old")
    assert excess_growth(results[1]) > 1 / 3, results[1]


def test_one_process_loads_as_from_pretrained(tiny_untied):
    from transformers import AutoModelForCausalLM
    from common.dist import DistInfo, LMWithHead, unwrap
    from common.loading import load_sharded
    model = load_sharded(tiny_untied["model"], DistInfo(), "fsdp", requires_grad=False)
    assert isinstance(model, LMWithHead)
    ref = AutoModelForCausalLM.from_pretrained(tiny_untied["model"]).state_dict()
    got = unwrap(model).state_dict()
    assert got.keys() == ref.keys() and all(torch.equal(got[k], ref[k]) for k in ref)
    assert not any(p.requires_grad for p in model.parameters())


def test_a_checkpoint_without_safetensors_is_a_clear_error(tmp_path):
    from common.loading import checkpoint_files
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(SystemExit, match="no \\*.safetensors"):
        checkpoint_files(str(tmp_path))


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group, so the FSDP path runs in this process (DistInfo claims 2 ranks only to take it)."""
    import torch.distributed as dist
    from common.dist import DistInfo
    dist.init_process_group("gloo", rank=0, world_size=1, store=dist.HashStore())
    try:
        yield DistInfo(rank=0, world_size=2)
    finally:
        dist.destroy_process_group()


def test_a_checkpoint_that_does_not_match_its_config_is_a_clear_error(tiny_untied, tmp_path, one_rank_group):
    import shutil
    from safetensors.torch import load_file, save_file
    from common.loading import checkpoint_files, load_sharded
    shutil.copytree(tiny_untied["model"], tmp_path, dirs_exist_ok=True)
    (path,) = checkpoint_files(str(tmp_path))
    weights = load_file(path)
    weights["model.extra.weight"] = weights.pop("model.norm.weight")
    save_file(weights, path, metadata={"format": "pt"})
    with pytest.raises(SystemExit, match=r"missing \['model.norm.weight'\], unexpected \['model.extra.weight'\]"):
        load_sharded(str(tmp_path), one_rank_group, "fsdp")
