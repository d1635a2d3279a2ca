"""The device package runs on requirements.txt alone: in a venv made from it and nothing else,
every edge/ module imports and a 5,000-person gallery search runs (tests/unit/_device_env.py).
The venv is kept in .venv-device/<hash of the requirements file and the Python version>/, so only a
change of requirements pays for the install again (test_board_requirements.py makes one of
requirements-jetson.txt with Python 3.10 the same way)."""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
REQUIREMENTS = REPO / "requirements.txt"
CHECK = Path(__file__).with_name("_device_env.py")


def venv_key(requirements: bytes, python: str) -> str:
    return hashlib.sha256(requirements + b"\0" + python.encode()).hexdigest()[:16]


def _pip(python: Path, *args: str, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, timeout=timeout)


def device_venv(requirements: Path = REQUIREMENTS, base: str = sys.executable) -> Path:
    """The python of a venv made by the `base` interpreter holding `requirements` only, built once per
    requirements content and Python version."""
    root = REPO / ".venv-device"
    root.mkdir(exist_ok=True)
    version = subprocess.run([base, "-c", "import sys; print(sys.version)"], capture_output=True, text=True,
                             check=True, timeout=60).stdout[:-1]
    venv = root / venv_key(requirements.read_bytes(), version)
    python, done = venv / "bin" / "python", venv / ".installed"
    with open(root / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two test runs at once build it once
        if done.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # an install cut short
        subprocess.run([base, "-m", "venv", str(venv)], check=True, capture_output=True, timeout=300)
        r = _pip(python, "install", "-q", "--disable-pip-version-check", "-r", str(requirements), timeout=1800)
        if r.returncode != 0:
            probe = _pip(python, "download", "--no-deps", "-q", "-d", str(venv / "probe"), "PyYAML", timeout=300)
            shutil.rmtree(venv, ignore_errors=True)
            if probe.returncode != 0:
                pytest.skip(f"pip cannot reach the package index to build the device venv: "
                            f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}")
            pytest.fail(f"pip install -r {requirements.name} failed:\n{r.stderr[-3000:]}")
        done.touch()
    return python


def test_venv_key_changes_with_the_requirements_and_the_python():
    a = venv_key(b"numpy\n", "3.11.7")
    assert len(a) == 16 and a == venv_key(b"numpy\n", "3.11.7")
    assert a != venv_key(b"numpy\nonnx\n", "3.11.7") and a != venv_key(b"numpy\n", "3.12.1")


def test_edge_imports_and_searches_with_requirements_txt_alone():
    python = device_venv()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run([str(python), "-I", str(CHECK)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stdout + r.stderr[-3000:]
