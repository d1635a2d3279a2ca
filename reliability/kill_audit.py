"""Audit crash safety: SIGKILL the gate at random moments; after each kill the audit database passes
`PRAGMA integrity_check` and holds every row the gate reported as committed.

A row counts as reported once `AuditLog.record_event` has returned its id (the gate's own promise:
"returns its row id once it is durable"); the children print each such id on stdout.

Two children:
  light  the real Gate + AuditLog + DoorRelay (mock pins) with the fake model stack, so nearly all
         time is spent in audit writes and kills land in them. A fork server imports once and
         forks one gate process per round (kill delay counted from the fork, so kills also land
         while the database is being opened or created).
  cli    the real `python -m edge run --config ...` (models, replay camera with loop, mock pins), a
         new process per round; killed after its first reported row.

    python -m reliability.kill_audit --mode light --kills 1000
    python -m reliability.kill_audit --mode cli --kills 50
"""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRESH_DB_EVERY = 10  # rounds between new database files, so kills also hit a database's creation


def _say(line: str) -> None:
    """One write(2) per line: below PIPE_BUF it is atomic, so lines from the fork server and its
    gates never interleave (print() may write the text and its newline separately)."""
    os.write(1, (line + "\n").encode())


def _echo_ids() -> None:
    """Print every committed audit row id, after record_event has returned it."""
    from edge.audit import AuditLog

    record_event = AuditLog.record_event

    def echo(self, *a, **kw):
        i = record_event(self, *a, **kw)
        _say(f"AUDIT {i}")
        return i

    AuditLog.record_event = echo


# ------------------------------------------------------------------ children
def _serve_light() -> None:
    """Fork server: reads 'go DB' / 'sync N' lines; each 'go' forks a gate writing to DB."""
    import numpy as np
    from gpiozero.pins.mock import MockFactory

    from edge import gallery as G
    from edge.audit import AuditLog
    from edge.pipeline import Gate
    from edge.records import Frame
    from edge.relay import DoorRelay
    from reliability.fakes import ALICE, DIM, ENCODER_SHA, STRANGER, fake_config, fake_stack, frame_image

    _echo_ids()
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed gates are reaped by the kernel
    cfg = fake_config(tempfile.gettempdir())
    g = G.Gallery(ENCODER_SHA, DIM)
    g.add(G.Person("alice", np.eye(DIM, dtype=np.float32)[0], "A1"))
    images = [frame_image(ALICE), frame_image(STRANGER)]
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "sync":
            _say(f"SYNC {arg}")
            continue
        pid = os.fork()
        if pid:
            _say(f"PID {pid}")
            continue
        try:  # the gate: runs until killed
            relay = DoorRelay(cfg.relay, MockFactory())
            audit = AuditLog(arg, ENCODER_SHA, ENCODER_SHA)
            audit.record_event("service", "started")
            gate = Gate(cfg, fake_stack(), g, relay=relay, audit=audit)
            i = 0
            while True:  # alternating grant / unknown: every frame is a decision worth auditing
                gate.process(Frame(images[i % 2], time.monotonic(), time.time(), i, "kill"))
                i += 1
        finally:
            os._exit(1)


def _run_cli(argv: list[str]) -> int:
    _echo_ids()
    from edge.__main__ import main

    return main(argv)


# ------------------------------------------------------------------ parent
@dataclass
class KillReport:
    mode: str
    kills: int = 0
    reported: int = 0  # rows the gate said were committed
    lost: int = 0  # reported rows missing after the kill
    integrity_failures: int = 0
    databases: int = 0
    stored: int = 0  # rows on disk at the end (>= reported: a row may land before its id is printed)
    seconds: float = 0.0
    problems: list[str] = field(default_factory=list)


class _Lines:
    """Collects a child's stdout lines in a thread."""

    def __init__(self, stream):
        self.cond = threading.Condition()
        self.lines: list[str] = []
        self.closed = False
        self._t = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._t.start()

    def _run(self, stream) -> None:
        for line in stream:
            with self.cond:
                self.lines.append(line.strip())
                self.cond.notify_all()
        with self.cond:
            self.closed = True
            self.cond.notify_all()

    def wait_for(self, pred, timeout: float) -> str | None:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                for line in self.lines:
                    if pred(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0 or self.closed:
                    return None
                self.cond.wait(left)

    def take(self) -> list[str]:
        with self.cond:
            out, self.lines = self.lines, []
        return out

    def join(self, timeout: float) -> None:
        self._t.join(timeout)


def check_db(path: Path) -> tuple[bool, set[int]]:
    """(integrity ok, stored ids). A database killed before its schema was committed is empty."""
    if not path.exists():
        return True, set()
    conn = sqlite3.connect(str(path), timeout=10)
    try:
        ok = conn.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        try:
            ids = {r[0] for r in conn.execute("SELECT id FROM audit")}
        except sqlite3.OperationalError:  # no table yet
            ids = set()
    except sqlite3.DatabaseError:  # too damaged to answer at all
        return False, set()
    finally:
        conn.close()
    return ok, ids


def _ids(lines: list[str]) -> list[int]:
    return [int(x.split()[1]) for x in lines if x.startswith("AUDIT ")]


def _dead(pid: int, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.002)
    return False


def _verify(rep: KillReport, db: Path, reported: set[int]) -> None:
    ok, stored = check_db(db)
    missing = reported - stored
    rep.lost += len(missing)
    if not ok:
        rep.integrity_failures += 1
        rep.problems.append(f"kill {rep.kills}: integrity_check failed on {db.name}")
    if missing:
        rep.problems.append(f"kill {rep.kills}: reported ids missing: {sorted(missing)[:10]}")


def run_light(kills: int, folder: Path, max_delay_s: float = 0.25, seed: int = 0, progress=None) -> KillReport:
    rng = random.Random(seed)
    rep = KillReport("light")
    t0 = time.monotonic()
    server = subprocess.Popen([sys.executable, "-m", "reliability.kill_audit", "--child", "light"], cwd=REPO,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=str(REPO)))
    lines = _Lines(server.stdout)
    reported: dict[Path, set[int]] = {}
    try:
        db = None
        for k in range(kills):
            if k % FRESH_DB_EVERY == 0:
                db = folder / f"audit-{k // FRESH_DB_EVERY:04d}.sqlite3"
                reported[db] = set()
                rep.databases += 1
            server.stdin.write(f"go {db}\n")
            server.stdin.flush()
            got = lines.wait_for(lambda x: x.startswith("PID "), 60)
            if got is None:
                raise RuntimeError("fork server did not answer")
            lines.lines.remove(got)
            pid = int(got.split()[1])
            time.sleep(rng.uniform(0, max_delay_s))
            os.kill(pid, signal.SIGKILL)
            if not _dead(pid):
                raise RuntimeError(f"gate {pid} survived SIGKILL")
            # every line the dead gate wrote is in the pipe before the server's answer to this
            server.stdin.write(f"sync {k}\n")
            server.stdin.flush()
            if lines.wait_for(lambda x, k=k: x == f"SYNC {k}", 60) is None:
                raise RuntimeError("fork server did not sync")
            ids = _ids(lines.take())
            reported[db].update(ids)
            rep.reported += len(ids)
            rep.kills += 1
            _verify(rep, db, reported[db])
            if progress:
                progress(rep)
    finally:
        server.stdin.close()
        server.wait(timeout=30)
        lines.join(5)
    rep.stored = sum(len(check_db(d)[1]) for d in reported)
    rep.seconds = round(time.monotonic() - t0, 1)
    return rep


def write_cli_config(folder: Path, cards: dict, frames: Path) -> Path:
    """A replay config (loop, fast, mock pins) with its own gallery, key and audit in `folder`."""
    import yaml

    from reliability.common import models_config

    cfg = models_config(cards)
    cfg.camera.source, cfg.camera.path, cfg.camera.fps, cfg.camera.loop = "replay", str(frames), 120.0, True
    cfg.relay.pin_factory = "mock"
    cfg.storage.gallery, cfg.storage.key_file = str(folder / "gallery.fgg"), str(folder / "gallery.key")
    cfg.storage.audit = str(folder / "audit.sqlite3")
    path = folder / "gate.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    return path


def enroll_demo_people(config: Path) -> None:
    """The demo's two people, enrolled through the real code path (models loaded once, here)."""
    from edge.__main__ import _ensure_demo_gallery
    from edge.config import load_config
    from edge.pipeline import Stack

    cfg = load_config(config)
    _ensure_demo_gallery(cfg, Stack.from_config(cfg))


def run_cli(kills: int, config: Path, max_delay_s: float = 3.0, seed: int = 0, progress=None) -> KillReport:
    from edge.config import load_config

    rng = random.Random(seed)
    db = Path(load_config(config).storage.audit)
    rep = KillReport("cli", databases=1)
    reported: set[int] = set()
    t0 = time.monotonic()
    for _ in range(kills):
        proc = subprocess.Popen([sys.executable, "-m", "reliability.kill_audit", "--child", "cli", "run",
                                 "--config", str(config), "--quiet"], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
        lines = _Lines(proc.stdout)
        if lines.wait_for(lambda x: x.startswith("AUDIT "), 300) is None:
            proc.kill()
            raise RuntimeError("the gate reported no audit row (does `python -m edge run` start?)")
        time.sleep(rng.uniform(0, max_delay_s))
        if proc.poll() is not None:
            raise RuntimeError(f"the gate exited by itself (rc {proc.returncode}) before it was killed")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        lines.join(10)  # EOF: the dead gate's last lines are all read
        ids = _ids(lines.take())
        reported.update(ids)
        rep.reported += len(ids)
        rep.kills += 1
        _verify(rep, db, reported)
        if progress:
            progress(rep)
    rep.stored = len(check_db(db)[1])
    rep.seconds = round(time.monotonic() - t0, 1)
    return rep


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["--child", "light"]:
        _serve_light()
        return 0
    if argv[:2] == ["--child", "cli"]:
        return _run_cli(argv[2:])
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mode", choices=("light", "cli"), default="light")
    p.add_argument("--kills", type=int, default=1000)
    p.add_argument("--max-delay", type=float, default=None, help="kill within this many seconds (light: of the "
                                                                  "fork; cli: of the first audit row)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="write the report here")
    args = p.parse_args(argv)

    def progress(rep: KillReport) -> None:
        if rep.kills % 50 == 0 or rep.kills == args.kills:
            print(f"{rep.kills}/{args.kills} kills, {rep.reported} rows reported, {rep.lost} lost, "
                  f"{rep.integrity_failures} integrity failures", flush=True)

    with tempfile.TemporaryDirectory(prefix="fg-kill-") as d:
        folder = Path(d)
        if args.mode == "light":
            rep = run_light(args.kills, folder, args.max_delay or 0.25, args.seed, progress)
        else:
            from edge.demo import demo_frames_dir
            from reliability.common import default_cards

            config = write_cli_config(folder, default_cards(), demo_frames_dir())
            enroll_demo_people(config)
            rep = run_cli(args.kills, config, args.max_delay or 3.0, args.seed, progress)
    print(json.dumps(asdict(rep), indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(rep), indent=2))
    return 0 if rep.lost == 0 and rep.integrity_failures == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
