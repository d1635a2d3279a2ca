"""`python -m evaluation mqtt-bench`: decision-to-MQTT latency on loopback. A mosquitto broker on
127.0.0.1, the gate's audit log with edge.mqtt's publisher listening, a subscriber on the decision
topic; each decision is recorded as the gate records it (AuditLog.record: its row durable, fsync'd)
and timed from the call until the subscriber has the message, and from the commit (the call's
return) until then. Median, 99th percentile and maximum over all decisions; decisions that never
arrived are counted.

LocalBroker and Subscriber are also the tests' real broker and client (tests/unit/test_mqtt.py,
tests/reliability/test_mqtt_faults.py)."""
from __future__ import annotations

import json
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from paho.mqtt.client import CallbackAPIVersion, Client

from edge.audit import AuditLog
from edge.config import MqttConfig
from edge.mqtt import start_publisher, topics
from edge.records import Decision


def mosquitto() -> str | None:
    """The broker binary (Debian's mosquitto package puts it in /usr/sbin), or None."""
    return shutil.which("mosquitto") or next((p for p in ("/usr/sbin/mosquitto",) if os.access(p, os.X_OK)), None)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalBroker:
    """mosquitto listening on 127.0.0.1 only, at `port` (default: a free one); `conf` adds lines
    (TLS, passwords). stop() and start() again on the same port, as a broker restart."""

    def __init__(self, folder: str | Path, port: int | None = None, conf: str = ""):
        exe = mosquitto()
        if exe is None:
            raise FileNotFoundError("mosquitto not installed (apt-get install mosquitto)")
        self.exe, self.folder, self.port = exe, Path(folder), port or free_port()
        self.conf = self.folder / "mosquitto.conf"
        # as root mosquitto would switch to its own user, who cannot read a test's files
        self.conf.write_text(f"listener {self.port} 127.0.0.1\npersistence false\nuser {pwd.getpwuid(os.geteuid()).pw_name}\n"
                             + (conf or "allow_anonymous true\n"))
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 10.0) -> LocalBroker:
        self.log = open(self.folder / "mosquitto.log", "ab")
        self.proc = subprocess.Popen([self.exe, "-c", str(self.conf)], stdout=self.log, stderr=subprocess.STDOUT)
        until = time.monotonic() + timeout
        while time.monotonic() < until:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mosquitto exited {self.proc.returncode}: "
                                   f"{(self.folder / 'mosquitto.log').read_text(errors='replace')[-500:]}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"mosquitto did not listen on 127.0.0.1:{self.port} within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self.log.close()
        self.proc = None

    def __enter__(self) -> LocalBroker:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class Subscriber:
    """A client subscribed to `topic` (again after each reconnect), keeping every message with
    time.perf_counter() at arrival, and the time.monotonic() of each subscription the broker
    acknowledged (in `subscribed`)."""

    def __init__(self, port: int, topic: str = "#", host: str = "127.0.0.1", **tls):
        self.messages: list[tuple[str, bytes, bool, float]] = []
        self.subscribed: list[float] = []
        self._cond = threading.Condition()
        self.client = Client(CallbackAPIVersion.VERSION2, client_id=f"sub-{os.getpid()}-{id(self)}")
        self.client.reconnect_delay_set(0.1, 0.5)
        if tls:
            self.client.tls_set(**tls)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda c, u, mid, codes, p: self.subscribed.append(time.monotonic())
        self.client.on_message = self._on_message
        self.client.connect(host, port, keepalive=30)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        t = time.perf_counter()
        with self._cond:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain), t))
            self._cond.notify_all()

    def on(self, topic: str) -> list[bytes]:
        with self._cond:
            return [p for t, p, _, _ in self.messages if t == topic]

    def wait(self, predicate, timeout: float = 10.0) -> bool:
        """Whether predicate(self) came true within `timeout`."""
        until = time.monotonic() + timeout
        with self._cond:
            while not predicate(self):
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def bench(decisions: int, interval_s: float, qos: int, folder: Path) -> dict:
    with LocalBroker(folder) as broker:
        cfg = MqttConfig(enabled=True, host="127.0.0.1", port=broker.port, client_id="bench", qos=qos,
                         queue_size=max(1000, decisions))
        t = topics(cfg)
        sub = Subscriber(broker.port, f"{t.base}/#")
        with AuditLog(folder / "audit.sqlite3") as audit:
            publisher = start_publisher(cfg, audit)
            try:
                if not sub.wait(lambda s: b"online" in s.on(t.status), 10):
                    raise RuntimeError("the publisher did not come online")
                called, committed = {}, {}
                for i in range(decisions):
                    d = Decision(i % 2 == 0, "granted" if i % 2 == 0 else "unknown", "bench" if i % 2 == 0 else None,
                                 track_id=i, t_mono=time.monotonic(), t_wall=time.time())
                    t0 = time.perf_counter()
                    row = audit.record(d)
                    called[row], committed[row] = t0, time.perf_counter()
                    time.sleep(interval_s)
                sub.wait(lambda s: len(s.on(t.decision)) >= decisions, 10)
            finally:
                publisher.close()
                sub.close()
    arrived = {json.loads(p)["audit_id"]: at for topic, p, _, at in sub.messages if topic == t.decision}
    from_call = np.array([arrived[r] - called[r] for r in called if r in arrived]) * 1000
    from_commit = np.array([arrived[r] - committed[r] for r in committed if r in arrived]) * 1000
    return {"decisions": decisions, "arrived": len(from_call), "qos": qos, "interval_ms": interval_s * 1000,
            "decision_to_subscriber": _stats(from_call), "commit_to_subscriber": _stats(from_commit),
            "audit_write": _stats(np.array([committed[r] - called[r] for r in called]) * 1000)}


def _stats(ms: np.ndarray) -> dict:
    if not len(ms):
        return {}
    return {"median_ms": round(float(np.median(ms)), 3), "p99_ms": round(float(np.percentile(ms, 99)), 3),
            "max_ms": round(float(ms.max()), 3)}


def main(args) -> int:
    if mosquitto() is None:
        print("mosquitto not installed (apt-get install mosquitto)")
        return 2
    with tempfile.TemporaryDirectory(prefix="fg-mqtt-bench") as folder:
        r = bench(args.decisions, args.interval_ms / 1000.0, args.qos, Path(folder))
    print(f"{r['arrived']} of {r['decisions']} decisions arrived (QoS {r['qos']}, one every {r['interval_ms']:g} ms)")
    print("| from | median ms | p99 ms | max ms |\n|---|---|---|---|")
    for name, label in (("decision_to_subscriber", "audit.record called (row written, fsync'd) -> subscriber"),
                        ("commit_to_subscriber", "row committed -> subscriber"), ("audit_write", "audit.record itself")):
        s = r[name]
        print(f"| {label} | {s.get('median_ms')} | {s.get('p99_ms')} | {s.get('max_ms')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=2))
    return 0 if r["arrived"] == r["decisions"] else 1
