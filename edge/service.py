"""The run loop as a systemd service: sd_notify READY / WATCHDOG / STOPPING, SIGHUP reload,
lock-and-exit on SIGTERM and on every other catchable signal that would end the process.

Watchdog pings are sent from the frame loop only after a frame was fully processed, so a hung
camera or pipeline stops the pings and systemd restarts the service (WatchdogSec=)."""
from __future__ import annotations

import logging
import os
import signal
import socket
import time

from .config import Config
from .errors import AuditError, ConfigError, FacegateError

log = logging.getLogger(__name__)


class Notifier:
    """sd_notify(3) over $NOTIFY_SOCKET (a datagram unix socket; '@' = abstract namespace)."""

    def __init__(self, address: str | None = None):
        address = address if address is not None else os.environ.get("NOTIFY_SOCKET")
        self.sock = None
        if address:
            if address.startswith("@"):
                address = "\0" + address[1:]
            self.address = address
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        wd = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        self.watchdog_s = int(wd) / 1e6 if wd and (not pid or int(pid) == os.getpid()) else None
        self._last_ping = float("-inf")

    def send(self, message: str) -> bool:
        if self.sock is None:
            return False
        try:
            self.sock.sendto(message.encode(), self.address)
            return True
        except OSError as e:
            log.warning("sd_notify failed: %s", e)
            return False

    def ready(self, status: str = "") -> None:
        self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def watchdog(self, now: float) -> None:
        # Ping at twice the rate systemd needs; no more, so a busy loop does not flood the socket.
        if self.watchdog_s is None or now - self._last_ping >= self.watchdog_s / 2:
            if self.send("WATCHDOG=1"):
                self._last_ping = now

    def reloading(self) -> None:
        self.send("RELOADING=1")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")


# Every catchable signal whose default action ends the process, SIGHUP (reload) aside: each locks
# the door and stops the gate as SIGTERM does, or the process would die with the line as it was.
# SIGABRT is systemd's default watchdog signal; SIGUSR1, SIGALRM and the real-time signals end a
# process that does not handle them. Left alone: the synchronous faults (SIGSEGV, SIGBUS, SIGFPE,
# SIGILL), whose code a Python handler cannot resume (the hardware ceiling covers them, as it
# covers SIGKILL), and SIGPIPE and SIGXFSZ, which Python ignores from the start.
STOP_SIGNALS = tuple(
    getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGQUIT", "SIGABRT", "SIGUSR1", "SIGUSR2", "SIGALRM",
                                       "SIGVTALRM", "SIGPROF", "SIGIO", "SIGPWR", "SIGSTKFLT", "SIGXCPU", "SIGTRAP",
                                       "SIGSYS") if hasattr(signal, name)
) + tuple(range(signal.SIGRTMIN, signal.SIGRTMAX + 1))


def signal_name(signum: int) -> str:
    if signal.SIGRTMIN < signum <= signal.SIGRTMAX:  # the enum names only the first and last of them
        return f"SIGRTMIN+{signum - signal.SIGRTMIN}"
    return signal.Signals(signum).name


def run_service(cfg: Config, max_frames: int | None = None, verbose: bool = True, notifier: Notifier | None = None,
                camera_factory=None, badge_opener=None) -> int:
    """`camera_factory`: a callable returning an edge.camera.Camera (default: make_camera(cfg.camera));
    `badge_opener`: how the card reader's device is opened and grabbed (default: edge.badge.open_device)."""
    from .audit import AuditLog
    from .badge import make_gate, open_device, open_reader
    from .camera import CameraMonitor, make_camera
    from .liveness import make_liveness
    from .pipeline import Stack, open_gallery
    from .relay import DoorRelay

    notifier = notifier or Notifier()
    relay = osdp = None  # door.output: the relay, the OSDP reader, or both
    try:
        if cfg.door.drives_relay:
            relay = DoorRelay(cfg.relay)  # locked from the first instant, before anything slower runs
    except ConfigError as e:  # no line the gate can hold locked (chip, line, pin, no GPIO): it does not start
        with AuditLog(cfg.storage.audit) as audit:
            audit.record_events([("relay", "refused", {"error": str(e)}, {}), ("service", "stopped", None, {})])
        notifier.stopping()
        raise
    audit = AuditLog(cfg.storage.audit)
    publisher = None  # edge.mqtt's, with mqtt.enabled
    stop = {"flag": False, "reload": False, "signal": None}
    doors = [relay] if relay is not None else []

    def on_term(signum, _frame):
        stop["flag"] = True
        stop["signal"] = stop["signal"] or signum
        for door in doors:
            door.lock(stay=True)  # the frame being processed may still hold a grant

    def on_hup(signum, _frame):
        stop["reload"] = True

    previous = {sig: signal.signal(sig, on_term) for sig in STOP_SIGNALS}
    previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, on_hup)
    reader = None
    try:
        stack = Stack.from_config(cfg)
        audit.set_models(stack.encoder.sha256, stack.detector.card.sha256)
        audit.clock.observe(time.time(), time.monotonic())  # a clock far ahead at start: said in the start row
        if cfg.mqtt.enabled:  # paho is imported only by a gate that publishes
            from .mqtt import start_publisher

            publisher = start_publisher(cfg.mqtt, audit, lambda: relay.stats.openings if relay is not None else 0)
        try:
            gallery = open_gallery(cfg, stack.encoder, audit.clock.floor)
        except FacegateError as e:
            audit.record_event("gallery", "refused", details={"error": str(e)})
            raise
        try:
            liveness = make_liveness(cfg, cfg.models.threads, stack.providers)
        except FacegateError as e:  # a missing or altered PAD model: no gate without its liveness check
            audit.record_event("liveness", "refused", details={"error": str(e)})
            raise
        for fallback in stack.providers.fallbacks:  # once per model: slower than configured, and on the record
            audit.record_event("model", "provider_fallback", details=fallback.details())
        reader = open_reader(cfg, badge_opener or open_device)  # None without a badge reader
        if cfg.door.sends_osdp:
            try:
                osdp = _open_osdp(cfg)
            except FacegateError as e:  # no port, no key, a key others can read: the gate does not start
                audit.record_event("osdp", "refused", details={"error": str(e)})
                raise
            doors.append(osdp)
        try:
            gate = make_gate(cfg, stack, gallery, reader, relay=relay, panel=osdp, audit=audit, liveness=liveness)
        except FacegateError as e:  # an operating point too loose for this gallery's size
            audit.record_event("gallery", "refused", details={"error": str(e)})
            raise
        camera = CameraMonitor(camera_factory or (lambda: make_camera(cfg.camera)), cfg.camera)
        audit.record_event("service", "started", details={"people": len(gallery), "threshold": round(gate.matcher.threshold_1n, 4),
                                                            "operating_point": gate.matcher.point().describe(),
                                                            "liveness": cfg.liveness.mode,
                                                            "badge": cfg.badge.mode,
                                                            "door": cfg.door.output,
                                                            "clock": audit.clock.state})
        notifier.ready(f"{len(gallery)} enrolled")
        frames = 0
        while not stop["flag"]:
            if stop["reload"]:
                stop["reload"] = False
                notifier.reloading()
                try:
                    gate.set_gallery(open_gallery(cfg, stack.encoder, audit.clock.floor))
                    audit.record_event("gallery", "reloaded", details={"people": len(gate.gallery),
                                                                        "operating_point": gate.matcher.point().describe()})
                except FacegateError as e:  # keep the gallery we have; a bad update must not lock everyone out
                    audit.record_event("gallery", "reload_refused", details={"error": str(e)})
                notifier.ready(f"{len(gate.gallery)} enrolled")
            frame = camera.read()
            for ev in camera.pop_events():
                audit.record_event("camera", ev.audit_reason, details=ev.details or None)
            for reason, details in osdp.pop_events() if osdp is not None else ():
                audit.record_event("osdp", reason, details=details or None)
            if frame is None:
                if reader is not None:
                    gate.poll()  # a card's window ends on time, frames or not
                if camera.ended:
                    break
                continue
            d = gate.process(frame)
            frames += 1
            notifier.watchdog(time.monotonic())
            if verbose and d.reason != "pending":
                _print_decision(frame, d)
            if max_frames is not None and frames >= max_frames:
                break
        if not stop["flag"]:
            # A replay that ends mid-pulse lets the pulse finish (bounded by the hard ceiling), so
            # a demo or a field-bug replay shows the door as it would have behaved.
            until = time.monotonic() + cfg.relay.max_hold_s
            while relay is not None and relay.is_unlocked and time.monotonic() < until:
                time.sleep(0.05)
        if verbose:
            st = relay.stats if relay is not None else None
            door = (f"{st.openings} door opening(s), longest unlocked {st.longest_unlocked_s:.2f} s, " if st else
                    "the door is the panel's (door.output osdp), ")
            print(f"done: {frames} frames, {door}{audit.count()} audit records in {cfg.storage.audit}")
        # A stop asked for (systemctl stop, Ctrl-C) is a success; any other signal, the watchdog's
        # included, is a failure, so Restart=on-failure brings the gate back.
        return 0 if stop["signal"] in (None, signal.SIGTERM, signal.SIGINT) else 128 + stop["signal"]
    except AuditError as e:  # a gate that cannot keep its records does not run: it stops locked
        log.error("%s; the door stays locked", e)
        notifier.status(f"stopped, door locked: {e}")
        raise
    finally:
        notifier.stopping()
        for door in doors:
            door.close()
        if reader is not None:
            reader.close()
        try:
            audit.record_event("service", "stopped", details={"signal": signal_name(stop["signal"])}
                               if stop["signal"] else None)
        except AuditError as e:  # the log refusing rows is what stops the gate: say so, keep the first error
            log.error("'stopped' not audited: %s", e)
        finally:
            if publisher is not None:  # after the 'stopped' row, which it still publishes
                publisher.close()
            audit.close()
            for sig, handler in previous.items():  # an embedding caller (tests, CLI) gets its handlers back
                signal.signal(sig, handler)


def _open_osdp(cfg: Config):
    """The OSDP reader door.osdp describes, talking to the panel; ConfigError when it cannot be."""
    try:
        from .osdp import OsdpReader
    except ImportError as e:  # libosdp is in requirements.txt; a venv made without it says so here
        raise ConfigError(None, f"door.output {cfg.door.output}: libosdp's Python bindings (the libosdp "
                                f"package) cannot be imported: {e}") from None
    return OsdpReader.from_config(cfg)


def _print_decision(frame, d) -> None:
    who = d.identity or d.details.get("nearest") or ""
    score = f" score {d.score:.3f} (threshold {d.threshold:.3f})" if d.score is not None and d.threshold is not None else ""
    live = d.details.get("liveness", {})
    if d.liveness is not None and "threshold" in live:
        score += f", liveness {d.liveness:.3f} (threshold {live['threshold']:.3f})"
    print(f"frame {frame.index:4d} {frame.source[-30:]:>30}  {'GRANT' if d.grant else 'deny '} {d.reason:<16} {who}{score}", flush=True)
