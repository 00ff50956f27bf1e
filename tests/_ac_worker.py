"""Worker for tests/test_activation_checkpointing.py: runs a training script's own main() (plain python or under
torchrun) with counting hooks on the decoder layers of the model the script builds itself, and writes, per rank,
OUT_DIR/ac_rank{r}.json: how many layer forwards ran with grad outside backward, and how many ran again INSIDE
backward (the recomputation activation checkpointing does), plus the training/eval modes of the models built.

    python tests/_ac_worker.py rl_dapo OUT_DIR --model ... (the script's own flags)

Nothing of the script is re-created here: its `load_sharded` (and reheat's `frozen_copy`) are wrapped, so the
hooks sit on exactly the objects its loop trains and its teacher forward runs.
"""
import importlib
import json
import os
import sys


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from common.dist import LayerCalls, unwrap  # noqa: E402


def main():
    script, out, *argv = sys.argv[1:]
    mod = importlib.import_module(script)
    rec = {"models": []}

    def watch(model, role):
        layers = unwrap(model).model.layers
        calls = LayerCalls(model)          # the script's own object: its forwards counted, not re-created
        r = {"role": role, "root_training": model.training, "layers": len(layers),
             "layers_training": [layer.training for layer in layers],
             "requires_grad": any(p.requires_grad for p in model.parameters()), "calls": calls.counts}
        rec["models"].append(r)
        return model

    real_load = mod.load_sharded
    mod.load_sharded = lambda *a, **kw: watch(real_load(*a, **kw), "trained" if kw.get("requires_grad", True) else "frozen")
    if hasattr(mod, "frozen_copy"):
        real_copy = mod.frozen_copy
        mod.frozen_copy = lambda *a, **kw: watch(real_copy(*a, **kw), "teacher")
    mod.main(argv)
    for r in rec["models"]:
        c = r.pop("calls")
        r |= {"grad_forwards": c["grad"], "recomputed": c["recomputed"], "no_grad_forwards": c["no_grad"]}
    with open(os.path.join(out, f"ac_rank{os.environ.get('RANK', '0')}.json"), "w") as f:
        json.dump(rec, f)


if __name__ == "__main__":
    main()
