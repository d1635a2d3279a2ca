"""Crowds: per-frame time of the whole gate on 640x480 frames holding 0, 1, 2, 5 and 20 real faces
(the sample photos' faces, cut out and pasted on a grey scene; 20 faces are ~70 px each).

    python -m reliability.crowd_bench --frames 30
"""
from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections import Counter
from pathlib import Path

import cv2
import numpy as np

from reliability.common import SAMPLES, default_cards, models_config

W, H = 640, 480
FACE_PHOTOS = ("obama2.jpg", "biden.jpg", "obama3.jpg", "astronaut.png", "obama.jpg")
COUNTS = (0, 1, 2, 5, 20)


def face_crops(detector, photos=FACE_PHOTOS) -> dict[str, np.ndarray]:
    """Each photo's largest face with a margin (1.8x the box), as a square crop."""
    from edge.imageio import load_image

    out = {}
    for name in photos:
        img = load_image(SAMPLES / name)
        d = max(detector.detect(img), key=lambda d: d.size)
        cx, cy = d.centre
        half = 0.9 * max(d.box[2], d.box[3])
        x0, y0 = int(max(cx - half, 0)), int(max(cy - half, 0))
        x1, y1 = int(min(cx + half, img.shape[1])), int(min(cy + half, img.shape[0]))
        out[name] = img[y0:y1, x0:x1].copy()
    return out


def compose(items, w: int = W, h: int = H) -> np.ndarray:
    """items: (crop, side in pixels, (cx, cy)) pasted on a grey scene, in order."""
    frame = np.full((h, w, 3), 96, np.uint8)
    for crop, side, (cx, cy) in items:
        side = int(side)
        face = cv2.resize(crop, (side, side), interpolation=cv2.INTER_AREA)
        x0, y0 = int(cx - side / 2), int(cy - side / 2)
        xs, ys = max(x0, 0), max(y0, 0)
        xe, ye = min(x0 + side, w), min(y0 + side, h)
        frame[ys:ye, xs:xe] = face[ys - y0:ye - y0, xs - x0:xe - x0]
    return frame


def grid_frame(crops: list[np.ndarray], n: int, rng: np.random.Generator) -> np.ndarray:
    """n faces on a grid that fills the frame, each jittered inside its cell."""
    if n == 0:
        return compose([])
    cols = math.ceil(math.sqrt(n * W / H))
    rows = math.ceil(n / cols)
    cw, ch = W / cols, H / rows
    side = min(0.8 * min(cw, ch), 220)
    items = []
    for i in range(n):
        r, c = divmod(i, cols)
        jx, jy = rng.uniform(-0.05, 0.05, 2) * (cw, ch)
        items.append((crops[i % len(crops)], side, ((c + 0.5) * cw + jx, (r + 0.5) * ch + jy)))
    return compose(items)


def bench(frames: int = 30, seed: int = 0) -> list[dict]:
    from edge import gallery as G
    from edge.pipeline import Gate, Stack
    from edge.records import Frame

    cfg = models_config(default_cards())
    stack = Stack.from_config(cfg)
    crops = list(face_crops(stack.detector).values())
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    rng = np.random.default_rng(seed)
    out = []
    with tempfile.TemporaryDirectory():
        cfg.decision.backoff_after = 100  # back-off would skip the embedding this bench means to time
        for policy in ("largest", "deny"):
            cfg.decision.crowd_policy = policy
            for n in COUNTS:
                gate = Gate(cfg, stack, g)
                times, found, why = [], [], Counter()
                for i in range(frames):
                    img = grid_frame(crops, n, rng)
                    t = time.perf_counter()
                    d = gate.process(Frame(img, time.monotonic(), time.time(), i, f"crowd{n}"))
                    times.append(time.perf_counter() - t)
                    why[d.reason] += 1
                    found.append(len(stack.detector.detect(img)))
                ms = np.array(times) * 1000
                out.append({"policy": policy, "faces": n, "found_median": int(np.median(found)),
                            "ms_median": round(float(np.median(ms)), 1), "ms_p95": round(float(np.percentile(ms, 95)), 1),
                            "ms_max": round(float(ms.max()), 1), "reasons": dict(why)})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=30, help="frames per face count")
    p.add_argument("--json")
    args = p.parse_args(argv)
    rows = bench(args.frames)
    print(f"{'policy':8s} {'faces':>5s} {'found':>5s} {'median ms':>9s} {'p95 ms':>7s} {'max ms':>7s}")
    for r in rows:
        print(f"{r['policy']:8s} {r['faces']:5d} {r['found_median']:5d} {r['ms_median']:9.1f} {r['ms_p95']:7.1f} "
              f"{r['ms_max']:7.1f}  {r['reasons']}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
