"""The embedded default demo: replayed 640x480 frames of real faces (registry-fetched sample
photos), an enrolled person, a simulated printed-photo attack, a stranger, a blurred face and
empty frames, with mock GPIO pins.

Enrolled: obama.jpg (as "obama") and astronaut.png (as "astronaut"). The visitor frames use other
photos: obama2.jpg (the enrolled person, a different photo), biden.jpg (a stranger), obama2.jpg
blurred (low quality), and an empty corner of astronaut.png (no face). The attack is obama.jpg
printed and held to the camera, a SIMULATION (edge/spoof.py). The "live" visitors are themselves
rendered from still photos: what the demo shows is the passive PAD model telling a clean capture
from a print-like one. Blinks and head motion cannot be shown with stills."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from .atomic import atomic_write_bytes
from .config import REPO, Config
from .imageio import load_image

SAMPLES = REPO / "models" / "raw" / "images"
DEMO_DIR = REPO / "var" / "demo"
ENROLL = {"obama": "obama.jpg", "astronaut": "astronaut.png"}

# (label, source photo, frames, treatment): the replay, in order. The attack comes first, so
# the denials it earns are cleared by the enrolled person's grant and never add up to a back-off.
SCRIPT = [
    ("empty", "astronaut.png", 4, "empty"),
    ("print-attack-SIMULATED", "obama.jpg", 10, "print"),
    ("empty", "astronaut.png", 4, "empty"),
    ("obama", "obama2.jpg", 6, "walk"),
    ("empty", "astronaut.png", 4, "empty"),
    ("stranger", "biden.jpg", 8, "walk"),
    ("empty", "astronaut.png", 4, "empty"),
    ("blurred", "obama2.jpg", 6, "blur"),
    ("empty", "astronaut.png", 4, "empty"),
]
FRAME_W, FRAME_H = 640, 480


def fit(image: np.ndarray, w: int = FRAME_W, h: int = FRAME_H, zoom: float = 1.0, dx: int = 0) -> np.ndarray:
    """Scale a portrait photo into a landscape camera frame, as a face at a door would fill it."""
    f = zoom * min(w / image.shape[1], h / image.shape[0])
    small = cv2.resize(image, (max(1, round(image.shape[1] * f)), max(1, round(image.shape[0] * f))), interpolation=cv2.INTER_AREA)
    canvas = np.full((h, w, 3), 96, np.uint8)
    y0, x0 = (h - small.shape[0]) // 2, (w - small.shape[1]) // 2 + dx
    ys, xs = max(0, y0), max(0, x0)
    ye, xe = min(h, y0 + small.shape[0]), min(w, x0 + small.shape[1])
    canvas[ys:ye, xs:xe] = small[ys - y0:ye - y0, xs - x0:xe - x0]
    return canvas


def render(treatment: str, src: np.ndarray, i: int) -> np.ndarray:
    if treatment == "empty":  # the flag and suit below the astronaut's face: a scene with no face
        return cv2.resize(src[300:512, 0:180], (FRAME_W, FRAME_H), interpolation=cv2.INTER_LINEAR)
    if treatment == "print":  # held still for 4 frames, then moved rigidly, in front of the same room
        from .detect import load_detector
        from .spoof import backdrop, held_still_then_moved, hold, print_sheet

        face = max(load_detector(Config().models.detector).detect(src), key=lambda d: d.size)
        sheet, centre, face_h = print_sheet(src, face)
        room = backdrop(load_image(SAMPLES / "astronaut.png")[300:512, 0:180])
        return hold(sheet, centre, face_h, room, held_still_then_moved(4, 6)[i], seed=i)
    # walking up: a little closer each frame, from the distance where the face is 150-170 px tall
    frame = fit(src, zoom=1.4 + 0.03 * i, dx=4 * i)
    if treatment == "blur":
        frame = cv2.GaussianBlur(frame, (0, 0), 6)
    return frame


def demo_frames_dir(out: Path = DEMO_DIR / "frames") -> Path:
    """Write the replay frames (idempotent) and return their folder."""
    if out.is_dir() and sorted(p.name for p in out.glob("*.png")) != frame_names():
        for p in out.glob("*.png"):  # frames of another script: replayed together they would mislead
            p.unlink()
    out.mkdir(parents=True, exist_ok=True)
    k = 0
    for label, photo, n, treatment in SCRIPT:
        src = load_image(SAMPLES / photo)
        for i in range(n):
            path = out / f"{k:03d}_{label}.png"
            if not path.exists():
                ok, buf = cv2.imencode(".png", render(treatment, src, i))
                atomic_write_bytes(path, buf.tobytes())
            k += 1
    return out


def frame_names() -> list[str]:
    names, k = [], 0
    for label, _, n, _ in SCRIPT:
        names += [f"{k + i:03d}_{label}.png" for i in range(n)]
        k += n
    return names


def describe() -> str:
    return ("demo: replayed frames, mock relay. Scenes: empty room; a printed photo of the enrolled person held "
            "still, then moved (a SIMULATION of a print attack: edge/spoof.py); the enrolled person walking up "
            "(rendered from a still photo); a stranger; a blurred face. Liveness here is the passive PAD model "
            "telling a clean capture from a print-like one; blinks and head motion cannot be shown with stills.")


def demo_config() -> Config:
    cfg = Config()
    cfg.camera.source, cfg.camera.path, cfg.camera.fps = "replay", str(demo_frames_dir()), 10.0
    cfg.relay.pin_factory = "mock"
    cfg.storage.gallery = str(DEMO_DIR / "gallery.fgg")
    cfg.storage.key_file = str(DEMO_DIR / "gallery.key")
    cfg.storage.audit = str(DEMO_DIR / "audit.sqlite3")
    return cfg
