"""camera.source gstreamer: real GStreamer pipelines through PyGObject (videotestsrc, JPEGs of real
faces), their faults under CameraMonitor, and the config checks that need no GStreamer.

The gate takes PyGObject from the system (python3-gi, a venv with --system-site-packages). This
repository's .venv is built on a Python that is not the system's, so when `import gi` fails the
tests load the system's `gi` package alone (not the rest of its dist-packages), provided its C
extension is built for this interpreter's ABI; otherwise, or without GStreamer's typelibs or the
elements a test uses, those tests skip and say which Debian package is missing."""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge.camera import CameraMonitor, GStreamerCamera, gstreamer_pipeline, make_camera, needs_argus_socket
from edge.config import CameraConfig, load_config
from edge.errors import CameraError, ConfigError

SYSTEM_GI = Path("/usr/lib/python3/dist-packages/gi")
# frames that differ from one another (a repeated frame is no new evidence to the monitor)
LIVE = "videotestsrc is-live=true pattern=snow ! video/x-raw,width=64,height=48,framerate=30/1"


def _system_gi() -> str | None:
    """Imports gi, from the system's python3-gi if need be; returns why it cannot, or None."""
    try:
        import gi  # noqa: F401  (a venv with the system's packages, as on the gate)
        return None
    except ImportError:
        pass
    abi = importlib.machinery.EXTENSION_SUFFIXES[0]  # e.g. .cpython-311-x86_64-linux-gnu.so
    if not (SYSTEM_GI / f"_gi{abi}").exists():
        return f"PyGObject is not importable and {SYSTEM_GI} has no _gi{abi} (apt-get install python3-gi)"
    spec = importlib.util.spec_from_file_location("gi", SYSTEM_GI / "__init__.py",
                                                  submodule_search_locations=[str(SYSTEM_GI)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["gi"] = module
    try:
        spec.loader.exec_module(module)
    except ImportError as e:
        del sys.modules["gi"]
        return f"the system's python3-gi does not load into this Python: {e}"
    return None


@pytest.fixture(scope="module")
def Gst():
    why = _system_gi()
    if why:
        pytest.skip(why)
    import gi

    try:
        gi.require_version("Gst", "1.0")
        gi.require_version("GstApp", "1.0")
    except ValueError as e:
        pytest.skip(f"{e} (apt-get install gir1.2-gstreamer-1.0 gir1.2-gst-plugins-base-1.0)")
    from gi.repository import Gst

    Gst.init(None)
    return Gst


def need(Gst, *elements: str, package: str = "gstreamer1.0-plugins-base") -> None:
    missing = [e for e in elements if Gst.ElementFactory.find(e) is None]
    if missing:
        pytest.skip(f"GStreamer elements {' '.join(missing)} missing (apt-get install {package})")


def state(cam: GStreamerCamera, Gst, within_s: float = 2.0):
    """The pipeline's state once the camera thread has had time to release it."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline and cam._pipe.get_state(0)[1] != Gst.State.NULL:
        time.sleep(0.02)
    return cam._pipe.get_state(0)[1]


# --- config and the default pipeline (no GStreamer needed) -------------------------------------

def test_default_pipeline_is_the_jetson_csi_camera_at_the_configured_size_and_rate():
    p = gstreamer_pipeline(CameraConfig(source="gstreamer", width=1280, height=720, fps=29.97))
    assert p.startswith("nvarguscamerasrc sensor-id=0 ! video/x-raw(memory:NVMM),width=1280,height=720,framerate=2997/100 ! ")
    assert p.endswith(" ! videoconvert ! video/x-raw,format=BGR ! appsink name=sink max-buffers=1 drop=true sync=false")
    assert "framerate=15/1" in gstreamer_pipeline(CameraConfig(source="gstreamer"))
    own = "v4l2src device=/dev/video1 ! videoconvert ! appsink name=sink"
    assert gstreamer_pipeline(CameraConfig(source="gstreamer", pipeline=own)) == own


@pytest.mark.parametrize("camera,needs", [
    ({"source": "gstreamer"}, True),
    ({"source": "gstreamer", "pipeline": "nvarguscamerasrc sensor-id=1 ! nvvidconv ! videoconvert ! appsink name=sink"}, True),
    ({"source": "gstreamer", "pipeline": "v4l2src ! videoconvert ! appsink name=sink"}, False),
    ({"source": "opencv", "path": "nvarguscamerasrc ! nvvidconv ! appsink"}, True),  # OpenCV's own GStreamer
    ({"source": "opencv", "path": "0"}, False),
    ({"source": "picamera2"}, False),
    ({"source": "replay"}, False),
])
def test_needs_argus_socket_only_for_nvarguscamerasrc(camera, needs):
    assert needs_argus_socket(CameraConfig(**camera)) is needs


@pytest.mark.parametrize("text,words", [
    ("camera:\n  source: gstreamer\n  pipeline: videotestsrc ! videoconvert ! appsink\n",
     ["camera.pipeline", "appsink name=sink"]),
    ("camera:\n  source: gstreamer\n  pipeline: videotestsrc name=sink ! appsink name=out\n",
     ["camera.pipeline", "appsink name=sink"]),
    ("camera:\n  source: gstreamer\n  pipeline: ''\n", ["camera.pipeline", "appsink name=sink"]),
    ("camera:\n  source: opencv\n  pipeline: v4l2src ! appsink name=sink\n",
     ["camera.pipeline", "only with camera.source gstreamer", "opencv"]),
])
def test_a_pipeline_the_gate_cannot_take_frames_from_is_refused_at_load(tmp_path, text, words):
    path = tmp_path / "gate.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    assert str(path) in str(e.value) and all(w in str(e.value) for w in words), str(e.value)


@pytest.mark.parametrize("pipeline", ["v4l2src ! videoconvert ! appsink name=sink drop=true",
                                      "v4l2src ! videoconvert ! appsink sync=false name=\"sink\""])
def test_a_pipeline_with_an_appsink_named_sink_is_accepted(tmp_path, pipeline):
    path = tmp_path / "gate.yaml"
    path.write_text(f"camera:\n  source: gstreamer\n  pipeline: '{pipeline}'\n")
    assert load_config(path).camera.pipeline == pipeline


def test_without_pygobject_the_error_says_what_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "gi", None)  # import fails as in a venv without the system's packages
    with pytest.raises(CameraError, match="python3-gi.*--system-site-packages"):
        make_camera(CameraConfig(source="gstreamer"))


# --- real pipelines -------------------------------------------------------------------------------

def test_frames_are_bgr_of_the_negotiated_size(Gst):
    need(Gst, "videotestsrc", "videoconvert", "appsink")
    # 50 px wide: 150 bytes a row, which GStreamer pads to 152; B, G, R = 0xa0, 0x50, 0x20
    cam = make_camera(CameraConfig(source="gstreamer", pipeline=(
        "videotestsrc is-live=true pattern=solid-color foreground-color=0xff2050a0 ! "
        "video/x-raw,width=50,height=20,framerate=30/1 ! videoconvert ! appsink name=sink")))
    try:
        assert isinstance(cam, GStreamerCamera) and cam.live
        a, b = cam.read(2.0), cam.read(2.0)
        assert a.image.shape == (20, 50, 3) and a.image.dtype == np.uint8
        assert a.image.flags.c_contiguous and a.image.flags.writeable and a.image.flags.owndata
        assert (a.image == (0xa0, 0x50, 0x20)).all()
        assert b.index > a.index and b.t_mono >= a.t_mono and a.source.startswith("gstreamer:videotestsrc")
    finally:
        cam.close()
    assert state(cam, Gst) == Gst.State.NULL


def test_real_faces_through_jpegdec_reach_the_detector_as_opencv_decodes_them(Gst, samples, model_cards, tmp_path):
    need(Gst, "multifilesrc", "jpegdec", package="gstreamer1.0-plugins-good")
    need(Gst, "videoconvert", "appsink")
    from edge.detect import load_detector

    decoded = []
    for i, name in enumerate(["obama.jpg", "biden.jpg", "obama2.jpg"]):
        img = cv2.imread(str(samples / name))
        f = min(640 / img.shape[1], 480 / img.shape[0])
        small = cv2.resize(img, (round(img.shape[1] * f), round(img.shape[0] * f)), interpolation=cv2.INTER_AREA)
        frame = np.full((480, 640, 3), 128, np.uint8)
        frame[:small.shape[0], :small.shape[1]] = small
        cv2.imwrite(str(tmp_path / f"face{i}.jpg"), frame)
        decoded.append(cv2.imread(str(tmp_path / f"face{i}.jpg")))
    cam = GStreamerCamera(f"multifilesrc location={tmp_path}/face%d.jpg index=0 stop-index=2 "
                          "caps=image/jpeg,framerate=10/1 ! jpegdec ! videoconvert ! appsink name=sink")
    frames = []
    try:
        with pytest.raises(CameraError, match="end of stream"):
            for _ in range(10):
                frames.append(cam.read(2.0).image)
    finally:
        cam.close()
    assert frames
    detector = load_detector(model_cards["detector"])
    for img in frames:
        assert img.shape == (480, 640, 3)
        # the same picture as OpenCV's decode: same channel order, within JPEG decoders' rounding
        diffs = [float(np.abs(img.astype(np.int16) - d).mean()) for d in decoded]
        assert min(diffs) < 3.0, diffs
        faces = detector.detect(img)
        expected = detector.detect(decoded[int(np.argmin(diffs))])
        assert faces and expected
        got, want = max(faces, key=lambda d: d.size).box, max(expected, key=lambda d: d.size).box
        assert np.abs(np.subtract(got, want)).max() < 8, (got, want)


def test_end_of_stream_raises_after_the_last_frames(Gst):
    need(Gst, "videotestsrc", "videoconvert", "appsink")
    cam = GStreamerCamera("videotestsrc num-buffers=3 ! video/x-raw,width=32,height=24 ! videoconvert ! appsink name=sink")
    got = 0
    with pytest.raises(CameraError, match="end of stream"):
        for _ in range(10):
            assert cam.read(2.0) is not None
            got += 1
    assert 1 <= got <= 3
    cam.close()
    assert state(cam, Gst) == Gst.State.NULL


def test_a_pipeline_that_cannot_give_bgr_fails_with_its_reason(Gst):
    need(Gst, "videotestsrc", "appsink")
    cam = GStreamerCamera("videotestsrc is-live=true ! video/x-raw,format=I420 ! appsink name=sink")  # no videoconvert
    with pytest.raises(CameraError, match="not-negotiated"):
        cam.read(2.0)
    cam.close()
    assert state(cam, Gst) == Gst.State.NULL


@pytest.mark.parametrize("pipeline,words", [
    ("nosuchelement ! appsink name=sink", ["camera.pipeline", 'no element "nosuchelement"']),
    ("videotestsrc ! appsink name=sink no-such-property=1", ["camera.pipeline", "no-such-property"]),
    ("videotestsrc ! fakesink name=sink", ["camera.pipeline", "appsink name=sink"]),
    ("filesrc location=/nonexistent/frames.raw ! videoconvert ! appsink name=sink",
     ["camera.pipeline", "cannot start it", "filesrc", "/nonexistent/frames.raw"]),
])
def test_a_pipeline_that_cannot_open_is_refused_naming_the_problem(Gst, pipeline, words):
    need(Gst, "videotestsrc", "appsink", "fakesink", "filesrc", "videoconvert")
    with pytest.raises(CameraError) as e:
        GStreamerCamera(pipeline)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_a_stalled_pipeline_hits_the_read_timeout_and_is_released_on_close(Gst):
    need(Gst, "appsrc", "videoconvert", "appsink")
    cam = GStreamerCamera("appsrc ! videoconvert ! appsink name=sink")  # nothing is ever pushed
    start = time.monotonic()
    assert cam.read(0.3) is None
    assert 0.25 < time.monotonic() - start < 1.0 and cam.fault.startswith("stall")
    start = time.monotonic()
    cam.close()
    assert time.monotonic() - start < 1.0
    assert state(cam, Gst) == Gst.State.NULL


# --- faults under the monitor: the same classes as the other cameras ----------------------------

@pytest.mark.parametrize("first,events,error", [
    # an element fails mid-stream (identity posts an ERROR after 5 buffers, as a camera losing its sensor)
    (f"{LIVE} ! identity error-after=5 ! videoconvert ! appsink name=sink",
     ["online", "fault:exception", "reconnect"], "identity"),
    (f"{LIVE.replace('is-live=true', 'num-buffers=5 is-live=true')} ! videoconvert ! appsink name=sink",
     ["online", "fault:exception", "reconnect"], "end of stream"),
    ("appsrc ! videoconvert ! appsink name=sink", ["fault:stall", "reconnect", "online"], "stall"),
    ("filesrc location=/nonexistent/frames.raw ! videoconvert ! appsink name=sink",
     ["fault:exception", "reconnect", "online"], "Resource not found"),
])
def test_faults_are_classified_and_the_pipeline_reopened(Gst, first, events, error):
    need(Gst, "videotestsrc", "identity", "appsrc", "filesrc", "videoconvert", "appsink")
    good = f"{LIVE} ! videoconvert ! appsink name=sink"
    cfg = CameraConfig(source="gstreamer", pipeline=good, read_timeout_s=0.5, offline_after_s=5.0,
                       reconnect_backoff_s=0.05, reconnect_backoff_max_s=0.2)
    cams, calls = [], []

    def factory():
        calls.append(1)
        cams.append(GStreamerCamera(first if len(calls) == 1 else good))
        return cams[-1]

    mon = CameraMonitor(factory, cfg)
    seen, frames_after = [], 0  # good frames once the events expected have all come
    deadline = time.monotonic() + 10.0
    try:
        while frames_after < 3 and time.monotonic() < deadline:
            frame = mon.read()
            seen += mon.pop_events()
            frames_after += frame is not None and len(seen) >= len(events)
    finally:
        mon.close()
    assert [e.audit_reason for e in seen] == events and frames_after == 3
    assert len(calls) == 2 and mon.status == "online"
    fault = next(e for e in seen if e.kind == "fault")
    assert error in fault.details["error"], fault.details
    for cam in cams:
        assert state(cam, Gst) == Gst.State.NULL
