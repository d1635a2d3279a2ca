"""Door relay on gpiozero mock pins: pulse length, hard maximum hold, locked on every way out.

Pin times come from MockPin.assert_states_and_times (deltas between changes, 50 ms tolerance), so
pulses are kept short (0.2 s) to keep the suite fast."""
import time

import pytest

from edge.config import RelayConfig
from edge.relay import DoorRelay, pulse_deadline


@pytest.fixture
def make(mock_factory):
    def make(pulse_s=0.2, max_hold_s=0.3, active_high=True, min_locked_s=0.5):
        cfg = RelayConfig(pin="GPIO17", active_high=active_high, pulse_s=pulse_s, max_hold_s=max_hold_s,
                          min_locked_s=min_locked_s, pin_factory="mock")
        relay = DoorRelay(cfg, pin_factory=mock_factory)
        relay.pin.clear_states()  # t=0 and the locked level from here on
        return relay

    return make


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
        relay.pin.assert_states_and_times([(0.0, False), (0.0, True), (0.2, False)])
        assert len(relay.pin.states) == 3
        assert relay.stats.openings == 1
        assert 0.19 <= relay.stats.longest_unlocked_s < 0.26


def test_overlapping_grant_extends_the_pulse(make):
    with make(pulse_s=0.2, max_hold_s=0.5) as relay:
        relay.unlock()
        time.sleep(0.1)
        relay.unlock()
        wait_locked(relay)
        relay.pin.assert_states_and_times([(0.0, False), (0.0, True), (0.3, False)])
        assert len(relay.pin.states) == 3


def test_overlapping_grants_never_pass_max_hold(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        for _ in range(5):  # a grant every 0.1 s would keep it open for ever without the ceiling
            relay.unlock()
            time.sleep(0.1)
        wait_locked(relay)
        states = list(relay.pin.states)
        assert [s.state for s in states[:3]] == [False, True, False]
        relay.pin.assert_states_and_times([(0.0, False), (0.0, True), (0.3, False)])
        assert relay.stats.longest_unlocked_s < 0.3 + 0.05


def test_grant_after_a_pulse_starts_a_new_opening(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        relay.unlock()
        wait_locked(relay)
        time.sleep(0.5)  # relay.min_locked_s
        relay.unlock()
        wait_locked(relay)
        relay.pin.assert_states_and_times([(0.0, False), (0.0, True), (0.2, False), (0.5, True), (0.2, False)])
        assert len(relay.pin.states) == 5
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
        changes = list(relay.pin.states)[1:]  # each with the time since the change before it
        held = [s.timestamp for s in changes if not s.state]
        relocked = [s.timestamp for s in changes[1:] if s.state]
        assert len(held) == 3  # at 0, 0.8 and 1.6 s: open 0.3 s (the ceiling), locked 0.5 s
        assert all(h <= 0.3 + 0.05 for h in held) and all(r >= 0.5 - 0.02 for r in relocked), (held, relocked)
        assert sum(held) / 2.0 < 0.3 / 0.8 + 0.1  # not 2.0 s of 2.0
        assert refused and all(r.startswith("relocking: ") for r in refused)


def test_the_relock_time_has_a_floor_and_bounds_the_unlocked_share(tmp_path):
    from pydantic import ValidationError

    from edge.config import MAX_UNLOCKED_SHARE, load_config
    from edge.errors import ConfigError

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
        assert not relay.is_unlocked and len(relay.pin.states) == 1
        # a recent one opens for the full pulse from the moment the line changes
        deadline = relay.unlock(now_mono=time.monotonic() - 0.1)
        assert relay.is_unlocked and deadline == pytest.approx(time.monotonic() + 0.2, abs=0.03)
        wait_locked(relay)
        relay.pin.assert_states_and_times([(0.0, False), (0.0, True), (0.2, False)])


def test_lock_forces_locked(make):
    with make(pulse_s=0.2, max_hold_s=0.3) as relay:
        relay.unlock()
        relay.lock()
        assert not relay.is_unlocked
        assert relay.pin.state is False
        time.sleep(0.3)
        assert len(relay.pin.states) == 3  # the timer does not toggle it again


def test_close_locks_and_releases_the_pin(make):
    relay = make()
    relay.unlock()
    pin = relay.pin
    relay.close()
    assert pin.state is False
    assert pin.function == "input"
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
    assert pin.state is False


def test_exception_inside_unlock_leaves_it_locked(make):
    relay = make()
    real_on = relay._device.on

    def on_then_fail():
        real_on()  # the line went high, then the driver reported an error
        raise OSError("GPIO write failed")

    relay._device.on = on_then_fail
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
        pin.assert_states_and_times([(0.0, True), (0.0, False), (0.2, True)])
        assert len(pin.states) == 3


def test_pulse_longer_than_ceiling_is_refused(mock_factory):
    cfg = RelayConfig(pulse_s=3.0, max_hold_s=5.0, pin_factory="mock")
    cfg.pulse_s = 6.0  # validate_assignment bounds each field, not the pair
    with pytest.raises(ValueError):
        DoorRelay(cfg, pin_factory=mock_factory)
