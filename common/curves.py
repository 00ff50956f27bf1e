"""Training curves of several runs as one experiment: where each run branches off, seeds as a mean and a band.

    lineage(runs)                 {label: step offset}: a run that starts from another listed run's checkpoint
                                  continues that run's x-axis (its step 1 is drawn at parent's step + 1)
    seed_groups(labels)           {group: [labels]}: "plain_s0", "plain_s1" -> "plain" (a label without _s<N>
                                  is its own group)
    smooth(values)                centred moving mean, window 2 * (n // 25) + 1 (1 for short series)
    plot_runs(runs, curves, dir)  one PNG per curve; plot_summary(runs, panels, path): one figure, a panel per
                                  curve, every run in every panel

Where a run starts comes from its config.json (rl_dapo.py's `model_path`, reheat_tsopsd.py's `ckpt_path`); a
closed-form checkpoint (reheat_tsopsd.py --closed-form) names its source in closed_form.json, and counts as zero
steps. "<run>/final" branches at the run's last step, "<run>/checkpoints/step_N" at N.

How a curve is drawn: the raw values faint, the smoothed ones solid; with several seeds, the raw and smoothed
mean over seeds at each step and a band from the smallest to the largest seed's smoothed value. Series with
fewer than 12 points (validation every few steps) are drawn with markers and not smoothed.
"""
import json
import math
import os
import re

from common.runlog import read_metrics


def _start_of(run_dir: str) -> str | None:
    """The checkpoint a run started from, with closed-form checkpoints followed back to their source."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.isfile(path):
        return None
    cfg = json.load(open(path))
    start = cfg.get("model_path") or cfg.get("ckpt_path") or cfg.get("model") or cfg.get("ckpt")
    for _ in range(8):                           # a closed form of a closed form ... stays finite
        info = os.path.join(start or "", "closed_form.json")
        if not (start and os.path.isfile(info)):
            break
        start = json.load(open(info)).get("source")
    return os.path.abspath(start) if start else None


def _steps(rows: list[dict]) -> int:
    return max((r["step"] for r in rows if isinstance(r.get("step"), (int, float))), default=0)


def lineage(runs: list[tuple[str, str]], metrics: dict[str, list[dict]] | None = None) -> dict[str, int]:
    """{label: offset}: the parent's offset plus the step it branched at, 0 for a run with no listed parent."""
    metrics = metrics or {label: read_metrics(d) for label, d in runs}
    dirs = {label: os.path.abspath(d) for label, d in runs}
    parent = {}
    for label, d in runs:
        start = _start_of(d)
        for other, od in dirs.items():
            if other == label or not start or not start.startswith(od + os.sep):
                continue
            rest = os.path.relpath(start, od)
            m = re.fullmatch(r"checkpoints[/\\]step_(\d+)", rest)
            parent[label] = (other, int(m.group(1)) if m else _steps(metrics[other]))
    offsets = {}

    def offset(label, depth=0):
        if label not in offsets:
            p = parent.get(label)
            offsets[label] = offset(p[0], depth + 1) + p[1] if p and depth < len(runs) else 0
        return offsets[label]
    for label, _ in runs:
        offset(label)
    return offsets


def seed_groups(labels: list[str]) -> dict[str, list[str]]:
    groups = {}
    for label in labels:
        m = re.fullmatch(r"(.+)_s(\d+)", label)
        groups.setdefault(m.group(1) if m else label, []).append(label)
    return groups


def smooth(values: list[float]) -> list[float]:
    n, half = len(values), len(values) // 25
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(n)]


def _series(rows: list[dict], key: str, offset: int) -> dict[int, float]:
    return {r["step"] + offset: float(r[key]) for r in rows
            if isinstance(r.get(key), (int, float)) and math.isfinite(r[key])}


def _draw(ax, per_seed: list[dict[int, float]], color, label, linestyle="-"):
    """One group's curve in one axis (see the module docstring); nothing if it has no points."""
    steps = sorted(set().union(*per_seed))
    if not steps:
        return
    mean = [sum(s[t] for s in per_seed if t in s) / sum(t in s for s in per_seed) for t in steps]
    if len(steps) < 12:
        ax.plot(steps, mean, color=color, linestyle=linestyle, marker="o", markersize=3, label=label)
        if len(per_seed) > 1:
            lo = [min(s[t] for s in per_seed if t in s) for t in steps]
            hi = [max(s[t] for s in per_seed if t in s) for t in steps]
            ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)
        return
    ax.plot(steps, mean, color=color, alpha=0.2, linewidth=0.7, linestyle=linestyle)
    ax.plot(steps, smooth(mean), color=color, linewidth=1.6, linestyle=linestyle, label=label)
    if len(per_seed) > 1:
        sm = [dict(zip(ts, smooth([s[t] for t in ts]))) for s in per_seed for ts in [sorted(s)] if ts]
        lo = [min(s[t] for s in sm if t in s) for t in steps]
        hi = [max(s[t] for s in sm if t in s) for t in steps]
        ax.fill_between(steps, lo, hi, color=color, alpha=0.15, linewidth=0)


def _panel(ax, data, offsets, groups, keys, colors, branch_steps, first_only=False):
    """Every group's curves of `keys`; first_only: only the first key the group has (alternatives)."""
    for g, labels in groups.items():
        for j, key in enumerate(keys):
            per_seed = [_series(data[label], key, offsets[label]) for label in labels]
            name = g + (f" ({len(labels)} seeds)" if len(labels) > 1 else "")
            if first_only:
                if any(per_seed):
                    _draw(ax, per_seed, colors[g], name)
                    break
                continue
            _draw(ax, per_seed, colors[g], name + (f": {key}" if len(keys) > 1 else ""), ("-", "--")[j % 2])
    for x in branch_steps:
        ax.axvline(x, color="0.5", linewidth=0.8, linestyle=":", gid="branch")


def _setup(runs):
    data = {label: read_metrics(d) for label, d in runs}
    offsets = lineage(runs, data)
    groups = seed_groups([label for label, _ in runs])
    colors = {g: f"C{i % 10}" for i, g in enumerate(groups)}
    branch_steps = sorted({o for o in offsets.values() if o > 0})
    return data, offsets, groups, colors, branch_steps


def plot_runs(runs: list[tuple[str, str]], curves: dict[str, tuple[str, ...]], plot_dir: str) -> list[str]:
    """One PNG per curve name, runs_<name>.png: every run (seed group) of its metrics.jsonl keys (solid the first
    key, dashed the second) against the step of the whole experiment (see lineage)."""
    from common.eval_io import pyplot
    plt, files = pyplot(), []
    data, offsets, groups, colors, branch_steps = _setup(runs)
    for name, keys in curves.items():
        fig, ax = plt.subplots(figsize=(7, 4.5))
        _panel(ax, data, offsets, groups, keys, colors, branch_steps)
        ax.set_xlabel("step (branches continue from their parent's last step)")
        ax.set_ylabel(name.replace("_", " "))
        if ax.lines:
            ax.legend(fontsize=7)
        fig.tight_layout()
        files.append(os.path.join(plot_dir, f"runs_{name}.png"))
        fig.savefig(files[-1], dpi=120)
        plt.close(fig)
    return files


def plot_summary(runs: list[tuple[str, str]], panels: dict[str, tuple[str, ...]], path: str, title: str = "",
                 log_y: tuple[str, ...] = ()) -> str:
    """One figure, a row per entry of `panels` (y label -> metric keys, alternatives: a run draws the first it
    has; labels in log_y get a log y-axis). Left column: the whole experiment; right column (when some run branches
    off another): the branches magnified, from a little before the first branch point to the end. One legend."""
    from common.eval_io import pyplot
    plt = pyplot()
    data, offsets, groups, colors, branch_steps = _setup(runs)
    end = max(offsets[label] + _steps(data[label]) for label, _ in runs)
    cols = 2 if branch_steps else 1
    fig, axes = plt.subplots(len(panels), cols, figsize=(6.2 * cols, 3.0 * len(panels)), squeeze=False)
    for row, (name, keys) in enumerate(panels.items()):
        for col in range(cols):
            ax = axes[row][col]
            _panel(ax, data, offsets, groups, keys, colors, branch_steps, first_only=True)
            if name in log_y:
                ax.set_yscale("log")
            ax.grid(alpha=0.3)
            if col == 1:                       # the branches, magnified; y limits from what is visible there
                lo = branch_steps[0] - max((end - branch_steps[0]) // 3, 2)
                ax.set_xlim(lo, end + 1)
                points = [xy for line in ax.get_lines() if line.get_gid() != "branch" for xy in line.get_xydata()]
                points += [xy for band in ax.collections for path in band.get_paths() for xy in path.vertices]
                ys = [y for x, y in points if x >= lo and (y > 0 or name not in log_y)]
                if ys and name not in log_y:
                    pad = 0.05 * (max(ys) - min(ys) or 1)
                    ax.set_ylim(min(ys) - pad, max(ys) + pad)
                elif ys:
                    ax.set_ylim(min(ys) / 1.2, max(ys) * 1.2)
            if col == 0:
                ax.set_ylabel(name, fontsize=8)
            if row == 0 and cols == 2:
                ax.set_title(("the whole experiment", "the branches, magnified")[col], fontsize=10)
            if row == len(panels) - 1:
                ax.set_xlabel("step")
    handles, labels = [], []
    for ax in axes.flat:                         # one legend for the figure: every group that drew anywhere
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 6), fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.05, 1, 0.96 if title else 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
