"""Soak: the real service (models, replay camera looping the demo frames as fast as the gate takes
them, mock pins, SQLite audit) for N minutes. Reports the RSS slope after warm-up, open file
descriptors, and per-frame latency percentiles in the first and the last minute. Target: no growth.

    nice -n 10 python -m reliability.soak --minutes 30 --json soak.json
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def _pcts(ms: list[float]) -> dict:
    a = np.asarray(ms)
    return {"frames": int(a.size), **{f"p{q}": round(float(np.percentile(a, q)), 1) for q in (50, 95, 99)}} if a.size else {}


def soak(minutes: float, sample_s: float = 10.0, warmup_s: float = 60.0) -> dict:
    from edge.config import load_config
    from edge.demo import demo_frames_dir
    from edge.pipeline import Gate
    from edge.service import run_service
    from reliability.common import default_cards
    from reliability.fakes import RelaySpy, audit_rows, patched, sigterm_after
    from reliability.kill_audit import enroll_demo_people, write_cli_config

    with tempfile.TemporaryDirectory(prefix="fg-soak-") as d:
        config = write_cli_config(Path(d), default_cards(), demo_frames_dir())
        enroll_demo_people(config)
        cfg = load_config(config)
        # every loop of the demo runs every stage and opens the door: no back-off, no cooldown
        cfg.decision.backoff_after, cfg.decision.cooldown_s = 100, 0.0
        lat: list[tuple[float, float]] = []  # (time.monotonic(), ms)
        samples: list[tuple[float, float, int]] = []  # (time.monotonic(), RSS MB, fds)
        process = Gate.process

        def timed(self, frame):
            t = time.perf_counter()
            try:
                return process(self, frame)
            finally:
                lat.append((time.monotonic(), (time.perf_counter() - t) * 1000))

        done = threading.Event()

        def sampler():
            while not done.wait(sample_s):
                samples.append((time.monotonic(), rss_mb(), open_fds()))

        t0 = time.monotonic()
        samples.append((t0, rss_mb(), open_fds()))
        threading.Thread(target=sampler, daemon=True).start()
        with patched(Gate, "process", timed), RelaySpy() as spy:
            sigterm_after(minutes * 60)
            rc = run_service(cfg, verbose=False)
        done.set()
        t1 = time.monotonic()
        samples.append((t1, rss_mb(), open_fds()))
        rows = len(audit_rows(cfg.storage.audit))
        openings = spy.relay.stats.openings
    ts, rss, fds = (np.asarray(x) for x in zip(*samples))
    late = ts - t0 >= warmup_s
    slope = float(np.polyfit((ts[late] - t0) / 3600, rss[late], 1)[0]) if late.sum() >= 3 else None
    return {
        "minutes": round((t1 - t0) / 60, 2), "rc": rc, "frames": len(lat), "fps": round(len(lat) / (t1 - t0), 1),
        "rss_mb_start": round(float(rss[0]), 1), "rss_mb_after_warmup": round(float(rss[late][0]), 1) if late.any() else None,
        "rss_mb_end": round(float(rss[-1]), 1), "rss_slope_mb_per_hour": None if slope is None else round(slope, 2),
        "fds_start": int(fds[0]), "fds_max": int(fds.max()), "fds_end": int(fds[-1]),
        "latency_first_minute_ms": _pcts([ms for t, ms in lat if t - t0 < 60]),
        "latency_last_minute_ms": _pcts([ms for t, ms in lat if t1 - t < 60]),
        "audit_rows": rows, "door_openings": openings,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=30.0)
    p.add_argument("--sample", type=float, default=10.0, help="seconds between RSS / fd samples")
    p.add_argument("--json")
    args = p.parse_args(argv)
    r = soak(args.minutes, args.sample)
    print(json.dumps(r, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["rc"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
