"""Crowds and tailgating, with real models and real sample faces composed into 640x480
frames: crowd_policy "deny" refuses any frame with more faces than max_faces (audited as "crowd");
"largest" judges only the largest face, so an enrolled person in front is granted and a stranger in
front is not, whoever stands behind. Per-frame times: `python -m reliability.crowd_bench`."""
from __future__ import annotations

import time

import numpy as np
import pytest

from edge import gallery as G
from edge.audit import AuditLog
from edge.enroll import apply, embed_photo
from edge.imageio import load_image
from edge.pipeline import Gate
from edge.records import Frame
from edge.relay import DoorRelay
from reliability.common import models_config
from reliability.crowd_bench import compose, face_crops, grid_frame
from reliability.fakes import unlocked_intervals


@pytest.fixture(scope="module")
def crops(real_stack, samples):
    return face_crops(real_stack.detector)


@pytest.fixture()
def make_gate(real_stack, cards, samples, tmp_path, mock_factory):
    made = []

    def make(policy, max_faces=1):
        cfg = models_config(cards)
        cfg.decision.crowd_policy, cfg.decision.max_faces = policy, max_faces
        cfg.decision.k, cfg.decision.n, cfg.decision.cooldown_s = 2, 3, 60.0
        cfg.decision.track_timeout_s = 60.0  # a loaded CI machine may take seconds per frame
        cfg.relay.pulse_s, cfg.relay.max_hold_s = 3.0, 5.0  # longer than a frame on a loaded machine
        g = G.Gallery(real_stack.encoder.sha256, real_stack.encoder.card.embedding.dim)
        results = [embed_photo(real_stack, cfg.quality, load_image(samples / f), n, f)
                   for n, f in (("obama", "obama.jpg"), ("astronaut", "astronaut.png"))]
        apply(g, results, 30)
        gate = Gate(cfg, real_stack, g, relay=DoorRelay(cfg.relay, mock_factory),
                    audit=AuditLog(tmp_path / f"audit{len(made)}.sqlite3"))
        made.append(gate)
        return gate

    yield make
    for gate in made:
        gate.relay.close()
        gate.audit.close()


def run(gate, items, frames=4):
    out = []
    for i in range(frames):  # a small step each frame, as people walking up
        moved = [(crop, side * (1 + 0.02 * i), (cx + 2 * i, cy)) for crop, side, (cx, cy) in items]
        out.append(gate.process(Frame(compose(moved), time.monotonic(), time.time(), i, "crowd")))
    return out


def reasons(gate):
    return [r["reason"] for r in gate.audit.tail(100) if r["kind"] == "decision"]


def test_deny_policy_refuses_a_tailgater_and_audits_crowd(make_gate, crops):
    gate = make_gate("deny", max_faces=1)
    ds = run(gate, [(crops["obama2.jpg"], 220, (240, 240)), (crops["biden.jpg"], 90, (520, 140))])
    assert not any(d.grant for d in ds)
    assert {d.reason for d in ds} == {"crowd"}
    assert reasons(gate) == ["crowd"]  # audited once, on change
    assert unlocked_intervals(gate.relay.pin) == []


def test_deny_policy_allows_a_crowd_up_to_max_faces(make_gate, crops):
    gate = make_gate("deny", max_faces=2)
    ds = run(gate, [(crops["obama2.jpg"], 220, (240, 240)), (crops["biden.jpg"], 90, (520, 140))])
    assert any(d.grant and d.identity == "obama" for d in ds)


def test_largest_policy_grants_the_enrolled_person_in_front(make_gate, crops):
    gate = make_gate("largest")
    ds = run(gate, [(crops["obama2.jpg"], 220, (240, 240)), (crops["biden.jpg"], 90, (520, 120)),
                    (crops["astronaut.png"], 80, (540, 380))])
    assert [d.identity for d in ds if d.grant] == ["obama"]
    assert "granted" in reasons(gate)
    assert len(unlocked_intervals(gate.relay.pin)) == 1


def test_largest_policy_denies_a_stranger_in_front_of_an_enrolled_person(make_gate, crops):
    gate = make_gate("largest")
    ds = run(gate, [(crops["biden.jpg"], 220, (240, 240)), (crops["obama2.jpg"], 90, (520, 140))], frames=6)
    assert not any(d.grant for d in ds)
    assert "unknown" in reasons(gate)
    assert unlocked_intervals(gate.relay.pin) == []


@pytest.mark.parametrize("n,policy,reason", [(0, "deny", "no_face"), (20, "deny", "crowd"), (5, "deny", "crowd")])
def test_empty_scene_and_big_crowds(make_gate, crops, n, policy, reason):
    gate = make_gate(policy)
    img = grid_frame(list(crops.values()), n, np.random.default_rng(n))
    assert len(gate.stack.detector.detect(img)) >= 0.8 * n  # the faces are there to be found
    d = gate.process(Frame(img, time.monotonic(), time.time(), 0, "crowd"))
    assert (d.grant, d.reason) == (False, reason)
    assert reasons(gate) == [reason]
