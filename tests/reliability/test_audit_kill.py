"""Audit crash safety: the gate is SIGKILLed at random moments; after every kill the audit
database passes its integrity check and holds every row the gate reported as committed.

CI counts: 50 kills of the light child (real Gate, AuditLog and relay, fake models: kills land in
audit writes and database creation) and 3 kills of the real `python -m edge run`. The full counts
are `python -m reliability.kill_audit --mode light --kills 1000` and `--mode cli --kills 50`."""
from __future__ import annotations

import sqlite3

from edge.audit import AuditLog
from edge.demo import demo_frames_dir
from reliability.kill_audit import KillReport, _verify, enroll_demo_people, run_cli, run_light, write_cli_config


def test_light_gate_killed_50_times_loses_nothing(tmp_path):
    rep = run_light(50, tmp_path, max_delay_s=0.25, seed=1)
    assert rep.kills == 50
    assert rep.reported >= 200, rep  # the kills did land among writes
    assert rep.lost == 0 and rep.integrity_failures == 0, rep.problems
    assert rep.stored >= rep.reported


def test_cli_gate_killed_loses_nothing(tmp_path, cards, samples):
    config = write_cli_config(tmp_path, cards, demo_frames_dir())
    enroll_demo_people(config)
    rep = run_cli(3, config, max_delay_s=2.0, seed=1)
    assert rep.kills == 3
    assert rep.reported >= 6, rep  # "started" and at least one decision per run
    assert rep.lost == 0 and rep.integrity_failures == 0, rep.problems


def test_the_check_sees_missing_rows_and_damage(tmp_path):
    db = tmp_path / "a.sqlite3"
    with AuditLog(db) as log:
        ids = {log.record_event("service", "started") for _ in range(3)}
    rep = KillReport("check")
    _verify(rep, db, ids | {99})
    assert (rep.lost, rep.integrity_failures) == (1, 0)
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    page = conn.execute("PRAGMA page_size").fetchone()[0]
    conn.close()
    with open(db, "r+b") as f:  # scribble over the table's b-tree page
        f.seek(page + 8)
        f.write(b"\xff" * 64)
    rep = KillReport("check")
    _verify(rep, db, ids)
    assert rep.integrity_failures == 1 or rep.lost > 0
