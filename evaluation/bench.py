"""`python -m evaluation bench`: per-stage and end-to-end latency per 640x480 frame (one face), for the
configured (INT8) models and, as baselines in the same process, the same pipeline with liveness
off and with the fp32 counterparts of the models;
gallery search at 100,000 embeddings; peak RSS. Medians after warm-up, 1 and 2 threads."""
from __future__ import annotations

import itertools
import os
import resource
import time
from pathlib import Path

# The gallery search is timed as the gate runs it (edge/__main__.py): on one BLAS thread. Set
# before numpy is first imported, which `python -m evaluation bench` has not done yet.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np  # noqa: E402

from edge.config import Config
from edge.gallery import Gallery, Person
from edge.liveness import make_liveness
from edge.match import identify
from edge.modelcard import load_card
from edge.pad import SHIPPED_PAD
from edge.search import MIN_ROWS, GalleryIndex
from edge.pipeline import Gate, Stack
from edge.records import Frame

from .timing import CLOCKS, median_ms, timed_runs


def _frames() -> list[np.ndarray]:
    from edge.demo import SAMPLES, fit
    from edge.imageio import load_image

    src = load_image(SAMPLES / "obama2.jpg")
    return [fit(src, zoom=1.4 + 0.01 * (i % 10), dx=2 * (i % 10)) for i in range(10)]


def bench_stack(cfg: Config, threads: int, n: int, warmup: int = 20, clock=time.perf_counter) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.models.threads = threads
    stack = Stack.from_config(cfg)
    g = Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    rng = np.random.default_rng(0)
    for i in range(100):
        g.add(Person(f"p{i}", rng.normal(size=g.dim).astype(np.float32)))
    frames = _frames()
    # The face in the frames is enrolled, so every frame runs every stage and the policy grants
    # (a gate denying the same stranger would soon be in back-off and skip the stages).
    det = stack.detector.detect(frames[0])[0]
    g.add(Person("bench", stack.encoder.embed(stack.encoder.align(frames[0], det)).vector))
    cfg.decision.cooldown_s = 0.0
    cfg.decision.backoff_after = 100  # a denied frame must still run every stage, not sit in back-off
    gate = Gate(cfg, stack, g, liveness=make_liveness(cfg, threads), clock=clock)
    count = itertools.count()

    def one_frame() -> dict:
        i = next(count)
        gate.process(Frame(frames[i % len(frames)], time.monotonic(), time.time(), i))
        return dict(gate.timings)

    stages: dict[str, list[float]] = {}
    for total, timings in timed_runs(one_frame, n, warmup, clock):
        for k, v in {**timings, "end_to_end": total}.items():
            stages.setdefault(k, []).append(v)
    return {k: float(np.median(v) * 1000) for k, v in stages.items()}


def bench_search(k: int = 100_000, dim: int = 128, n: int = 200, clock=time.perf_counter,
                 min_rows: int = MIN_ROWS) -> float:
    """1:N search as the gate's Matcher runs it (edge.search.GalleryIndex, then identify); probes
    are enrolled faces seen again (a row plus noise), so each search has a real best match.
    min_rows=k+1 times the plain float product instead."""
    rng = np.random.default_rng(0)
    m = rng.standard_normal(size=(k, dim), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    names = [f"p{i}" for i in range(k)]
    q = m[rng.integers(0, k, n + 10)] + rng.normal(scale=0.7 / np.sqrt(dim), size=(n + 10, dim)).astype(np.float32)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    index = GalleryIndex(m, 1, min_rows)
    probes = iter(q)
    return median_ms(lambda: identify(index.scores(next(probes)), names, 0.5), n, warmup=10, clock=clock)


def bench_operating_point(table: tuple[list, list], k: int = 100_000, dim: int = 128, n: int = 10,
                          clock=time.perf_counter, shape: float = 0.0) -> float:
    """The gate's own threshold as Matcher computes it at each gallery load and reload
    (edge.threshold.operating_points: the enrolled faces scored against each other, sampled past
    MAX_PAIRS, the tail fitted at the card's `shape`), on k random unit vectors."""
    from edge.config import MatchConfig
    from edge.threshold import operating_points

    rng = np.random.default_rng(1)
    m = rng.standard_normal(size=(k, dim), dtype=np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    return median_ms(lambda: operating_points(MatchConfig(), table, m, shape=shape), n, warmup=1, clock=clock)


def main(args) -> int:
    from edge.config import load_config

    cfg = load_config(args.config)
    base = cfg.model_copy(deep=True)
    for kind in ("detector", "encoder"):
        p = Path(getattr(cfg.models, kind))
        fp32 = p.with_name(p.name.replace("_int8", "_fp32"))
        if fp32 != p and fp32.exists():
            setattr(base.models, kind, str(fp32))
    no_liveness = cfg.model_copy(deep=True)
    no_liveness.liveness.mode = "off"
    threads = [int(t) for t in str(args.threads).split(",")]
    rows = []
    # The same pipeline with liveness off, in the same run: the difference is what liveness costs.
    for label, c in (("default", cfg), ("liveness off", no_liveness), ("fp32 baseline", base)):
        for t in threads:
            # thread CPU time is the cost only where the one inference thread is the caller's
            for kind in ("wall", "cpu") if t == 1 else ("wall",):
                rows.append((label, t, kind, bench_stack(c, t, args.frames, clock=CLOCKS[kind])))
    order = ["detect", "align", "liveness", "embed", "match", "end_to_end"]
    print(f"per 640x480 frame, one face, median of {args.frames} frames after warm-up (ms); "
          f"'cpu' = thread CPU time (the cost on an idle core), 'wall' = elapsed time on this machine now")
    print(f"{'models':<16}{'threads':>8}{'clock':>6}" + "".join(f"{s:>12}" for s in order))
    for label, t, kind, r in rows:
        print(f"{label:<16}{t:>8}{kind:>6}" + "".join(f"{r.get(s, float('nan')):>12.2f}" for s in order))
    for t in threads:
        for kind in ("wall", "cpu"):
            d = next((r for lb, tt, k, r in rows if lb == "default" and tt == t and k == kind), None)
            off = next((r for lb, tt, k, r in rows if lb == "liveness off" and tt == t and k == kind), None)
            b = next((r for lb, tt, k, r in rows if lb == "fp32 baseline" and tt == t and k == kind), None)
            if d and off and cfg.liveness.mode != "off":
                print(f"liveness ({cfg.liveness.mode}), {t} thread(s), {kind}: stage {d['liveness']:.2f} ms; end to end "
                      f"{d['end_to_end']:.2f} vs {off['end_to_end']:.2f} ms with liveness off: "
                      f"+{d['end_to_end'] - off['end_to_end']:.2f} ms per frame")
            if d and b:
                print(f"speed-up of default over fp32, {t} thread(s), {kind}: detect {b['detect'] / d['detect']:.2f}x, "
                      f"embed {b['embed'] / d['embed']:.2f}x, end to end {b['end_to_end'] / d['end_to_end']:.2f}x")
    print(f"models: {Path(cfg.models.detector).name}, {Path(cfg.models.encoder).name}, liveness {cfg.liveness.mode}"
          f"{' (' + Path(cfg.models.liveness or SHIPPED_PAD).name + ')' if cfg.liveness.mode != 'off' else ''}")
    dim = load_card(cfg.models.encoder, verify_file=False)[0].embedding.dim
    wall, cpu = (bench_search(args.gallery_size, dim, clock=CLOCKS[kind]) for kind in ("wall", "cpu"))
    print(f"gallery search (1:N, best + runner-up), {args.gallery_size} enrolled x {dim}-d: {wall:.2f} ms wall, "
          f"{cpu:.2f} ms cpu per query (median of 200)")
    cal = load_card(cfg.models.encoder, verify_file=False)[0].calibration
    for k in (1_680, args.gallery_size):
        wall, cpu = (bench_operating_point((cal.fmr, cal.threshold), k, dim, clock=CLOCKS[kind], shape=cal.tail_shape)
                     for kind in ("wall", "cpu"))
        print(f"the gate's own threshold at a gallery load, {k} enrolled x {dim}-d: {wall:.0f} ms wall, {cpu:.0f} ms cpu "
              f"(median of 10)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0
