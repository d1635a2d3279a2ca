"""NUAA Photograph Imposter Database as the evaluations and the liveness training read it: the
official split lists, sequences (one recording: subject, glasses, position, session), the gate's
own face boxes on every frame (cached), and the pure maths of a PAD operating point.

The protocol is written down in evaluation/README-liveness.md."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LIVE, ATTACK = 1, 0  # class index = label; a PAD card's live_class
LISTS = {("train", LIVE): "client_train_raw.txt", ("train", ATTACK): "imposter_train_raw.txt",
         ("test", LIVE): "client_test_raw.txt", ("test", ATTACK): "imposter_test_raw.txt"}


def read_frame(path: Path) -> np.ndarray | None:
    """BGR uint8, or None when the file cannot be decoded."""
    import cv2

    data = np.fromfile(str(path), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


# ---------------------------------------------------------------- NUAA

@dataclass(frozen=True)
class NuaaItem:
    path: str  # relative to the NUAA folder
    split: str
    label: int

    @property
    def parts(self) -> tuple[str, str, str, str, int]:
        """subject, glasses, position, session, frame number (from <subject>_<glasses>_<pos>_<session>_<frame>.jpg)."""
        s, g, p, sess, f = Path(self.path).stem.split("_")
        return s, g, p, sess, int(f)

    @property
    def subject(self) -> str:
        return self.parts[0]

    @property
    def session(self) -> str:
        return self.parts[3]

    @property
    def sequence(self) -> str:
        """One subject, glasses, position and session of one class (live or attack), per ../shared/README.md."""
        s, g, p, sess, _ = self.parts
        return f"{'live' if self.label == LIVE else 'print'}/{s}_{g}_{p}_{sess}"


def nuaa_items(root: str | Path) -> list[NuaaItem]:
    from edge.errors import FacegateError

    root = Path(root)
    items = []
    for (split, label), name in LISTS.items():
        f = root / name
        if not f.is_file():
            raise FacegateError(f, "NUAA split list not found (expected ../shared/data/nuaa)")
        items += [NuaaItem(line.strip(), split, label) for line in f.read_text().splitlines() if line.strip()]
    return items


def sequences(items: list[NuaaItem]) -> dict[str, list[int]]:
    """Sequence name -> indices into `items`, in frame order."""
    out: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        out.setdefault(it.sequence, []).append(i)
    return {k: sorted(v, key=lambda i: items[i].parts[4]) for k, v in sorted(out.items())}


def detect_all(root: Path, items: list[NuaaItem], detector_card: str, cache: Path, threads: int = 2) -> dict:
    """The gate's detector on every frame: path -> {"box", "kps"} of the largest face, or None.
    Cached as JSON (keyed by the detector's sha256) so training and evaluation see the same boxes."""
    from edge.atomic import atomic_write_bytes
    from edge.detect import load_detector

    det = load_detector(detector_card, threads)
    sha = det.card.sha256
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("detector_sha256") == sha and all(it.path in data["faces"] for it in items):
            return data["faces"]
    faces = {}
    for it in items:
        img = read_frame(root / it.path)
        dets = det.detect(img) if img is not None else []
        if dets:
            d = max(dets, key=lambda d: d.size)
            faces[it.path] = {"box": [round(v, 2) for v in d.box], "kps": np.round(d.keypoints, 2).tolist(),
                              "score": round(d.score, 4)}
        else:
            faces[it.path] = None
    atomic_write_bytes(cache, json.dumps({"detector_sha256": sha, "faces": faces}).encode())
    return faces


def threshold_at_bpcer(live: np.ndarray, bpcer: float) -> float:
    """The highest threshold that rejects at most `bpcer` of the live scores (live if score >= t)."""
    s = np.sort(np.asarray(live, np.float64))
    if s.size == 0:
        raise ValueError("no live scores")
    return float(s[min(int(np.floor(bpcer * s.size + 1e-9)), s.size - 1)])


def window_means(scores: np.ndarray, frames: int) -> np.ndarray:
    """Each frame's score averaged with the previous ones of its sequence, up to `frames` (the
    gate's liveness window). Frames without a face (NaN) are skipped, as the gate gets no score
    for them, and stay NaN."""
    out = np.full(len(scores), np.nan)
    recent: list[float] = []
    for i, s in enumerate(np.asarray(scores, np.float64)):
        if np.isnan(s):
            continue
        recent = (recent + [float(s)])[-frames:]
        out[i] = float(np.mean(recent))
    return out
