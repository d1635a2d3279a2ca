"""`python -m edge bench`: per-stage and end-to-end latency per 640x480 frame (one face), for the
configured (INT8) models and, as the baseline in the same process, their fp32 counterparts;
gallery search at 100,000 embeddings; peak RSS. Medians after warm-up, 1 and 2 threads."""
from __future__ import annotations

import resource
import time
from pathlib import Path

import numpy as np

from .config import Config, MODELS
from .gallery import Gallery, Person
from .match import cosine_scores, identify
from .pipeline import Gate, Stack
from .records import Frame


def _frames() -> list[np.ndarray]:
    from .demo import SAMPLES, fit
    from .imageio import load_image

    src = load_image(SAMPLES / "obama2.jpg")
    return [fit(src, zoom=1.0 + 0.01 * (i % 10), dx=2 * (i % 10)) for i in range(10)]


def bench_stack(cfg: Config, threads: int, n: int, warmup: int = 20) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.models.threads = threads
    stack = Stack.from_config(cfg)
    g = Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    rng = np.random.default_rng(0)
    for i in range(100):
        g.add(Person(f"p{i}", rng.normal(size=g.dim).astype(np.float32)))
    cfg.match.threshold = 0.5
    gate = Gate(cfg, stack, g)
    frames = _frames()
    stages: dict[str, list[float]] = {}
    for i in range(warmup + n):
        img = frames[i % len(frames)]
        t0 = time.perf_counter()
        gate.process(Frame(img, time.monotonic(), time.time(), i))
        total = time.perf_counter() - t0
        if i >= warmup:
            for k, v in {**gate.timings, "end_to_end": total}.items():
                stages.setdefault(k, []).append(v)
    return {k: float(np.median(v) * 1000) for k, v in stages.items()}


def bench_search(k: int = 100_000, dim: int = 128, n: int = 200) -> float:
    rng = np.random.default_rng(0)
    m = rng.normal(size=(k, dim)).astype(np.float32)
    m /= np.linalg.norm(m, axis=1, keepdims=True)
    names = [f"p{i}" for i in range(k)]
    q = rng.normal(size=(n + 10, dim)).astype(np.float32)
    ts = []
    for i in range(n + 10):
        t0 = time.perf_counter()
        identify(cosine_scores(m, q[i]), names, 0.5)
        ts.append(time.perf_counter() - t0)
    return float(np.median(ts[10:]) * 1000)


def main(args) -> int:
    from .__main__ import _cfg

    cfg = _cfg(args)
    base = cfg.model_copy(deep=True)
    for kind in ("detector", "encoder"):
        p = Path(getattr(cfg.models, kind))
        fp32 = p.with_name(p.name.replace("_int8", "_fp32"))
        if fp32 != p and fp32.exists():
            setattr(base.models, kind, str(fp32))
    threads = [int(t) for t in str(args.threads).split(",")]
    rows = []
    for label, c in (("default", cfg), ("fp32 baseline", base)):
        for t in threads:
            r = bench_stack(c, t, args.frames)
            rows.append((label, t, r))
    order = ["detect", "align", "liveness", "embed", "match", "end_to_end"]
    print(f"per 640x480 frame, one face, median of {args.frames} frames after warm-up (ms)")
    print(f"{'models':<16}{'threads':>8}" + "".join(f"{s:>12}" for s in order))
    for label, t, r in rows:
        print(f"{label:<16}{t:>8}" + "".join(f"{r.get(s, float('nan')):>12.2f}" for s in order))
    for t in threads:
        d = next(r for lb, tt, r in rows if lb == "default" and tt == t)
        b = next(r for lb, tt, r in rows if lb != "default" and tt == t)
        print(f"speed-up of default over fp32 at {t} thread(s): detect {b['detect'] / d['detect']:.2f}x, "
              f"embed {b['embed'] / d['embed']:.2f}x, end to end {b['end_to_end'] / d['end_to_end']:.2f}x")
    print(f"models: {Path(cfg.models.detector).name}, {Path(cfg.models.encoder).name}")
    ms = bench_search(args.gallery_size)
    print(f"gallery search, {args.gallery_size} enrolled x 128-d: {ms:.2f} ms per query (median of 200)")
    print(f"peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    return 0
