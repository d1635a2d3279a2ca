"""Badge + face: a USB HID card reader, which types the card number as a keyboard followed by Enter.

The reader is read through the Linux input subsystem, as the kernel's input_event structs from its
/dev/input/eventN, and grabbed (EVIOCGRAB) so that its keystrokes reach no one else: typed into a
console's login prompt, a card number would end up in the journal. Key codes are the kernel's
(linux/input-event-codes.h), the same whatever keyboard layout the console has. A thread of its
own reads it: a ten-digit card is some 66 events, more than the kernel queues for a reader that
waits on a slow camera frame, and a dropped event would turn a card into another one.

A card never opens the door alone. In BadgeGate it names one enrolled person (the gallery's
`card`), and for badge.window_s after it the gate verifies the face at the door against that
person only (1:1, the matcher's 1:1 threshold, K = 1), through the same decision policy as a face
alone: k of n frames, liveness, quality, cooldown, back-off. Its own denials, each audited:
card_unknown (no one enrolled holds it), card_mismatch (the face is not the card's person's), and
card_no_face (no face was judged within the window). The audit and the log name a card by its
card_tag (edge.gallery) only.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import stat
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass, field, replace

from .config import Config
from .gallery import card_tag, load_key
from .pipeline import _QUIET, Gate
from .records import Decision, Frame

log = logging.getLogger(__name__)

# linux/input.h: struct input_event is the kernel's timeval (two longs, 32 or 64 bits with the
# platform's C long, also for a 32-bit userland with a 64-bit time_t), then type, code and value.
EVENT = struct.Struct("@llHHi")
EVIOCGRAB = 0x40044590  # _IOW('E', 0x90, int)
EV_SYN, EV_KEY = 0x00, 0x01
SYN_DROPPED = 3
KEY_DOWN = 1  # 0 is a release, 2 an autorepeat: a reader types each character once
KEY_ENTER, KEY_KPENTER = 28, 96
SHIFT_KEYS = {42, 54}  # KEY_LEFTSHIFT, KEY_RIGHTSHIFT: a letter is a capital either way
# linux/input-event-codes.h: KEY_1..KEY_0 are 2..11, the keypad's digits 71..82 in rows, the letters
# in their keyboard rows from KEY_Q (16), KEY_A (30) and KEY_Z (44).
KEYMAP = {
    **{2 + i: d for i, d in enumerate("1234567890")},
    **{71: "7", 72: "8", 73: "9", 75: "4", 76: "5", 77: "6", 79: "1", 80: "2", 81: "3", 82: "0"},
    **{16 + i: c for i, c in enumerate("QWERTYUIOP")},
    **{30 + i: c for i, c in enumerate("ASDFGHJKL")},
    **{44 + i: c for i, c in enumerate("ZXCVBNM")},
}
MAX_CARD_CHARS = 32  # edge.gallery.CARD
# A reader types a card in tens of milliseconds; keys further apart than this are not one card (a
# read cut short, then another), and what came before is dropped.
MAX_KEY_GAP_S = 1.0
RECONNECT_S = 1.0
# Frame reasons that judge nothing: a window that saw only these ends as card_no_face.
_UNDECIDED = _QUIET | {"error"}
# A face judged under a card: the policy's reasons, named for the card.
_UNDER_CARD = {"unknown": "card_mismatch", "claim_unknown": "card_unknown"}


@dataclass(frozen=True)
class KeyRead:
    """What one Enter ended: a card number, or why the keys before it are not one."""
    card: str
    problem: str = ""


class CardAssembler:
    """Key events -> card numbers. Key downs of digits and letters, ended by Enter; a read with any
    other key, longer than MAX_CARD_CHARS, with events the kernel dropped, or with a gap between keys
    is no card (KeyRead with a problem): a partial number could be another person's card."""

    def __init__(self):
        self._chars: list[str] = []
        self._problem = ""
        self._last: float | None = None

    def feed(self, type_: int, code: int, value: int, t: float) -> KeyRead | None:
        if type_ == EV_SYN and code == SYN_DROPPED:
            self._problem = "the kernel dropped input events"
            return None
        if type_ != EV_KEY or value != KEY_DOWN:
            return None
        if self._last is not None and t - self._last > MAX_KEY_GAP_S:
            self._chars, self._problem = [], ""
        self._last = t
        if code in (KEY_ENTER, KEY_KPENTER):
            chars, problem = self._chars, self._problem
            self._chars, self._problem = [], ""
            if problem:
                return KeyRead("", problem)
            return KeyRead("".join(chars)) if chars else None
        if code in SHIFT_KEYS:
            return None
        ch = KEYMAP.get(code)
        if ch is None:
            self._problem = self._problem or f"key code {code} is not a digit or letter"
        elif len(self._chars) >= MAX_CARD_CHARS:
            self._problem = self._problem or f"longer than {MAX_CARD_CHARS} characters"
        else:
            self._chars.append(ch)
        return None


def grab(fd: int) -> None:
    """EVIOCGRAB: this reader's events go to this file descriptor only, never to a console (an
    OSError, EBUSY when another process holds it). Closing the descriptor lets it go."""
    fcntl.ioctl(fd, EVIOCGRAB, 1)


def open_device(path: str) -> int:
    """The reader's input device, opened and grabbed; OSError naming what failed."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        if not stat.S_ISCHR(os.fstat(fd).st_mode):
            raise OSError(errno.ENODEV, "not an input event device (a character device under /dev/input)")
        grab(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class Swipe:
    card: str  # the number itself: it goes no further than BadgeGate.present
    t_mono: float
    t_wall: float


@dataclass(frozen=True)
class ReaderEvent:
    reason: str  # "online", "offline", "unreadable"
    details: dict = field(default_factory=dict)


class BadgeReader:
    """The reader at `path`, read in a thread of its own from start() to close(). pop_swipes() and
    pop_events() hand over what it read and what happened to it (online, offline and why,
    unreadable reads); a device that goes away or cannot be opened or grabbed is tried again every
    RECONNECT_S. `opener` opens and grabs (open_device): tests hand it recorded events."""

    def __init__(self, path: str, opener=open_device, clock=time.monotonic, wall=time.time):
        self.path, self._opener, self._clock, self._wall = path, opener, clock, wall
        self._lock = threading.Lock()
        self._swipes: deque[Swipe] = deque(maxlen=16)
        self._events: list[ReaderEvent] = []
        self._stop = threading.Event()
        self._state = ""
        self._thread = threading.Thread(target=self._run, name="badge-reader", daemon=True)

    def start(self) -> BadgeReader:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2.0)

    def pop_swipes(self) -> list[Swipe]:
        with self._lock:
            out = list(self._swipes)
            self._swipes.clear()
        return out

    def pop_events(self) -> list[ReaderEvent]:
        with self._lock:
            out, self._events = self._events, []
        return out

    def _event(self, reason: str, **details) -> None:
        if reason in ("online", "offline"):
            if reason == self._state:
                return  # a state is said once, not at every reconnect attempt
            self._state = reason
        (log.info if reason == "online" else log.warning)("badge reader %s %s %s", self.path, reason, details or "")
        with self._lock:
            self._events.append(ReaderEvent(reason, details))

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                fd = self._opener(self.path)
            except OSError as e:
                self._event("offline", error=f"cannot open and grab: {e.strerror or e}")
                self._stop.wait(RECONNECT_S)
                continue
            self._event("online")
            try:
                why = self._read(fd)
            finally:
                os.close(fd)
            if why:
                self._event("offline", error=why)
                self._stop.wait(RECONNECT_S)

    def _read(self, fd: int) -> str:
        """Read until close() (returns "") or the device fails (returns why)."""
        cards = CardAssembler()
        poller = select.poll()
        poller.register(fd, select.POLLIN)
        rest = b""
        while not self._stop.is_set():
            if not poller.poll(200):
                continue
            try:
                data = os.read(fd, EVENT.size * 64)
            except BlockingIOError:
                continue
            except OSError as e:
                return f"read failed: {e.strerror}"
            if not data:
                return "the device went away"
            rest += data
            whole = len(rest) - len(rest) % EVENT.size
            now, wall = self._clock(), self._wall()
            for _, _, type_, code, value in EVENT.iter_unpack(rest[:whole]):
                read = cards.feed(type_, code, value, now)
                if read is None:
                    continue
                if read.problem:
                    self._event("unreadable", why=read.problem)
                else:
                    with self._lock:
                        self._swipes.append(Swipe(read.card, now, wall))
            rest = rest[whole:]
        return ""


@dataclass
class CardWindow:
    name: str  # the card's person
    tag: str  # card_tag of the card
    opened: float  # t_mono of the card
    until: float
    last: str = "no frame"  # the last frame reason under the card
    judged: bool = False  # a decision beyond _UNDECIDED was taken under it


@dataclass
class BadgeGate(Gate):
    """A Gate with a card reader (cfg.badge.mode badge_and_face or face_with_badge_fallback). Each
    card opens a window of cfg.badge.window_s in which the gate verifies the face 1:1 against the
    card's person; outside a window badge_and_face judges nothing (reason no_card, audited once)
    and face_with_badge_fallback identifies 1:N as a Gate does. `card_key` is the gallery key,
    which card_tag is keyed from."""

    reader: BadgeReader | None = None
    card_key: bytes = b""

    def __post_init__(self):
        self._window: CardWindow | None = None
        super().__post_init__()

    def verifies(self) -> tuple[bool, ...]:
        # every grant under badge_and_face is 1:1; the fallback grants 1:N as well
        return (True,) if self.cfg.badge.mode == "badge_and_face" else (False, True)

    def process(self, frame: Frame) -> Decision:
        self.poll(frame.t_mono, frame.t_wall)
        return super().process(frame)

    def poll(self, t_mono: float | None = None, t_wall: float | None = None) -> None:
        """The reader's news (audited as kind badge), its cards, and the end of a window whose time
        is up at t_mono: the service calls this between frames, so a window ends on time without one."""
        t_mono = time.monotonic() if t_mono is None else t_mono
        t_wall = time.time() if t_wall is None else t_wall
        if self.reader is not None:
            for ev in self.reader.pop_events():
                if self.audit is not None:
                    self.audit.record_event("badge", ev.reason, details={"device": self.reader.path, **ev.details})
            for swipe in self.reader.pop_swipes():
                self.present(swipe)
        w = self._window
        if w is not None and t_mono > w.until:
            self._end_window(w, w.until, t_wall - (t_mono - w.until))

    def present(self, swipe: Swipe) -> None:
        """A card at the reader: opens its person's window, or is denied card_unknown. Opens nothing."""
        tag = card_tag(self.card_key, swipe.card)
        w = self._window
        if w is not None and w.tag != tag:  # another card: the one before it ends here
            self._end_window(w, swipe.t_mono, swipe.t_wall)
        holder = self.gallery.card_holder(swipe.card)
        if holder is None:
            self._window = None
            self._act(Decision(False, "card_unknown", t_mono=swipe.t_mono, t_wall=swipe.t_wall, details={"card": tag}))
            return
        if self._window is None:
            # votes cast before the card (1:N, or under another card) count for nothing under it
            self.policy.tracks.clear()
        self._window = CardWindow(holder.name, tag, swipe.t_mono, swipe.t_mono + self.cfg.badge.window_s)

    def _end_window(self, w: CardWindow, t_mono: float, t_wall: float) -> None:
        self._window = None
        self.policy.tracks.clear()  # 1:1 votes carry nothing into 1:N
        if not w.judged:
            self._act(Decision(False, "card_no_face", identity=w.name, t_mono=t_mono, t_wall=t_wall,
                               details={"card": w.tag, "window_s": self.cfg.badge.window_s, "last": w.last}))

    def _judge(self, frame: Frame) -> Decision:
        w = self._window
        if w is None or frame.t_mono < w.opened:  # a frame taken before the card is judged without it
            if self.cfg.badge.mode == "badge_and_face":
                return self.policy.frame_denial("no_card", frame.t_mono, frame.t_wall)
            return super()._judge(frame)
        self.claim = w.name
        try:
            d = super()._judge(frame)
        finally:
            self.claim = None
        d = replace(d, reason=_UNDER_CARD.get(d.reason, d.reason), details={**d.details, "card": w.tag})
        w.last = d.reason
        if d.reason not in _UNDECIDED:
            w.judged = True
        if d.grant:  # the card is used; another entry needs another card
            self._window = None
        return d


def make_gate(cfg: Config, stack, gallery, reader: BadgeReader | None = None, **kwargs) -> Gate:
    """The gate cfg.badge asks for: a Gate for face_only, else a BadgeGate reading `reader`, its
    card tags keyed from the gallery key (storage.key_file, or systemd's credential)."""
    if cfg.badge.mode == "face_only":
        return Gate(cfg, stack, gallery, **kwargs)
    return BadgeGate(cfg, stack, gallery, reader=reader, card_key=load_key(cfg.storage.key_file), **kwargs)


def open_reader(cfg: Config, opener=open_device) -> BadgeReader | None:
    """The reader cfg.badge names, started; None for face_only."""
    return None if cfg.badge.mode == "face_only" else BadgeReader(cfg.badge.device, opener).start()
