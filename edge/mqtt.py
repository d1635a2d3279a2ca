"""MQTT events with Home Assistant discovery (config section `mqtt:`, off by default).

What is published: each audited decision (its audit row id, time, grant, reason and track; the
person's name only with mqtt.publish_identity; never scores, details, images or embeddings: a
denial's nearest identity stays in the audit log), the camera online or offline, the door pulses
since start, the gate started or stopped, and availability: 'online' (retained) on each connect,
'offline' on a clean stop and, as the broker's last will, when the gate vanishes. Home Assistant
discovery configs (retained) make the gate one device with those entities.

Order and the door: the audit log hands each row to `MqttPublisher.on_rows` after its transaction
committed (edge.audit.AuditLog.listeners), so nothing is published that is not on record. on_rows
only appends to a bounded queue and returns; the publisher's own thread publishes, and paho's
network thread connects and reconnects with back-off. The door never waits on the broker. While
the broker is away the queue keeps the newest mqtt.queue_size messages: the oldest are dropped,
counted, logged at the first drop and audited ('mqtt dropped') when the broker is back or the gate
stops. Connection trouble is audited once per outage ('mqtt unreachable', 'mqtt refused',
'mqtt disconnected'), and each connection ('mqtt connected')."""
from __future__ import annotations

import ipaddress
import json
import logging
import re
import socket
import ssl
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from paho.mqtt.client import Client, CallbackAPIVersion, MQTTErrorCode, MQTTv311

from .config import MqttConfig, load_config
from .errors import ConfigError, FacegateError, run_cli
from .secretfile import credential_path, read_secret

log = logging.getLogger(__name__)

# The secrets a config leaves to systemd's credentials, and where the installer's drop-in takes
# them from (LoadCredential=NAME:SOURCE); check-config reads them there.
CREDENTIALS = {"mqtt.password": "/etc/facegate/mqtt.password", "mqtt.key": "/etc/facegate/mqtt.key"}
MAX_PASSWORD_BYTES = 65535  # an MQTT string's limit
MAX_KEY_BYTES = 1 << 20
PULSE_POLL_S = 0.25  # how often the door's pulse count is looked at
RETRY_S = 0.05  # after paho refused a message (its own queue full, or the connection just went)
PAHO_QUEUE = 64  # messages handed to paho and not yet acknowledged: bounded as well
CONNECT_TIMEOUT_S = 3.0  # also bounds how long a stop waits on a connection attempt under way
CLOSE_DRAIN_S = 2.0  # at a stop, how long the queue may still drain to a connected broker


@dataclass(frozen=True)
class Message:
    topic: str
    payload: bytes
    retain: bool = False


@dataclass(frozen=True)
class Topics:
    base: str

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def decision(self) -> str:
        return f"{self.base}/decision"

    @property
    def camera(self) -> str:
        return f"{self.base}/camera"

    @property
    def door_pulses(self) -> str:
        return f"{self.base}/door_pulses"

    @property
    def gate(self) -> str:
        return f"{self.base}/gate"


def node_id(cfg: MqttConfig) -> str:
    """The client id, Home Assistant node id and device identifier: mqtt.client_id, or
    facegate-<host name> in the characters all three accept."""
    if cfg.client_id:
        return cfg.client_id
    host = re.sub(r"[^A-Za-z0-9_-]", "-", socket.gethostname().split(".")[0])[:55]
    return f"facegate-{host or 'gate'}"


def topics(cfg: MqttConfig) -> Topics:
    return Topics(cfg.topic_prefix or f"facegate/{node_id(cfg)}")


def _json(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), sort_keys=True).encode()


def discovery_messages(cfg: MqttConfig) -> list[Message]:
    """Home Assistant discovery configs, retained, at <discovery_prefix>/<component>/<node>/<object>/config.
    Every payload has a unique_id (without one Home Assistant ignores `device`), the topic its
    state comes on, the device by its identifiers, and the availability topic (the last will)."""
    node, t = node_id(cfg), topics(cfg)
    common = {"availability_topic": t.status, "payload_available": "online", "payload_not_available": "offline",
              "qos": cfg.qos, "device": {"identifiers": [node], "name": f"facegate {node}", "manufacturer": "facegate",
                                         "model": "face-recognition door gate"}}
    entities = {
        ("sensor", "last_decision"): {"name": "Last decision", "state_topic": t.decision, "icon": "mdi:door",
                                      "value_template": "{{ value_json.reason }}", "json_attributes_topic": t.decision},
        ("binary_sensor", "camera"): {"name": "Camera", "state_topic": t.camera, "device_class": "connectivity",
                                      "payload_on": "ON", "payload_off": "OFF", "entity_category": "diagnostic"},
        ("sensor", "door_pulses"): {"name": "Door pulses", "state_topic": t.door_pulses, "icon": "mdi:door-open",
                                    "state_class": "total_increasing"},
        ("sensor", "gate"): {"name": "Gate", "state_topic": t.gate, "icon": "mdi:shield-lock"},
    }
    return [Message(f"{cfg.discovery_prefix}/{component}/{node}/{object_id}/config",
                    _json({**fields, **common, "unique_id": f"{node}_{object_id}"}), retain=True)
            for (component, object_id), fields in entities.items()]


def row_messages(row: dict, t: Topics, publish_identity: bool) -> list[Message]:
    """What one audit row (as AuditLog hands it to its listeners) publishes: decisions, camera
    online/offline and service started/stopped; every other row nothing."""
    kind, reason = row["kind"], row["reason"]
    if kind == "decision":
        body = {"audit_id": row["id"], "t_wall": round(row["t_wall"], 3), "clock_synced": bool(row["wall_clock_synced"]),
                "grant": bool(row["grant"]), "reason": reason, "track_id": row["track_id"]}
        if publish_identity and row["identity"]:
            body["identity"] = row["identity"]
        return [Message(t.decision, _json(body), retain=True)]
    if kind == "camera" and (reason == "online" or reason.startswith(("offline", "end"))):
        return [Message(t.camera, b"ON" if reason == "online" else b"OFF", retain=True)]
    if kind == "service" and reason in ("started", "stopped"):
        return [Message(t.gate, reason.encode(), retain=True)]
    return []


def connection_secrets(cfg: MqttConfig) -> tuple[bytes | None, ssl.SSLContext | None]:
    """The password and TLS context the connection uses, or ConfigError naming the file: a secret
    must be owner-only (edge.secretfile), a certificate must load."""
    password = None
    if cfg.username is not None:
        path = credential_path(cfg.password_file, "mqtt.password", "mqtt password", "mqtt.password_file", ConfigError)
        password = read_secret(path, "mqtt password", MAX_PASSWORD_BYTES, ConfigError).rstrip(b"\r\n")
        if not password:
            raise ConfigError(path, "mqtt password file is empty")
    if not cfg.tls:
        return password, None
    try:
        ctx = ssl.create_default_context(cafile=cfg.ca_file)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(cfg.ca_file, f"mqtt.ca_file: not a readable PEM CA certificate: {e}") from None
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.check_hostname = not cfg.tls_insecure
    if cfg.cert_file:
        key = credential_path(cfg.key_file, "mqtt.key", "mqtt TLS key", "mqtt.key_file", ConfigError)
        read_secret(key, "mqtt TLS key", MAX_KEY_BYTES, ConfigError)  # owner-only, before ssl reads it
        try:
            ctx.load_cert_chain(cfg.cert_file, key)
        except (OSError, ssl.SSLError) as e:
            raise ConfigError(cfg.cert_file, f"mqtt.cert_file with the key {key}: not a PEM certificate and its "
                                             f"unencrypted key: {e}") from None
    return password, ctx


def check_files(cfg: MqttConfig) -> None:
    """check-config: the secrets and certificates the gate would read, read as it reads them; a
    secret left to systemd's credentials is read where the installer's drop-in takes it from."""
    if not cfg.enabled:
        return
    sources = {"password_file": CREDENTIALS["mqtt.password"], "key_file": CREDENTIALS["mqtt.key"]}
    connection_secrets(cfg.model_copy(update={k: v for k, v in sources.items() if getattr(cfg, k) is None}))


def credentials_needed(cfg: MqttConfig) -> list[str]:
    """The LoadCredential= names the service needs: the secrets the config leaves unset."""
    names = []
    if cfg.username is not None and cfg.password_file is None:
        names.append("mqtt.password")
    if cfg.tls and cfg.cert_file and cfg.key_file is None:
        names.append("mqtt.key")
    return names


def broker_addresses(host: str, port: int) -> list[str]:
    """The broker's IP addresses for IPAddressAllow=: an address as given, a name as this machine
    resolves it now (at install time)."""
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise ConfigError(None, f"mqtt.host {host!r} does not resolve on this machine ({e.strerror}): the service "
                                f"may reach the broker's addresses only, so they must be known now") from None
    return sorted({info[4][0].split("%", 1)[0] for info in infos})


def systemd_dropin(cfg: MqttConfig, template: str) -> str | None:
    """The drop-in (systemd/facegate-mqtt.conf with the broker's addresses for BROKER, and the
    credentials the config leaves to systemd), or None with MQTT off."""
    if not cfg.enabled:
        return None
    if template.count("IPAddressAllow=BROKER\n") != 1:
        raise ConfigError(None, "the drop-in template has no line IPAddressAllow=BROKER")
    text = template.replace("IPAddressAllow=BROKER\n", f"IPAddressAllow={' '.join(broker_addresses(cfg.host, cfg.port))}\n")
    return text + "".join(f"LoadCredential={name}:{CREDENTIALS[name]}\n" for name in credentials_needed(cfg))


def print_dropin(config: str, template: str) -> int:
    """deploy/install.sh: print the drop-in for the config at `config` (nothing with MQTT off),
    after the check-config checks of the files it names; a problem is one line on stderr, exit 2."""
    def run(_) -> int:
        cfg = load_config(config).mqtt
        check_files(cfg)
        print(systemd_dropin(cfg, Path(template).read_text()) or "", end="")
        return 0

    return run_cli(run, None)


class _Client(Client):
    """paho's client, keeping why the last connection attempt failed (its retry loop drops it)."""

    last_error: OSError | None = None

    def reconnect(self) -> MQTTErrorCode:
        try:
            return super().reconnect()
        except OSError as e:
            self.last_error = e
            raise


class MqttPublisher:
    """Publishes the audit's rows (`on_rows`, an AuditLog listener) and the door's pulse count
    (`pulses`, polled) to the broker; see the module doc. `audit`: where its own connection events
    and drops are recorded (from its thread, never from on_rows)."""

    def __init__(self, cfg: MqttConfig, audit=None, pulses: Callable[[], int] | None = None):
        self.cfg, self.audit, self._pulses = cfg, audit, pulses
        self.node, self.topics = node_id(cfg), topics(cfg)
        self.broker = f"{cfg.host}:{cfg.port}"
        password, tls = connection_secrets(cfg)
        c = _Client(CallbackAPIVersion.VERSION2, client_id=self.node, protocol=MQTTv311)
        c.will_set(self.topics.status, "offline", qos=cfg.qos, retain=True)
        if cfg.username is not None:
            c.username_pw_set(cfg.username, password)
        if tls is not None:
            c.tls_set_context(tls)
        c.reconnect_delay_set(cfg.reconnect_backoff_s, cfg.reconnect_backoff_max_s)
        c.max_queued_messages_set(PAHO_QUEUE)
        c.connect_timeout = CONNECT_TIMEOUT_S
        c.on_connect, c.on_disconnect, c.on_connect_fail = self._on_connect, self._on_disconnect, self._on_connect_fail
        self.client = c
        self._cond = threading.Condition()
        self._queue: deque[Message] = deque()
        self._state: dict[str, Message] = {}  # camera, gate, pulses: sent again on each connect
        self._connected = False
        self._generation = 0  # connections made; each is greeted once
        self._troubled = False  # an outage's trouble is audited once
        self._notes: list[tuple[str, dict]] = []  # connection events the publisher thread audits
        self._closing = False
        self._close_by = 0.0
        self.dropped = 0
        self._dropped_unaudited = 0
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)

    # ------------------------------------------------------------------ the gate's side
    def start(self) -> None:
        self.client.connect_async(self.cfg.host, self.cfg.port, self.cfg.keepalive_s)
        self.client.loop_start()
        self._thread.start()

    def on_rows(self, rows: list[dict]) -> None:
        """AuditLog listener: queue what the rows publish; never blocks, never raises into the log."""
        for row in rows:
            for m in row_messages(row, self.topics, self.cfg.publish_identity):
                self._put(m)

    def _put(self, m: Message) -> None:
        with self._cond:
            if m.retain and m.topic != self.topics.decision:
                self._state[m.topic] = m
            if len(self._queue) >= self.cfg.queue_size:
                self._queue.popleft()
                self.dropped += 1
                self._dropped_unaudited += 1
                if self._dropped_unaudited == 1:
                    log.warning("mqtt: queue full (%d messages, broker %s): dropping the oldest", self.cfg.queue_size,
                                self.broker)
            self._queue.append(m)
            self._cond.notify()

    def queued(self) -> int:
        with self._cond:
            return len(self._queue)

    def close(self, drain_s: float = CLOSE_DRAIN_S) -> None:
        """Publish what is queued while connected (at most `drain_s`), then 'offline', and disconnect."""
        with self._cond:
            self._closing = True
            self._close_by = time.monotonic() + drain_s
            self._cond.notify()
        if self._thread.is_alive():
            self._thread.join(drain_s + 1.0)
        self.client.disconnect()
        self.client.loop_stop()

    # ------------------------------------------------------------------ paho's network thread
    def _note(self, reason: str, details: dict, level: int = logging.WARNING) -> None:
        log.log(level, "mqtt %s %s: %s", reason, self.broker, details)
        with self._cond:
            self._notes.append((reason, {"broker": self.broker, **details}))
            self._cond.notify()

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        if reason_code.is_failure:  # bad credentials, a client id refused: paho tries again after its back-off
            if not self._troubled:
                self._troubled = True
                self._note("refused", {"reason": str(reason_code)}, logging.ERROR)
            return
        self._troubled = False
        self._note("connected", {}, logging.INFO)
        with self._cond:
            self._connected = True
            self._generation += 1
            self._cond.notify()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        with self._cond:
            was, self._connected = self._connected, False
            closing = self._closing
        # not connected before: a broker that took the connection and never answered (keep-alive timeout)
        if closing or (self._troubled and not was):
            return
        self._troubled = True
        self._note("disconnected" if was else "unreachable", {"reason": str(reason_code)})

    def _on_connect_fail(self, client, userdata) -> None:
        if not self._troubled:
            self._troubled = True
            self._note("unreachable", {"error": str(self.client.last_error)})

    # ------------------------------------------------------------------ the publisher's thread
    def _has_work(self, greeted: int) -> bool:
        return bool(self._closing or self._notes or (self._connected and (self._queue or self._generation != greeted)))

    def _run(self) -> None:
        greeted, pulses, retry = 0, None, False
        while True:
            with self._cond:
                if retry:
                    self._cond.wait(RETRY_S)
                else:
                    self._cond.wait_for(lambda: self._has_work(greeted), timeout=PULSE_POLL_S)
                notes, self._notes = self._notes, []
                connected, generation, closing = self._connected, self._generation, self._closing
                head = self._queue[0] if self._queue else None
                done = closing and (not connected or head is None or time.monotonic() > self._close_by)
            for reason, details in notes:
                self._audit(reason, details)
            if done:
                break
            retry = False
            if not connected:
                continue
            if generation != greeted:
                retry = not self._send(self._greeting())
                if not retry:
                    greeted = generation
                    self._audit_drops()
                continue
            count = self._pulse_count()
            if count is not None and count != pulses:
                m = Message(self.topics.door_pulses, str(count).encode(), retain=True)
                with self._cond:
                    self._state[m.topic] = m
                retry = not self._send([m])
                pulses = pulses if retry else count
            if head is not None and not retry:
                retry = not self._send([head])
                if not retry:
                    with self._cond:
                        if self._queue and self._queue[0] is head:  # not dropped meanwhile
                            self._queue.popleft()
        self._audit_drops()
        if connected:
            self._send([Message(self.topics.status, b"offline", retain=True)])

    def _pulse_count(self) -> int | None:
        if self._pulses is None:
            return None
        try:
            return int(self._pulses())
        except Exception:  # noqa: BLE001 - the door's counter failing must not stop the publishing
            log.exception("mqtt: the door pulse count cannot be read; it is no longer published")
            self._pulses = None
            return None

    def _greeting(self) -> list[Message]:
        with self._cond:
            state = list(self._state.values())
        found = discovery_messages(self.cfg) if self.cfg.discovery else []
        return found + [Message(self.topics.status, b"online", retain=True)] + state

    def _send(self, messages: list[Message]) -> bool:
        """Hand the messages to paho; False when it took not all of them (they are to be sent again)."""
        for m in messages:
            try:
                rc = self.client.publish(m.topic, m.payload, self.cfg.qos, m.retain).rc
            except Exception:  # noqa: BLE001 - whatever paho raises, this thread goes on and the message waits
                log.exception("mqtt: publishing to %s failed", m.topic)
                return False
            # a message with QoS 1 or 2 that paho took while the connection went is sent on the next one
            if rc != MQTTErrorCode.MQTT_ERR_SUCCESS and not (rc == MQTTErrorCode.MQTT_ERR_NO_CONN and self.cfg.qos):
                return False
        return True

    def _audit_drops(self) -> None:
        with self._cond:
            n, self._dropped_unaudited = self._dropped_unaudited, 0
        if n:
            log.warning("mqtt: %d message(s) dropped while the broker %s was away", n, self.broker)
            self._audit("dropped", {"broker": self.broker, "messages": n, "total": self.dropped,
                                    "queue_size": self.cfg.queue_size})

    def _audit(self, reason: str, details: dict) -> None:
        if self.audit is None:
            return
        try:
            self.audit.record_event("mqtt", reason, details=details)
        except (FacegateError, ValueError, TypeError) as e:  # the gate's own rows say what the log can take
            log.error("mqtt %s not audited: %s", reason, e)


def start_publisher(cfg: MqttConfig, audit, pulses: Callable[[], int] | None = None) -> MqttPublisher:
    """The running publisher, listening to `audit`. A secret or certificate the gate cannot use is
    refused before anything connects, audited ('mqtt refused'), ConfigError."""
    try:
        publisher = MqttPublisher(cfg, audit, pulses)
    except ConfigError as e:
        audit.record_event("mqtt", "refused", details={"error": str(e)})
        raise
    audit.listeners.append(publisher.on_rows)
    publisher.start()
    return publisher
