"""A gate with MQTT on whose broker refuses connections, hangs (a listener that never answers) or
dies while the gate runs: the whole service (fake models, a live fake camera, mock pins) keeps
deciding at the camera's pace, every decision is on record, the queue stays bounded (the drops
audited), the stop is prompt, and a broker that comes back gets the newest messages."""
from __future__ import annotations

import json
import socket
import threading
import time

import numpy as np
import pytest

import edge.camera as camera_mod
from edge.audit import AuditLog
from edge.config import MqttConfig
from edge.service import Notifier, run_service
from evaluation.mqtt_bench import LocalBroker, Subscriber, free_port, mosquitto
from reliability.fakes import ALICE, Device, NotifySocket, RelaySpy, audit_rows, fake_config, fake_models, patched, \
    unlocked_intervals, write_gallery

FRAMES = 60  # at the fake camera's 30 fps: 2 s of Alice at the door, each frame a grant (k = n = 1)
QUEUE = 3


def run_gate(tmp_path, port: int, during=None, frames: int = FRAMES) -> dict:
    cfg = fake_config(tmp_path)
    cfg.camera.source = "opencv"  # a live source; make_camera is replaced by the fake device
    cfg.mqtt = MqttConfig(enabled=True, host="127.0.0.1", port=port, client_id="door1", queue_size=QUEUE,
                          keepalive_s=5, reconnect_backoff_s=0.1, reconnect_backoff_max_s=0.2)
    write_gallery(cfg)
    device = Device([(0.0, "ok", ALICE)])
    sock = NotifySocket()
    try:
        with RelaySpy() as spy, fake_models(), patched(camera_mod, "make_camera", lambda c: device.open()):
            if during is not None:
                threading.Timer(0.8, during).start()
            t0 = time.monotonic()
            rc = run_service(cfg, max_frames=frames, verbose=False, notifier=Notifier(sock.path))
            took = time.monotonic() - t0
    finally:
        sock.close()
    rows = audit_rows(cfg.storage.audit)
    with AuditLog(cfg.storage.audit) as log:
        intact = log.integrity_check()
    pings = sock.pings()
    return {"rc": rc, "frames": frames, "took_s": took, "rows": rows, "intact": intact, "openings": len(unlocked_intervals(spy.relay.line)),
            "longest_gap_s": float(np.max(np.diff(pings))) if len(pings) > 1 else None, "pings": len(pings),
            "stopped_at": rows[-1]["t_mono"]}


def silent_listener():
    """A TCP listener on loopback that takes connections into its backlog and never says a word:
    a hung broker (the client's CONNECT is never answered)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    return s


def check_unhindered(r: dict) -> None:
    assert r["rc"] == 0 and r["intact"]
    decisions = [row for row in r["rows"] if row["kind"] == "decision"]
    assert len(decisions) == r["frames"] and all(row["grant"] for row in decisions)  # every frame decided, on record
    assert r["pings"] >= r["frames"] and r["longest_gap_s"] < 0.5, r["longest_gap_s"]  # the frame loop never waited
    assert r["openings"] >= 1
    assert [row["reason"] for row in r["rows"] if row["kind"] == "service"] == ["started", "stopped"]


@pytest.mark.parametrize("broker", ["refused", "silent"])
def test_a_dead_or_hung_broker_never_blocks_the_gate_or_loses_an_audit_row(tmp_path, broker):
    listener = silent_listener() if broker == "silent" else None
    port = listener.getsockname()[1] if listener else free_port()  # nothing listens on a fresh free port
    try:
        r = run_gate(tmp_path, port)
    finally:
        if listener:
            listener.close()
    check_unhindered(r)
    # 2 s of frames at 30 fps, then the stop: nothing waits on the broker, the stop included
    assert r["took_s"] < FRAMES / 30 + 4, r["took_s"]
    mqtt = {row["reason"]: json.loads(row["details"]) for row in r["rows"] if row["kind"] == "mqtt"}
    if broker == "refused":
        assert "Connection refused" in mqtt["unreachable"]["error"]
    dropped = mqtt["dropped"]  # never connected: the queue kept the newest QUEUE, the rest were dropped
    published = FRAMES + 3  # the decisions, camera online, gate started and stopped
    assert (dropped["messages"], dropped["queue_size"]) == (published - QUEUE, QUEUE)
    assert "connected" not in mqtt


@pytest.mark.skipif(mosquitto() is None, reason="mosquitto not installed (apt-get install mosquitto; .ci/run "
                                                "installs it as root)")
def test_a_broker_that_dies_and_comes_back_while_the_gate_runs(tmp_path):
    broker = LocalBroker(tmp_path, free_port()).start()
    sub = Subscriber(broker.port, "facegate/door1/#")
    died = {}

    def outage():
        died["at"] = time.monotonic()
        broker.stop()
        time.sleep(0.6)  # 18 frames decided meanwhile, QUEUE of them kept
        broker.start()
        died["back"] = time.monotonic()

    try:
        r = run_gate(tmp_path, broker.port, during=outage, frames=3 * FRAMES)  # 6 s: time to come back
        check_unhindered(r)
        decided_while_down = [row for row in r["rows"] if row["kind"] == "decision" and died["at"] < row["t_mono"]
                              < died["back"]]
        assert len(decided_while_down) > QUEUE  # the gate went on deciding at the camera's pace
        reasons = [row["reason"] for row in r["rows"] if row["kind"] == "mqtt"]
        assert reasons[0] == "connected" and "disconnected" in reasons and reasons.count("connected") >= 2
        assert "dropped" in reasons
        # after the broker came back: decisions reach the subscriber again, the stop and 'offline' too
        assert sub.wait(lambda s: s.on("facegate/door1/status")[-1:] == [b"offline"]
                        and s.on("facegate/door1/gate")[-1:] == [b"stopped"], 10)
        assert sub.on("facegate/door1/camera")[-1:] == [b"ON"] and b"started" in sub.on("facegate/door1/gate")
        assert int(sub.on("facegate/door1/door_pulses")[-1]) == r["openings"]  # the relay's own count
        got = {json.loads(p)["audit_id"] for p in sub.on("facegate/door1/decision")}
        # a restarted broker keeps no subscriptions: count from when both clients were back (the
        # subscriber's acknowledged subscription, the gate's audited reconnection)
        back = max(sub.subscribed[-1], [row["t_mono"] for row in r["rows"] if (row["kind"], row["reason"]) == ("mqtt", "connected")][-1])
        assert back > died["back"]
        after = [row["id"] for row in r["rows"] if row["kind"] == "decision" and row["t_mono"] > back]
        assert after and set(after) <= got
    finally:
        sub.close()
        broker.stop()
