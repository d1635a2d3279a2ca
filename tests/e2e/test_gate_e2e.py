"""End to end: replayed real-face frames through every stage with real models, a real SQLite
audit and gpiozero mock pins. An enrolled person gets exactly one pulse of the configured length;
a stranger, an empty scene and a blurred face get none, each with its audit reason."""
from __future__ import annotations

import time

import cv2
import numpy as np
import pytest

from edge import gallery as G
from edge.audit import AuditLog
from edge.config import Config
from edge.demo import fit
from edge.enroll import apply, embed_photo
from edge.imageio import load_image
from edge.pipeline import Gate
from edge.records import Frame
from edge.relay import DoorRelay

PULSE = 0.4


@pytest.fixture()
def gate(stack, samples, tmp_path, model_cards, mock_factory):
    cfg = Config()
    cfg.models.detector, cfg.models.encoder = str(model_cards["detector"]), str(model_cards["encoder"])
    cfg.relay.pulse_s, cfg.relay.max_hold_s = PULSE, 1.0
    cfg.decision.k, cfg.decision.n, cfg.decision.cooldown_s = 2, 3, 60.0
    g = G.Gallery(stack.encoder.sha256, stack.encoder.card.embedding.dim)
    results = [embed_photo(stack, cfg.quality, load_image(samples / f), n, f)
               for n, f in (("obama", "obama.jpg"), ("astronaut", "astronaut.png"))]
    assert all(r.ok for r in results), [r.reason for r in results]
    apply(g, results, 30)
    relay = DoorRelay(cfg.relay, mock_factory)
    audit = AuditLog(tmp_path / "audit.sqlite3")
    gate = Gate(cfg, stack, g, relay=relay, audit=audit)
    yield gate
    relay.close()
    audit.close()


def frames_of(image, n, blur=0.0):
    out = []
    for i in range(n):
        img = fit(image, zoom=1.0 + 0.03 * i, dx=4 * i)
        out.append(cv2.GaussianBlur(img, (0, 0), blur) if blur else img)
    return out


def run(gate, images):
    # stamped when handed to the gate, as a camera stamps its frames
    return [gate.process(Frame(img, time.monotonic(), time.time(), i, "test")) for i, img in enumerate(images)]


def reasons(gate):
    return [r["reason"] for r in gate.audit.tail(100) if r["kind"] == "decision"][::-1]


def test_enrolled_person_gets_exactly_one_pulse(gate, samples):
    pin = gate.relay.pin
    decisions = run(gate, frames_of(load_image(samples / "obama2.jpg"), 6))
    grants = [d for d in decisions if d.grant]
    assert len(grants) == 1 and grants[0].identity == "obama"
    assert grants[0].score > grants[0].threshold
    # later frames of the same person fall in the cooldown: no second pulse
    assert any(d.reason == "cooldown" for d in decisions[decisions.index(grants[0]) + 1:]) or len(decisions) - decisions.index(grants[0]) <= 2
    time.sleep(PULSE + 0.3)
    assert [s.state for s in pin.states] == [False, True, False]  # locked, one pulse, locked
    # the pulse lasts the configured time (the delay before it is processing time, not checked)
    pin.assert_states_and_times([(0.0, False), (pin.states[1].timestamp, True), (PULSE, False)])
    assert "granted" in reasons(gate)


def test_stranger_is_denied(gate, samples):
    decisions = run(gate, frames_of(load_image(samples / "biden.jpg"), 6))
    assert not any(d.grant for d in decisions)
    assert gate.relay.pin.states[-1].state is False and len(gate.relay.pin.states) == 1
    assert "unknown" in reasons(gate)


def test_empty_scene_is_denied_with_no_face(gate, samples):
    empty = cv2.resize(load_image(samples / "astronaut.png")[300:512, 0:180], (640, 480))
    decisions = run(gate, [empty] * 4)
    assert all(d.reason == "no_face" and not d.grant for d in decisions)
    assert len(gate.relay.pin.states) == 1
    assert reasons(gate) == ["no_face"]  # repeats of a quiet state are audited once


def test_blurred_face_is_denied_for_quality(gate, samples):
    decisions = run(gate, frames_of(load_image(samples / "obama2.jpg"), 6, blur=6))
    assert not any(d.grant for d in decisions)
    assert len(gate.relay.pin.states) == 1
    assert "quality:blurry" in reasons(gate)


def test_after_patience_a_poor_face_is_matched_and_the_reason_audited(gate, samples):
    gate.cfg.quality.patience_frames = 3
    decisions = run(gate, frames_of(load_image(samples / "obama2.jpg"), 7, blur=10))
    # k-of-n: the first n (3) refusals give pending, pending, then one decisive quality denial
    assert [d.reason for d in decisions[:3]] == ["pending", "pending", "quality:blurry"]
    assert all(d.score is None for d in decisions[:3])  # refused before matching
    later = decisions[3:]
    assert all(d.score is not None and d.details.get("quality_relaxed") == "blurry" for d in later)
    # a sharp face resets the count: the next blurred one waits again
    assert run(gate, frames_of(load_image(samples / "obama2.jpg"), 1))[0].score is not None
    assert run(gate, frames_of(load_image(samples / "obama2.jpg"), 1, blur=10))[0].score is None


def test_patience_zero_never_matches_a_poor_face(gate, samples):
    gate.cfg.quality.patience_frames = 0
    decisions = run(gate, frames_of(load_image(samples / "obama2.jpg"), 12, blur=10))
    assert all(d.score is None and not d.grant for d in decisions)
    assert set(reasons(gate)) == {"quality:blurry"}  # pending is not audited


def test_stage_exception_denies_and_is_audited(gate, samples):
    class Broken:
        card = gate.stack.detector.card

        def detect(self, image):
            raise RuntimeError("injected detector fault")

    gate.stack = type(gate.stack)(Broken(), gate.stack.encoder)
    d = run(gate, frames_of(load_image(samples / "obama2.jpg"), 1))[0]
    assert not d.grant and d.reason == "error"
    assert len(gate.relay.pin.states) == 1
    assert reasons(gate) == ["error"]


def test_multi_frame_fusion_matches_the_tracks_mean_embedding(gate, samples):
    """match.track_frames = 3: the score a frame reports is the enrolled face's cosine with the
    mean of the track's last three embeddings, not with the frame's own."""
    from edge.match import track_embedding

    gate.cfg.match.track_frames = 3
    frames = frames_of(load_image(samples / "obama2.jpg"), 3)
    decisions = run(gate, frames)
    track = next(iter(gate.policy.tracks.values()))
    assert len(track.embeddings) == 3
    want = float(gate.gallery.matrix[gate.gallery.names.index("obama")] @ track_embedding(track.embeddings, 3))
    scored = [d for d in decisions if d.score is not None]
    assert scored and abs(scored[-1].score - want) < 1e-5
    assert any(d.grant for d in decisions)


def test_an_enrolment_that_expires_while_the_gate_runs_is_denied_expired_and_never_pulses_again(gate, samples):
    """obama's enrolment ends at `until` (wall time) while the gate keeps running: before it he is
    granted once; after it every decision is a denial `expired`, audited, and the relay stays
    locked (no cooldown here, so only the expiry can keep a second pulse away)."""
    gate.cfg.decision.cooldown_s = 0.0
    person = next(p for p in gate.gallery.people if p.name == "obama")
    until = time.time() + 3600.0
    person.expires_at = until
    images = frames_of(load_image(samples / "obama2.jpg"), 6)
    before = [gate.process(Frame(img, time.monotonic(), until - 10.0 + 0.1 * i, i, "test")) for i, img in enumerate(images)]
    assert sum(d.grant for d in before) == 3 and {d.identity for d in before if d.grant} == {"obama"}
    time.sleep(PULSE + 0.3)  # the last pulse ends: any later line change is a new pulse
    pulses = [s.state for s in gate.relay.pin.states].count(True)
    after = [gate.process(Frame(img, time.monotonic(), until + 0.1 * i, 6 + i, "test")) for i, img in enumerate(images)]
    assert not any(d.grant for d in after)
    assert [d.reason for d in after] == ["pending", "expired"] * 3
    assert all(d.identity == "obama" for d in after if d.reason == "expired")
    time.sleep(0.1)
    assert [s.state for s in gate.relay.pin.states].count(True) == pulses and gate.relay.pin.state is False
    assert reasons(gate).count("expired") == 3
