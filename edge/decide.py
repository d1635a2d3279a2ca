"""Decision policy per tracked face: k of the last n frames agree, liveness and quality pass;
cooldown after a grant, back-off after repeated denials. Every timer runs on the monotonic clock
(a wall-clock jump must not open the door or cut a back-off short)."""
from __future__ import annotations

from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .detect import iou
from .records import Decision, Detection


@dataclass
class Observation:
    """What one frame said about one tracked face."""

    outcome: str  # "match", "unknown", "quality:<code>", "liveness", "margin"
    identity: str | None = None
    score: float | None = None
    runner_up_score: float | None = None
    threshold: float | None = None
    liveness: float | None = None


@dataclass
class Track:
    track_id: int
    box: tuple[float, float, float, float]
    last_seen: float
    history: deque = field(default_factory=deque)
    embeddings: deque = field(default_factory=lambda: deque(maxlen=10))  # for multi-frame fusion (match.track_frames)
    quality_refused: int = 0  # consecutive faces refused on quality (quality.patience_frames)


def choose_faces(dets: list[Detection], frame_shape, policy: str, max_faces: int) -> tuple[list[Detection], str | None]:
    """Crowd policy. 'deny': more than max_faces in view denies everyone (anti-tailgating).
    'largest': judge only the largest face, ties broken by nearness to the frame centre."""
    if not dets:
        return [], None
    if policy == "deny" and len(dets) > max_faces:
        return [], "crowd"
    h, w = frame_shape[:2]

    def key(d: Detection):
        cx, cy = d.centre
        return (-d.size, np.hypot(cx - w / 2, cy - h / 2))

    return [min(dets, key=key)], None


class DecisionPolicy:
    def __init__(self, cfg, refusal: Callable[[str, float], str | None]):
        """`refusal(identity, t_wall)`: None while that enrolment holds at that wall time, else the
        reason its grant becomes a denial ("expired", "clock_untrusted")."""
        self.cfg = cfg
        self.refusal = refusal
        self.tracks: dict[int, Track] = {}
        self._next_id = 1
        self.last_grant: dict[str, float] = {}
        self.consecutive_denials = 0
        self.backoff_until = float("-inf")
        self.backoff_level = 0

    # -------------------------------------------------------------- tracking
    def track_for(self, det: Detection, now: float) -> Track:
        for tid in [t for t, tr in self.tracks.items() if now - tr.last_seen > self.cfg.track_timeout_s]:
            del self.tracks[tid]
        box = np.asarray(det.box, np.float64)
        best, best_iou = None, self.cfg.track_iou
        for tr in self.tracks.values():
            o = float(iou(box, np.asarray([tr.box]))[0])
            if o >= best_iou:
                best, best_iou = tr, o
        if best is None:
            best = Track(self._next_id, det.box, now, deque(maxlen=self.cfg.n))
            self.tracks[best.track_id] = best
            self._next_id += 1
        best.box, best.last_seen = det.box, now
        return best

    def in_backoff(self, now: float) -> bool:
        return now < self.backoff_until

    # -------------------------------------------------------------- policy
    def update(self, track: Track, obs: Observation, now: float, t_wall: float) -> Decision:
        base = dict(track_id=track.track_id, t_mono=now, t_wall=t_wall, identity=obs.identity, score=obs.score,
                    runner_up_score=obs.runner_up_score, threshold=obs.threshold, liveness=obs.liveness)
        if self.in_backoff(now):
            return Decision(False, "backoff", details={"until_s": round(self.backoff_until - now, 1)}, **base)
        track.history.append(obs)
        matches = Counter(o.identity for o in track.history if o.outcome == "match")
        if matches:
            ident, votes = matches.most_common(1)[0]
            # A track whose frames name two different people is not sure of anyone: no grant.
            if votes >= self.cfg.k and len(matches) == 1:
                track.history.clear()
                # Judged where the door would open, on this frame's wall time: votes cast before
                # an expiry carry no grant after it.
                why = self.refusal(ident, t_wall)
                if why is not None:
                    return self._deny(why, now, {**base, "identity": ident})
                last = self.last_grant.get(ident)
                if last is not None and now - last < self.cfg.cooldown_s:
                    return Decision(False, "cooldown", **{**base, "identity": ident})
                self.last_grant[ident] = now
                self.consecutive_denials = 0
                self.backoff_level = 0
                return Decision(True, "granted", details={"votes": votes, "n": self.cfg.n}, **{**base, "identity": ident})
        if len(track.history) < self.cfg.n:
            return Decision(False, "pending", **base)
        # n frames judged and no k agree: one decisive denial, named by its commonest cause.
        reason = Counter(o.outcome for o in track.history).most_common(1)[0][0]
        track.history.clear()
        return self._deny(reason, now, base)

    def _deny(self, reason: str, now: float, base: dict) -> Decision:
        self.consecutive_denials += 1
        details = {"consecutive_denials": self.consecutive_denials}
        if self.consecutive_denials >= self.cfg.backoff_after:
            wait = min(self.cfg.backoff_s * 2 ** self.backoff_level, self.cfg.backoff_max_s)
            self.backoff_until = now + wait
            self.backoff_level += 1
            self.consecutive_denials = 0
            details["backoff_s"] = wait
        return Decision(False, "unknown" if reason == "match" else reason, details=details, **base)

    def frame_denial(self, reason: str, now: float, t_wall: float) -> Decision:
        """A frame with nothing to judge (no face, crowd, error): locked, no track state changes."""
        return Decision(False, reason, t_mono=now, t_wall=t_wall)
