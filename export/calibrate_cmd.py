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
from edge.errors import FacegateError
from edge.match import threshold_for_fmr
from edge.modelcard import load_card, write_card

from .build import CALIB_DIR, MODELS_DIR, build, build_dlib, derived_card
from .calibrate import identity_folder_faces, write_thresholds
from .cards import yunet_card
from .prelu import int8_friendly
from .quantize import detector_reader, encoder_reader, quantize


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


def _encoder_faces(name: str, faces_dir: Path):
    card32, _ = load_card(MODELS_DIR / f"{name}_fp32.card.json")
    return identity_folder_faces(faces_dir, MODELS_DIR / "yunet_fp32.card.json", card32.alignment.template,
                                 card32.alignment.size)


def _calibrate_encoder(name: str, faces, methods: list[str], limit: int, tmp: Path, report: dict) -> tuple[str, Path]:
    """Quantize `name` with each method on crops of half the identities; keep the method whose
    INT8 embeddings stay closest to fp32 on held-out crops of the other half."""
    cal, held = _split(faces)
    rng = random.Random(1)
    cal = rng.sample(cal, min(limit, len(cal)))
    held = rng.sample(held, min(500, len(held)))
    card32, path32 = load_card(MODELS_DIR / f"{name}_fp32.card.json")
    ready = tmp / f"{name}_ready.onnx"
    int8_friendly(str(path32), str(ready))  # PReLU has no INT8 kernel; a no-op for other graphs
    import onnx

    input_name = onnx.load(str(ready)).graph.input[0].name
    ref = load_encoder(MODELS_DIR / f"{name}_fp32.card.json").embed_images(held)
    best = None
    for m in methods:
        cache, out = tmp / f"{name}.{m}.json", tmp / f"{name}_{m}.onnx"
        quantize(ready, out, m, encoder_reader(card32, input_name, cal), cache)
        write_card(derived_card(card32, "probe", out, "int8"), out)
        cos = np.sum(load_encoder(out).embed_images(held) * ref, axis=1)
        report[f"{name}/{m}"] = {"cos_mean": float(cos.mean()), "cos_p01": float(np.percentile(cos, 1)), "cos_min": float(cos.min())}
        print(f"calibrate: {name} INT8 {m:<10} parity with fp32 on {len(held)} held-out faces: "
              f"cosine mean {cos.mean():.4f}, 1st pct {np.percentile(cos, 1):.4f}, min {cos.min():.4f}")
        if best is None or cos.mean() > best[0]:
            best = (cos.mean(), m, cache)
    return best[1], best[2]


def _calibrate_yunet(faces_dir: Path, methods: list[str], tmp: Path, report: dict) -> tuple[str, Path]:
    """YuNet: keep the method whose INT8 keypoints stay closest to fp32's."""
    from edge.imageio import load_image

    from .quantize import list_images

    ycard, _ = load_card(MODELS_DIR / "yunet_fp32.card.json")
    files = list_images(faces_dir, 300, seed=2)
    imgs = [load_image(p) for p in files[200:300]]
    ydet32 = load_detector(MODELS_DIR / "yunet_fp32.card.json")
    best = None
    for m in methods:
        cache, out = tmp / f"yunet.{m}.json", tmp / f"yunet_{m}.onnx"
        quantize(MODELS_DIR / "yunet_fp32.onnx", out, m, detector_reader(ycard, "input", faces_dir, 200), cache)
        write_card(yunet_card("probe", out, "int8"), out)
        err = _kps_error(ydet32, load_detector(out.with_name(out.stem + ".card.json")), imgs)
        report[f"yunet/{m}"] = {"keypoint_error_eye_dist": err}
        print(f"calibrate: YuNet INT8 {m:<10} keypoint error vs fp32: {err:.4f} eye distances")
        if best is None or err < best[0]:
            best = (err, m, cache)
    return best[1], best[2]


def main(args) -> int:
    faces_dir = Path(args.faces)
    models = [m for m in args.models.split(",") if m]
    unknown = set(models) - {"sface", "dlib", "yunet"}
    if unknown:
        raise FacegateError(None, f"--models: unknown {', '.join(sorted(unknown))}; known: sface, dlib, yunet")
    CALIB_DIR.mkdir(exist_ok=True)
    t0 = time.time()
    encoders = [m for m in models if m != "yunet"]
    faces = {}
    for name in encoders:
        faces[name] = _encoder_faces(name, faces_dir)
        print(f"calibrate: {len(faces[name])} faces aligned for {name} from {faces_dir} in {time.time() - t0:.0f} s")
    if not args.thresholds_only:
        methods = [m for m in args.methods.split(",") if m]
        chosen = json.loads((CALIB_DIR / "methods.json").read_text()) if (CALIB_DIR / "methods.json").is_file() else {}
        report = json.loads((CALIB_DIR / "report.json").read_text()) if (CALIB_DIR / "report.json").is_file() else {}
        with tempfile.TemporaryDirectory() as tmp:
            for name in models:
                if name == "yunet":
                    chosen[name], cache = _calibrate_yunet(faces_dir, methods, Path(tmp), report)
                else:
                    chosen[name], cache = _calibrate_encoder(name, faces[name], methods, args.limit, Path(tmp), report)
                shutil.copy(cache, CALIB_DIR / f"{name}.ranges.json")
        atomic_write_bytes(CALIB_DIR / "methods.json", (json.dumps(chosen, indent=1) + "\n").encode())
        atomic_write_bytes(CALIB_DIR / "report.json", (json.dumps(report, indent=1) + "\n").encode())
        _rebuild(encoders)
    for name in encoders:
        _thresholds(name, faces[name], faces_dir)
    _rebuild(encoders)
    print(f"calibrate: {', '.join(models)} done in {time.time() - t0:.0f} s")
    return 0


def _rebuild(encoders: list[str]) -> None:
    build(force=True)
    if "dlib" in encoders:
        build_dlib(force=True)


def _thresholds(name: str, faces, faces_dir: Path) -> None:
    for prec in ("fp32", "int8"):
        t = write_thresholds(load_encoder(MODELS_DIR / f"{name}_{prec}.card.json"), faces,
                             CALIB_DIR / f"{name}_{prec}.thresholds.json", f"celeba subset ({faces_dir.name}), {len(faces)} faces")
        print(f"calibrate: {name}_{prec}: FMR 1e-3 at cosine {threshold_for_fmr(t['fmr'], t['threshold'], 1e-3):.3f} "
              f"({t['impostor_pairs']} impostor pairs)")
