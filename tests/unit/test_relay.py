"""Door relay on both line backends: pulse length, hard maximum hold, locked on every way out,
and a line that cannot be had refused in one line naming its relay.* field.

Every timing test runs on gpiozero's mock pins and on a fake gpiod chip (reliability/fake_gpiod.py),
reading the line's own history (50 ms tolerance), so pulses are kept short (0.2 s) to keep the
suite fast."""
import contextlib
import importlib
import inspect
import json
import re
import subprocess
import sys
import time
from enum import Enum

import pytest

from edge.config import RelayConfig, load_config
from edge.errors import ConfigError
from edge.relay import DoorRelay, pulse_deadline
from reliability import fake_gpiod
from reliability.fake_gpiod import BACKENDS, CHIP, LINE, simulated_relay
from reliability.fakes import audit_rows, fake_config, line_history


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


@pytest.fixture
def make(backend):
    with contextlib.ExitStack() as stack:
        def make(pulse_s=0.2, max_hold_s=0.3, active_high=True, min_locked_s=0.5):
            cfg = RelayConfig(active_high=active_high, pulse_s=pulse_s, max_hold_s=max_hold_s, min_locked_s=min_locked_s)
            stack.enter_context(simulated_relay(backend, cfg))
            relay = DoorRelay(cfg)
            relay.made_at = time.monotonic()
            return relay

        yield make


def changes(relay) -> list[tuple[float, bool]]:
    """The line since the relay was made: its level then, then each change as (seconds since the
    change before, level), as the wire saw it."""
    hist = line_history(relay.pin)
    level = [lvl for t, lvl in hist if t <= relay.made_at][-1]
    later = [(t, lvl) for t, lvl in hist if t > relay.made_at]
    times = [relay.made_at] + [t for t, _ in later]
    return [(0.0, level)] + [(t - before, lvl) for before, (t, lvl) in zip(times, later)]


def assert_changes(relay, expected, tolerance_s=0.05):
    got = changes(relay)
    assert len(got) == len(expected) and all(
        lvl == want_lvl and abs(dt - want_dt) <= tolerance_s for (dt, lvl), (want_dt, want_lvl) in zip(got, expected)), got


def released(pin) -> bool:
    """The relay let go of its line: a released gpiod request, a gpiozero pin back to an input."""
    if isinstance(pin, fake_gpiod.LineRequest):
        return not pin and pin.line.holder is None
    return pin.function == "input"


def wait_locked(relay, limit_s=2.0):
    end = time.monotonic() + limit_s
    while relay.is_unlocked and time.monotonic() < end:
        time.sleep(0.01)
    assert not relay.is_unlocked


def test_pulse_deadline_extends_within_the_ceiling():
    # opened at 10, pulse 3, ceiling 5: a grant at 11 extends to 14; at 13 it is cut at 15
    assert pulse_deadline(10.0, 10.0, 3.0, 5.0, None) == 13.0
    assert pulse_deadline(10.0, 11.0, 3.0, 5.0, 13.0) == 14.0
    assert pulse_deadline(10.0, 13.0, 3.0, 5.0, 14.0) == 15.0
    # a stale grant never shortens the running pulse
    assert pulse_deadline(10.0, 9.0, 3.0, 5.0, 13.0) == 13.0


def test_one_pulse_of_configured_length(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        relay.unlock()
        assert relay.is_unlocked
        wait_locked(relay)
        time.sleep(0.05)
        assert_changes(relay, [(0.0, False), (0.0, True), (0.2, False)])
        assert relay.stats.openings == 1
        assert 0.19 <= relay.stats.longest_unlocked_s < 0.26


def test_overlapping_grant_extends_the_pulse(make):
    with make(pulse_s=0.2, max_hold_s=0.5) as relay:
        relay.unlock()
        time.sleep(0.1)
        relay.unlock()
        wait_locked(relay)
        assert_changes(relay, [(0.0, False), (0.0, True), (0.3, False)])


def test_overlapping_grants_never_pass_max_hold(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        for _ in range(5):  # a grant every 0.1 s would keep it open for ever without the ceiling
            relay.unlock()
            time.sleep(0.1)
        wait_locked(relay)
        assert_changes(relay, [(0.0, False), (0.0, True), (0.3, False)])  # the later grants fell in the relock time
        assert relay.stats.longest_unlocked_s < 0.3 + 0.05


def test_grant_after_a_pulse_starts_a_new_opening(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        relay.unlock()
        wait_locked(relay)
        time.sleep(0.5)  # relay.min_locked_s
        relay.unlock()
        wait_locked(relay)
        assert_changes(relay, [(0.0, False), (0.0, True), (0.2, False), (0.5, True), (0.2, False)])
        assert relay.stats.openings == 2


def test_back_to_back_grants_leave_the_door_locked_min_locked_s_between_openings(make):
    with make(pulse_s=0.2, max_hold_s=0.3, min_locked_s=0.5) as relay:
        refused = []
        end = time.monotonic() + 2.0
        while time.monotonic() < end:  # a grant every 20 ms, as decision.cooldown_s 0 gives
            if relay.unlock() is None:
                refused.append(relay.last_refusal)
            time.sleep(0.02)
        relay.lock()
        later = changes(relay)[1:]  # each with the time since the change before it
        held = [dt for dt, level in later if not level]
        relocked = [dt for dt, level in later[1:] if level]
        assert len(held) == 3  # at 0, 0.8 and 1.6 s: open 0.3 s (the ceiling), locked 0.5 s
        assert all(h <= 0.3 + 0.05 for h in held) and all(r >= 0.5 - 0.02 for r in relocked), (held, relocked)
        assert sum(held) / 2.0 < 0.3 / 0.8 + 0.1  # not 2.0 s of 2.0
        assert refused and all(r.startswith("relocking: ") for r in refused)


def test_the_relock_time_has_a_floor_and_bounds_the_unlocked_share(tmp_path):
    from pydantic import ValidationError

    from edge.config import MAX_UNLOCKED_SHARE

    with pytest.raises(ValidationError, match="min_locked_s"):
        RelayConfig(min_locked_s=0.0)
    (tmp_path / "c.yaml").write_text("relay: {pulse_s: 30, max_hold_s: 60, min_locked_s: 1}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: relay\.min_locked_s 1\.0 with relay\.max_hold_s 60\.0 .* 98% .* "
                                          r"set min_locked_s to at least 10\.59"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "c.yaml").write_text("relay: {pulse_s: 30, max_hold_s: 60, min_locked_s: 10.6}\n")
    cfg = load_config(tmp_path / "c.yaml")
    assert cfg.relay.max_hold_s / (cfg.relay.max_hold_s + cfg.relay.min_locked_s) <= MAX_UNLOCKED_SHARE


def test_future_timestamp_is_clamped_to_the_clock(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        deadline = relay.unlock(now_mono=time.monotonic() + 100.0)
        assert deadline <= time.monotonic() + 0.2


def test_stale_grant_opens_nothing(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        assert relay.unlock(now_mono=time.monotonic() - 0.5) is None  # a stalled loop catching up
        assert not relay.is_unlocked and changes(relay) == [(0.0, False)]
        # a recent one opens for the full pulse from the moment the line changes
        before = time.monotonic()
        deadline = relay.unlock(now_mono=before - 0.1)
        after = time.monotonic()
        assert relay.is_unlocked and before + 0.2 <= deadline <= after + 0.2
        wait_locked(relay)
        assert_changes(relay, [(0.0, False), (0.0, True), (0.2, False)])


def test_lock_forces_locked(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        relay.unlock()
        relay.lock()
        assert not relay.is_unlocked
        assert relay.pin.state is False
        time.sleep(0.3)
        assert len(changes(relay)) == 3  # the timer does not toggle it again


def test_close_locks_and_releases_the_pin(make):
    relay = make()
    relay.unlock()
    pin = relay.pin
    relay.close()
    assert pin.state is False
    assert released(pin)
    with pytest.raises(RuntimeError):
        relay.unlock()
    relay.close()  # idempotent


def test_exception_in_with_block_locks(make):
    relay = make()
    pin = relay.pin
    with pytest.raises(ZeroDivisionError):
        with relay:
            relay.unlock()
            1 / 0
    assert pin.state is False and released(pin)


def test_exception_inside_unlock_leaves_it_locked(make):
    relay = make()
    real_set = relay._line.set

    def set_then_fail(on):
        real_set(on)  # the line went high, then the driver reported an error
        if on:
            raise OSError("GPIO write failed")

    relay._line.set = set_then_fail
    with pytest.raises(OSError):
        relay.unlock()
    assert relay.pin.state is False
    assert not relay.is_unlocked
    relay.close()


def test_active_low_wiring(make):
    with make(pulse_s=0.2, max_hold_s=0.3, active_high=False) as relay:
        pin = relay.pin
        assert pin.state is True  # locked = line high on an active-low relay board
        relay.unlock()
        assert pin.state is False
        wait_locked(relay)
        assert_changes(relay, [(0.0, True), (0.0, False), (0.2, True)])


def test_pulse_longer_than_ceiling_is_refused(backend):
    cfg = RelayConfig(pulse_s=3.0, max_hold_s=5.0)
    with simulated_relay(backend, cfg):
        cfg.pulse_s = 6.0  # validate_assignment bounds each field, not the pair
        with pytest.raises(ValueError):
            DoorRelay(cfg)


# ------------------------------------------------------------------ the gpiod backend
@pytest.mark.parametrize("active_high", [True, False], ids=["active-high", "active-low"])
def test_gpiod_takes_the_line_as_an_output_already_locked(active_high):
    """A line left at the unlocking level (a gate killed mid-pulse) is locked by the request itself:
    direction and value in one request, no write after it, no instant as an unlocked output."""
    cfg = RelayConfig(active_high=active_high)
    with simulated_relay("gpiod", cfg) as board:
        wire = board.line(CHIP, LINE)
        wire.drive(active_high)  # unlocked, as the killed gate left it
        before = len(wire.history)
        with DoorRelay(cfg) as relay:
            (request,) = board.requests
            s = request.settings[LINE]
            assert (s.direction, s.output_value, s.active_low) == (fake_gpiod.Direction.OUTPUT,
                                                                  fake_gpiod.Value.INACTIVE, not active_high)
            assert request.consumer == "facegate-relay" and request.writes == []
            assert [level for _, level in wire.history[before:]] == [not active_high]  # one change: to locked
            relay.unlock()
            assert wire.state is active_high and request.writes == [(LINE, fake_gpiod.Value.ACTIVE)]
        assert wire.state is (not active_high) and wire.holder is None


def test_gpiod_finds_a_line_by_name_on_whichever_chip_has_it(tmp_path, monkeypatch):
    """relay.line as a name and no relay.chip: every chip is searched; a name on two chips is refused."""
    chips = {str(tmp_path / "gpiochip0"): ["PAA.00", "PAA.01"], str(tmp_path / "gpiochip1"): ["", "", "PQ.06"]}
    for path in chips:
        (tmp_path / path).touch()
    monkeypatch.setattr("edge.relay.DEV", tmp_path)
    with fake_gpiod.installed(fake_gpiod.Board(chips)) as board:
        with DoorRelay(RelayConfig(backend="gpiod", line="PQ.06")):
            (request,) = board.requests
            assert (request.chip_path, list(request.settings)) == (str(tmp_path / "gpiochip1"), [2])
    chips[str(tmp_path / "gpiochip0")][1] = "PQ.06"
    with fake_gpiod.installed(fake_gpiod.Board(chips)), pytest.raises(ConfigError) as e:
        DoorRelay(RelayConfig(backend="gpiod", line="PQ.06"))
    assert str(e.value) == (f"relay.line 'PQ.06': named on 2 chips ({tmp_path}/gpiochip0, {tmp_path}/gpiochip1): "
                            f"set relay.chip")


def setup_error(backend, **relay) -> str:
    """The one-line error of a relay that cannot be set up; the line it named is left untouched."""
    cfg = RelayConfig()
    with simulated_relay(backend, cfg) as board:
        for k, v in relay.items():
            setattr(cfg, k, v)
        with pytest.raises(ConfigError) as e:
            DoorRelay(cfg)
        if board is not None:
            assert all(not line.holder and len(line.history) == 1 for lines in board.chips.values() for line in lines)
    msg = str(e.value)
    assert "\n" not in msg and e.value.path is None
    return msg


def test_a_wrong_chip_or_line_is_refused_naming_the_field():
    assert setup_error("gpiod", chip="/dev/gpiochip9").startswith("relay.chip /dev/gpiochip9: not a GPIO chip device (")
    assert setup_error("gpiod", line=32) == \
        "relay.line 32: /dev/gpiochip0 has no such line (offsets 0-31; gpioinfo /dev/gpiochip0 lists their names)"
    assert setup_error("gpiod", line="PX.99").startswith("relay.line 'PX.99': /dev/gpiochip0 has no such line")
    assert setup_error("gpiod", line=None) == \
        "relay.line: relay.backend gpiod needs the line's offset (with relay.chip) or its name"


def test_a_line_another_program_holds_is_refused_naming_the_field():
    cfg = RelayConfig()
    with simulated_relay("gpiod", cfg):
        import gpiod

        with gpiod.request_lines(CHIP, consumer="someone-else", config={LINE: None}), \
                pytest.raises(ConfigError, match=r"^relay\.line 17: line 17 of /dev/gpiochip0 cannot be taken as an "
                                                 r"output: Device or resource busy \(gpioinfo /dev/gpiochip0"):
            DoorRelay(cfg)


def test_no_gpiod_package_is_refused_naming_the_backend(monkeypatch):
    monkeypatch.setitem(sys.modules, "gpiod", None)  # import gpiod: ImportError
    with pytest.raises(ConfigError, match=r"^relay\.backend gpiod: the gpiod package .* is not installed"):
        DoorRelay(RelayConfig(backend="gpiod", chip=CHIP, line=LINE))


# ------------------------------------------------------------------ the gpiozero backend
def test_a_pin_gpiozero_refuses_is_refused_naming_the_field():
    assert setup_error("gpiozero", pin="GPIO99") == \
        "relay.pin 'GPIO99': gpiozero refused it (PinInvalidPin: GPIO99 is not a valid pin name)"


def test_a_pin_factory_this_machine_lacks_is_refused_naming_the_field(monkeypatch):
    monkeypatch.setitem(sys.modules, "lgpio", None)  # the lgpio library is not installed
    monkeypatch.delitem(sys.modules, "gpiozero.pins.lgpio", raising=False)  # nor loaded before
    with pytest.raises(ConfigError, match=r"^relay\.pin_factory lgpio: cannot be used on this machine \(ModuleNotFoundError"):
        DoorRelay(RelayConfig(pin_factory="lgpio"))


def test_no_gpio_at_all_is_refused_naming_the_pin_factory(monkeypatch):
    """gpiozero's default: every factory it tries fails (here: no pin library, not a Pi)."""
    from gpiozero import Device

    with contextlib.suppress(OSError), open("/proc/device-tree/model", "rb") as f:
        if b"Raspberry Pi" in f.read():
            pytest.skip("a Raspberry Pi: gpiozero's native factory works here")
    monkeypatch.delenv("GPIOZERO_PIN_FACTORY", raising=False)
    monkeypatch.setattr(Device, "pin_factory", None)
    for library in ("lgpio", "RPi", "pigpio"):
        monkeypatch.setitem(sys.modules, library, None)
    with pytest.raises(ConfigError) as e:
        DoorRelay(RelayConfig(pin_factory="default"))
    msg = str(e.value)
    assert msg.startswith("relay.pin_factory default: gpiozero found no way to drive pins on this machine "
                          "(Unable to load any default pin factory! Falling back from lgpio: "), msg
    assert msg.endswith("a board that is not a Raspberry Pi needs relay.backend gpiod") and "\n" not in msg


# ------------------------------------------------------------------ refused at start, audited
def test_a_relay_that_cannot_be_set_up_stops_the_gate_audited(tmp_path):
    """Through the service: no start, never READY, the refusal and the stop on record."""
    from edge.service import Notifier, run_service
    from reliability.fakes import NotifySocket

    cfg = fake_config(tmp_path)
    systemd = NotifySocket()
    with simulated_relay("gpiod", cfg.relay):
        cfg.relay.chip = "/dev/gpiochip9"
        with pytest.raises(ConfigError, match=r"^relay\.chip /dev/gpiochip9: not a GPIO chip device"):
            run_service(cfg, verbose=False, notifier=Notifier(systemd.path))
    systemd.close()
    assert [m for _, m in systemd.messages] == ["STOPPING=1"]
    rows = audit_rows(cfg.storage.audit)
    assert [(r["kind"], r["reason"]) for r in rows] == [("relay", "refused"), ("service", "stopped")]
    assert json.loads(rows[0]["details"])["error"].startswith("relay.chip /dev/gpiochip9: not a GPIO chip device")


def test_edge_run_with_a_pin_gpiozero_refuses_exits_2_with_one_line(tmp_path):
    from reliability.common import REPO

    (tmp_path / "gate.yaml").write_text(f"relay: {{pin: GPIO99, pin_factory: mock}}\n"
                                        f"storage: {{audit: {tmp_path / 'audit.sqlite3'}}}\n")
    r = subprocess.run([sys.executable, "-m", "edge", "run", "--config", str(tmp_path / "gate.yaml")], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr == "error: relay.pin 'GPIO99': gpiozero refused it (PinInvalidPin: GPIO99 is not a valid pin name)\n"
    rows = audit_rows(tmp_path / "audit.sqlite3")
    assert [(r["kind"], r["reason"]) for r in rows] == [("relay", "refused"), ("service", "stopped")]


# ------------------------------------------------------------------ config
def write(tmp_path, text):
    (tmp_path / "gate.yaml").write_text(text)
    return tmp_path / "gate.yaml"


def test_mock_pins_with_a_real_camera_are_refused(tmp_path):
    """A gate that grants real faces but drives simulated pins opens no door: check-config refuses it."""
    for source in ("opencv", "picamera2"):
        with pytest.raises(ConfigError, match=rf"gate\.yaml: relay\.pin_factory mock drives simulated pins, not a "
                                              rf"door: with camera\.source {source} the gate would grant real faces"):
            load_config(write(tmp_path, f"camera: {{source: {source}}}\nrelay: {{pin_factory: mock}}\n"))
    assert load_config(write(tmp_path, "camera: {source: replay}\nrelay: {pin_factory: mock}\n")).relay.pin_factory == "mock"
    cfg = load_config(write(tmp_path, "camera: {source: opencv}\nrelay: {pin_factory: default}\n"))
    assert cfg.relay.pin_factory == "default"


def test_gpiod_config_needs_a_line_and_an_offset_needs_its_chip(tmp_path):
    with pytest.raises(ConfigError, match=r"gate\.yaml: relay\.line: relay\.backend gpiod needs"):
        load_config(write(tmp_path, "relay: {backend: gpiod, chip: /dev/gpiochip0}\n"))
    with pytest.raises(ConfigError, match=r"gate\.yaml: relay\.chip: relay\.line 105 is an offset"):
        load_config(write(tmp_path, "relay: {backend: gpiod, line: 105}\n"))
    with pytest.raises(ConfigError, match=r"relay\.line"):
        load_config(write(tmp_path, "relay: {backend: gpiod, chip: /dev/gpiochip0, line: -1}\n"))
    cfg = load_config(write(tmp_path, "relay: {backend: gpiod, chip: /dev/gpiochip0, line: 105}\n")).relay
    assert (cfg.chip, cfg.line) == ("/dev/gpiochip0", 105)
    assert load_config(write(tmp_path, "relay: {backend: gpiod, line: PQ.06}\n")).relay.line == "PQ.06"


# ------------------------------------------------------------------ the fake against the real package
def real_gpiod():
    try:
        return importlib.import_module("gpiod")
    except ImportError:
        pytest.skip("the gpiod package (requirements.txt) is not installed: the fake is checked against it when it is")


def shape(sig: inspect.Signature) -> list[tuple]:
    """Parameter names, kinds, defaults (an enum member by its name) and annotations (without
    module prefixes), comparable between the fake and the real package."""
    def text(a):
        a = a if isinstance(a, str) else inspect.formatannotation(a)
        return re.sub(r"\b(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_])", "", a)

    return [(p.name, p.kind, p.default.name if isinstance(p.default, Enum) else p.default, text(p.annotation))
            for p in sig.parameters.values()]


def test_the_fake_gpiod_mirrors_the_real_packages_signatures():
    gpiod = real_gpiod()
    real_line = importlib.import_module("gpiod.line")
    assert set(fake_gpiod.API) <= set(gpiod.__all__)
    for name in ("is_gpiochip_device", "request_lines"):
        assert shape(inspect.signature(fake_gpiod.API[name])) == shape(inspect.signature(getattr(gpiod, name))), name
    for cls, methods in ((fake_gpiod.Chip, ("__init__", "__enter__", "__exit__", "close", "get_info",
                                            "line_offset_from_id", "request_lines")),
                         (fake_gpiod.LineRequest, ("__bool__", "__enter__", "__exit__", "release", "set_value"))):
        for m in methods:
            real = getattr(getattr(gpiod, cls.__name__), m)
            assert shape(inspect.signature(getattr(cls, m))) == shape(inspect.signature(real)), f"{cls.__name__}.{m}"
    assert shape(inspect.signature(fake_gpiod.ChipInfo)) == shape(inspect.signature(gpiod.ChipInfo))
    real_settings = {p[0]: p for p in shape(inspect.signature(gpiod.LineSettings))}
    for p in shape(inspect.signature(fake_gpiod.LineSettings)):  # a subset: the fields the relay sets
        assert real_settings[p[0]] == p, p
    for name, enum in fake_gpiod.LINE_API.items():
        assert [m.name for m in enum] == [m.name for m in getattr(real_line, name)], name
    assert [bool(v) for v in fake_gpiod.Value] == [bool(v) for v in real_line.Value]


def test_the_real_gpiod_package_on_a_chip_this_machine_lacks_gives_a_config_error(tmp_path):
    """The real bindings (no fake): a chip path that is not a GPIO chip, a name no chip has."""
    real_gpiod()
    with pytest.raises(ConfigError, match=rf"^relay\.chip {tmp_path}/gpiochip0: not a GPIO chip device"):
        DoorRelay(RelayConfig(backend="gpiod", chip=str(tmp_path / "gpiochip0"), line=17))
    with pytest.raises(ConfigError, match=r"^relay\.line 'FACEGATE-NO-SUCH-LINE': no line of that name on "):
        DoorRelay(RelayConfig(backend="gpiod", line="FACEGATE-NO-SUCH-LINE"))
