"""Camera faults through the whole service: each fault is reported offline in time, the
door stays locked, the watchdog is not pinged while no frame is processed, the camera is reopened
with growing back-off (for faults a reopen can cure), and the gate recovers on its own.

Timings are shortened for CI (offline after 1 s); `python -m reliability.camera_faults` measures
the shipped defaults (offline after 5 s)."""
from __future__ import annotations

import numpy as np
import pytest

from edge.camera import CameraMonitor
from edge.config import CameraConfig
from edge.records import Frame
from reliability.camera_faults import SLACK_S, run_fault

OFFLINE_S, PULSE_S = 1.0, 0.5
EXPECTED = {"stall": "stall", "raise": "exception", "shape": "shape", "black": "black", "frozen": "frozen",
            "frozen2": "frozen"}
REOPENED = {"stall", "raise", "frozen", "frozen2"}  # wrong shapes and black frames come from a working device


@pytest.mark.parametrize("kind", list(EXPECTED))
def test_fault_through_the_service(kind, tmp_path):
    r = run_fault(kind, tmp_path, good_s=0.8, fault_s=2.8, recover_s=2.0, offline_after_s=OFFLINE_S,
                  read_timeout_s=0.4, backoff_s=0.2, frozen_after_s=0.5, pulse_s=PULSE_S, max_hold_s=1.0)
    assert r["rc"] == 0
    assert r["pings_before_fault"] > 0  # the fake socket does hear the gate
    assert r["fault_event"] == f"fault:{EXPECTED[kind]}"
    assert r["offline_event"] == f"offline:{EXPECTED[kind]}"
    assert r["offline_delay_s"] <= OFFLINE_S + r["slack_s"] + SLACK_S, r
    assert r["pings_during_fault"] == 0, r
    assert r["openings_during_fault"] == 0, r
    assert r["locked_after_fault_s"] <= PULSE_S + r["slack_s"], r  # a pulse granted before the fault ends as usual
    if kind in REOPENED:
        assert r["reconnects"] >= 2, r
        gaps = r["reconnect_gaps_s"]
        assert all(b > a for a, b in zip(gaps, gaps[1:])), r  # exponential back-off
    else:
        assert r["reconnects"] == 0, r
    assert r["online_after_fault_s"] is not None, r
    assert r["pings_after_recovery"] > 0, r
    assert r["door_locked_at_exit"]


class Clock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t

    def sleep(self, s):
        self.t += s


class CyclingCamera:
    """A stuck live driver handing back its `n` queued buffers in turn."""

    live, fault = True, None

    def __init__(self, clock, n):
        rng = np.random.default_rng(0)
        self.clock, self.i = clock, 0
        self.buffers = [rng.integers(40, 200, (48, 64, 3), dtype=np.uint8) for _ in range(n)]

    def read(self, timeout_s):
        self.clock.t += 0.1
        self.i += 1
        return Frame(self.buffers[self.i % len(self.buffers)], self.clock.t, 0.0, self.i, "cycle")

    def close(self):
        pass


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stale_buffers_in_rotation_are_frozen(n):
    """Regression: the monitor compared a frame with the previous one only, so a driver cycling two
    stale buffers passed every frame on as new (the gate granted on a picture of whoever had been
    at the door, and kept pinging the watchdog)."""
    clock = Clock()
    cam = CyclingCamera(clock, n)
    mon = CameraMonitor(lambda: cam, CameraConfig(source="opencv", offline_after_s=5.0), clock=clock,
                        sleep=clock.sleep, frozen_after_s=3.0)
    passed = [mon.read() is not None for _ in range(40)]
    assert sum(passed) == n  # each buffer once, when it was new
    reasons = [e.audit_reason for e in mon.pop_events()]
    assert "fault:frozen" in reasons
