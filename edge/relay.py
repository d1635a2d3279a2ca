"""The door relay: a timed unlock pulse with a hard ceiling, locked on every way out.

What the software can and cannot promise
----------------------------------------
The relay line is driven by a gpiozero ``OutputDevice`` (``initial_value=False`` = locked). A
background timer thread returns it to locked ``pulse_s`` after a grant; an overlapping grant may
extend the pulse, but never past ``max_hold_s`` from the moment the door went unlocked in this
opening, and after each opening the door stays locked at least ``min_locked_s``: grants in that
time open nothing, so back-to-back grants cannot hold the door open. ``lock()``, ``close()``, leaving the ``with`` block (also by exception), interpreter exit
(atexit) and any exception inside ``unlock()`` all leave the line locked.

SIGTERM does not run atexit handlers by default: the service must turn it into ``SystemExit`` (or
call ``close()``) for the lock-on-exit to happen.

SIGKILL (and a kernel OOM kill, a segfault, a power loss of the Pi alone) runs no Python code at
all. A killed process cannot lower the line; the kernel releases the GPIO but may leave it at the
level it last had, so a door unlocked at the moment of the kill can stay unlocked indefinitely.
Software cannot close that gap, so the installation must be fail-secure in hardware:

* wire the lock so that the relay *energised* = unlocked (a fail-secure strike or a maglock whose
  release is driven by the relay), so any loss of drive locks the door;
* make the released pin read as "locked": a pull resistor on the relay driver's input towards its
  inactive level (``close()`` releases the pin to an input);
* put a hardware limit on the unlock: a monostable / timer relay or the lock controller's own
  maximum-release timer, and the systemd watchdog (the service stops pinging when its loop
  stalls, and systemd kills and restarts it, whose start-up drives the line locked).
"""
from __future__ import annotations

import atexit
import logging
import threading
import time
from dataclasses import dataclass

from gpiozero import OutputDevice

from .config import RelayConfig

log = logging.getLogger(__name__)
_RETRY_S = 0.05


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
    """gpiozero pin factory for the config's `pin_factory`: None = gpiozero's default choice."""
    if name == "mock":
        from gpiozero.pins.mock import MockFactory

        return MockFactory()
    return None


class DoorRelay:
    """A gpiozero door relay with timed unlock pulses and a hard maximum hold (see module doc)."""

    def __init__(self, cfg: RelayConfig, pin_factory=None):
        """`pin_factory`: a gpiozero Factory instance; None = build the one `cfg.pin_factory` names."""
        if cfg.pulse_s > cfg.max_hold_s:
            raise ValueError("relay pulse_s must not exceed max_hold_s")
        self.cfg = cfg
        factory = pin_factory if pin_factory is not None else make_pin_factory(cfg.pin_factory)
        self._device = OutputDevice(cfg.pin, active_high=cfg.active_high, initial_value=False,
                                    pin_factory=factory)
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
        self._timer = threading.Thread(target=self._run_timer, name=f"relay-{cfg.pin}", daemon=True)
        self._timer.start()
        atexit.register(self.close)

    @property
    def pin(self):
        """The gpiozero pin (a MockPin under the mock factory: tests read its states)."""
        return self._device.pin

    @property
    def is_unlocked(self) -> bool:
        with self._cond:
            return self._opened_at is not None

    @property
    def stats(self) -> RelayStats:
        with self._cond:
            return RelayStats(self._openings, self._longest, self._last)

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
                    self._device.on()
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
        self._device.close()
        atexit.unregister(self.close)

    def __enter__(self) -> DoorRelay:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _lock_locked(self) -> None:
        """Drive the line locked and close the opening's books; the caller holds the condition."""
        self._device.off()  # if this raises, the opening stays open and the timer retries
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
