"""`python -m train liveness-eval`: ISO/IEC 30107-3 figures on the NUAA test split.

APCER (print: every NUAA attack is a printed photo; there is no screen attack in NUAA), BPCER and
ACER at the operating point, per frame and per sequence, for our PAD model, the two Silent-Face
MiniFASNet baselines (and their mean, as Silent-Face fuses them), and the gate's whole liveness
policy run over each sequence in frame order. Face boxes come from the gate's own detector for
every model (the baselines were built around a RetinaFace box: a known difference).

Per sequence, a door's view: the policy judges each frame on the mean score of the track's last
`frames` frames, and a sequence is accepted as live when any of its frames is. So an attack
sequence counts against APCER if it ever passes, a live one against BPCER if it never does;
the sequence score for the DET curve is the highest window mean."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.metrics import det_points, share_at_least
from edge.modelcard import Card, InputSpec, LivenessSpec, SourceSpec, sha256_file
from edge.pad import FACE_MESH, SHIPPED_PAD, FaceMesh, PadModel, PadPolicy, load_pad
from edge.records import Detection

from .data import read_image
from .liveness import ATTACK, LIVE, detect_all, nuaa_items, sequences

BASELINES = {"MiniFASNetV2": ("MiniFASNetV2.onnx", 2.7), "MiniFASNetV1SE": ("MiniFASNetV1SE.onnx", 4.0)}
BASELINE_THRESHOLD = 0.5  # Silent-Face's own rule: live when the live class wins the (fused) softmax


def baseline_model(folder: Path, name: str) -> PadModel:
    """A ../shared baseline fed as its source code feeds it: 80x80 BGR 0..255, no mean/std, class 1
    live, crop at its scale. The card is built here; baselines are evaluated, never shipped."""
    file, scale = BASELINES[name]
    path = folder / file
    card = Card(name=name, task="liveness", file=file, sha256=sha256_file(path), size_bytes=path.stat().st_size,
                runtime="onnxruntime", precision="fp32", input=InputSpec(width=80, height=80, color="BGR", layout="NCHW"),
                liveness=LivenessSpec(crop_scale=scale, live_class=1, threshold=BASELINE_THRESHOLD),
                source=SourceSpec(package="Silent-Face-Anti-Spoofing", version="b6d5f04", file=file, license="Apache-2.0",
                                  notes="baseline only (../shared/models/MODELS.txt)"))
    return PadModel(card, path, threads=2)


def rates(live, attack, threshold: float) -> dict:
    """APCER, BPCER, ACER at `threshold` (live when score >= threshold; NaN = no face: never live)."""
    apcer = float(share_at_least(attack, [threshold])[0])
    bpcer = float(1.0 - share_at_least(live, [threshold])[0])
    return {"apcer_print": round(apcer, 4), "bpcer": round(bpcer, 4), "acer": round((apcer + bpcer) / 2, 4),
            "n_live": int(np.size(live)), "n_attack": int(np.size(attack))}


def apcer_at_bpcer(live, attack, bpcer: float) -> float:
    """A posteriori (threshold set on these very scores): for comparing models, not an operating point."""
    far, frr, _ = det_points(live, attack)
    ok = frr <= bpcer + 1e-12
    return float(far[ok].min()) if ok.any() else 1.0


def window_means(scores: np.ndarray, frames: int) -> np.ndarray:
    """Mean of each frame's score with the previous ones, up to `frames`; frames without a face
    (NaN) are skipped, as the gate gets no score for them."""
    out = np.full(len(scores), np.nan)
    recent: list[float] = []
    for i, s in enumerate(scores):
        if np.isnan(s):
            continue
        recent = (recent + [float(s)])[-frames:]
        out[i] = float(np.mean(recent))
    return out


def sequence_scores(frame_scores: np.ndarray, seqs: dict[str, list[int]], frames: int) -> dict[str, float]:
    """Highest window mean of each sequence (NaN when no frame had a face)."""
    out = {}
    for name, idx in seqs.items():
        w = window_means(frame_scores[idx], frames)
        out[name] = float(np.nanmax(w)) if np.isfinite(w).any() else float("nan")
    return out


def _split(scores: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    live = np.array([v for k, v in scores.items() if k.startswith("live/")])
    attack = np.array([v for k, v in scores.items() if not k.startswith("live/")])
    return live, attack


def model_report(scores: np.ndarray, labels: np.ndarray, seqs, frames: int, threshold: float) -> dict:
    live, attack = scores[labels == LIVE], scores[labels == ATTACK]
    seq_live, seq_attack = _split(sequence_scores(scores, seqs, frames))
    return {"threshold": threshold,
            "frame": {**rates(live, attack, threshold), "apcer_at_bpcer5_aposteriori": round(apcer_at_bpcer(live, attack, 0.05), 4)},
            "sequence": {**rates(seq_live, seq_attack, threshold),
                         "apcer_at_bpcer5_aposteriori": round(apcer_at_bpcer(seq_live, seq_attack, 0.05), 4)},
            "_curves": {"frame": det_points(live, attack)[:2], "sequence": det_points(seq_live, seq_attack)[:2]}}


def policy_report(root: Path, items, faces: dict, seqs, pad: PadModel, threshold: float, frames: int) -> dict:
    """The gate's own PadPolicy over each sequence in frame order, in mode passive+blink: how often
    a blink or non-planar motion is seen, and the sequence figures with the cue required."""
    mesh = FaceMesh(FACE_MESH, threads=2)
    per_seq = {}
    for name, idx in seqs.items():
        policy = PadPolicy(pad, threshold, frames, mesh, require_cue=True)
        live_any, blink, motion, reasons = False, False, False, []
        for k, i in enumerate(idx):
            f = faces.get(items[i].path)
            if f is None:
                continue
            det = Detection(tuple(f["box"]), np.asarray(f["kps"], np.float32), f["score"])
            r = policy.assess(read_image(root / items[i].path), det, 1, float(k))
            live_any |= r.live
            blink |= r.cues["blinks"] > 0
            motion |= r.cues["motion_frames"] >= 2
            reasons.append(r.reason)
        per_seq[name] = {"live": live_any, "blink": blink, "motion": motion, "frames": len(idx),
                         "last_reason": reasons[-1] if reasons else "no_face"}
    live_seqs = [v for k, v in per_seq.items() if k.startswith("live/")]
    att_seqs = [v for k, v in per_seq.items() if not k.startswith("live/")]
    share = lambda xs, key: round(float(np.mean([x[key] for x in xs])), 4) if xs else None
    apcer, bpcer = share(att_seqs, "live"), 1.0 - share(live_seqs, "live")
    return {"mode": "passive+blink", "threshold": threshold, "frames": frames,
            "sequence": {"apcer_print": apcer, "bpcer": round(bpcer, 4), "acer": round((apcer + bpcer) / 2, 4),
                         "n_live": len(live_seqs), "n_attack": len(att_seqs)},
            "cue_seen": {"live_blink": share(live_seqs, "blink"), "live_motion": share(live_seqs, "motion"),
                         "attack_blink": share(att_seqs, "blink"), "attack_motion": share(att_seqs, "motion")},
            "per_sequence": per_seq}


def evaluate(nuaa: str | Path, detector_card: str, pad_card: str | None, baselines: str | Path, frames: int,
             threshold: float | None, out: str | Path) -> dict:
    root, out = Path(nuaa), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_items = nuaa_items(root)
    faces = detect_all(root, all_items, detector_card, out / "faces.json")
    items = [it for it in all_items if it.split == "test"]
    labels = np.array([it.label for it in items])
    seqs = sequences(items)
    ours = load_pad(pad_card or SHIPPED_PAD, threads=2)
    t_ours = ours.spec.threshold if threshold is None else threshold
    models = {"ours": ours}
    bdir = Path(baselines)
    for name, (file, _) in BASELINES.items():
        if (bdir / file).is_file():
            models[name] = baseline_model(bdir, name)
    scores = {name: np.full(len(items), np.nan) for name in models}
    for i, it in enumerate(items):
        f = faces.get(it.path)
        if f is None:
            continue
        img = read_image(root / it.path)
        for name, m in models.items():
            scores[name][i] = m.score(img, f["box"])
    if {"MiniFASNetV2", "MiniFASNetV1SE"} <= set(scores):
        scores["MiniFASNet fused"] = (scores["MiniFASNetV2"] + scores["MiniFASNetV1SE"]) / 2
    report = {"test_frames": {"live": int((labels == LIVE).sum()), "print": int((labels == ATTACK).sum())},
              "no_face": int(sum(faces.get(it.path) is None for it in items)),
              "sequences": {"live": sum(k.startswith("live/") for k in seqs), "print": sum(k.startswith("print/") for k in seqs)},
              "pad_card": ours.card.name, "frames": frames, "models": {}}
    for name, s in scores.items():
        report["models"][name] = model_report(s, labels, seqs, frames, t_ours if name == "ours" else BASELINE_THRESHOLD)
    report["policy_passive+blink"] = policy_report(root, items, faces, seqs, ours, t_ours, frames)
    _plot(report, out / "det.png")
    for m in report["models"].values():
        del m["_curves"]  # arrays: in the PNG, not the JSON
    report["det_png"] = str(out / "det.png")
    atomic_write_bytes(out / "eval.json", json.dumps(report, indent=1).encode())
    return report


def _plot(report: dict, path: Path) -> None:
    from edge.plots import det_plot

    curves = {}
    for name, r in report["models"].items():
        for level in ("frame", "sequence"):
            curves[f"{name} ({level})"] = r["_curves"][level]
    det_plot(curves, path, title="PAD on NUAA test (print attacks)", xlabel="APCER (print)", ylabel="BPCER",
             marks={"APCER 2%": 0.02})


def summary(r: dict) -> str:
    lines = [f"NUAA test: {r['test_frames']['live']} live + {r['test_frames']['print']} print frames "
             f"({r['no_face']} without a face), {r['sequences']['live']} live + {r['sequences']['print']} print "
             f"sequences; policy window {r['frames']} frames",
             f"{'model':<18} {'thr':>6}  {'frame APCER/BPCER/ACER':>24}  {'seq APCER/BPCER/ACER':>22}  "
             f"{'APCER@BPCER5 a-post. frame/seq':>30}"]
    for name, m in r["models"].items():
        f, s = m["frame"], m["sequence"]
        lines.append(f"{name:<18} {m['threshold']:>6.3f}  {f['apcer_print']:>8.2%} {f['bpcer']:>7.2%} {f['acer']:>7.2%}  "
                     f"{s['apcer_print']:>7.2%} {s['bpcer']:>6.2%} {s['acer']:>7.2%}  "
                     f"{f['apcer_at_bpcer5_aposteriori']:>14.2%} {s['apcer_at_bpcer5_aposteriori']:>7.2%}")
    p = r["policy_passive+blink"]
    s, c = p["sequence"], p["cue_seen"]
    lines.append(f"policy passive+blink (ours, per sequence): APCER {s['apcer_print']:.2%} BPCER {s['bpcer']:.2%} "
                 f"ACER {s['acer']:.2%}; cue seen on live seqs: blink {c['live_blink']:.0%} motion {c['live_motion']:.0%}, "
                 f"on print seqs: blink {c['attack_blink']:.0%} motion {c['attack_motion']:.0%}")
    lines.append(f"DET curves: {r['det_png']}")
    return "\n".join(lines)
