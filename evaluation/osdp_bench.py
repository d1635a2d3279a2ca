"""`python -m evaluation osdp-latency`: decision to card read at the panel, over a pseudo-terminal.

The gate's OSDP reader (edge.osdp.OsdpReader) opens one end of a pty pair as its serial port; a real
libosdp control panel (PtyPanel, libosdp's ControlPanel) polls it from the other end. Each decision
is a grant handed to the gate's own acting step (the decision audited, then edge.pipeline.open_doors)
at a random moment of the panel's poll cycle; its latency runs from the decision to the panel's
event callback holding the card read. Median and 99th percentile over many decisions, with and
without Secure Channel, for two panels: libosdp's Python ControlPanel as it ships (its loop runs
the state machine every 20 ms) and the same state machine run every 2 ms, as a panel's firmware
services its port. A reader speaks only when polled, so the panel's poll cycle sets most of the
latency; the two rows bracket it. The tests (tests/unit/test_osdp.py) use PtyPanel as the panel too."""
from __future__ import annotations

import os
import random
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
from osdp import Channel, ControlPanel, LibFlag, LogLevel, PDInfo

from edge.audit import AuditLog
from edge.config import OsdpConfig
from edge.osdp import OsdpReader
from edge.pipeline import open_doors
from edge.records import Decision, Grant

CARD = "12345678"  # fits the default 26 bits
STOCK_LOOP_S = 0.020  # libosdp's ControlPanel.refresh sleeps this long between runs of its state machine
FAST_LOOP_S = 0.002


class _FdChannel(Channel):
    """libosdp's channel over the panel's end (the pty's master), never blocking."""

    def __init__(self, fd: int):
        super().__init__()
        self.fd = fd
        self.writes = 0  # commands the panel sent (its polls, mostly)
        os.set_blocking(fd, False)

    def read(self, max_bytes: int) -> bytes:
        try:
            return os.read(self.fd, max_bytes)
        except (BlockingIOError, OSError):  # EIO while the reader's end is closed: silence
            return b""

    def write(self, buf: bytes) -> int:
        self.writes += 1
        try:
            return os.write(self.fd, buf)
        except (BlockingIOError, OSError):
            return 0

    def flush(self) -> None:
        pass


class _ControlPanel(ControlPanel):
    """libosdp's ControlPanel with the pause of its refresh loop chosen: ControlPanel.start runs
    `self.refresh(event, lock, ctx)` in its thread, so this method replaces the stock loop, whose
    20 ms pause is fixed in libosdp's Python code (libosdp's own poll timer is not changed)."""

    def __init__(self, *args, loop_s: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.loop_s = loop_s

    def refresh(self, event, lock, ctx) -> None:  # type: ignore[override]
        while not event.is_set():
            with lock:
                ctx.refresh()
            time.sleep(self.loop_s)


class PtyPanel:
    """A libosdp control panel on the master end of a pty pair; the reader under test opens
    `port`, the slave end, as its serial port (and sets its line discipline, as on a real UART).
    `scbk`: Secure Channel with this key, plain text refused; `pairing`: and with a reader in
    install mode, Secure Channel on the default key SCBK-D first, then libosdp's panel sets `scbk`
    in the reader (osdp_KEYSET). `loop_s`: the pause of the panel's refresh loop."""

    def __init__(self, address: int = 0, scbk: bytes | None = None, pairing: bool = False,
                 loop_s: float = STOCK_LOOP_S):
        self.address = address
        self._master, self._slave = os.openpty()  # the slave stays open here so the line never hangs up
        self.port = os.ttyname(self._slave)
        self.reads: list[tuple[float, dict]] = []
        self._cond = threading.Condition()
        flags = [LibFlag.EnforceSecure] if scbk and not pairing else []
        self.channel = _FdChannel(self._master)
        self.cp = _ControlPanel([PDInfo(address, self.channel, scbk=scbk, flags=flags)],
                                log_level=LogLevel.Error, event_handler=self._event, loop_s=loop_s)
        self.cp.start()

    def _event(self, _pd: int, event: dict) -> int:
        with self._cond:
            self.reads.append((time.monotonic(), event))
            self._cond.notify_all()
        return 0

    def wait_for(self, what, timeout: float = 10.0) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if what():
                return True
            time.sleep(0.02)
        return False

    def online(self) -> bool:
        return self.cp.is_online(self.address)

    def secure(self) -> bool:
        return self.cp.is_sc_active(self.address)

    def next_read(self, after: int, timeout: float = 5.0) -> tuple[float, dict] | None:
        """The first event the panel received after its first `after` ones."""
        with self._cond:
            self._cond.wait_for(lambda: len(self.reads) > after, timeout)
            return self.reads[after] if len(self.reads) > after else None

    def command(self, cmd: dict) -> bool:
        return self.cp.submit_command(self.address, cmd)

    def close(self) -> None:
        self.cp.teardown()
        os.close(self._master)
        os.close(self._slave)

    def __enter__(self) -> PtyPanel:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def measure(decisions: int, secure: bool, folder: Path, seed: int = 0,
            loop_s: float = STOCK_LOOP_S) -> tuple[list[float], float]:
    """Latency in ms of each of `decisions` grants, decision to the card read at a panel whose
    refresh loop pauses `loop_s`, and the panel's mean interval between commands (its poll
    interval) over the run, in ms."""
    key = os.urandom(16)
    scbk = folder / f"osdp-{secure}.scbk"
    scbk.write_text(key.hex() + "\n")
    scbk.chmod(0o600)
    rng = random.Random(seed)
    with PtyPanel(scbk=key if secure else None, loop_s=loop_s) as panel, \
            AuditLog(folder / f"audit-{secure}.sqlite3") as audit, \
            OsdpReader(OsdpConfig(port=panel.port, secure=secure, scbk_file=str(scbk))) as reader:
        if not panel.wait_for(panel.secure if secure else panel.online) or not reader.online:
            raise RuntimeError("the panel did not bring the reader online on the pty")
        out = []
        t_start, writes = time.monotonic(), panel.channel.writes
        for i in range(decisions):
            time.sleep(rng.uniform(0.0, 0.2))  # anywhere in the panel's poll cycle
            before = len(panel.reads)
            t0 = time.monotonic()
            d = Decision(True, "granted", identity="bench", t_mono=t0, t_wall=time.time())
            audit.record(d)  # as the gate does: on record before anything acts
            (o,) = open_doors(Grant("bench", CARD, d.t_mono, d.t_wall), (reader,), audit)
            got = panel.next_read(before)
            if not o.done or got is None:
                raise RuntimeError(f"decision {i}: {o.reason} {o.details}")
            out.append(1000.0 * (got[0] - t0))
        return out, 1000.0 * (time.monotonic() - t_start) / max(panel.channel.writes - writes, 1)


def main(args) -> int:
    print(f"decision -> card read at the panel (libosdp {_version()} ControlPanel over a pty pair, 9600 baud "
          f"set on the reader's end), {args.decisions} decisions each, at random moments of the poll cycle (ms)")
    print(f"{'panel loop':<12}{'secure channel':<16}{'median':>9}{'p99':>9}{'max':>9}{'min':>9}"
          f"{'panel poll interval':>21}")
    with tempfile.TemporaryDirectory() as tmp:
        for loop_s in (STOCK_LOOP_S, FAST_LOOP_S):
            for secure in (False, True):
                ms, poll = measure(args.decisions, secure, Path(tmp), args.seed, loop_s)
                ms = np.array(ms)
                print(f"{f'{1000 * loop_s:.0f} ms':<12}{'on' if secure else 'off':<16}{np.median(ms):>9.1f}"
                      f"{np.percentile(ms, 99):>9.1f}{ms.max():>9.1f}{ms.min():>9.1f}{poll:>21.1f}")
    return 0


def _version() -> str:
    from importlib.metadata import version

    return version("libosdp")
