"""`python -m evaluation liveness`: ISO/IEC 30107-3 figures of the gate's liveness on the NUAA test
split, and how it scores simulated print and screen attacks built from the registry photos.

Reported, per frame and per sequence (one recording: subject, glasses, position, session), at an
operating point fixed beforehand:
- the shipped PAD model (its card's threshold, set on the NUAA train split by `threshold_rule`);
- each of its members alone and their plain mean at Silent-Face's own rule (live when the live
  class wins the softmax, 0.5): the baselines;
- any other PAD card given (for example one trained by `python -m train liveness`);
- the gate's whole liveness policy (`edge.pad.PadPolicy`) run over every sequence in frame order,
  in the shipped mode (passive) and with a blink-or-motion cue required (passive+blink).
Per sequence, a door's view: the policy judges each frame on the mean of the track's last
`frames` scores, and a sequence is accepted as live when any of its frames is, so an attack
sequence counts against APCER if it ever passes and a live one against BPCER if it never does.
Every NUAA attack is a printed photo; NUAA has no screen replay, so screens are only simulated
(edge/spoof.py), and those figures describe the model's reaction to the simulation, not to real
attacks. Face boxes come from the gate's own detector for every model."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.imageio import load_image
from edge.pad import FACE_MESH, SHIPPED_PAD, FaceMesh, PadFusion, PadPolicy, load_pad
from edge.records import Detection

from .embeddings import subject_face
from .metrics import det_points, share_at_least
from .nuaa import ATTACK, LIVE, detect_all, nuaa_items, read_frame, sequences, threshold_at_bpcer, window_means

SILENT_FACE_THRESHOLD = 0.5  # Silent-Face's own rule: live when the live class wins the (fused) softmax
OPERATING_BPCER = 0.05  # the operating point the gate is held to: APCER at BPCER <= 5%
REGISTRY_PHOTOS = ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "astronaut.png")


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


def sequence_scores(frame_scores: np.ndarray, seqs: dict[str, list[int]], frames: int) -> dict[str, float]:
    """Highest window mean of each sequence (NaN when no frame had a face)."""
    out = {}
    for name, idx in seqs.items():
        w = window_means(frame_scores[idx], frames)
        out[name] = float(np.nanmax(w)) if np.isfinite(w).any() else float("nan")
    return out


def train_threshold(scores: np.ndarray, labels: np.ndarray, seqs: dict[str, list[int]], frames: int,
                    bpcer: float = OPERATING_BPCER) -> float:
    """The operating threshold from the train split: the highest that rejects at most `bpcer` of
    the live windows the gate judges (each live frame's mean with the previous `frames` - 1 of its
    sequence). The strictest threshold the BPCER budget allows, since a print let in is worse at a
    door than a live person asked to look again."""
    live_windows = []
    for idx in seqs.values():
        if labels[idx[0]] == LIVE:
            w = window_means(scores[idx], frames)
            live_windows += list(w[np.isfinite(w)])
    return threshold_at_bpcer(np.asarray(live_windows), bpcer)


def _split(scores: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    live = np.array([v for k, v in scores.items() if k.startswith("live/")])
    attack = np.array([v for k, v in scores.items() if not k.startswith("live/")])
    return live, attack


def model_report(scores: np.ndarray, labels: np.ndarray, seqs, frames: int, threshold: float) -> dict:
    live, attack = scores[labels == LIVE], scores[labels == ATTACK]
    seq_live, seq_attack = _split(sequence_scores(scores, seqs, frames))
    return {"threshold": round(threshold, 4),
            "frame": {**rates(live, attack, threshold), "apcer_at_bpcer5_aposteriori": round(apcer_at_bpcer(live, attack, 0.05), 4)},
            "sequence": {**rates(seq_live, seq_attack, threshold),
                         "apcer_at_bpcer5_aposteriori": round(apcer_at_bpcer(seq_live, seq_attack, 0.05), 4)},
            "_curves": {"frame": det_points(live, attack)[:2], "sequence": det_points(seq_live, seq_attack)[:2]}}


def frame_scores(root: Path, items, faces: dict, models: dict) -> dict[str, np.ndarray]:
    """Each model's live score on each item's face (NaN where the detector found none)."""
    out = {name: np.full(len(items), np.nan) for name in models}
    for i, it in enumerate(items):
        f = faces.get(it.path)
        img = read_frame(root / it.path) if f is not None else None
        if img is None:
            continue
        for name, m in models.items():
            out[name][i] = m.score(img, f["box"])
    return out


def policy_report(root: Path, items, faces: dict, seqs, pad, threshold: float, frames: int, require_cue: bool,
                  mesh: FaceMesh | None) -> dict:
    """The gate's own PadPolicy over each sequence in frame order."""
    per_seq = {}
    for name, idx in seqs.items():
        policy = PadPolicy(pad, threshold, frames, mesh, require_cue=require_cue)
        live_any, blink, motion, reasons = False, False, False, []
        for k, i in enumerate(idx):
            f = faces.get(items[i].path)
            img = read_frame(root / items[i].path) if f is not None else None
            if img is None:
                continue
            det = Detection(tuple(f["box"]), np.asarray(f["kps"], np.float32), f["score"])
            r = policy.assess(img, det, 1, float(k))
            live_any |= r.live
            blink |= r.cues["blinks"] > 0
            motion |= r.cues["motion_frames"] >= 2
            reasons.append(r.reason)
        per_seq[name] = {"live": live_any, "blink": blink, "motion": motion, "frames": len(idx),
                         "last_reason": reasons[-1] if reasons else "no_face"}
    live_seqs = [v for k, v in per_seq.items() if k.startswith("live/")]
    att_seqs = [v for k, v in per_seq.items() if not k.startswith("live/")]

    def share(xs, key):
        return round(float(np.mean([x[key] for x in xs])), 4) if xs else None

    apcer, bpcer = share(att_seqs, "live"), round(1.0 - share(live_seqs, "live"), 4)
    out = {"mode": "passive+blink" if require_cue else "passive", "threshold": round(threshold, 4), "frames": frames,
           "sequence": {"apcer_print": apcer, "bpcer": bpcer, "acer": round((apcer + bpcer) / 2, 4),
                        "n_live": len(live_seqs), "n_attack": len(att_seqs)},
           "per_sequence": per_seq}
    if mesh is not None:
        out["cue_seen"] = {"live_blink": share(live_seqs, "blink"), "live_motion": share(live_seqs, "motion"),
                           "attack_blink": share(att_seqs, "blink"), "attack_motion": share(att_seqs, "motion")}
    return out


def simulated_attacks(pad, threshold: float, detector, samples: Path, frames: int) -> dict:
    """The shipped model on edge/spoof.py's simulations of each registry photo: a face-filling
    print (margin 0.6 of the face height around it, as NUAA's prints are), a print with a wide
    margin (0.9: the paper edge falls outside the model's crop), and a phone screen; each held
    still for 4 frames, then moved rigidly for 6. Also the same photo shown clean (a "live"
    capture rendered from a still photo). A sequence passes when any window mean does."""
    from edge.demo import fit
    from edge.spoof import backdrop, held_still_then_moved, hold, print_sheet, screen_sheet

    scene = backdrop(load_image(samples / "astronaut.png")[300:512, 0:180])
    kinds = {"print (face-filling)": lambda p, f, s: print_sheet(p, f, 0.6, s),
             "print (wide margin)": lambda p, f, s: print_sheet(p, f, 0.9, s),
             "screen (phone)": lambda p, f, s: screen_sheet(p, f, 0.9, s)}
    out: dict = {"threshold": round(threshold, 4), "kinds": {}}
    for kind in ("clean capture", *kinds):
        per_photo = {}
        for k, name in enumerate(REGISTRY_PHOTOS):
            photo = load_image(samples / name)
            face = subject_face(detector, photo)
            if kind == "clean capture":
                shots = [fit(photo, zoom=1.0 + 0.05 * i, dx=4 * i) for i in range(10)]
            else:
                sheet, centre, fh = kinds[kind](photo, face, k)
                shots = [hold(sheet, centre, fh, scene, pose, seed=i) for i, pose in enumerate(held_still_then_moved(4, 6, k))]
            s = np.full(len(shots), np.nan)
            for i, img in enumerate(shots):
                d = detector.detect(img)
                if d:
                    s[i] = pad.score(img, max(d, key=lambda x: x.size).box)
            w = window_means(s, frames)
            per_photo[name] = {"frame_scores": [None if np.isnan(v) else round(float(v), 4) for v in s],
                               "sequence_passes": bool(np.nanmax(w) >= threshold) if np.isfinite(w).any() else False}
        ok = [v["sequence_passes"] for v in per_photo.values()]
        all_scores = np.array([v for p in per_photo.values() for v in p["frame_scores"] if v is not None])
        out["kinds"][kind] = {"sequences_passing": f"{sum(ok)}/{len(ok)}",
                              "frames_passing": f"{int((all_scores >= threshold).sum())}/{all_scores.size}",
                              "median_score": round(float(np.median(all_scores)), 4) if all_scores.size else None,
                              "per_photo": per_photo}
    return out


def evaluate(nuaa: str | Path, detector_card: str, pad_card: str | None, extra: list[str], frames: int,
             out: str | Path, samples: Path | None = None, cues: bool = True) -> dict:
    from edge.detect import load_detector

    root, out = Path(nuaa), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    all_items = nuaa_items(root)
    faces = detect_all(root, all_items, detector_card, out / "faces.json")
    shipped = load_pad(pad_card or SHIPPED_PAD, threads=1)
    # Each model at its own operating point: the shipped one and any other card at its card's
    # threshold, the Silent-Face members (alone and averaged) at their authors' rule.
    models: dict = {"shipped": shipped}
    thresholds = {"shipped": shipped.spec.threshold}
    if isinstance(shipped, PadFusion):
        for m in shipped.members:
            models[m.card.name], thresholds[m.card.name] = m, SILENT_FACE_THRESHOLD
    for c in extra:
        name = Path(c).name.removesuffix(".card.json")
        models[name] = load_pad(c, threads=1)
        thresholds[name] = models[name].spec.threshold
    report: dict = {"pad_card": str(pad_card or SHIPPED_PAD), "frames": frames, "models": {}}

    train = [it for it in all_items if it.split == "train"]
    train_seqs = sequences(train)
    train_labels = np.array([it.label for it in train])
    s_train = frame_scores(root, train, faces, {"shipped": shipped})["shipped"]
    # The mode is chosen on the train split too: the test split is only reported.
    mesh = FaceMesh(FACE_MESH, threads=1) if cues and FACE_MESH.is_file() else None
    t_card = shipped.spec.threshold
    report["mode_choice_train"] = {
        "passive": policy_report(root, train, faces, train_seqs, shipped, t_card, frames, False, None)["sequence"]}
    if mesh is not None:
        p = policy_report(root, train, faces, train_seqs, shipped, t_card, frames, True, mesh)
        report["mode_choice_train"]["passive+blink"] = {**p["sequence"], "cue_seen": p["cue_seen"]}
    report["train_threshold"] = {
        "rule": f"highest threshold rejecting at most {OPERATING_BPCER:.0%} of the live {frames}-frame windows of the NUAA train split",
        "computed": round(train_threshold(s_train, train_labels, train_seqs, frames), 4),
        "card": shipped.spec.threshold}

    items = [it for it in all_items if it.split == "test"]
    labels = np.array([it.label for it in items])
    seqs = sequences(items)
    scores = frame_scores(root, items, faces, models)
    if isinstance(shipped, PadFusion):
        scores["members' mean"] = np.mean([scores[m.card.name] for m in shipped.members], axis=0)
        thresholds["members' mean"] = SILENT_FACE_THRESHOLD
    report.update({"test_frames": {"live": int((labels == LIVE).sum()), "print": int((labels == ATTACK).sum())},
                   "no_face": int(sum(faces.get(it.path) is None for it in items)),
                   "sequences": {"live": sum(k.startswith("live/") for k in seqs),
                                 "print": sum(k.startswith("print/") for k in seqs)}})
    for name, s in scores.items():
        report["models"][name] = model_report(s, labels, seqs, frames, thresholds[name])
    report["policy"] = {"passive": policy_report(root, items, faces, seqs, shipped, shipped.spec.threshold, frames, False, None)}
    if mesh is not None:
        report["policy"]["passive+blink"] = policy_report(root, items, faces, seqs, shipped, shipped.spec.threshold,
                                                          frames, True, mesh)
    if samples is not None and samples.is_dir():
        report["simulated"] = simulated_attacks(shipped, shipped.spec.threshold, load_detector(detector_card), samples, frames)
    _plot(report, out / "det.png")
    for m in report["models"].values():
        del m["_curves"]  # arrays: in the PNG, not the JSON
    report["det_png"] = str(out / "det.png")
    atomic_write_bytes(out / "eval.json", json.dumps(report, indent=1).encode())
    return report


def _plot(report: dict, path: Path) -> None:
    from .plots import det_plot

    curves = {}
    for name, r in report["models"].items():
        for level in ("frame", "sequence"):
            curves[f"{name} ({level})"] = r["_curves"][level]
    det_plot(curves, path, title="PAD on the NUAA test split (print attacks)", xlabel="APCER (print)", ylabel="BPCER",
             marks={"APCER 2%": 0.02})


def summary(r: dict) -> str:
    tt = r["train_threshold"]
    lines = [f"NUAA test: {r['test_frames']['live']} live + {r['test_frames']['print']} print frames "
             f"({r['no_face']} without a face), {r['sequences']['live']} live + {r['sequences']['print']} print "
             f"sequences; policy window {r['frames']} frames",
             f"threshold on the train split ({tt['rule']}): {tt['computed']:.4f}; the card's: {tt['card']:.4f}",
             f"{'model':<22} {'thr':>6}  {'frame APCER/BPCER/ACER':>24}  {'seq APCER/BPCER/ACER':>22}  "
             f"{'APCER@BPCER5 a-post. frame/seq':>30}"]
    for name, m in r["models"].items():
        f, s = m["frame"], m["sequence"]
        lines.append(f"{name:<22} {m['threshold']:>6.3f}  {f['apcer_print']:>8.2%} {f['bpcer']:>7.2%} {f['acer']:>7.2%}  "
                     f"{s['apcer_print']:>7.2%} {s['bpcer']:>6.2%} {s['acer']:>7.2%}  "
                     f"{f['apcer_at_bpcer5_aposteriori']:>14.2%} {s['apcer_at_bpcer5_aposteriori']:>7.2%}")
    for mode, s in r["mode_choice_train"].items():
        lines.append(f"mode choice on the TRAIN split, policy {mode} (per sequence): APCER {s['apcer_print']:.2%} "
                     f"BPCER {s['bpcer']:.2%} ({s['n_attack']} print, {s['n_live']} live sequences)")
    for mode, p in r["policy"].items():
        s = p["sequence"]
        line = (f"policy {mode} (per sequence): APCER {s['apcer_print']:.2%} BPCER {s['bpcer']:.2%} ACER {s['acer']:.2%} "
                f"({s['n_attack']} print, {s['n_live']} live sequences)")
        if "cue_seen" in p:
            c = p["cue_seen"]
            line += (f"; cue seen on live sequences: blink {c['live_blink']:.0%}, motion {c['live_motion']:.0%}; "
                     f"on print sequences: blink {c['attack_blink']:.0%}, motion {c['attack_motion']:.0%}")
        lines.append(line)
    if "simulated" in r:
        lines.append(f"simulated attacks on the registry photos (SIMULATIONS, threshold {r['simulated']['threshold']:.3f}):")
        for kind, k in r["simulated"]["kinds"].items():
            lines.append(f"  {kind:<22} sequences passing liveness {k['sequences_passing']}, frames {k['frames_passing']} "
                     f"(of the frames with a face found), median score {k['median_score']}")
    lines.append(f"DET curves: {r['det_png']}")
    return "\n".join(lines)


def main(args) -> int:
    r = evaluate(args.nuaa, args.detector, args.pad, args.also, args.frames, args.out, Path(args.samples),
                 cues=not args.no_cues)
    print(summary(r))
    return 0
