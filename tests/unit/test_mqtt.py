"""MQTT events (edge.mqtt): the config section, Home Assistant discovery payloads, what a row
publishes, the secrets, and the publisher against a real broker (mosquitto on 127.0.0.1, started
here; skipped with the reason when it is not installed): decisions after their audit rows,
discovery, availability and the last will, a broker that goes away and comes back."""
from __future__ import annotations

import datetime
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from edge.audit import AuditLog
from edge.config import MqttConfig, load_config
from edge.errors import ConfigError
from edge.mqtt import (CREDENTIALS, check_files, connection_secrets, discovery_messages, node_id, row_messages,
                       start_publisher, topics)
from edge.records import Decision
from evaluation.mqtt_bench import LocalBroker, Subscriber, free_port, mosquitto

REPO = Path(__file__).resolve().parents[2]

# What Home Assistant's MQTT discovery needs of every config payload for the gate to appear as one
# device (its MQTT integration docs): a unique_id (without one `device` is ignored), the topic its
# state comes on (required by the sensor and binary_sensor platforms), and `device` with
# identifiers; the availability topic ties each entity to the gate's last will.
REQUIRED = ("unique_id", "state_topic", "device", "availability_topic")
REQUIRED_DEVICE = ("identifiers", "name")
DISCOVERY_TOPIC = re.compile(r"^homeassistant/(sensor|binary_sensor)/([A-Za-z0-9_-]+)/([A-Za-z0-9_-]+)/config$")

needs_broker = pytest.mark.skipif(mosquitto() is None, reason="mosquitto not installed (apt-get install mosquitto; "
                                                               ".ci/run installs it as root)")


def mqtt(**kw) -> MqttConfig:
    return MqttConfig(**{"enabled": True, "host": "127.0.0.1", "client_id": "door1", "reconnect_backoff_s": 0.1,
                         "reconnect_backoff_max_s": 0.5, **kw})


def decision(grant=True, reason="granted", identity="alice", track_id=7) -> Decision:
    return Decision(grant, reason, identity, score=0.8, runner_up_score=0.2, threshold=0.5, track_id=track_id,
                    t_mono=time.monotonic(), t_wall=time.time(), details={"nearest": "bob"})


# ------------------------------------------------------------------ config
def write_config(tmp_path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_mqtt_is_off_by_default_and_an_enabled_one_needs_a_host(tmp_path):
    assert load_config(write_config(tmp_path, "{}\n")).mqtt.enabled is False
    with pytest.raises(ConfigError, match="mqtt.host: mqtt.enabled needs the broker's address"):
        load_config(write_config(tmp_path, "mqtt: {enabled: true}\n"))
    cfg = load_config(write_config(tmp_path, "mqtt: {enabled: true, host: broker.lan, port: 8883, qos: 2, tls: true}\n"))
    assert (cfg.mqtt.host, cfg.mqtt.port, cfg.mqtt.qos, cfg.mqtt.publish_identity) == ("broker.lan", 8883, 2, False)


@pytest.mark.parametrize("section,problem", [
    ("{enabled: true, host: b, username: u, password_file: /p}", "without mqtt.tls the password crosses the network"),
    ("{enabled: true, host: b, password_file: /p}", "mqtt.password_file is sent only with a username"),
    ("{enabled: true, host: b, tls: true, key_file: /k}", "mqtt.key_file is the client certificate's key"),
    ("{enabled: true, host: b, ca_file: /ca.pem}", "mqtt.ca_file is read only with mqtt.tls true"),
    ("{enabled: true, host: b, tls: true, ca_file: ca.pem}", "mqtt.ca_file 'ca.pem': an absolute path expected"),
    ("{enabled: true, host: b, topic_prefix: 'site/#'}", "mqtt.topic_prefix"),
    ("{enabled: true, host: b, client_id: 'door 1'}", "mqtt.client_id"),
    ("{enabled: true, host: 'b/c'}", "mqtt.host"),
    ("{enabled: true, host: b, qos: 3}", "mqtt.qos"),
    ("{enabled: true, host: b, queue_size: 0}", "mqtt.queue_size"),
    ("{enabled: true, host: b, reconnect_backoff_s: 30, reconnect_backoff_max_s: 10}",
     "mqtt.reconnect_backoff_s 30.0 exceeds mqtt.reconnect_backoff_max_s 10.0"),
    ("{enabled: true, host: b, password: x}", "mqtt.password"),
])
def test_a_bad_mqtt_section_is_refused_naming_the_field(tmp_path, section, problem):
    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, f"mqtt: {section}\n"))
    assert problem in str(e.value) and str(tmp_path / "c.yaml") in str(e.value)


def test_a_password_to_a_broker_on_this_machine_may_go_without_tls(tmp_path):
    cfg = load_config(write_config(tmp_path, "mqtt: {enabled: true, host: localhost, username: gate}\n"))
    assert cfg.mqtt.username == "gate" and cfg.mqtt.password_file is None


# ------------------------------------------------------------------ what is published
def test_every_discovery_payload_has_what_home_assistant_requires_and_makes_one_device():
    cfg = mqtt()
    msgs = discovery_messages(cfg)
    seen = {}
    for m in msgs:
        match = DISCOVERY_TOPIC.match(m.topic)
        assert match and match.group(2) == "door1" and m.retain, m.topic
        payload = json.loads(m.payload)
        missing = [k for k in REQUIRED if not payload.get(k)]
        assert not missing, f"{m.topic} lacks {missing}"
        assert all(payload["device"].get(k) for k in REQUIRED_DEVICE), payload["device"]
        assert isinstance(payload["device"]["identifiers"], list)
        assert payload["availability_topic"] == "facegate/door1/status"
        assert (payload["payload_available"], payload["payload_not_available"]) == ("online", "offline")
        seen[(match.group(1), match.group(3))] = payload
    assert len({p["unique_id"] for p in seen.values()}) == len(seen) == 4
    assert len({json.dumps(p["device"], sort_keys=True) for p in seen.values()}) == 1  # one device
    camera = seen[("binary_sensor", "camera")]
    assert (camera["device_class"], camera["state_topic"]) == ("connectivity", "facegate/door1/camera")
    assert seen[("sensor", "door_pulses")]["state_class"] == "total_increasing"
    assert seen[("sensor", "last_decision")]["state_topic"] == "facegate/door1/decision"
    assert seen[("sensor", "gate")]["state_topic"] == "facegate/door1/gate"


def test_the_node_is_the_host_name_unless_a_client_id_is_given(monkeypatch):
    monkeypatch.setattr("socket.gethostname", lambda: "door.3.example.org")
    assert node_id(MqttConfig()) == "facegate-door"
    assert topics(MqttConfig()).base == "facegate/facegate-door"
    assert topics(MqttConfig(client_id="x", topic_prefix="site/hq/x")).decision == "site/hq/x/decision"


def row(kind, reason, **kw) -> dict:
    return {"id": 5, "kind": kind, "reason": reason, "grant": None, "identity": None, "track_id": None,
            "t_wall": 1.7e9, "wall_clock_synced": 1, "score": 0.9, "details": '{"nearest":"bob"}', **kw}


def test_a_decision_publishes_its_outcome_and_the_name_only_where_the_config_allows():
    t = topics(mqtt())
    granted = row("decision", "granted", grant=1, identity="alice", track_id=3)
    (m,) = row_messages(granted, t, publish_identity=False)
    assert m.topic == "facegate/door1/decision" and m.retain
    assert json.loads(m.payload) == {"audit_id": 5, "t_wall": 1.7e9, "clock_synced": True, "grant": True,
                                     "reason": "granted", "track_id": 3}
    assert json.loads(row_messages(granted, t, publish_identity=True)[0].payload)["identity"] == "alice"
    denied = row("decision", "unknown", grant=0)
    body = json.loads(row_messages(denied, t, publish_identity=True)[0].payload)
    assert body["grant"] is False and "identity" not in body and b"bob" not in row_messages(denied, t, True)[0].payload


@pytest.mark.parametrize("kind,reason,topic,payload", [
    ("camera", "online", "camera", b"ON"), ("camera", "offline:stall", "camera", b"OFF"), ("camera", "end", "camera", b"OFF"),
    ("service", "started", "gate", b"started"), ("service", "stopped", "gate", b"stopped"),
    ("camera", "fault:black", None, None), ("gallery", "reloaded", None, None), ("mqtt", "dropped", None, None),
])
def test_camera_health_and_gate_status_rows_publish_their_state(kind, reason, topic, payload):
    msgs = row_messages(row(kind, reason), topics(mqtt()), False)
    assert [(m.topic, m.payload, m.retain) for m in msgs] == ([] if topic is None else
                                                              [(f"facegate/door1/{topic}", payload, True)])


# ------------------------------------------------------------------ secrets
def test_a_password_file_others_can_read_is_refused_naming_it_and_audited(tmp_path):
    pw = tmp_path / "mqtt.password"
    pw.write_text("hunter2\n")
    pw.chmod(0o644)
    with AuditLog(tmp_path / "a.sqlite3") as audit:
        with pytest.raises(ConfigError) as e:
            start_publisher(mqtt(username="gate", password_file=str(pw)), audit)
        assert e.value.path == str(pw) and "owner-only like the gallery key" in str(e.value)
        (refused,) = audit.tail(1)
        assert (refused["kind"], refused["reason"]) == ("mqtt", "refused") and str(pw) in refused["details"]["error"]
        assert audit.listeners == []
    pw.chmod(0o600)
    assert connection_secrets(mqtt(username="gate", password_file=str(pw)))[0] == b"hunter2"


def test_a_gate_whose_broker_password_others_can_read_does_not_start_and_says_why(tmp_path):
    from edge.service import Notifier, run_service
    from reliability.fakes import ALICE, Device, audit_rows, fake_config, fake_models, write_gallery

    pw = tmp_path / "mqtt.password"
    pw.write_text("hunter2\n")
    pw.chmod(0o640)
    cfg = fake_config(tmp_path)
    cfg.mqtt = mqtt(port=free_port(), username="gate", password_file=str(pw))
    write_gallery(cfg)
    with fake_models(), pytest.raises(ConfigError, match="owner-only like the gallery key"):
        run_service(cfg, max_frames=5, verbose=False, notifier=Notifier(""),
                    camera_factory=lambda: Device([(0.0, "ok", ALICE)]).open())
    rows = [(r["kind"], r["reason"]) for r in audit_rows(cfg.storage.audit)]
    assert rows == [("mqtt", "refused"), ("service", "stopped")]  # never started, no frame judged


def test_check_config_reads_a_credential_where_the_installer_takes_it_from(tmp_path, monkeypatch):
    monkeypatch.setitem(CREDENTIALS, "mqtt.password", str(tmp_path / "absent.password"))
    with pytest.raises(ConfigError) as e:
        check_files(mqtt(host="localhost", username="gate"))
    assert e.value.path == str(tmp_path / "absent.password") and "mqtt password not found" in str(e.value)
    check_files(MqttConfig())  # off: nothing read


def test_check_config_command_names_a_bad_mqtt_file(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("x")
    pw.chmod(0o640)
    cfg = write_config(tmp_path, f"liveness: {{mode: 'off'}}\nmqtt: {{enabled: true, host: localhost, username: g, "
                                 f"password_file: {pw}}}\n")
    r = subprocess.run([sys.executable, "-m", "edge", "check-config", str(cfg)], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    assert r.returncode == 2 and f"error: {pw}: mqtt password may be read or written by its group or others " \
                                  f"(mode 0640)" in r.stderr, r.stderr


# ------------------------------------------------------------------ against a real broker
def test_a_listener_sees_a_row_only_once_it_is_committed_and_a_failing_one_loses_no_row(tmp_path):
    path = tmp_path / "a.sqlite3"
    seen = []
    with AuditLog(path) as audit, AuditLog(path, readonly=True) as reader:
        def check(rows):
            seen.append([(r["id"], reader.count()) for r in rows])
            raise RuntimeError("a listener's own fault")
        audit.listeners.append(check)
        first = audit.record(decision())
        audit.record_events([("camera", "online", None, {}), ("service", "started", None, {})])
        assert seen == [[(first, 1)], [(first + 1, 3), (first + 2, 3)]] and audit.count() == 3


@needs_broker
def test_decisions_discovery_and_availability_reach_a_subscriber(tmp_path):
    with LocalBroker(tmp_path) as broker, AuditLog(tmp_path / "a.sqlite3") as audit:
        publisher = start_publisher(mqtt(port=broker.port), audit, pulses=lambda: 2)
        sub = Subscriber(broker.port)
        try:
            assert sub.wait(lambda s: b"online" in s.on("facegate/door1/status"))
            ids = [audit.record(decision()), audit.record(decision(False, "unknown", None))]
            audit.record_event("camera", "online")
            assert sub.wait(lambda s: len(s.on("facegate/door1/decision")) == 2 and s.on("facegate/door1/camera")
                            and s.on("facegate/door1/door_pulses"))
            bodies = [json.loads(p) for p in sub.on("facegate/door1/decision")]
            assert [(b["audit_id"], b["grant"], b["reason"]) for b in bodies] == [(ids[0], True, "granted"),
                                                                                 (ids[1], False, "unknown")]
            assert all("identity" not in b and "score" not in b for b in bodies)
            assert sub.on("facegate/door1/camera") == [b"ON"] and sub.on("facegate/door1/door_pulses") == [b"2"]
            assert audit.tail(10)[0]["reason"] == "connected"  # the publisher's own row, before the decisions
        finally:
            sub.close()
        # a client that comes later gets the retained discovery, state and availability
        late = Subscriber(broker.port)
        try:
            expected = {"facegate/door1/status", "facegate/door1/camera", "facegate/door1/decision",
                        "facegate/door1/door_pulses"} | {m.topic for m in discovery_messages(mqtt())}
            assert late.wait(lambda s: {t for t, _, retained, _ in s.messages if retained} == expected)
            for t, p, _, _ in late.messages:
                if t.startswith("homeassistant/"):
                    assert all(k in json.loads(p) for k in REQUIRED), t
            publisher.close()
            assert late.wait(lambda s: s.on("facegate/door1/status")[-1:] == [b"offline"], 5)
        finally:
            late.close()


@needs_broker
def test_the_last_will_says_offline_when_the_gate_dies(tmp_path):
    with LocalBroker(tmp_path) as broker:
        sub = Subscriber(broker.port, "facegate/door1/status")
        code = ("import sys, time; from edge.audit import AuditLog; from edge.config import MqttConfig; "
                "from edge.mqtt import start_publisher; "
                f"start_publisher(MqttConfig(enabled=True, host='127.0.0.1', port={broker.port}, client_id='door1', "
                f"keepalive_s=5), AuditLog(sys.argv[1])); print('up', flush=True); time.sleep(60)")
        gate = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "a.sqlite3")], cwd=REPO,
                                stdout=subprocess.PIPE, text=True)
        try:
            assert gate.stdout.readline() == "up\n"
            assert sub.wait(lambda s: s.on("facegate/door1/status") == [b"online"])
            os.kill(gate.pid, signal.SIGKILL)  # no clean disconnect: the broker sends the will
            assert sub.wait(lambda s: s.on("facegate/door1/status") == [b"online", b"offline"], 10)
        finally:
            gate.kill()
            gate.wait()
            sub.close()


@needs_broker
def test_a_broker_that_goes_away_blocks_nothing_keeps_the_newest_and_delivers_them_when_back(tmp_path):
    port = free_port()
    broker = LocalBroker(tmp_path, port).start()
    with AuditLog(tmp_path / "a.sqlite3") as audit:
        # The publisher waits 2 s between tries, the subscriber at most 0.5 s: the subscriber is
        # back and subscribed before the queue is sent (a restarted broker keeps no subscriptions).
        publisher = start_publisher(mqtt(port=port, queue_size=5, reconnect_backoff_s=2.0, reconnect_backoff_max_s=2.0),
                                    audit)
        sub = Subscriber(port, "facegate/door1/#")
        try:
            assert sub.wait(lambda s: b"online" in s.on("facegate/door1/status"))
            broker.stop()
            time.sleep(0.3)
            slowest, ids = 0.0, []
            for i in range(12):
                t0 = time.perf_counter()
                ids.append(audit.record(decision(track_id=i)))
                slowest = max(slowest, time.perf_counter() - t0)
            assert slowest < 0.5  # an fsync'd row, and not a moment waiting on the broker
            assert publisher.queued() == 5 and publisher.dropped == 7  # bounded: the 7 oldest went
            assert audit.count() >= 12 + 1  # every row is on record
            broker.start()
            assert sub.wait(lambda s: len(s.on("facegate/door1/decision")) >= 5, 15)
            got = [json.loads(p)["audit_id"] for p in sub.on("facegate/door1/decision")]
            assert got[-5:] == ids[-5:] and not set(got) & set(ids[:7])
            assert sub.wait(lambda s: s.on("facegate/door1/status")[-1:] == [b"online"])
            time.sleep(0.2)
            reasons = [(r["reason"], r["details"]) for r in audit.tail(40) if r["kind"] == "mqtt"]
            assert [r for r, _ in reasons][:1] == ["connected"] and "disconnected" in [r for r, _ in reasons]
            dropped = [d for r, d in reasons if r == "dropped"]
            assert dropped and dropped[0]["messages"] == 7 and dropped[0]["queue_size"] == 5
            assert [r for r, _ in reasons][-2:] == ["connected", "dropped"]
        finally:
            publisher.close()
            sub.close()
            broker.stop()


def test_a_broker_that_takes_the_connection_and_never_answers_is_audited_and_tried_again(tmp_path):
    hung = socket.socket()  # takes connections into its backlog, never says a word
    hung.bind(("127.0.0.1", 0))
    hung.listen(8)
    with AuditLog(tmp_path / "a.sqlite3") as audit:
        publisher = start_publisher(mqtt(port=hung.getsockname()[1], keepalive_s=5), audit)
        try:
            t0 = time.monotonic()
            audit.record(decision())
            assert time.monotonic() - t0 < 0.5
            deadline = time.monotonic() + 12
            while time.monotonic() < deadline and audit.tail(1)[0]["kind"] != "mqtt":
                time.sleep(0.1)
            (r,) = audit.tail(1)
            assert (r["kind"], r["reason"]) == ("mqtt", "unreachable") and "Keep alive" in r["details"]["reason"], r
            assert publisher.queued() == 1
        finally:
            t0 = time.monotonic()
            publisher.close()
            assert time.monotonic() - t0 < 5
            hung.close()


@needs_broker
def test_a_broker_that_wants_a_password_gets_it_from_the_owner_only_file(tmp_path):
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(tmp_path / "passwd"), "gate", "s3cret"], check=True,
                   capture_output=True, timeout=30)
    pw = tmp_path / "mqtt.password"
    pw.write_text("s3cret\n")
    pw.chmod(0o600)
    conf = f"allow_anonymous false\npassword_file {tmp_path / 'passwd'}\n"
    with LocalBroker(tmp_path, conf=conf) as broker, AuditLog(tmp_path / "a.sqlite3") as audit:
        publisher = start_publisher(mqtt(port=broker.port, host="localhost", username="gate", password_file=str(pw)),
                                    audit)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not any(r["reason"] == "connected" for r in audit.tail(5)):
                time.sleep(0.05)
            assert any(r["kind"] == "mqtt" and r["reason"] == "connected" for r in audit.tail(5))
        finally:
            publisher.close()
        pw.write_text("wrong\n")
        publisher = start_publisher(mqtt(port=broker.port, host="localhost", username="gate", password_file=str(pw)),
                                    audit)
        try:
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and audit.tail(1)[0]["reason"] != "refused":
                time.sleep(0.05)
            (refused,) = audit.tail(1)
            assert (refused["kind"], refused["reason"]) == ("mqtt", "refused"), refused
            assert "Not authorized" in refused["details"]["reason"] or "Bad user" in refused["details"]["reason"]
        finally:
            publisher.close()


def make_certs(folder: Path, name: str = "localhost"):
    """A CA, a server certificate for `name` signed by it, and a second CA that signed nothing."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, key, issuer, issuer_key, ca, san=None):
        b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)])).public_key(key.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=1))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName([x509.DNSName(san)]), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(path, obj):
        data = obj.public_bytes(serialization.Encoding.PEM) if hasattr(obj, "public_bytes") and not hasattr(
            obj, "private_bytes") else obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption())
        path.write_bytes(data)
        path.chmod(0o600)
        return path

    ca_key, other_key, server_key = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    ca = cert("test ca", ca_key, "test ca", ca_key, True)
    other = cert("other ca", other_key, "other ca", other_key, True)
    server = cert(name, server_key, "test ca", ca_key, False, san=name)
    return (write(folder / "ca.pem", ca), write(folder / "other.pem", other), write(folder / "server.pem", server),
            write(folder / "server.key", server_key))


@needs_broker
def test_tls_connects_to_a_broker_whose_certificate_chains_to_ca_file_and_refuses_another(tmp_path):
    ca, other, cert, key = make_certs(tmp_path)
    conf = f"allow_anonymous true\ncafile {ca}\ncertfile {cert}\nkeyfile {key}\n"
    with LocalBroker(tmp_path, conf=conf) as broker, AuditLog(tmp_path / "a.sqlite3") as audit:
        for ca_file, reason in ((str(ca), "connected"), (str(other), "unreachable")):
            before = audit.count()
            publisher = start_publisher(mqtt(port=broker.port, host="localhost", tls=True, ca_file=ca_file), audit)
            try:
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline and audit.count() == before:
                    time.sleep(0.05)
                (r,) = audit.tail(1)
                assert (r["kind"], r["reason"]) == ("mqtt", reason), r
                if reason == "unreachable":
                    assert "CERTIFICATE_VERIFY_FAILED" in r["details"]["error"]
            finally:
                publisher.close()
