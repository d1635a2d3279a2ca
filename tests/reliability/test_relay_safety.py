"""Relay safety: the door returns to locked on an exception out of the service loop, on
SIGTERM mid-pulse and at interpreter exit; with overlapping grants and a frame loop that stalls,
no unlock lasts longer than relay.max_hold_s, read from the line's own history. Each test runs on
both line backends: gpiozero's mock pins and a fake gpiod chip (reliability/fake_gpiod.py).

SIGKILL runs no Python code: what it means for the door, and the wiring that makes it safe, is in
edge/relay.py's module doc and reliability/README-reliability.md."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from edge.service import Notifier, run_service
from reliability.common import REPO
from reliability.fake_gpiod import BACKENDS, simulated_relay
from reliability.fakes import (ALICE, Device, RelaySpy, audit_rows, fake_config, fake_models, patched,
                               sigterm_after, unlocked_intervals, write_gallery)
from reliability.relay_stress import TIMER_SLACK_S, stress


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def test_pulse_never_exceeds_max_hold_with_overlapping_grants_and_stalls(tmp_path, backend):
    r = stress(6.0, tmp_path, pulse_s=0.5, max_hold_s=1.0, seed=3, backend=backend)
    assert r["rc"] == 0
    assert r["openings"] >= 2, r  # the door did open, more than once
    assert r["longest_unlocked_s"] >= 0.5, r  # overlapping grants extended a pulse
    assert r["longest_unlocked_s"] <= r["max_hold_s"] + TIMER_SLACK_S, r
    assert r["locked_at_exit"]


def test_a_stream_of_grants_through_the_service_leaves_the_door_locked_between_openings(tmp_path, backend):
    """decision.cooldown_s 0 and an enrolled face in view: a grant on every frame. The door opens
    for at most max_hold_s, then stays locked relay.min_locked_s; each grant in that time is
    audited, and so is the door not opening for it."""
    import edge.camera as camera_mod

    cfg = fake_config(tmp_path)  # every frame decisive, no cooldown
    cfg.camera.source = "opencv"
    cfg.relay.pulse_s, cfg.relay.max_hold_s, cfg.relay.min_locked_s = 0.5, 1.0, 1.0
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE)])
    with simulated_relay(backend, cfg.relay), RelaySpy() as spy, fake_models(), \
            patched(camera_mod, "make_camera", lambda c: device.open()):
        t0 = time.monotonic()
        sigterm_after(5.0)
        assert run_service(cfg, verbose=False) == 0
        t1 = time.monotonic()
    intervals = unlocked_intervals(spy.relay.line, now=t1)
    assert len(intervals) >= 2 and all(held <= 1.0 + TIMER_SLACK_S for _, held in intervals), intervals
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(intervals, intervals[1:])]
    assert all(g >= 1.0 - 0.02 for g in gaps), gaps
    assert sum(held for _, held in intervals) / (t1 - t0) < 0.6  # was 98% before the relock time
    rows = audit_rows(cfg.storage.audit)
    refused = [r for r in rows if (r["kind"], r["reason"]) == ("relay", "not_opened")]
    why = [json.loads(r["details"])["why"] for r in refused]
    assert any(w.startswith("relocking: ") for w in why), why
    assert all(w.startswith(("relocking: ", "locked for shutdown")) for w in why), why  # the frame in flight at SIGTERM
    assert all(r["identity"] == "alice" for r in refused)


class Boom(RuntimeError):
    pass


class ExplodingNotifier(Notifier):
    """Raises out of the service loop while the door is unlocked."""

    def __init__(self, spy):
        super().__init__(address="")
        self.spy = spy

    def watchdog(self, now):
        if self.spy.relays and self.spy.relay.is_unlocked:
            raise Boom("a fault outside the per-frame guard")


def test_exception_out_of_the_loop_locks_and_is_audited(tmp_path, backend):
    import edge.camera as camera_mod

    cfg = fake_config(tmp_path)
    cfg.camera.source = "opencv"
    cfg.relay.pulse_s, cfg.relay.max_hold_s = 20.0, 30.0
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE)])
    with simulated_relay(backend, cfg.relay), RelaySpy() as spy, fake_models(), \
            patched(camera_mod, "make_camera", lambda c: device.open()):
        with pytest.raises(Boom):
            run_service(cfg, verbose=False, notifier=ExplodingNotifier(spy))
    (start, held), = unlocked_intervals(spy.relay.line)
    assert held < 1.0  # locked at once, not at the end of the 20 s pulse
    assert not spy.relay.line.state
    assert audit_rows(cfg.storage.audit)[-1]["reason"] == "stopped"


SIGTERM_CHILD = textwrap.dedent("""
    import json, sys, threading, time
    import edge.camera as camera_mod
    from edge.service import run_service
    from reliability.fakes import *

    from reliability.fake_gpiod import simulated_relay

    cfg = fake_config(sys.argv[1])
    cfg.camera.source = "opencv"
    cfg.relay.pulse_s, cfg.relay.max_hold_s = 20.0, 30.0
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE)])
    with simulated_relay(sys.argv[2], cfg.relay), RelaySpy() as spy, fake_models(), \
            patched(camera_mod, "make_camera", lambda c: device.open()):
        def tell():
            while not (spy.relays and spy.relay.is_unlocked):
                time.sleep(0.01)
            print("UNLOCKED", time.monotonic(), flush=True)
        threading.Thread(target=tell, daemon=True).start()
        rc = run_service(cfg, verbose=False)
    print(json.dumps({"rc": rc, "level": bool(spy.relay.line.state), "intervals": unlocked_intervals(spy.relay.line),
                      "now": time.monotonic()}), flush=True)
""")


def child_mid_pulse(tmp_path, backend) -> subprocess.Popen:
    """The service in a child process, 0.3 s into a long pulse."""
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_CHILD, str(tmp_path), backend], cwd=REPO,
                            stdout=subprocess.PIPE, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    line = proc.stdout.readline()
    assert line.startswith("UNLOCKED"), line
    time.sleep(0.3)
    return proc


def test_sigterm_mid_pulse_locks_and_exits_cleanly(tmp_path, backend):
    proc = child_mid_pulse(tmp_path, backend)
    t_term = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    r = json.loads(out.strip().splitlines()[-1])
    assert r["rc"] == 0 and r["level"] is False
    (start, held), = r["intervals"]
    assert start + held <= t_term + 1.0  # locked on the signal (monotonic is system-wide), not 20 s later
    rows = audit_rows(tmp_path / "audit.sqlite3")
    assert rows[-1]["reason"] == "stopped"


@pytest.mark.parametrize("sig", [signal.SIGABRT, signal.SIGUSR1, signal.SIGALRM, signal.SIGRTMIN],
                         ids=["SIGABRT", "SIGUSR1", "SIGALRM", "SIGRTMIN"])
def test_any_signal_that_would_end_the_gate_mid_pulse_locks_first_and_asks_for_a_restart(tmp_path, sig, backend):
    """SIGABRT is systemd's default watchdog signal; the others end a process that does not handle them."""
    from edge.service import signal_name

    proc = child_mid_pulse(tmp_path, backend)
    t_sig = time.monotonic()
    proc.send_signal(sig)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out  # the process ended by its own hand, not by the signal
    r = json.loads(out.strip().splitlines()[-1])
    assert r["level"] is False
    (start, held), = r["intervals"]
    assert start + held <= t_sig + 1.0  # locked on the signal, not at the end of the 20 s pulse
    assert r["rc"] == 128 + sig  # not a requested stop: Restart=on-failure starts the gate again
    last = audit_rows(tmp_path / "audit.sqlite3")[-1]
    assert (last["reason"], json.loads(last["details"])) == ("stopped", {"signal": signal_name(sig)})


EXIT_CHILD = textwrap.dedent("""
    import atexit, sys
    from edge.config import RelayConfig
    from edge.relay import DoorRelay
    from reliability.fake_gpiod import simulated_relay

    pins = []
    # registered first, so it runs after the relay's own exit handler (atexit is last-in, first-out)
    atexit.register(lambda: print("LEVEL", int(pins[0].state), flush=True))
    cfg = RelayConfig(pulse_s=20.0, max_hold_s=30.0)
    with simulated_relay(sys.argv[2], cfg):
        relay = DoorRelay(cfg)
        pins.append(relay.pin)
        relay.unlock()
        print("UNLOCKED", int(relay.pin.state), flush=True)
        if sys.argv[1] == "exit":
            sys.exit(3)
        raise RuntimeError("unhandled")
""")


@pytest.mark.parametrize("how", ["exit", "exception"])
def test_interpreter_exit_locks(how, backend):
    r = subprocess.run([sys.executable, "-c", EXIT_CHILD, how, backend], cwd=REPO, capture_output=True, text=True,
                       timeout=60, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert r.returncode in (1, 3), r.stderr
    assert r.stdout.split() == ["UNLOCKED", "1", "LEVEL", "0"], (r.stdout, r.stderr)


def test_no_grant_opens_the_door_after_a_shutdown_lock(backend):
    """Regression: SIGTERM locked the relay, but the frame already in flight then granted and the door
    opened again (1-12 ms here, an audit fsync plus close() on a Pi) before the service closed it."""
    from edge.config import RelayConfig
    from edge.relay import DoorRelay
    from reliability.fakes import line_history

    cfg = RelayConfig(pulse_s=5.0, max_hold_s=10.0)
    with simulated_relay(backend, cfg), DoorRelay(cfg) as relay:
        made_at = time.monotonic()
        relay.unlock()
        relay.lock(stay=True)
        assert relay.unlock() is None
        assert not relay.is_unlocked and relay.pin.state is False
        after = [level for t, level in line_history(relay.pin) if t > made_at]
        assert after == [True, False]  # unlocked, locked: nothing after the stop
