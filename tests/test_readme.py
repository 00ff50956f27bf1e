"""Every command in README.md's ```bash blocks that runs one of the project's scripts parses with that script's
own parser: a renamed or removed flag cannot leave the README wrong."""
import argparse
import importlib.util
import os
import re
import shlex

import pytest

from common.cli import parse_args
from tests._scripts import ROOT

README = os.path.join(ROOT, "README.md")


def readme_commands(text: str) -> list[tuple[str, list[str], str]]:
    """(script, its argv, the command as written) for each command of the bash blocks that runs a .py script:
    `python s.py`, `torchrun [launcher flags] s.py`, `bash run.sh python s.py`, `bash run.sh demo` (= demo.py)."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        env = {}                                       # M=... D=... lines: $M in later commands
        for line in block.replace("\\\n", " ").splitlines():
            for command in re.split(r"&&|\|\||;|\|", line):
                words = shlex.split(command, comments=True)
                while words and re.fullmatch(r"[A-Za-z_]\w*=\S*", words[0]):
                    name, _, value = words.pop(0).partition("=")
                    env[name] = value
                words = [re.sub(r"\$(\w+)|\$\{(\w+)\}", lambda m: env.get(m[1] or m[2], m[0]), w) for w in words]
                if words[:3] == ["bash", "run.sh", "demo"]:
                    found.append(("demo.py", words[3:], command.strip()))
                    continue
                script = next((i for i, w in enumerate(words) if w.endswith(".py")), None)
                if script is not None:
                    found.append((words[script], words[script + 1:], command.strip()))
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
    assert os.path.isfile(path), f"README runs {name}, which does not exist"
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(name))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert hasattr(module, "Args"), f"{name} has no Args dataclass: add how it parses flags to tests/test_readme.py"
    return module


def check(commands) -> list[str]:
    """One line per README command that its script would reject: a flag it does not define (exactly: argparse
    would also take an abbreviation), or values its parser refuses."""
    errors, modules = [], {}
    for script, argv, written in commands:
        module = modules.get(script) or modules.setdefault(script, load_script(script))
        flags = {s for action in parser_of(module)._actions for s in action.option_strings}
        unknown = [w.partition("=")[0] for w in argv if w.startswith("--") and w.partition("=")[0] not in flags]
        if unknown:
            errors.append(f"{script} has no {', '.join(unknown)}: `{written}`")
            continue
        if hasattr(module, "join_multi_flags"):        # evaluate.py: --ckpt A B C takes several values
            argv = module.join_multi_flags(argv)
        try:
            parse_args(module.Args, argv)
        except SystemExit as e:
            errors.append(f"{script} rejects its arguments (exit {e.code}): `{written}`")
    return errors


def test_readme_commands_use_flags_their_scripts_have():
    commands = readme_commands(open(README).read())
    scripts = {s for s, _, _ in commands}
    assert {"rl_dapo.py", "reheat_tsopsd.py", "evaluate.py", "demo.py"} <= scripts, scripts   # the reader works
    errors = check(commands)
    assert not errors, "README.md commands that would fail:\n" + "\n".join(errors)


def test_the_check_catches_a_wrong_flag():
    text = """```bash
M=assets/tiny_math/model
python evaluate.py --ckpt a=$M b=x \\
    --benchmarks math500 --limit 64   # a flag evaluate.py never had
torchrun --nproc_per_node=2 reheat_tsopsd.py --ckpt $M --tau hot
bash run.sh python rl_dapo.py --model $M --step 3 && bash run.sh demo --seeds 3
```"""
    commands = readme_commands(text)
    assert [(s, a) for s, a, _ in commands] == [
        ("evaluate.py", ["--ckpt", "a=assets/tiny_math/model", "b=x", "--benchmarks", "math500", "--limit", "64"]),
        ("reheat_tsopsd.py", ["--ckpt", "assets/tiny_math/model", "--tau", "hot"]),
        ("rl_dapo.py", ["--model", "assets/tiny_math/model", "--step", "3"]), ("demo.py", ["--seeds", "3"])]
    errors = check(commands)
    assert len(errors) == 3
    assert errors[0].startswith("evaluate.py has no --limit:")
    assert errors[1].startswith("reheat_tsopsd.py rejects its arguments (exit 2)")     # --tau takes a number
    assert errors[2].startswith("rl_dapo.py has no --step:")                            # abbreviations are not flags
