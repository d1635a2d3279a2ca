"""A gate whose audit log stops taking rows (full disk, failing card): the record comes before the
door, so a grant that cannot be recorded opens nothing; the gate stops locked, says why in one
line (no SQLite traceback) and starts again once the log takes rows."""
from __future__ import annotations

import sqlite3

import edge.camera as camera_mod
from edge.audit import AuditLog
from edge.errors import run_cli
from edge.service import Notifier, run_service
from reliability.fakes import ALICE, Device, RelaySpy, audit_rows, fake_config, fake_models, patched, \
    unlocked_intervals, write_gallery


class FillingDisk:
    """The audit connection of a gate whose disk fills: after `room` more rows every insert fails
    as SQLite reports a full disk."""

    def __init__(self, conn: sqlite3.Connection, room: int):
        self._conn, self.room = conn, room

    def execute(self, sql: str, *args):
        if sql.startswith("INSERT"):
            if self.room <= 0:
                raise sqlite3.OperationalError("database or disk is full")
            self.room -= 1
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


class StatusRecorder(Notifier):
    def __init__(self):
        super().__init__(address="")
        self.sent: list[str] = []

    def send(self, message: str) -> bool:
        self.sent.append(message)
        return True


def test_a_gate_whose_disk_fills_stays_locked_says_why_and_starts_again_once_there_is_room(tmp_path, capsys):
    cfg = fake_config(tmp_path)
    cfg.camera.source = "opencv"
    write_gallery(cfg)
    real_open = AuditLog._open
    notifier = StatusRecorder()
    with RelaySpy() as spy, fake_models(), \
            patched(camera_mod, "make_camera", lambda c: Device([(0.0, "ok", ALICE)]).open()), \
            patched(AuditLog, "_open", lambda self: FillingDisk(real_open(self), room=2)):
        status = run_cli(lambda _: run_service(cfg, verbose=False, notifier=notifier), None)  # as `edge run`
    err = capsys.readouterr().err
    assert status == 5, err
    assert f"error: {cfg.storage.audit}: cannot write the audit log: database or disk is full" in err
    assert "Traceback" not in err and "sqlite3." not in err
    assert unlocked_intervals(spy.relay.line) == []  # Alice was granted, but the grant was never on record
    assert not spy.relay.line.state
    assert [r["reason"] for r in audit_rows(cfg.storage.audit)] == ["started", "online"]  # then the disk was full
    assert any(m.startswith(f"STATUS=stopped, door locked: {cfg.storage.audit}: cannot write the audit log")
               for m in notifier.sent), notifier.sent

    # room again: the same log opens, the gate starts, grants and records
    with RelaySpy() as spy, fake_models(), \
            patched(camera_mod, "make_camera", lambda c: Device([(0.0, "ok", ALICE)]).open()):
        assert run_service(cfg, max_frames=3, verbose=False, notifier=StatusRecorder()) == 0
    assert len(unlocked_intervals(spy.relay.line)) >= 1
    rows = audit_rows(cfg.storage.audit)
    assert [r["reason"] for r in rows][:3] == ["started", "online", "started"] and rows[-1]["reason"] == "stopped"
    assert any(r["reason"] == "granted" and r["grant"] for r in rows)
    with AuditLog(cfg.storage.audit) as log:
        assert log.integrity_check()
