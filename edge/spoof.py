"""Simulated presentation attacks: a photo printed on paper, or shown on a phone screen, held in
front of the camera. For the demo, the tests and the liveness evaluation, where no attack data
of our own exists (NUAA has prints only, no screens).

These are SIMULATIONS built from ordinary photos, not captures of real attacks. Each step models
one physical effect a camera sees when it films a picture instead of a face:
- print: the face cropped and printed with a white paper border (the edge a held print shows),
  a narrower gamut (paper white is dull, ink black is grey, colours desaturate), a rotated
  halftone screen per ink (dots that beat with the sensor grid into moire), paper grain, then
  held at an angle with a little perspective, lit unevenly, seen through a slightly soft lens,
  sensor noise and JPEG;
- screen: the face on a phone display (black bezel, RGB sub-pixel stripes that alias into
  moire, a bluish white point and lifted blacks, horizontal refresh banding, a specular glare
  band), held the same way.
What they cannot model: real ink and paper reflectance, a real display's emission spectrum and
PWM flicker, the hand that holds them. Their scores say how a model reacts to these cues, not
how it fares against real attacks."""
from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from .records import Detection

FRAME_W, FRAME_H = 640, 480


@dataclass(frozen=True)
class Pose:
    """Where the held picture is: the face's height in frame pixels, in-plane angle (degrees),
    perspective tilt (share by which the far edge shrinks) and shift of the face from the frame
    centre (pixels)."""

    face_px: float = 170.0
    angle: float = 0.0
    tilt: float = 0.0
    shift: tuple[float, float] = (0.0, 0.0)


def face_crop(photo: np.ndarray, face: Detection, margin: float) -> tuple[np.ndarray, tuple[float, float], float]:
    """The part of the photo an attacker prints or shows: the face with `margin` x its height on
    each side (portrait 4:5). Returns the crop, the face centre in it and the face height."""
    x, y, w, h = face.box
    cx, cy = x + w / 2.0, y + h / 2.0
    half_h = (0.5 + margin) * h
    half_w = 0.8 * half_h
    x0, y0 = int(max(0, cx - half_w)), int(max(0, cy - half_h))
    x1, y1 = int(min(photo.shape[1], cx + half_w)), int(min(photo.shape[0], cy + half_h))
    return photo[y0:y1, x0:x1], (cx - x0, cy - y0), float(h)


def halftone(image: np.ndarray, period: float, depth: float) -> np.ndarray:
    """A rotated dot screen per colour channel (15, 75, 45 degrees, as CMY inks are screened)."""
    yy, xx = np.mgrid[:image.shape[0], :image.shape[1]].astype(np.float32)
    out = image.astype(np.float32).copy()
    for c, deg in zip(range(3), (15.0, 75.0, 45.0)):
        t = np.deg2rad(deg)
        u = (xx * np.cos(t) + yy * np.sin(t)) * (2 * np.pi / period)
        v = (-xx * np.sin(t) + yy * np.cos(t)) * (2 * np.pi / period)
        out[..., c] *= 1.0 + depth * np.cos(u) * np.cos(v)
    return out


def print_sheet(photo: np.ndarray, face: Detection, margin: float = 0.6, seed: int = 0
                ) -> tuple[np.ndarray, tuple[float, float], float]:
    """The printed sheet (float BGR) at 3x the photo's resolution, the face centre on it and the
    face height on it."""
    rng = np.random.default_rng(seed)
    crop, (fx, fy), fh = face_crop(photo, face, margin)
    up = 3
    ink = cv2.resize(crop, None, fx=up, fy=up, interpolation=cv2.INTER_CUBIC).astype(np.float32)
    grey = ink.mean(axis=2, keepdims=True)
    ink = grey + 0.7 * (ink - grey)  # inks desaturate
    ink = 45.0 + ink * (180.0 / 255.0)  # paper white ~225, ink black ~45
    ink = halftone(ink, period=4.0, depth=0.18)
    border = int(0.06 * ink.shape[0])
    sheet = np.full((ink.shape[0] + 2 * border, ink.shape[1] + 2 * border, 3), 228.0, np.float32)
    sheet[border:-border, border:-border] = ink
    sheet += rng.normal(0.0, 5.0, sheet.shape[:2])[..., None]  # paper grain
    return np.clip(sheet, 0, 255), (fx * up + border, fy * up + border), fh * up


def screen_sheet(photo: np.ndarray, face: Detection, margin: float = 0.9, seed: int = 0
                 ) -> tuple[np.ndarray, tuple[float, float], float]:
    """The photo on a phone display: sub-pixel stripes, display gamut, refresh banding, bezel."""
    rng = np.random.default_rng(seed)
    crop, (fx, fy), fh = face_crop(photo, face, margin)
    sub = 3  # each display pixel is three vertical stripes, R G B
    shown = cv2.resize(crop, None, fx=sub, fy=sub, interpolation=cv2.INTER_NEAREST).astype(np.float32)
    stripes = np.zeros_like(shown)
    for c_bgr, col in ((2, 0), (1, 1), (0, 2)):  # R, G, B stripes left to right
        stripes[:, col::sub, c_bgr] = shown[:, col::sub, c_bgr] * 2.4
    shown = 0.75 * stripes + 0.25 * shown  # the diffuser blends neighbours a little
    shown = 18.0 + shown * (225.0 / 255.0)  # lifted blacks (backlight leak), dimmed whites
    shown *= np.array([1.08, 1.0, 0.92], np.float32)  # bluish white point (BGR)
    rows = np.arange(shown.shape[0], dtype=np.float32)
    shown *= (1.0 + 0.06 * np.sin(2 * np.pi * rows / (shown.shape[0] / 7.3)))[:, None, None]  # refresh banding
    bezel = int(0.05 * shown.shape[1])
    top = int(0.12 * shown.shape[0])
    phone = np.full((shown.shape[0] + 2 * top, shown.shape[1] + 2 * bezel, 3), 12.0, np.float32)
    phone[top:-top, bezel:-bezel] = shown
    phone += rng.normal(0.0, 1.5, phone.shape[:2])[..., None]
    return np.clip(phone, 0, 255), (fx * sub + bezel, fy * sub + top), fh * sub


def hold(sheet: np.ndarray, face_centre: tuple[float, float], face_h: float, background: np.ndarray,
         pose: Pose = Pose(), glare: float = 0.15, seed: int = 0) -> np.ndarray:
    """The sheet held in front of `background` (a 640x480 BGR scene) and filmed: perspective,
    uneven light with a specular spot, soft lens, sensor noise, JPEG. Returns the BGR frame."""
    rng = np.random.default_rng(seed)
    s = pose.face_px / face_h
    h, w = sheet.shape[:2]
    src = np.float32([[0, 0], [w, 0], [w, h], [0, h]])
    pts = (src - np.float32(face_centre)) * s
    pts[1:3, 1] *= 1.0 - pose.tilt  # the right edge is further from the camera
    r = np.deg2rad(pose.angle)
    rot = np.float32([[np.cos(r), -np.sin(r)], [np.sin(r), np.cos(r)]])
    dst = pts @ rot.T + np.float32([FRAME_W / 2 + pose.shift[0], FRAME_H / 2 - 20 + pose.shift[1]])
    m = cv2.getPerspectiveTransform(src, dst.astype(np.float32))
    picture = cv2.warpPerspective(sheet, m, (FRAME_W, FRAME_H), flags=cv2.INTER_AREA)
    mask = cv2.warpPerspective(np.ones((h, w), np.float32), m, (FRAME_W, FRAME_H), flags=cv2.INTER_LINEAR)[..., None]
    yy, xx = np.mgrid[:FRAME_H, :FRAME_W].astype(np.float32)
    light = 1.0 + glare * np.exp(-((xx - 0.65 * FRAME_W) ** 2 + (yy - 0.3 * FRAME_H) ** 2) / (2 * 120.0 ** 2))
    frame = background.astype(np.float32) * (1 - mask) + picture * light[..., None] * mask
    frame = cv2.GaussianBlur(np.clip(frame, 0, 255).astype(np.uint8), (0, 0), 1.0)
    frame = np.clip(frame + rng.normal(0.0, 2.5, frame.shape), 0, 255).astype(np.uint8)
    ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, 80])
    return cv2.imdecode(buf, cv2.IMREAD_COLOR)


def held_still_then_moved(n_still: int, n_moving: int, seed: int = 0) -> list[Pose]:
    """An attacker's hand: the picture held still (tremor of a pixel or two), then moved rigidly
    (slid, turned and tilted a little, as a flat object moves)."""
    rng = np.random.default_rng(seed)
    poses = [Pose(170.0, float(rng.uniform(-0.5, 0.5)), 0.0, tuple(rng.uniform(-1.5, 1.5, 2))) for _ in range(n_still)]
    for i in range(n_moving):
        a = (i + 1) / max(n_moving, 1)
        poses.append(Pose(170.0 + 20.0 * a, 4.0 * a, 0.08 * a, (30.0 * a, -10.0 * a)))
    return poses


def backdrop(scene: np.ndarray) -> np.ndarray:
    """A defocused 640x480 background from any photo: what is behind the held picture."""
    return cv2.GaussianBlur(cv2.resize(scene, (FRAME_W, FRAME_H), interpolation=cv2.INTER_AREA), (0, 0), 8)
