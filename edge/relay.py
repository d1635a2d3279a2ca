"""The door relay: a timed unlock pulse with a hard ceiling, locked on every way out.

What the software can and cannot promise
----------------------------------------
DoorRelay holds the timing and the safety rules once; what drives the wire is a RelayLine, one of
two backends chosen by ``relay.backend``:

* ``gpiozero`` (``GpiozeroLine``): a gpiozero ``OutputDevice`` on a Raspberry Pi pin name, through
  the pin factory ``relay.pin_factory`` names (``mock``: simulated pins);
* ``gpiod`` (``GpiodLine``): a line of any Linux GPIO chip (Jetson, Raspberry Pi 5, others) through
  libgpiod's v2 bindings, requested as an output whose value is inactive in the request itself.

Either way the line is locked from its first instant. A background timer thread returns it to
locked ``pulse_s`` after a grant; an overlapping grant may extend the pulse, but never past
``max_hold_s`` from the moment the door went unlocked in this opening, and after each opening the
door stays locked at least ``min_locked_s``: grants in that time open nothing, so back-to-back
grants cannot hold the door open. ``lock()``, ``close()``, leaving the ``with`` block (also by
exception), interpreter exit (atexit) and any exception inside ``unlock()`` all leave the line
locked. A line that cannot be had (a wrong chip, line or pin, no GPIO at all) is a ConfigError
naming the ``relay.*`` field: the gate does not start.

SIGTERM does not run atexit handlers by default: the service must turn it into ``SystemExit`` (or
call ``close()``) for the lock-on-exit to happen.

SIGKILL (and a kernel OOM kill, a segfault, a power loss of the board alone) runs no Python code at
all. A killed process cannot lower the line; the kernel releases the GPIO but may leave it at the
level it last had (the GPIO character device promises nothing about a released line), so a door
unlocked at the moment of the kill can stay unlocked indefinitely. Software cannot close that gap,
so the installation must be fail-secure in hardware:

* wire the lock so that the relay *energised* = unlocked (a fail-secure strike or a maglock whose
  release is driven by the relay), so any loss of drive locks the door;
* make the released line read as "locked": a pull resistor on the relay driver's input towards its
  inactive level (``close()`` locks the line, then releases it: gpiozero to an input, gpiod to
  whatever the chip's driver leaves);
* put a hardware limit on the unlock: a monostable / timer relay or the lock controller's own
  maximum-release timer, and the systemd watchdog (the service stops pinging when its loop
  stalls, and systemd kills and restarts it, whose start-up drives the line locked).
"""
from __future__ import annotations

import atexit
import importlib
import logging
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .config import RelayConfig
from .errors import ConfigError
from .records import DoorOutcome, Grant

log = logging.getLogger(__name__)
_RETRY_S = 0.05
CONSUMER = "facegate-relay"  # what gpioinfo shows as the holder of the gpiod line
DEV = Path("/dev")  # where GPIO chip devices are looked for when relay.chip is not set

# relay.pin_factory -> gpiozero's class for it (gpiozero 2.x)
PIN_FACTORIES = {
    "lgpio": "gpiozero.pins.lgpio:LGPIOFactory",
    "rpigpio": "gpiozero.pins.rpigpio:RPiGPIOFactory",
    "native": "gpiozero.pins.native:NativeFactory",
    "mock": "gpiozero.pins.mock:MockFactory",
}


@dataclass(frozen=True)
class RelayStats:
    openings: int  # unlocked periods since start
    longest_unlocked_s: float  # longest observed time from line unlocked to line locked
    last_unlocked_s: float


def pulse_deadline(opened_at: float, now: float, pulse_s: float, max_hold_s: float,
                   current_deadline: float | None) -> float:
    """When the door locks after a grant at `now` in an opening that began at `opened_at`.

    A grant never shortens the pulse already running and never reaches past the hard ceiling."""
    wanted = now + pulse_s
    if current_deadline is not None:
        wanted = max(wanted, current_deadline)
    return min(wanted, opened_at + max_hold_s)


def make_pin_factory(name: str):
    """gpiozero pin factory for `relay.pin_factory`: None = gpiozero's own choice ("default").
    ConfigError naming the field when it cannot be built on this machine."""
    if name == "default":
        return None
    module, cls = PIN_FACTORIES[name].split(":")
    try:
        return getattr(importlib.import_module(module), cls)()
    except Exception as e:  # its library missing (ImportError), not a Pi (PinUnknownPi, RuntimeError), no chip
        raise ConfigError(None, f"relay.pin_factory {name}: cannot be used on this machine "
                                f"({type(e).__name__}: {e})") from e


class RelayLine(Protocol):
    """The wire a DoorRelay drives: set(True) = unlocked. Opened locked; `pin` is the backend's own
    handle on it (a gpiozero pin, a gpiod line request), which outlives close()."""

    pin: object

    def set(self, on: bool) -> None: ...

    def close(self) -> None: ...


class GpiozeroLine:
    """A gpiozero OutputDevice, locked (``initial_value=False``) from its first instant."""

    def __init__(self, cfg: RelayConfig, pin_factory=None):
        """`pin_factory`: a gpiozero Factory instance; None = the one `cfg.pin_factory` names."""
        from gpiozero import OutputDevice
        from gpiozero.exc import BadPinFactory, PinFactoryFallback

        factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.pin_factory)
        # gpiozero's default factory tries lgpio, rpigpio, pigpio and native in turn, each failure a
        # warning; they explain a failure, so they go into its one line instead of stderr.
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", PinFactoryFallback)
            try:
                self._device = OutputDevice(cfg.pin, active_high=cfg.active_high, initial_value=False,
                                            pin_factory=factory)
            except BadPinFactory as e:
                tried = "; ".join(str(w.message) for w in caught if issubclass(w.category, PinFactoryFallback))
                raise ConfigError(None, f"relay.pin_factory {cfg.pin_factory}: gpiozero found no way to drive pins "
                                        f"on this machine ({e}{' ' + tried if tried else ''}); a board that is not "
                                        f"a Raspberry Pi needs relay.backend gpiod") from e
            except Exception as e:  # PinInvalidPin, GPIOPinInUse, the factory library's own errors
                raise ConfigError(None, f"relay.pin {cfg.pin!r}: gpiozero refused it "
                                        f"({type(e).__name__}: {e})") from e
        for w in caught:
            log.warning("relay: %s", w.message)
        self.pin = self._device.pin

    def set(self, on: bool) -> None:
        if on:
            self._device.on()
        else:
            self._device.off()

    def close(self) -> None:
        self._device.close()


def gpio_chips(gpiod) -> list[str]:
    """The GPIO chip devices under DEV, in number order."""
    found = (str(p) for p in DEV.glob("gpiochip*") if gpiod.is_gpiochip_device(str(p)))
    return sorted(found, key=lambda p: (len(p), p))


class GpiodLine:
    """A line of a Linux GPIO chip through libgpiod's v2 Python bindings (the `gpiod` package),
    requested as an output at its inactive (locked) value: the kernel sets direction and value in
    one request, so the line is never an output at another level."""

    def __init__(self, cfg: RelayConfig):
        if cfg.missing():
            raise ConfigError(None, cfg.missing())
        try:
            import gpiod
            from gpiod.line import Direction, Value
        except ImportError as e:
            raise ConfigError(None, f"relay.backend gpiod: the gpiod package (libgpiod's Python bindings, "
                                    f"version 2) is not installed: {e}") from e
        self._values = {True: Value.ACTIVE, False: Value.INACTIVE}
        chip, self._offset = _find_line(gpiod, cfg)
        settings = gpiod.LineSettings(direction=Direction.OUTPUT, output_value=Value.INACTIVE,
                                      active_low=not cfg.active_high)
        try:
            self.pin = gpiod.request_lines(chip, consumer=CONSUMER, config={self._offset: settings})
        except OSError as e:  # EBUSY: another program (or a kernel driver) holds the line
            raise ConfigError(None, f"relay.line {cfg.line!r}: line {self._offset} of {chip} cannot be taken "
                                    f"as an output: {e.strerror or e} (gpioinfo {chip} shows who holds it)") from e

    def set(self, on: bool) -> None:
        self.pin.set_value(self._offset, self._values[on])

    def close(self) -> None:
        self.pin.release()


def _open_chip(gpiod, path: str):
    if not gpiod.is_gpiochip_device(path):
        chips = gpio_chips(gpiod)
        raise ConfigError(None, f"relay.chip {path}: not a GPIO chip device ("
                                f"{'the GPIO chips here: ' + ', '.join(chips) if chips else 'this machine has none'})")
    try:
        return gpiod.Chip(path)
    except OSError as e:  # EACCES: the service user is not in the gpio group
        raise ConfigError(None, f"relay.chip {path}: cannot be opened: {e.strerror or e}") from e


def _find_line(gpiod, cfg: RelayConfig) -> tuple[str, int]:
    """(chip path, line offset) of relay.line: on relay.chip, or by name on whichever chip has it."""
    if cfg.chip is not None:
        with _open_chip(gpiod, cfg.chip) as chip:
            try:
                return cfg.chip, chip.line_offset_from_id(cfg.line)
            except (OSError, ValueError):  # no line of that name (ENOENT); an offset past the last line
                n = chip.get_info().num_lines
                raise ConfigError(None, f"relay.line {cfg.line!r}: {cfg.chip} has no such line (offsets 0-{n - 1}; "
                                        f"gpioinfo {cfg.chip} lists their names)") from None
    chips = gpio_chips(gpiod)
    found = []
    for path in chips:
        with _open_chip(gpiod, path) as chip:
            try:
                found.append((path, chip.line_offset_from_id(cfg.line)))
            except (OSError, ValueError):
                continue
    if not found:
        where = ", ".join(chips) if chips else "this machine (it has no GPIO chip)"
        raise ConfigError(None, f"relay.line {cfg.line!r}: no line of that name on {where}")
    if len(found) > 1:
        raise ConfigError(None, f"relay.line {cfg.line!r}: named on {len(found)} chips "
                                f"({', '.join(p for p, _ in found)}): set relay.chip")
    return found[0]


def open_line(cfg: RelayConfig, pin_factory=None) -> RelayLine:
    """The line `cfg.backend` names, locked. `pin_factory`: gpiozero only (see GpiozeroLine)."""
    return GpiodLine(cfg) if cfg.backend == "gpiod" else GpiozeroLine(cfg, pin_factory)


class DoorRelay:
    """A door relay with timed unlock pulses and a hard maximum hold, on either backend (see module doc)."""

    def __init__(self, cfg: RelayConfig, pin_factory=None):
        """`pin_factory`: for relay.backend gpiozero, a gpiozero Factory instance; None = the one
        `cfg.pin_factory` names. ConfigError (naming the relay.* field) when the line cannot be had."""
        if cfg.pulse_s > cfg.max_hold_s:
            raise ValueError("relay pulse_s must not exceed max_hold_s")
        self.cfg = cfg
        self._line = open_line(cfg, pin_factory)
        self._cond = threading.Condition()
        self._opened_at: float | None = None  # time.monotonic() when the line went unlocked
        self._locked_at = float("-inf")  # time.monotonic() when the last opening ended
        self._deadline: float | None = None
        self.last_refusal = ""  # why the last grant that opened nothing opened nothing
        self._closed = False
        self._refusing = False
        self._openings = 0
        self._longest = 0.0
        self._last = 0.0
        self._timer = threading.Thread(target=self._run_timer, name="relay", daemon=True)
        self._timer.start()
        atexit.register(self.close)

    @property
    def pin(self):
        """The backend's handle on the line (a gpiozero MockPin under the mock factory, a fake
        gpiod request in tests: tests read the line's history from it); it outlives close()."""
        return self._line.pin

    @property
    def is_unlocked(self) -> bool:
        with self._cond:
            return self._opened_at is not None

    @property
    def stats(self) -> RelayStats:
        with self._cond:
            return RelayStats(self._openings, self._longest, self._last)

    def act(self, grant: Grant) -> DoorOutcome:
        """The door output of edge.pipeline.DoorOutput: one unlock pulse for `grant` (its card
        number is the panel's business, not the relay's)."""
        now = time.monotonic()
        deadline = self.unlock(grant.t_mono)
        if deadline is None:
            return DoorOutcome("relay", False, "not_opened", {"why": self.last_refusal})
        return DoorOutcome("relay", True, "door_opened", {"unlocked_s": round(deadline - now, 3)})

    def unlock(self, now_mono: float | None = None) -> float | None:
        """Start (or extend) an unlock pulse; returns its deadline on time.monotonic(), or None
        when the door is locked and stays locked (why: `last_refusal`).

        `now_mono` is the time.monotonic() of the evidence behind the grant (the frame): a grant
        older than `pulse_s` (a stalled loop catching up) opens nothing. A fresh grant holds the
        door for the full `pulse_s` from the moment the line changes, so the person at the door
        gets the configured time whatever the processing latency. The ceiling counts from when the
        line changed."""
        with self._cond:
            if self._closed:
                raise RuntimeError("relay is closed")
            if self._refusing:
                return self._refuse("locked for shutdown")
            try:
                now = time.monotonic()
                t = now if now_mono is None else min(float(now_mono), now)
                if t + self.cfg.pulse_s <= now:
                    if self._deadline is None:
                        return self._refuse(f"grant {now - t:.3f} s old has expired")
                    log.warning("relay: grant %.3f s old has expired; not extended", now - t)
                    return self._deadline
                if self._deadline is not None and now >= self._deadline:
                    # The timer thread is late (starved): this grant starts a new opening, so the
                    # ceiling of the old one must end first.
                    self._lock_locked()
                if self._opened_at is None:
                    relock = self._locked_at + self.cfg.min_locked_s - now
                    if relock > 0:
                        # as designed, on every frame of a stream of grants: not worth a warning each
                        return self._refuse(f"relocking: {relock:.2f} s of relay.min_locked_s left", logging.DEBUG)
                    self._line.set(True)
                    self._opened_at = time.monotonic()
                    self._openings += 1
                self._deadline = pulse_deadline(self._opened_at, time.monotonic(), self.cfg.pulse_s,
                                                self.cfg.max_hold_s, self._deadline)
                self._cond.notify_all()
                return self._deadline
            except BaseException:
                self._lock_locked()
                raise

    def _refuse(self, why: str, level: int = logging.WARNING) -> None:
        self.last_refusal = why
        log.log(level, "relay: grant refused, door stays locked: %s", why)
        return None

    def lock(self, stay: bool = False) -> None:
        """Force the door locked now, ending any pulse. `stay`: and refuse every later grant (the
        service is stopping: a frame already in flight must not open the door again)."""
        with self._cond:
            self._refusing = self._refusing or stay
            self._lock_locked()
            self._cond.notify_all()

    def close(self) -> None:
        """Lock, stop the timer and release the pin. Safe to call more than once."""
        with self._cond:
            if self._closed:
                return
            self._lock_locked()
            self._closed = True
            self._cond.notify_all()
        self._timer.join(timeout=1.0)
        self._line.close()
        atexit.unregister(self.close)

    def __enter__(self) -> DoorRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock_locked(self) -> None:
        """Drive the line locked and close the opening's books; the caller holds the condition."""
        self._line.set(False)  # if this raises, the opening stays open and the timer retries
        if self._opened_at is not None:
            self._locked_at = time.monotonic()
            self._last = self._locked_at - self._opened_at
            self._longest = max(self._longest, self._last)
        self._opened_at = None
        self._deadline = None

    def _run_timer(self) -> None:
        with self._cond:
            while not self._closed:
                if self._deadline is None:
                    self._cond.wait()
                    continue
                left = self._deadline - time.monotonic()
                if left <= 0:
                    try:
                        self._lock_locked()
                    except Exception:
                        log.exception("relay: could not drive the line locked; retrying")
                        self._cond.wait(_RETRY_S)
                else:
                    self._cond.wait(left)
