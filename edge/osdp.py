"""The gate as an OSDP reader (IEC 60839-11-5): a peripheral device (PD) of an access-control panel
(the control panel, CP) on an RS-485 line, through libosdp's Python bindings (`libosdp`, imported
as `osdp`).

With door.output osdp the gate drives no door: on a grant it sends the person's badge card number
(edge.gallery.Person.card) to the panel as a card read, exactly as a card reader would, and the
panel decides and opens. A person without a card number gets nothing sent ('no card number to
send'), audited. The panel's LED and buzzer commands are honoured (Indicators): always recorded and
audited, and shown on gpiozero outputs where door.osdp.leds / door.osdp.buzzer name pins.

What "card read sent" means: a PD speaks only when polled, so the card read waits in libosdp's
queue for the panel's next poll; libosdp reports it complete when it has gone out in the reply (a
reply the panel did not receive is sent again when the panel repeats its poll). The grant waits for
that, a poll interval at most (tens of milliseconds). A card read not sent door.osdp.timeout_s
after the face was seen is withdrawn from the queue and audited 'not_sent': a panel that comes back
from an outage, or a loop that stalled, must not get a card read for someone long gone. A panel off the line is seen as offline (libosdp: no poll for 8 s)
and a grant then sends nothing.

Secure Channel: door.osdp.secure (the default) sets the PD up with the base key (SCBK) read from
door.osdp.scbk_file, or systemd's credential osdp.scbk, and refuses plain text and the well-known
default key. door.osdp.install_mode accepts the default key and writes the key the panel then sets
(osdp_KEYSET) to scbk_file; off by default. The key file must be owner-only (edge.secretfile).
"""
from __future__ import annotations

import errno
import logging
import os
import termios
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

from osdp import (CardFormat, Capability, Channel, Command, CommandLEDColor, CompletionStatus, Event, LibFlag,
                  LogLevel, PDCapabilities, PDInfo, PeripheralDevice)

from .atomic import atomic_write_bytes
from .config import Config, OsdpConfig
from .errors import ConfigError
from .records import DoorOutcome, Grant
from .relay import make_pin_factory
from .secretfile import credential_path, read_secret

log = logging.getLogger(__name__)

SCBK_BYTES = 16
CREDENTIAL = "osdp.scbk"  # the name the installer's drop-in gives the key (LoadCredential=)
_REOPEN_S = 1.0  # a port that failed is tried again this often
# How often libosdp's state machine runs: a poll waits up to this long for its reply to be built
# (libosdp's own loop sleeps 20 ms, a fifth of a card read's budget). Each run is a non-blocking
# read of the port: 200 a second cost well under 1% of a core.
_REFRESH_S = 0.005
_EVENTS_KEPT = 64  # panel commands waiting to be audited; past this they are counted, not kept

_BAUD = {9600: termios.B9600, 19200: termios.B19200, 38400: termios.B38400, 57600: termios.B57600,
         115200: termios.B115200, 230400: termios.B230400}
COLORS = {CommandLEDColor.Black: "black", CommandLEDColor.Red: "red", CommandLEDColor.Green: "green",
          CommandLEDColor.Amber: "amber", CommandLEDColor.Blue: "blue", CommandLEDColor.Magenta: "magenta",
          CommandLEDColor.Cyan: "cyan", CommandLEDColor.White: "white"}
_FORMATS = {"wiegand": CardFormat.Wiegand, "raw": CardFormat.Unspecified}


# ------------------------------------------------------------------ card data and key
def card_data(card: str, number: str, bits: int) -> bytes:
    """The card read's data for enrolled card number `card` read as a `number` ('decimal' or 'hex')
    number: `bits` bits, most significant first, left-aligned in whole bytes with the unused low
    bits of the last byte zero (as OSDP packs raw card bits). ValueError when it is not such a
    number or does not fit."""
    try:
        value = int(card, 10 if number == "decimal" else 16)
    except ValueError:
        raise ValueError(f"the card number is not a {number} number (door.osdp.card_number)") from None
    if value.bit_length() > bits:
        raise ValueError(f"the card number needs {value.bit_length()} bits, more than door.osdp.card_bits {bits}")
    size = (bits + 7) // 8
    return (value << (8 * size - bits)).to_bytes(size, "big")


def read_scbk(path: str | Path | None, missing_ok: bool = False) -> bytes | None:
    """The 16-byte Secure Channel base key: 32 hex digits in `path`, or in systemd's credential
    osdp.scbk when `path` is None; owner-only, as every secret the gate reads (edge.secretfile): a
    key others on the gate can read lets them pose as the reader on the line. None when the file
    does not exist and `missing_ok` (install mode: the panel sets it). ConfigError otherwise."""
    what = "the OSDP Secure Channel key (door.osdp.scbk_file)"
    path = credential_path(path, CREDENTIAL, what, "door.osdp.scbk_file", ConfigError)
    if missing_ok and not os.path.lexists(path):
        return None
    raw = read_secret(path, what, 256, ConfigError)
    try:
        key = bytes.fromhex(raw.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        key = b""
    if len(key) != SCBK_BYTES:
        raise ConfigError(path, f"{what} must be {2 * SCBK_BYTES} hex digits")
    return key


# ------------------------------------------------------------------ the serial line
class SerialChannel(Channel):
    """libosdp's channel over a serial port: raw 8N1 at the configured speed, no flow control,
    never blocking. A port that fails (a USB adapter pulled out) reads as silence, is reported
    once in `faults` and is opened again each second: the panel sees the reader go offline and
    come back."""

    def __init__(self, port: str, baud: int):
        super().__init__()
        self.port, self.baud = port, baud
        self.faults: deque[str] = deque(maxlen=8)
        self._fd: int | None = self._open()
        self._retry_at = 0.0

    def _open(self) -> int:
        try:
            fd = os.open(self.port, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            hint = " (the service user needs the dialout group: the installer's OSDP drop-in)" \
                if e.errno == errno.EACCES else ""
            raise ConfigError(None, f"door.osdp.port {self.port}: cannot be opened: {e.strerror}{hint}") from None
        try:
            if not os.isatty(fd):
                raise ConfigError(None, f"door.osdp.port {self.port}: not a serial port")
            attrs = termios.tcgetattr(fd)
            attrs[0] = termios.IGNBRK  # no CR/LF mapping, no XON/XOFF: every byte as it came
            attrs[1] = 0  # no output processing
            attrs[2] = termios.CS8 | termios.CREAD | termios.CLOCAL  # 8N1, no modem lines, no RTS/CTS
            attrs[3] = 0  # no echo, no line editing, no signals from bytes
            attrs[4] = attrs[5] = _BAUD[self.baud]
            attrs[6][termios.VMIN], attrs[6][termios.VTIME] = 0, 0
            termios.tcsetattr(fd, termios.TCSANOW, attrs)
            termios.tcflush(fd, termios.TCIOFLUSH)
        except termios.error as e:
            os.close(fd)
            raise ConfigError(None, f"door.osdp.port {self.port}: cannot be set to {self.baud} 8N1: {e}") from None
        except ConfigError:
            os.close(fd)
            raise
        return fd

    def _failed(self, e: OSError) -> None:
        self.faults.append(f"{self.port}: {e.strerror or e}")
        self.close()
        self._retry_at = time.monotonic() + _REOPEN_S

    def _ready(self) -> bool:
        if self._fd is None and time.monotonic() >= self._retry_at:
            try:
                self._fd = self._open()
                self.faults.append(f"{self.port}: open again")
            except ConfigError as e:
                self._retry_at = time.monotonic() + _REOPEN_S
                log.debug("osdp: %s", e)
        return self._fd is not None

    def read(self, max_bytes: int) -> bytes:
        if not self._ready():
            return b""
        try:
            return os.read(self._fd, max_bytes)
        except BlockingIOError:
            return b""
        except OSError as e:  # EIO, ENODEV: the adapter is gone
            self._failed(e)
            return b""

    def write(self, buf: bytes) -> int:
        if not self._ready():
            return 0
        try:
            return os.write(self._fd, buf)
        except BlockingIOError:
            return 0
        except OSError as e:
            self._failed(e)
            return 0

    def flush(self) -> None:
        if self._fd is not None:
            try:
                termios.tcflush(self._fd, termios.TCIOFLUSH)
            except termios.error:
                pass

    def close(self) -> None:
        fd, self._fd = self._fd, None
        if fd is not None:
            os.close(fd)


# ------------------------------------------------------------------ LED and buzzer
@dataclass(frozen=True)
class LightPattern:
    """One osdp_LED setting: on_color for on_s, then off_color for off_s, repeated; a zero on_s
    or off_s is a steady light."""

    on_color: str = "black"
    off_color: str = "black"
    on_s: float = 0.0
    off_s: float = 0.0

    def at(self, elapsed: float) -> tuple[str, float]:
        """(colour shown, seconds until it changes) `elapsed` seconds into the pattern."""
        if self.off_s == 0:
            return self.on_color, float("inf")
        if self.on_s == 0:
            return self.off_color, float("inf")
        phase = elapsed % (self.on_s + self.off_s)
        if phase < self.on_s:
            return self.on_color, self.on_s - phase
        return self.off_color, self.on_s + self.off_s - phase


def pattern_of(cmd: dict) -> LightPattern:
    """An osdp_LED command's pattern (its counts are in 100 ms)."""
    return LightPattern(COLORS.get(cmd["on_color"], "black"), COLORS.get(cmd["off_color"], "black"),
                        cmd["on_count"] / 10, cmd["off_count"] / 10)


class Indicators:
    """The reader's LED and buzzer as the panel commands them. The state is always kept (`shown`,
    `buzzer`) and every change returned for the audit; where door.osdp.leds names a gpiozero pin
    per colour, the LED of the colour shown is lit (one thread runs flashes and the return from a
    temporary setting), and door.osdp.buzzer's pin beeps as commanded."""

    def __init__(self, leds: dict[str, str], buzzer: str | None, pin_factory=None):
        self._cond = threading.Condition()
        self.permanent = LightPattern()
        self._temporary: tuple[LightPattern, float] | None = None  # and its end on time.monotonic()
        self._since = time.monotonic()  # when the pattern shown began
        self.buzzer: dict = {"tone": "off"}
        self._closed = False
        self._leds, self._buzzer, self._thread = {}, None, None
        if leds or buzzer:
            from gpiozero import LED, Buzzer

            try:
                for color, pin in leds.items():
                    self._leds[color] = LED(pin, pin_factory=pin_factory)
                if buzzer:
                    self._buzzer = Buzzer(buzzer, pin_factory=pin_factory)
            except Exception as e:  # PinInvalidPin, GPIOPinInUse, no GPIO: the gate does not start
                self.close()
                field = "door.osdp.buzzer" if len(self._leds) == len(leds) else f"door.osdp.leds.{color}"
                raise ConfigError(None, f"{field}: gpiozero refused the pin ({type(e).__name__}: {e})") from e
        if self._leds:
            self._thread = threading.Thread(target=self._run, name="osdp-led", daemon=True)
            self._thread.start()

    def shown(self, now: float | None = None) -> tuple[LightPattern, bool]:
        """The pattern showing now, and whether it is a temporary one."""
        now = time.monotonic() if now is None else now
        with self._cond:
            if self._temporary is not None and now < self._temporary[1]:
                return self._temporary[0], True
            return self.permanent, False

    def led(self, cmd: dict) -> dict | None:
        """Take an osdp_LED command (libosdp's dict: one of its temporary or permanent halves);
        returns what changed, for the audit, or None when nothing did."""
        now = time.monotonic()
        with self._cond:
            before = self.shown(now)
            if cmd.get("temporary"):
                if cmd["control_code"] == 1:  # cancel the temporary setting
                    self._temporary = None
                elif cmd["control_code"] == 2:
                    self._temporary = (pattern_of(cmd), now + cmd.get("timer_count", 0) / 10)
            elif cmd["control_code"] == 1:
                self.permanent = pattern_of(cmd)
            after = self.shown(now)
            if after == before:
                return None
            self._since = now
            self._cond.notify_all()
        pattern, temporary = after
        details = {"temporary": temporary, **asdict(pattern)}
        if temporary:
            details["for_s"] = cmd.get("timer_count", 0) / 10
        return details

    def beep(self, cmd: dict) -> dict | None:
        """Take an osdp_BUZ command; returns the new buzzer state for the audit, None if unchanged."""
        on_s, off_s, repeat = cmd["on_count"] / 10, cmd["off_count"] / 10, cmd["rep_count"]
        # tone 2 is the default tone; 0 and 1 are silence (3 and up are reserved)
        state = ({"tone": "on", "on_s": on_s, "off_s": off_s, "repeat": repeat or "until told"}
                 if cmd["control_code"] == 2 and on_s > 0 else {"tone": "off"})
        with self._cond:
            if state == self.buzzer:
                return None
            self.buzzer = state
            if self._buzzer is not None:
                if state["tone"] == "on":
                    self._buzzer.beep(on_s, off_s or on_s, n=repeat or None, background=True)
                else:
                    self._buzzer.off()
        return dict(state)

    def _run(self) -> None:
        with self._cond:
            while not self._closed:
                now = time.monotonic()
                if self._temporary is not None and now >= self._temporary[1]:
                    self._temporary, self._since = None, self._temporary[1]
                pattern, temporary = self.shown(now)
                color, change_in = pattern.at(now - self._since)
                for c, led in self._leds.items():
                    led.value = c == color
                if temporary:
                    change_in = min(change_in, self._temporary[1] - now)
                self._cond.wait(None if change_in == float("inf") else max(change_in, 0.0))

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        for device in [*self._leds.values(), self._buzzer]:
            if device is not None:
                device.off()  # closing alone leaves a pin at its level until it is released
                device.close()


# ------------------------------------------------------------------ the reader
class OsdpReader:
    """A door output (edge.pipeline.DoorOutput) that sends each grant's card number to the panel
    as a card read. See the module doc."""

    def __init__(self, cfg: OsdpConfig, pin_factory=None):
        self.cfg = cfg
        key, flags = None, []
        if cfg.secure:
            key = read_scbk(cfg.scbk_file, missing_ok=cfg.install_mode)
            flags = [LibFlag.InstallMode] if cfg.install_mode else [LibFlag.EnforceSecure]
        self._events: deque[tuple[str, dict]] = deque()
        self._dropped = 0
        self._events_lock = threading.Lock()
        self._grant_lock = threading.Lock()  # one card read in flight at a time
        self._done = threading.Event()
        self._status: int | None = None
        self._refusing = False
        self._closed = False
        self._seen = {"online": False, "secure_channel": False}
        self.indicators = Indicators(cfg.leds, cfg.buzzer, pin_factory)
        try:
            self._channel = SerialChannel(cfg.port, cfg.baud)
        except ConfigError:
            self.indicators.close()
            raise
        caps = PDCapabilities([(Capability.LEDControl, 1, 1), (Capability.AudibleControl, 1, 1),
                               (Capability.CardDataFormat, 1, 0)])
        try:
            self._pd = PeripheralDevice(PDInfo(cfg.address, self._channel, scbk=key, flags=flags, name="facegate"),
                                        caps, log_level=LogLevel.Warning, command_handler=self._command)
        except Exception as e:  # libosdp's setup refused the device: nothing may stay open
            self._channel.close()
            self.indicators.close()
            raise ConfigError(None, f"door.osdp: libosdp could not set the reader up ({type(e).__name__}: {e})") from e
        self._pd.set_event_completion_handler(self._completed)
        # The refresh loop PeripheralDevice.start() runs, set up the same way (stop() ends it), but
        # faster (_REFRESH_S) and on a daemon thread: a gate that fails elsewhere must still exit,
        # and be restarted, rather than hang on it.
        pd = self._pd
        pd.event, pd.lock = threading.Event(), threading.Lock()
        pd.thread = threading.Thread(target=self._refresh, name="osdp-pd", daemon=True)
        pd.thread.start()

    @classmethod
    def from_config(cls, cfg: Config) -> OsdpReader:
        """The reader cfg.door.osdp describes; its LED and buzzer pins through relay.pin_factory."""
        pins = cfg.door.osdp.leds or cfg.door.osdp.buzzer
        return cls(cfg.door.osdp, make_pin_factory(cfg.relay.pin_factory) if pins else None)

    # -------------------------------------------------------------- DoorOutput
    def act(self, grant: Grant) -> DoorOutcome:
        """Send `grant`'s card number to the panel as a card read: queue it and wait until it has
        gone out in the reply to the panel's poll, at most until door.osdp.timeout_s after the face
        was seen (then it is withdrawn)."""
        with self._grant_lock:
            if self._closed or self._refusing:
                return self._not_sent("locked for shutdown")
            if not grant.card:
                return self._not_sent("no card number to send")
            try:
                data = card_data(grant.card, self.cfg.card_number, self.cfg.card_bits)
            except ValueError as e:
                return self._not_sent(str(e))
            now = time.monotonic()
            seen = min(grant.t_mono, now)
            deadline = seen + self.cfg.timeout_s
            if now >= deadline:
                return self._not_sent(f"grant {now - seen:.3f} s old has expired (door.osdp.timeout_s)")
            if not self._pd.is_online():
                return self._not_sent("the panel is offline (no poll on the line)")
            if self.cfg.secure and not self._pd.is_sc_active():
                return self._not_sent("no Secure Channel with the panel (a panel without this reader's key)")
            event = {"event": Event.CardRead, "reader_no": 0, "direction": 0,
                     "format": _FORMATS[self.cfg.card_format], "length": self.cfg.card_bits, "data": data}
            self._done.clear()
            self._status = None
            if not self._pd.submit_event(event):
                return self._not_sent("libosdp refused the card read (its event queue is full)")
            taken = self._done.wait(max(deadline - time.monotonic(), 0.0))
            if not taken or self._status != CompletionStatus.Ok:
                with self._pd.lock:  # the refresh thread holds it while it talks to the panel
                    self._pd.ctx.flush_events()
            if self._status == CompletionStatus.Ok:  # sent before the flush, if only just
                return DoorOutcome("osdp", True, "card_read_sent",
                                   {"ms": round(1000 * (time.monotonic() - now), 1), "bits": self.cfg.card_bits,
                                    "secure_channel": bool(self._pd.is_sc_active())})
            return self._not_sent(f"the panel did not poll for the card read within door.osdp.timeout_s "
                                  f"{self.cfg.timeout_s} s of the face being seen: withdrawn")

    def _not_sent(self, why: str) -> DoorOutcome:
        log.warning("osdp: no card read sent: %s", why)
        return DoorOutcome("osdp", False, "not_sent", {"why": why})

    def lock(self, stay: bool = False) -> None:
        """The panel holds the door: nothing here is open. `stay`: refuse every later grant (the
        service is stopping); a card read already in flight is taken or withdrawn at its deadline.
        Takes no lock, so a signal handler may call it while a grant waits."""
        self._refusing = self._refusing or stay

    def close(self) -> None:
        """Stop talking to the panel, withdraw what it has not taken, release the port and pins."""
        if self._closed:
            return
        self._closed = True
        self._pd.stop()
        self._pd.ctx.flush_events()
        self._channel.close()
        self.indicators.close()

    def __enter__(self) -> OsdpReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -------------------------------------------------------------- what the panel did
    @property
    def online(self) -> bool:
        return bool(self._pd.is_online())

    @property
    def secure_channel(self) -> bool:
        return bool(self._pd.is_sc_active())

    def pop_events(self) -> list[tuple[str, dict]]:
        """(reason, details) of what happened on the line since the last call, for the audit
        (kind 'osdp'): the panel online or offline, Secure Channel up or down, LED and buzzer
        changes, a key set, the port lost or back."""
        out = []
        for name, up, down in (("online", "panel_online", "panel_offline"),
                               ("secure_channel", "secure_channel_active", "secure_channel_lost")):
            now = getattr(self, name)
            if now != self._seen[name]:
                self._seen[name] = now
                out.append((up if now else down, {}))
        while self._channel.faults:
            out.append(("port", {"state": self._channel.faults.popleft()}))
        with self._events_lock:
            out += list(self._events)
            self._events.clear()
            if self._dropped:
                out.append(("commands_not_audited", {"count": self._dropped}))
                self._dropped = 0
        return out

    def _record(self, reason: str, details: dict) -> None:
        with self._events_lock:
            if len(self._events) < _EVENTS_KEPT:
                self._events.append((reason, details))
            else:  # a panel flooding commands must not flood the audit log, nor grow memory
                self._dropped += 1

    def _refresh(self) -> None:
        pd = self._pd
        while not pd.event.wait(_REFRESH_S):
            with pd.lock:
                pd.ctx.refresh()

    # libosdp calls these from its refresh thread, with the PD's lock held: no slow work here
    # (the audit's fsync waits for the gate's loop, which drains pop_events).
    def _completed(self, event: dict, status: int) -> None:
        self._status = status
        self._done.set()

    def _command(self, cmd: dict) -> tuple[int, dict | None]:
        """0: done (ACK); -1: refused (NAK)."""
        kind = cmd.get("command")
        if kind == Command.LED:
            if cmd.get("led_number", 0) != 0 or cmd.get("reader", 0) != 0:
                return -1, None  # one reader, one LED
            change = self.indicators.led(cmd)
            if change is not None:
                self._record("led", change)
            return 0, None
        if kind == Command.Buzzer:
            change = self.indicators.beep(cmd)
            if change is not None:
                self._record("buzzer", change)
            return 0, None
        if kind == Command.Keyset:
            return self._keyset(cmd)
        self._record("command_refused", {"command": int(kind) if isinstance(kind, int) else str(kind)})
        return -1, None

    def _keyset(self, cmd: dict) -> tuple[int, dict | None]:
        if not self.cfg.install_mode:
            self._record("key_refused", {"why": "door.osdp.install_mode is off"})
            return -1, None
        key = bytes(cmd.get("data", b""))
        if len(key) != SCBK_BYTES:
            self._record("key_refused", {"why": f"a key of {len(key)} bytes, not {SCBK_BYTES}"})
            return -1, None
        try:
            atomic_write_bytes(self.cfg.scbk_file, key.hex().encode() + b"\n", mode=0o600)
        except OSError as e:  # the panel is told no, and keeps the old key
            self._record("key_refused", {"why": f"{self.cfg.scbk_file}: {e.strerror or e}"})
            return -1, None
        self._record("key_set", {"file": str(self.cfg.scbk_file)})
        log.warning("osdp: the panel set a new Secure Channel key in %s; turn door.osdp.install_mode off",
                    self.cfg.scbk_file)
        return 0, None
