"""Easier training subsets of assets/tiny_math/data/train.jsonl for the issue-13 probes (held-out set unchanged)."""
import json
import os
import re

HERE = os.path.dirname(os.path.abspath(__file__))
SRC = os.path.join(HERE, "..", "..", "assets", "tiny_math", "data", "train.jsonl")


def operands(row):
    expr = re.search(r"What is (.*)\?", row["prompt"][0]["content"]).group(1)
    return [int(x) for x in re.findall(r"\d+", expr)]


rows = [json.loads(line) for line in open(SRC)]
subsets = {"train_2terms": lambda ops: len(ops) == 2,
           "train_le3terms": lambda ops: len(ops) <= 3,
           "train_2terms_le20": lambda ops: len(ops) == 2 and max(ops) <= 20}
for name, keep in subsets.items():
    picked = [r for r in rows if keep(operands(r))]
    with open(os.path.join(HERE, name + ".jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in picked)
    print(name, len(picked))
