"""The OSDP reader (edge.osdp) against libosdp's own control panel on the other end of a
pseudo-terminal pair (evaluation.osdp_bench.PtyPanel): the reader opens the pty's slave end as its
serial port and sets its line discipline, as on an RS-485 adapter; nothing of the protocol is
mocked. Card reads with and without Secure Channel, the panel's LED and buzzer commands, pairing in
install mode, and each way a card read is not sent."""
from __future__ import annotations

import os
import time

import pytest

pytest.importorskip("osdp", reason="libosdp (requirements.txt) is not installed")

from gpiozero.pins.mock import MockFactory  # noqa: E402
from osdp import CardFormat, Command, CommandLEDColor, Event  # noqa: E402

from edge.config import Config, OsdpConfig, load_config  # noqa: E402
from edge.errors import ConfigError  # noqa: E402
from edge.osdp import LightPattern, OsdpReader, card_data, read_scbk  # noqa: E402
from edge.records import Grant  # noqa: E402
from evaluation.osdp_bench import PtyPanel  # noqa: E402

CARD = "12345678"


def key_file(folder, key: bytes, mode: int = 0o600):
    path = folder / "osdp.scbk"
    path.write_text(key.hex() + "\n")
    path.chmod(mode)
    return path


def grant(card: str = CARD, age_s: float = 0.0) -> Grant:
    return Grant("alice", card, time.monotonic() - age_s, time.time(), 7)


def card_reads(panel, wait: int = 0) -> list[dict]:
    """The card reads the panel has received, once it has `wait` of them (or after 2 s): the
    reader's 'sent' is its reply on the wire, which the panel's loop reads a moment later."""
    panel.wait_for(lambda: len([e for _, e in panel.reads if e["event"] == Event.CardRead]) >= wait, 2.0)
    return [e for _, e in panel.reads if e["event"] == Event.CardRead]


@pytest.fixture
def plain(tmp_path):
    """A panel without Secure Channel and a reader set up for plain text, both online."""
    with PtyPanel() as panel, OsdpReader(OsdpConfig(port=panel.port, secure=False)) as reader:
        assert panel.wait_for(panel.online), "the panel never brought the reader online"
        yield panel, reader


@pytest.fixture
def secure(tmp_path):
    key = os.urandom(16)
    with PtyPanel(scbk=key) as panel, \
            OsdpReader(OsdpConfig(port=panel.port, scbk_file=str(key_file(tmp_path, key)))) as reader:
        assert panel.wait_for(panel.secure), "no Secure Channel between panel and reader"
        yield panel, reader


# ------------------------------------------------------------------ card data and key file
def test_a_card_number_is_sent_as_its_bits_left_aligned():
    assert card_data("1", "decimal", 26) == bytes([0, 0, 0, 0x40])  # bit 26 of 26 is bit 6 of the 4th byte
    assert card_data("12345678", "decimal", 32) == (12345678).to_bytes(4, "big")
    assert card_data("0BC614E", "hex", 28) == (0xBC614E << 4).to_bytes(4, "big")
    assert card_data("67108863", "decimal", 26) == bytes([0xFF, 0xFF, 0xFF, 0xC0])  # 26 ones


@pytest.mark.parametrize("card, number, bits, problem", [
    ("67108864", "decimal", 26, "needs 27 bits, more than door.osdp.card_bits 26"),
    ("12AB", "decimal", 26, "not a decimal number"),
    ("XYZ", "hex", 26, "not a hex number"),
])
def test_a_card_number_that_is_no_number_or_too_long_is_refused(card, number, bits, problem):
    with pytest.raises(ValueError, match=problem):
        card_data(card, number, bits)


def test_the_key_file_must_be_owner_only_and_32_hex_digits(tmp_path):
    key = os.urandom(16)
    assert read_scbk(key_file(tmp_path, key)) == key
    with pytest.raises(ConfigError, match=r"group or others \(mode 0644\).*chmod 600"):
        read_scbk(key_file(tmp_path, key, 0o644))
    (tmp_path / "short").write_text("00112233")
    (tmp_path / "short").chmod(0o600)
    with pytest.raises(ConfigError, match="door.osdp.scbk_file.*32 hex digits"):
        read_scbk(tmp_path / "short")
    with pytest.raises(ConfigError, match="not found"):
        read_scbk(tmp_path / "missing")
    assert read_scbk(tmp_path / "missing", missing_ok=True) is None


def test_the_key_comes_from_systemds_credentials_when_no_file_is_named(tmp_path, monkeypatch):
    key = os.urandom(16)
    (tmp_path / "osdp.scbk").write_text(key.hex())
    (tmp_path / "osdp.scbk").chmod(0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert read_scbk(None) == key
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")
    with pytest.raises(ConfigError, match="LoadCredential=osdp.scbk"):
        read_scbk(None)


def write(tmp_path, text: str):
    (tmp_path / "c.yaml").write_text(text)
    return tmp_path / "c.yaml"


def test_config_osdp_needs_its_port_and_install_mode_a_key_file_to_write(tmp_path):
    assert Config().door.output == "relay"
    with pytest.raises(ConfigError, match="door.osdp.port: door.output osdp needs"):
        load_config(write(tmp_path, "door: {output: osdp}\n"))
    with pytest.raises(ConfigError, match="door.osdp.install_mode.*scbk_file"):
        load_config(write(tmp_path, "door: {output: osdp, osdp: {port: /dev/ttyUSB0, install_mode: true}}\n"))
    with pytest.raises(ConfigError, match="door.osdp.leds"):
        load_config(write(tmp_path, "door: {output: both, osdp: {port: /dev/ttyUSB0, leds: {purple: GPIO5}}}\n"))
    cfg = load_config(write(tmp_path, "door: {output: both, osdp: {port: /dev/ttyUSB0, scbk_file: k.scbk}}\n"))
    assert cfg.door.drives_relay and cfg.door.sends_osdp and cfg.door.osdp.baud == 9600


def test_a_port_that_is_not_a_serial_port_is_refused_naming_the_field(tmp_path):
    (tmp_path / "file").write_text("")
    with pytest.raises(ConfigError, match=r"door.osdp.port .*file: not a serial port"):
        OsdpReader(OsdpConfig(port=str(tmp_path / "file"), secure=False))
    with pytest.raises(ConfigError, match=r"door.osdp.port /dev/nonexistent-tty: cannot be opened"):
        OsdpReader(OsdpConfig(port="/dev/nonexistent-tty", secure=False))


# ------------------------------------------------------------------ card reads at the panel
def test_a_grant_reaches_the_panel_as_a_card_read_without_secure_channel(plain):
    panel, reader = plain
    outcome = reader.act(grant())
    assert (outcome.output, outcome.done, outcome.reason) == ("osdp", True, "card_read_sent"), outcome
    assert outcome.details["secure_channel"] is False and "card" not in str(outcome.details)
    (read,) = card_reads(panel, 1)
    assert read == {"event": Event.CardRead, "reader_no": 0, "format": CardFormat.Wiegand, "direction": 0,
                    "length": 26, "data": card_data(CARD, "decimal", 26)}


def test_a_grant_reaches_the_panel_as_a_card_read_over_secure_channel(secure):
    panel, reader = secure
    assert reader.secure_channel
    outcome = reader.act(grant())
    assert outcome.done and outcome.reason == "card_read_sent" and outcome.details["secure_channel"] is True
    assert [r["data"] for r in card_reads(panel, 1)] == [card_data(CARD, "decimal", 26)]
    assert ("secure_channel_active", {}) in reader.pop_events()


def test_a_secure_reader_sends_nothing_to_a_panel_without_its_key(tmp_path):
    with PtyPanel(scbk=os.urandom(16)) as panel, \
            OsdpReader(OsdpConfig(port=panel.port, scbk_file=str(key_file(tmp_path, os.urandom(16))))) as reader:
        time.sleep(1.5)  # the panel's challenge fails: it never gets the reader online
        outcome = reader.act(grant())
        assert not panel.online() and not reader.secure_channel
        assert not outcome.done and outcome.reason == "not_sent", outcome
        assert card_reads(panel) == []


def test_a_secure_reader_refuses_a_plain_text_panel(tmp_path):
    with PtyPanel() as panel, \
            OsdpReader(OsdpConfig(port=panel.port, scbk_file=str(key_file(tmp_path, os.urandom(16))))) as reader:
        time.sleep(1.5)
        assert not panel.online()
        assert not reader.act(grant()).done and card_reads(panel) == []


def test_a_person_without_a_card_number_sends_nothing(plain):
    panel, reader = plain
    outcome = reader.act(grant(card=""))
    assert (outcome.done, outcome.reason, outcome.details) == (False, "not_sent", {"why": "no card number to send"})
    time.sleep(0.3)
    assert card_reads(panel) == []


def test_a_stale_grant_sends_nothing(plain):
    panel, reader = plain
    outcome = reader.act(grant(age_s=2.0))  # a stalled loop catching up: the person may be gone
    assert not outcome.done and outcome.details["why"].startswith("grant 2.0")
    time.sleep(0.3)
    assert card_reads(panel) == []


def test_a_card_read_the_panel_does_not_take_in_time_is_withdrawn_not_sent_later(tmp_path):
    """The panel stops polling (a bus fault, a panel rebooting): the reader still counts as online
    for libosdp's 8 s, so the grant waits door.osdp.timeout_s, then withdraws its card read. When
    the panel comes back it must not receive it: the person is long gone."""
    with PtyPanel() as panel, \
            OsdpReader(OsdpConfig(port=panel.port, secure=False, timeout_s=0.3)) as reader:
        assert panel.wait_for(panel.online)
        panel.cp.stop()
        t0 = time.monotonic()
        outcome = reader.act(grant())
        assert 0.25 <= time.monotonic() - t0 < 1.0
        assert not outcome.done and "withdrawn" in outcome.details["why"], outcome
        panel.cp.start()  # the panel back on the line
        assert panel.wait_for(panel.online)
        time.sleep(0.5)
        assert card_reads(panel) == []
        assert reader.act(grant()).done and len(card_reads(panel, 1)) == 1  # and the next grant goes through


def test_after_a_shutdown_lock_no_card_read_is_sent(plain):
    panel, reader = plain
    reader.lock(stay=True)
    assert reader.act(grant()).details == {"why": "locked for shutdown"}
    time.sleep(0.3)
    assert card_reads(panel) == []


# ------------------------------------------------------------------ the panel's commands
def led(temporary: bool, on: int, off: int = CommandLEDColor.Black, on_count: int = 1, off_count: int = 0,
        timer_count: int = 0, control_code: int | None = None) -> dict:
    """An osdp_LED command as libosdp's panel takes it; the default is a steady light (an off
    count of 0: libosdp refuses a command with both counts 0)."""
    cmd = {"command": Command.LED, "reader": 0, "led_number": 0, "temporary": temporary,
           "control_code": control_code if control_code is not None else (2 if temporary else 1),
           "on_color": on, "off_color": off, "on_count": on_count, "off_count": off_count}
    if temporary:
        cmd["timer_count"] = timer_count
    return cmd


def test_the_panels_led_commands_are_recorded_and_audited_without_led_hardware(plain):
    panel, reader = plain
    assert panel.command(led(False, CommandLEDColor.Red))
    assert panel.wait_for(lambda: reader.indicators.shown()[0].on_color == "red", 3)
    assert panel.command(led(True, CommandLEDColor.Green, on_count=2, off_count=3, timer_count=10))
    assert panel.wait_for(lambda: reader.indicators.shown()[1], 3)
    assert reader.indicators.shown()[0] == LightPattern("green", "black", 0.2, 0.3)
    events = reader.pop_events()
    assert ("led", {"temporary": False, "on_color": "red", "off_color": "black", "on_s": 0.1, "off_s": 0.0}) in events
    assert ("led", {"temporary": True, "on_color": "green", "off_color": "black", "on_s": 0.2, "off_s": 0.3,
                    "for_s": 1.0}) in events
    assert panel.wait_for(lambda: not reader.indicators.shown()[1], 3)  # the timer ran out: red again
    assert reader.indicators.shown()[0].on_color == "red"


def test_the_panels_led_and_buzzer_commands_drive_the_configured_pins(tmp_path):
    factory = MockFactory()
    cfg = OsdpConfig(secure=False, leds={"red": "GPIO27", "green": "GPIO22"}, buzzer="GPIO5")
    with PtyPanel() as panel:
        cfg.port = panel.port
        with OsdpReader(cfg, factory) as reader:
            red, green, buzzer = (factory.pin(n) for n in (27, 22, 5))
            assert panel.wait_for(panel.online)
            assert panel.command(led(False, CommandLEDColor.Red))
            assert panel.wait_for(lambda: red.state and not green.state, 3)
            assert panel.command(led(True, CommandLEDColor.Green, timer_count=5))  # 0.5 s of green
            assert panel.wait_for(lambda: green.state and not red.state, 3)
            assert panel.wait_for(lambda: red.state and not green.state, 3)  # back to red after the timer
            assert panel.command({"command": Command.Buzzer, "reader": 0, "control_code": 2, "on_count": 1,
                                  "off_count": 1, "rep_count": 2})
            assert panel.wait_for(lambda: any(s.state for s in buzzer.states), 3)
            assert ("buzzer", {"tone": "on", "on_s": 0.1, "off_s": 0.1, "repeat": 2}) in reader.pop_events()
        assert not red.state and not green.state  # closed: dark


def test_a_command_for_an_led_this_reader_lacks_is_refused(plain):
    panel, reader = plain
    cmd = led(False, CommandLEDColor.Red)
    cmd["led_number"] = 3
    assert panel.command(cmd)
    time.sleep(0.5)
    assert reader.indicators.shown()[0].on_color == "black"


def test_install_mode_takes_the_key_the_panel_sets_and_the_reader_then_runs_on_it(tmp_path):
    key = os.urandom(16)
    stored = tmp_path / "osdp.scbk"
    with PtyPanel(scbk=key, pairing=True) as panel, \
            OsdpReader(OsdpConfig(port=panel.port, scbk_file=str(stored), install_mode=True)) as reader:
        assert panel.wait_for(lambda: stored.exists() and panel.secure())
        assert ("key_set", {"file": str(stored)}) in reader.pop_events()
    assert read_scbk(stored) == key and stored.stat().st_mode & 0o777 == 0o600
    with PtyPanel(scbk=key) as panel, OsdpReader(OsdpConfig(port=panel.port, scbk_file=str(stored))) as reader:
        assert panel.wait_for(panel.secure)
        assert reader.act(grant()).done


def test_without_install_mode_a_panel_cannot_change_the_key(secure, tmp_path):
    panel, reader = secure
    before = (tmp_path / "osdp.scbk").read_text()
    assert panel.command({"command": Command.Keyset, "type": 1, "data": os.urandom(16)})
    assert panel.wait_for(lambda: any(r == "key_refused" for r, _ in reader.pop_events()), 3)
    assert (tmp_path / "osdp.scbk").read_text() == before


def test_a_panels_command_to_move_the_reader_to_another_address_or_speed_is_refused_and_audited(plain):
    """door.osdp.address and baud are the config's: a reader that followed osdp_COMSET would be
    lost to the panel at its next start, when it comes up at the configured ones again."""
    panel, reader = plain
    assert panel.command({"command": Command.Comset, "address": 5, "baud_rate": 19200})
    assert panel.wait_for(lambda: ("command_refused", {"command": Command.Comset}) in reader.pop_events(), 3)


def test_a_flood_of_panel_commands_is_audited_up_to_a_bound_and_counted(plain):
    """Each LED change waits for the gate's loop to audit it: a panel sending changes faster than
    that fills the queue to its bound, and the rest are counted, not kept (nor fsync'd one by one)."""
    _, reader = plain
    reader.pop_events()
    colors = [CommandLEDColor.Red, CommandLEDColor.Green]
    for i in range(100):  # as libosdp calls the handler, one command after another
        assert reader._command(led(False, colors[i % 2])) == (0, None)
    events = reader.pop_events()
    assert [r for r, _ in events].count("led") == 64
    assert events[-1] == ("commands_not_audited", {"count": 36})
    assert reader.pop_events() == []


def test_check_config_reads_the_secure_channel_key_as_the_gate_does(tmp_path):
    from edge.__main__ import main

    key = key_file(tmp_path, os.urandom(16), 0o644)
    cfg = write(tmp_path, f"door: {{output: osdp, osdp: {{port: /dev/ttyUSB0, scbk_file: {key}}}}}\n")
    assert main(["check-config", str(cfg)]) == 2  # open to others: refused before the gate would start
    key.chmod(0o600)
    assert main(["check-config", str(cfg)]) == 0
