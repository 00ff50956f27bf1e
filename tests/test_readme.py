"""Every command of README.md's and docs/REPRODUCE.md's ```bash blocks that runs one of the project's scripts, and
every stage of the SLURM template docs/slurm/reproduce.sbatch, is accepted by that script: by its own parser and by
its own `check_args`, the checks main() runs before any compute. A renamed or removed flag, or a value the script
refuses (a bad range, a missing file, --resume auto without --run-name), cannot leave the documents wrong.

Paths. check_args also checks that checkpoints and data files exist. The documents refer to checkpoints that an
earlier command of the same document writes (`runs/rl_tiny/final` after `rl_dapo.py ... --run-name rl_tiny`, or
`/shared/runs/qwen3-4b_collapse/snapshots/step_000200` on a cluster); such a path is replaced by a stand-in
directory (a config.json, a metrics.jsonl and an empty checkpoints/step_000001/) before check_args sees it. Only a
path inside what an EARLIER command of the same document writes is stood in: a run directory (--out/--run-name),
a closed form's --out, an evaluation's --out. Every other path must exist in this checkout, so a command that points
at a run no earlier command starts (a default, time-stamped run name; a typo) or at a missing file fails here.
"""
import argparse
import contextlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess

import pytest

from common.cli import parse_args
from tests._scripts import ROOT

README = os.path.join(ROOT, "README.md")
GUIDE = os.path.join(ROOT, "docs", "REPRODUCE.md")
SBATCH = os.path.join(ROOT, "docs", "slurm", "reproduce.sbatch")
STAND_IN_CONFIG = os.path.join(ROOT, "assets", "configs", "qwen3-4b-base", "config.json")
OPERATORS = {"&&", "||", ";", "|", "&"}

# The template's stages in the order a reproduction runs them, each an environment for a DRY_RUN of the template
# (which prints the stage's command); every variable not set here is the template's default.
SEEDS = ("0", "1", "2")
SNAPSHOT = "/shared/runs/qwen3-4b_collapse/snapshots/step_000200"
SBATCH_STAGES = (
    [dict(STAGE="collapse"),
     dict(STAGE="measure", CKPTS=f"s200={SNAPSHOT} s250=/shared/runs/qwen3-4b_collapse/snapshots/step_000250"),
     dict(STAGE="closed"),
     dict(STAGE="closed", TAU="calibrate", H="0.3")]
    + [dict(STAGE="reheat", H="0.3", SEED=s) for s in SEEDS]
    + [dict(STAGE="reheat", H="0.3", TAU="calibrate", H_TEACHER="0.45", SEED="0")]
    + [dict(STAGE="arm", ARM=arm, SEED=s) for arm in ("plain", "hot", "tsopsd", "closed") for s in SEEDS]
    + [dict(STAGE="arm", ARM="hot", TAU="calibrate", HOT_T="1.31", SEED="0", COLLAPSED=SNAPSHOT),
       dict(STAGE="eval")])


def readme_commands(text: str) -> list[tuple[str, list[str], str]]:
    """(script, its argv, the command as written) for each command of the bash blocks that runs a .py script:
    `python s.py`, `torchrun [launcher flags] s.py`, `bash run.sh python s.py`, `bash run.sh demo` (= demo.py).
    Commands are split at && || ; | & outside quotes (a `python -c '...; ...'` stays one command)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env = {}                                       # M=... D=... lines: $M in later commands
        for line in block.replace("\\\n", " ").splitlines():
            lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            tokens, commands = list(lexer), [[]]
            for token in tokens:
                if token in OPERATORS:
                    commands.append([])
                else:
                    commands[-1].append(token)
            for words in commands:
                while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
                    name, _, value = words.pop(0).partition("=")
                    env[name] = value
                words = [re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], m[0]), w) for w in words]
                written = " ".join(words)
                if words[:3] == ["bash", "run.sh", "demo"]:
                    found.append(("demo.py", words[3:], written))
                    continue
                script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
                if script is not None:
                    found.append((words[script], words[script + 1:], written))
    return found


def sbatch_commands(stages=SBATCH_STAGES) -> list[tuple[str, list[str], str]]:
    """The command the SLURM template runs for each stage (its DRY_RUN=1 mode prints it), as (script, argv,
    the stage's variables)."""
    found = []
    for stage in stages:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DRY_RUN": "1"} | stage    # no variable leaks in
        out = subprocess.run(["bash", SBATCH], env=env, cwd=ROOT, capture_output=True, text=True)
        written = " ".join(f"{k}={v}" for k, v in stage.items())
        assert out.returncode == 0, f"{written} bash {SBATCH}: exit {out.returncode}\n{out.stderr}"
        words = shlex.split(out.stdout)
        found.append((words[0], words[1:], f"{written} (docs/slurm/reproduce.sbatch)"))
    return found


def parser_of(module):
    """The argparse parser common/cli.py builds from the script's Args (caught as it parses no flags)."""
    made = []
    real = argparse.ArgumentParser.parse_args

    def keep(self, *a, **kw):
        made.append(self)
        raise SystemExit(0)
    argparse.ArgumentParser.parse_args = keep
    try:
        with pytest.raises(SystemExit):
            parse_args(module.Args, [])
    finally:
        argparse.ArgumentParser.parse_args = real
    return made[0]


def load_script(name: str):
    path = os.path.join(ROOT, name)
    assert os.path.isfile(path), f"the documents run {name}, which does not exist"
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "Args"), f"{name} has no Args dataclass: add how it parses flags to tests/test_readme.py"
    return module


def inside(path: str, roots: list[str]) -> bool:
    path = os.path.normpath(path)
    return any(path == root or path.startswith(root + os.sep) for root in roots)


def stand_in(path: str, stand_ins: str) -> str:
    """A directory that passes every existence check a checkpoint, run directory or evaluation folder meets in
    check_args: config.json (a Qwen3 config), metrics.jsonl, and a complete checkpoint's directory name."""
    target = os.path.join(stand_ins, os.path.normpath(path).lstrip(os.sep))
    os.makedirs(os.path.join(target, "checkpoints", "step_000001"), exist_ok=True)
    shutil.copyfile(STAND_IN_CONFIG, os.path.join(target, "config.json"))
    with open(os.path.join(target, "metrics.jsonl"), "w") as f:
        f.write(json.dumps({"step": 1}) + "\n")
    return target


def with_stand_ins(word: str, produced: list[str], stand_ins: str) -> str:
    """`word` with each path in it (a value, label=path, or a comma list of them) that lies inside what an earlier
    command wrote replaced by a stand-in."""
    pieces = []
    for piece in word.split(","):
        label, sep, path = piece.partition("=")
        if not sep or "/" in label:
            label, sep, path = "", "", piece
        if path and inside(path, produced):
            path = stand_in(path, stand_ins)
        pieces.append(label + sep + path)
    return ",".join(pieces)


def outputs(script: str, args) -> list[str]:
    """What a command writes that a later one may read: a training run's directory (only with a fixed
    --run-name: a default one holds the launch time), a closed form's or an evaluation's --out."""
    if script in ("rl_dapo.py", "reheat_tsopsd.py"):
        if getattr(args, "closed_form", False):
            return [args.out]
        if args.resume and args.resume != "auto":
            return [args.resume]
        return [os.path.join(args.out, args.run_name)] if args.run_name else []
    return [args.out] if hasattr(args, "out") else []


def check(commands, stand_ins: str) -> list[str]:
    """One line per command that its script would reject: a flag it does not define (exactly: argparse would also
    take an abbreviation), a value its parser refuses, or one its check_args refuses. Commands are checked in
    order, paths inside what an earlier one writes replaced by stand-ins (module docstring)."""
    errors, modules, produced = [], {}, []
    with contextlib.chdir(ROOT):                       # relative paths as the documents use them
        for script, argv, written in commands:
            module = modules.get(script) or modules.setdefault(script, load_script(script))
            flags = {s for action in parser_of(module)._actions for s in action.option_strings}
            unknown = [w.partition("=")[0] for w in argv if w.startswith("--") and w.partition("=")[0] not in flags]
            if unknown:
                errors.append(f"{script} has no {', '.join(unknown)}: `{written}`")
                continue
            join = getattr(module, "join_multi_flags", lambda a: a)    # evaluate.py: --ckpt A B C takes several
            try:
                args = parse_args(module.Args, join(argv))
                writes = outputs(script, args)
                args = parse_args(module.Args, join([a if a.startswith("--") else
                                                     with_stand_ins(a, produced, stand_ins) for a in argv]))
            except SystemExit as e:
                errors.append(f"{script} rejects its arguments (exit {e.code}): `{written}`")
                continue
            produced += [os.path.normpath(p) for p in writes]
            if hasattr(module, "check_args"):
                try:
                    module.check_args(args)
                except SystemExit as e:
                    errors.append(f"{script}'s check_args rejects `{written}`: {e.code}")
    return errors


@pytest.mark.parametrize("document", [README, GUIDE], ids=["README.md", "docs/REPRODUCE.md"])
def test_document_commands_pass_their_scripts_checks(document, tmp_path):
    commands = readme_commands(open(document).read())
    scripts = {s for s, _, _ in commands}
    assert {"rl_dapo.py", "reheat_tsopsd.py", "evaluate.py"} <= scripts, scripts      # the reader works
    if document == README:
        assert "demo.py" in scripts, scripts
    errors = check(commands, str(tmp_path))
    assert not errors, f"{os.path.relpath(document, ROOT)} commands that would fail:\n" + "\n".join(errors)


def test_sbatch_template_parses_and_its_stages_pass_their_scripts_checks(tmp_path):
    out = subprocess.run(["bash", "-n", SBATCH], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    text = open(SBATCH).read()
    for directive in ("--requeue", "--signal=B:USR1@", "--open-mode=append"):
        assert f"#SBATCH {directive}" in text, directive
    assert "scontrol requeue" in text and "trap requeue USR1" in text
    commands = sbatch_commands()
    assert {s for s, _, _ in commands} == {"rl_dapo.py", "reheat_tsopsd.py", "evaluate.py"}
    for script, argv, written in commands:              # every training run continues after a requeue
        if script != "evaluate.py" and "--closed-form" not in argv:
            assert argv[argv.index("--resume") + 1] == "auto" and "--run-name" in argv, written
    errors = check(commands, str(tmp_path))
    assert not errors, "docs/slurm/reproduce.sbatch stages that would fail:\n" + "\n".join(errors)
    # a stage without its required variable stops before anything runs
    out = subprocess.run(["bash", SBATCH], env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "DRY_RUN": "1",
                                                "STAGE": "reheat"}, cwd=ROOT, capture_output=True, text=True)
    assert out.returncode != 0 and "set H" in out.stderr


def test_the_check_catches_a_wrong_flag(tmp_path):
    text = """```bash
M=assets/tiny_math/model
python evaluate.py --ckpt a=$M b=x \\
    --benchmarks math500 --limit 64   # a flag evaluate.py never had
torchrun --nproc_per_node=2 reheat_tsopsd.py --ckpt $M --tau hot
bash run.sh python rl_dapo.py --model $M --step 3 && bash run.sh demo --seeds 3
python -c 'import os; print(1)' | python rl_dapo.py --model $M --group-size 1
python rl_dapo.py --model $M --run-name one --resume auto; python rl_dapo.py --model $M --resume auto
python rl_dapo.py --model runs/one/final && python rl_dapo.py --model runs/two/final
```"""
    commands = readme_commands(text)
    assert [(s, a) for s, a, _ in commands] == [
        ("evaluate.py", ["--ckpt", "a=assets/tiny_math/model", "b=x", "--benchmarks", "math500", "--limit", "64"]),
        ("reheat_tsopsd.py", ["--ckpt", "assets/tiny_math/model", "--tau", "hot"]),
        ("rl_dapo.py", ["--model", "assets/tiny_math/model", "--step", "3"]), ("demo.py", ["--seeds", "3"]),
        ("rl_dapo.py", ["--model", "assets/tiny_math/model", "--group-size", "1"]),
        ("rl_dapo.py", ["--model", "assets/tiny_math/model", "--run-name", "one", "--resume", "auto"]),
        ("rl_dapo.py", ["--model", "assets/tiny_math/model", "--resume", "auto"]),
        ("rl_dapo.py", ["--model", "runs/one/final"]), ("rl_dapo.py", ["--model", "runs/two/final"])]
    errors = check(commands, str(tmp_path))
    assert len(errors) == 6, errors
    assert errors[0].startswith("evaluate.py has no --limit:")
    assert errors[1].startswith("reheat_tsopsd.py rejects its arguments (exit 2)")     # --tau takes a number
    assert errors[2].startswith("rl_dapo.py has no --step:")                            # abbreviations are not flags
    assert errors[3].startswith("rl_dapo.py's check_args rejects") and "--group-size" in errors[3]
    assert errors[4].startswith("rl_dapo.py's check_args rejects") and "--run-name" in errors[4]   # auto needs a name
    # runs/one was written by the command before (a stand-in), runs/two by none: not found
    assert errors[5].startswith("rl_dapo.py's check_args rejects") and "runs/two/final" in errors[5]
