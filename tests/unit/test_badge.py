"""Badge + face: the USB HID card reader read from its input events and grabbed, and the gate's
modes end to end with real models, a real audit and mock pins.

The reader is tested three ways. Through /dev/uinput, a virtual keyboard the kernel itself turns
into input events, grabbed as on a gate: skipped, saying so, where the kernel has no uinput. Through input events written in the kernel's struct input_event layout into a pipe, read by
the same BadgeReader code (opened by a stand-in for open_device). And the grab (EVIOCGRAB) against
a fake device: /dev/null and a patched ioctl, which show the request made and a refusal handled,
not that a kernel honours it: that is the uinput test's part."""
import ctypes
import errno
import json
import logging
import os
import stat
import time
from pathlib import Path

import cv2
import numpy as np
import pytest

from edge import badge as Bd
from edge import gallery as G
from edge.audit import AuditLog
from edge.config import BadgeConfig, Config
from edge.demo import fit
from edge.enroll import embed_photo
from edge.imageio import load_image
from edge.records import Frame
from edge.relay import DoorRelay

from _stack import gate_config, sample

MSC_SCAN, SYN_REPORT, EV_MSC = 4, 0, 4
KEY_MINUS, KEY_LEFTSHIFT = 12, 42
CODE = {ch: code for code, ch in Bd.KEYMAP.items() if not 71 <= code <= 82}  # the main keys, not the keypad
KEYPAD = {ch: code for code, ch in Bd.KEYMAP.items() if 71 <= code <= 82}


def ev(type_, code, value) -> bytes:
    return Bd.EVENT.pack(0, 0, type_, code, value)


def press(code) -> bytes:
    """One key as a USB keyboard's events report it: scan code, down, report, up, report."""
    syn = ev(Bd.EV_SYN, SYN_REPORT, 0)
    return (ev(EV_MSC, MSC_SCAN, 0x70000 + code) + ev(Bd.EV_KEY, code, 1) + syn
            + ev(EV_MSC, MSC_SCAN, 0x70000 + code) + ev(Bd.EV_KEY, code, 0) + syn)


def typed(text: str, keypad=False, enter=Bd.KEY_ENTER) -> bytes:
    """The events of a reader typing `text`, then Enter; letters with Shift held, as most do."""
    out = b""
    for ch in text:
        if ch.isalpha():
            out += ev(Bd.EV_KEY, KEY_LEFTSHIFT, 1) + press(CODE[ch]) + ev(Bd.EV_KEY, KEY_LEFTSHIFT, 0)
        else:
            out += press((KEYPAD if keypad else CODE)[ch])
    return out + press(enter)


class RecordedDevice:
    """open_device's stand-in: a pipe holding the given input event bytes, written in pieces as
    given (a piece may end mid-event). Opened once; a second open fails as an unplugged reader's
    path does. keep_open: the writing end stays open until close(), as a plugged reader's does."""

    def __init__(self, *pieces: bytes, keep_open=False):
        self.pieces, self.keep_open, self.opened, self._w = pieces, keep_open, [], None

    def __call__(self, path: str) -> int:
        self.opened.append(path)
        if len(self.opened) > 1:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT))
        r, w = os.pipe()
        for piece in self.pieces:
            os.write(w, piece)
            time.sleep(0.01)
        if self.keep_open:
            self._w = w
        else:
            os.close(w)
        return r

    def close(self):
        if self._w is not None:
            os.close(self._w)
            self._w = None


def read_all(reader: Bd.BadgeReader, want_swipes: int, want_events=None, timeout=5.0):
    swipes, events = [], []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        swipes += reader.pop_swipes()
        events += reader.pop_events()
        if len(swipes) >= want_swipes and (want_events is None or want_events(events)):
            break
        time.sleep(0.02)
    return swipes, events


# ------------------------------------------------------------------ the reader
def test_a_card_is_read_from_the_kernels_input_events_whatever_keys_type_it():
    """Top-row digits, keypad digits ended by the keypad's Enter, letters with Shift: each card as
    typed; an event split across two reads is put back together."""
    data = typed("0004211337") + typed("9870", keypad=True, enter=Bd.KEY_KPENTER) + typed("12AB")
    cut = Bd.EVENT.size * 7 + 5
    device = RecordedDevice(data[:cut], data[cut:])
    reader = Bd.BadgeReader("/dev/input/by-id/usb-test-event-kbd", device).start()
    try:
        swipes, events = read_all(reader, 3, lambda e: any(x.reason == "offline" for x in e))
    finally:
        reader.close()
    assert [s.card for s in swipes] == ["0004211337", "9870", "12AB"]
    assert all(abs(s.t_mono - time.monotonic()) < 10 and s.t_wall > 1.7e9 for s in swipes)
    assert [(e.reason, e.details) for e in events] == [("online", {}), ("offline", {"error": "the device went away"})]
    assert device.opened[0] == "/dev/input/by-id/usb-test-event-kbd"


def test_keys_that_are_not_one_card_are_refused_as_unreadable_never_half_read():
    """A key that is no digit or letter, more than 32 characters, or events the kernel dropped
    (SYN_DROPPED) make the read unreadable, not a shorter card; the next card reads whole."""
    dropped = typed("123")[:Bd.EVENT.size * 6] + ev(Bd.EV_SYN, Bd.SYN_DROPPED, 0) + typed("456")
    data = typed("12")[:-Bd.EVENT.size * 6] + press(KEY_MINUS) + typed("34") + typed("7" * 33) + dropped + typed("88")
    reader = Bd.BadgeReader("/dev/input/event9", RecordedDevice(data)).start()
    try:
        swipes, events = read_all(reader, 1, lambda e: sum(x.reason == "unreadable" for x in e) >= 3)
    finally:
        reader.close()
    assert [s.card for s in swipes] == ["88"]
    assert [e.details["why"] for e in events if e.reason == "unreadable"] == [
        "key code 12 is not a digit or letter", "longer than 32 characters", "the kernel dropped input events"]


def test_keys_far_apart_are_not_one_card():
    cards = Bd.CardAssembler()
    for i, ch in enumerate("1234"):
        assert cards.feed(Bd.EV_KEY, CODE[ch], 1, 10.0 + 0.01 * i) is None
    assert cards.feed(Bd.EV_KEY, CODE["5"], 1, 10.0 + 0.03 + Bd.MAX_KEY_GAP_S + 0.1) is None  # starts afresh
    assert cards.feed(Bd.EV_KEY, CODE["6"], 2, 12.0) is None  # an autorepeat types nothing
    assert cards.feed(Bd.EV_KEY, Bd.KEY_ENTER, 1, 11.2) == Bd.KeyRead("5")
    assert cards.feed(Bd.EV_KEY, Bd.KEY_ENTER, 1, 11.3) is None  # a lone Enter is no read


def test_the_grab_is_asked_of_the_device_and_one_refused_keeps_the_reader_offline(tmp_path, monkeypatch):
    """Fake device: /dev/null (a character device) with fcntl.ioctl patched. The request is
    EVIOCGRAB = _IOW('E', 0x90, int) with 1; a grab refused (another process holds the reader,
    EBUSY) closes the descriptor and the reader stays offline, saying why, reading nothing. A real
    ioctl on /dev/null (no input device) and a plain file are refused likewise."""
    iow = (1 << 30) | (ctypes.sizeof(ctypes.c_int) << 16) | (ord("E") << 8) | 0x90
    assert Bd.EVIOCGRAB == iow
    asked = []
    monkeypatch.setattr(Bd.fcntl, "ioctl", lambda fd, req, arg: asked.append((req, arg, stat.S_ISCHR(os.fstat(fd).st_mode))))
    os.close(Bd.open_device("/dev/null"))
    assert asked == [(Bd.EVIOCGRAB, 1, True)]

    def busy(fd, req, arg):
        raise OSError(errno.EBUSY, os.strerror(errno.EBUSY))

    monkeypatch.setattr(Bd.fcntl, "ioctl", busy)
    fds = len(os.listdir("/proc/self/fd"))
    with pytest.raises(OSError, match="busy"):
        Bd.open_device("/dev/null")
    assert len(os.listdir("/proc/self/fd")) == fds
    reader = Bd.BadgeReader("/dev/null").start()
    try:
        swipes, events = read_all(reader, 0, lambda e: bool(e), timeout=2.0)
    finally:
        reader.close()
    assert swipes == [] and [(e.reason, e.details) for e in events] == [
        ("offline", {"error": "cannot open and grab: Device or resource busy"})]
    monkeypatch.undo()
    with pytest.raises(OSError) as e:
        Bd.open_device("/dev/null")
    assert e.value.errno in (errno.ENOTTY, errno.EINVAL)
    (tmp_path / "plain").write_bytes(typed("1"))
    with pytest.raises(OSError, match="not an input event device"):
        Bd.open_device(str(tmp_path / "plain"))


# ------------------------------------------------------------------ through the kernel: uinput
UI_SET_EVBIT, UI_SET_KEYBIT, UI_DEV_CREATE, UI_DEV_DESTROY = 0x40045564, 0x40045565, 0x5501, 0x5502


def ui_get_sysname(length: int) -> int:
    return (2 << 30) | (length << 16) | (ord("U") << 8) | 44


@pytest.mark.skipif(not os.path.exists("/dev/uinput"), reason="this kernel has no /dev/uinput: the reader is tested "
                    "above on input events through the same reading code, the grab against a fake device")
def test_a_virtual_reader_made_by_the_kernel_is_read_and_grabbed():
    """A keyboard made through uinput types a card: read as such, and while the gate holds the
    grab another reader of the same device (a console) gets none of its keys."""
    import fcntl

    ui = os.open("/dev/uinput", os.O_WRONLY | os.O_NONBLOCK)
    try:
        fcntl.ioctl(ui, UI_SET_EVBIT, Bd.EV_KEY)
        for code in [*Bd.KEYMAP, Bd.KEY_ENTER, KEY_LEFTSHIFT]:
            fcntl.ioctl(ui, UI_SET_KEYBIT, code)
        name = b"facegate test reader".ljust(80, b"\0")
        os.write(ui, name + np.array([3, 0x1234, 0x5678, 1], "<u2").tobytes() + bytes(4 + 4 * 64 * 4))
        fcntl.ioctl(ui, UI_DEV_CREATE)
        buf = bytearray(64)
        fcntl.ioctl(ui, ui_get_sysname(len(buf)), buf)
        sysname = buf.split(b"\0")[0].decode()
        nodes = []
        for _ in range(100):
            nodes = sorted(Path(f"/sys/devices/virtual/input/{sysname}").glob("event*"))
            if nodes and Path("/dev/input", nodes[0].name).exists():
                break
            time.sleep(0.02)
        if not nodes or not Path("/dev/input", nodes[0].name).exists():
            pytest.skip("uinput made the device but no /dev/input node appeared (no devtmpfs here)")
        node = str(Path("/dev/input", nodes[0].name))
        console = os.open(node, os.O_RDONLY | os.O_NONBLOCK)
        reader = Bd.BadgeReader(node).start()
        try:
            read_all(reader, 0, lambda e: any(x.reason == "online" for x in e))
            os.write(ui, typed("0004211337"))
            swipes, _ = read_all(reader, 1)
            assert [s.card for s in swipes] == ["0004211337"]
            with pytest.raises(BlockingIOError):
                os.read(console, Bd.EVENT.size * 64)  # grabbed: the console saw nothing
        finally:
            reader.close()
            os.close(console)
    finally:
        try:
            fcntl.ioctl(ui, UI_DEV_DESTROY)
        finally:
            os.close(ui)


# ------------------------------------------------------------------ config
def test_a_badge_mode_needs_the_readers_device_by_absolute_path():
    assert Config().badge.mode == "face_only"
    with pytest.raises(ValueError, match="badge.mode badge_and_face needs the reader's input device"):
        BadgeConfig(mode="badge_and_face")
    with pytest.raises(ValueError, match="an absolute path expected"):
        BadgeConfig(mode="face_with_badge_fallback", device="input/by-id/x")
    with pytest.raises(ValueError):
        BadgeConfig(mode="badge_or_face", device="/dev/input/event3")


# ------------------------------------------------------------------ the gate's modes, real models
OBAMA_CARD, ASTRONAUT_CARD, UNKNOWN_CARD = "0004211337", "77012345", "55500001"
PULSE = 0.3


@pytest.fixture(scope="module")
def people(stack):
    cfg = Config()
    return {n: embed_photo(stack, cfg.quality, load_image(sample(f)), n, f)
            for n, f in (("obama", "obama.jpg"), ("astronaut", "astronaut.png"))}


def make_door(mode, stack, people, tmp_path, mock_factory, model_cards, window_s=5.0):
    cfg = Config()
    cfg.models.detector, cfg.models.encoder = str(model_cards["detector"]), str(model_cards["encoder"])
    cfg.relay.pulse_s, cfg.relay.max_hold_s = PULSE, 1.0
    cfg.decision.k, cfg.decision.n, cfg.decision.cooldown_s = 2, 3, 60.0
    cfg.storage.key_file = str(tmp_path / "gallery.key")
    cfg.badge = BadgeConfig(mode=mode, device="/dev/input/by-id/usb-test-event-kbd", window_s=window_s)
    G.new_key_file(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    for (name, r), card in zip(people.items(), (OBAMA_CARD, ASTRONAUT_CARD)):
        assert r.ok, r.reason
        g.add(G.Person(name, r.embedding, card=card))
    relay = DoorRelay(cfg.relay, mock_factory)
    audit = AuditLog(tmp_path / "audit.sqlite3")
    return Bd.make_gate(cfg, stack, g, relay=relay, audit=audit)


@pytest.fixture(params=["badge_and_face", "face_with_badge_fallback"])
def door(request, stack, people, tmp_path, mock_factory, model_cards):
    gate = make_door(request.param, stack, people, tmp_path, mock_factory, model_cards)
    yield gate
    gate.relay.close()
    gate.audit.close()


@pytest.fixture
def strict_door(stack, people, tmp_path, mock_factory, model_cards):
    gate = make_door("badge_and_face", stack, people, tmp_path, mock_factory, model_cards)
    yield gate
    gate.relay.close()
    gate.audit.close()


@pytest.fixture
def fallback_door(stack, people, tmp_path, mock_factory, model_cards):
    gate = make_door("face_with_badge_fallback", stack, people, tmp_path, mock_factory, model_cards)
    yield gate
    gate.relay.close()
    gate.audit.close()


def frames_of(name, n):
    image = load_image(sample(name))
    return [fit(image, zoom=1.0 + 0.03 * i, dx=4 * i) for i in range(n)]


def empty_frames(n):
    return [cv2.resize(load_image(sample("astronaut.png"))[300:512, 0:180], (640, 480))] * n


def run(gate, images):
    return [gate.process(Frame(img, time.monotonic(), time.time(), i, "test")) for i, img in enumerate(images)]


def swipe(gate, card):
    gate.present(Bd.Swipe(card, time.monotonic(), time.time()))


def rows(gate):
    return [r for r in gate.audit.tail(1000) if r["kind"] == "decision"]


def pulses(gate):
    time.sleep(PULSE + 0.2)
    return [s.state for s in gate.relay.pin.states].count(True)


def assert_no_card_number(gate, caplog):
    text = json.dumps(gate.audit.tail(1000)) + caplog.text
    assert not any(card in text for card in (OBAMA_CARD, ASTRONAUT_CARD, UNKNOWN_CARD))


def test_a_card_and_its_persons_face_open_once_verified_1to1(door, caplog):
    caplog.set_level(logging.DEBUG)
    swipe(door, OBAMA_CARD)
    decisions = run(door, frames_of("obama2.jpg", 4))
    grants = [d for d in decisions if d.grant]
    assert len(grants) == 1 and grants[0].identity == "obama"
    assert grants[0].threshold == pytest.approx(door.matcher.threshold_1to1)  # 1:1, K = 1
    assert grants[0].details["card"] == G.card_tag(door.card_key, OBAMA_CARD)
    assert pulses(door) == 1
    assert_no_card_number(door, caplog)


def test_a_card_alone_never_opens_and_its_window_ends_card_no_face(door, caplog):
    caplog.set_level(logging.DEBUG)
    door.cfg.badge.window_s = 0.5
    swipe(door, OBAMA_CARD)
    decisions = run(door, empty_frames(3))
    assert [d.reason for d in decisions] == ["no_face"] * 3
    time.sleep(0.6)
    door.poll()  # the service's call between frames: the window ends on time
    assert pulses(door) == 0
    last = rows(door)[-1]
    assert (last["reason"], last["grant"], last["identity"]) == ("card_no_face", False, "obama")
    assert last["details"]["card"] == G.card_tag(door.card_key, OBAMA_CARD) and last["details"]["last"] == "no_face"
    door.poll()
    assert rows(door)[-1]["id"] == last["id"]  # said once
    assert_no_card_number(door, caplog)


def test_a_face_not_the_cards_persons_is_denied_card_mismatch(door, caplog):
    """obama's face under the astronaut's card: in either mode denied, though the fallback would
    open for his face with no card at all (a card says who stands at the door)."""
    caplog.set_level(logging.DEBUG)
    swipe(door, ASTRONAUT_CARD)
    decisions = run(door, frames_of("obama2.jpg", 3))
    assert not any(d.grant for d in decisions) and decisions[-1].reason == "card_mismatch"
    assert decisions[-1].threshold == pytest.approx(door.matcher.threshold_1to1)
    door.poll(time.monotonic() + door.cfg.badge.window_s + 1)  # the window ends: judged, so no card_no_face
    assert [(r["reason"], r["details"]["card"]) for r in rows(door)] == [
        ("card_mismatch", G.card_tag(door.card_key, ASTRONAUT_CARD))]
    assert pulses(door) == 0
    assert_no_card_number(door, caplog)


def test_a_card_no_one_holds_is_denied_card_unknown_and_opens_no_window(door, caplog):
    caplog.set_level(logging.DEBUG)
    swipe(door, UNKNOWN_CARD)
    r = rows(door)[-1]
    assert (r["reason"], r["grant"], r["identity"]) == ("card_unknown", False, None)
    assert r["details"] == {"card": G.card_tag(door.card_key, UNKNOWN_CARD)}
    decisions = run(door, frames_of("obama2.jpg", 4))
    if door.cfg.badge.mode == "badge_and_face":
        assert [d.reason for d in decisions] == ["no_card"] * 4
    else:  # judged 1:N, as with no card
        assert decisions[1].grant and decisions[1].threshold == pytest.approx(door.matcher.threshold_1n)
    assert_no_card_number(door, caplog)


def test_badge_and_face_opens_for_no_face_without_a_card(strict_door):
    decisions = run(strict_door, frames_of("obama2.jpg", 6))
    assert [d.reason for d in decisions] == ["no_card"] * 6
    assert [r["reason"] for r in rows(strict_door)] == ["no_card"]  # audited once, as every quiet state
    assert pulses(strict_door) == 0


def test_the_fallback_opens_for_a_face_alone_1toN(fallback_door):
    decisions = run(fallback_door, frames_of("obama2.jpg", 3))
    grant = next(d for d in decisions if d.grant)
    assert grant.identity == "obama" and grant.threshold == pytest.approx(fallback_door.matcher.threshold_1n)
    assert "card" not in grant.details
    assert pulses(fallback_door) == 1


def test_the_fallback_verifies_a_card_for_a_face_1toN_does_not_recognise(fallback_door):
    """match.min_margin at its bound: 1:N recognises no one (margin), 1:1 against the card's
    person has no runner-up to beat, so his card and face open the door; his face alone did not."""
    fallback_door.cfg.match.min_margin = 2.0
    fallback_door.set_gallery(fallback_door.gallery)
    alone = run(fallback_door, frames_of("obama2.jpg", 3))
    assert not any(d.grant for d in alone) and alone[-1].reason == "margin"
    fallback_door.policy.tracks.clear()
    swipe(fallback_door, OBAMA_CARD)
    decisions = run(fallback_door, frames_of("obama2.jpg", 3))
    assert [d.identity for d in decisions if d.grant] == ["obama"]
    assert pulses(fallback_door) == 1


def test_votes_before_a_card_count_for_nothing_under_it(fallback_door):
    """One 1:N vote for obama, then his card: k = 2 frames are still needed under the card, where
    with no card his second frame would have opened."""
    images = frames_of("obama2.jpg", 3)
    assert run(fallback_door, images[:1])[0].reason == "pending"
    swipe(fallback_door, OBAMA_CARD)
    assert [d.reason for d in run(fallback_door, images[1:])] == ["pending", "granted"]


def test_each_mode_checks_the_operating_points_it_decides_at(strict_door):
    """Every grant of badge_and_face is 1:1; the fallback grants 1:N as well (edge.pipeline.Gate
    checks each point it is given against every gallery it takes)."""
    assert strict_door.verifies() == (True,)
    assert Bd.Gate.verifies(strict_door) == (False,)  # what a plain gate would have checked
    strict_door.cfg.badge.mode = "face_with_badge_fallback"
    assert strict_door.verifies() == (False, True)


# ------------------------------------------------------------------ the service, end to end
def test_the_service_reads_the_reader_and_opens_for_the_card_and_its_face(tmp_path, stack, people, caplog):
    """run_service with badge_and_face: the reader (input events through a pipe standing in for
    its device) types obama's card, the replayed camera shows him; one grant, audited with the
    card's tag, the reader's state audited, no card number in the audit or the log."""
    from edge.service import run_service

    caplog.set_level(logging.DEBUG)
    cfg = gate_config(tmp_path)
    cfg.models = Config().models
    cfg.match.threshold = None
    cfg.liveness.mode = "off"  # the badge is what is under test; the PAD model has tests of its own
    frames = tmp_path / "frames"
    frames.mkdir()
    for i, img in enumerate(frames_of("obama2.jpg", 6)):
        cv2.imwrite(str(frames / f"{i:03d}.png"), img)
    cfg.camera.path, cfg.camera.fps = str(frames), 10.0
    cfg.decision.track_timeout_s, cfg.decision.cooldown_s = 60.0, 600.0
    cfg.badge = BadgeConfig(mode="badge_and_face", device="/dev/input/by-id/usb-test-event-kbd", window_s=30.0)
    G.new_key_file(cfg.storage.key_file)
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    g.add(G.Person("obama", people["obama"].embedding, card=OBAMA_CARD))
    G.save(g, cfg.storage.gallery, G.load_key(cfg.storage.key_file))
    device = RecordedDevice(typed(OBAMA_CARD), keep_open=True)
    try:
        assert run_service(cfg, verbose=False, badge_opener=device) == 0
    finally:
        device.close()
    with AuditLog(cfg.storage.audit, readonly=True) as a:
        audit = a.tail(1000)
    tag = G.card_tag(G.load_key(cfg.storage.key_file), OBAMA_CARD)
    assert [(r["identity"], r["details"]["card"]) for r in audit if r["grant"]] == [("obama", tag)]
    assert ("badge", "online", cfg.badge.device) in [(r["kind"], r["reason"], r["details"].get("device")) for r in audit]
    assert audit[0]["details"]["badge"] == "badge_and_face"
    assert device.opened == [cfg.badge.device]
    text = json.dumps(audit) + caplog.text
    assert OBAMA_CARD not in text
