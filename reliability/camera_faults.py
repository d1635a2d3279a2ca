"""Camera faults through the whole service: stall, raise, wrong shape, black, same frame forever.

Each fault runs `edge.service.run_service` (real CameraMonitor, threaded camera adapter, relay on
mock pins, SQLite audit, sd_notify to a fake NOTIFY_SOCKET) with the fake model stack, on a device
that gives good frames of an enrolled person, then the fault, then good frames again. Measured:
the delay from the fault to its audit events (fault:<class>, offline:<class>), watchdog pings and
door openings while the fault lasts (both must be none), reconnect attempts and their spacing, and
recovery (online again, pings again).

    python -m reliability.camera_faults            # the defaults the gate ships with
    python -m reliability.camera_faults --json out.json
"""
from __future__ import annotations

import argparse
import functools
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from reliability.fakes import (ALICE, Device, NotifySocket, RelaySpy, audit_rows, fake_config, fake_models,
                               patched, sigterm_after, unlocked_intervals, write_gallery)

FAULTS = {
    "stall": ("stall",),
    "raise": ("raise",),
    "shape": ("shape",),
    "black": ("black",),
    "frozen": ("frozen", ALICE),
    "frozen2": ("cycle", ALICE, 2),  # a stuck driver re-delivering its two buffers in turn
}
SLACK_S = 0.3  # a frame grabbed just before the fault may still be processed just after it


def run_fault(kind: str, folder: str | Path, good_s: float = 1.5, fault_s: float = 12.0, recover_s: float = 2.0,
              offline_after_s: float = 5.0, read_timeout_s: float = 2.0, backoff_s: float = 1.0,
              frozen_after_s: float | None = None, pulse_s: float = 1.0, max_hold_s: float = 2.0) -> dict:
    """One fault through run_service; returns the measurements (times in seconds)."""
    import edge.camera as camera_mod
    from edge.service import Notifier, run_service

    folder = Path(folder)
    cfg = fake_config(folder)
    cfg.camera.source = "opencv"  # a live source; make_camera is replaced by the fake device
    cfg.camera.offline_after_s, cfg.camera.read_timeout_s = offline_after_s, read_timeout_s
    cfg.camera.reconnect_backoff_s = backoff_s
    cfg.relay.pulse_s, cfg.relay.max_hold_s = pulse_s, max_hold_s
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE), (good_s, *FAULTS[kind]), (good_s + fault_s, "ok", ALICE)])
    sock = NotifySocket()
    monitor = camera_mod.CameraMonitor
    if frozen_after_s is not None:
        monitor = functools.partial(camera_mod.CameraMonitor, frozen_after_s=frozen_after_s)
    try:
        with RelaySpy() as spy, fake_models(), patched(camera_mod, "make_camera", lambda c: device.open()), \
                patched(camera_mod, "CameraMonitor", monitor):
            timer = sigterm_after(good_s + fault_s + recover_s)
            device.t0 = time.monotonic()
            rc = run_service(cfg, verbose=False, notifier=Notifier(sock.path))
            timer.cancel()
    finally:
        sock.close()
    t_fault, t_back = device.t0 + good_s, device.t0 + good_s + fault_s
    rows = audit_rows(cfg.storage.audit)
    events = [(r["reason"], r["t_mono"]) for r in rows if r["kind"] == "camera"]

    def first(prefix: str, after: float) -> float | None:
        return next((t for reason, t in events if reason.startswith(prefix) and t >= after), None)

    t_fault_ev, t_offline, t_online = first("fault:", t_fault), first("offline:", t_fault), first("online", t_back)
    pings = sock.pings()
    end_of_fault = t_online if t_online is not None else t_back
    # the frame in flight when the fault began was captured before it: allow two loop periods
    before = np.diff([t for t in pings if t < t_fault])
    slack = max(SLACK_S, 2 * float(np.median(before))) if before.size else SLACK_S
    opens = [t for t in device.opens if t_fault <= t < end_of_fault]
    unlocked = unlocked_intervals(spy.relay.line)
    return {
        "fault": kind,
        "rc": rc,
        "fault_event": next((r for r, t in events if r.startswith("fault:") and t >= t_fault), None),
        "offline_event": next((r for r, t in events if r.startswith("offline:") and t >= t_fault), None),
        "detect_delay_s": None if t_fault_ev is None else round(t_fault_ev - t_fault, 3),
        "offline_delay_s": None if t_offline is None else round(t_offline - t_fault, 3),
        "offline_after_s": offline_after_s,
        "pings_before_fault": sum(1 for t in pings if t < t_fault),
        "pings_during_fault": sum(1 for t in pings if t_fault + slack < t < end_of_fault),
        "pings_after_recovery": sum(1 for t in pings if t >= end_of_fault),
        "openings_during_fault": sum(1 for s, _ in unlocked if t_fault + slack < s < end_of_fault),
        "locked_after_fault_s": round(max([s + d - t_fault for s, d in unlocked if s <= t_fault + slack] + [0.0]), 3),
        "slack_s": round(slack, 3),
        "reconnects": len(opens),
        "reconnect_gaps_s": [round(b - a, 2) for a, b in zip(opens, opens[1:])],
        "online_after_fault_s": None if t_online is None else round(t_online - t_back, 3),
        "door_locked_at_exit": not spy.relay.is_unlocked,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--faults", default=",".join(FAULTS))
    p.add_argument("--fault-s", type=float, default=12.0, help="how long each fault lasts")
    p.add_argument("--recover-s", type=float, default=20.0,
                   help="time given to come back (the back-off has grown during the fault)")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    results = []
    for kind in args.faults.split(","):
        with tempfile.TemporaryDirectory() as d:
            r = run_fault(kind, d, fault_s=args.fault_s, recover_s=args.recover_s)
        results.append(r)
        print(f"{kind:7s} first event {r['fault_event']} after {r['detect_delay_s']} s, {r['offline_event']} after "
              f"{r['offline_delay_s']} s (limit {r['offline_after_s']}), pings during fault {r['pings_during_fault']}, "
              f"openings during fault {r['openings_during_fault']}, door locked {r['locked_after_fault_s']} s after "
              f"the fault, reconnects {r['reconnects']} gaps {r['reconnect_gaps_s']}, online again "
              f"{r['online_after_fault_s']} s after the device recovered", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    bad = [r["fault"] for r in results if r["offline_delay_s"] is None or r["offline_delay_s"] > r["offline_after_s"] + SLACK_S
           or r["pings_during_fault"] or r["openings_during_fault"] or r["online_after_fault_s"] is None]
    print("FAIL: " + ", ".join(bad) if bad else "all faults: offline in time, no pings, door locked, recovered")
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
