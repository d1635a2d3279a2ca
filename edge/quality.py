"""Quality gate before embedding: size, pose, exposure and blur, each with a reason code. Pure.

Exposure is judged on the picture, not on the skin. The mean grey level of a face measures the
person's skin tone as much as the light (a dark-skinned face, correctly exposed, reads as dark as
a light-skinned face two stops under), so no check here uses it. Instead:
- the picture's highlights: the 99th percentile of the face with its surroundings (the face box
  doubled: eye whites, teeth, skin shine, hair, collar, background), which do not depend on
  pigment, each pixel read in its brightest channel as for back-light below: where the skin is the
  brightest thing near the face, grey took a darker skin's mostly red light for less exposure and
  refused the same picture with a darker skin sooner. Too low: underexposed;
- the face's dynamic range in stops of light: its brightest few pixels (eye whites, teeth, shine)
  over its darkest few (pupils, nostrils, the mouth's corners), features every face has whatever
  its skin, as a ratio in linear light. A veil (fog, flare, a washed-out picture) lifts the
  darkest pixels and shrinks it; a dimmer light scales both ends alike and leaves it unchanged (a
  difference of grey levels shrank with the light, and from a lower start on darker skin, so it
  refused darker faces sooner as the light went). Too small: washed out;
- back-light: the face's brightest pixel (in its interior: a catchlight, an eye white, teeth,
  shine) against its surroundings' highlights, each pixel read in its brightest colour channel,
  the one nearest the sensor's full scale. A face much darker than a bright background behind it
  has been exposed for the background. The brightest pixel, not the brightest few: a catchlight
  or a glint of shine is light reflected off the surface, as bright on any skin, while the next
  brightest pixels of a matte face are skin, which reflects less light the darker it is (the
  99.5th percentile refused the darker skins' tail half a stop sooner). Grey levels weigh red by
  0.3 only, so they read the highlights of a face whose light comes back mostly red (darker, more
  saturated skin) darker than the exposure they show;
- information lost: the share of the face clipped to white or crushed to black;
- blur: the Laplacian's share of the face's contrast (variance of the Laplacian over the variance
  of the grey levels), which a darker face or a dimmer light leaves unchanged, where the plain
  Laplacian variance falls with the square of the contrast."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .align import ARCFACE_112, align, similarity_transform
from .records import Detection, Quality

# The limits (sharpness above all) are set on this crop, the ArcFace 112 px template the default
# encoder uses. A face for an encoder with another template (dlib's wider 150 px chip reads
# blurrier: 93 LFW photos refused where the 112 crop refuses 3) is judged on this crop too, so one
# set of limits means the same for every encoder.
QUALITY_TEMPLATE, QUALITY_SIZE = ARCFACE_112, (112, 112)
# On that crop: the face without the warp's black border, and its interior (brows to below the
# mouth, between the outer eye corners), where neither hair nor what is behind the head shows on
# a frontal face: a bright window beside the cheek must not count as the face's highlights.
FACE_CENTRE = np.s_[14:98, 14:98]
FACE_INTERIOR = np.s_[28:100, 22:90]


def sharpness(gray: np.ndarray) -> float:
    """Variance of the Laplacian: low on blurred or defocused faces, and on low-contrast ones."""
    return float(cv2.Laplacian(gray, cv2.CV_64F).var())


def detail(gray: np.ndarray) -> float:
    """Variance of the Laplacian over the variance of the grey levels: the share of the face's
    contrast in fine detail. A gain (exposure, skin tone) scales both alike, so it cancels; blur
    removes the fine detail only. 0 for a flat image."""
    var = float(np.asarray(gray, np.float64).var())
    return sharpness(gray) / var if var > 1e-9 else 0.0


@dataclass(frozen=True)
class Exposure:
    highlight: float  # 99th percentile of the face and its surroundings, brightest channel
    contrast: float  # stops from the face's 0.5th to its 99.5th percentile, in linear light
    backlight: float  # face interior's brightest pixel / its surroundings' 99th percentile, brightest channel (1 where nothing surrounds it)
    clipped: float  # share of the face at 250 or above
    crushed: float  # share of the face at 5 or below


def grey(image: np.ndarray) -> np.ndarray:
    if image.ndim == 2:
        return image
    return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY) if image.size else image[..., 0]


def peak(image: np.ndarray) -> np.ndarray:
    """Each pixel's brightest channel: how near the sensor came to full scale there."""
    return image.max(axis=2) if image.ndim == 3 else image


def doubled_box(frame: np.ndarray, box) -> tuple[np.ndarray, np.ndarray]:
    """The face box doubled about its centre, clipped to the frame (a view of `frame`, BGR or
    grey: only this region is converted, not the whole frame, since this runs on every judged
    frame), and which of its pixels lie inside the face box itself."""
    h, w = frame.shape[:2]
    x, y, bw, bh = (float(v) for v in box)
    cx, cy = x + bw / 2, y + bh / 2
    x0, y0 = int(max(0, np.floor(cx - bw))), int(max(0, np.floor(cy - bh)))
    x1, y1 = int(min(w, np.ceil(cx + bw))), int(min(h, np.ceil(cy + bh)))
    region = frame[y0:y1, x0:x1]
    inside = np.zeros(region.shape[:2], bool)
    inside[int(max(0, y - y0)):int(max(0, y + bh - y0)), int(max(0, x - x0)):int(max(0, x + bw - x0))] = True
    return region, inside


def in_frame(det: Detection, frame_shape, size: tuple[int, int] = QUALITY_SIZE) -> np.ndarray:
    """Which pixels of the aligned crop come from inside the frame (the warp fills the rest with
    black, which is no shadow of the face)."""
    m = similarity_transform(det.keypoints, np.asarray(QUALITY_TEMPLATE, np.float64))
    inv = cv2.invertAffineTransform(m)
    yy, xx = np.mgrid[:size[1], :size[0]].astype(np.float64)
    fx = inv[0, 0] * xx + inv[0, 1] * yy + inv[0, 2]
    fy = inv[1, 0] * xx + inv[1, 1] * yy + inv[1, 2]
    h, w = frame_shape[:2]
    return (fx >= 0) & (fx <= w - 1) & (fy >= 0) & (fy <= h - 1)


def _linear(x: np.ndarray) -> np.ndarray:
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)


_LINEAR_8BIT = _linear(np.arange(256) / 255.0)


def linear_light(srgb) -> np.ndarray:
    """sRGB levels (0-255, any shape) as linear light (0-1): the light the camera saw."""
    if isinstance(srgb, np.ndarray) and srgb.dtype == np.uint8:
        return _LINEAR_8BIT[srgb]  # a picture: one look-up per pixel
    return _linear(np.asarray(srgb, np.float64) / 255.0)


def exposure(frame: np.ndarray, box, face: np.ndarray, face_peak: np.ndarray) -> Exposure:
    """The exposure measures of one face: `frame` the whole frame (BGR or grey), `box` the face
    box in it, `face` the aligned face's grey levels (without the warp's border) and `face_peak`
    its interior's brightest channel."""
    region, inside = doubled_box(frame, box)
    lit = peak(region)
    hi = float(np.percentile(lit if region.size else face, 99))
    face_lo, face_hi = (float(v) for v in np.percentile(face, [0.5, 99.5]))
    surround = lit[~inside]
    around = float(np.percentile(surround, 99)) if surround.size >= 16 else 0.0
    # half a grey level at least: a face with pure black in it has all the range it can show
    stops = float(np.log2(linear_light(max(face_hi, 0.5)) / linear_light(max(face_lo, 0.5))))
    return Exposure(hi, stops, float(face_peak.max()) / around if around > 0 else 1.0,
                    float((face >= 250).mean()), float((face <= 5).mean()))


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


def assess(image: np.ndarray, det: Detection, aligned_bgr: np.ndarray, cfg) -> Quality:
    """Judge one face: `image` the whole frame (BGR), `det` the face in it, `aligned_bgr` the face
    on the quality template (QUALITY_SIZE)."""
    gray = grey(aligned_bgr)
    seen = in_frame(det, image.shape, gray.shape[::-1])

    def seen_part(levels: np.ndarray, region) -> np.ndarray:
        # A face cut by the frame's edge is judged on the part the camera saw.
        ok = seen[region]
        return levels[region][ok] if ok.sum() >= 64 else levels[region].ravel()

    centre = gray[FACE_CENTRE]
    ex = exposure(image, det.box, seen_part(gray, FACE_CENTRE), seen_part(peak(aligned_bgr), FACE_INTERIOR))
    sharp = detail(centre)
    yaw, roll = pose(det.keypoints)
    checks = [
        (det.size >= cfg.min_face_px, "too_small"),
        (abs(yaw) <= cfg.max_yaw, "pose"),
        (abs(roll) <= cfg.max_roll_deg, "pose"),
        # Blur before exposure: smearing also flattens the face's range, which would read as washed out.
        (sharp >= cfg.min_detail, "blurry"),
        (ex.highlight >= cfg.min_highlight, "underexposed"),
        (ex.clipped <= cfg.max_clipped, "clipped"),
        (ex.crushed <= cfg.max_crushed, "crushed"),
        (ex.contrast >= cfg.min_contrast_stops, "low_contrast"),
        (ex.backlight >= cfg.min_backlight, "backlit"),
    ]
    reason = next((code for ok, code in checks if not ok), "ok")
    return Quality(reason == "ok", reason, det.size, sharp, yaw, roll, ex)


def assess_face(image: np.ndarray, det: Detection, crop: np.ndarray, crop_template, crop_size, cfg) -> Quality:
    """assess() on the crop the limits are set for: `crop` itself when it was aligned with that
    template and size, else a fresh alignment of `image`."""
    if tuple(crop_size) != QUALITY_SIZE or not np.allclose(np.asarray(crop_template, np.float64), QUALITY_TEMPLATE):
        crop = align(image, det, QUALITY_TEMPLATE, QUALITY_SIZE).image
    return assess(image, det, crop, cfg)
