"""Audit log: durable (WAL + synchronous=FULL, survives a process kill), append-only, no images or
embeddings, both clocks with an unsynced-wall-clock flag."""
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from edge.audit import SCHEMA_VERSION, WALL_CLOCK_EPOCH, AuditLog, clean_details, wall_clock_synced
from edge.errors import AuditError
from edge.records import Decision

REPO = Path(__file__).resolve().parents[2]
DAY = 86400.0
NOW_WALL = 1_750_000_000.0  # June 2025


def decision(i=0, **kw):
    return Decision(grant=bool(i % 2), reason="granted" if i % 2 else "unknown", identity=f"p{i}",
                    score=0.5 + i / 1000, runner_up_score=0.2, threshold=0.4, liveness=0.9,
                    track_id=i, **kw)


def test_wal_and_synchronous_full(tmp_path):
    with AuditLog(tmp_path / "a.db") as log:
        assert log._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        assert log._conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert log.integrity_check()


def test_record_survives_close_and_reopen(tmp_path):
    path = tmp_path / "var" / "a.db"  # the folder is created
    with AuditLog(path, encoder_sha256="ab" * 32, detector_sha256="cd" * 32) as log:
        rid = log.record(decision(1, details={"box": [1, 2, 3, 4], "quality": {"blur": np.float32(20.5)}}))
    assert (path.stat().st_mode & 0o777) == 0o600
    with AuditLog(path) as log:
        assert log.count() == 1
        (row,) = log.tail(5)
    assert row["id"] == rid
    assert row["kind"] == "decision" and row["grant"] is True and row["reason"] == "granted"
    assert row["identity"] == "p1" and row["track_id"] == 1
    assert row["score"] == pytest.approx(0.501) and row["threshold"] == pytest.approx(0.4)
    assert row["encoder"] == "ab" * 8 and row["detector"] == "cd" * 8
    assert row["details"] == {"box": [1, 2, 3, 4], "quality": {"blur": 20.5}}
    assert row["t_mono"] > 0 and row["t_wall"] > WALL_CLOCK_EPOCH  # 0 in the Decision = now


def test_record_event_columns_and_details(tmp_path):
    with AuditLog(tmp_path / "a.db") as log:
        log.record_event("camera", "stall", delay_s=2.5, details={"source": "opencv:0"})
        log.record_event("enroll", "enrolled", identity="alice")
        rows = log.tail(10)
    assert [r["kind"] for r in rows] == ["camera", "enroll"]
    assert rows[0]["details"] == {"delay_s": 2.5, "source": "opencv:0"} and rows[0]["grant"] is None
    assert rows[1]["identity"] == "alice"


@pytest.mark.parametrize("payload", [
    np.zeros((4, 4, 3), np.uint8),
    np.zeros(128, np.float32),
    b"\xff\xd8\xff",
    bytearray(8),
    [0.1] * 128,  # an embedding smuggled as a list
    "A" * 5000,  # a base64 image
    {"nested": {"face": np.ones((2, 2))}},
    object(),
])
def test_refuses_images_and_embeddings(tmp_path, payload):
    with AuditLog(tmp_path / "a.db") as log:
        with pytest.raises((TypeError, ValueError)):
            log.record(decision(details={"x": payload}))
        with pytest.raises((TypeError, ValueError)):
            log.record_event("service", "start", x=payload)
        with pytest.raises(TypeError):
            log.record(Decision(grant=False, reason="unknown", score=np.array([0.5])))
        assert log.count() == 0


def test_clean_details_keeps_plain_values():
    assert clean_details({"a": [1, 2.5, None, True], "b": np.int64(3), "c": float("nan")}) == \
        {"a": [1, 2.5, None, True], "b": 3, "c": "nan"}


def test_append_only(tmp_path):
    path = tmp_path / "a.db"
    with AuditLog(path) as log:
        log.record(decision(1))
        assert not hasattr(log, "delete") and not hasattr(log, "update")
    conn = sqlite3.connect(path)
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("UPDATE audit SET grant = 0")
    with pytest.raises(sqlite3.DatabaseError, match="append-only"):
        conn.execute("DELETE FROM audit")
    conn.close()
    with AuditLog(path) as log:
        assert log.count() == 1 and log.tail(1)[0]["grant"] is True


def test_reader_sees_committed_rows(tmp_path):
    path = tmp_path / "a.db"
    with AuditLog(path) as writer, AuditLog(path, readonly=True) as reader:
        assert reader.count() == 0
        writer.record(decision(1))
        assert reader.count() == 1
        with pytest.raises(RuntimeError):
            reader.record(decision(2))


def test_refuses_foreign_and_damaged_files(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(AuditError, match="junk.db"):
        AuditLog(junk)
    other = tmp_path / "other.db"
    conn = sqlite3.connect(other)
    conn.execute("CREATE TABLE t (x)")
    conn.commit()
    conn.close()
    with pytest.raises(AuditError, match="not a facegate audit log"):
        AuditLog(other)
    newer = tmp_path / "newer.db"
    AuditLog(newer).close()
    conn = sqlite3.connect(newer)
    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(AuditError, match="schema version"):
        AuditLog(newer)
    with pytest.raises(AuditError, match="not found"):
        AuditLog(tmp_path / "missing.db", readonly=True)


_WRITER = """
import os, sys
from edge.audit import AuditLog
from edge.records import Decision
log = AuditLog(sys.argv[1])
n = int(sys.argv[2])
for i in range(n if n > 0 else 10**9):
    rid = log.record(Decision(grant=False, reason="unknown", track_id=i))
    print(rid, flush=True)
os._exit(0)  # no close, no atexit, no finalisers
"""


def _writer(path, n):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(path), str(n)], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, text=True)


def test_exit_without_close_loses_nothing(tmp_path):
    path = tmp_path / "a.db"
    proc = _writer(path, 50)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    ids = [int(x) for x in out.split()]
    assert len(ids) == 50
    with AuditLog(path) as log:
        assert log.integrity_check()
        assert log.count() == 50
        assert [r["id"] for r in log.tail(50)] == ids


def test_sigkill_loses_no_reported_record(tmp_path):
    path = tmp_path / "a.db"
    proc = _writer(path, 0)
    ids = [int(proc.stdout.readline()) for _ in range(30)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    with AuditLog(path) as log:
        assert log.integrity_check()
        stored = {r["id"] for r in log.tail(10**6)}
    assert set(ids) <= stored


def test_wall_clock_synced_cases():
    ref = (NOW_WALL, 100.0)
    assert wall_clock_synced(NOW_WALL + 50, 150.0, *ref)  # moved with the monotonic clock
    assert wall_clock_synced(NOW_WALL + 50 + DAY, 150.0, *ref)  # exactly a day of drift: still ok
    assert not wall_clock_synced(NOW_WALL + 50 + 2 * DAY, 150.0, *ref)  # jumped two days ahead
    assert not wall_clock_synced(NOW_WALL - 3 * DAY, 150.0, *ref)  # jumped back
    assert not wall_clock_synced(86400.0 * 3, 150.0, *ref)  # 1970
    assert not wall_clock_synced(WALL_CLOCK_EPOCH - 1, 150.0, WALL_CLOCK_EPOCH - 1, 150.0)


def test_clock_flag_on_records(tmp_path, monkeypatch):
    with AuditLog(tmp_path / "a.db") as log:
        mono, wall = time.monotonic(), time.time()
        log.record(decision(t_mono=mono, t_wall=wall))
        log.record(decision(t_mono=mono + 1, t_wall=wall + 3 * DAY))  # wall clock jumped
        log.record(decision(t_mono=mono + 2, t_wall=1000.0))  # reset to 1970
        rows = log.tail(3)
    assert [r["wall_clock_synced"] for r in rows] == [True, False, False]
    assert rows[2]["t_wall"] == 1000.0 and rows[2]["t_mono"] == pytest.approx(mono + 2)


def test_clock_unset_at_start_then_synced(tmp_path, monkeypatch):
    real = time.time
    monkeypatch.setattr(time, "time", lambda: 1000.0)  # booted without RTC
    log = AuditLog(tmp_path / "a.db")
    log.record_event("service", "start")
    monkeypatch.setattr(time, "time", real)  # NTP synced: judged from here, not from 1970
    log.record_event("service", "clock")
    log.record_event("service", "later")
    assert [r["wall_clock_synced"] for r in log.tail(3)] == [False, True, True]
    log.close()


def test_a_full_disk_takes_a_batch_of_rows_whole_or_not_at_all(tmp_path):
    with AuditLog(tmp_path / "a.db") as log:
        log.record_event("service", "started")
        # SQLite's own page limit: the same "database or disk is full" a full SD card gives
        pages = log._conn.execute("PRAGMA page_count").fetchone()[0]
        log._conn.execute(f"PRAGMA max_page_count={pages}")
        batch = [("enroll", "enrolled", {"note": "x" * 1000}, {"identity": f"p{i}"}) for i in range(20)]
        with pytest.raises(AuditError, match=r"a\.db: cannot write the audit log: database or disk is full"):
            log.record_events(batch)
        assert log.count() == 1 and log.integrity_check()
        with pytest.raises(AuditError, match="database or disk is full"):
            log.record_event("service", "stopped", details={k: "x" * 1000 for k in "abcde"})  # > one page
        log._conn.execute(f"PRAGMA max_page_count={pages + 100}")  # space freed: the same log goes on
        assert len(log.record_events(batch)) == 20 and log.count() == 21
