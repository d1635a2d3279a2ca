"""Trusted wall time for a gate that has no real-time clock and no network.

A Pi boots with its clock at 1970 or at the time it last saved, and nothing on a gate with no
network corrects it, so the wall clock alone cannot say whether an enrolment has expired. The
gate keeps a time floor instead: the newest wall time it has audited on a trusted clock (the
audit log's rows flagged wall_clock_synced), carried forward by the monotonic clock while it
runs. Real time is never below the floor, so:

- a clock behind the floor (set back, or not set at all) is judged at the floor: an expired
  person stays expired;
- a clock more than MAX_AHEAD_S beyond the floor is untrusted: it expires no one. A person it
  alone would expire is denied "clock_untrusted" (locked, not revived and not dropped), its rows
  are audited unsynced and never raise the floor, so setting the clock right undoes it. An
  operator who knows the clock is right says so (`python -m edge trust-clock`).
"""
from __future__ import annotations

from .errors import FacegateError

WALL_CLOCK_EPOCH = 1704067200.0  # 2024-01-01T00:00:00Z: a clock before this was never set
# A gate off for a long weekend starts this far beyond its floor with a right clock; further
# than this the clock is more likely wrong than the gate was off, and a wrong clock ahead would
# expire everyone.
MAX_AHEAD_S = 2 * 86400.0
# Behind the floor by more than this, the readings are not audited as synced. Validity is judged
# at the floor whatever this is.
MAX_BEHIND_S = 86400.0


def expiry_time(wall: float, floor: float) -> float:
    """The time enrolments are expired at: the wall clock, never below the floor, and the floor
    alone when the wall clock is untrusted (more than MAX_AHEAD_S beyond it)."""
    return floor if wall > floor + MAX_AHEAD_S else max(wall, floor)


def validity(expires_at: float | None, wall: float, floor: float) -> str | None:
    """None while an enrolment ending at `expires_at` holds; "expired" once it has ended at
    trusted time; "clock_untrusted" when only an untrusted wall clock says it has ended."""
    if expires_at is None:
        return None
    if expires_at <= expiry_time(wall, floor):
        return "expired"
    return "clock_untrusted" if expires_at <= wall else None


def reading(wall: float, floor: float) -> str:
    """"ok", "ahead" (untrusted, expires no one) or "behind" (judged at the floor)."""
    if wall > floor + MAX_AHEAD_S:
        return "ahead"
    return "behind" if wall < floor - MAX_BEHIND_S else "ok"


class TrustedClock:
    """The floor of one process: read from the audit log at start, carried forward by the
    monotonic clock, raised by every trusted reading."""

    def __init__(self, floor: float | None, mono: float):
        self._floor = floor  # None: nothing audited yet; the first set clock becomes the floor
        self._mono = mono
        self.state = "ok"

    @property
    def floor(self) -> float:
        return WALL_CLOCK_EPOCH if self._floor is None else self._floor

    def observe(self, wall: float, mono: float) -> bool:
        """Carry the floor to `mono` and judge the reading; True when it is trusted (it then
        raises the floor and may be audited as synced)."""
        if self._floor is None:
            if wall < WALL_CLOCK_EPOCH:
                self.state = "behind"
                return False
            self._floor, self._mono = wall, mono
        elif mono > self._mono:
            self._floor += mono - self._mono
            self._mono = mono
        self.state = reading(wall, self._floor)
        if self.state == "ok":
            self._floor = max(self._floor, wall)
        return self.state == "ok"

    def trust(self, wall: float, mono: float) -> None:
        """An operator vouches for the wall clock: it becomes the floor."""
        self._floor, self._mono, self.state = wall, mono, "ok"

    def enrolment_time(self, wall: float) -> float:
        """When an enrolment made now starts: the wall clock, never below the floor (a clock at
        1970 must not make enrolments that end once it is set). An untrusted clock ahead would
        make them last too long: refused, as is a clock never set on a gate that has audited nothing."""
        if self._floor is None:
            if wall < WALL_CLOCK_EPOCH:
                raise FacegateError(None, "enrolment refused: the wall clock was never set and nothing has been "
                                          "audited yet to tell the time by: set the clock")
            return wall
        if reading(wall, self.floor) == "ahead":
            raise FacegateError(None, f"enrolment refused: the wall clock is {(wall - self.floor) / 86400:.1f} days beyond the newest audited "
                             f"time: set the clock, or vouch for it with `python -m edge trust-clock`")
        return max(wall, self.floor)
