"""`python -m export calibrate`: compare calibration methods, keep the best, write the committed
ranges and threshold tables, rebuild the INT8 models."""
from __future__ import annotations

import json
import random
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.detect import load_detector
from edge.embed import load_encoder
from edge.match import threshold_for_fmr
from edge.modelcard import load_card, write_card

from .build import CALIB_DIR, MODELS_DIR, build
from .calibrate import identity_folder_faces, write_thresholds
from .cards import sface_card, yunet_card
from .prelu import int8_friendly
from .quantize import ArrayReader, detector_reader, encoder_reader, quantize


def _split(faces, seed=0):
    ids = sorted({i for i, _ in faces})
    random.Random(seed).shuffle(ids)
    cal_ids = set(ids[: len(ids) // 2])
    return [c for i, c in faces if i in cal_ids], [c for i, c in faces if i not in cal_ids]


def _kps_error(a, b, images) -> float:
    """Mean keypoint distance (in eye distances) between two detectors' best faces; misses count 1."""
    errs = []
    for img in images:
        da, db = a.detect(img), b.detect(img)
        if not da:
            continue
        if not db:
            errs.append(1.0)
            continue
        ka, kb = da[0].keypoints, db[0].keypoints
        errs.append(float(np.linalg.norm(ka - kb, axis=1).mean() / max(np.linalg.norm(ka[1] - ka[0]), 1.0)))
    return float(np.mean(errs)) if errs else 1.0


def main(args) -> int:
    faces_dir = Path(args.faces)
    CALIB_DIR.mkdir(exist_ok=True)
    t0 = time.time()
    card32, _ = load_card(MODELS_DIR / "sface_fp32.card.json")
    faces = identity_folder_faces(faces_dir, MODELS_DIR / "yunet_fp32.card.json", card32.alignment.template, card32.alignment.size)
    print(f"calibrate: {len(faces)} aligned faces from {faces_dir} in {time.time() - t0:.0f} s")
    if args.thresholds_only:
        _thresholds(faces, faces_dir)
        return 0
    cal, held = _split(faces)
    rng = random.Random(1)
    cal = rng.sample(cal, min(args.limit, len(cal)))
    held = rng.sample(held, min(500, len(held)))
    methods = [m for m in args.methods.split(",") if m]
    report, chosen = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        ready = tmp / "sface_ready.onnx"
        int8_friendly(str(MODELS_DIR / "sface_fp32.onnx"), str(ready))
        fp32 = load_encoder(MODELS_DIR / "sface_fp32.card.json")
        ref = fp32.embed_images(held)
        best = None
        for m in methods:
            cache, out = tmp / f"sface.{m}.json", tmp / f"sface_{m}.onnx"
            quantize(ready, out, m, encoder_reader(card32, "data", cal), cache)
            write_card(sface_card("probe", out, "int8"), out)
            cos = np.sum(load_encoder(out).embed_images(held) * ref, axis=1)
            report[f"sface/{m}"] = {"cos_mean": float(cos.mean()), "cos_p01": float(np.percentile(cos, 1)), "cos_min": float(cos.min())}
            print(f"calibrate: SFace INT8 {m:<10} parity with fp32 on {len(held)} held-out faces: "
                  f"cosine mean {cos.mean():.4f}, 1st pct {np.percentile(cos, 1):.4f}, min {cos.min():.4f}")
            if best is None or cos.mean() > best[0]:
                best = (cos.mean(), m, cache)
        chosen["sface"] = best[1]
        shutil.copy(best[2], CALIB_DIR / "sface.ranges.json")

        ycard, _ = load_card(MODELS_DIR / "yunet_fp32.card.json")
        from edge.imageio import load_image
        from .quantize import list_images

        files = list_images(faces_dir, 300, seed=2)
        imgs = [load_image(p) for p in files[200:300]]
        ydet32 = load_detector(MODELS_DIR / "yunet_fp32.card.json")
        best = None
        for m in methods:
            cache, out = tmp / f"yunet.{m}.json", tmp / f"yunet_{m}.onnx"
            reader = detector_reader(ycard, "input", faces_dir, 200)
            quantize(MODELS_DIR / "yunet_fp32.onnx", out, m, reader, cache)
            write_card(yunet_card("probe", out, "int8"), out)
            err = _kps_error(ydet32, load_detector(out.with_name(out.stem + ".card.json")), imgs)
            report[f"yunet/{m}"] = {"keypoint_error_eye_dist": err}
            print(f"calibrate: YuNet INT8 {m:<10} keypoint error vs fp32: {err:.4f} eye distances")
            if best is None or err < best[0]:
                best = (err, m, cache)
        chosen["yunet"] = best[1]
        shutil.copy(best[2], CALIB_DIR / "yunet.ranges.json")
    atomic_write_bytes(CALIB_DIR / "methods.json", (json.dumps(chosen, indent=1) + "\n").encode())
    atomic_write_bytes(CALIB_DIR / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    build(force=True)
    _thresholds(faces, faces_dir)
    print(f"calibrate: chose {chosen}; done in {time.time() - t0:.0f} s")
    return 0


def _thresholds(faces, faces_dir: Path) -> None:
    for name in ("sface_fp32", "sface_int8"):
        t = write_thresholds(load_encoder(MODELS_DIR / f"{name}.card.json"), faces, CALIB_DIR / f"{name}.thresholds.json",
                             f"celeba subset ({faces_dir.name}), {len(faces)} faces")
        print(f"calibrate: {name}: FMR 1e-3 at cosine {threshold_for_fmr(t['fmr'], t['threshold'], 1e-3):.3f} "
              f"({t['impostor_pairs']} impostor pairs)")
    build(force=True)
