"""Trusted time (edge.clock): the wall clock judged against the time floor, the newest wall time
the gate has audited on a trusted clock. Hand-computed cases; D is one day, F the floor."""
import time

import pytest

from edge.audit import AuditLog
from edge.clock import MAX_AHEAD_S, TrustedClock, expiry_time, reading, validity
from edge.errors import FacegateError

D = 86400.0
F = 1.8e9  # 2027-01-15


def test_expiry_time_never_goes_below_the_floor_and_ignores_a_clock_far_ahead():
    assert expiry_time(F + 3600, F) == F + 3600  # a right clock
    assert expiry_time(1000.0, F) == F  # a Pi booted at 1970
    assert expiry_time(F - 30 * D, F) == F  # a clock set back a month
    assert expiry_time(F + 2 * D, F) == F + 2 * D  # the bound itself is still trusted
    assert expiry_time(F + 2 * D + 1, F) == F  # beyond it: the floor alone
    assert MAX_AHEAD_S == 2 * D


def test_validity_a_clock_set_back_revives_no_one_and_a_clock_ahead_expires_no_one():
    assert validity(None, 5 * F, F) is None
    assert validity(F - D, F - 30 * D, F) == "expired"  # ended before the floor: set-back clock changes nothing
    assert validity(F + D, F - 30 * D, F) is None
    assert validity(F + D, F + 1.5 * D, F) == "expired"  # within the bound: the wall clock counts
    assert validity(F + D, F + 3650 * D, F) == "clock_untrusted"  # only the jumped clock ends it: locked, not expired
    assert validity(F - D, F + 3650 * D, F) == "expired"
    assert validity(F + 4000 * D, F + 3650 * D, F) is None


def test_readings_and_the_floor_carried_by_the_monotonic_clock():
    assert [reading(w, F) for w in (F, F + 2 * D, F + 2 * D + 1, F - D, F - D - 1)] == \
        ["ok", "ok", "ahead", "ok", "behind"]
    c = TrustedClock(F, mono=100.0)
    assert c.observe(F + 3 * D, 100.0) is False and c.state == "ahead" and c.floor == F  # never raised by it
    assert c.observe(F + 10.0, 110.0) is True and c.floor == F + 10.0
    assert c.observe(1000.0, 3 * D + 110.0) is False and c.state == "behind"
    assert c.floor == F + 10.0 + 3 * D  # three days on the monotonic clock: real time is past them
    assert c.observe(F + 5 * D, 3 * D + 120.0) is True  # a gate running three days is not "ahead"
    fresh = TrustedClock(None, mono=0.0)
    assert fresh.observe(1000.0, 1.0) is False and fresh.state == "behind"
    assert fresh.observe(F, 2.0) is True and fresh.floor == F  # the first set clock becomes the floor


def test_the_floor_is_the_newest_synced_row_of_the_audit_log(tmp_path):
    path = tmp_path / "audit.sqlite3"
    now = time.time()
    with AuditLog(path) as a:
        assert a.clock.floor < now - 1e6  # nothing audited: the epoch, and the first set clock is trusted
        a.record_event("service", "started", t_wall=now)
        a.record_event("service", "started", t_wall=now + 3650 * D)  # a jump: unsynced, not the floor
        a.record_event("service", "started", t_wall=1000.0)
    with AuditLog(path) as a:
        assert [r["wall_clock_synced"] for r in a.tail(3)] == [True, False, False]
        assert a.clock.floor == pytest.approx(now)


def test_an_enrolment_at_1970_is_stamped_with_the_floor_and_one_far_ahead_is_refused(tmp_path):
    from edge.enroll import EnrollResult, apply
    from edge.gallery import Gallery

    import numpy as np

    now = time.time()
    with AuditLog(tmp_path / "audit.sqlite3") as a:
        assert a.clock.enrolment_time(now) == now  # nothing audited yet: a set clock is taken as it is
        with pytest.raises(FacegateError, match="never set"):
            a.clock.enrolment_time(1000.0)
        a.record_event("service", "started", t_wall=now)
    with AuditLog(tmp_path / "audit.sqlite3") as a:
        at = a.clock.enrolment_time(1000.0)
        assert at == pytest.approx(now)
        g = Gallery("x", 4)
        apply(g, [EnrollResult("alice", "a.jpg", True, "enrolled", np.ones(4, np.float32))], 30, now=at)
        assert g.people[0].expires_at == pytest.approx(now + 30 * D)  # not 1970 + 30 days: it does not vanish
        with pytest.raises(FacegateError, match="days beyond the newest audited time"):
            a.clock.enrolment_time(now + 400 * D)
        assert a.clock.enrolment_time(now + 60) == now + 60


def test_a_new_photo_of_someone_enrolled_keeps_their_id_card_and_end():
    from edge.enroll import EnrollResult, apply
    from edge.gallery import Gallery, Person

    import numpy as np

    now = time.time()
    g = Gallery("x", 4)
    g.add(Person("alice", np.ones(4, np.float32), "emp-1", now - D, now + 5 * D, card="4242"))
    g.add(Person("bob", np.ones(4, np.float32), "emp-2", now - D, None, card="77"))
    photo = np.array([1, 0, 0, 0], np.float32)
    got = apply(g, [EnrollResult(n, f"{n}.jpg", True, "enrolled", photo) for n in ("alice", "bob", "carol")], 30,
                now=now)
    assert got == 3
    people = {p.name: p for p in g.people}
    assert len(people) == 3 and all(np.allclose(p.embedding, photo) for p in people.values())  # new photos
    assert (people["alice"].person_id, people["alice"].card, people["alice"].expires_at) == ("emp-1", "4242", now + 5 * D)
    assert (people["bob"].person_id, people["bob"].card, people["bob"].expires_at) == ("emp-2", "77", now + 30 * D)
    assert (people["carol"].person_id, people["carol"].card, people["carol"].enrolled_at) == ("", "", now)


def test_trust_clock_moves_the_floor_audited(tmp_path, capsys):
    from edge.__main__ import main

    path = tmp_path / "audit.sqlite3"
    with AuditLog(path) as a:
        a.record_event("service", "started", t_wall=time.time() - 30 * D)  # the gate was off a month
    (tmp_path / "c.yaml").write_text("storage: {audit: audit.sqlite3}\n")
    assert main(["trust-clock", "--config", str(tmp_path / "c.yaml")]) == 0
    with AuditLog(path) as a:
        assert a.clock.floor == pytest.approx(time.time(), abs=60)
        row = a.tail(1)[0]
        assert (row["kind"], row["reason"], row["wall_clock_synced"]) == ("clock", "trusted", True)
