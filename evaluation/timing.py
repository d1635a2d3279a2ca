"""How every benchmark here times a call: the median of N runs after a warm-up, in wall time and in
the calling thread's CPU time. Wall time is what a user waits on this machine now; thread CPU time
is what the call costs on an idle core, however busy the machine it is measured on (with one
inference thread the models run on the caller's thread, so its CPU time is theirs)."""
from __future__ import annotations

import time

import numpy as np

# Each pass reads one clock: reading both around one call would put each read in the other's figure.
CLOCKS = {"wall": time.perf_counter, "cpu": time.thread_time}


def timed_runs(fn, runs: int, warmup: int = 10, clock=time.perf_counter) -> list[tuple[float, object]]:
    """(seconds, fn's result) of `runs` calls of fn after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(runs):
        t = clock()
        r = fn()
        out.append((clock() - t, r))
    return out


def median_ms(fn, runs: int, warmup: int = 10, clock=time.perf_counter) -> float:
    return 1000.0 * float(np.median([s for s, _ in timed_runs(fn, runs, warmup, clock)]))

