"""The project speaks of itself only: its history is the git log. No text in the repository
refers to development sessions, issue numbers or numbered work items (NUAA's capture sessions
are named in words, so nothing needs an exception)."""
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PATTERN = r"session [0-9]|this session|issue [0-9]+|item [0-9]+"


def history_hits() -> list[str]:
    r = subprocess.run(["git", "grep", "-niE", PATTERN], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode in (0, 1), r.stderr  # 1 = no match
    return [line for line in r.stdout.splitlines() if not line.startswith("tests/unit/test_no_history.py:")]


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs git and a checkout")
def test_no_development_history_in_the_project():
    assert history_hits() == []


def test_the_check_finds_what_it_looks_for():
    import re

    for text in ("as measured in session 3", "this session's change", "see issue 16", "(item 4)"):
        assert re.search(PATTERN, text, re.IGNORECASE), text
