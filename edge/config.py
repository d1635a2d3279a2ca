"""One validated config for the gate (YAML). Unknown keys are rejected, every field is bounded.

`python -m edge check-config FILE` validates a file and prints the effective config."""
from __future__ import annotations

import re
from collections.abc import Hashable
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .errors import ConfigError, FacegateError

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"

# The most strangers per transaction any config may let in. A bound, not the operating point (the
# default target is 0.003): one stranger in twenty is already no door lock, so a typo or a hostile
# config (target_fpir 0.999, a threshold of 0 or -1) is refused, here and again by the gate at
# each gallery load, where the gallery size K it applies to is known.
MAX_TARGET_FPIR = 0.05

# The most of any stretch of time that grants arriving back to back may keep the door unlocked:
# max_hold_s / (max_hold_s + relay.min_locked_s). Above it a door "held" by a stream of grants is
# an open door; the defaults (5 s, 1 s) give 83%.
MAX_UNLOCKED_SHARE = 0.85


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class CameraConfig(_Section):
    source: Literal["replay", "opencv", "picamera2", "gstreamer"] = Field("replay", description="frame source")
    path: str = Field("demo", description="replay: folder of images, video file, or 'demo'; opencv: device index or GStreamer pipeline (needs an OpenCV built with GStreamer)")
    pipeline: str | None = Field(None, description="gstreamer: a GStreamer pipeline with an `appsink name=sink` (asked for BGR, newest frame only); None = the Jetson CSI camera: nvarguscamerasrc sensor-id=0 at width x height and fps")
    fps: float = Field(15.0, gt=0, le=120, description="replay rate, and the rate asked of real cameras")
    width: int = Field(640, ge=64, le=4096)
    height: int = Field(480, ge=64, le=4096)
    read_timeout_s: float = Field(2.0, gt=0, le=60, description="a read slower than this counts as a camera fault")
    offline_after_s: float = Field(5.0, gt=0, le=60, description="report the camera offline after this long without a good frame")
    loop: bool = Field(False, description="replay: start again at the end")
    reconnect_backoff_s: float = Field(1.0, gt=0, le=60)
    reconnect_backoff_max_s: float = Field(30.0, gt=0, le=600)

    @model_validator(mode="after")
    def _pipeline(self):
        if self.pipeline is None:
            return self
        if self.source != "gstreamer":
            raise ValueError(f"camera.pipeline is read only with camera.source gstreamer, not {self.source}")
        # the string only, so that checking a config needs no GStreamer; the camera parses the rest
        elements = [e.split() for e in self.pipeline.split("!")]
        if not any(e and e[0] == "appsink" and {"name=sink", 'name="sink"', "name='sink'"} & set(e) for e in elements):
            raise ValueError("camera.pipeline has no `appsink name=sink`, the element the gate takes its frames from")
        return self


class ModelsConfig(_Section):
    detector: str = Field(str(MODELS / "yunet_fp32.card.json"),
                          description="detector model card (YuNet fp32: faster than its INT8 build on x86, see evaluation/README-speed.md)")
    encoder: str = Field(str(MODELS / "sface_dlib_int8.fusion.card.json"),
                         description="face encoder model card (default: SFace + dlib INT8 score fusion, dlib also mirrored)")
    enroll_encoder: str | None = Field(None, description="encoder for enrollment photos: the same network at full precision, so the gallery side carries no quantization noise; None = the door encoder's fp32 twin beside it (its name with _fp32 for _int8) when there is one, else the door encoder")
    liveness: str | None = Field(None, description="passive liveness (PAD) model card; None = the shipped one (edge/assets/pad/minifasnet.card.json)")
    threads: int = Field(1, ge=1, le=16, description="inference threads per model")
    providers: list[str] | None = Field(None, max_length=8, description="onnxruntime execution providers every ONNX model tries, in order, e.g. [TensorrtExecutionProvider, CUDAExecutionProvider, CPUExecutionProvider]; one this onnxruntime build lacks or that cannot open a model is dropped for the next, logged and audited (model provider_fallback); CPUExecutionProvider comes last whether named or not; None = each model card's providers, else the CPU only")

    @field_validator("providers")
    @classmethod
    def _providers(cls, names):
        from .modelcard import check_providers  # onnxruntime, only when providers are named

        return check_providers(names)


class QualityConfig(_Section):
    """The gate's check of each frame's face. A turned face is let through up to a near profile
    (nose tip at the eye): it fails safe, its lower scores deny it as unknown, and on CelebA faces
    turned 0.45-0.82 were still matched at rank-1 94.7% (97.5% for the rest). The enrollment
    photo, which sets every later comparison, gets the stricter `enroll_quality`."""

    min_face_px: float = Field(60.0, ge=16, le=2000, description="shorter side of the face box, in frame pixels")
    min_detail: float = Field(0.008, ge=0, le=1, description="fine detail: variance of the Laplacian over the variance of the grey levels of the aligned face (below: blurry); a darker face or a dimmer light leaves it unchanged")
    max_yaw: float = Field(1.0, ge=0, le=1, description="nose offset from the eye midline, as a share of eye distance")
    max_roll_deg: float = Field(25.0, ge=0, le=90)
    min_highlight: float = Field(65.0, ge=0, le=255, description="the picture's highlights: 99th percentile of the face and its surroundings (the face box doubled), each pixel read in its brightest channel; below: underexposed. Eye whites, teeth, shine and background set it, not skin tone")
    min_contrast_stops: float = Field(2.0, ge=0, le=12, description="the face's dynamic range in stops of light: its 99.5th over its 0.5th percentile grey in linear light (eye whites and teeth against pupils and nostrils, which every face has); below: washed out or fogged. A dimmer light leaves it unchanged")
    min_backlight: float = Field(0.3, ge=0, le=1, description="the brightest pixel of the face's interior (brows to below the mouth) over its surroundings' highlights (99th percentile), each pixel read in its brightest channel; below: back-lit, exposed for a bright background")
    max_clipped: float = Field(0.3, ge=0, le=1, description="share of the aligned face at grey 250 or above (detail lost to white)")
    max_crushed: float = Field(0.5, ge=0, le=1, description="share of the aligned face at grey 5 or below (detail lost to black)")
    patience_frames: int = Field(8, ge=0, le=1000, description="a track whose last N faces were all refused on quality has its next ones matched anyway, the reason audited (someone who cannot face the camera squarely, or a soft-focus camera, is not locked out; a poor face fails safe: its lower scores deny it as unknown); 0 = never")

    @model_validator(mode="before")
    @classmethod
    def _removed(cls, data):
        gone = {"min_brightness": "exposure is judged by min_highlight and min_contrast_stops on the picture, not by the face's mean grey (which measures skin tone)",
                "max_brightness": "exposure is judged by min_highlight and min_contrast_stops on the picture, not by the face's mean grey (which measures skin tone)",
                "min_contrast": "the face's range is judged in stops of light (min_contrast_stops, about 2): a ratio, which a dimmer light leaves unchanged, where a difference of grey levels shrank with the light and refused darker faces sooner",
                "min_sharpness": "blur is judged by min_detail (the Laplacian's share of the face's contrast, about 0.008), which a darker face leaves unchanged"}
        for key in gone.keys() & set(data if isinstance(data, dict) else ()):
            raise ValueError(f"{key} was removed: {gone[key]}")
        return data


class MatchConfig(_Section):
    target_fpir: float = Field(0.003, gt=0, le=MAX_TARGET_FPIR, description="false positive identification rate per transaction")
    calibration: Literal["gallery", "card"] = Field("gallery", description="where the threshold for target_fpir comes from: 'gallery' fits the stranger-score tail to the enrolled faces scored against each other at each load, with the encoder card's impostor table as a prior for a small gallery; 'card' reads the card's table alone, taking a gallery's comparisons as independent")
    threshold: float | None = Field(None, ge=-1, le=1, description="fixed cosine threshold, inside the calibrated range of the encoder card's calibration.threshold table (the cohort's with match.cohort); the gate refuses a gallery where it gives an expected FPIR above MAX_TARGET_FPIR; None = from target_fpir and gallery size")
    min_margin: float = Field(0.0, ge=0, le=2, description="best score must beat the runner-up by this much")
    flip: bool = Field(False, description="average the embedding of the face and its mirror image")
    enroll_flip: bool = Field(True, description="enrollment photos: average the embedding of the face and its mirror image (costs nothing at the door)")
    track_frames: int = Field(1, ge=1, le=10, description="match the mean embedding of the track's last N judged frames (multi-frame fusion; 1 = each frame alone)")
    cohort: str | None = Field(None, description="cohort embeddings (.npz) for score normalisation")


class DecisionConfig(_Section):
    k: int = Field(2, ge=1, le=30, description="frames that must agree on one identity")
    n: int = Field(3, ge=1, le=30, description="within the last n frames of the track")
    cooldown_s: float = Field(5.0, ge=0, le=600, description="after a grant, the same person is not granted again")
    backoff_after: int = Field(5, ge=1, le=100, description="consecutive denials before back-off")
    backoff_s: float = Field(30.0, ge=30, le=3600, description="first back-off; doubles each time")
    backoff_max_s: float = Field(600.0, ge=30, le=86400)
    track_iou: float = Field(0.3, ge=0, le=1, description="a face continues a track if its box overlaps this much")
    track_timeout_s: float = Field(1.5, gt=0, le=60)
    crowd_policy: Literal["deny", "largest"] = Field("largest", description="several faces: deny all, or judge the largest centred one")
    max_faces: int = Field(1, ge=1, le=50, description="with crowd_policy=deny: more faces than this deny")


class LivenessConfig(_Section):
    # On by default: a face gate that a printed photo opens is no door. "passive" was chosen on
    # the NUAA train split (passive+blink rejected 12 of 16 live train sequences: the cues need
    # a blink or a head turn that a short walk-up often lacks). "off" must be written explicitly,
    # for doors where a second factor (badge + face) does this job.
    mode: Literal["off", "passive", "passive+blink"] = Field("passive", description="off | passive (PAD model) | passive+blink (also a blink or head motion on the track)")
    threshold: float | None = Field(None, ge=0, le=1, description="None = the model card's")
    frames: int = Field(3, ge=1, le=60, description="passive score averaged over this many frames of the track")


class RelayConfig(_Section):
    backend: Literal["gpiozero", "gpiod"] = Field("gpiozero", description="what drives the relay line: gpiozero = Raspberry Pi pins by name (relay.pin, relay.pin_factory); gpiod = a line of any Linux GPIO chip through libgpiod (relay.chip, relay.line): Jetson, Raspberry Pi 5, others")
    pin: str = Field("GPIO17", description="gpiozero: pin name")
    chip: str | None = Field(None, description="gpiod: GPIO chip device, e.g. /dev/gpiochip0 (gpiodetect lists them); None = the one chip with a line named relay.line")
    line: Annotated[int, Field(ge=0)] | Annotated[str, Field(min_length=1, max_length=64)] | None = Field(None, description="gpiod: the line's offset on relay.chip (a number) or its name as gpioinfo lists it (text)")
    active_high: bool = Field(True, description="false: the relay board switches on a low line (locked = line high)")
    pulse_s: float = Field(3.0, gt=0, le=30)
    max_hold_s: float = Field(5.0, gt=0, le=60, description="hard ceiling on one unlock, overlapping grants included")
    min_locked_s: float = Field(1.0, ge=0.5, le=60, description="after each opening the door stays locked at least this long, grants in that time open nothing: back-to-back grants (decision.cooldown_s 0, or people granted in turn) cannot hold it open, and the strike re-engages between openings; with max_hold_s it bounds the unlocked share of any stretch of time (MAX_UNLOCKED_SHARE)")
    pin_factory: Literal["default", "lgpio", "rpigpio", "native", "mock"] = Field("default", description="gpiozero: pin factory; default = gpiozero's own choice ($GPIOZERO_PIN_FACTORY, else the first of lgpio, rpigpio, pigpio, native that loads); mock = simulated pins, for camera.source replay only (demo, tests)")

    def missing(self) -> str | None:
        """What the chosen backend needs and this section lacks, naming the field; None = nothing."""
        if self.backend == "gpiod" and self.line is None:
            return "relay.line: relay.backend gpiod needs the line's offset (with relay.chip) or its name"
        if self.backend == "gpiod" and isinstance(self.line, int) and self.chip is None:
            return f"relay.chip: relay.line {self.line} is an offset, which means nothing without the chip it is on"
        return None


# OSDP's reader LED colours (osdp_LED on_color / off_color codes 1-7; 0 is dark).
OSDP_COLORS = ("red", "green", "amber", "blue", "magenta", "cyan", "white")


class OsdpConfig(_Section):
    port: str | None = Field(None, description="the RS-485 adapter's serial port: /dev/serial/by-id/usb-... for a USB adapter (a name that survives re-plugging), /dev/ttyAMA0 or /dev/serial0 for a HAT on a Raspberry Pi's UART, /dev/ttyTHS1 on a Jetson; needed when door.output is osdp or both")
    baud: Literal[9600, 19200, 38400, 57600, 115200, 230400] = Field(9600, description="the line's speed, as the panel is set (OSDP's default 9600)")
    address: int = Field(0, ge=0, le=126, description="this reader's OSDP address on the line, as the panel is set (0-126; 127 is broadcast)")
    secure: bool = Field(True, description="OSDP Secure Channel with the key in scbk_file (the panel must have the same key), plain text refused; false: plain text, the card numbers readable on the wire (for a panel that has no Secure Channel only)")
    scbk_file: str | None = Field(None, description="the Secure Channel base key: 32 hex digits, a file only its owner can read; None = $CREDENTIALS_DIRECTORY/osdp.scbk (the installer's drop-in hands /etc/facegate/osdp.scbk to the service with LoadCredential=)")
    install_mode: bool = Field(False, description="accept a panel in install mode: Secure Channel with the well-known default key SCBK-D, and the key the panel then sets (osdp_KEYSET) written to scbk_file; on for the pairing only")
    timeout_s: float = Field(1.0, gt=0, le=5, description="a card read the panel has not taken this long after the face was seen is withdrawn: a panel that comes back from an outage gets no stale card read")
    card_bits: int = Field(26, ge=1, le=256, description="length in bits of the card data sent, as the panel's card format expects it (parity bits included where the panel wants them: the enrolled number is sent as it is)")
    card_number: Literal["decimal", "hex"] = Field("decimal", description="how an enrolled card number (as a USB HID reader types it) reads as the number sent")
    card_format: Literal["wiegand", "raw"] = Field("wiegand", description="the card read's format code: wiegand (raw Wiegand bits) or raw (unspecified)")
    leds: dict[Literal[OSDP_COLORS], str] = Field(default_factory=dict, description="the reader LED the panel commands, one gpiozero pin per colour, e.g. {green: GPIO22, red: GPIO27} (through relay.pin_factory); empty = the commanded state is recorded and audited only")
    buzzer: str | None = Field(None, description="gpiozero pin of a buzzer the panel's osdp_BUZ commands drive; None = recorded and audited only")

    @model_validator(mode="after")
    def _keys(self):
        if self.install_mode and not self.secure:
            raise ValueError("door.osdp.install_mode pairs a Secure Channel key: it needs door.osdp.secure true")
        if self.install_mode and self.scbk_file is None:
            raise ValueError("door.osdp.install_mode: the key the panel sets is written to door.osdp.scbk_file, "
                             "which must then be a path (systemd's credentials are read-only)")
        return self


class DoorConfig(_Section):
    output: Literal["relay", "osdp", "both"] = Field("relay", description="what a grant does: relay = pulse the local relay (relay.*); osdp = send the person's card number to an access-control panel as a card read over OSDP (door.osdp), the panel opens the door and the gate drives no relay; both = the relay, then the card read")
    osdp: OsdpConfig = OsdpConfig()

    @model_validator(mode="after")
    def _port(self):
        if self.output != "relay" and not self.osdp.port:
            raise ValueError(f"door.osdp.port: door.output {self.output} needs the RS-485 adapter's serial port "
                             f"(/dev/serial/by-id/...)")
        return self

    @property
    def drives_relay(self) -> bool:
        return self.output in ("relay", "both")

    @property
    def sends_osdp(self) -> bool:
        return self.output in ("osdp", "both")


class StorageConfig(_Section):
    gallery: str = Field("var/gallery.fgg", description="encrypted gallery file")
    key_file: str | None = Field(None, description="32-byte gallery key; None = $CREDENTIALS_DIRECTORY/gallery.key")
    audit: str = Field("var/audit.sqlite3", description="audit database (SQLite, WAL)")
    sequence_file: str | None = Field(None, description="the highest bundle sequence applied, kept apart from the gallery so that a lost or copied-back gallery cannot let an old bundle apply again; None = bundle.seq beside key_file, or /etc/facegate/bundle.seq when the key comes from systemd's credentials")
    retention_days: int = Field(1095, ge=1, le=36500, description="enrolments expire after this (BIPA: 3 years)")


# A gate's or site's name in a signed bundle's audience (edge.bundle) and in enrollment.audience:
# plain letters, digits, '.', '_' and '-', so the name a log shows is the name that was signed.
AUDIENCE_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"


class EnrollmentConfig(_Section):
    audience: list[str] = Field(default_factory=list, max_length=16, description="the names this gate answers to in a signed bundle's audience, e.g. its own and its site's ([hq-door-3, hq]); a bundle for any other audience is refused; empty = every bundle of version 2 is refused")
    accept_v1_bundles: bool = Field(False, description="also apply version 1 bundles, made before bundles named an audience and expired: such a stick applies at any gate, at any time, until a higher sequence passes it; for a transition only")

    @model_validator(mode="after")
    def _names(self):
        bad = [a for a in self.audience if not re.fullmatch(AUDIENCE_NAME, a)]
        if bad:
            raise ValueError(f"enrollment.audience {bad[0]!r}: a name of letters, digits, '.', '_' and '-' (max 64, "
                             f"starting with a letter or digit)")
        return self


class BadgeConfig(_Section):
    """A USB HID card reader beside the camera (edge.badge). A card never opens the door by itself:
    it names the one person whose face the gate then verifies 1:1 (K = 1, at the 1:1 threshold)."""

    mode: Literal["face_only", "badge_and_face", "face_with_badge_fallback"] = Field("face_only", description="face_only: no reader; badge_and_face: every grant needs a card and, within window_s, the face of the card's person (1:1); face_with_badge_fallback: a face alone opens as in face_only (1:N), and a card makes the gate verify its person's face 1:1 for window_s, for whom the face alone is not recognised")
    device: str | None = Field(None, description="the reader's input event device, by its stable name: /dev/input/by-id/usb-...-event-kbd; needed by every mode but face_only")
    window_s: float = Field(5.0, gt=0, le=30, description="after a card, how long the gate looks for its person's face")

    @model_validator(mode="after")
    def _device(self):
        if self.mode != "face_only" and not self.device:
            raise ValueError(f"badge.device: badge.mode {self.mode} needs the reader's input device "
                             f"(/dev/input/by-id/usb-...-event-kbd)")
        if self.device is not None and not self.device.startswith("/"):
            raise ValueError(f"badge.device {self.device!r}: an absolute path expected (/dev/input/by-id/...)")
        return self


# An MQTT topic level and a Home Assistant node or object id: letters, digits, '_' and '-' (no
# wildcards, no empty level).
MQTT_NAME = r"^[A-Za-z0-9_-]{1,64}$"
MQTT_TOPIC = r"^[A-Za-z0-9_-]{1,64}(/[A-Za-z0-9_-]{1,64}){0,7}$"


class MqttConfig(_Section):
    """Events to an MQTT broker with Home Assistant discovery (edge.mqtt): each audited decision,
    camera health and gate status, published after its audit row is written; the door never waits
    on the broker. Off by default: the gate then opens no network connection at all."""

    enabled: bool = Field(False, description="publish to the broker at mqtt.host; the installer's drop-in then lets the service reach that address alone (README-deploy.md)")
    host: str | None = Field(None, pattern=r"^[A-Za-z0-9._:-]{1,253}$", description="the broker's address or host name (a name the gate looks up itself: put it in /etc/hosts, the service reaches no DNS server); needed when enabled")
    port: int = Field(1883, ge=1, le=65535, description="1883 plain, 8883 usual with TLS")
    client_id: str | None = Field(None, pattern=MQTT_NAME, description="MQTT client id, also the Home Assistant node id and device identifier; None = facegate-<host name>")
    topic_prefix: str | None = Field(None, pattern=MQTT_TOPIC, description="the gate's topics: <prefix>/decision, /camera, /door_pulses, /gate, /status; None = facegate/<client id>")
    discovery: bool = Field(True, description="publish Home Assistant discovery configs (retained) so the gate appears as one device")
    discovery_prefix: str = Field("homeassistant", pattern=MQTT_TOPIC, description="Home Assistant's discovery prefix")
    username: str | None = Field(None, min_length=1, max_length=256)
    password_file: str | None = Field(None, description="the broker password, a file only its owner can read (like the gallery key); read only with a username; None = $CREDENTIALS_DIRECTORY/mqtt.password (the installer's drop-in hands /etc/facegate/mqtt.password over with LoadCredential=)")
    tls: bool = Field(False, description="TLS to the broker, its certificate checked against ca_file (or the system's CAs) and its name against mqtt.host")
    ca_file: str | None = Field(None, description="PEM CA certificate(s) the broker's certificate must chain to; None = the system's")
    cert_file: str | None = Field(None, description="PEM client certificate, for a broker that asks for one")
    key_file: str | None = Field(None, description="the client certificate's private key, a file only its owner can read; None with cert_file = $CREDENTIALS_DIRECTORY/mqtt.key (the installer's drop-in hands /etc/facegate/mqtt.key over)")
    tls_insecure: bool = Field(False, description="do not match the broker's certificate to mqtt.host (the chain is still checked); for a broker reached by an address its certificate does not name")
    qos: int = Field(1, ge=0, le=2, description="MQTT QoS of every message: 1 = at least once (each message re-sent until the broker has it)")
    publish_identity: bool = Field(False, description="put the granted person's name in decision messages; off: the broker never learns who came in (the audit log has it)")
    queue_size: int = Field(1000, ge=1, le=100000, description="messages held while the broker is away; beyond it the oldest are dropped, counted, logged and audited ('mqtt dropped')")
    keepalive_s: int = Field(30, ge=5, le=3600, description="MQTT keep-alive: a broker that hears nothing this long (x1.5) sends the gate's last will, 'offline'")
    reconnect_backoff_s: float = Field(1.0, gt=0, le=60, description="first wait before connecting again; doubles each failure")
    reconnect_backoff_max_s: float = Field(60.0, gt=0, le=3600)

    @model_validator(mode="after")
    def _consistent(self):
        if self.enabled and not self.host:
            raise ValueError("mqtt.host: mqtt.enabled needs the broker's address")
        if self.password_file is not None and self.username is None:
            raise ValueError("mqtt.password_file is sent only with a username: set mqtt.username")
        if self.key_file is not None and self.cert_file is None:
            raise ValueError("mqtt.key_file is the client certificate's key: set mqtt.cert_file too")
        tls_only = [k for k in ("ca_file", "cert_file", "key_file", "tls_insecure") if getattr(self, k)]
        if tls_only and not self.tls:
            raise ValueError(f"mqtt.{tls_only[0]} is read only with mqtt.tls true")
        for k in ("password_file", "ca_file", "cert_file", "key_file"):
            v = getattr(self, k)
            if v is not None and not v.startswith("/"):
                raise ValueError(f"mqtt.{k} {v!r}: an absolute path expected")
        if self.username is not None and not self.tls and self.host not in (None, "localhost", "127.0.0.1", "::1"):
            raise ValueError(f"mqtt.username: without mqtt.tls the password crosses the network in clear text to "
                             f"{self.host}: set mqtt.tls true (only a broker on this machine may go without)")
        return self


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load keeps the last of two equal keys, so a second `threshold:` lower in the file would
    silently override the one a reviewer read; refuse it instead, naming the key and its line."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                            f"duplicate key {key!r}", key_node.start_mark)
                seen.add(key)
        return super().construct_mapping(node, deep)


class Config(_Section):
    camera: CameraConfig = CameraConfig()
    models: ModelsConfig = ModelsConfig()
    quality: QualityConfig = QualityConfig()
    enroll_quality: QualityConfig = QualityConfig(max_yaw=0.45, patience_frames=0)
    match: MatchConfig = MatchConfig()
    decision: DecisionConfig = DecisionConfig()
    liveness: LivenessConfig = LivenessConfig()
    relay: RelayConfig = RelayConfig()
    door: DoorConfig = DoorConfig()
    storage: StorageConfig = StorageConfig()
    enrollment: EnrollmentConfig = EnrollmentConfig()
    mqtt: MqttConfig = MqttConfig()
    badge: BadgeConfig = BadgeConfig()


def load_config(path: str | Path | None) -> Config:
    if path is None:
        return Config()
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # a SafeLoader: plain types only, no object tags
    except FileNotFoundError:
        raise ConfigError(path, "config file not found") from None
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(path, f"not valid YAML: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(path, "top level must be a mapping of sections")
    try:
        cfg = Config.model_validate(raw)
    except ValidationError as e:
        msgs = "; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors()[:8])
        raise ConfigError(path, msgs) from None
    if cfg.decision.k > cfg.decision.n:
        raise ConfigError(path, "decision.k must not exceed decision.n")
    if cfg.relay.pulse_s > cfg.relay.max_hold_s:
        raise ConfigError(path, "relay.pulse_s must not exceed relay.max_hold_s")
    if cfg.relay.missing():
        raise ConfigError(path, cfg.relay.missing())
    if cfg.relay.backend == "gpiozero" and cfg.relay.pin_factory == "mock" and cfg.camera.source != "replay":
        raise ConfigError(path, f"relay.pin_factory mock drives simulated pins, not a door: with camera.source "
                                f"{cfg.camera.source} the gate would grant real faces and open nothing (mock is for "
                                f"camera.source replay)")
    for section, first, ceiling in (("camera", "reconnect_backoff_s", "reconnect_backoff_max_s"),
                                    ("decision", "backoff_s", "backoff_max_s"),
                                    ("mqtt", "reconnect_backoff_s", "reconnect_backoff_max_s")):
        lo, hi = getattr(getattr(cfg, section), first), getattr(getattr(cfg, section), ceiling)
        if lo > hi:
            raise ConfigError(path, f"{section}.{first} {lo} exceeds {section}.{ceiling} {hi}: the first back-off "
                                    f"must not be longer than its ceiling")
    share = cfg.relay.max_hold_s / (cfg.relay.max_hold_s + cfg.relay.min_locked_s)
    if share > MAX_UNLOCKED_SHARE:
        need = cfg.relay.max_hold_s * (1 - MAX_UNLOCKED_SHARE) / MAX_UNLOCKED_SHARE
        raise ConfigError(path, f"relay.min_locked_s {cfg.relay.min_locked_s} with relay.max_hold_s {cfg.relay.max_hold_s} "
                                f"leaves the door unlocked {share:.0%} of the time under back-to-back grants, above "
                                f"MAX_UNLOCKED_SHARE ({MAX_UNLOCKED_SHARE:.0%}): set min_locked_s to at least {need:.2f}")
    _check_fixed_threshold(cfg, path)
    return cfg


def _check_fixed_threshold(cfg: Config, path: Path) -> None:
    """A fixed match.threshold must lie inside the calibrated range of the scores it is compared
    with: below the impostor table no false match rate was measured (a threshold of 0 lets
    everyone in), above it nothing vouches for the rate either."""
    t = cfg.match.threshold
    if t is None:
        return
    field, source = ("match.cohort", cfg.match.cohort) if cfg.match.cohort else ("models.encoder", cfg.models.encoder)
    try:
        if cfg.match.cohort:  # AS-norm scores: the cohort file holds their table
            from .cohort import load_cohort

            table = load_cohort(source, flip=cfg.match.flip).threshold
        else:
            from .modelcard import load_card

            cal = load_card(source, verify_file=False)[0].calibration
            table = None if cal is None else cal.threshold
    except FacegateError as e:
        raise ConfigError(path, f"match.threshold is fixed, so its calibrated range is read from {field}: {e}") from None
    except (OSError, ValueError) as e:
        raise ConfigError(path, f"match.threshold is fixed, so its calibrated range is read from {field} {source}, "
                                f"which cannot be read: {e}") from None
    if not table:
        raise ConfigError(path, f"match.threshold is fixed but {field} {source} has no calibration.threshold table: "
                                f"no false match rate is known for any threshold")
    lo, hi = min(table), max(table)
    if not lo <= t <= hi:
        raise ConfigError(path, f"match.threshold {t} is outside the calibrated range {lo:.4f}..{hi:.4f} of {field} "
                                f"{source} (calibration.threshold): no false match rate was measured there")


def check_model_cards(cfg: Config, path: str | Path) -> None:
    """Load every model card the gate would load, with its file's size and sha256, so that
    check-config finds a missing or altered model before `edge run` does."""
    from .modelcard import load_card
    from .pad import pad_card_path

    named = [("models.detector", cfg.models.detector), ("models.encoder", cfg.models.encoder)]
    if cfg.models.enroll_encoder:
        named.append(("models.enroll_encoder", cfg.models.enroll_encoder))
    if cfg.liveness.mode != "off":
        try:
            named.append(("models.liveness", str(pad_card_path(cfg))))
        except ConfigError as e:
            raise ConfigError(path, e.problem) from None
    for field, source in named:
        try:
            load_card(source)
        except FacegateError as e:
            raise ConfigError(path, f"{field}: {e}") from None


def describe() -> str:
    """Every field with its bounds and description, for `check-config --describe`."""
    lines = []

    def section(default: _Section, indent: str) -> None:
        for fname, f in type(default).model_fields.items():
            value = getattr(default, fname)  # a section's default may differ from its class's (enroll_quality)
            if isinstance(value, _Section):  # a section inside a section (door.osdp): its own fields
                lines.append(f"{indent}{fname}:")
                section(value, indent + "  ")
                continue
            bounds = [str(m) for m in f.metadata]
            lines.append(f"{indent}{fname}: default {value!r}{' (' + ', '.join(bounds) + ')' if bounds else ''}"
                         f"{' - ' + f.description if f.description else ''}")

    for sname, sfield in Config.model_fields.items():
        lines.append(f"{sname}:")
        section(sfield.default, "  ")
    return "\n".join(lines)
