"""`python -m evaluation encoders`: per-face latency of every encoder artifact (median of >= 100 runs
after warm-up, 1 and 2 threads, one aligned crop per run as the gate runs it) and file size,
with the fp32 / INT8 ratios. Speed is measured here, never in tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.embed import load_encoder

from .embeddings import subject_face
from .timing import CLOCKS, median_ms
from .verify import encoder_cards


def face_for(enc, detector, image: np.ndarray | None):
    """The encoder's aligned face (each member's view for a fusion) from a real face where a sample
    image with one is at hand, else a fixed pattern (the latency of these models does not depend
    on pixel values)."""
    from edge.records import AlignedFace

    det = subject_face(detector, image) if image is not None else None
    if det is not None:
        return enc.align(image, det)
    cards = [m.card for m in enc.members] if hasattr(enc, "members") else [enc.card]
    views = tuple((np.arange(c.alignment.size[0] * c.alignment.size[1] * 3) % 251).astype(np.uint8)
                  .reshape(c.alignment.size[1], c.alignment.size[0], 3) for c in cards)
    return AlignedFace(image=views[0], detection=None, views=views if len(views) > 1 else ())


def bench(models_dir: Path, detector_card: Path, runs: int = 100, threads=(1, 2), sample: Path | None = None) -> list[dict]:
    from edge.detect import load_detector
    from edge.imageio import load_image

    detector = load_detector(detector_card)
    image = load_image(sample) if sample is not None and sample.is_file() else None
    rows = []
    for card_path in encoder_cards(models_dir):
        r = {"artifact": card_path.name.replace(".card.json", "")}
        for t in threads:
            enc = load_encoder(card_path, t)
            face = face_for(enc, detector, image)
            # A fusion's files are its members' models (the recipe is a few hundred bytes).
            size = sum(m.card.size_bytes for m in enc.members) if hasattr(enc, "members") else enc.card.size_bytes
            r["precision"], r["size_bytes"] = enc.card.precision, size
            r[f"ms_{t}t"] = median_ms(lambda: enc.embed(face), runs)
            if t == 1:  # one inference thread runs on the caller's: its CPU time is the idle-core cost
                r["cpu_ms_1t"] = median_ms(lambda: enc.embed(face), runs, clock=CLOCKS["cpu"])
        rows.append(r)
    by = {r["artifact"]: r for r in rows}
    for r in rows:
        if r["precision"] == "int8":
            ref = by.get(r["artifact"].replace("_tflite", "").replace("int8", "fp32"))  # same encoder's fp32 ONNX
            if ref:
                r["speedup_vs_fp32_1t"] = ref["ms_1t"] / r["ms_1t"] if "ms_1t" in r and "ms_1t" in ref else None
                if "cpu_ms_1t" in r and "cpu_ms_1t" in ref:
                    r["cpu_speedup_vs_fp32_1t"] = ref["cpu_ms_1t"] / r["cpu_ms_1t"]
                r["size_ratio_vs_fp32"] = ref["size_bytes"] / r["size_bytes"]
    return rows


def main(args) -> int:
    threads = tuple(int(x) for x in args.threads.split(","))
    rows = bench(Path(args.models), Path(args.detector), args.runs, threads, Path(args.sample) if args.sample else None)
    head = (f"{'artifact':<18} {'MB':>7} " + " ".join(f"{f'ms {t}t':>8}" for t in threads)
            + f" {'cpu 1t':>8}  fp32/INT8 speed (wall, cpu), size")
    print(f"per-face latency, median of {args.runs} runs after warm-up")
    print(head)
    for r in rows:
        ratio = (f"  {r['speedup_vs_fp32_1t']:.2f}x, {r.get('cpu_speedup_vs_fp32_1t', float('nan')):.2f}x, "
                 f"{r['size_ratio_vs_fp32']:.2f}x" if r.get("size_ratio_vs_fp32") else "")
        print(f"{r['artifact']:<18} {r['size_bytes'] / 1e6:7.2f} " + " ".join(f"{r[f'ms_{t}t']:8.2f}" for t in threads)
              + f" {r.get('cpu_ms_1t', float('nan')):8.2f}" + ratio)
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(rows, indent=1) + "\n").encode())
    return 0
