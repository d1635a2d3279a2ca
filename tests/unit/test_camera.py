"""Camera adapters and the health monitor. The monitor runs on a fake clock (no real sleeping);
the threaded adapters use fakes of cv2.VideoCapture and picamera2 with sub-second timeouts."""
import itertools
import sys
import threading
import time
import types

import cv2
import numpy as np
import pytest

import edge
from edge import camera as camera_mod
from edge.camera import (CameraMonitor, OpenCVCamera, Picamera2Camera, ReplayCamera, classify_frame,
                         make_camera)
from edge.config import CameraConfig
from edge.errors import CameraError, ImageError
from edge.records import Frame

PERIOD = 0.0625  # a binary fraction, so fake times add up exactly


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t
        self.sleeps = []

    def __call__(self):
        return self.t

    def sleep(self, dt):
        assert dt >= 0
        self.sleeps.append(dt)
        self.t += dt


def picture(i=0, size=32):
    """A distinct, bright enough frame per i."""
    img = np.full((size, size, 3), 60, np.uint8)
    img[0, 0] = (i % 256, i // 256 % 256, 7)
    return img


def write_images(folder, names):
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        ok, buf = cv2.imencode(".png", picture(i))
        (folder / name).write_bytes(buf.tobytes())


# --- replay -------------------------------------------------------------------------------------

def test_replay_folder_in_name_order_then_end(tmp_path):
    write_images(tmp_path, ["b.png", "a.png", "c.PNG"])
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    clock = FakeClock()
    cam = ReplayCamera(tmp_path, fps=16, clock=clock, sleep=clock.sleep)
    frames = [cam.read(1.0) for _ in range(3)]
    assert [f.source for f in frames] == ["a.png", "b.png", "c.PNG"]
    assert [f.index for f in frames] == [0, 1, 2]
    assert np.array_equal(frames[0].image, picture(1))  # a.png was written second
    assert cam.read(1.0) is None and cam.fault is None  # end of replay
    assert not cam.live


def test_replay_loop(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    clock = FakeClock()
    cam = ReplayCamera(tmp_path, fps=16, loop=True, clock=clock, sleep=clock.sleep)
    assert [cam.read(1.0).source for _ in range(5)] == ["a.png", "b.png", "a.png", "b.png", "a.png"]


def test_replay_pacing_on_the_injected_monotonic_clock(tmp_path):
    write_images(tmp_path, [f"{i}.png" for i in range(5)])
    clock = FakeClock(1000.0)
    cam = ReplayCamera(tmp_path, fps=16, clock=clock, sleep=clock.sleep)
    t = [cam.read(1.0).t_mono for _ in range(3)]
    assert t == [1000.0, 1000.0625, 1000.125]
    assert clock.sleeps == [PERIOD, PERIOD]
    clock.t += 0.5  # the consumer fell behind: the next frame comes at once, then pacing resumes
    assert cam.read(1.0).t_mono == 1000.625
    assert cam.read(1.0).t_mono == 1000.6875
    assert clock.sleeps == [PERIOD, PERIOD, PERIOD]


def test_replay_default_clock_ignores_wall_clock_jumps(tmp_path, monkeypatch):
    write_images(tmp_path, [f"{i}.png" for i in range(3)])
    jumps = itertools.count()
    monkeypatch.setattr(camera_mod.time, "time", lambda: 1e9 - 86400.0 * next(jumps))  # runs backwards
    cam = ReplayCamera(tmp_path, fps=50)
    start = time.monotonic()
    t = [cam.read(1.0).t_mono for _ in range(3)]
    assert time.monotonic() - start < 1.0
    # a day per read backwards on the wall clock; on a loaded machine the 20 ms pacing jitters, so
    # only the order and the scale are asserted, which the wall clock would break either way
    assert all(0.0 < d < 0.5 for d in np.diff(t))
    assert t[-1] - t[0] >= 0.04 - 0.005


def test_replay_refuses_non_images_by_name(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "b.jpg").write_text("not a picture")
    cam = ReplayCamera(tmp_path, fps=16, clock=FakeClock(), sleep=lambda dt: None)
    cam.read(1.0)
    with pytest.raises(ImageError, match="b.jpg"):
        cam.read(1.0)


def test_replay_bad_sources(tmp_path):
    with pytest.raises(CameraError, match="not found"):
        ReplayCamera(tmp_path / "nope", fps=10)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CameraError, match="no images"):
        ReplayCamera(tmp_path / "empty", fps=10)
    (tmp_path / "clip.mp4").write_text("not a video")
    with pytest.raises(CameraError, match="clip.mp4"):
        ReplayCamera(tmp_path / "clip.mp4", fps=10)


def test_replay_video_file(tmp_path):
    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 10.0, (64, 48))
    if not writer.isOpened():
        pytest.skip("this OpenCV build cannot write MJPG AVI")
    for i in range(4):
        writer.write(np.full((48, 64, 3), 40 * (i + 1), np.uint8))
    writer.release()
    clock = FakeClock()
    cam = ReplayCamera(path, fps=16, loop=True, clock=clock, sleep=clock.sleep)
    frames = [cam.read(1.0) for _ in range(6)]
    assert all(f.image.shape == (48, 64, 3) and f.image.dtype == np.uint8 for f in frames)
    assert [f.source for f in frames] == ["clip.avi#0", "clip.avi#1", "clip.avi#2", "clip.avi#3", "clip.avi#0", "clip.avi#1"]
    assert abs(float(frames[2].image.mean()) - 120) < 5
    cam.close()


def test_make_camera_demo_is_resolved_lazily(tmp_path, monkeypatch):
    write_images(tmp_path, ["a.png"])
    fake = types.ModuleType("edge.demo")
    fake.demo_frames_dir = lambda: tmp_path
    monkeypatch.setitem(sys.modules, "edge.demo", fake)
    monkeypatch.setattr(edge, "demo", fake, raising=False)
    cam = make_camera(CameraConfig(source="replay", path="demo", fps=16))
    assert isinstance(cam, ReplayCamera) and cam.read(1.0).source == "a.png"


# --- OpenCV adapter (fake VideoCapture) ----------------------------------------------------------

class FakeCapture:
    mode = "ok"
    instances = []

    def __init__(self, device, api=None):
        self.device, self.api = device, api
        self.props = {}
        self.released = threading.Event()
        self.unblock = threading.Event()
        self.n = 0
        FakeCapture.instances.append(self)

    def isOpened(self):
        return self.device != "/dev/missing"

    def set(self, prop, value):
        self.props[prop] = value
        return True

    def read(self):
        if self.mode == "stall":
            self.unblock.wait(10.0)  # a wedged driver
            return False, None
        if self.mode == "fail":
            return False, None
        time.sleep(0.005)
        self.n += 1
        return True, picture(self.n)

    def release(self):
        self.released.set()


@pytest.fixture
def fake_capture(monkeypatch):
    FakeCapture.instances = []
    FakeCapture.mode = "ok"
    monkeypatch.setattr(camera_mod.cv2, "VideoCapture", FakeCapture)
    yield FakeCapture
    for cap in FakeCapture.instances:
        cap.unblock.set()


def test_opencv_delivers_new_frames(fake_capture):
    cam = OpenCVCamera("0", 320, 240, 15)
    cap = fake_capture.instances[0]
    assert cap.device == 0 and cap.props[cv2.CAP_PROP_FRAME_WIDTH] == 320 and cap.props[cv2.CAP_PROP_FPS] == 15
    a, b = cam.read(1.0), cam.read(1.0)
    assert a.image.shape == (32, 32, 3) and b.index > a.index and b.t_mono >= a.t_mono
    assert not np.array_equal(a.image, b.image)
    cam.close()
    assert cap.released.wait(1.0)


def test_opencv_stalled_device_returns_none_with_fault(fake_capture):
    fake_capture.mode = "stall"
    cam = OpenCVCamera(0)
    start = time.monotonic()
    assert cam.read(0.2) is None
    assert 0.15 < time.monotonic() - start < 1.0
    assert cam.fault.startswith("stall")
    start = time.monotonic()
    cam.close()  # must not wait for the wedged grab
    assert time.monotonic() - start < 1.5


def test_opencv_failed_device_raises(fake_capture):
    fake_capture.mode = "fail"
    cam = OpenCVCamera(0)
    with pytest.raises(CameraError, match="device returned no frame"):
        cam.read(1.0)
    cam.close()


def test_opencv_open_failure_and_pipeline(fake_capture):
    with pytest.raises(CameraError, match="/dev/missing: cannot open camera"):
        OpenCVCamera("/dev/missing")
    pipeline = "nvarguscamerasrc ! video/x-raw(memory:NVMM) ! nvvidconv ! appsink"
    cam = make_camera(CameraConfig(source="opencv", path=pipeline))
    cap = fake_capture.instances[-1]
    assert cap.api == cv2.CAP_GSTREAMER and cap.props == {}
    cam.close()


# --- picamera2 adapter (fake module) -------------------------------------------------------------

def fake_picamera2(monkeypatch, channels=3):
    calls = []

    class Picamera2:
        def __init__(self):
            self.n = 0

        def create_video_configuration(self, main, controls=None):
            calls.append(("config", main, controls))
            return {"main": main}

        def configure(self, config):
            calls.append(("configure", config))

        def start(self):
            calls.append(("start",))

        def capture_array(self, name="main"):
            self.n += 1
            w, h = calls[0][1]["size"]
            arr = np.zeros((h, w, channels), np.uint8)
            arr[..., 0], arr[..., 1], arr[..., 2] = 10, 20 + self.n % 100, 30  # [B, G, R] per picamera2
            time.sleep(0.005)
            return arr

        def stop(self):
            calls.append(("stop",))

        def close(self):
            calls.append(("close",))

    module = types.ModuleType("picamera2")
    module.Picamera2 = Picamera2
    monkeypatch.setitem(sys.modules, "picamera2", module)
    return calls


@pytest.mark.parametrize("channels", [3, 4])
def test_picamera2_adapter(monkeypatch, channels):
    calls = fake_picamera2(monkeypatch, channels)
    cam = make_camera(CameraConfig(source="picamera2", width=96, height=64, fps=10))
    assert isinstance(cam, Picamera2Camera)
    assert calls[0] == ("config", {"size": (96, 64), "format": "RGB888"}, {"FrameRate": 10.0})
    frame = cam.read(1.0)
    assert frame.image.shape == (64, 96, 3) and frame.image.dtype == np.uint8
    assert frame.image.flags.c_contiguous
    assert tuple(frame.image[0, 0][[0, 2]]) == (10, 30)  # RGB888 is already B, G, R: no swap
    cam.close()
    deadline = time.monotonic() + 1.0
    while ("close",) not in calls and time.monotonic() < deadline:
        time.sleep(0.01)
    assert ("stop",) in calls and ("close",) in calls


def test_picamera2_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "picamera2", None)  # import fails as off a Pi
    with pytest.raises(CameraError, match="picamera2 is not importable"):
        Picamera2Camera(64, 48)


# --- health monitor (fake camera, fake clock) ----------------------------------------------------

class FakeCamera:
    """Plays a script: an array = a frame after PERIOD, "stall" = no frame after the timeout,
    "raise" = the driver throws, "end" = end of replay."""

    def __init__(self, clock, script, live=True):
        self.clock, self.script, self.live = clock, iter(script), live
        self.fault = None
        self.closed = False
        self.n = 0

    def read(self, timeout_s):
        self.fault = None
        action = next(self.script)
        if isinstance(action, str) and action == "stall":
            self.clock.t += timeout_s
            self.fault = "stall"
            return None
        if isinstance(action, str) and action == "raise":
            raise OSError("device unplugged")
        if isinstance(action, str) and action == "end":
            return None
        self.clock.t += PERIOD
        self.n += 1
        return Frame(action, self.clock.t, 0.0, self.n, "fake")

    def close(self):
        self.closed = True


def good_frames():
    return (picture(i) for i in itertools.count())


CFG = CameraConfig(read_timeout_s=2.0, offline_after_s=5.0, reconnect_backoff_s=1.0, reconnect_backoff_max_s=8.0)


def run(monitor, clock, until):
    frames, events = [], []
    for _ in range(100_000):
        if clock.t >= until or monitor.ended:
            break
        f = monitor.read()
        if f is not None:
            frames.append(f)
        events += monitor.pop_events()
    return frames, events


def reasons(events):
    return [e.audit_reason for e in events]


def first(events, reason):
    return next(e for e in events if e.audit_reason == reason)


def make_monitor(clock, scripts, live=True):
    """Each connection plays a fresh iterator from the next script maker; the last one repeats."""
    scripts = list(scripts)
    cams = []

    def factory():
        make = scripts.pop(0) if len(scripts) > 1 else scripts[0]
        cam = FakeCamera(clock, make(), live)
        cams.append(cam)
        return cam

    return CameraMonitor(factory, CFG, clock=clock, sleep=clock.sleep), cams


def test_classify_frame():
    assert classify_frame(picture()) is None
    assert classify_frame(np.zeros((32, 32, 3), np.uint8)) == "black"
    assert classify_frame(np.full((32, 32), 90, np.uint8)) == "shape"
    assert classify_frame(np.full((32, 32, 3), 90, np.float32)) == "shape"
    assert classify_frame(np.full((32, 32, 4), 90, np.uint8)) == "shape"
    assert classify_frame(None) == "shape"


def test_good_frames_online():
    clock = FakeClock()
    mon, _ = make_monitor(clock, [good_frames])
    frames, events = run(mon, clock, 3.0)
    assert len(frames) == 48 and mon.status == "online"
    assert reasons(events) == ["online"]


def test_stall_offline_within_limit_and_backoff():
    clock = FakeClock()
    stall_after_3 = lambda: itertools.chain([picture(1), picture(2), picture(3)], itertools.repeat("stall"))
    mon, cams = make_monitor(clock, [stall_after_3, lambda: itertools.repeat("stall")])
    frames, events = run(mon, clock, 60.0)
    assert len(frames) == 3
    last_good = frames[-1].t_mono
    assert first(events, "fault:stall").t_mono == last_good + CFG.read_timeout_s
    offline = first(events, "offline:stall")
    assert offline.t_mono - last_good <= CFG.offline_after_s
    assert reasons(events).count("fault:stall") == 1  # one event per outage, not one per read
    # reconnects after each stall, waiting 1, 2, 4, 8, 8 ... s (stall takes 2 s each time)
    attempts = [e.t_mono for e in events if e.audit_reason == "reconnect"]
    gaps = np.diff([last_good + 2.0] + attempts)
    assert list(gaps[:6]) == [1.0, 2.0 + 2.0, 4.0 + 2.0, 8.0 + 2.0, 8.0 + 2.0, 8.0 + 2.0]
    assert all(c.closed for c in cams[:-1])


def test_exception_detected_and_reconnected():
    clock = FakeClock()
    mon, cams = make_monitor(clock, [lambda: itertools.chain([picture(1)], itertools.repeat("raise")),
                                     lambda: itertools.repeat("raise")])
    frames, events = run(mon, clock, 20.0)
    last_good = frames[-1].t_mono
    fault = first(events, "fault:exception")
    assert fault.t_mono == last_good and "device unplugged" in fault.details["error"]
    assert first(events, "offline:exception").t_mono - last_good <= CFG.offline_after_s
    assert len(cams) > 3


def test_factory_failures_back_off_exponentially():
    clock = FakeClock()

    def factory():
        raise CameraError("/dev/video0", "cannot open camera")

    mon = CameraMonitor(factory, CFG, clock=clock, sleep=clock.sleep)
    _, events = run(mon, clock, 40.0)
    attempts = [0.0] + [e.t_mono for e in events if e.audit_reason == "reconnect:failed"]
    assert attempts[:7] == [0.0, 1.0, 3.0, 7.0, 15.0, 23.0, 31.0]  # 1, 2, 4, 8, then the 8 s cap
    assert first(events, "offline:exception").t_mono == CFG.offline_after_s
    assert reasons(events).count("offline:exception") == 1


@pytest.mark.parametrize("bad,fault", [
    (np.zeros((32, 32, 3), np.uint8), "black"),
    (np.full((32, 32), 90, np.uint8), "shape"),
    (np.full((32, 32, 3), 90, np.uint16), "shape"),
])
def test_bad_frames_never_pass_and_go_offline(bad, fault):
    clock = FakeClock()
    mon, cams = make_monitor(clock, [lambda: itertools.chain([picture(1)], itertools.repeat(bad))])
    frames, events = run(mon, clock, 20.0)
    assert len(frames) == 1
    last_good = frames[0].t_mono
    assert first(events, f"fault:{fault}").t_mono == last_good + PERIOD
    assert first(events, f"offline:{fault}").t_mono - last_good <= CFG.offline_after_s
    assert reasons(events).count(f"fault:{fault}") == 1
    assert len(cams) == 1  # the device works: no reconnect for what it sees


def test_offline_on_time_when_a_stall_starts_late():
    # black frames for 4 s, then a stall: the read is cut short at the offline deadline instead of
    # waiting the full 2 s read timeout, so offline is still reported 5 s after the last good frame
    clock = FakeClock()
    black = np.zeros((32, 32, 3), np.uint8)
    mon, _ = make_monitor(clock, [lambda: itertools.chain([picture(1)], [black] * 64, itertools.repeat("stall"))])
    frames, events = run(mon, clock, 20.0)
    offline = first(events, "offline:black")
    assert offline.t_mono - frames[0].t_mono == CFG.offline_after_s
    assert reasons(events)[:3] == ["online", "fault:black", "offline:black"]


def test_frozen_live_source():
    clock = FakeClock()
    same = picture(5)
    mon, _ = make_monitor(clock, [lambda: itertools.repeat(same)])
    frames, events = run(mon, clock, 20.0)
    assert len(frames) == 1  # repeats are no new evidence
    frozen = first(events, "fault:frozen")
    assert 3.0 < frozen.t_mono - frames[0].t_mono <= 3.0 + 2 * PERIOD
    assert first(events, "offline:frozen").t_mono - frames[0].t_mono <= CFG.offline_after_s
    assert "reconnect" in reasons(events)


def test_identical_frames_from_replay_are_fine():
    clock = FakeClock()
    same = picture(5)
    mon, _ = make_monitor(clock, [lambda: itertools.repeat(same)], live=False)
    frames, events = run(mon, clock, 10.0)
    assert len(frames) == 160 and reasons(events) == ["online"]


def test_recovery_goes_online_again_and_resets_backoff():
    clock = FakeClock()
    stalls = lambda: itertools.repeat("stall")
    mon, cams = make_monitor(clock, [lambda: itertools.chain([picture(1)], itertools.repeat("stall")),
                                     stalls, stalls, good_frames])
    frames, events = run(mon, clock, 30.0)
    r = reasons(events)
    assert r == ["online", "fault:stall", "reconnect", "offline:stall", "reconnect", "reconnect", "online"]
    # stalls end at 2.0625, 5.0625 and 9.0625; reconnects 1, 2 and 4 s later; frames from 13.125
    assert [e.t_mono for e in events if e.kind == "reconnect"] == [3.0625, 7.0625, 13.0625]
    back = events[-1]
    assert back.t_mono == 13.125 and back.details["down_s"] == pytest.approx(13.125 - PERIOD, abs=1e-3)
    assert mon.status == "online" and len(frames) > 100 and len(cams) == 4
    assert mon._backoff == CFG.reconnect_backoff_s


def test_replay_end_is_not_a_fault(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    clock = FakeClock()
    mon = CameraMonitor(lambda: ReplayCamera(tmp_path, fps=16, clock=clock, sleep=clock.sleep), CFG,
                        clock=clock, sleep=clock.sleep)
    frames, events = run(mon, clock, 10.0)
    assert [f.source for f in frames] == ["a.png", "b.png"]
    assert reasons(events) == ["online", "end"] and mon.ended
    assert mon.read() is None


def test_replay_with_a_bad_file_ends_instead_of_restarting(tmp_path):
    write_images(tmp_path, ["a.png", "c.png"])
    (tmp_path / "b.jpg").write_text("not a picture")
    clock = FakeClock()
    opened = []

    def factory():
        opened.append(1)
        return ReplayCamera(tmp_path, fps=16, clock=clock, sleep=clock.sleep)

    mon = CameraMonitor(factory, CFG, clock=clock, sleep=clock.sleep)
    frames, events = run(mon, clock, 10.0)
    assert [f.source for f in frames] == ["a.png"] and len(opened) == 1
    assert reasons(events) == ["online", "fault:exception", "end:failed"]
    assert "b.jpg" in events[1].details["error"]
