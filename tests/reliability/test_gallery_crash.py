"""A gallery update killed at every step of the atomic write leaves the old gallery or the new one
on disk, never a partial file, and loads with the key.

Each case runs the save in a child process whose edge.atomic `_hook(step)` calls os._exit at that
step: no cleanup handlers, no flush, as close to a power cut as a test can get without a VM."""
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edge import gallery as G

REPO = Path(__file__).resolve().parents[2]
KEY = bytes(range(32))

CHILD = textwrap.dedent("""
    import os, sys
    import numpy as np
    from edge import gallery as G
    path, step = sys.argv[1], sys.argv[2]
    key = bytes(range(32))
    g = G.load(path, key)
    g.add(G.Person("carol", np.array([0, 0, 0, 1], np.float32), "E3"))
    g.bundle_sequence = 2

    def hook(s):
        if s == step:
            os._exit(99)

    G.save(g, path, key, _hook=hook)
""")


def old_gallery():
    g = G.Gallery("ab" * 32, 4, bundle_sequence=1)
    g.add(G.Person("alice", np.array([1, 0, 0, 0], np.float32), "E1"))
    return g


@pytest.mark.parametrize("step,expect", [("written", "old"), ("synced", "old"), ("renamed", "new"), ("none", "new")])
def test_crash_at_each_step_leaves_old_or_new(tmp_path, step, expect):
    path = tmp_path / "gallery.fgg"
    G.save(old_gallery(), path, KEY)
    old_bytes = path.read_bytes()
    r = subprocess.run([sys.executable, "-c", CHILD, str(path), step], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == (0 if step == "none" else 99), r.stderr
    g = G.load(path, KEY)
    if expect == "old":
        assert path.read_bytes() == old_bytes
        assert (g.names, g.bundle_sequence) == (["alice"], 1)
    else:
        assert (g.names, g.bundle_sequence, g.revision) == (["alice", "carol"], 2, 2)
    # a killed writer may leave its temp file; it is never mistaken for the gallery
    leftovers = [p.name for p in tmp_path.iterdir() if p.name != "gallery.fgg"]
    assert all(n.startswith(".gallery.fgg.") and n.endswith(".tmp") for n in leftovers)
    if step in ("written", "synced"):
        assert len(leftovers) == 1


@pytest.mark.parametrize("step", ["written", "synced", "renamed"])
def test_io_error_at_each_step_leaves_a_loadable_gallery_and_no_temp_file(tmp_path, step):
    """A write that fails (disk full, I/O error) instead of dying: the error reaches the caller, the
    gallery on disk is the old one (or, after the rename, the new one) and no temp file is left."""
    path = tmp_path / "gallery.fgg"
    G.save(old_gallery(), path, KEY)
    g = G.load(path, KEY)
    g.add(G.Person("carol", np.array([0, 0, 0, 1], np.float32), "E3"))

    def hook(s):
        if s == step:
            raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        G.save(g, path, KEY, _hook=hook)
    assert G.load(path, KEY).names == (["alice", "carol"] if step == "renamed" else ["alice"])
    assert [p.name for p in tmp_path.iterdir()] == ["gallery.fgg"]
