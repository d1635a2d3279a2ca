"""Doubles for the reliability harness: a model stack without models (so a fault, a stall or a
kill lands in the gate's own code, not in inference), a scriptable live camera driven through the
real threaded adapter, a fake systemd notify socket, and the real line history of a mock pin.

Frames carry who is in them in their top-left pixel: EMPTY (no face), ALICE (enrolled) or
STRANGER. The fake detector reads it, the fake encoder maps it to a one-hot embedding."""
from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from edge import gallery as G
from edge.align import ARCFACE_112
from edge.camera import _ThreadedCamera
from edge.config import Config
from edge.modelcard import CalibrationSpec
from edge.pipeline import Stack
from edge.records import AlignedFace, Detection, Embedding
from reliability import fake_gpiod

EMPTY, ALICE, STRANGER = 60, 120, 180  # marker values; all far from black
DIM = 8
ENCODER_SHA = "e" * 64
DETECTOR_SHA = "d" * 64
BOX = (220.0, 140.0, 200.0, 200.0)
# frontal 5 points inside BOX: eyes level, nose centred (yaw 0, roll 0)
KEYPOINTS = np.array([[280, 200], [360, 200], [320, 240], [290, 280], [350, 280]], np.float32)


def frame_image(who: int, rng: np.random.Generator | None = None, h: int = 480, w: int = 640) -> np.ndarray:
    """A textured (sharp, mid-grey) frame; fresh noise per call so a live source never repeats."""
    rng = rng or np.random.default_rng()
    img = rng.integers(70, 190, size=(h, w, 3), dtype=np.uint8)
    img[:4, :4] = who
    return img


class FakeDetector:
    def __init__(self, stall=None):
        self.card = SimpleNamespace(sha256=DETECTOR_SHA, name="fake-detector")
        self.stall = stall  # called once per frame: the place to inject sleeps or raises

    def detect(self, image: np.ndarray) -> list[Detection]:
        if self.stall is not None:
            self.stall()
        if int(image[0, 0, 0]) == EMPTY:
            return []
        return [Detection(BOX, KEYPOINTS.copy(), 0.9)]


class FakeEncoder:
    sha256 = ENCODER_SHA

    def __init__(self):
        # Its crop counts as the quality gate's own (ArcFace 112), so the gate judges it as it is.
        # One-hot embeddings score 1 or 0; the table puts the fixed threshold 0.5 at FMR 1e-4.
        calibration = CalibrationSpec(dataset="fake", impostor_pairs=1, fmr=[1e-2, 1e-6], threshold=[0.1, 0.9])
        self.card = SimpleNamespace(calibration=calibration, embedding=SimpleNamespace(dim=DIM), name="fake-encoder",
                                    sha256=ENCODER_SHA, alignment=SimpleNamespace(template=ARCFACE_112, size=(112, 112)))

    def align(self, image: np.ndarray, det: Detection) -> AlignedFace:
        crop = image[140:252, 264:376].copy()
        crop[0, 0] = image[0, 0]
        return AlignedFace(crop, det)

    def embed(self, face: AlignedFace, flip: bool | None = None) -> Embedding:  # one colour, mirror or not
        v = np.zeros(DIM, np.float32)
        v[0 if int(face.image[0, 0, 0]) == ALICE else 1] = 1.0
        return Embedding(v, ENCODER_SHA)


def fake_stack(stall=None) -> Stack:
    return Stack(FakeDetector(stall), FakeEncoder())


def fake_config(folder: str | Path) -> Config:
    """Mock pins, fixed threshold (inside the fake encoder's table), every frame decisive
    (k = n = 1, no cooldown), storage in `folder`."""
    folder = Path(folder)
    cfg = Config()
    cfg.match.threshold = 0.5
    cfg.decision.k, cfg.decision.n, cfg.decision.cooldown_s, cfg.decision.backoff_after = 1, 1, 0.0, 100
    cfg.relay.pin_factory = "mock"
    cfg.relay.pulse_s, cfg.relay.max_hold_s = 0.5, 1.0
    cfg.storage.gallery = str(folder / "gallery.fgg")
    cfg.storage.key_file = str(folder / "gallery.key")
    cfg.storage.audit = str(folder / "audit.sqlite3")
    return cfg


def write_gallery(cfg: Config, card: str = "") -> None:
    """Alice enrolled (embedding e0) under the fake encoder, with badge card number `card`."""
    G.new_key_file(cfg.storage.key_file)
    g = G.Gallery(ENCODER_SHA, DIM)
    g.add(G.Person("alice", np.eye(DIM, dtype=np.float32)[0], "A1", card=card))
    G.save(g, cfg.storage.gallery, G.load_key(cfg.storage.key_file))


@contextlib.contextmanager
def patched(obj, name: str, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield value
    finally:
        setattr(obj, name, old)


@contextlib.contextmanager
def fake_models(stall=None):
    """Stack.from_config returns the fake stack for the duration (run_service builds its own)."""
    stack = fake_stack(stall)
    with patched(Stack, "from_config", classmethod(lambda cls, cfg: stack)):
        yield stack


# ------------------------------------------------------------------ a live camera with faults
@dataclass
class Device:
    """A camera device whose behaviour follows a script of (start_s, behaviour) on the monotonic
    clock from `t0`. Behaviours: ("ok", who), ("stall",), ("raise",), ("shape",), ("black",),
    ("frozen", who), ("cycle", who, n): the last n frames delivered, again and again in turn, as a
    stuck driver re-queues its n mmap buffers. Reconnecting opens a new adapter on the same device, as a real
    driver does."""

    script: list[tuple]
    fps: float = 30.0
    t0: float = field(default_factory=time.monotonic)
    opens: list[float] = field(default_factory=list)  # time.monotonic() of each open
    _delivered: list[np.ndarray] = field(default_factory=list)  # the last good frames, newest last
    _stale: list[np.ndarray] = field(default_factory=list)
    _grabs: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def behaviour(self, now: float | None = None) -> tuple:
        t = (time.monotonic() if now is None else now) - self.t0
        current = self.script[0][1:]
        for start, *b in self.script:
            if t >= start:
                current = tuple(b)
        return current

    def grab(self) -> np.ndarray:
        time.sleep(1.0 / self.fps)
        b = self.behaviour()
        while b[0] == "stall":  # a wedged driver: the grab does not return until the device does
            time.sleep(0.02)
            b = self.behaviour()
        kind = b[0]
        if kind == "raise":
            raise OSError("VIDIOC_DQBUF: No such device")
        if kind == "shape":
            return np.zeros((240, 320), np.uint8) + 128
        if kind == "black":
            return np.zeros((480, 640, 3), np.uint8)
        with self._lock:  # adapters left behind by a reconnect may still be grabbing
            if kind in ("frozen", "cycle"):
                n = 1 if kind == "frozen" else b[2]
                if not self._stale:
                    self._stale = (self._delivered[-n:] if self._delivered else [frame_image(b[1])])
                self._grabs += 1
                return self._stale[self._grabs % len(self._stale)]
            self._stale = []
            img = frame_image(b[1])
            self._delivered = self._delivered[-7:] + [img]
        return img

    def open(self) -> _ThreadedCamera:
        self.opens.append(time.monotonic())
        return _ThreadedCamera(self.grab, lambda: None, source="fake-device")


# ------------------------------------------------------------------ systemd notify socket
class NotifySocket:
    """A datagram socket standing in for systemd's: records (time.monotonic(), message)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fgn", dir="/tmp")  # AF_UNIX paths are short
        self.path = os.path.join(self.dir, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def pings(self) -> list[float]:
        return [t for t, m in self.messages if m == "WATCHDOG=1"]

    def close(self) -> None:
        time.sleep(0.05)  # let the last datagrams land
        self._stop = True
        self._thread.join(timeout=1.0)
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
            os.rmdir(self.dir)


# ------------------------------------------------------------------ the relay line as wired
def line_history(pin) -> list[tuple[float, bool]]:
    """(time.monotonic(), level) of every change of a gpiozero MockPin or of the line of a fake
    gpiod request (reliability.fake_gpiod, which keeps it so), oldest first.

    MockPin stores each state with the time since the previous change; the last change happened
    at its `_last_change`, so absolute times are rebuilt backwards from there."""
    if isinstance(pin, fake_gpiod.LineRequest):
        return pin.history
    states = list(pin.states)
    t = pin._last_change
    out = []
    for i in range(len(states) - 1, -1, -1):
        out.append((t, bool(states[i].state)))
        t -= states[i].timestamp
    return out[::-1]


def unlocked_intervals(pin, active_high: bool = True, now: float | None = None) -> list[tuple[float, float]]:
    """(start, duration) of every period the line was at the unlocking level; an open one ends `now`."""
    hist = line_history(pin)
    now = time.monotonic() if now is None else now
    out = []
    for i, (t, level) in enumerate(hist):
        if level == active_high:
            end = hist[i + 1][0] if i + 1 < len(hist) else now
            out.append((t, end - t))
    return out


class RelaySpy:
    """Replaces edge.relay.DoorRelay inside `with RelaySpy() as spy:`; keeps each relay and its pin
    (the pin object survives close(), with its whole history)."""

    def __init__(self):
        import edge.relay as relay_mod

        self._mod = relay_mod
        self.relays = []
        spy = self

        class Spied(relay_mod.DoorRelay):
            def __init__(self, *a, **kw):
                super().__init__(*a, **kw)
                self.line = self.pin
                spy.relays.append(self)

        self._cls = Spied

    def __enter__(self) -> RelaySpy:
        self._old = self._mod.DoorRelay
        self._mod.DoorRelay = self._cls
        return self

    def __exit__(self, *exc) -> None:
        self._mod.DoorRelay = self._old

    @property
    def relay(self):
        return self.relays[-1]


def audit_rows(path: str | Path) -> list[dict]:
    import sqlite3

    conn = sqlite3.connect(str(path))
    try:
        cur = conn.execute("SELECT * FROM audit ORDER BY id")
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r)) for r in cur.fetchall()]
    finally:
        conn.close()


def sigterm_after(seconds: float) -> threading.Timer:
    """SIGTERM to this process after `seconds`, as systemd stops the service."""
    import signal

    t = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
    t.daemon = True
    t.start()
    return t
