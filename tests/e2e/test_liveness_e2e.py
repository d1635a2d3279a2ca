"""Liveness end to end. A printed photo of an enrolled person must never pulse the relay; live
frames of the same person must.

(a) Through `python -m edge run` (the installed gate's command, its default liveness: the shipped
    PAD model) with a replay camera and gpiozero mock pins:
    - NUAA: real printed-photo attacks and live webcam frames of NUAA test subjects (the third
      capture session), enrolled from one live frame. Skips where ../shared is absent.
    - registry photos, runnable in CI: a SIMULATED print (edge/spoof.py) of the enrolled person's
      photo, held still then moved, and the enrolled person walking up (rendered from a still).
(b) The blink-or-motion policy on the registry photos (a Gate in process): see its docstring.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
import yaml

from edge import gallery as G
from edge.config import Config
from edge.detect import load_detector
from edge.enroll import apply, embed_photo
from edge.imageio import load_image
from edge.liveness import make_liveness
from edge.pad import FACE_MESH, SHIPPED_PAD
from edge.pipeline import Gate, Stack
from edge.records import Frame
from edge.relay import DoorRelay
from tests.unit._stack import SFACE_THRESHOLD, model_cards

REPO = Path(__file__).resolve().parents[2]
# The shipped PAD model, or another card (FACEGATE_PAD_CARD=out/liveness/pad_int8.card.json).
PAD_CARD = Path(os.environ.get("FACEGATE_PAD_CARD") or SHIPPED_PAD)

# NUAA test subjects never seen in any PAD training here (train = subjects 0001-0009), with live
# and print frames in the test split. Fixed before looking at any per-subject result.
NUAA_SUBJECTS = ("0010", "0012")


def make_gate(mode: str, enroll: dict[str, np.ndarray], mock_factory, threshold: float | None = None):
    det, enc = model_cards()
    cfg = Config()
    cfg.models.detector, cfg.models.encoder = det, enc
    cfg.match.threshold = SFACE_THRESHOLD
    cfg.relay.pin_factory = "mock"
    cfg.relay.pulse_s, cfg.relay.max_hold_s = 2.0, 3.0  # long: a slow CI frame must not expire the grant
    cfg.decision.k, cfg.decision.n, cfg.decision.cooldown_s = 2, 3, 600.0
    cfg.decision.backoff_after = 100  # these tests count pulses, not back-off
    cfg.liveness.mode, cfg.liveness.threshold = mode, threshold
    cfg.models.liveness = str(PAD_CARD)
    stack = Stack.from_config(cfg)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    results = [embed_photo(stack, cfg.quality, img, name, name) for name, img in enroll.items()]
    assert all(r.ok for r in results), [r.reason for r in results]
    apply(g, results, 30)
    relay = DoorRelay(cfg.relay, mock_factory)
    return Gate(cfg, stack, g, relay=relay, liveness=make_liveness(cfg)), relay


def play(gate, images) -> list:
    out = []
    for i, img in enumerate(images):
        out.append(gate.process(Frame(img, time.monotonic(), time.time(), i, "test")))
    return out


# ---------------------------------------------------------------- (a) through `edge run`

class InstalledGate:
    """A gate as `python -m edge run --config FILE` runs it: default models and liveness, replay
    camera, mock pins, a real gallery and audit under tmp_path."""

    def __init__(self, tmp_path: Path, enroll: dict[str, np.ndarray]):
        self.dir = tmp_path
        photos = tmp_path / "enroll"
        photos.mkdir()
        for name, img in enroll.items():
            cv2.imwrite(str(photos / f"{name}.png"), img)
        self.config = tmp_path / "gate.yaml"
        self.visits = 0
        self._write_config(tmp_path / "frames-none")
        G.new_key_file(tmp_path / "gallery.key")
        r = self._cli("enroll", str(photos))
        assert r.returncode == 0, r.stdout + r.stderr

    def _write_config(self, frames: Path) -> None:
        cfg = {"camera": {"source": "replay", "path": str(frames), "fps": 15},
               "relay": {"pin_factory": "mock", "pulse_s": 2.0, "max_hold_s": 3.0},
               "decision": {"cooldown_s": 600, "backoff_after": 100},
               "storage": {"gallery": "gallery.fgg", "key_file": "gallery.key", "audit": "audit.sqlite3"}}
        if PAD_CARD != SHIPPED_PAD:
            cfg["models"] = {"liveness": str(PAD_CARD)}
        self.config.write_text(yaml.safe_dump(cfg))

    def _cli(self, *args):
        return subprocess.run([sys.executable, "-m", "edge", *args, "--config", str(self.config)], cwd=REPO,
                              capture_output=True, text=True, timeout=600)

    def visit(self, frames: list[np.ndarray]) -> tuple[int, list[tuple]]:
        """Replay the frames through `edge run`; the door openings it reports and this visit's
        audited decisions (reason, identity, details)."""
        self.visits += 1
        folder = self.dir / f"visit{self.visits}"
        folder.mkdir()
        for i, img in enumerate(frames):
            cv2.imwrite(str(folder / f"{i:04d}.png"), img)
        self._write_config(folder)
        before = self._decisions()
        r = self._cli("run")
        assert r.returncode == 0, r.stdout + r.stderr
        done = [ln for ln in r.stdout.splitlines() if ln.startswith("done:")]
        assert done, r.stdout
        openings = int(done[0].split(",")[1].split()[0])
        return openings, self._decisions()[len(before):]

    def _decisions(self) -> list[tuple]:
        db = self.dir / "audit.sqlite3"
        if not db.exists():
            return []
        with sqlite3.connect(db) as con:
            return con.execute("SELECT reason, identity, details FROM audit WHERE kind = 'decision' ORDER BY id").fetchall()


def nuaa_frames(root: Path, kind: str, subject: str) -> list[Path]:
    """Test-split frames of one subject, sequence by sequence, each in frame order."""
    lst = {"live": "client_test_raw.txt", "print": "imposter_test_raw.txt"}[kind]
    paths = [root / line.strip() for line in (root / lst).read_text().splitlines() if f"/{subject}_" in line]
    return sorted(paths, key=lambda p: (p.stem.rsplit("_", 1)[0], int(p.stem.rsplit("_", 1)[1])))


@pytest.mark.parametrize("subject", NUAA_SUBJECTS)
def test_nuaa_printed_photo_never_opens_live_face_does(shared, subject, tmp_path, model_cards):
    root = shared / "data" / "nuaa"
    live = nuaa_frames(root, "live", subject)
    prints = nuaa_frames(root, "print", subject)
    assert len(live) >= 4 and prints, (len(live), len(prints))
    # staff enrolment: the subject's first live frame; it is not replayed below
    gate = InstalledGate(tmp_path, {subject: load_image(live[0])})
    openings, attack = gate.visit([load_image(p) for p in prints])
    assert openings == 0, [d for d in attack if d[0] == "granted"]
    assert any(reason == "liveness" for reason, _, _ in attack), attack
    # the printed face is recognised as the subject: only liveness keeps the door shut
    assert any(subject in (ident or "") or f'"{subject}"' in (details or "") for _, ident, details in attack)
    openings, genuine = gate.visit([load_image(p) for p in live[1:]])
    assert openings == 1, [d[0] for d in genuine]
    assert {ident for reason, ident, _ in genuine if reason == "granted"} == {subject}


def test_simulated_print_never_opens_the_walk_up_does(samples, tmp_path, model_cards):
    """SIMULATION (edge/spoof.py): obama.jpg printed with a paper border, held still, then moved
    rigidly; the "live" visitor is obama2.jpg rendered as a walk-up (a still photo too). What this
    checks is the passive model telling a clean capture from a print-like one, end to end."""
    from edge.demo import fit
    from edge.spoof import backdrop, held_still_then_moved, hold, print_sheet

    enrolled = load_image(samples / "obama.jpg")
    gate = InstalledGate(tmp_path, {"obama": enrolled})
    face = max(load_detector(str(model_cards["detector"])).detect(enrolled), key=lambda d: d.size)
    sheet, centre, face_h = print_sheet(enrolled, face)
    room = backdrop(load_image(samples / "astronaut.png")[300:512, 0:180])
    openings, attack = gate.visit([hold(sheet, centre, face_h, room, pose, seed=i)
                                   for i, pose in enumerate(held_still_then_moved(4, 6))])
    assert openings == 0, attack
    assert [r for r, _, _ in attack] and {r for r, _, _ in attack} <= {"liveness"}, attack
    walk = load_image(samples / "obama2.jpg")
    openings, genuine = gate.visit([fit(walk, zoom=1.4 + 0.03 * i, dx=4 * i) for i in range(6)])
    assert openings == 1, genuine
    assert [ident for r, ident, _ in genuine if r == "granted"] == ["obama"]


# ---------------------------------------------------------------- (b) simulation, CI-runnable

FRAME = (640, 480)


def place(image: np.ndarray, det, angle: float = 0.0, zoom: float = 1.0, shift=(0.0, 0.0)) -> np.ndarray:
    """The photo in a 640x480 camera frame with its face centred at 210 px tall, moved rigidly."""
    x, y, w, h = det.box
    s = zoom * 210.0 / h
    m = cv2.getRotationMatrix2D((x + w / 2, y + h / 2), angle, s)
    m[:, 2] += np.array([FRAME[0] / 2 + shift[0], FRAME[1] / 2 + shift[1]]) - np.array([x + w / 2, y + h / 2])
    return cv2.warpAffine(image, m, FRAME, flags=cv2.INTER_AREA, borderMode=cv2.BORDER_CONSTANT, borderValue=(96, 96, 96))


def test_simulated_photo_of_a_photo_is_denied_by_the_motion_and_blink_policy(samples, mock_factory):
    """SIMULATION, not an attack database. Limits, stated plainly:
    - the "attack" is obama2.jpg printed by edge/spoof.py and held in front of the camera for 12
      frames, moved only rigidly (hand tremor: a few pixels, a degree, 2% size); it is no real
      print, so it tests the temporal cues, not the passive model;
    - the "live" person is three different photographs of the same man (obama, obama2, obama3)
      placed at the same spot in turn: their pose and expression differ as a moving head's would,
      but it is not video, and nothing here models a real blink's timing;
    - the passive threshold is set to 0 here, so only the blink/motion cue decides (mode
      "passive+blink"); the passive model is measured by `python -m evaluation liveness`.
    A real video replay would show motion and blinks and pass this cue: see train/README-liveness.md."""
    from edge.spoof import Pose, backdrop, hold, print_sheet

    if not FACE_MESH.is_file():
        pytest.skip(f"{FACE_MESH} missing: run `python -m export fetch`")
    det = load_detector(model_cards()[0])
    photos = {n: load_image(samples / f) for n, f in (("a", "obama.jpg"), ("b", "obama2.jpg"), ("c", "obama3.jpg"))}
    faces = {n: max(det.detect(img), key=lambda d: d.size) for n, img in photos.items()}
    gate, relay = make_gate("passive+blink", {"obama": photos["a"]}, mock_factory, threshold=0.0)
    try:
        rng = np.random.default_rng(0)
        sheet, centre, face_h = print_sheet(photos["b"], faces["b"])
        room = backdrop(photos["a"])
        held = [hold(sheet, centre, face_h, room, Pose(rng.uniform(200, 204), rng.uniform(-1, 1), 0.0,
                                                      tuple(rng.uniform(-3, 3, 2))), seed=i) for i in range(12)]
        attack = play(gate, held)
        assert relay.stats.openings == 0, [d.reason for d in attack]
        why = [d.reason for d in attack]
        assert "liveness" in why and set(why) <= {"pending", "liveness"}, why
        time.sleep(gate.cfg.decision.track_timeout_s + 0.1)  # the attacker leaves: the track times out
        moving = [place(photos[n], faces[n], shift=(4 * i, 0)) for i, n in enumerate("bcbcbc")]
        genuine = play(gate, moving)
        assert relay.stats.openings == 1, [d.reason for d in genuine]
        assert [d.identity for d in genuine if d.grant] == ["obama"]
    finally:
        relay.close()
