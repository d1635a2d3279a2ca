"""Each board's device requirements install there, checked without the board.

Raspberry Pi OS bookworm (Python 3.11) installs requirements.txt: test_device_requirements.py builds
it here, deploy/aarch64-check.sh on arm64 bookworm under qemu. A Jetson Orin on JetPack 6 (Ubuntu
22.04: CPython 3.10, glibc 2.35, aarch64) installs requirements-jetson.txt: here pip resolves that
file for the Jetson's wheel tags, vermin checks that edge/ needs nothing newer than Python 3.10, and
where a Python 3.10 interpreter exists, edge/ runs in a venv of that file (onnxruntime's older
release included) and computes what the Pi's pins compute. No Ubuntu root filesystem is built."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from test_deploy import INSTALL, dry_run
from test_device_requirements import CHECK, device_venv

REPO = Path(__file__).resolve().parents[2]
PI, JETSON = REPO / "requirements.txt", REPO / "requirements-jetson.txt"
# What pip on JetPack 6 accepts: manylinux wheels up to its glibc 2.35, CPython 3.10 or abi3, pure Python.
JETPACK6_PLATFORMS = ["manylinux2014_aarch64"] + [f"manylinux_2_{minor}_aarch64" for minor in range(17, 36)]
JETPACK6_PIP = ["--only-binary", ":all:", "--implementation", "cp", "--python-version", "3.10", "--abi", "cp310",
                *(a for p in JETPACK6_PLATFORMS for a in ("--platform", p))]
# Environment markers as JetPack 6's python3 (Ubuntu 22.04's 3.10.12) reads them.
JETPACK6_MARKERS = {**default_environment(), "python_version": "3.10", "python_full_version": "3.10.12",
                    "implementation_version": "3.10.12", "implementation_name": "cpython",
                    "platform_python_implementation": "CPython", "platform_machine": "aarch64",
                    "platform_system": "Linux", "sys_platform": "linux", "os_name": "posix"}


def requirement_names(path: Path) -> set[str]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return {canonicalize_name(Requirement(line).name) for line in lines if line}


def unmet(report: dict, markers: dict) -> list[str]:
    """Dependencies that pip on the board would want and the resolution in `report` (pip's
    --report) lacks or has at a version they exclude. pip evaluates markers for the interpreter it
    runs in, not the --platform/--python-version it resolves for, so they are read again here as
    the board reads them."""
    got = {canonicalize_name(i["metadata"]["name"]): i["metadata"] for i in report["install"]}
    extras = {name: {""} for name in got}  # "" = the package itself; each extra asked of it too
    problems, grown = [], True
    while grown:  # an extra asked of a package brings in its own dependencies, which may ask for more
        grown, problems = False, []
        for name, meta in got.items():
            for line in meta.get("requires_dist") or []:
                dep = Requirement(line)
                if not any(dep.marker is None or dep.marker.evaluate({**markers, "extra": e}) for e in extras[name]):
                    continue
                dep_name = canonicalize_name(dep.name)
                if dep_name not in got:
                    problems.append(f"{meta['name']} {meta['version']} needs {line}: not in the resolution")
                elif not dep.specifier.contains(got[dep_name]["version"], prereleases=True):
                    problems.append(f"{meta['name']} {meta['version']} needs {line}: resolved {got[dep_name]['version']}")
                elif not dep.extras <= extras[dep_name]:
                    extras[dep_name] |= dep.extras
                    grown = True
    return sorted(set(problems))


def test_the_jetson_file_names_the_packages_of_requirements_txt():
    """A package added to requirements.txt (or dropped) must be added (or dropped) for the Jetson too."""
    assert requirement_names(JETSON) == requirement_names(PI)
    assert not re.search(r"^(torch|tensorflow|onnx)\b", JETSON.read_text(), re.M | re.I)


def _report(*metas: tuple[str, str, list[str]]) -> dict:
    return {"install": [{"metadata": {"name": n, "version": v, "requires_dist": deps}} for n, v, deps in metas]}


def test_unmet_reads_the_markers_as_the_board_does():
    both = _report(("app", "1.0", ['armlib; platform_machine == "aarch64"', 'oldlib; python_version < "3.11"',
                                   'intel; platform_machine == "x86_64"', "dev-tool; extra == 'dev'"]))
    assert unmet(both, JETPACK6_MARKERS) == [
        'app 1.0 needs armlib; platform_machine == "aarch64": not in the resolution',
        'app 1.0 needs oldlib; python_version < "3.11": not in the resolution']
    resolved = _report(("app", "1.0", ['armlib>=2; platform_machine == "aarch64"', "lib[fast]"]),
                       ("armlib", "1.5", []), ("lib", "3.0", ["speedup; extra == 'fast'"]), ("speedup", "1.0", []))
    assert unmet(resolved, JETPACK6_MARKERS) == [
        'app 1.0 needs armlib>=2; platform_machine == "aarch64": resolved 1.5']
    assert unmet(_report(("app", "1.0", ["lib[fast]"]), ("lib", "3.0", ["speedup; extra == 'fast'"])),
                 JETPACK6_MARKERS) == ["lib 3.0 needs speedup; extra == 'fast': not in the resolution"]


def test_requirements_jetson_resolves_for_jetpack6(tmp_path):
    """pip resolves requirements-jetson.txt, dependencies included, to wheels a Jetson on JetPack 6
    installs: nothing built from source. Metadata only (no wheel is downloaded); pip's cache is kept."""
    report = tmp_path / "report.json"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet",
                        "--disable-pip-version-check", "--target", str(tmp_path / "target"), "--report", str(report),
                        *JETPACK6_PIP, "-r", str(JETSON)], capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        probe = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
                                "-d", str(tmp_path / "probe"), *JETPACK6_PIP, "PyYAML"],
                               capture_output=True, text=True, timeout=300)
        if probe.returncode != 0:
            pytest.skip(f"pip cannot reach the package index for aarch64 wheels: "
                        f"{(probe.stderr.strip().splitlines() or ['no output'])[-1]}")
    assert r.returncode == 0, f"requirements-jetson.txt does not resolve for JetPack 6:\n{r.stderr[-3000:]}"
    resolved = json.loads(report.read_text())
    names = {canonicalize_name(i["metadata"]["name"]) for i in resolved["install"]}
    assert requirement_names(JETSON) <= names
    wheels = [i["download_info"]["url"].rsplit("/", 1)[-1] for i in resolved["install"]]
    assert all(w.endswith(".whl") for w in wheels), wheels
    assert unmet(resolved, JETPACK6_MARKERS) == []


def vermin(*args: str) -> subprocess.CompletedProcess:
    pytest.importorskip("vermin", reason="vermin (requirements-dev.txt) checks the minimum Python version")
    return subprocess.run([sys.executable, "-c", "import sys; from vermin import main; sys.exit(main())",
                           "--no-config-file", "--no-tips", "--violations", "--eval-annotations", "--target=3.10-",
                           *args], capture_output=True, text=True, timeout=300)


def test_edge_needs_nothing_newer_than_python_3_10():
    """JetPack 6's Python is 3.10: no syntax, module or member of the standard library from 3.11 on."""
    r = vermin(str(REPO / "edge"))
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_version_check_finds_code_that_needs_python_3_11(tmp_path):
    (tmp_path / "new.py").write_text("import datetime\nimport tomllib\n\n\ndef now():\n    return datetime.UTC\n")
    r = vermin(str(tmp_path))
    assert r.returncode != 0
    assert "'datetime.UTC' member requires !2, 3.11" in r.stdout and "'tomllib' module requires !2, 3.11" in r.stdout


def python310() -> str | None:
    """A CPython 3.10 to make the Jetson venv with: $FACEGATE_PYTHON310, python3.10 on PATH, or pyenv's."""
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    found = [os.environ.get("FACEGATE_PYTHON310"), shutil.which("python3.10"),
             *map(str, sorted(pyenv.glob("versions/3.10.*/bin/python3.10")))]
    for exe in found:
        if exe and subprocess.run([exe, "-c", "import sys, venv; sys.exit(sys.version_info[:2] != (3, 10))"],
                                  capture_output=True, timeout=60).returncode == 0:
            return exe
    return None


# Runs every ONNX model the gate ships on one fixed input through edge.runtime, saving the outputs.
RUN_MODELS = """
import sys
import numpy as np
from edge.runtime import OnnxModel
out = {}
for path in sys.argv[2:]:
    model = OnnxModel(path)
    shape = [d if isinstance(d, int) else (1 if i == 0 else 96) for i, d in enumerate(model.session.get_inputs()[0].shape)]
    for name, value in model(np.random.default_rng(0).random(shape, dtype=np.float32)).items():
        out[path + ":" + name] = value
np.savez(sys.argv[1], **out)
"""


def test_edge_runs_on_python_3_10_with_the_jetson_pins(tmp_path):
    """In a venv of requirements-jetson.txt alone made by Python 3.10 (x86_64 wheels of the same
    releases): every edge/ module imports, a 5,000-person INT8 search runs, and every shipped ONNX
    model loads in that onnxruntime and gives the outputs the test's own onnxruntime gives."""
    base = python310()
    if base is None:
        pytest.skip("no CPython 3.10 here (FACEGATE_PYTHON310, or pyenv install 3.10) to make the Jetson venv with")
    python = device_venv(JETSON, base)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    r = subprocess.run([str(python), "-I", str(CHECK)], capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "ok", "with requirements-jetson.txt on 3.10:\n" + r.stdout + r.stderr[-3000:]

    models = [str(p.relative_to(REPO)) for p in sorted((REPO / "edge").rglob("*.onnx")) + sorted((REPO / "models").glob("*.onnx"))]
    assert any("edge/assets/pad" in m for m in models)
    outputs = {}
    for tag, exe in (("jetson", str(python)), ("here", sys.executable)):
        r = subprocess.run([exe, "-c", RUN_MODELS, str(tmp_path / f"{tag}.npz"), *models], capture_output=True,
                           text=True, timeout=600, env=env, cwd=REPO)
        assert r.returncode == 0, f"{tag}: {r.stderr[-3000:]}"
        outputs[tag] = dict(np.load(tmp_path / f"{tag}.npz"))
    assert outputs["jetson"].keys() == outputs["here"].keys()
    for key, want in outputs["here"].items():
        assert np.allclose(outputs["jetson"][key], want, rtol=1e-3, atol=1e-4), key


def test_the_installer_picks_each_boards_requirements(tmp_path):
    jetson = dry_run(tmp_path / "jetson", "--models", "/srv/models", model="NVIDIA Jetson Orin Nano Developer Kit")
    assert "== board: jetson" in jetson and "== device requirements: requirements-jetson.txt" in jetson
    assert f"cp -r {REPO}/edge {REPO}/requirements-jetson.txt /opt/facegate/app.new/" in jetson
    assert "pip install --quiet --disable-pip-version-check -r /opt/facegate/app/requirements-jetson.txt" in jetson
    pi = dry_run(tmp_path / "pi", "--models", "/srv/models", model="Raspberry Pi 4 Model B Rev 1.5")
    assert "== device requirements: requirements.txt" in pi and "requirements-jetson" not in pi
    assert "pip install --quiet --disable-pip-version-check -r /opt/facegate/app/requirements.txt" in pi


def test_the_installer_on_a_jetson_needs_prebuilt_models_and_changes_nothing_without(tmp_path):
    """The export's venv is requirements.txt and more, whose pins need Python 3.11: on a Jetson it
    would fail halfway, so the installer refuses before its first step."""
    sysroot = tmp_path / "sysroot"
    (sysroot / "etc").mkdir(parents=True)
    (sysroot / "etc" / "nv_tegra_release").write_text("# R36 (release)\n")
    r = subprocess.run(["bash", str(INSTALL), "--dry-run"], capture_output=True, text=True, timeout=60,
                       env={**os.environ, "FACEGATE_SYSROOT": str(sysroot)})
    assert r.returncode == 1
    assert "on a Jetson pass --models DIR" in r.stderr
    assert "+ " not in r.stdout  # not one action listed
