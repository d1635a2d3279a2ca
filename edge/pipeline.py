"""The gate: wires the stages, one direction only.

Frame -> Detection -> (quality) -> AlignedFace -> liveness -> Embedding -> Match -> Decision -> audit
-> Grant -> door outputs (the relay, the OSDP reader) -> DoorOutcome -> audit

Any exception while handling a frame is a denial with reason "error", audited; a door output is
only ever told to act by a "granted" decision, once its row is on record."""
from __future__ import annotations

import logging
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np

from . import gallery as gallery_io
from .bundle import check_gallery_current
from .clock import TrustedClock, expiry_time, validity
from .cohort import Cohort, as_norm_matrix, load_cohort
from .config import Config, MatchConfig
from .decide import DecisionPolicy, Observation, choose_faces
from .detect import Detector, load_detector
from .embed import Encoder, FusedEncoder, check_twin, enrollment_twin, load_encoder
from .errors import GalleryError
from .liveness import LivenessCheck, NoLiveness
from .match import cosine_scores, identify, track_embedding, verify
from .threshold import OperatingPoint, check_operating_point, operating_points
from .quality import assess_face
from .records import Decision, DoorOutcome, Frame, Grant, Match
from .runtime import Providers
from .search import GalleryIndex

log = logging.getLogger(__name__)

# Frame-level reasons that repeat every frame while nothing changes: audited on change only.
_QUIET = {"no_face", "crowd", "backoff", "pending", "no_card"}


@dataclass
class Stack:
    """The models, loaded once and shared by the gate, enrollment and the evaluations."""

    detector: Detector
    encoder: Encoder | FusedEncoder
    cohort: Cohort | None = None  # match.cohort: AS-norm against this cohort, thresholds from its table
    enroll_flip: bool = False  # match.enroll_flip: enrollment embeds each photo and its mirror image
    enroll_card: str | None = None  # models.enroll_encoder as resolved; None: the door encoder enrolls
    threads: int = 1
    providers: Providers = field(default_factory=Providers)  # models.providers, and the fallbacks met
    _enroller: Encoder | FusedEncoder | None = field(default=None, init=False, repr=False)

    @classmethod
    def from_config(cls, cfg: Config) -> "Stack":
        providers = Providers(cfg.models.providers)
        encoder = load_encoder(cfg.models.encoder, cfg.models.threads, cfg.match.flip, providers)
        cohort = load_cohort(cfg.match.cohort, encoder.sha256, cfg.match.flip) if cfg.match.cohort else None
        twin = enrollment_twin(cfg.models.encoder, cfg.models.enroll_encoder)
        return cls(load_detector(cfg.models.detector, cfg.models.threads, providers), encoder, cohort,
                   cfg.match.enroll_flip, None if twin is None else str(twin), cfg.models.threads, providers)

    def enroller(self) -> Encoder | FusedEncoder:
        """The encoder enrollment photos go through, loaded on first use: the gate itself, which
        never enrolls, does not hold the full-precision models in memory."""
        if self.enroll_card is None:
            return self.encoder
        if self._enroller is None:
            enc = load_encoder(self.enroll_card, self.threads, providers=self.providers)
            check_twin(self.encoder, enc, self.enroll_card)
            self._enroller = enc
        return self._enroller


def impostor_table(stack: Stack) -> tuple[list[float], list[float]]:
    """(FMR, threshold) table of the scores compared: the cohort's (AS-norm scores) when one is
    configured, else the encoder card's (raw cosine)."""
    if stack.cohort is not None:
        return stack.cohort.fmr, stack.cohort.threshold
    cal = stack.encoder.card.calibration
    if cal is None:
        raise GalleryError(None, f"encoder {stack.encoder.card.name} has no calibration in its card: no threshold's "
                                 f"false match rate is known, so the gate cannot run it")
    return cal.fmr, cal.threshold


class Matcher:
    """The gallery as the gate searches it: its thresholds for its size and, with a cohort, the
    enrollees' AS-norm statistics, computed once per gallery."""

    def __init__(self, match: MatchConfig, stack: Stack, g: gallery_io.Gallery, retention_days: int | None = None):
        if g.encoder_sha256 != stack.encoder.sha256:
            raise GalleryError(None, "gallery was built with another encoder; re-enroll")
        self.min_margin, self.stack, self.gallery = match.min_margin, stack, g
        self.retention_s = None if retention_days is None else retention_days * 86400.0
        table_only = "cohort table" if stack.cohort is not None else None
        table = impostor_table(stack)  # refuses an encoder without calibration before its fields are read
        cal = stack.encoder.card.calibration
        shift, shape = (0.0, 0.0) if table_only else (cal.gallery_shift, cal.tail_shape)
        self.point_1n, self.point_1to1 = operating_points(match, table, g.matrix, shift, table_only, shape)
        self.threshold_1n, self.threshold_1to1 = self.point_1n.threshold, self.point_1to1.threshold
        self._people = {p.name: p for p in g.people}  # names are unique in a gallery
        self._enrollees = stack.cohort.stats(g.matrix) if stack.cohort is not None and len(g) else None
        # AS-norm needs every raw score (the enrollees' cohort statistics shift the ranking), so
        # only the plain cosine search uses the index's exact-top-two shortcut.
        self.index = GalleryIndex(g.matrix, stack.threads) if self._enrollees is None and len(g) else None

    def card(self, name: str) -> str:
        """The badge card number of enrolled `name`, "" when none is enrolled."""
        p = self._people.get(name)
        return p.card if p is not None else ""

    def point(self, verification: bool = False) -> OperatingPoint:
        """The operating point decisions are taken at: 1:1 for a gate that verifies a claim."""
        return self.point_1to1 if verification else self.point_1n

    def refusal(self, name: str, t_wall: float, floor: float) -> str | None:
        """None while `name` is enrolled and its enrolment holds at wall time t_wall judged against
        the time floor (edge.clock), else why its grant is refused. The enrolment ends at its own
        end or after the retention the config sets now, whichever comes first: a retention lowered
        since enrollment applies at once, and to people enrolled with no end."""
        p = self._people.get(name)
        if p is None:
            return "expired"
        ends = [e for e in (p.expires_at, p.enrolled_at + self.retention_s if self.retention_s and p.enrolled_at > 0
                            else None) if e is not None]
        return validity(min(ends) if ends else None, t_wall, floor)

    def match(self, probe: np.ndarray, claim: str | None = None) -> Match:
        """1:N (claim None) or 1:1 against the claimed identity."""
        if claim is None and self.index is not None:
            return identify(self.index.scores(probe), self.gallery.names, self.threshold_1n, self.min_margin)
        raw = cosine_scores(self.gallery.matrix, probe)
        norm = None
        if self._enrollees is not None:
            norm = as_norm_matrix(raw[None], self.stack.cohort.stats(probe[None]), self._enrollees)[0]
        if claim is not None:
            return verify(raw if norm is None else norm, self.gallery.names, claim, self.threshold_1to1)
        return identify(raw, self.gallery.names, self.threshold_1n, self.min_margin, normalized=norm)


class DoorOutput(Protocol):
    """What acts on a grant (door.output): the relay, which opens the door for one pulse
    (edge.relay.DoorRelay), or the OSDP reader, which sends the person's card number to the
    access-control panel that drives the door (edge.osdp.OsdpReader). Either reports what it did;
    lock(stay=True) makes it refuse every later grant (the service is stopping)."""

    def act(self, grant: Grant) -> DoorOutcome: ...

    def lock(self, stay: bool = False) -> None: ...

    def close(self) -> None: ...


class DecisionLog(Protocol):
    """Where the gate's decisions go (edge.audit.AuditLog)."""

    def record(self, decision: Decision) -> int: ...


@dataclass
class Gate:
    cfg: Config
    stack: Stack
    gallery: gallery_io.Gallery
    relay: DoorOutput | None = None  # the local door relay (edge.relay.DoorRelay): door.output relay or both
    audit: DecisionLog | None = None
    liveness: LivenessCheck = field(default_factory=NoLiveness)
    claim: str | None = None  # badge id / claimed name: 1:1 verification instead of 1:N
    timings: dict = field(default_factory=dict)
    # Stage timer: wall time by default; the bench also uses thread CPU time, which is what a stage
    # costs on an idle core however busy the machine it is measured on.
    clock: object = time.perf_counter
    # The time floor validity is judged against; the service shares the audit log's, so the rows
    # it flags synced and the floor the grants see are one.
    wall: TrustedClock | None = None
    # the access-control panel's reader (edge.osdp.OsdpReader): door.output osdp or both; on a grant
    # the relay acts first, then the panel gets the card read
    panel: DoorOutput | None = None

    def __post_init__(self):
        # Validity is judged at each grant on the frame's wall time: an enrolment that expires
        # while the gate runs ends then, not at the next start or reload.
        self.policy = DecisionPolicy(self.cfg.decision,
                                     refusal=lambda who, t_wall: self.matcher.refusal(who, t_wall, self.wall.floor))
        if self.wall is None:
            self.wall = getattr(self.audit, "clock", None) or TrustedClock(None, time.monotonic())
        self._clock_audited = "ok"
        self._last_quiet: str | None = None
        self.set_gallery(self.gallery)

    def set_gallery(self, g: gallery_io.Gallery) -> None:
        """Use gallery g, or refuse it (GalleryError, the gallery in use unchanged) when the
        operating point lets in more strangers at its size than MAX_TARGET_FPIR."""
        m = Matcher(self.cfg.match, self.stack, g, self.cfg.storage.retention_days)
        for verification in self.verifies():
            check_operating_point(m.point(verification), self.cfg.match.threshold is not None)
        self.matcher = m
        self.gallery = g

    def verifies(self) -> tuple[bool, ...]:
        """The operating points this gate decides at, each checked against every gallery it takes:
        1:1 (True) while it verifies a claim, else 1:N (False)."""
        return (self.claim is not None,)

    # ------------------------------------------------------------------ one frame
    def process(self, frame: Frame) -> Decision:
        self.wall.observe(frame.t_wall, frame.t_mono)
        if self.wall.state != self._clock_audited and self.audit is not None:
            # a jump is audited once, when it happens; its rows say wall_clock_synced 0 meanwhile
            self.audit.record_event("clock", {"ok": "trusted"}.get(self.wall.state, self.wall.state),
                                    t_mono=frame.t_mono, t_wall=frame.t_wall,
                                    details={"floor": round(self.wall.floor, 3)})
            self._clock_audited = self.wall.state
        try:
            decision = self._judge(frame)
        except Exception as e:  # a fault in any stage denies; the door stays locked
            log.error("frame %d: %s", frame.index, traceback.format_exc(limit=3))
            decision = Decision(False, "error", t_mono=frame.t_mono, t_wall=frame.t_wall,
                                details={"error": f"{type(e).__name__}: {e}"[:300]})
        self._act(decision)
        return decision

    def _judge(self, frame: Frame) -> Decision:
        t = self.clock
        t0 = t()
        dets = self.stack.detector.detect(frame.image)
        t1 = t()
        self.timings = {"detect": t1 - t0}
        chosen, why = choose_faces(dets, frame.image.shape, self.cfg.decision.crowd_policy, self.cfg.decision.max_faces)
        if why or not chosen:
            return self.policy.frame_denial(why or "no_face", frame.t_mono, frame.t_wall)
        det = chosen[0]
        track = self.policy.track_for(det, frame.t_mono)
        if self.policy.in_backoff(frame.t_mono):
            return self.policy.update(track, Observation("backoff"), frame.t_mono, frame.t_wall)
        enc = self.stack.encoder
        aligned = enc.align(frame.image, det)
        t2 = t()
        self.timings["align"] = t2 - t1
        q = assess_face(frame.image, det, aligned.image, enc.card.alignment.template, enc.card.alignment.size,
                        self.cfg.quality)
        patience = self.cfg.quality.patience_frames
        if not q.ok and (patience == 0 or track.quality_refused < patience):
            track.quality_refused += 1
            return self.policy.update(track, Observation("quality:" + q.reason), frame.t_mono, frame.t_wall)
        if q.ok:
            track.quality_refused = 0
        live = self.liveness.assess(frame.image, det, track.track_id, frame.t_mono)
        t3 = t()
        self.timings["liveness"] = t3 - t2
        emb = enc.embed(aligned)
        track.embeddings.append(emb.vector)
        probe = track_embedding(track.embeddings, self.cfg.match.track_frames)
        t4 = t()
        m = self.matcher.match(probe, self.claim)
        t5 = t()
        self.timings.update(embed=t4 - t3, match=t5 - t4)
        if not live.live:
            outcome = "liveness"
        elif m.accepted:
            outcome = "match"
        else:
            outcome = {"margin": "margin", "claim_unknown": "claim_unknown"}.get(m.reason, "unknown")
        obs = Observation(outcome, m.identity if m.accepted else None, _finite(m.score), _finite(m.runner_up_score),
                          m.threshold, live.score)
        d = self.policy.update(track, obs, frame.t_mono, frame.t_wall)
        if not q.ok:  # matched after quality.patience_frames refusals: say on what
            d.details["quality_relaxed"] = q.reason
        if live.reason != "off":  # why liveness passed or failed goes in the audit record
            d.details["liveness"] = {"reason": live.reason, **{k: v for k, v in live.cues.items()
                                                                if isinstance(v, (bool, int, float, str))}}
        if outcome != "match" and d.identity is None and m.identity is not None:
            # Denials keep the nearest identity in the audit for investigation, never as a grant.
            d.details["nearest"] = m.identity
        return d

    def _act(self, d: Decision) -> None:
        # The record comes first: a grant the audit log cannot take (full or failing disk) raises
        # AuditError here and opens nothing, so the door never opens without its row.
        if self.audit is not None:
            self._record(d)
        if d.grant:
            open_doors(Grant(d.identity, self.matcher.card(d.identity), d.t_mono, d.t_wall, d.track_id),
                       tuple(door for door in (self.relay, self.panel) if door is not None), self.audit)

    def _record(self, d: Decision) -> None:
        if d.reason in _QUIET:
            if d.reason == self._last_quiet or d.reason == "pending":
                return
            self._last_quiet = d.reason
        else:
            self._last_quiet = None
        self.audit.record(d)


def open_doors(grant: Grant, doors: tuple[DoorOutput, ...], audit: DecisionLog | None) -> list[DoorOutcome]:
    """Each door output acts on `grant` in turn; what each did is audited in a row of its own kind
    ('relay' door_opened / not_opened, 'osdp' card_read_sent / not_sent). The caller has audited the
    grant itself first."""
    outcomes = []
    for door in doors:
        o = door.act(grant)
        outcomes.append(o)
        if audit is not None:
            audit.record_event(o.output, o.reason, identity=grant.identity, track_id=grant.track_id,
                               t_mono=grant.t_mono, t_wall=grant.t_wall, details=o.details or None)
    return outcomes


def _finite(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def open_gallery(cfg: Config, encoder: Encoder, floor: float) -> gallery_io.Gallery:
    """The gallery without the enrolments that have ended at trusted time (edge.clock, `floor`
    the time floor): a clock far ahead drops no one, each grant then judges them. A gallery older
    than the last bundle applied (edge.bundle.check_gallery_current) is refused."""
    key = gallery_io.load_key(cfg.storage.key_file)
    g = gallery_io.load(cfg.storage.gallery, key, encoder.sha256)
    check_gallery_current(g, cfg.storage, cfg.storage.gallery)
    expired = g.expire(expiry_time(time.time(), floor))
    if expired:
        log.warning("enrolments expired and ignored: %s", ", ".join(expired))
    return g


def resolve(cfg: Config, base: Path) -> Config:
    """Relative storage paths, and door.osdp.scbk_file, are relative to the config file's folder."""
    for owner, name in [(cfg.storage, n) for n in ("gallery", "key_file", "audit", "sequence_file")] + [
            (cfg.door.osdp, "scbk_file")]:
        v = getattr(owner, name)
        if v and not Path(v).is_absolute():
            setattr(owner, name, str((base / v).resolve()))
    return cfg
