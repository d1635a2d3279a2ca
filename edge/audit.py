"""Durable, append-only audit log of what the gate decided and why (SQLite, WAL, synchronous=FULL).

One row per decision or event: both clocks, a flag for an untrustworthy wall clock, the reason code,
the numbers behind it and the model versions. Never images or embeddings: `details` accepts plain
JSON values only, refuses arrays and bytes, and bounds lists, strings and total size so a vector
cannot slip in as a list of floats.

Durability: every row is its own transaction; with WAL and synchronous=FULL the WAL is fsync'd
before `record` returns its id, so a row whose id was returned survives a process kill and a
power cut. Update and delete are refused by triggers, not only by the absence of an API.
Concurrency: one writer process (several threads may share one AuditLog) and any number of
readers (`AuditLog(path, readonly=True)`, or the sqlite3 shell).
Listeners (`listeners`, e.g. edge.mqtt's publisher) are told of each row after its transaction
committed, in commit order, so what they pass on is already on record; one that fails is logged,
and the row stays recorded.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import numpy as np

from .atomic import fsync_dir
from .clock import WALL_CLOCK_EPOCH, TrustedClock
from .errors import AuditError
from .records import Decision

log = logging.getLogger(__name__)
SCHEMA_VERSION = 1
MAX_CLOCK_JUMP_S = 86400.0
SHA_PREFIX = 16
MAX_DETAILS_BYTES = 16384
MAX_LIST_ITEMS = 64  # an embedding is 128+ numbers; no legitimate detail is this long
MAX_STRING_CHARS = 1024  # keeps base64 images out
_KIND = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

_SCHEMA = (
    """CREATE TABLE audit (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    t_mono REAL NOT NULL,
    t_wall REAL NOT NULL,
    wall_clock_synced INTEGER NOT NULL,
    kind TEXT NOT NULL,
    "grant" INTEGER,
    reason TEXT NOT NULL,
    identity TEXT,
    score REAL,
    runner_up_score REAL,
    threshold REAL,
    liveness REAL,
    track_id INTEGER,
    encoder TEXT,
    detector TEXT,
    details TEXT NOT NULL
)""",
    "CREATE TRIGGER audit_no_update BEFORE UPDATE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
    "CREATE TRIGGER audit_no_delete BEFORE DELETE ON audit BEGIN SELECT RAISE(ABORT, 'audit log is append-only'); END",
)
_FLOAT_COLUMNS = ("score", "runner_up_score", "threshold", "liveness")
_COLUMNS = ("t_mono", "t_wall", "wall_clock_synced", "kind", "grant", "reason", "identity",
            *_FLOAT_COLUMNS, "track_id", "encoder", "detector", "details")
_INSERT = ("INSERT INTO audit (" + ", ".join('"%s"' % c for c in _COLUMNS) + ") VALUES ("
           + ", ".join(":" + c for c in _COLUMNS) + ")")
_EVENT_FIELDS = {"grant", "identity", "track_id", "t_mono", "t_wall", "encoder", "detector", *_FLOAT_COLUMNS}


def wall_clock_synced(t_wall: float, t_mono: float, ref_wall: float, ref_mono: float) -> bool:
    """Whether a wall-clock reading can be trusted, judged against a reference pair of readings.

    Unsynced: before 2024-01-01 (a Pi without RTC boots near 1970 or its last saved time), or the
    wall clock moved more than a day against the monotonic clock since the reference."""
    if t_wall < WALL_CLOCK_EPOCH:
        return False
    return abs((t_wall - t_mono) - (ref_wall - ref_mono)) <= MAX_CLOCK_JUMP_S


def clean_details(value, where: str = "details"):
    """`value` as plain JSON types, or TypeError / ValueError if it could carry an image or embedding."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, np.generic) and not isinstance(value, (np.void, np.bytes_, np.str_, np.object_)):
        return clean_details(value.item(), where)
    if isinstance(value, float):
        return value if math.isfinite(value) else repr(value)  # strict JSON has no NaN
    if isinstance(value, str):
        if len(value) > MAX_STRING_CHARS:
            raise ValueError(f"audit {where}: string of {len(value)} characters (max {MAX_STRING_CHARS})")
        return value
    if isinstance(value, (np.ndarray, bytes, bytearray, memoryview)):
        raise TypeError(f"audit {where}: {type(value).__name__} refused: the audit never holds images or embeddings")
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise TypeError(f"audit {where}: key {k!r} is not a string")
            out[k] = clean_details(v, f"{where}[{k!r}]")
        return out
    if isinstance(value, (list, tuple)):
        if len(value) > MAX_LIST_ITEMS:
            raise ValueError(f"audit {where}: list of {len(value)} items (max {MAX_LIST_ITEMS}); "
                             "the audit never holds embeddings")
        return [clean_details(v, f"{where}[{i}]") for i, v in enumerate(value)]
    raise TypeError(f"audit {where}: {type(value).__name__} is not a plain JSON value")


def _number(value, name: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        raise TypeError(f"audit {name}: numpy array refused")
    value = float(value)
    return value if math.isfinite(value) else None


def _short_sha(sha: str | None) -> str | None:
    return None if sha is None else str(sha)[:SHA_PREFIX]


class AuditLog:
    """Append-only SQLite audit log; see the module doc for what is and is not stored."""

    def __init__(self, path: str | Path, encoder_sha256: str | None = None,
                 detector_sha256: str | None = None, readonly: bool = False):
        self.path = Path(path)
        self.readonly = readonly
        self._lock = threading.Lock()
        self._encoder = _short_sha(encoder_sha256)
        self._detector = _short_sha(detector_sha256)
        self._ref: tuple[float, float] | None = None  # (wall, mono) the clock flag is judged against
        # Called with the rows of each committed transaction (their columns and "id"), under the
        # log's lock: a listener must return at once and never write to this log itself.
        self.listeners: list[Callable[[list[dict]], None]] = []
        self._observe_clock(time.time(), time.monotonic())
        try:
            self._conn = self._open()
            # The time floor (edge.clock): rows on an untrusted clock are flagged 0 and never raise it.
            floor = self._conn.execute("SELECT max(t_wall) FROM audit WHERE wall_clock_synced = 1").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise AuditError(self.path, f"not a usable audit database: {e}") from None
        self.clock = TrustedClock(floor, time.monotonic())

    def _open(self) -> sqlite3.Connection:
        if self.readonly:
            if not self.path.is_file():
                raise AuditError(self.path, "audit database not found")
            conn = sqlite3.connect(f"file:{quote(str(self.path.resolve()))}?mode=ro", uri=True,
                                   isolation_level=None, check_same_thread=False, timeout=5.0)
            self._check_version(conn)
            return conn
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fresh = not self.path.exists()
        if fresh:
            # identities are personal data: owner-only, and SQLite gives -wal/-shm the same mode
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600))
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=5.0)
        try:
            mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise AuditError(self.path, f"cannot use WAL journal here (got {mode!r})")
            conn.execute("PRAGMA synchronous=FULL")
            conn.execute("BEGIN IMMEDIATE")
            try:
                if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
                    if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]:
                        raise AuditError(self.path, "an SQLite database that is not a facegate audit log")
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
                self._check_version(conn)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            conn.close()
            raise
        if fresh:
            fsync_dir(self.path.parent)
        return conn

    def _check_version(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version != SCHEMA_VERSION:
            raise AuditError(self.path, f"audit schema version {version}; this facegate reads {SCHEMA_VERSION}")

    def _observe_clock(self, t_wall: float, t_mono: float) -> bool:
        if self._ref is None:
            if t_wall < WALL_CLOCK_EPOCH:
                return False
            # The reference is the first plausible reading, so a clock that was unset at start and
            # then synced by NTP is judged from its synced time, not from 1970.
            self._ref = (t_wall, t_mono)
        return wall_clock_synced(t_wall, t_mono, *self._ref)

    def set_models(self, encoder_sha256: str | None, detector_sha256: str | None) -> None:
        """Model versions stamped on the following rows (after a reload)."""
        with self._lock:
            self._encoder = _short_sha(encoder_sha256)
            self._detector = _short_sha(detector_sha256)

    def record(self, decision: Decision) -> int:
        """Append one decision; returns its row id once it is durable on disk."""
        return self.record_event(
            "decision", decision.reason, grant=decision.grant, identity=decision.identity,
            score=decision.score, runner_up_score=decision.runner_up_score, threshold=decision.threshold,
            liveness=decision.liveness, track_id=decision.track_id, t_mono=decision.t_mono,
            t_wall=decision.t_wall, details=decision.details)

    def record_event(self, kind: str, reason: str, details: dict | None = None, **fields) -> int:
        """Append one event ("enroll", "forget", "camera", "service", "gallery", ...); returns its id.

        Keyword fields named like a column (grant, identity, score, runner_up_score, threshold,
        liveness, track_id, t_mono, t_wall, encoder, detector) fill it; any other goes to details.
        A t_mono / t_wall of 0 or absent means now. AuditError when the row cannot be written
        (full, read-only or failing disk)."""
        return self.record_events([(kind, reason, details, fields)])[0]

    def record_events(self, events: list[tuple[str, str, dict | None, dict]]) -> list[int]:
        """Append (kind, reason, details, fields) events, as record_event, in one transaction: all
        of them are durable when this returns, or none is (AuditError). A change recorded as several
        rows (one per person of an enrollment) is never on record in part."""
        if self.readonly:
            raise RuntimeError(f"{self.path}: audit log opened read-only")
        rows = [self._row(kind, reason, details, dict(fields)) for kind, reason, details, fields in events]
        with self._lock:
            try:
                self._conn.execute("BEGIN IMMEDIATE")
                try:
                    stamped = [self._stamp(row, fields) for row, (_, _, _, fields) in zip(rows, events)]
                    ids = [int(self._conn.execute(_INSERT, row).lastrowid) for row in stamped]
                    self._conn.execute("COMMIT")
                except BaseException:
                    if self._conn.in_transaction:
                        self._conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                raise AuditError(self.path, f"cannot write the audit log: {e}") from None
            self._tell([{**row, "id": i} for row, i in zip(stamped, ids)])
        return ids

    def _tell(self, rows: list[dict]) -> None:
        for listener in self.listeners:
            try:
                listener(rows)
            except Exception:  # noqa: BLE001 - the rows are on record; a listener's fault is its own
                log.exception("audit listener %r failed", listener)

    def _row(self, kind: str, reason: str, details: dict | None, fields: dict) -> dict:
        if not isinstance(kind, str) or not _KIND.match(kind):
            raise ValueError(f"audit kind {kind!r}: lower-case word expected")
        extra = {k: fields.pop(k) for k in list(fields) if k not in _EVENT_FIELDS}
        merged = clean_details({**(details or {}), **extra})
        details_json = json.dumps(merged, separators=(",", ":"), sort_keys=True, allow_nan=False)
        if len(details_json) > MAX_DETAILS_BYTES:
            raise ValueError(f"audit details: {len(details_json)} bytes (max {MAX_DETAILS_BYTES})")
        identity = fields.get("identity")
        if identity is not None and not isinstance(identity, str):
            raise TypeError(f"audit identity: str expected, got {type(identity).__name__}")
        track_id = fields.get("track_id")
        grant = fields.get("grant")
        row = {
            "kind": kind, "reason": str(reason), "identity": identity,
            "grant": None if grant is None else int(bool(grant)),
            "track_id": None if track_id is None else int(track_id),
            "details": details_json,
            **{c: _number(fields.get(c), c) for c in _FLOAT_COLUMNS},
        }
        return row

    def _stamp(self, row: dict, fields: dict) -> dict:
        """The row with its clocks and model versions; the caller holds the lock."""
        t_mono = float(fields.get("t_mono") or time.monotonic())
        t_wall = float(fields.get("t_wall") or time.time())
        synced = self._observe_clock(t_wall, t_mono) and self.clock.observe(t_wall, t_mono)
        return {**row, "t_mono": t_mono, "t_wall": t_wall, "wall_clock_synced": int(synced),
                "encoder": _short_sha(fields.get("encoder")) or self._encoder,
                "detector": _short_sha(fields.get("detector")) or self._detector}

    def trust_clock(self) -> int:
        """An operator vouches for the wall clock: it becomes the time floor, audited (the row is
        flagged synced, so the floor holds at the next start too); returns the row's id."""
        with self._lock:
            before = self.clock.floor
            self.clock.trust(time.time(), time.monotonic())
        return self.record_event("clock", "trusted", details={"previous_floor": round(before, 3)})

    def count(self) -> int:
        with self._lock:
            return int(self._conn.execute("SELECT count(*) FROM audit").fetchone()[0])

    def tail(self, n: int = 20) -> list[dict]:
        """The last `n` rows, oldest first, with details parsed and flags as bools."""
        with self._lock:
            cur = self._conn.execute("SELECT * FROM audit ORDER BY id DESC LIMIT ?", (int(n),))
            names = [d[0] for d in cur.description]
            rows = [dict(zip(names, r)) for r in cur.fetchall()]
        for r in rows:
            r["details"] = json.loads(r["details"])
            r["wall_clock_synced"] = bool(r["wall_clock_synced"])
            if r["grant"] is not None:
                r["grant"] = bool(r["grant"])
        return rows[::-1]

    def integrity_check(self) -> bool:
        try:
            with self._lock:
                rows = self._conn.execute("PRAGMA integrity_check").fetchall()
        except sqlite3.DatabaseError:
            return False
        return rows == [("ok",)]

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
