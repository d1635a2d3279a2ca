"""Face detection with 5 keypoints, behind one interface.

Adapters: YuNet (ONNX, default) and MediaPipe BlazeFace (TFLite). Each is fed through its model
card; anchor decoding and NMS are pure functions so they are unit-tested without a model."""
from __future__ import annotations

from pathlib import Path
from typing import Protocol

import cv2
import numpy as np

from .modelcard import Card, load_card
from .records import Detection
from .runtime import Providers, open_model


class Detector(Protocol):
    card: Card

    def detect(self, image: np.ndarray) -> list[Detection]: ...


# ---------------------------------------------------------------- pure maths

def iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x,y,w,h box with many."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[0] + box[2], boxes[:, 0] + boxes[:, 2])
    y2 = np.minimum(box[1] + box[3], boxes[:, 1] + boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    union = box[2] * box[3] + boxes[:, 2] * boxes[:, 3] - inter
    return inter / np.maximum(union, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> list[int]:
    """Greedy non-maximum suppression; returns kept indices, best first."""
    order = np.argsort(-scores, kind="stable")
    keep: list[int] = []
    while order.size:
        i = int(order[0])
        keep.append(i)
        rest = order[1:]
        order = rest[iou(boxes[i], boxes[rest]) <= iou_threshold]
    return keep


def weighted_nms(boxes: np.ndarray, kps: np.ndarray, scores: np.ndarray, iou_threshold: float):
    """BlazeFace's blending NMS: each kept face is the score-weighted mean of the boxes and
    keypoints it suppresses, which steadies boxes from frame to frame."""
    order = np.argsort(-scores, kind="stable")
    out = []
    while order.size:
        i = int(order[0])
        merge = iou(boxes[i], boxes[order]) > iou_threshold
        # A degenerate (zero-area) box has IoU 0 with itself: it must still head its own group.
        merge[0] = True
        group = order[merge]
        w = scores[group][:, None]
        out.append(((boxes[group] * w).sum(0) / w.sum(), (kps[group].reshape(len(group), -1) * w).sum(0) / w.sum(),
                    float(scores[i])))
        order = order[~merge]
    return out


def yunet_decode(outputs: dict[str, np.ndarray], strides: list[int], pad_w: int, pad_h: int, score_threshold: float):
    """Decode YuNet's per-stride cls/obj/bbox/kps maps into boxes (x,y,w,h), 5x2 keypoints, scores.

    Each stride s has a (pad_h/s) x (pad_w/s) grid, one prior per cell: centre = (col + dx, row + dy) * s,
    size = exp(dw, dh) * s, keypoints = (col + kx, row + ky) * s; score = sqrt(cls * obj)."""
    boxes, kps, scores = [], [], []
    for s in strides:
        cols, rows = pad_w // s, pad_h // s
        for name, per_cell in (("cls", 1), ("obj", 1), ("bbox", 4), ("kps", 10)):
            got = outputs[f"{name}_{s}"].size
            if got != rows * cols * per_cell:
                raise ValueError(f"YuNet output {name}_{s} has {got} values, expected {rows * cols * per_cell} "
                                 f"({cols}x{rows} cells at stride {s} for a {pad_w}x{pad_h} padded input)")
        cls = np.clip(outputs[f"cls_{s}"].reshape(-1), 0, 1)
        obj = np.clip(outputs[f"obj_{s}"].reshape(-1), 0, 1)
        score = np.sqrt(cls * obj)
        idx = np.nonzero(score >= score_threshold)[0]
        if idx.size == 0:
            continue
        col = (idx % cols).astype(np.float32)
        row = (idx // cols).astype(np.float32)
        b = outputs[f"bbox_{s}"].reshape(-1, 4)[idx]
        k = outputs[f"kps_{s}"].reshape(-1, 5, 2)[idx]
        cx, cy = (col + b[:, 0]) * s, (row + b[:, 1]) * s
        w, h = np.exp(b[:, 2]) * s, np.exp(b[:, 3]) * s
        boxes.append(np.stack([cx - w / 2, cy - h / 2, w, h], 1))
        kps.append((k + np.stack([col, row], 1)[:, None, :]) * s)
        scores.append(score[idx])
    if not boxes:
        return np.zeros((0, 4), np.float32), np.zeros((0, 5, 2), np.float32), np.zeros(0, np.float32)
    return np.concatenate(boxes), np.concatenate(kps), np.concatenate(scores)


def ssd_anchors(input_size: int, strides: list[int], anchors_per_cell: list[int], offset: float = 0.5) -> np.ndarray:
    """MediaPipe SSD anchors with fixed anchor size (BlazeFace): (cx, cy) in [0, 1], one row per anchor.

    Consecutive layers with the same stride share a grid and add their anchors per cell."""
    out = []
    i = 0
    while i < len(strides):
        s, n = strides[i], 0
        while i < len(strides) and strides[i] == s:
            n += anchors_per_cell[i]
            i += 1
        g = int(np.ceil(input_size / s))
        ys, xs = np.meshgrid((np.arange(g) + offset) / g, (np.arange(g) + offset) / g, indexing="ij")
        cell = np.stack([xs.ravel(), ys.ravel()], 1)
        out.append(np.repeat(cell, n, axis=0))
    return np.concatenate(out).astype(np.float32)


def blazeface_decode(raw: np.ndarray, logits: np.ndarray, anchors: np.ndarray, input_size: int, score_threshold: float):
    """Decode BlazeFace regressors (N x 16: dx, dy, w, h, then 6 keypoints) against anchors.

    Returns boxes and keypoints in [0, 1] input coordinates, and sigmoid scores."""
    scores = 1.0 / (1.0 + np.exp(-np.clip(logits.reshape(-1).astype(np.float64), -100, 100)))  # float32 exp(100) overflows
    idx = np.nonzero(scores >= score_threshold)[0]
    r = raw.reshape(-1, raw.shape[-1])[idx] / input_size
    a = anchors[idx]
    cx, cy = r[:, 0] + a[:, 0], r[:, 1] + a[:, 1]
    w, h = r[:, 2], r[:, 3]
    boxes = np.stack([cx - w / 2, cy - h / 2, w, h], 1)
    kps = r[:, 4:16].reshape(-1, 6, 2) + a[:, None, :]
    return boxes, kps, scores[idx]


def scale_to(image: np.ndarray, max_side: int) -> tuple[np.ndarray, float]:
    h, w = image.shape[:2]
    f = min(1.0, max_side / max(h, w))
    if f < 1.0:
        image = cv2.resize(image, (round(w * f), round(h * f)), interpolation=cv2.INTER_AREA)
    return image, f


# ---------------------------------------------------------------- adapters

class YuNetDetector:
    def __init__(self, card: Card, model_path: Path, threads: int = 1, providers: Providers | None = None):
        self.card = card
        self.spec = card.detector
        self.model = open_model(card, model_path, threads, providers)
        self.multiple = card.input.size_multiple

    def detect(self, image: np.ndarray) -> list[Detection]:
        small, f = scale_to(image, self.spec.max_side)
        h, w = small.shape[:2]
        ph, pw = -(-h // self.multiple) * self.multiple, -(-w // self.multiple) * self.multiple
        padded = cv2.copyMakeBorder(small, 0, ph - h, 0, pw - w, cv2.BORDER_CONSTANT, value=0)
        outputs = self.model(self.card.preprocess([padded]))
        boxes, kps, scores = yunet_decode(outputs, self.spec.strides, pw, ph, self.spec.score_threshold)
        keep = nms(boxes, scores, self.spec.nms_iou)
        return [Detection(box=tuple(float(v) / f for v in boxes[i]), keypoints=(kps[i] / f).astype(np.float32),
                          score=float(scores[i])) for i in keep]


class BlazeFaceDetector:
    """MediaPipe BlazeFace. Its 6 keypoints are eyes, nose tip, mouth centre and ears; the gate's
    5-point records need mouth corners, so they are placed on the mouth line at the template's
    ratio of mouth width to eye distance (ArcFace: 0.83), which is what the similarity fit needs."""

    MOUTH_TO_EYES = 0.83
    # BlazeFace's eyes, nose and mouth sit lower on the face than the 5-point convention the
    # encoder templates use (YuNet's, RetinaFace's): by 0.063 / 0.148 / 0.064 eye distances, the
    # mean over 300 CelebA faces against YuNet on the same images (short and full range agree to
    # 0.02). Uncorrected, the aligned crop sits about 2.5 px (of 112) too high.
    SHIFT_DOWN = np.array([0.063, 0.063, 0.148, 0.064, 0.064], np.float32)

    def __init__(self, card: Card, model_path: Path, threads: int = 1, providers: Providers | None = None):
        self.card = card
        self.spec = card.detector
        self.model = open_model(card, model_path, threads, providers)
        a = self.spec.anchors
        self.size = int(card.input.width)
        self.anchors = ssd_anchors(self.size, list(a["strides"]), list(a["anchors_per_cell"]), float(a.get("offset", 0.5)))

    def detect(self, image: np.ndarray) -> list[Detection]:
        h, w = image.shape[:2]
        f = self.size / max(h, w)
        rw, rh = max(1, round(w * f)), max(1, round(h * f))
        # Letterbox to a square so the model's square input keeps the face's proportions; resizing
        # before padding saves a third of the time on a 640x480 frame.
        small = cv2.resize(image, (rw, rh), interpolation=cv2.INTER_AREA)
        inp = cv2.copyMakeBorder(small, 0, self.size - rh, 0, self.size - rw, cv2.BORDER_CONSTANT, value=0)
        # model input [0, 1] -> frame pixels, per axis (the resize rounds each side on its own)
        to_px = np.array([self.size * w / rw, self.size * h / rh])
        out = self.model(self.card.preprocess([inp]))
        reg, cls = _blaze_outputs(out)
        boxes, kps, scores = blazeface_decode(reg, cls, self.anchors, self.size, self.spec.score_threshold)
        dets = []
        for box, kp, score in weighted_nms(boxes, kps, scores, self.spec.nms_iou):
            kp = kp.reshape(6, 2) * to_px
            eye_l, eye_r, nose, mouth = kp[0], kp[1], kp[2], kp[3]
            eyes = eye_r - eye_l
            half = eyes * self.MOUTH_TO_EYES / 2
            five = np.stack([eye_l, eye_r, nose, mouth - half, mouth + half])
            down = np.array([-eyes[1], eyes[0]])  # the eye line turned 90 degrees, towards the chin
            five = (five - self.SHIFT_DOWN[:, None] * down).astype(np.float32)
            dets.append(Detection(box=tuple(float(v) for v in box * np.tile(to_px, 2)), keypoints=five, score=score))
        return dets


def _blaze_outputs(out: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    arrs = sorted(out.values(), key=lambda a: a.shape[-1])
    return arrs[-1], arrs[0]


def load_detector(card_path: str | Path, threads: int = 1, providers: Providers | None = None) -> Detector:
    card, path = load_card(card_path)
    if card.task != "face_detection":
        raise ValueError(f"{card_path}: card is for {card.task}, not face_detection")
    return {"yunet": YuNetDetector, "blazeface": BlazeFaceDetector}[card.detector.kind](card, path, threads, providers)
