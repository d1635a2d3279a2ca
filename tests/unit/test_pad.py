"""edge.pad: crop geometry, eye aspect ratio, blink counting, parallax, the policy combination and
per-track state, with hand-computed cases and fake models (the real models are in the e2e test)."""
import json
from pathlib import Path

import numpy as np
import pytest

from edge.config import Config
from edge.errors import ModelError
from edge.pad import (FACE_MESH, FACE_MESH_SHA256, FACE_MESH_SIZE, LEFT_EYE, MESH_NOSE, MESH_PLANE, MIN_PARALLAX,
                      RIGHT_EYE, SHIPPED_PAD, Cues, PadFusion, PadPolicy, apply_affine, combine, count_blinks, crop_box,
                      eye_aspect_ratio, load_pad, make_pad_policy, mesh_transform, pad_crop, parallax)
from edge.records import Detection

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------- crop geometry

def test_crop_box_scales_about_the_centre():
    # centre (320, 240), 100 px box x2 -> 200 px; Silent-Face keeps the right/bottom pixel: end + 1
    assert crop_box((270, 190, 100, 100), 640, 480, 2.0) == (220, 140, 421, 341)


def test_crop_box_is_shifted_inside_not_clipped():
    # left edge: x0 = -50 -> the crop moves right by 50 and keeps its 200 px width
    assert crop_box((0, 190, 100, 100), 640, 480, 2.0) == (0, 140, 201, 341)
    # bottom-right corner: x1 = 690 and y1 = 530 move back to 639 and 479
    assert crop_box((540, 380, 100, 100), 640, 480, 2.0) == (439, 279, 640, 480)


def test_crop_box_scale_is_capped_to_the_frame():
    # a 300 px tall face cannot grow 2.7x in a 480 px frame: scale = 479 / 300; y is then shifted to 0..479
    x0, y0, x1, y1 = crop_box((200, 100, 200, 300), 640, 480, 2.7)
    assert (y0, y1) == (0, 480)
    assert (x0, x1) == (140, 460)  # width 200 * 479/300 = 319.3 about centre 300


def test_crop_box_refuses_an_empty_box():
    with pytest.raises(ValueError):
        crop_box((10, 10, 0, 50), 640, 480, 2.7)


def test_pad_crop_takes_the_box_region():
    img = np.zeros((480, 640, 3), np.uint8)
    img[140:341, 220:421] = 200  # exactly the crop of the first case
    crop = pad_crop(img, (270, 190, 100, 100), 2.0, (80, 80))
    assert crop.shape == (80, 80, 3)
    assert crop.min() == 200


def test_mesh_transform_centres_the_box_and_levels_the_eyes():
    # eyes one above the other (head rolled 90 degrees); box 100x100 at (100, 100)
    kps = np.array([[150, 130], [150, 170], [150, 150], [0, 0], [0, 0]], np.float32)
    m = mesh_transform(kps, (100, 100, 100, 100), 192)
    c = apply_affine(m, np.array([[150.0, 150.0]]))[0]
    assert np.allclose(c, (96, 96))
    eyes = apply_affine(m, kps[:2].astype(np.float64))
    d = eyes[1] - eyes[0]
    assert abs(d[1]) < 1e-9 and d[0] > 0  # level, left to right
    assert np.isclose(d[0], 40 * 192 / 150)  # scale: 1.5 x box side -> 192 px


# ---------------------------------------------------------------- eye aspect ratio and blinks

def test_eye_aspect_ratio_by_hand():
    eye = np.array([[0, 0], [1, 1], [2, 1], [3, 0], [2, -1], [1, -1]], float)
    # (|p2-p6| + |p3-p5|) / (2 |p1-p4|) = (2 + 2) / 6
    assert eye_aspect_ratio(eye) == pytest.approx(4 / 6)
    shut = eye.copy()
    shut[[1, 2, 4, 5], 1] = 0
    assert eye_aspect_ratio(shut) == 0.0


@pytest.mark.parametrize("ears,blinks", [
    ([0.3] * 5 + [0.1] + [0.3] * 3, 1),  # one dip, open before and after
    ([0.3, 0.3, 0.1, 0.1, 0.3, 0.3, 0.12, 0.3], 2),  # a two-frame dip counts once
    ([0.3] * 10, 0),  # a photo: eyes never move
    ([0.1, 0.1, 0.3, 0.3, 0.3, 0.3], 0),  # shut at the start is not a blink: no open eyes before it
    ([0.3, 0.3, 0.3, 0.1, 0.1], 0),  # never reopens
    ([0.3, 0.3, 0.25, 0.3, 0.3], 0),  # 0.25 is 83% of the baseline: a squint, not a blink
    ([0.3, 0.1], 0),  # too short for a baseline
    ([0.3, np.nan, 0.3, 0.1, 0.3, 0.3], 1),  # missing landmarks are skipped
])
def test_count_blinks(ears, blinks):
    assert count_blinks(ears) == blinks


# ---------------------------------------------------------------- parallax

SQUARE = np.array([[-1, -1], [1, -1], [1, 1], [-1, 1]], float)


def test_parallax_of_a_flat_picture_is_zero_under_any_affine_map():
    rng = np.random.default_rng(0)
    nose = np.array([0.2, 0.3])
    for _ in range(5):
        a = rng.normal(size=(2, 2)) + 2 * np.eye(2)
        m = np.hstack([a, rng.normal(size=(2, 1)) * 50])
        assert parallax(SQUARE, nose, apply_affine(m, SQUARE), apply_affine(m, nose[None])[0]) < 1e-9


def test_parallax_by_hand():
    # the plane stays put, the nose moves 0.1 sideways; plane size = mean distance to centroid = sqrt(2)
    assert parallax(SQUARE, np.zeros(2), SQUARE, np.array([0.1, 0.0])) == pytest.approx(0.1 / np.sqrt(2))
    # the same measured on the plane moved and scaled x10: units are the plane's, so no change
    assert parallax(SQUARE, np.zeros(2), SQUARE * 10 + 5, np.array([6.0, 5.0])) == pytest.approx(0.1 / np.sqrt(2))


# ---------------------------------------------------------------- combination

def test_combine_passive_only():
    r = combine([1.0, 0.5, 0.75], 0.75, False, Cues())  # mean exactly at the threshold: live
    assert r.live and r.reason == "live" and r.score == 0.75
    r = combine([1.0, 0.5, 0.74], 0.75, False, Cues())
    assert not r.live and r.reason == "passive"
    assert combine([], 0.5, False, Cues()).reason == "no_score"


def test_combine_requires_a_cue_in_blink_mode():
    assert combine([0.9], 0.5, True, Cues()).reason == "no_blink_or_motion"
    assert combine([0.9], 0.5, True, Cues(motion_frames=1)).reason == "no_blink_or_motion"  # one frame: a glitch
    assert combine([0.9], 0.5, True, Cues(blinks=1)).reason == "live:blink"
    assert combine([0.9], 0.5, True, Cues(motion_frames=2)).reason == "live:motion"
    assert combine([0.9], 0.5, True, Cues(blinks=1), face_seen=False).reason == "no_landmarks"
    # a cue never rescues a low passive score
    r = combine([0.2], 0.5, True, Cues(blinks=3, motion_frames=5))
    assert not r.live and r.reason == "passive"
    assert r.cues["blinks"] == 3


# ---------------------------------------------------------------- policy state, with fake models

class FakePad:
    def __init__(self, scores):
        self.scores = list(scores)

    def score(self, image, box):
        return self.scores.pop(0)


def face(ear=0.3, nose_dx=0.0):
    """468 landmarks: eyes with a given EAR (width 30 px), a square face plane, a nose."""
    pts = np.zeros((468, 2))
    for idx, x0 in ((LEFT_EYE, 100.0), (RIGHT_EYE, 200.0)):
        h = ear * 30 / 2
        pts[list(idx)] = [[x0, 100], [x0 + 10, 100 - h], [x0 + 20, 100 - h], [x0 + 30, 100], [x0 + 20, 100 + h],
                          [x0 + 10, 100 + h]]
    pts[list(MESH_PLANE)] = np.array([[100, 100], [130, 100], [200, 100], [230, 100], [120, 200], [210, 200],
                                      [165, 40], [165, 260]], float)
    pts[MESH_NOSE] = [165 + nose_dx, 150]
    return pts


class FakeMesh:
    def __init__(self, faces):
        self.faces = list(faces)

    def landmarks(self, image, det):
        return self.faces.pop(0)


DET = Detection((100, 100, 100, 100), np.zeros((5, 2), np.float32), 0.9)
IMG = np.zeros((10, 10, 3), np.uint8)


def test_policy_averages_the_last_frames_of_each_track():
    p = PadPolicy(FakePad([0.9, 0.05, 0.95, 0.2, 0.6]), threshold=0.5, frames=2)
    assert p.assess(IMG, DET, 1, 0.0).score == pytest.approx(0.9)
    r = p.assess(IMG, DET, 1, 0.1)
    assert not r.live and r.score == pytest.approx(0.475)
    r = p.assess(IMG, DET, 1, 0.2)  # the 0.9 has left the 2-frame window: (0.05 + 0.95) / 2
    assert r.live and r.score == pytest.approx(0.5)
    r = p.assess(IMG, DET, 2, 0.3)  # another track starts its own window
    assert not r.live and r.score == pytest.approx(0.2)
    assert p.assess(IMG, DET, 1, 0.4).score == pytest.approx((0.95 + 0.6) / 2)


def test_policy_forgets_idle_tracks():
    p = PadPolicy(FakePad([0.9, 0.1]), threshold=0.5, frames=3)
    p.assess(IMG, DET, 1, 0.0)
    p.assess(IMG, DET, 2, 100.0)
    assert set(p.tracks) == {2}


def test_policy_denies_a_still_face_and_grants_a_blink():
    still = [face() for _ in range(6)]
    p = PadPolicy(FakePad([0.9] * 6), 0.5, 3, FakeMesh(still), require_cue=True)
    assert [p.assess(IMG, DET, 1, t).reason for t in range(6)] == ["no_blink_or_motion"] * 6
    blink = [face(0.3), face(0.3), face(0.3), face(0.05), face(0.3), face(0.3)]
    p = PadPolicy(FakePad([0.9] * 6), 0.5, 3, FakeMesh(blink), require_cue=True)
    reasons = [p.assess(IMG, DET, 1, t).reason for t in range(6)]
    assert reasons == ["no_blink_or_motion"] * 4 + ["live:blink"] * 2


def test_policy_grants_on_non_planar_motion_only():
    # the nose leaves the plane by 0.2 x the plane size in two frames: a turning head
    size = np.linalg.norm(face()[list(MESH_PLANE)] - face()[list(MESH_PLANE)].mean(0), axis=1).mean()
    dx = 0.2 * size
    assert 0.2 > MIN_PARALLAX
    seq = [face(), face(nose_dx=dx), face(nose_dx=-dx)]
    p = PadPolicy(FakePad([0.9] * 3), 0.5, 3, FakeMesh(seq), require_cue=True)
    assert [p.assess(IMG, DET, 1, t).reason for t in range(3)] == ["no_blink_or_motion"] * 2 + ["live:motion"]
    # the whole face moved rigidly (a photo slid and scaled): no parallax, no cue
    m = np.array([[1.2, 0.1, 30.0], [-0.1, 1.2, -20.0]])
    seq = [face(), apply_affine(m, face()), apply_affine(m @ np.vstack([m, [0, 0, 1]]), face())]
    p = PadPolicy(FakePad([0.9] * 3), 0.5, 3, FakeMesh(seq), require_cue=True)
    r = [p.assess(IMG, DET, 1, t) for t in range(3)][-1]
    assert r.reason == "no_blink_or_motion" and r.cues["parallax"] < 1e-6


def test_policy_without_landmarks_is_not_live_in_blink_mode():
    p = PadPolicy(FakePad([0.9]), 0.5, 3, FakeMesh([None]), require_cue=True)
    assert p.assess(IMG, DET, 1, 0.0).reason == "no_landmarks"


# ---------------------------------------------------------------- wiring and models

def test_face_mesh_pin_matches_the_lock_file():
    lock = json.loads((REPO / "export" / "models.lock.json").read_text())
    members = [m for p in lock["packages"] for m in p["members"] if m["dest"] == FACE_MESH.name]
    assert members == [dict(members[0], sha256=FACE_MESH_SHA256, size=FACE_MESH_SIZE)]


def tiny_pad(folder: Path) -> Path:
    """A hand-made PAD 'model': live logit = mean red / 50, attack logit = 0 (per the card, BGR
    input unnormalised, so red is channel 2). Returns its card."""
    import onnx
    from onnx import TensorProto, helper

    from edge.modelcard import Card, InputSpec, LivenessSpec, SourceSpec, sha256_file, write_card

    w = np.array([[0, 0, 0], [0, 0, 1 / 50]], np.float32)
    graph = helper.make_graph(
        [helper.make_node("GlobalAveragePool", ["input"], ["gap"]), helper.make_node("Flatten", ["gap"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w"], ["logits"], transB=1)],
        "tiny_pad", [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["n", 3, 80, 80])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 2])],
        [helper.make_tensor("w", TensorProto.FLOAT, [2, 3], w.ravel())])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    path = folder / "tiny_pad.onnx"
    onnx.save(model, str(path))
    card = Card(name="tiny_pad", task="liveness", file=path.name, sha256=sha256_file(path),
                size_bytes=path.stat().st_size, runtime="onnxruntime", precision="fp32",
                input=InputSpec(width=80, height=80, color="BGR", layout="NCHW", dynamic_batch=True),
                liveness=LivenessSpec(crop_scale=2.0, live_class=1, threshold=0.7),
                source=SourceSpec(package="test", version="0", file=path.name, license="test"))
    return write_card(card, path)


def test_pad_model_is_fed_by_its_card(tmp_path):
    pad = load_pad(tiny_pad(tmp_path))
    red = np.zeros((80, 80, 3), np.uint8)
    red[..., 2] = 100
    blue = np.zeros((80, 80, 3), np.uint8)
    blue[..., 0] = 100
    # logits (0, 2) -> softmax e^2 / (1 + e^2); blue has no live evidence: (0, 0) -> 0.5
    assert pad.scores([red, blue]) == pytest.approx([np.exp(2) / (1 + np.exp(2)), 0.5], abs=1e-6)
    # the frame is cropped at the card's scale around the box: a red face region in a blue frame
    frame = np.zeros((480, 640, 3), np.uint8)
    frame[..., 0] = 100
    frame[140:341, 220:421] = red[0, 0]
    assert pad.score(frame, (270, 190, 100, 100)) == pytest.approx(np.exp(2) / (1 + np.exp(2)), abs=1e-6)


def test_make_pad_policy_takes_the_cards_threshold_unless_configured(tmp_path):
    cfg = Config()
    cfg.liveness.mode = "passive"
    cfg.models.liveness = str(tiny_pad(tmp_path))
    p = make_pad_policy(cfg)
    assert p.threshold == 0.7 and not p.require_cue and p.mesh is None
    cfg.liveness.threshold = 0.4
    assert make_pad_policy(cfg).threshold == 0.4


def test_a_missing_pad_card_names_the_file(tmp_path):
    cfg = Config()
    cfg.liveness.mode = "passive"
    cfg.models.liveness = str(tmp_path / "nope.card.json")
    with pytest.raises(ModelError, match="nope.card.json"):
        make_pad_policy(cfg)


def test_shipped_pad_is_the_minifasnet_fusion_with_its_licences():
    pad = load_pad(SHIPPED_PAD)
    assert isinstance(pad, PadFusion) and pad.card.task == "liveness" and pad.card.runtime == "fusion"
    assert [m.card.name for m in pad.members] == ["MiniFASNetV2", "MiniFASNetV1SE"]
    assert [m.spec.crop_scale for m in pad.members] == [2.7, 4.0]
    assert np.allclose(pad.weights, [0.5, 0.5])
    assert "NUAA train split" in pad.spec.threshold_rule and 0.0 < pad.spec.threshold < 1.0
    folder = SHIPPED_PAD.parent
    for name in ("LICENSE.Silent-Face-Anti-Spoofing.txt", "LICENSE.yakhyo-face-anti-spoofing.txt", "PROVENANCE.md"):
        assert (folder / name).stat().st_size > 1000, name
    for m in pad.members:  # the pinned upstream files, unchanged
        assert m.card.sha256 in (folder / "PROVENANCE.md").read_text()


def test_pad_fusion_score_is_the_weighted_mean_of_its_members():
    pad = load_pad(SHIPPED_PAD)
    rng = np.random.default_rng(0)
    frame = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    box = (250.0, 150.0, 120.0, 150.0)
    members = pad.member_scores(frame, box)
    assert members.shape == (2,) and np.all((members >= 0) & (members <= 1))
    assert pad.score(frame, box) == pytest.approx(float(members.mean()))
    assert members[0] == pytest.approx(pad.members[0].score(frame, box))


def _copy_shipped(tmp_path):
    import shutil

    dst = tmp_path / "pad"
    shutil.copytree(SHIPPED_PAD.parent, dst)
    return dst / SHIPPED_PAD.name


def test_a_swapped_pad_member_is_refused_naming_the_file(tmp_path):
    card = _copy_shipped(tmp_path)
    member = card.parent / "MiniFASNetV1SE.onnx"
    member.chmod(0o644)
    data = bytearray(member.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights
    member.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="MiniFASNetV1SE.onnx.*sha256"):
        load_pad(card)


def test_a_pad_recipe_whose_weights_do_not_sum_to_one_is_refused(tmp_path):
    card = _copy_shipped(tmp_path)
    recipe = card.parent / "minifasnet.pad.json"
    raw = json.loads(recipe.read_text())
    raw["members"][0]["weight"] = 0.9
    recipe.chmod(0o644)
    recipe.write_text(json.dumps(raw))
    c = json.loads(card.read_text())  # re-pin the card to the edited recipe: the recipe itself must be refused
    from edge.modelcard import sha256_file
    c["sha256"], c["size_bytes"] = sha256_file(recipe), recipe.stat().st_size
    card.chmod(0o644)
    card.write_text(json.dumps(c))
    with pytest.raises(ModelError, match="sum to 1"):
        load_pad(card)


@pytest.mark.skipif(not FACE_MESH.is_file(), reason="face mesh not fetched (python -m export fetch)")
def test_blink_mode_builds_the_face_mesh(tmp_path):
    cfg = Config()
    cfg.liveness.mode = "passive+blink"
    cfg.models.liveness = str(tiny_pad(tmp_path))
    p = make_pad_policy(cfg)
    assert p.require_cue and p.mesh is not None and p.threshold == p.pad.spec.threshold
