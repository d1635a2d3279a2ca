"""edge.decide: k-of-n voting per track, decisive denials, cooldown, back-off, tracking, crowd policy.

Every timer is driven by explicit monotonic `now` values; nothing sleeps."""
import numpy as np
import pytest

from edge.config import DecisionConfig
from edge.decide import DecisionPolicy, Observation, choose_faces
from edge.records import Detection

BOX = (100.0, 100.0, 80.0, 80.0)


def det(box=BOX):
    return Detection(box=box, keypoints=np.zeros((5, 2), np.float32), score=0.9)


def policy(refusal=lambda who, t_wall: None, **kw):
    base = dict(k=2, n=3, cooldown_s=5.0, backoff_after=5, backoff_s=30.0, backoff_max_s=100.0,
                track_iou=0.3, track_timeout_s=1.5)
    return DecisionPolicy(DecisionConfig(**{**base, **kw}), refusal)


def match(name="alice"):
    return Observation("match", name, score=0.8, threshold=0.5)


def unknown():
    return Observation("unknown")


def feed(p, observations, t0=0.0, dt=0.1):
    """Feed observations for one face at BOX, one frame every dt seconds; returns the decisions."""
    out = []
    for i, obs in enumerate(observations):
        now = t0 + i * dt
        out.append(p.update(p.track_for(det(), now), obs, now, 1000.0 + now))
    return out


def reasons(decisions):
    return [d.reason for d in decisions]


# ---------------------------------------------------------------- k of n

def test_two_matches_grant_on_the_second_frame():
    d = feed(policy(), [match(), match()])
    assert reasons(d) == ["pending", "granted"]
    assert d[1].grant and d[1].identity == "alice"
    assert d[1].details == {"votes": 2, "n": 3}
    assert not d[0].grant


def test_a_grant_for_an_enrolment_no_longer_valid_is_denied_expired():
    """Validity is asked at the grant, with that frame's wall time (feed: 1000 + now); a vote
    cast before the expiry (frame 3, 1000.2) does not carry a grant after it (frame 4, 1000.3)."""
    asked = []

    def refusal(who, t_wall):
        asked.append((who, t_wall))
        return None if t_wall < 1000.25 else "expired"

    p = policy(refusal, cooldown_s=0.0, backoff_after=2)
    d = feed(p, [match(), match(), match(), match(), match(), match()])
    assert reasons(d) == ["pending", "granted", "pending", "expired", "pending", "expired"]
    assert asked == [("alice", 1000.1), ("alice", 1000.3), ("alice", 1000.5)]
    assert not any(x.grant for x in d[2:]) and d[3].identity == "alice"
    assert p.in_backoff(0.6)  # expired denials count towards back-off like any other


def test_match_unknown_match_grants_on_the_third_frame():
    d = feed(policy(), [match(), unknown(), match()])
    assert reasons(d) == ["pending", "pending", "granted"]
    assert d[2].identity == "alice"


@pytest.mark.parametrize("k,n", [(2, 2), (2, 3), (3, 4), (3, 5), (4, 6)])
def test_alternating_identities_never_grant(k, n):
    # A track whose frames name two people is unsure of both: even when one of them has k votes
    # in the window (alice, bob, alice with k=2, n=3), nobody is granted.
    d = feed(policy(k=k, n=n, backoff_after=100), [match("alice"), match("bob")] * (3 * n))
    assert not any(x.grant for x in d)
    # Each window of n frames ends in one decisive denial, named "unknown" (matches that never agreed).
    assert reasons(d).count("unknown") == 6


def test_decisive_denial_after_n_frames_names_the_commonest_reason():
    blurry = Observation("quality:blurry")
    d = feed(policy(), [blurry, unknown(), blurry])
    assert reasons(d) == ["pending", "pending", "quality:blurry"]
    assert d[2].details == {"consecutive_denials": 1}
    # the track starts a fresh window after a decisive denial
    d = feed(policy(), [blurry, unknown(), blurry, match(), match()])
    assert reasons(d)[3:] == ["pending", "granted"]


def test_k_equal_one_grants_on_the_first_match():
    assert reasons(feed(policy(k=1, n=1), [match()])) == ["granted"]


# ---------------------------------------------------------------- cooldown

def test_same_person_within_cooldown_is_not_granted_again():
    p = policy(cooldown_s=5.0)
    assert reasons(feed(p, [match(), match()], t0=0.0)) == ["pending", "granted"]  # granted at t=0.1
    d = feed(p, [match(), match()], t0=2.0)
    assert reasons(d) == ["pending", "cooldown"]
    assert not d[1].grant and d[1].identity == "alice"
    # someone else is not held back by alice's cooldown
    assert reasons(feed(p, [match("bob"), match("bob")], t0=2.5)) == ["pending", "granted"]
    # cooldown is counted from the grant (0.1), not from the refused attempt: 5.1 is free again
    assert reasons(feed(p, [match(), match()], t0=5.0)) == ["pending", "granted"]


# ---------------------------------------------------------------- back-off

def deny_once(p, t0):
    return feed(p, [unknown()] * 3, t0=t0)[-1]


def test_backoff_after_consecutive_denials_doubles_and_is_capped():
    p = policy(backoff_after=5, backoff_s=30.0, backoff_max_s=100.0)
    t = 0.0
    for i in range(4):
        d = deny_once(p, t)
        assert d.reason == "unknown" and d.details == {"consecutive_denials": i + 1}
        t += 1.0
    fifth = deny_once(p, t)  # frames at t, t+0.1, t+0.2
    assert fifth.reason == "unknown"
    assert fifth.details == {"consecutive_denials": 5, "backoff_s": 30.0}
    start = t + 0.2
    # inside the back-off every update is refused, even a run of matches
    d = feed(p, [match(), match(), match()], t0=start + 1.0)
    assert reasons(d) == ["backoff"] * 3
    assert d[0].details == {"until_s": 29.0}
    assert p.in_backoff(start + 29.99) and not p.in_backoff(start + 30.0)

    def five_denials(t0):
        for j in range(5):
            last = deny_once(p, t0 + j)
        return last, last.t_mono + last.details["backoff_s"]

    second, free = five_denials(start + 30.0)
    assert second.details["backoff_s"] == 60.0
    third, free = five_denials(free)
    assert third.details["backoff_s"] == 100.0  # 120 capped
    fourth, _ = five_denials(free)
    assert fourth.details["backoff_s"] == 100.0


def test_a_grant_resets_the_denial_count_and_the_backoff_level():
    p = policy(backoff_after=5, backoff_s=30.0, backoff_max_s=100.0, cooldown_s=0.0)
    for j in range(5):
        last = deny_once(p, float(j))
    assert last.details["backoff_s"] == 30.0  # level 1 from here
    t = 40.0
    for j in range(4):
        deny_once(p, t + j)
    assert reasons(feed(p, [match(), match()], t0=t + 10)) == ["pending", "granted"]
    # four more denials do not trigger back-off: the grant reset the count
    for j in range(4):
        assert "backoff_s" not in deny_once(p, t + 20 + j).details
    # and the next back-off starts again at backoff_s, not 60
    assert deny_once(p, t + 30).details == {"consecutive_denials": 5, "backoff_s": 30.0}


def test_frame_denials_do_not_count_towards_backoff():
    p = policy(backoff_after=1)
    for i in range(10):
        d = p.frame_denial("no_face", float(i), 0.0)
        assert (d.grant, d.reason, d.t_mono) == (False, "no_face", float(i))
    assert not p.in_backoff(10.0)
    assert reasons(feed(p, [match(), match()], t0=10.0)) == ["pending", "granted"]


# ---------------------------------------------------------------- tracking

def test_overlapping_boxes_continue_a_track_and_distant_ones_start_another():
    p = policy(track_iou=0.3)
    a = p.track_for(det(BOX), 0.0)
    moved = p.track_for(det((110.0, 100.0, 80.0, 80.0)), 0.1)  # IoU 70/90 = 0.6
    assert moved is a and a.box == (110.0, 100.0, 80.0, 80.0) and a.last_seen == 0.1
    other = p.track_for(det((400.0, 100.0, 80.0, 80.0)), 0.2)
    assert other.track_id != a.track_id
    assert len(p.tracks) == 2


def test_a_face_joins_the_track_it_overlaps_most():
    p = policy(track_iou=0.1)
    left = p.track_for(det((0.0, 0.0, 130.0, 100.0)), 0.0)
    right = p.track_for(det((150.0, 0.0, 100.0, 100.0)), 0.0)
    # x 100..200 passes the threshold with both: IoU 3000/20000 = 0.15 with left, 5000/15000 = 0.33 with right
    assert p.track_for(det((100.0, 0.0, 100.0, 100.0)), 0.1) is right
    assert left.track_id != right.track_id


def test_votes_belong_to_a_track():
    p = policy()
    a = p.track_for(det(BOX), 0.0)
    assert p.update(a, match(), 0.0, 0.0).reason == "pending"
    b = p.track_for(det((400.0, 100.0, 80.0, 80.0)), 0.1)
    # one match on another face does not complete alice's two
    assert p.update(b, match(), 0.1, 0.0).reason == "pending"
    assert p.update(p.track_for(det(BOX), 0.2), match(), 0.2, 0.0).reason == "granted"


def test_a_track_unseen_for_longer_than_the_timeout_is_forgotten():
    p = policy(track_timeout_s=1.5)
    first = p.track_for(det(), 0.0)
    assert p.update(first, match(), 0.0, 0.0).reason == "pending"
    assert p.track_for(det(), 1.5) is first  # exactly the timeout: still the same track
    again = p.track_for(det(), 3.1)  # 1.6 s after it was last seen
    assert again.track_id != first.track_id and first.track_id not in p.tracks
    # its vote went with it: one more match is not two
    assert p.update(again, match(), 3.1, 0.0).reason == "pending"


# ---------------------------------------------------------------- crowd policy

FRAME = (480, 640, 3)  # centre (320, 240)


def test_no_faces():
    assert choose_faces([], FRAME, "deny", 1) == ([], None)


def test_deny_policy_refuses_a_crowd():
    faces = [det((100.0, 100.0, 80.0, 80.0)), det((300.0, 200.0, 60.0, 60.0))]
    assert choose_faces(faces, FRAME, "deny", 1) == ([], "crowd")
    chosen, why = choose_faces(faces, FRAME, "deny", 2)  # within max_faces: judge the largest
    assert why is None and chosen == [faces[0]]


def test_largest_policy_picks_the_largest_face():
    small_centred = det((290.0, 210.0, 60.0, 60.0))
    large_corner = det((0.0, 0.0, 100.0, 120.0))  # size = shorter side = 100
    chosen, why = choose_faces([small_centred, large_corner], FRAME, "largest", 1)
    assert why is None and chosen == [large_corner]


def test_largest_policy_breaks_ties_by_nearness_to_the_centre():
    corner = det((0.0, 0.0, 80.0, 80.0))
    centred = det((290.0, 200.0, 80.0, 80.0))  # centre (330, 240): 10 px off
    near = det((250.0, 200.0, 80.0, 80.0))  # centre (290, 240): 30 px off
    for order in ([corner, centred, near], [near, corner, centred]):
        assert choose_faces(order, FRAME, "largest", 1) == ([centred], None)
