"""bench/probes/probes.json -> the table in bench/probes/results.md (rows only; the reading is written by hand)."""
import json
import os

HERE = os.path.dirname(os.path.abspath(__file__))


def f(x, d=3):
    return "n/a" if x is None else f"{x:.{d}f}"


rows = ["| probe | flags (beyond demo's collapse stage) | RL wall | entropy T=1 first -> last (last-5 mean) | ratio | "
        "uniform last 10 | rollout acc first -> last 10 | held-out pass@8 start -> end | avg@8 start -> end |",
        "|---|---|---|---|---|---|---|---|---|"]
for r in json.load(open(os.path.join(HERE, "probes.json"))):
    flags = " ".join(f"{k} {os.path.basename(v) if v else ''}".strip() for k, v in r["flags"].items())
    wall = f"{r['rl_wall_s']:.0f} s" if r.get("rl_wall_s") else "stopped"
    rows.append(f"| {r['name']} | `{flags}` | {wall} | {f(r['entropy_first'])} -> {f(r['entropy_last'])} "
                f"({f(r['entropy_last5_mean'])}) | {f(r['entropy_ratio'], 2)} | {f(r['uniform_last10'], 2)} | "
                f"{f(r['acc_first'], 2)} -> {f(r['acc_last10'], 2)} | {f(r['pass8_start'])} -> {f(r.get('pass8_end'))} | "
                f"{f(r.get('avg8_start'))} -> {f(r.get('avg8_end'))} |")
print("\n".join(rows))
