"""The project speaks of itself only: its history is the git log. No text in the repository
refers to development sessions, issue numbers or numbered work items. NUAA's own sessions (the
dataset records each subject in sessions 1-3; its split is by session) are the dataset's naming
and are allowed in the files that describe that dataset."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATTERN = r"session [0-9]|this session|issue [0-9]+|item [0-9]+"
# Files that describe NUAA's sessions (the dataset's naming, not ours).
NUAA_FILES = {
    "edge/assets/pad/minifasnet.card.json", "evaluation/README-liveness.md", "export/pad.py",
    "tests/e2e/test_liveness_e2e.py", "train/README-liveness.md", "train/liveness.py", "train/liveness_gpu.py",
}


def history_hits() -> list[str]:
    r = subprocess.run(["git", "grep", "-niE", PATTERN], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr  # 1 = no match
    hits = []
    for line in r.stdout.splitlines():
        path, _, text = line.split(":", 2)
        if path == "tests/unit/test_no_history.py":
            continue
        nuaa_session = path in NUAA_FILES and "session" in text.lower() and not any(
            w in text.lower() for w in ("this session", "issue ", "item "))
        if not nuaa_session:
            hits.append(line)
    return hits


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
def test_no_development_history_in_the_project():
    assert history_hits() == []


def test_the_check_finds_what_it_looks_for(tmp_path):
    import re

    for text in ("as measured in session 3", "this session's change", "see issue 16", "(item 4)"):
        assert re.search(PATTERN, text, re.IGNORECASE), text
