"""The service under a fake systemd: sd_notify over a datagram socket bound in tmp_path, the real
run_service on replayed faces with mock pins, a stalled camera, SIGHUP reload and a refused gallery."""
import json
import os
import signal
import socket
import tempfile
import threading
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge import bundle as B
from edge import gallery as G
from edge.audit import AuditLog
from edge.demo import render
from edge.enroll import apply, embed_photo
from edge.errors import GalleryError, ModelError
from edge.imageio import load_image
from edge.records import Frame
from edge.service import Notifier, run_service

from _stack import gate_config, sample


class FakeSystemd:
    """The receiving end of $NOTIFY_SOCKET: collects datagrams in order, in a thread."""

    def __init__(self, folder: Path):
        path = folder / "notify.sock"
        if len(str(path)) > 100:  # sun_path holds 108 bytes
            path = Path(tempfile.mkdtemp(prefix="fg")) / "notify.sock"
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.messages: list[str] = []
        self._cond = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            with self._cond:
                self.messages.append(data.decode())
                self._cond.notify_all()

    def wait_for(self, pred, timeout=60.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: pred(self.messages), timeout)

    def close(self) -> list[str]:
        time.sleep(0.1)  # let the reader drain the queue
        self._stop = True
        self._thread.join()
        self.sock.close()
        return [m.split("\n")[0] for m in self.messages]


@pytest.fixture
def systemd(tmp_path, monkeypatch):
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)  # ping on every processed frame
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    fake = FakeSystemd(tmp_path)
    yield fake
    if not fake._stop:
        fake.close()


# ------------------------------------------------------------------ Notifier alone
def test_notifier_messages(systemd):
    n = Notifier(systemd.path)
    n.ready("2 enrolled")
    n.watchdog(0.0)
    n.reloading()
    n.stopping()
    assert systemd.wait_for(lambda m: len(m) == 4, 5)
    assert systemd.messages == ["READY=1\nSTATUS=2 enrolled", "WATCHDOG=1", "RELOADING=1", "STOPPING=1"]


def test_watchdog_pings_at_twice_the_required_rate(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # WatchdogSec=2: ping at most once a second
    n = Notifier(systemd.path)
    for t in (10.0, 10.5, 10.99, 11.0, 11.2, 12.5):
        n.watchdog(t)
    assert systemd.close() == ["WATCHDOG=1"] * 3  # at 10.0, 11.0 and 12.5


def test_watchdog_for_another_pid_is_ignored(systemd, monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier(systemd.path).watchdog_s is None


def test_abstract_socket_address():
    name = f"facegate-test-{os.getpid()}"
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind("\0" + name)
    s.settimeout(5)
    try:
        Notifier("@" + name).ready()
        assert s.recv(100) == b"READY=1"
    finally:
        s.close()


def test_no_socket_no_messages(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert Notifier().send("READY=1") is False


# ------------------------------------------------------------------ the real loop
@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """Replay frames: a face walking up (obama2.jpg, not the enrolment photo), then an empty scene."""
    d = tmp_path_factory.mktemp("frames")
    obama2, astronaut = load_image(sample("obama2.jpg")), load_image(sample("astronaut.png"))
    for i in range(6):
        cv2.imwrite(str(d / f"{i:03d}_obama.png"), render("walk", obama2, i))
    cv2.imwrite(str(d / "006_empty.png"), render("empty", astronaut, 0))
    return d


def enrolled_config(tmp_path, frames, people):
    from edge.pipeline import Stack

    cfg = gate_config(tmp_path)
    cfg.camera.path, cfg.camera.fps = str(frames), 30.0
    cfg.decision.backoff_after = 100  # denials before the reload must not start a back-off
    # decisions by frame count, not by speed: a slow machine (qemu, a loaded CI) must not split the
    # track between frames or let the cooldown lapse
    cfg.decision.track_timeout_s, cfg.decision.cooldown_s = 60.0, 600.0
    stack = Stack.from_config(cfg)
    G.new_key_file(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    results = [embed_photo(stack, cfg.quality, load_image(sample(f)), name, f) for name, f in people.items()]
    assert all(r.ok for r in results), [r.reason for r in results]
    apply(g, results, cfg.storage.retention_days)
    G.save(g, cfg.storage.gallery, G.load_key(cfg.storage.key_file))
    return cfg, stack


def run_while(cfg, systemd, admin) -> int:
    """The real service loop on this thread (signals reach only the main thread) while `admin`
    acts on the running gate from another; `admin` ends it with SIGTERM."""
    t = threading.Thread(target=admin)
    t.start()
    try:
        return run_service(cfg, max_frames=2000, verbose=False, notifier=Notifier(systemd.path))
    finally:
        t.join()


def audit_rows(cfg):
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        return a.tail(1000)


def test_replay_ready_watchdog_stopping(tmp_path, systemd, faces):
    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg", "astronaut": "astronaut.png"})
    assert run_service(cfg, verbose=False, notifier=Notifier(systemd.path)) == 0
    msgs = systemd.close()
    assert msgs[0] == "READY=1" and msgs[-1] == "STOPPING=1"
    assert msgs[1:-1] == ["WATCHDOG=1"] * 7  # one per processed frame, none before READY
    assert systemd.messages[0] == "READY=1\nSTATUS=2 enrolled"
    rows = audit_rows(cfg)
    grants = [r["identity"] for r in rows if r["grant"]]
    assert grants == ["obama"]
    assert (rows[0]["kind"], rows[0]["reason"]) == ("service", "started")
    assert (rows[-1]["kind"], rows[-1]["reason"]) == ("service", "stopped")
    # the threshold in use (the tests' fixed one), the FPIR it expects and where that comes from:
    # two people are too few to fit a tail to, so the card's table
    point = rows[0]["details"]["operating_point"]
    assert point["threshold"] == rows[0]["details"]["threshold"] == round(cfg.match.threshold, 4) and point["k"] == 2
    assert 0 < point["expected_fpir"] < 0.05 and point["source"] == "fixed threshold, card prior (gallery too small to fit)"


def test_the_calibration_report_shows_both_operating_points(tmp_path, faces, capsys):
    import yaml

    from edge.__main__ import main

    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg", "astronaut": "astronaut.png"})
    cfg.match.threshold = None  # from target_fpir, as a gate runs by default
    path = tmp_path / "gate.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["calibration", "-c", str(path)]) == 0
    report = json.loads(capsys.readouterr().out)
    one_n, one_one = report["identification (1:N)"], report["verification (1:1, badge claim)"]
    assert report["people"] == 2 and (one_n["k"], one_one["k"]) == (2, 1)
    assert one_one["threshold"] < one_n["threshold"] and one_n["expected_fpir"] == pytest.approx(0.003)
    cfg.match.threshold = one_one["threshold"] - 0.2  # far too loose: refused, and the report says so
    path.write_text(yaml.safe_dump(cfg.model_dump()))
    assert main(["calibration", "-c", str(path)]) == 1
    assert "above the bound" in json.loads(capsys.readouterr().out)["identification (1:N)"]["refused"]


class StallingCamera:
    """A live camera: frames, then reads that time out (a wedged driver), then frames again. It
    marks the start of the stall in the notify stream and asks for SIGTERM when its script ends."""

    live = True

    def __init__(self, frames, notify_path, stall_reads):
        self.script = [("frame", f) for f in frames[:3]] + [("stall", None)] * stall_reads \
            + [("frame", f) for f in frames[3:]] + [("end", None)]
        self.notify_path = notify_path
        self.fault = None
        self.i = 0

    def read(self, timeout_s):
        kind, image = self.script[min(self.i, len(self.script) - 1)]
        self.i += 1
        if kind == "frame":
            self.fault = None
            return Frame(image, time.monotonic(), time.time(), self.i, "fake")
        if kind == "stall" and self.script[self.i - 2][0] == "frame":
            Notifier(self.notify_path).send("TEST=stall-begins")
        if kind == "end" and self.script[self.i - 2][0] != "end":
            Notifier(self.notify_path).send("TEST=stall-ends")
            os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(timeout_s)
        self.fault = "timeout"
        return None

    def close(self):
        pass


def test_stalled_camera_stops_the_pings(tmp_path, systemd, faces):
    cfg, _ = enrolled_config(tmp_path, faces, {"astronaut": "astronaut.png"})
    cfg.camera.read_timeout_s, cfg.camera.reconnect_backoff_s, cfg.camera.reconnect_backoff_max_s = 0.1, 0.1, 0.2
    images = [cv2.imread(str(p)) for p in sorted(faces.iterdir())]
    cam = StallingCamera(images, systemd.path, stall_reads=4)
    assert run_service(cfg, verbose=False, notifier=Notifier(systemd.path), camera_factory=lambda: cam) == 0
    msgs = systemd.close()
    begin, end = msgs.index("TEST=stall-begins"), msgs.index("TEST=stall-ends")
    assert msgs[:begin] == ["READY=1"] + ["WATCHDOG=1"] * 3
    # while no frame arrives nothing pings: systemd's watchdog would fire and restart the service
    during = msgs[begin + 1:end]
    assert "WATCHDOG=1" in during  # frames flowed again after the stall ...
    first_ping = during.index("WATCHDOG=1")
    assert during[first_ping:] == ["WATCHDOG=1"] * 4 and "WATCHDOG=1" not in during[:first_ping]
    assert msgs[end + 1:] == ["STOPPING=1"]
    reasons = [r["reason"] for r in audit_rows(cfg) if r["kind"] == "camera"]
    assert "fault:stall" in reasons


def test_sighup_reloads_gallery_while_running(tmp_path, systemd, faces):
    """Start with only the astronaut enrolled; while the loop replays obama, a signed bundle adds
    him and SIGHUP arrives from another thread: the audit shows the reload and then his grant."""
    cfg, stack = enrolled_config(tmp_path, faces, {"astronaut": "astronaut.png"})
    cfg.camera.loop = True
    priv, pub = B.generate_signing_key(tmp_path / "admin.key")
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "obama.jpg").write_bytes(sample("obama.jpg").read_bytes())
    (tmp_path / "m.yaml").write_text("sequence: 1\npeople:\n  - {name: obama, id: E1, photo: obama.jpg}\n")
    B.create_bundle(photos, tmp_path / "m.yaml", B.load_private_key(priv), tmp_path / "bundle", "gate")
    cfg.enrollment.audience = ["gate"]
    result = {}

    def admin():
        try:
            assert systemd.wait_for(lambda m: m.count("WATCHDOG=1") >= 3)  # the loop is running, obama denied
            key = G.load_key(cfg.storage.key_file)
            g = G.load(cfg.storage.gallery, key, stack.encoder.sha256)
            bundle = B.admit_bundle(tmp_path / "bundle", B.load_public_key(pub), cfg.enrollment, time.time)
            result["report"] = B.apply_bundle(bundle, g, stack, cfg)
            os.kill(os.getpid(), signal.SIGHUP)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and not any(r["grant"] for r in audit_rows(cfg)):
                time.sleep(0.2)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    assert run_while(cfg, systemd, admin) == 0
    assert result["report"].enrolled == ["obama"]
    msgs = systemd.close()
    assert "RELOADING=1" in msgs
    reload_at = msgs.index("RELOADING=1")
    assert msgs[reload_at + 1] == "READY=1" and msgs[:reload_at].count("WATCHDOG=1") >= 3
    rows = audit_rows(cfg)
    kinds = [(r["kind"], r["reason"]) for r in rows]
    reloaded = kinds.index(("gallery", "reloaded"))
    assert rows[reloaded]["details"]["people"] == 2
    assert not any(r["grant"] for r in rows[:reloaded])
    assert any(r["grant"] and r["identity"] == "obama" for r in rows[reloaded:])
    assert ("enroll", "enrolled") in kinds


def test_bad_gallery_on_reload_keeps_the_old_one(tmp_path, systemd, faces):
    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg"})
    good = Path(cfg.storage.gallery).read_bytes()
    cfg.camera.loop = True

    def corrupt_and_hup():
        try:
            assert systemd.wait_for(lambda m: m.count("WATCHDOG=1") >= 2)
            Path(cfg.storage.gallery).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
            os.kill(os.getpid(), signal.SIGHUP)
            assert systemd.wait_for(lambda m: "RELOADING=1" in m and m.count("WATCHDOG=1") >= 8)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    run_while(cfg, systemd, corrupt_and_hup)
    rows = audit_rows(cfg)
    refused = [r for r in rows if (r["kind"], r["reason"]) == ("gallery", "reload_refused")]
    assert len(refused) == 1 and "failed authentication" in refused[0]["details"]["error"]
    assert any(r["grant"] and r["identity"] == "obama" for r in rows)  # still recognised after the bad reload


def refused_at_start(cfg, systemd, monkeypatch, error, match: str, kind: str) -> dict:
    """The service must refuse to start with `error`: never READY, the door never asked to open,
    the audit holding the refusal (`kind` refused) and the stop. Returns the refusal's row."""
    unlocks = []
    monkeypatch.setattr("edge.relay.DoorRelay.unlock", lambda self, *a, **k: unlocks.append(a))
    with pytest.raises(error, match=match):
        run_service(cfg, verbose=False, notifier=Notifier(systemd.path))
    assert systemd.close() == ["STOPPING=1"]  # never READY: systemd sees a failed start
    rows = audit_rows(cfg)
    assert [(r["kind"], r["reason"]) for r in rows] == [(kind, "refused"), ("service", "stopped")]
    assert unlocks == []
    return rows[0]


def test_refused_gallery_keeps_the_door_locked_and_says_why(tmp_path, systemd, faces, monkeypatch):
    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg"})
    G.new_key_file(tmp_path / "other.key")
    cfg.storage.key_file = str(tmp_path / "other.key")  # the wrong key
    refused = refused_at_start(cfg, systemd, monkeypatch, GalleryError, "failed authentication", "gallery")
    assert "wrong key" in refused["details"]["error"]


def threshold_at_fmr(stack, fmr):
    from edge.match import threshold_for_fmr

    cal = stack.encoder.card.calibration
    return threshold_for_fmr(cal.fmr, cal.threshold, fmr)


def test_a_fixed_threshold_too_loose_for_the_gallery_size_keeps_the_door_locked_and_says_why(tmp_path, systemd, faces,
                                                                                              monkeypatch):
    """A threshold at FMR 0.03 is within the bound for one person (FPIR 0.03) but not for two
    (1 - 0.97^2 = 0.0591 > 0.05): with two enrolled the gate does not start, and says why."""
    cfg, stack = enrolled_config(tmp_path, faces, {"obama": "obama.jpg", "astronaut": "astronaut.png"})
    cfg.match.threshold = threshold_at_fmr(stack, 0.03)
    cfg.match.calibration = "card"  # the table's comparisons taken as independent, so FPIR by hand
    refused = refused_at_start(cfg, systemd, monkeypatch, GalleryError, "above the bound 0.05", "gallery")
    assert "against 2 enrolled" in refused["details"]["error"] and "0.0591" in refused["details"]["error"]


def test_a_reload_that_grows_the_gallery_past_the_thresholds_bound_is_refused(tmp_path, systemd, faces):
    """The same threshold with one person enrolled runs; a reload that adds a second is refused
    and audited, and the gate goes on with the gallery it had (obama, added, is never granted)."""
    cfg, stack = enrolled_config(tmp_path, faces, {"astronaut": "astronaut.png"})
    cfg.match.threshold = threshold_at_fmr(stack, 0.03)
    cfg.camera.loop = True

    def enrol_obama_and_hup():
        try:
            assert systemd.wait_for(lambda m: m.count("WATCHDOG=1") >= 2)
            key = G.load_key(cfg.storage.key_file)
            g = G.load(cfg.storage.gallery, key, stack.encoder.sha256)
            apply(g, [embed_photo(stack, cfg.quality, load_image(sample("obama.jpg")), "obama", "obama.jpg")],
                  cfg.storage.retention_days)
            G.save(g, cfg.storage.gallery, key)
            os.kill(os.getpid(), signal.SIGHUP)
            assert systemd.wait_for(lambda m: "RELOADING=1" in m and m[m.index("RELOADING=1"):].count("WATCHDOG=1") >= 8)
        finally:
            os.kill(os.getpid(), signal.SIGTERM)

    run_while(cfg, systemd, enrol_obama_and_hup)
    rows = audit_rows(cfg)
    refused = [r for r in rows if (r["kind"], r["reason"]) == ("gallery", "reload_refused")]
    assert len(refused) == 1 and "above the bound 0.05" in refused[0]["details"]["error"]
    assert "against 2 enrolled" in refused[0]["details"]["error"]
    assert not any(r["kind"] == "gallery" and r["reason"] == "reloaded" for r in rows)
    assert not any(r["grant"] for r in rows)


@pytest.mark.parametrize("fault", ["missing", "altered"])
def test_a_missing_or_altered_pad_model_keeps_the_door_locked_and_says_why(tmp_path, systemd, faces, monkeypatch, fault):
    import shutil

    from edge.pad import SHIPPED_PAD

    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg"})
    pad = tmp_path / "pad"
    shutil.copytree(SHIPPED_PAD.parent, pad)
    weights = pad / "MiniFASNetV2.onnx"
    weights.chmod(0o644)
    if fault == "missing":
        weights.unlink()
    else:
        data = bytearray(weights.read_bytes())
        data[len(data) // 2] ^= 0x01
        weights.write_bytes(bytes(data))
    cfg.models.liveness = str(pad / SHIPPED_PAD.name)
    refused = refused_at_start(cfg, systemd, monkeypatch, ModelError, "MiniFASNetV2.onnx", "liveness")
    assert "MiniFASNetV2.onnx" in refused["details"]["error"]


def test_liveness_off_written_explicitly_runs_without_a_pad_model(tmp_path, systemd, faces):
    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg"})
    cfg.models.liveness = str(tmp_path / "no-such-pad.card.json")
    cfg.liveness.mode = "off"
    assert run_service(cfg, verbose=False, notifier=Notifier(systemd.path)) == 0
    rows = audit_rows(cfg)
    assert any(r["grant"] for r in rows)
    assert next(r for r in rows if r["kind"] == "service" and r["reason"] == "started")["details"]["liveness"] == "off"


def test_a_provider_this_build_lacks_is_audited_once_per_model_at_start_and_the_gate_runs_on_the_cpu(
        tmp_path, systemd, faces):
    import onnxruntime as ort

    from edge.pad import SHIPPED_PAD, load_pad

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    cfg, stack = enrolled_config(tmp_path, faces, {"obama": "obama.jpg"})
    cfg.models.providers = ["CUDAExecutionProvider"]
    assert run_service(cfg, verbose=False, notifier=Notifier(systemd.path)) == 0
    rows = audit_rows(cfg)
    started = next(i for i, r in enumerate(rows) if r["kind"] == "service" and r["reason"] == "started")
    fallbacks = [r for r in rows if r["kind"] == "model"]
    assert all(r["reason"] == "provider_fallback" for r in fallbacks) and rows[started - len(fallbacks):started] == fallbacks
    onnx_models = [stack.detector.card.name, stack.encoder.card.name, *(m.card.name for m in load_pad(SHIPPED_PAD).members)]
    assert sorted(r["details"]["model"] for r in fallbacks) == sorted(onnx_models)
    for r in fallbacks:
        assert r["details"]["asked"] == ["CUDAExecutionProvider"] and r["details"]["using"] == ["CPUExecutionProvider"]
        assert r["details"]["dropped"]["CUDAExecutionProvider"].startswith("not in this onnxruntime build")
    assert [r["identity"] for r in rows if r["grant"]] == ["obama"]


def test_signal_handlers_restored(tmp_path, systemd, faces):
    cfg, _ = enrolled_config(tmp_path, faces, {"obama": "obama.jpg"})
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    run_service(cfg, max_frames=1, verbose=False, notifier=Notifier(systemd.path))
    assert {s: signal.getsignal(s) for s in before} == before
