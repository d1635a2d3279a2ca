"""edge.detect pure functions: IoU, NMS, BlazeFace's blending NMS, YuNet and BlazeFace decoding,
MediaPipe SSD anchors. No model is loaded."""
import math

import numpy as np
import pytest

from edge.detect import blazeface_decode, iou, nms, ssd_anchors, weighted_nms, yunet_decode


# ---------------------------------------------------------------- iou

@pytest.mark.parametrize("other,expected", [
    ((0, 0, 10, 10), 1.0),  # itself
    ((5, 5, 10, 10), 25 / 175),  # 5x5 corner overlap
    ((0, 0, 5, 5), 0.25),  # contained quarter
    ((10, 0, 10, 10), 0.0),  # touching edge
    ((30, 30, 4, 4), 0.0),  # disjoint
])
def test_iou_by_hand(other, expected):
    got = iou(np.array([0, 0, 10, 10], float), np.array([other], float))
    assert got.shape == (1,)
    assert got[0] == pytest.approx(expected)


def test_iou_of_one_box_with_many_is_elementwise():
    others = np.array([[0, 0, 10, 10], [5, 5, 10, 10], [30, 30, 4, 4]], float)
    np.testing.assert_allclose(iou(np.array([0, 0, 10, 10], float), others), [1.0, 1 / 7, 0.0])


# ---------------------------------------------------------------- nms

def test_nms_keeps_the_best_of_overlapping_boxes_and_every_disjoint_one():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 10, 10], [0, 1, 10, 10]], float)
    scores = np.array([0.9, 0.95, 0.3, 0.5])
    # 1 beats 0 and 3 (IoU 9/11 with each); 2 overlaps nothing.
    assert nms(boxes, scores, 0.3) == [1, 2]


def test_nms_keeps_a_box_whose_overlap_equals_the_threshold():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 5, 5]], float)  # IoU exactly 0.25
    assert nms(boxes, np.array([0.9, 0.8]), 0.25) == [0, 1]
    assert nms(boxes, np.array([0.9, 0.8]), 0.2) == [0]


def test_nms_of_nothing_is_nothing():
    assert nms(np.zeros((0, 4)), np.zeros(0), 0.3) == []


# ---------------------------------------------------------------- weighted_nms

def test_weighted_nms_blends_overlapping_boxes_by_score():
    boxes = np.array([[0, 0, 10, 10], [1, 0, 10, 10], [50, 50, 10, 10]], float)
    kps = np.stack([np.zeros((6, 2)), np.full((6, 2), 5.0), np.full((6, 2), 55.0)])
    scores = np.array([0.9, 0.6, 0.3])
    out = weighted_nms(boxes, kps, scores, 0.3)
    assert len(out) == 2
    box, kp, score = out[0]
    # x = (0 * 0.9 + 1 * 0.6) / 1.5 = 0.4; keypoints (0 * 0.9 + 5 * 0.6) / 1.5 = 2; score of the best box.
    np.testing.assert_allclose(box, [0.4, 0.0, 10.0, 10.0])
    np.testing.assert_allclose(kp, np.full(12, 2.0))
    assert score == pytest.approx(0.9)
    box, kp, score = out[1]
    np.testing.assert_allclose(box, [50, 50, 10, 10])
    np.testing.assert_allclose(kp, np.full(12, 55.0))
    assert score == pytest.approx(0.3)


def test_weighted_nms_keeps_a_degenerate_box_on_its_own():
    # A zero-width regressor output has IoU 0 with itself; it used to leave an empty group and crash.
    boxes = np.array([[0, 0, 0, 10], [20, 20, 10, 10]], float)
    kps = np.stack([np.ones((6, 2)), np.full((6, 2), 3.0)])
    out = weighted_nms(boxes, kps, np.array([0.9, 0.8]), 0.3)
    assert len(out) == 2
    np.testing.assert_allclose(out[0][0], [0, 0, 0, 10])
    np.testing.assert_allclose(out[0][1], np.ones(12))


def test_weighted_nms_with_threshold_one_merges_nothing():
    boxes = np.array([[0, 0, 10, 10], [0, 0, 10, 10]], float)
    out = weighted_nms(boxes, np.zeros((2, 6, 2)), np.array([0.9, 0.8]), 1.0)
    assert [s for _, _, s in out] == pytest.approx([0.9, 0.8])


# ---------------------------------------------------------------- yunet_decode

PAD = 64
STRIDES = [8, 16, 32]


def yunet_maps(pad_w=PAD, pad_h=PAD, strides=STRIDES):
    """All-zero YuNet output maps, shaped as the ONNX model returns them (1, cells, channels)."""
    out = {}
    for s in strides:
        n = (pad_w // s) * (pad_h // s)
        out.update({f"cls_{s}": np.zeros((1, n, 1), np.float32), f"obj_{s}": np.zeros((1, n, 1), np.float32),
                    f"bbox_{s}": np.zeros((1, n, 4), np.float32), f"kps_{s}": np.zeros((1, n, 10), np.float32)})
    return out


def test_yunet_decode_one_strong_cell_by_hand():
    out = yunet_maps()
    # stride 16: a 4x4 grid; row 1, col 2 is cell 6.
    out["cls_16"][0, 6, 0], out["obj_16"][0, 6, 0] = 0.81, 1.0  # score sqrt(0.81) = 0.9
    out["bbox_16"][0, 6] = [0.5, 0.25, math.log(2.0), 0.0]
    kx = np.array([0.1, 0.2, 0.3, 0.4, 0.5], np.float32)
    out["kps_16"][0, 6] = np.stack([kx, -kx], 1).ravel()
    # below the threshold: sqrt(0.25 * 0.25) = 0.25 at stride 8, and 0 everywhere else
    out["cls_8"][0, 0, 0], out["obj_8"][0, 0, 0] = 0.25, 0.25
    boxes, kps, scores = yunet_decode(out, STRIDES, PAD, PAD, 0.5)
    assert scores == pytest.approx([0.9])
    # centre ((2 + 0.5) * 16, (1 + 0.25) * 16) = (40, 20); size (2 * 16, 1 * 16) = (32, 16)
    np.testing.assert_allclose(boxes, [[24.0, 12.0, 32.0, 16.0]], atol=1e-5)
    expected = np.stack([(2 + kx) * 16, (1 - kx) * 16], 1)
    np.testing.assert_allclose(kps[0], expected, atol=1e-5)


def test_yunet_decode_row_and_column_of_a_non_square_input():
    # 64 wide, 32 high at stride 8: an 8x4 grid; cell 13 is row 1, col 5.
    out = yunet_maps(64, 32, [8])
    out["cls_8"][0, 13, 0] = out["obj_8"][0, 13, 0] = 1.0
    boxes, kps, scores = yunet_decode(out, [8], 64, 32, 0.5)
    # zero offsets and log-size 0: a stride-sized box centred on the cell corner (5*8, 1*8)
    np.testing.assert_allclose(boxes, [[36.0, 4.0, 8.0, 8.0]])
    np.testing.assert_allclose(kps[0], np.tile([40.0, 8.0], (5, 1)))


def test_yunet_decode_clips_scores_and_keeps_the_threshold_inclusive():
    out = yunet_maps()
    out["cls_32"][0, 3, 0], out["obj_32"][0, 3, 0] = 1.7, 1.0  # clipped to 1
    out["cls_8"][0, 9, 0], out["obj_8"][0, 9, 0] = 0.5, 0.5  # exactly 0.5
    out["cls_16"][0, 1, 0], out["obj_16"][0, 1, 0] = -1.0, 1.0  # clipped to 0
    _, _, scores = yunet_decode(out, STRIDES, PAD, PAD, 0.5)
    assert sorted(scores.tolist()) == pytest.approx([0.5, 1.0])


def test_yunet_decode_nothing_above_threshold_gives_empty_shaped_arrays():
    boxes, kps, scores = yunet_decode(yunet_maps(), STRIDES, PAD, PAD, 0.5)
    assert boxes.shape == (0, 4) and kps.shape == (0, 5, 2) and scores.shape == (0,)


@pytest.mark.parametrize("name", ["cls_16", "obj_16", "bbox_16", "kps_16"])
def test_yunet_decode_rejects_maps_that_do_not_fit_the_padded_input(name):
    out = yunet_maps()
    out[name] = out[name][:, :-1]  # one cell short, and no cell above the threshold anywhere
    with pytest.raises(ValueError, match=name):
        yunet_decode(out, STRIDES, PAD, PAD, 0.5)


def test_yunet_decode_rejects_a_padded_size_the_model_did_not_see():
    with pytest.raises(ValueError, match="cls_8 has 64 values, expected 96"):
        yunet_decode(yunet_maps(), STRIDES, 96, 64, 0.5)


# ---------------------------------------------------------------- ssd_anchors

def test_blazeface_short_range_anchors():
    a = ssd_anchors(128, [8, 16, 16, 16], [2, 2, 2, 2])
    assert a.shape == (896, 2)  # 16*16*2 + 8*8*6
    np.testing.assert_allclose(a[0], [0.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(a[1], a[0])  # two anchors per cell, same centre
    np.testing.assert_allclose(a[2], [1.5 / 16, 0.5 / 16])  # x runs fastest
    np.testing.assert_allclose(a[31], [15.5 / 16, 0.5 / 16])
    np.testing.assert_allclose(a[32], [0.5 / 16, 1.5 / 16])
    np.testing.assert_allclose(a[511], [15.5 / 16, 15.5 / 16])
    # the three stride-16 layers share an 8x8 grid with 6 anchors per cell
    np.testing.assert_allclose(a[512:518], np.tile([0.5 / 8, 0.5 / 8], (6, 1)))
    np.testing.assert_allclose(a[518], [1.5 / 8, 0.5 / 8])
    np.testing.assert_allclose(a[-1], [7.5 / 8, 7.5 / 8])


def test_ssd_anchors_round_the_grid_up_and_honour_the_offset():
    a = ssd_anchors(100, [32], [1], offset=0.0)  # ceil(100 / 32) = 4
    assert a.shape == (16, 2)
    np.testing.assert_allclose(a[:4], [[0, 0], [0.25, 0], [0.5, 0], [0.75, 0]])


# ---------------------------------------------------------------- blazeface_decode

def test_blazeface_decode_a_hand_made_regressor_row():
    anchors = np.array([[0.5, 0.25], [0.1, 0.1], [0.9, 0.9]], np.float32)
    raw = np.zeros((1, 3, 16), np.float32)
    # /128: dx 0.1, dy -0.05, w 0.25, h 0.5; keypoint j at (+j/128 * 12.8, -j/128 * 6.4)
    raw[0, 0, :4] = [12.8, -6.4, 32.0, 64.0]
    raw[0, 0, 4:] = np.stack([np.arange(6) * 12.8, np.arange(6) * -6.4], 1).ravel()
    raw[0, 1, :4] = [0.0, 0.0, 16.0, 16.0]
    logits = np.array([[[2.0], [0.0], [-1000.0]]], np.float32)
    boxes, kps, scores = blazeface_decode(raw, logits, anchors, 128, 0.6)
    # only anchor 0 passes: sigmoid(2) = 0.8808; sigmoid(0) = 0.5 and sigmoid(-1000) ~ 0 do not
    assert scores == pytest.approx([1 / (1 + math.exp(-2.0))])
    # centre (0.5 + 0.1, 0.25 - 0.05) = (0.6, 0.2); size 0.25 x 0.5
    np.testing.assert_allclose(boxes, [[0.475, -0.05, 0.25, 0.5]], atol=1e-6)
    expected = np.stack([0.5 + np.arange(6) * 0.1, 0.25 - np.arange(6) * 0.05], 1)
    np.testing.assert_allclose(kps[0], expected, atol=1e-6)


def test_blazeface_decode_threshold_is_inclusive_and_logits_do_not_overflow():
    anchors = np.zeros((2, 2), np.float32)
    with np.errstate(over="raise"):
        _, _, scores = blazeface_decode(np.zeros((2, 16), np.float32), np.array([0.0, -1e6], np.float32),
                                        anchors, 128, 0.5)
    assert scores == pytest.approx([0.5])
