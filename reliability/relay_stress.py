"""Relay safety under load: the enrolled person stays in view (a grant on nearly every frame, so
grants overlap), while the frame loop stalls at random (sleeps, and busy loops that hold the GIL)
for up to twice the hard maximum. The unlocked time is read from the simulated line's own history
(the line as wired: gpiozero's mock pin, or a fake gpiod chip's line), not from the relay's
bookkeeping. The run ends with SIGTERM, as systemd stops it.

    python -m reliability.relay_stress --seconds 300 [--backend gpiod]
"""
from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

from reliability.fake_gpiod import BACKENDS, simulated_relay
from reliability.fakes import (ALICE, Device, RelaySpy, fake_config, fake_models, patched, sigterm_after,
                               unlocked_intervals, write_gallery)

TIMER_SLACK_S = 0.1  # the timer thread's wake-up latency on a loaded machine


def stall_injector(rng: random.Random, max_hold_s: float, p_stall: float = 0.15):
    """A stage hook: most frames pass; some stall by sleeping, some by spinning in Python."""

    def stall() -> None:
        r = rng.random()
        if r < p_stall / 2:
            time.sleep(rng.uniform(0, 2 * max_hold_s))
        elif r < p_stall:
            end = time.monotonic() + rng.uniform(0, 2 * max_hold_s)
            while time.monotonic() < end:  # holds the GIL in 5 ms slices, as a slow Python stage does
                pass

    return stall


def stress(seconds: float, folder: str | Path, pulse_s: float = 0.5, max_hold_s: float = 1.0, seed: int = 0,
           backend: str = "gpiozero") -> dict:
    import edge.camera as camera_mod
    from edge.service import run_service

    cfg = fake_config(folder)
    cfg.camera.source = "opencv"
    cfg.relay.pulse_s, cfg.relay.max_hold_s = pulse_s, max_hold_s
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE)], fps=30.0)
    rng = random.Random(seed)
    with simulated_relay(backend, cfg.relay), RelaySpy() as spy, fake_models(stall_injector(rng, max_hold_s)), \
            patched(camera_mod, "make_camera", lambda c: device.open()):
        timer = sigterm_after(seconds)
        rc = run_service(cfg, verbose=False)
        timer.cancel()
    relay = spy.relay
    intervals = unlocked_intervals(relay.line)
    longest = max((d for _, d in intervals), default=0.0)
    return {"backend": backend, "seconds": seconds, "rc": rc, "openings": len(intervals),
            "longest_unlocked_s": round(longest, 3), "relay_longest_s": round(relay.stats.longest_unlocked_s, 3),
            "pulse_s": pulse_s, "max_hold_s": max_hold_s,
            "locked_at_exit": not relay.is_unlocked and not relay.line.state}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=300.0)
    p.add_argument("--pulse", type=float, default=0.5)
    p.add_argument("--max-hold", type=float, default=1.0)
    p.add_argument("--backend", choices=BACKENDS, default="gpiozero",
                   help="the simulated relay line: gpiozero's mock pins or a fake gpiod chip")
    p.add_argument("--json")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as d:
        r = stress(args.seconds, d, args.pulse, args.max_hold, backend=args.backend)
    print(json.dumps(r, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    ok = r["longest_unlocked_s"] <= r["max_hold_s"] + TIMER_SLACK_S and r["locked_at_exit"]
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
