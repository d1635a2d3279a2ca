"""Clock faults: the wall clock jumps days ahead, then further, then back to 1970, while
the service runs. Pulse length, the cooldown and the back-off run on the monotonic clock and do not
move; every audit row keeps both clocks, and rows after a jump flag the wall clock as unsynced."""
from __future__ import annotations

import time

from edge.service import run_service
from reliability.fakes import (ALICE, STRANGER, Device, RelaySpy, audit_rows, fake_config, fake_models, patched,
                               sigterm_after, unlocked_intervals, write_gallery)

DAY = 86400.0
PULSE_S, COOLDOWN_S = 0.4, 3.0
S = 2.0  # seconds per step of the script below: slack for a loaded CI machine


def test_wall_clock_jumps_change_no_timer(tmp_path, monkeypatch):
    import edge.camera as camera_mod

    cfg = fake_config(tmp_path)
    cfg.camera.source = "opencv"
    cfg.relay.pulse_s, cfg.relay.max_hold_s = PULSE_S, 1.0
    cfg.decision.cooldown_s, cfg.decision.backoff_after, cfg.decision.backoff_s = COOLDOWN_S, 1, 30.0
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE), (2.0 * S, "ok", STRANGER), (2.8 * S, "ok", ALICE)])
    real_time = time.time
    t0 = time.monotonic()

    def wall():  # +3 days at step 0.6, +33 days at step 2.5, 1970 from step 3.5
        e = (time.monotonic() - t0) / S
        if e < 0.6:
            return real_time()
        if e < 2.5:
            return real_time() + 3 * DAY
        if e < 3.5:
            return real_time() + 33 * DAY
        return 1000.0 + e

    monkeypatch.setattr(time, "time", wall)
    with RelaySpy() as spy, fake_models(), patched(camera_mod, "make_camera", lambda c: device.open()):
        device.t0 = t0
        sigterm_after(4.2 * S)
        assert run_service(cfg, verbose=False) == 0
    monkeypatch.setattr(time, "time", real_time)

    rows = audit_rows(cfg.storage.audit)
    grants = [r["t_mono"] - t0 for r in rows if r["grant"]]
    # cooldown on the monotonic clock: the +3 day jump did not end it early
    assert len(grants) == 2, [(r["reason"], round(r["t_mono"] - t0, 2)) for r in rows]
    assert grants[0] < 0.6 * S and COOLDOWN_S <= grants[1] - grants[0] < COOLDOWN_S + 0.5, grants
    # back-off: the stranger's denial starts 30 s of back-off that a +30 day jump does not end
    denial = next(r["t_mono"] - t0 for r in rows if r["reason"] == "unknown")
    assert denial >= 2.0 * S
    assert any(r["reason"] == "backoff" and r["t_mono"] - t0 > denial for r in rows)  # audited once, on change
    assert not any(r["grant"] and r["t_mono"] - t0 > denial for r in rows)  # alice is back: still backing off
    # pulses: as configured whatever the wall clock did (a pulse counts from the frame's capture, so
    # processing latency shortens it; a wall-clock timer would have ended it at once or held it for days)
    pulses = [d for _, d in unlocked_intervals(spy.relay.line)]
    assert len(pulses) == 2 and all(PULSE_S - 0.25 < d < PULSE_S + 0.3 for d in pulses), pulses
    # the audit: both clocks on every row; unsynced after each jump; monotonic never goes back
    monos = [r["t_mono"] for r in rows if r["kind"] == "decision"]  # decisions carry the frame's capture time
    assert monos == sorted(monos)
    for r in rows:
        e = (r["t_mono"] - t0) / S
        if 0.05 < e < 0.55:
            assert r["wall_clock_synced"] == 1, r
        if e > 0.65:
            assert r["wall_clock_synced"] == 0, r
        if e > 3.55:
            assert r["t_wall"] < 2 * DAY, r
    assert any(r["t_mono"] - t0 > 3.55 * S for r in rows)  # rows were written in the 1970 phase


def _gate_with_alice_until(tmp_path, expires_at: float, floor: float):
    """The gate (fake models, mock pins) with alice enrolled until `expires_at` and an audit log
    whose newest synced row, the time floor, is at `floor`."""
    import numpy as np

    from edge import gallery as G
    from edge.audit import AuditLog
    from edge.pipeline import Gate
    from edge.relay import DoorRelay, make_pin_factory
    from reliability.fakes import DIM, ENCODER_SHA, fake_stack

    cfg = fake_config(tmp_path)
    g = G.Gallery(ENCODER_SHA, DIM)
    g.add(G.Person("alice", np.eye(DIM, dtype=np.float32)[0], "A1", floor - 10 * DAY, expires_at))
    with AuditLog(cfg.storage.audit) as a:
        a.record_event("service", "started", t_wall=floor)
    audit = AuditLog(cfg.storage.audit)
    relay = DoorRelay(cfg.relay, make_pin_factory("mock"))
    return Gate(cfg, fake_stack(), g, relay=relay, audit=audit), audit


def _alice(gate, t_wall: float, i: int):
    from edge.records import Frame
    from reliability.fakes import frame_image

    return gate.process(Frame(frame_image(ALICE), time.monotonic(), t_wall, i, "test"))


def test_a_clock_set_back_does_not_revive_an_expired_enrolment(tmp_path):
    """alice's enrolment ended an hour before the newest audited time; the clock is then set a
    month back (or boots at 1970): still expired."""
    floor = time.time()
    gate, audit = _gate_with_alice_until(tmp_path, floor - 3600.0, floor)
    try:
        d = [_alice(gate, floor - 30 * DAY, 0), _alice(gate, 1000.0, 1)]
        assert [x.reason for x in d] == ["expired", "expired"] and not any(x.grant for x in d)
        assert gate.relay.pin.state is False
    finally:
        gate.relay.close()
        audit.close()


def test_a_clock_far_ahead_expires_no_one_silently_and_never_raises_the_floor(tmp_path):
    """alice is valid for another day; the clock jumps ten years ahead: her grant is denied
    `clock_untrusted` (locked, not expired), the jump is audited as an event, no row on that clock
    moves the floor, and once the clock is right again she is granted."""
    from edge.audit import AuditLog
    from edge.pipeline import open_gallery

    floor = time.time()
    gate, audit = _gate_with_alice_until(tmp_path, floor + DAY, floor)
    try:
        ahead = _alice(gate, floor + 3650 * DAY, 0)
        assert (ahead.grant, ahead.reason, ahead.identity) == (False, "clock_untrusted", "alice")
        back = _alice(gate, floor + 60.0, 1)
        assert back.grant and back.reason == "granted"
        rows = [(r["kind"], r["reason"], r["wall_clock_synced"]) for r in audit.tail(6)]
        assert rows[-5:] == [("clock", "ahead", False), ("decision", "clock_untrusted", False),
                             ("clock", "trusted", True), ("decision", "granted", True), ("relay", "door_opened", True)]
    finally:
        gate.relay.close()
        audit.close()
    with AuditLog(gate.cfg.storage.audit) as a:
        assert a.clock.floor < floor + 120.0
    # at load too: a clock far ahead drops no one from the gallery; a right one drops the ended
    from edge import gallery as G
    from reliability.fakes import FakeEncoder

    G.new_key_file(gate.cfg.storage.key_file)
    G.save(gate.gallery, gate.cfg.storage.gallery, G.load_key(gate.cfg.storage.key_file))
    real = time.time
    try:
        time.time = lambda: floor + 3650 * DAY
        assert open_gallery(gate.cfg, FakeEncoder(), floor).names == ["alice"]
        time.time = lambda: floor + 1.5 * DAY
        assert open_gallery(gate.cfg, FakeEncoder(), floor).names == []
    finally:
        time.time = real
