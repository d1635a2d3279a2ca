"""edge/ is what goes on the gate: read from its source (nothing is imported), every module imports
only the standard library, edge itself and what requirements.txt installs, and never the packages
that depend on it (train -> export -> evaluation -> edge). A package the device lacks may only be
a platform package imported inside the function that needs it."""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
UPSTREAM = {"evaluation", "export", "train"}
# requirements.txt names whose import name differs
IMPORT_NAME = {"opencv-python-headless": "cv2", "PyYAML": "yaml", "ai-edge-litert": "ai_edge_litert", "libosdp": "osdp",
               "paho-mqtt": "paho"}
# installed with the operating system where the hardware is, so never in requirements.txt
PLATFORM = {"picamera2": "Raspberry Pi OS camera stack", "tflite_runtime": "the older LiteRT wheel on a Jetson",
            "gi": "PyGObject (python3-gi), for camera.source gstreamer"}


def device_packages() -> set[str]:
    names = set()
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name = re.match(r"[A-Za-z0-9_.\-]+", line).group(0)
            names.add(IMPORT_NAME.get(name, name.lower().replace("-", "_")))
    return names


def imports(source: str) -> list[tuple[str, int, bool]]:
    """(top-level package, line, at module level) of each import; relative imports as "edge"
    unless they climb out of the package."""
    tree = ast.parse(source)
    top = {id(n) for n in tree.body}
    out = []
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            out += [(a.name.split(".")[0], n.lineno, id(n) in top) for a in n.names]
        elif isinstance(n, ast.ImportFrom):
            if n.level == 1:
                name = "edge"
            elif n.level > 1:
                name = (n.module or "..").split(".")[0]
            else:
                name = n.module.split(".")[0]
            out.append((name, n.lineno, id(n) in top))
    return out


def test_imports_reads_levels_and_placement():
    src = "import numpy as np\nfrom .match import x\nfrom ..evaluation import y\ndef f():\n    import picamera2\n"
    assert imports(src) == [("numpy", 1, True), ("edge", 2, True), ("evaluation", 3, True), ("picamera2", 5, False)]


def test_requirements_name_the_device_packages():
    assert device_packages() >= {"numpy", "onnxruntime", "cv2", "gpiozero", "ai_edge_litert", "pydantic", "yaml"}


def test_edge_imports_nothing_upstream_and_nothing_the_device_lacks():
    allowed = device_packages() | set(sys.stdlib_module_names) | {"edge"}
    problems = []
    files = sorted((REPO / "edge").rglob("*.py"))
    assert REPO / "edge" / "pipeline.py" in files
    for f in files:
        for name, line, module_level in imports(f.read_text()):
            where = f"{f.relative_to(REPO)}:{line}"
            if name in UPSTREAM:
                problems.append(f"{where} imports {name} (it depends on edge, not edge on it)")
            elif name not in allowed and (module_level or name not in PLATFORM):
                problems.append(f"{where} imports {name}, which requirements.txt does not install")
    assert not problems, "\n".join(problems)
