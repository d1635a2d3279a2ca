"""Frame sources behind one small interface, and a health monitor that classifies their faults.

`Camera.read(timeout_s)` returns the next `Frame`, or None. None with `camera.fault` None is the
end of a replay; None with `fault` set means no frame arrived (a stall or a failed device). Live
sources read in a background thread, so a wedged driver makes `read` return after its timeout
instead of hanging the gate. Every adapter delivers BGR uint8 HxWx3 frames stamped with
time.monotonic() (for every timer in the gate) and time.time() (for the audit only).

`CameraMonitor` wraps a camera factory: it passes on only good frames, classifies faults (stall,
exception, wrong shape / dtype, black, frozen), reports the camera offline within
`offline_after_s` of the last good frame, reconnects with exponential backoff and queues
`HealthEvent`s for the service to audit.
"""
from __future__ import annotations

import logging
import threading
import time
import zlib
from collections import deque
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable, Protocol

import cv2
import numpy as np

from .config import CameraConfig
from .errors import CameraError
from .imageio import load_image
from .records import Frame

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BLACK_LEVEL = 8.0  # mean grey level below which a frame is black (lens covered, sensor dead)
FROZEN_AFTER_S = 3.0  # identical frames for longer than this from a live source = frozen driver
# A stuck driver may re-deliver its few queued buffers in turn (V4L2 keeps 2-4), not one frame:
# a repeat of any of the last few frames is no new evidence either.
STALE_WINDOW = 8
MIN_SIDE = 16


class Camera(Protocol):
    live: bool  # False for replays: identical frames are expected and the end is normal
    fault: str | None  # why the last read returned None (None = end of replay)

    def read(self, timeout_s: float) -> Frame | None: ...

    def close(self) -> None: ...


class ReplayCamera:
    """A folder of images (sorted by name, decoded by content) or a video file, paced at `fps` on
    the monotonic clock. No frame is dropped: a consumer slower than `fps` slows the replay, so a
    replay gives the same frames to every run. `read`'s timeout is not used: a replay frame is
    never late, only paced."""

    live = False

    def __init__(self, path: str | Path, fps: float, loop: bool = False,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep):
        if fps <= 0:
            raise ValueError("replay fps must be positive")
        self.path = Path(path)
        self.period = 1.0 / fps
        self.loop = loop
        self.fault: str | None = None
        self._clock, self._sleep = clock, sleep
        self._due: float | None = None
        self._count = 0
        self._pos = 0
        self._video: cv2.VideoCapture | None = None
        self._files: list[Path] = []
        if self.path.is_dir():
            self._files = sorted(p for p in self.path.iterdir()
                                 if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)
            if not self._files:
                raise CameraError(self.path, f"no images ({' '.join(IMAGE_SUFFIXES)}) in this folder")
        elif self.path.is_file():
            self._video = self._open_video()
        else:
            raise CameraError(self.path, "replay source not found")

    def _open_video(self) -> cv2.VideoCapture:
        cap = cv2.VideoCapture(str(self.path))
        if not cap.isOpened():
            cap.release()
            raise CameraError(self.path, "not a folder of images or a video file OpenCV can read")
        return cap

    def _next_image(self) -> tuple[np.ndarray, str] | None:
        if self._video is None:
            if self._pos >= len(self._files):
                return None
            f = self._files[self._pos]
            self._pos += 1
            return load_image(f), f.name
        ok, img = self._video.read()
        if not ok:
            return None
        self._pos += 1
        return img, f"{self.path.name}#{self._pos - 1}"

    def _rewind(self) -> None:
        self._pos = 0
        if self._video is not None:
            self._video.release()
            self._video = self._open_video()

    def read(self, timeout_s: float = 0.0) -> Frame | None:
        self.fault = None
        item = self._next_image()
        if item is None and self.loop and self._pos > 0:
            self._rewind()
            item = self._next_image()
        if item is None:
            return None
        img, name = item
        now = self._clock()
        if self._due is not None and self._due > now:
            self._sleep(self._due - now)
            now = self._clock()
        due = now if self._due is None else self._due
        # next frame a period after this one was due (sleep overshoot does not drift the rate);
        # a consumer more than a period behind restarts the schedule: no burst to catch up
        self._due = (due if now - due < self.period else now) + self.period
        frame = Frame(image=img, t_mono=now, t_wall=time.time(), index=self._count, source=name)
        self._count += 1
        return frame

    def close(self) -> None:
        if self._video is not None:
            self._video.release()
            self._video = None


class _ThreadedCamera:
    """Runs a blocking `grab()` in a daemon thread and keeps only the newest frame, so `read`
    honours its timeout whatever the driver does. After a grab error the source is dead: `read`
    raises CameraError and the monitor reconnects with a new instance."""

    live = True

    def __init__(self, grab: Callable[[], np.ndarray | None], release: Callable[[], None], source: str):
        self.source = source
        self.fault: str | None = None
        self._grab, self._release = grab, release
        self._cond = threading.Condition()
        self._latest: tuple[np.ndarray, float, float] | None = None
        self._seq = 0
        self._taken = 0
        self._error: str | None = None
        self._stop = False
        self._thread = threading.Thread(target=self._run, name=f"camera-{source}", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while True:
                with self._cond:
                    if self._stop:
                        return
                try:
                    img = self._grab()
                    error = None if img is not None else "device returned no frame"
                except Exception as e:  # the driver's exception types are its own
                    img, error = None, f"{type(e).__name__}: {e}"
                t_mono, t_wall = time.monotonic(), time.time()
                with self._cond:
                    if error is not None:
                        self._error = error
                        self._cond.notify_all()
                        return
                    self._latest = (img, t_mono, t_wall)
                    self._seq += 1
                    self._cond.notify_all()
        finally:
            # released here, not in close(): releasing under a grab still running in this thread
            # can crash some drivers; a wedged grab keeps its device until it returns
            try:
                self._release()
            except Exception:
                log.exception("camera %s: release failed", self.source)

    def read(self, timeout_s: float) -> Frame | None:
        self.fault = None
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._seq == self._taken:
                if self._error is not None:
                    raise CameraError(self.source, self._error)
                if self._stop:
                    raise CameraError(self.source, "camera is closed")
                left = deadline - time.monotonic()
                if left <= 0:
                    self.fault = f"stall: no frame within {timeout_s:g} s"
                    return None
                self._cond.wait(left)
            img, t_mono, t_wall = self._latest
            self._taken = self._seq
        return Frame(image=img, t_mono=t_mono, t_wall=t_wall, index=self._seq, source=self.source)

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        # a healthy grab returns within a frame period; a wedged one is left behind (daemon)
        self._thread.join(timeout=0.5)


class OpenCVCamera(_ThreadedCamera):
    """cv2.VideoCapture: a device index ("0"), a device path, or a GStreamer pipeline (Jetson CSI)."""

    def __init__(self, device: int | str, width: int = 640, height: int = 480, fps: float = 15.0):
        if isinstance(device, str) and device.strip().isdigit():
            device = int(device)
        pipeline = isinstance(device, str) and "!" in device
        cap = cv2.VideoCapture(device, cv2.CAP_GSTREAMER if pipeline else cv2.CAP_ANY)
        if not cap.isOpened():
            cap.release()
            raise CameraError(str(device), "cannot open camera" + (" (GStreamer pipeline)" if pipeline else ""))
        if not pipeline:  # a pipeline fixes size and rate in its caps
            cap.set(cv2.CAP_PROP_FRAME_WIDTH, width)
            cap.set(cv2.CAP_PROP_FRAME_HEIGHT, height)
            cap.set(cv2.CAP_PROP_FPS, fps)
            cap.set(cv2.CAP_PROP_BUFFERSIZE, 1)  # the newest frame, not one queued seconds ago

        def grab():
            ok, img = cap.read()
            return img if ok else None

        super().__init__(grab, cap.release, source=f"opencv:{device}")


class Picamera2Camera(_ThreadedCamera):
    """Raspberry Pi camera through picamera2 (installed from apt on the Pi, imported only here).

    picamera2 names formats after the little-endian DRM fourcc: its "RGB888" array holds
    [B, G, R] per pixel (its manual, appendix A), which is already OpenCV's BGR order; only a
    4-channel (XRGB8888) array is cut to 3 channels."""

    def __init__(self, width: int = 640, height: int = 480, fps: float | None = None):
        try:
            from picamera2 import Picamera2
        except ImportError as e:
            raise CameraError(None, f"picamera2 is not importable ({e}); on Raspberry Pi OS install "
                                    "python3-picamera2 with apt and create the venv with --system-site-packages") from None
        cam = Picamera2()
        try:
            controls = {"FrameRate": float(fps)} if fps else {}
            cam.configure(cam.create_video_configuration(main={"size": (width, height), "format": "RGB888"},
                                                         controls=controls))
            cam.start()
        except Exception as e:
            cam.close()
            raise CameraError(None, f"picamera2 could not start the camera: {e}") from None

        def release():
            try:
                cam.stop()
            finally:
                cam.close()

        def grab():
            img = cam.capture_array("main")
            return np.ascontiguousarray(img[..., :3]) if img.ndim == 3 and img.shape[2] == 4 else img

        super().__init__(grab, release, source="picamera2")


def _gst():
    """GStreamer through PyGObject, imported on first use: only this source needs it, and the gate
    takes it from the system (apt), as picamera2, so that the venv needs no GLib build."""
    try:
        import gi

        gi.require_version("Gst", "1.0")
        gi.require_version("GstApp", "1.0")
        from gi.repository import GLib, Gst, GstApp
    except (ImportError, ValueError) as e:  # require_version raises ValueError for a missing typelib
        raise CameraError(None, f"camera.source gstreamer needs PyGObject and GStreamer's introspection data ({e}): "
                                "install python3-gi, gir1.2-gstreamer-1.0 and gir1.2-gst-plugins-base-1.0 with apt "
                                "and create the venv with --system-site-packages") from None
    Gst.init(None)
    return GLib, Gst, GstApp


def _bus_error(msg) -> str:
    err, debug = msg.parse_error()
    # debug text is "file(line): function (): /element/path:" then, on a line of its own, why
    # (e.g. "streaming stopped, reason not-negotiated (-4)"), when the element said why
    lines = (debug or "").strip().splitlines()
    why = lines[-1].strip() if len(lines) > 1 else ""
    return f"{msg.src.get_name()}: {err.message}" + (f" ({why[:200]})" if why else "")


class GStreamerCamera(_ThreadedCamera):
    """A GStreamer pipeline run through PyGObject, so a Jetson CSI camera (nvarguscamerasrc) needs
    no OpenCV built with GStreamer. Frames come from the appsink named "sink", which is asked for
    BGR and keeps only the newest frame. An ERROR on the pipeline's bus, or the end of its stream,
    makes the source dead (the monitor reconnects with a new pipeline); release stops it (NULL)."""

    PULL_S = 0.1  # how long one wait for a sample lasts before the bus and close() are looked at

    def __init__(self, pipeline: str):
        GLib, Gst, GstApp = _gst()
        try:
            pipe = Gst.parse_launch(pipeline)
        except GLib.Error as e:
            raise CameraError("camera.pipeline", f"GStreamer cannot build it: {e.message}") from None
        sink = pipe.get_by_name("sink") if isinstance(pipe, Gst.Bin) else None
        if not isinstance(sink, GstApp.AppSink):
            raise CameraError("camera.pipeline", "it has no `appsink name=sink` to take frames from")
        sink.set_property("caps", Gst.Caps.from_string("video/x-raw,format=BGR"))
        sink.set_property("max-buffers", 1)  # the newest frame, not one queued seconds ago
        sink.set_property("drop", True)
        bus = pipe.get_bus()
        if pipe.set_state(Gst.State.PLAYING) == Gst.StateChangeReturn.FAILURE:
            msg = bus.pop_filtered(Gst.MessageType.ERROR)
            pipe.set_state(Gst.State.NULL)
            raise CameraError("camera.pipeline", "GStreamer cannot start it: "
                              + (_bus_error(msg) if msg is not None else "no element said why"))
        self._pipe = pipe
        self._closing = threading.Event()
        closing = self._closing
        source = "gstreamer:" + pipeline.split("!")[0].strip()

        def grab():
            while not closing.is_set():
                sample = sink.try_pull_sample(int(self.PULL_S * Gst.SECOND))
                ended = sample is None and sink.is_eos()
                # after the pull: an element posts its error before the end of stream it causes, so
                # a failed pipeline is reported by its error; popping also drops the other messages,
                # which nobody reads and which would pile up on the bus
                msg = bus.pop_filtered(Gst.MessageType.ERROR)
                if msg is not None:
                    raise RuntimeError(_bus_error(msg))
                if sample is not None:
                    return _sample_bgr(Gst, sample)
                if ended:
                    raise RuntimeError("end of stream")
            return None

        super().__init__(grab, lambda: pipe.set_state(Gst.State.NULL), source=source)

    def close(self) -> None:
        self._closing.set()  # a grab waiting for a sample returns within PULL_S, then the pipeline stops
        super().close()


def _sample_bgr(Gst, sample) -> np.ndarray:
    s = sample.get_caps().get_structure(0)
    w, h = s.get_value("width"), s.get_value("height")
    buf = sample.get_buffer()
    ok, info = buf.map(Gst.MapFlags.READ)
    if not ok:
        raise RuntimeError("cannot map a frame buffer")
    try:
        data = np.frombuffer(info.data, np.uint8)
        stride = data.size // h  # GStreamer pads each row of packed BGR to a multiple of 4 bytes
        if stride < 3 * w or stride * h != data.size:
            raise RuntimeError(f"a {w}x{h} BGR frame in a buffer of {data.size} bytes")
        # a copy: the buffer goes back to the pipeline at unmap
        return data.reshape(h, stride)[:, :3 * w].reshape(h, w, 3).copy()
    finally:
        buf.unmap(info)


def gstreamer_pipeline(cfg: CameraConfig) -> str:
    """The configured pipeline, or the Jetson CSI camera's at the configured size and rate."""
    if cfg.pipeline is not None:
        return cfg.pipeline
    rate = Fraction(cfg.fps).limit_denominator(1001)
    return (f"nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width={cfg.width},height={cfg.height},"
            f"framerate={rate.numerator}/{rate.denominator} ! nvvidconv ! video/x-raw,format=BGRx ! "
            "videoconvert ! video/x-raw,format=BGR ! appsink name=sink max-buffers=1 drop=true sync=false")


def needs_argus_socket(cfg: CameraConfig) -> bool:
    """Whether the camera talks to nvargus-daemon (nvarguscamerasrc, a Jetson CSI camera), whose
    socket in /tmp the installer then binds into the service's private /tmp."""
    pipeline = {"gstreamer": gstreamer_pipeline(cfg), "opencv": cfg.path}.get(cfg.source, "")
    return any(element.split()[:1] == ["nvarguscamerasrc"] for element in pipeline.split("!"))


def make_camera(cfg: CameraConfig) -> Camera:
    if cfg.source == "replay":
        path = cfg.path
        if path == "demo":
            from . import demo  # only the demo needs its frames; imported when asked for

            path = demo.demo_frames_dir()
        return ReplayCamera(path, cfg.fps, cfg.loop)
    if cfg.source == "opencv":
        return OpenCVCamera(cfg.path, cfg.width, cfg.height, cfg.fps)
    if cfg.source == "gstreamer":
        return GStreamerCamera(gstreamer_pipeline(cfg))
    return Picamera2Camera(cfg.width, cfg.height, cfg.fps)


def classify_frame(image) -> str | None:
    """The fault a single frame shows by itself ("shape", "black"), or None for a usable frame."""
    if not isinstance(image, np.ndarray) or image.dtype != np.uint8 or image.ndim != 3 \
            or image.shape[2] != 3 or min(image.shape[:2]) < MIN_SIDE:
        return "shape"
    if float(image[::4, ::4].mean()) < BLACK_LEVEL:  # a subsample is plenty for a mean
        return "black"
    return None


@dataclass(frozen=True)
class HealthEvent:
    kind: str  # "fault", "offline", "online", "reconnect", "end"
    reason: str  # fault class ("stall", "exception", "shape", "black", "frozen"), "ok" or "failed"
    # audit reasons: fault:<class>, offline:<class>, online, reconnect, reconnect:failed, end, end:failed
    t_mono: float
    details: dict = field(default_factory=dict)

    @property
    def audit_reason(self) -> str:
        return self.kind if self.reason == "ok" else f"{self.kind}:{self.reason}"


# faults after which the device is reopened; black frames and wrong shapes come from a working
# device (a covered lens, a misconfigured mode), which reopening does not cure
_RECONNECT_ON = {"stall", "exception", "frozen"}


class CameraMonitor:
    """Wraps a camera factory; `read()` returns good frames only, or None, and never raises.

    Status goes "starting" -> "online" <-> "offline", or "ended" at the end of a replay. Offline
    is reported `offline_after_s` after the last good frame (or the start), whatever the fault.
    `pop_events()` hands over the queued HealthEvents."""

    def __init__(self, factory: Callable[[], Camera], cfg: CameraConfig,
                 clock: Callable[[], float] = time.monotonic, sleep: Callable[[float], None] = time.sleep,
                 frozen_after_s: float = FROZEN_AFTER_S):
        self.cfg = cfg
        self._factory = factory
        self._clock, self._sleep = clock, sleep
        self._frozen_after_s = frozen_after_s
        self._cam: Camera | None = None
        self._connects = 0
        now = clock()
        self._reconnect_at = now
        self._backoff = cfg.reconnect_backoff_s
        self.status = "starting"
        self.last_good_t = now
        self._fault: str | None = None  # the fault class reported since the last good frame
        self._faults = 0
        self._recent: deque[int] = deque(maxlen=STALE_WINDOW)  # hashes of the last new frames
        self._hash_since = now  # when the last new frame arrived
        self._events: list[HealthEvent] = []

    @property
    def ended(self) -> bool:
        return self.status == "ended"

    def pop_events(self) -> list[HealthEvent]:
        events, self._events = self._events, []
        return events

    def _event(self, kind: str, reason: str, now: float, **details) -> None:
        ev = HealthEvent(kind, reason, now, details)
        log.log(logging.INFO if reason == "ok" else logging.WARNING, "camera %s %s", ev.audit_reason, details)
        self._events.append(ev)

    def _offline_deadline(self) -> float | None:
        return None if self.status in ("offline", "ended") else self.last_good_t + self.cfg.offline_after_s

    def _check_offline(self, now: float) -> None:
        deadline = self._offline_deadline()
        if deadline is not None and now >= deadline:
            self.status = "offline"
            self._event("offline", self._fault or "stall", now, since_good_s=round(now - self.last_good_t, 3),
                        faults=self._faults)

    def _fault_seen(self, kind: str, now: float, reconnect: bool | None = None, **details) -> None:
        self._faults += 1
        if kind != self._fault:  # one event per fault class per outage, not one per frame
            self._fault = kind
            self._event("fault", kind, now, **details)
        if reconnect is None:
            reconnect = kind in _RECONNECT_ON
        if reconnect:
            self._disconnect(now)

    def _disconnect(self, now: float) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            try:
                cam.close()
            except Exception:
                log.exception("camera close failed")
        self._reconnect_at = now + self._backoff
        self._backoff = min(self._backoff * 2, self.cfg.reconnect_backoff_max_s)

    def _connect(self, now: float) -> None:
        self._connects += 1
        try:
            self._cam = self._factory()
        except Exception as e:
            error = f"{type(e).__name__}: {e}"
            if self._connects > 1:
                self._event("reconnect", "failed", now, attempt=self._connects - 1, error=error,
                            retry_in_s=self._backoff)
            self._fault_seen("exception", now, reconnect=True, error=error)
            return
        if self._connects > 1:
            self._event("reconnect", "ok", now, attempt=self._connects - 1)

    def read(self) -> Frame | None:
        if self.ended:
            return None
        now = self._clock()
        if self._cam is None:
            if now < self._reconnect_at:
                # wait for the next attempt, but wake for the offline deadline and at least once
                # per read timeout so the service loop stays responsive
                wake = min(self._reconnect_at, now + self.cfg.read_timeout_s)
                deadline = self._offline_deadline()
                if deadline is not None and deadline > now:
                    wake = min(wake, deadline)
                self._sleep(wake - now)
                self._check_offline(self._clock())
                return None
            self._connect(now)
            if self._cam is None:
                self._check_offline(now)
                return None
        cam = self._cam
        timeout = self.cfg.read_timeout_s
        deadline = self._offline_deadline()
        shortened = deadline is not None and deadline - now < timeout
        if shortened:  # wake in time to report offline; this shorter wait is not itself a stall
            timeout = max(deadline - now, 0.0)
        try:
            frame = cam.read(timeout)
        except Exception as e:
            now = self._clock()
            if not cam.live:  # reopening a replay would start it again from its first frame
                self._fault_seen("exception", now, reconnect=False, error=f"{type(e).__name__}: {e}")
                self._end(now, "failed")
                return None
            self._fault_seen("exception", now, error=f"{type(e).__name__}: {e}")
            self._check_offline(now)
            return None
        now = self._clock()
        if frame is None:
            if cam.fault is None and not cam.live:
                self._end(now, "ok")
            elif not shortened:
                self._fault_seen("stall", now, error=cam.fault or "no frame")
            self._check_offline(now)
            return None
        return self._judge(frame, cam.live, now)

    def _end(self, now: float, reason: str) -> None:
        self.status = "ended"
        self.close()
        self._event("end", reason, now)

    def _judge(self, frame: Frame, live: bool, now: float) -> Frame | None:
        fault = classify_frame(frame.image)
        if fault is None and live:
            img = frame.image
            h = zlib.crc32(img.data if img.flags.c_contiguous else img.tobytes())
            if h in self._recent:
                # a repeated buffer is no new evidence: never passed on, and frozen after a while
                if now - self._hash_since > self._frozen_after_s:
                    self._fault_seen("frozen", now, same_frame_s=round(now - self._hash_since, 3))
                self._check_offline(now)
                return None
            self._recent.append(h)
            self._hash_since = now
        if fault is not None:
            shape = getattr(frame.image, "shape", None)
            self._fault_seen(fault, now, shape=list(shape) if shape is not None else None,
                             dtype=str(getattr(frame.image, "dtype", type(frame.image).__name__)))
            self._check_offline(now)
            return None
        if self.status != "online":
            self._event("online", "ok", now, down_s=round(now - self.last_good_t, 3), faults=self._faults)
        self.status = "online"
        self.last_good_t = now
        self._fault = None
        self._faults = 0
        self._backoff = self.cfg.reconnect_backoff_s
        return frame

    def close(self) -> None:
        cam, self._cam = self._cam, None
        if cam is not None:
            cam.close()
