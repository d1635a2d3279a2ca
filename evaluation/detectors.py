"""`python -m evaluation detectors`: the face detectors side by side, to pick the default by numbers.

Speed: detect() on one 640x480 frame with a real face (median of >= 200 runs after warm-up).
Recall: the share of LFW images (all 13,233; evaluation only, nothing here is tuned on it) where
the detector finds a face near the image centre, where LFW puts the named person."""
from __future__ import annotations

import json
import time
from pathlib import Path

import cv2
import numpy as np

from edge.atomic import atomic_write_bytes
from edge.detect import load_detector
from edge.errors import FacegateError
from edge.imageio import load_image
from edge.records import Detection

from .timing import median_ms

FRAME_W, FRAME_H = 640, 480
DEFAULT = ("yunet_fp32", "yunet_int8", "blazeface_short", "blazeface_full")
CENTRE_TOLERANCE = 0.2  # of the image's short side: LFW faces are centred to within a few pixels


def in_frame(image: np.ndarray, width: int = FRAME_W, height: int = FRAME_H) -> np.ndarray:
    """The image scaled to fit a width x height frame, centred on grey: a camera frame with the face
    at a door-camera distance."""
    h, w = image.shape[:2]
    f = min(width / w, height / h)
    small = cv2.resize(image, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
    frame = np.full((height, width, 3), 128, np.uint8)
    y, x = (height - small.shape[0]) // 2, (width - small.shape[1]) // 2
    frame[y:y + small.shape[0], x:x + small.shape[1]] = small
    return frame


def centre_found(dets: list[Detection], width: int, height: int, tolerance: float = CENTRE_TOLERANCE) -> bool:
    """Whether any detection's box centre lies within tolerance * short side of the image centre."""
    limit = tolerance * min(width, height)
    return any(np.hypot(d.centre[0] - width / 2, d.centre[1] - height / 2) <= limit for d in dets)


def lfw_images(lfw: Path) -> list[Path]:
    files = sorted((lfw / "images").rglob("*.jpg"))
    if not files:
        raise FacegateError(lfw, "no LFW images found (expected images/<name>/<name>_NNNN.jpg)")
    return files


def measure(cards: list[Path], lfw: Path | None, sample: Path, runs: int = 200, threads=(1,), limit: int = 0,
            progress=None) -> list[dict]:
    frame = in_frame(load_image(sample))
    rows = []
    for c in cards:
        r = {"detector": c.name.replace(".card.json", ""), "faces_in_frame": len(load_detector(c).detect(frame))}
        for t in threads:
            det = load_detector(c, t)
            r[f"ms_{t}t"] = median_ms(lambda: det.detect(frame), runs)
        rows.append(r)
    if lfw is not None:
        files = lfw_images(lfw)
        files = files[:limit] if limit else files
        dets = [load_detector(c) for c in cards]
        found = np.zeros(len(cards), int)
        # One decode per image for all detectors: decoding is most of the time on 250x250 images.
        for i, p in enumerate(files):
            img = load_image(p)
            for j, d in enumerate(dets):
                found[j] += centre_found(d.detect(img), img.shape[1], img.shape[0])
            if progress and (i + 1) % 1000 == 0:
                progress(f"{i + 1}/{len(files)} images: " + ", ".join(f"{r['detector']} {n}" for r, n in zip(rows, found)))
        for r, n in zip(rows, found):
            r.update(lfw_images=len(files), lfw_found=int(n), lfw_found_pct=100.0 * n / len(files))
    return rows


def main(args) -> int:
    models = Path(args.models)
    names = args.detectors.split(",") if args.detectors else [n for n in DEFAULT if (models / f"{n}.card.json").is_file()]
    cards = [models / f"{n}.card.json" for n in names]
    missing = [str(c) for c in cards if not c.is_file()]
    if missing:
        raise FacegateError(missing[0], "detector card missing: run `python -m export build`")
    lfw = Path(args.lfw)
    if not (lfw / "images").is_dir():
        print(f"detectors: {lfw} is absent: speed only, no LFW recall")
        lfw = None
    threads = tuple(int(x) for x in args.threads.split(","))
    t0 = time.monotonic()
    rows = measure(cards, lfw, Path(args.sample), args.runs, threads, args.limit,
                   progress=lambda s: print(f"  [{time.monotonic() - t0:5.0f} s] {s}", flush=True))
    print(f"per {FRAME_W}x{FRAME_H} frame: median of {args.runs} runs after warm-up; LFW: a face within "
          f"{CENTRE_TOLERANCE:.0%} of the short side from the image centre")
    print(f"{'detector':<18}" + "".join(f"{f'ms {t}t':>9}" for t in threads) + f"{'LFW found':>22}")
    for r in rows:
        lfw_txt = f"{r['lfw_found']}/{r['lfw_images']} {r['lfw_found_pct']:6.2f}%" if "lfw_found" in r else "-"
        print(f"{r['detector']:<18}" + "".join(f"{r[f'ms_{t}t']:9.2f}" for t in threads) + f"{lfw_txt:>22}")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())
    return 0

