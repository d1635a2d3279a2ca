"""Quality gate before embedding: size, blur, pose and exposure, each with a reason code. Pure."""
from __future__ import annotations

import cv2
import numpy as np

from .align import ARCFACE_112, align
from .records import Detection, Quality

# The limits (sharpness above all) are set on this crop, the ArcFace 112 px template the default
# encoder uses. A face for an encoder with another template (dlib's wider 150 px chip reads
# blurrier: 93 LFW photos refused where the 112 crop refuses 3) is judged on this crop too, so one
# set of limits means the same for every encoder.
QUALITY_TEMPLATE, QUALITY_SIZE = ARCFACE_112, (112, 112)


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: low on blurred or defocused faces."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def pose(kps: np.ndarray) -> tuple[float, float]:
    """(yaw, roll_deg) from 5 keypoints. yaw = horizontal offset of the nose from the eye midpoint,
    as a share of the eye distance (0 = frontal, ~0.5 = turned far); roll = eye-line angle."""
    le, re, nose = kps[0], kps[1], kps[2]
    d = re - le
    eye_dist = float(np.hypot(*d))
    if eye_dist < 1e-6:
        return 1.0, 90.0
    roll = float(np.degrees(np.arctan2(d[1], d[0])))
    # Project the nose onto the eye line to measure its sideways offset whatever the roll.
    mid = (le + re) / 2
    yaw = float(np.dot(nose - mid, d / eye_dist) / eye_dist)
    return yaw, roll


def assess(det: Detection, aligned_bgr: np.ndarray, cfg) -> Quality:
    gray = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2GRAY)
    h, w = gray.shape
    centre = gray[h // 8: h - h // 8, w // 8: w - w // 8]  # the face, not the warp's black border
    sharp = sharpness(centre)
    bright = float(centre.mean())
    yaw, roll = pose(det.keypoints)
    checks = [
        (det.size >= cfg.min_face_px, "too_small"),
        (abs(yaw) <= cfg.max_yaw, "pose"),
        (abs(roll) <= cfg.max_roll_deg, "pose"),
        (bright >= cfg.min_brightness, "dark"),
        (bright <= cfg.max_brightness, "bright"),
        (sharp >= cfg.min_sharpness, "blurry"),
    ]
    reason = next((code for ok, code in checks if not ok), "ok")
    return Quality(reason == "ok", reason, det.size, sharp, yaw, roll, bright)


def assess_face(image: np.ndarray, det: Detection, crop: np.ndarray, crop_template, crop_size, cfg) -> Quality:
    """assess() on the crop the limits are set for: `crop` itself when it was aligned with that
    template and size, else a fresh alignment of `image`."""
    if tuple(crop_size) != QUALITY_SIZE or not np.allclose(np.asarray(crop_template, np.float64), QUALITY_TEMPLATE):
        crop = align(image, det, QUALITY_TEMPLATE, QUALITY_SIZE).image
    return assess(det, crop, cfg)
