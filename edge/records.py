"""Typed records that flow one way through the gate:
Frame -> Detection -> AlignedFace -> Embedding -> Match -> Decision -> Grant -> DoorOutcome."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Frame:
    image: np.ndarray  # HxWx3 uint8, BGR (OpenCV order; every camera adapter converts to it)
    t_mono: float  # time.monotonic() at capture: every timer in the gate runs on this clock
    t_wall: float  # time.time() at capture: for the audit trail only
    index: int = 0
    source: str = ""


@dataclass(frozen=True)
class Detection:
    box: tuple[float, float, float, float]  # x, y, w, h in frame pixels
    keypoints: np.ndarray  # 5x2 float32: right eye, left eye, nose tip, right and left mouth corner (image left to right)
    score: float

    @property
    def size(self) -> float:
        return float(min(self.box[2], self.box[3]))

    @property
    def centre(self) -> tuple[float, float]:
        x, y, w, h = self.box
        return x + w / 2.0, y + h / 2.0


@dataclass(frozen=True)
class Quality:
    ok: bool
    reason: str  # "ok" or a reason code: "too_small", "pose", "underexposed", "overexposed", "backlit", "clipped", "crushed", "blurry"
    face_px: float
    detail: float  # Laplacian variance / grey variance of the face (edge.quality.detail)
    yaw: float
    roll: float
    exposure: object  # edge.quality.Exposure


@dataclass(frozen=True)
class AlignedFace:
    image: np.ndarray  # the encoder's input size, BGR uint8
    detection: Detection
    views: tuple = ()  # a fused encoder's member crops (each member's own template), in member order


@dataclass(frozen=True)
class Embedding:
    vector: np.ndarray  # float32, L2-normalised
    encoder_sha256: str


@dataclass(frozen=True)
class Match:
    identity: str | None  # best enrolled identity, None for an empty gallery
    score: float  # best raw similarity (higher = more alike)
    runner_up: str | None
    runner_up_score: float
    normalized_score: float  # the score the threshold is applied to (raw, or cohort-normalised)
    threshold: float
    accepted: bool  # normalized_score >= threshold and the margin rule holds
    reason: str  # "match", "below_threshold", "margin", "empty_gallery", "claim_unknown"


@dataclass(frozen=True)
class LivenessResult:
    live: bool
    score: float
    reason: str
    cues: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    grant: bool
    reason: str  # reason code: "granted", "no_face", "quality:<code>", "unknown", "liveness", "pending", ...
    identity: str | None = None
    score: float | None = None
    runner_up_score: float | None = None
    threshold: float | None = None
    liveness: float | None = None
    track_id: int | None = None
    t_mono: float = 0.0
    t_wall: float = 0.0
    details: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Grant:
    """What a door output acts on: a granted decision's person, their badge card number and the
    time of the evidence behind the grant (the frame's)."""

    identity: str
    card: str  # the person's badge card number, "" = none enrolled; never logged or audited
    t_mono: float
    t_wall: float
    track_id: int | None = None


@dataclass(frozen=True)
class DoorOutcome:
    """What a door output did with a grant, audited as one row of kind `output`: the relay opened
    the door (or refused to), the OSDP reader sent the card read to the panel (or did not)."""

    output: str  # "relay" | "osdp"
    done: bool  # the door opened / the panel took the card read
    reason: str  # "door_opened", "not_opened", "card_read_sent", "not_sent"
    details: dict = field(default_factory=dict)
