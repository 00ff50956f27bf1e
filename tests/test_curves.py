"""common/curves.py: where each run branches off (config.json, closed_form.json), seed groups, smoothing, and
that the figures draw every run at its place on the experiment's step axis."""
import json
import os

import pytest

from common.curves import _series, lineage, plot_runs, plot_summary, seed_groups, smooth


def make_run(root, name, steps, start, key="model_path", extra=None):
    d = root / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({key: str(start)}))
    (d / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "rollout/entropy_est": 1 / s,
                                                         "rollout/uniform_frac": s / 100, **(extra or {})}) + "\n"
                                             for s in range(1, steps + 1)))
    return d


@pytest.fixture
def experiment(tmp_path):
    """collapse (10 steps) -> plain (4), reheat (3) -> tsopsd (4), closed form -> closed (4); mid from step_6."""
    collapse = make_run(tmp_path, "collapse", 10, "assets/tiny_math/model")
    final = collapse / "final"
    closed = tmp_path / "closed_form"
    closed.mkdir()
    (closed / "closed_form.json").write_text(json.dumps({"source": str(final), "tau": 1.5}))
    reheat = make_run(tmp_path, "reheat_s0", 3, final, key="ckpt_path")
    runs = [("collapse", collapse), ("plain_s0", make_run(tmp_path, "plain_s0", 4, final)),
            ("plain_s1", make_run(tmp_path, "plain_s1", 4, final)), ("reheat_s0", reheat),
            ("tsopsd_s0", make_run(tmp_path, "tsopsd_s0", 4, reheat / "final")),
            ("closed_s0", make_run(tmp_path, "closed_s0", 4, closed)),
            ("mid", make_run(tmp_path, "mid", 2, collapse / "checkpoints" / "step_6"))]
    return [(label, str(d)) for label, d in runs]


def test_branches_continue_their_parents_steps(experiment):
    assert lineage(experiment) == {"collapse": 0, "plain_s0": 10, "plain_s1": 10, "reheat_s0": 10,
                                   "tsopsd_s0": 13, "closed_s0": 10, "mid": 6}
    # a run whose parent is not listed starts at 0
    assert lineage([r for r in experiment if r[0] != "collapse"])["plain_s0"] == 0
    rows = [{"step": 1, "x": 0.5}, {"step": 2, "x": float("nan")}, {"step": 3, "x": 0.25}]
    assert _series(rows, "x", 10) == {11: 0.5, 13: 0.25}


def test_seed_groups_and_smoothing():
    assert seed_groups(["collapse", "plain_s0", "plain_s1", "hot_s0", "s1"]) == {
        "collapse": ["collapse"], "plain": ["plain_s0", "plain_s1"], "hot": ["hot_s0"], "s1": ["s1"]}
    assert smooth([1.0, 2.0, 6.0]) == [1.0, 2.0, 6.0]                  # short series: window 1
    values = [float(i % 7) for i in range(100)]                       # window 2 * 4 + 1 = 9, centred, cut at the ends
    ref = [sum(values[max(0, i - 4):i + 5]) / len(values[max(0, i - 4):i + 5]) for i in range(100)]
    assert smooth(values) == pytest.approx(ref)


def test_figures_put_every_run_at_its_offset(experiment, tmp_path, monkeypatch):
    import matplotlib.axes
    drawn = []
    real = matplotlib.axes.Axes.plot

    def spy(self, *args, **kw):
        drawn.append((kw.get("label"), list(args[0])))
        return real(self, *args, **kw)
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", spy)
    path = plot_summary(experiment, {"entropy": ("rollout/entropy_est",), "uniform": ("rollout/uniform_frac",)},
                        str(tmp_path / "summary.png"))
    assert open(path, "rb").read()[:8] == b"\x89PNG\r\n\x1a\n"
    first_x = {label: xs[0] for label, xs in drawn if label}
    assert first_x == {"collapse": 1, "plain (2 seeds)": 11, "reheat": 11, "tsopsd": 14, "closed": 11, "mid": 7}
    files = plot_runs(experiment, {"entropy": ("rollout/entropy_est",)}, str(tmp_path))
    assert [os.path.basename(f) for f in files] == ["runs_entropy.png"]
