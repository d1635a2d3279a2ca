"""Presentation-attack detection (PAD) for the gate: a passive CNN score per frame, averaged over
the track's last frames, plus cues over time that a still picture cannot give (an eye blink,
non-planar head motion). `make_pad_policy(cfg, threads)` builds the `LivenessCheck` the pipeline
calls (see edge/liveness.py).

What it stops: printed photos and still pictures held to the camera. What it does not: a good
video replay or a 3D mask may pass; see train/README-liveness.md.

The geometry, the eye-aspect-ratio blink detector, the parallax measure and the policy
combination are pure functions, unit-tested by hand; the classes only add models and state.
"""
from __future__ import annotations

import json
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .config import MODELS
from .errors import ConfigError, ModelError
from .modelcard import Card, InputSpec, SourceSpec, load_card, load_member, sha256_file
from .records import Detection, LivenessResult
from .runtime import Providers, open_model

ASSETS = Path(__file__).resolve().parent / "assets"
# Committed with the code (models/ is built by setup and git-ignored), so the installer, which
# copies edge/, puts it on every gate: MiniFASNetV2 + MiniFASNetV1SE, see assets/pad/PROVENANCE.md.
SHIPPED_PAD = ASSETS / "pad" / "minifasnet.card.json"
FACE_MESH = MODELS / "raw" / "face_landmark.tflite"
# The face mesh comes from the pinned mediapipe 0.10.21 wheel (export/models.lock.json, checked by
# `python -m export fetch`); its card is built here because edge/ must not import export/.
FACE_MESH_SHA256 = "1055cb9d4a9ca8b8c688902a3a5194311138ba256bcc94e336d8373a5f30c814"
FACE_MESH_SIZE = 1242398

# Face-mesh eyelid landmarks in EAR order p1..p6: corner, upper, upper, corner, lower, lower.
LEFT_EYE = (33, 160, 158, 133, 153, 144)
RIGHT_EYE = (362, 385, 387, 263, 373, 380)
# Parallax: the nose tip against a frame spanned by points near the face's front plane.
MESH_PLANE = (33, 133, 362, 263, 61, 291, 10, 152)  # eye corners, mouth corners, forehead, chin
MESH_NOSE = 1


# ---------------------------------------------------------------- pure geometry

def crop_box(box, frame_w: int, frame_h: int, scale: float) -> tuple[int, int, int, int]:
    """Silent-Face's PAD crop: the face box scaled about its centre, the scale capped so the crop
    fits the frame, then shifted (not clipped) back inside it. Returns x0, y0, x1, y1 (exclusive)."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        raise ValueError(f"empty face box {box}")
    scale = min(scale, (frame_h - 1) / h, (frame_w - 1) / w)
    nw, nh = w * scale, h * scale
    cx, cy = x + w / 2, y + h / 2
    x0, y0, x1, y1 = cx - nw / 2, cy - nh / 2, cx + nw / 2, cy + nh / 2
    if x0 < 0:
        x1 -= x0
        x0 = 0
    if y0 < 0:
        y1 -= y0
        y0 = 0
    if x1 > frame_w - 1:
        x0 -= x1 - frame_w + 1
        x1 = frame_w - 1
    if y1 > frame_h - 1:
        y0 -= y1 - frame_h + 1
        y1 = frame_h - 1
    return int(x0), int(y0), int(x1) + 1, int(y1) + 1


def pad_crop(image: np.ndarray, box, scale: float, size: tuple[int, int]) -> np.ndarray:
    h, w = image.shape[:2]
    x0, y0, x1, y1 = crop_box(box, w, h, scale)
    return cv2.resize(image[y0:y1, x0:x1], (int(size[0]), int(size[1])), interpolation=cv2.INTER_LINEAR)


def mesh_transform(keypoints: np.ndarray, box, size: int, enlarge: float = 1.5) -> np.ndarray:
    """2x3 affine from the frame to the face mesh's square input: centred on the face box, rotated
    so the eyes are level, side = enlarge x the box's longer side (MediaPipe's face rect)."""
    x, y, w, h = (float(v) for v in box)
    eye_l, eye_r = np.asarray(keypoints[0], np.float64), np.asarray(keypoints[1], np.float64)
    angle = np.arctan2(eye_r[1] - eye_l[1], eye_r[0] - eye_l[0])
    side = enlarge * max(w, h)
    s = size / side
    c, si = np.cos(-angle) * s, np.sin(-angle) * s
    cx, cy = x + w / 2, y + h / 2
    # rotate by -angle and scale about the box centre, then move the centre to the crop centre
    return np.array([[c, -si, size / 2 - c * cx + si * cy], [si, c, size / 2 - si * cx - c * cy]])


def invert_affine(m: np.ndarray) -> np.ndarray:
    return cv2.invertAffineTransform(np.asarray(m, np.float64))


def apply_affine(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, np.float64)
    return pts @ m[:, :2].T + m[:, 2]


def eye_aspect_ratio(eye: np.ndarray) -> float:
    """Soukupova & Cech 2016: (|p2-p6| + |p3-p5|) / (2 |p1-p4|) over 6 eyelid points (x, y)."""
    p = np.asarray(eye, np.float64)[:, :2]
    width = np.linalg.norm(p[0] - p[3])
    if width < 1e-9:
        return 0.0
    return float((np.linalg.norm(p[1] - p[5]) + np.linalg.norm(p[2] - p[4])) / (2.0 * width))


def count_blinks(ears, close_ratio: float = 0.7, open_ratio: float = 0.9, min_baseline_frames: int = 3) -> int:
    """Blinks in an EAR series: a dip below close_ratio x the open-eye baseline that starts from and
    returns to open eyes (>= open_ratio x baseline). The baseline is the series' upper quartile:
    eyes are open most of the time and blinks are short, so the quartile ignores them. A photo with
    its eyes always open (or always shut) has no dip that opens again."""
    e = np.asarray(ears, np.float64)
    e = e[np.isfinite(e)]
    if e.size < min_baseline_frames:
        return 0
    base = float(np.percentile(e, 75))
    if base <= 0:
        return 0
    closed, opened = e < close_ratio * base, e >= open_ratio * base
    blinks, was_open, dipped = 0, False, False
    for c, o in zip(closed, opened):
        if o:
            if dipped:
                blinks += 1
            was_open, dipped = True, False
        elif c and was_open:
            dipped = True
    return blinks


def affine_fit(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares 2x3 affine mapping src points onto dst (>= 3 points, not collinear)."""
    src, dst = np.asarray(src, np.float64), np.asarray(dst, np.float64)
    a = np.hstack([src, np.ones((len(src), 1))])
    sol, *_ = np.linalg.lstsq(a, dst, rcond=None)
    return sol.T


def parallax(plane_ref: np.ndarray, nose_ref: np.ndarray, plane: np.ndarray, nose: np.ndarray) -> float:
    """How far the nose tip left the plane of the other face points between two views, in units of
    that plane's size (mean distance of its points from their centroid).

    Every view of a flat picture (moved, turned, tilted: weak perspective) is one affine map of
    another, so the nose lands where the affine fit of the plane points predicts: ~0 up to landmark
    noise. A real head turning moves the nose, which stands out of that plane, off the prediction."""
    m = affine_fit(plane_ref, plane)
    plane = np.asarray(plane, np.float64)
    spread = float(np.linalg.norm(plane - plane.mean(0), axis=1).mean())
    if spread < 1e-9:
        return 0.0
    return float(np.linalg.norm(apply_affine(m, np.asarray(nose_ref, np.float64)[None])[0] - nose) / spread)


@dataclass(frozen=True)
class Cues:
    blinks: int = 0
    parallax: float = 0.0  # largest parallax of the track so far
    motion_frames: int = 0  # frames whose parallax reached the motion threshold
    frames: int = 0  # frames with landmarks


# One frame over the parallax threshold can be a landmark glitch; a turning head gives several.
MOTION_FRAMES = 2


def combine(scores, threshold: float, require_cue: bool, cues: Cues, face_seen: bool = True) -> LivenessResult:
    """One liveness decision from the passive scores of the track's last frames and its cues.

    Live when the mean passive score reaches the threshold and, where required, a blink or
    non-planar motion was seen on the track. The reason names the first failed condition."""
    s = np.asarray(scores, np.float64)
    mean = float(s.mean()) if s.size else 0.0
    motion = cues.motion_frames >= MOTION_FRAMES
    info = {"passive": round(mean, 4), "frames": int(s.size), "threshold": threshold,
            "blinks": cues.blinks, "parallax": round(cues.parallax, 4), "motion_frames": cues.motion_frames,
            "mesh_frames": cues.frames}
    if not s.size:
        return LivenessResult(False, 0.0, "no_score", info)
    if mean < threshold:
        return LivenessResult(False, mean, "passive", info)
    if require_cue and not face_seen:
        return LivenessResult(False, mean, "no_landmarks", info)
    if require_cue and cues.blinks == 0 and not motion:
        return LivenessResult(False, mean, "no_blink_or_motion", info)
    reason = "live" if not require_cue else ("live:blink" if cues.blinks else "live:motion")
    return LivenessResult(True, mean, reason, info)


# ---------------------------------------------------------------- models

class PadModel:
    """The passive PAD CNN, fed through its card: crop at the card's scale, softmax, live class."""

    def __init__(self, card: Card, path: Path, threads: int = 1, providers: Providers | None = None):
        if card.task != "liveness":
            raise ModelError(path, f"card is for {card.task}, not liveness")
        self.card, self.spec = card, card.liveness
        self.size = (int(self.card.input.width), int(self.card.input.height))
        self.model = open_model(self.card, path, threads, providers)

    def crop(self, image: np.ndarray, box) -> np.ndarray:
        return pad_crop(image, box, self.spec.crop_scale, self.size)

    def scores(self, crops: list[np.ndarray]) -> np.ndarray:
        """Live probability of each crop (batched where the model allows it)."""
        step = len(crops) if self.card.input.dynamic_batch else 1
        out = []
        for i in range(0, len(crops), step):
            out_i = next(iter(self.model(self.card.preprocess(crops[i:i + step])).values()))
            logits = out_i.reshape(len(crops[i:i + step]), -1)
            out.append(softmax(logits)[:, self.spec.live_class])
        return np.concatenate(out)

    def score(self, image: np.ndarray, box) -> float:
        return float(self.scores([self.crop(image, box)])[0])


class PadMember(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    card: str = Field(pattern=r"^[^/\\]+\.card\.json$")  # a card in the recipe's own folder
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the member model's, as its card says
    weight: float = Field(gt=0, le=1)


class PadRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: list[PadMember] = Field(min_length=2, max_length=4)
    notes: str = ""

    @model_validator(mode="after")
    def _weights(self):
        if abs(sum(m.weight for m in self.members) - 1.0) > 1e-6:
            raise ValueError("member weights must sum to 1")
        return self


class PadFusion:
    """Several PAD models as one: each crops the face at its own scale, and the live
    probabilities are averaged with the recipe's weights (as Silent-Face fuses its two models).
    The card's threshold applies to the averaged score."""

    def __init__(self, card: Card, recipe_path: Path, threads: int = 1, providers: Providers | None = None):
        if card.task != "liveness":
            raise ModelError(recipe_path, f"card is for {card.task}, not liveness")
        try:
            recipe = PadRecipe.model_validate(json.loads(recipe_path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as e:
            raise ModelError(recipe_path, f"invalid PAD fusion recipe: {e}") from None
        self.card, self.spec = card, card.liveness
        self.members = [PadModel(*load_member(recipe_path, m.card, m.sha256, "PAD models"), threads, providers)
                        for m in recipe.members]
        self.weights = np.array([m.weight for m in recipe.members])

    def member_scores(self, image: np.ndarray, box) -> np.ndarray:
        return np.array([m.score(image, box) for m in self.members])

    def score(self, image: np.ndarray, box) -> float:
        return float(self.weights @ self.member_scores(image, box))


def load_pad(card_path: str | Path, threads: int = 1, providers: Providers | None = None) -> PadModel | PadFusion:
    """The PAD model a card describes, routed by what the card says it is (InsightFace-style)."""
    card, path = load_card(card_path)
    if card.runtime == "fusion":
        return PadFusion(card, path, threads, providers)
    return PadModel(card, path, threads, providers)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def face_mesh_card(path: Path = FACE_MESH) -> Card:
    return Card(name="mediapipe_face_mesh", task="face_landmarks", file=path.name, sha256=FACE_MESH_SHA256,
                size_bytes=FACE_MESH_SIZE, runtime="litert", precision="fp32",
                input=InputSpec(width=192, height=192, color="RGB", layout="NHWC", std=(255.0, 255.0, 255.0)),
                source=SourceSpec(package="mediapipe", version="0.10.21",
                                  file="mediapipe/modules/face_landmark/face_landmark.tflite", license="Apache-2.0",
                                  notes="468 3D face landmarks in 192x192 input pixels; face-presence logit"))


class FaceMesh:
    """MediaPipe face mesh on a rotated square crop around the detector's box; landmarks are
    returned in frame pixels (x, y) so the track can compare them across frames."""

    def __init__(self, path: str | Path = FACE_MESH, threads: int = 1, min_presence: float = 0.5):
        path = Path(path)
        if not path.is_file():
            raise ModelError(path, "face mesh model missing: run `python -m export fetch`")
        self.card = face_mesh_card(path)
        if path.stat().st_size != self.card.size_bytes or sha256_file(path) != self.card.sha256:
            raise ModelError(path, "face mesh file does not match the pinned mediapipe 0.10.21 member; re-fetch it")
        self.model = open_model(self.card, path, threads)
        self.size = int(self.card.input.width)
        self.min_presence = min_presence

    def landmarks(self, image: np.ndarray, det: Detection) -> np.ndarray | None:
        m = mesh_transform(det.keypoints, det.box, self.size)
        crop = cv2.warpAffine(image, m, (self.size, self.size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)
        out = self.model(self.card.preprocess([crop]))
        flat = [v for v in out.values() if v.size == 1404]
        presence = [v for v in out.values() if v.size == 1]
        if not flat or not presence:
            raise ModelError(None, "face mesh outputs are not the expected 1404 landmarks + presence")
        if 1.0 / (1.0 + np.exp(-float(presence[0].ravel()[0]))) < self.min_presence:
            return None
        pts = flat[0].reshape(468, 3)[:, :2]
        return apply_affine(invert_affine(m), pts)


# ---------------------------------------------------------------- the policy per track

# Non-planar motion that counts as a live head: the nose leaving the face plane by this share of
# the plane's size. Still photos warped in perspective (corners moved by up to 8%), turned, scaled
# and blurred reached 0.087 at most (landmark noise plus perspective); pose and expression changes
# between photos of one person gave 0.2-0.4. See train/README-liveness.md.
MIN_PARALLAX = 0.12
TRACK_TTL_S = 30.0  # state of a track not seen for this long is dropped (track ids are never reused)
CUE_HISTORY = 150  # frames of EAR kept per track: 10 s at 15 fps


@dataclass
class _Track:
    last_t: float
    scores: deque
    ears: deque = field(default_factory=lambda: deque(maxlen=CUE_HISTORY))
    plane_ref: np.ndarray | None = None
    nose_ref: np.ndarray | None = None
    parallax: float = 0.0
    motion_frames: int = 0
    mesh_frames: int = 0
    blinks: int = 0


class PadPolicy:
    """`LivenessCheck`: the passive score averaged over the track's last `frames` frames; with
    `require_cue` (mode "passive+blink") also a blink or non-planar head motion seen on the track."""

    def __init__(self, pad: PadModel | PadFusion, threshold: float, frames: int, mesh: FaceMesh | None = None,
                 require_cue: bool = False, min_parallax: float = MIN_PARALLAX):
        if require_cue and mesh is None:
            raise ValueError("a cue is required but no face mesh was given")
        self.pad, self.mesh = pad, mesh
        self.threshold, self.frames = float(threshold), int(frames)
        self.require_cue, self.min_parallax = require_cue, min_parallax
        self.tracks: dict[int, _Track] = {}

    def assess(self, image: np.ndarray, det: Detection, track_id: int, t_mono: float) -> LivenessResult:
        for tid in [t for t, s in self.tracks.items() if t_mono - s.last_t > TRACK_TTL_S]:
            del self.tracks[tid]
        tr = self.tracks.get(track_id)
        if tr is None:
            tr = self.tracks[track_id] = _Track(t_mono, deque(maxlen=self.frames))
        tr.last_t = t_mono
        tr.scores.append(self.pad.score(image, det.box))
        face_seen = True
        if self.mesh is not None:
            face_seen = self._update_cues(tr, self.mesh.landmarks(image, det))
        return combine(list(tr.scores), self.threshold, self.require_cue,
                       Cues(tr.blinks, tr.parallax, tr.motion_frames, tr.mesh_frames), face_seen)

    @staticmethod
    def _eyes(pts: np.ndarray) -> float:
        return (eye_aspect_ratio(pts[list(LEFT_EYE)]) + eye_aspect_ratio(pts[list(RIGHT_EYE)])) / 2.0

    def _update_cues(self, tr: _Track, pts: np.ndarray | None) -> bool:
        if pts is None:
            return tr.mesh_frames > 0
        tr.mesh_frames += 1
        tr.ears.append(self._eyes(pts))
        tr.blinks = count_blinks(tr.ears)
        plane, nose = pts[list(MESH_PLANE)], pts[MESH_NOSE]
        if tr.plane_ref is None:
            tr.plane_ref, tr.nose_ref = plane, nose
        else:
            p = parallax(tr.plane_ref, tr.nose_ref, plane, nose)
            tr.parallax = max(tr.parallax, p)
            tr.motion_frames += p >= self.min_parallax
        return True


def pad_card_path(cfg) -> Path:
    """The configured PAD card, else the one shipped in edge/assets."""
    if cfg.models.liveness:
        return Path(cfg.models.liveness)
    if SHIPPED_PAD.is_file():
        return SHIPPED_PAD
    raise ConfigError(None, f"liveness.mode is {cfg.liveness.mode!r} but models.liveness is not set and "
                            f"{SHIPPED_PAD} is missing")


def make_pad_policy(cfg, threads: int = 1, providers: Providers | None = None) -> PadPolicy:
    pad = load_pad(pad_card_path(cfg), threads, providers)
    threshold = cfg.liveness.threshold if cfg.liveness.threshold is not None else pad.spec.threshold
    require_cue = cfg.liveness.mode == "passive+blink"
    mesh = FaceMesh(FACE_MESH, threads) if require_cue else None
    return PadPolicy(pad, threshold, cfg.liveness.frames, mesh, require_cue)
