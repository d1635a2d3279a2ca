"""Each door.output through the real service (run_service, the threaded camera adapter, the SQLite
audit) with a real libosdp control panel on a pty pair (evaluation.osdp_bench.PtyPanel): the
audit comes first in every mode (no door opened, no card read sent without its grant on record),
the relay's limits hold in every mode that drives it, and osdp mode never drives a relay line."""
from __future__ import annotations

import json
import time

import pytest

pytest.importorskip("osdp", reason="libosdp (requirements.txt) is not installed")

import edge.camera as camera_mod  # noqa: E402
from edge.audit import AuditLog  # noqa: E402
from edge.errors import run_cli  # noqa: E402
from edge.osdp import card_data  # noqa: E402
from edge.service import Notifier, run_service  # noqa: E402
from evaluation.osdp_bench import PtyPanel  # noqa: E402
from osdp import Event  # noqa: E402
from reliability.fakes import (ALICE, EMPTY, Device, RelaySpy, audit_rows, fake_config, fake_models,  # noqa: E402
                               patched, unlocked_intervals, write_gallery)
from reliability.relay_stress import TIMER_SLACK_S  # noqa: E402

CARD = "4242"
QUIET = Notifier(address="")


def door_config(tmp_path, output: str, panel: PtyPanel, card: str = CARD):
    cfg = fake_config(tmp_path)  # every frame decisive, no cooldown: a grant on every frame alice is in
    cfg.camera.source = "opencv"
    cfg.door.osdp.port, cfg.door.osdp.secure = panel.port, False
    cfg.door.output = output
    write_gallery(cfg, card)
    return cfg


def reads(panel, wait: int = 0) -> list[dict]:
    """The card reads the panel has received, once it has `wait` of them (or after 2 s): a card
    read is 'sent' when it is on the wire, which the panel's loop reads a moment later."""
    panel.wait_for(lambda: len([e for _, e in panel.reads if e["event"] == Event.CardRead]) >= wait, 2.0)
    return [e for _, e in panel.reads if e["event"] == Event.CardRead]


def camera(script):
    device = Device(script)
    return patched(camera_mod, "make_camera", lambda c: device.open())


class GrantsFillTheDisk:
    """The audit connection of a gate whose disk is full for a grant's row (every other row is
    taken, so the panel comes online and the gate runs until alice is granted)."""

    def __init__(self, conn):
        self._conn = conn

    def execute(self, sql: str, *args):
        if sql.startswith("INSERT") and args and args[0].get("reason") == "granted":
            import sqlite3

            raise sqlite3.OperationalError("database or disk is full")
        return self._conn.execute(sql, *args)

    def __getattr__(self, name):
        return getattr(self._conn, name)


@pytest.mark.parametrize("output", ["relay", "osdp", "both"])
def test_a_grant_the_audit_cannot_take_opens_nothing_and_sends_nothing_in_every_output_mode(tmp_path, output, capsys):
    real_open = AuditLog._open
    with PtyPanel() as panel:
        cfg = door_config(tmp_path, output, panel)
        # two seconds of an empty room first: the panel has the reader online when alice arrives
        with RelaySpy() as spy, fake_models(), camera([(0.0, "ok", EMPTY), (2.0, "ok", ALICE)]), \
                patched(AuditLog, "_open", lambda self: GrantsFillTheDisk(real_open(self))):
            status = run_cli(lambda _: run_service(cfg, verbose=False, notifier=QUIET), None)
        time.sleep(0.3)  # a card read on the wire would have reached the panel by now
        assert status == 5, capsys.readouterr().err
        assert reads(panel) == []
    rows = [(r["kind"], r["reason"]) for r in audit_rows(cfg.storage.audit)]
    assert not any(kind in ("relay", "osdp") and reason in ("door_opened", "card_read_sent") for kind, reason in rows)
    if output == "relay":
        assert unlocked_intervals(spy.relay.line) == [] and not spy.relay.line.state
    else:
        assert ("osdp", "panel_online") in rows  # the panel was there to take a card read
    if output == "osdp":
        assert spy.relays == []  # no relay line is ever taken in osdp mode


def test_osdp_mode_sends_each_grant_as_a_card_read_after_its_row_and_never_drives_a_relay(tmp_path):
    with PtyPanel() as panel:
        cfg = door_config(tmp_path, "osdp", panel)
        with RelaySpy() as spy, fake_models(), camera([(0.0, "ok", EMPTY), (1.5, "ok", ALICE)]):
            assert run_service(cfg, max_frames=80, verbose=False, notifier=QUIET) == 0
        rows = audit_rows(cfg.storage.audit)
        sent = [r for r in rows if (r["kind"], r["reason"]) == ("osdp", "card_read_sent")]
        got = reads(panel, len(sent))
    assert spy.relays == []
    assert len(sent) >= 3 and len(got) == len(sent), (len(got), len(sent))
    assert all(e["data"] == card_data(CARD, "decimal", 26) and e["length"] == 26 for e in got)
    assert not any(r["kind"] == "relay" for r in rows)
    for r in sent:  # each right after its own grant, which was on record first
        grant = next(g for g in reversed(rows[:rows.index(r)]) if g["kind"] == "decision")
        assert (grant["reason"], grant["identity"], grant["track_id"], grant["t_mono"]) == \
               ("granted", "alice", r["track_id"], r["t_mono"])
        assert CARD not in r["details"]  # the card number never goes in the audit
    started = next(r for r in rows if r["reason"] == "started")
    assert json.loads(started["details"])["door"] == "osdp"


def test_osdp_mode_a_person_without_a_card_number_is_audited_and_nothing_is_sent(tmp_path):
    with PtyPanel() as panel:
        cfg = door_config(tmp_path, "osdp", panel, card="")
        with RelaySpy() as spy, fake_models(), camera([(0.0, "ok", EMPTY), (1.5, "ok", ALICE)]):
            assert run_service(cfg, max_frames=60, verbose=False, notifier=QUIET) == 0
        time.sleep(0.3)
        assert reads(panel) == [] and spy.relays == []
    rows = audit_rows(cfg.storage.audit)
    refused = [json.loads(r["details"]) for r in rows if (r["kind"], r["reason"]) == ("osdp", "not_sent")]
    assert refused and all(d == {"why": "no card number to send"} for d in refused)
    assert len(refused) == sum(r["reason"] == "granted" for r in rows)  # every grant, each audited


def test_both_modes_relay_keeps_its_limits_while_every_grant_reaches_the_panel(tmp_path):
    """A grant on every frame: the relay opens at most max_hold_s and then stays locked
    min_locked_s (its limits are the local relay's), while the panel gets a card read for each
    grant, the relocking ones included."""
    with PtyPanel() as panel:
        cfg = door_config(tmp_path, "both", panel)
        cfg.relay.pulse_s, cfg.relay.max_hold_s, cfg.relay.min_locked_s = 0.5, 1.0, 1.0
        with RelaySpy() as spy, fake_models(), camera([(0.0, "ok", EMPTY), (1.5, "ok", ALICE)]):
            assert run_service(cfg, max_frames=150, verbose=False, notifier=QUIET) == 0
            t_end = time.monotonic()
        rows = audit_rows(cfg.storage.audit)
        got = reads(panel, sum((r["kind"], r["reason"]) == ("osdp", "card_read_sent") for r in rows))
    intervals = unlocked_intervals(spy.relay.line, now=t_end)
    assert len(intervals) >= 2 and all(held <= 1.0 + TIMER_SLACK_S for _, held in intervals), intervals
    gaps = [b[0] - (a[0] + a[1]) for a, b in zip(intervals, intervals[1:])]
    assert all(g >= 1.0 - 0.02 for g in gaps), gaps
    assert not spy.relay.line.state
    outcomes = [(r["kind"], r["reason"]) for r in rows if r["kind"] in ("relay", "osdp") and r["identity"]]
    assert ("relay", "not_opened") in outcomes  # grants in the relock time opened nothing here...
    sent = outcomes.count(("osdp", "card_read_sent"))
    assert sent == len(got) > len(intervals)  # ...but each went to the panel
    granted = sum(r["reason"] == "granted" for r in rows)
    assert outcomes.count(("relay", "door_opened")) + outcomes.count(("relay", "not_opened")) == granted
