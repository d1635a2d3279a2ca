"""edge.align: least-squares similarity (Umeyama, no reflection) and the warp onto the template."""
import numpy as np
import pytest

from edge.align import ARCFACE_112, align, similarity_transform
from edge.records import Detection

TEMPLATE = np.asarray(ARCFACE_112, np.float64)


def similarity(scale, deg, tx, ty):
    a = np.radians(deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return np.hstack([scale * r, [[tx], [ty]]])


def apply(m, pts):
    return pts @ m[:, :2].T + m[:, 2]


def test_recovers_a_known_rotation_scale_translation_from_five_points():
    m_true = similarity(1.5, 30.0, 10.0, -5.0)
    m = similarity_transform(TEMPLATE, apply(m_true, TEMPLATE))
    np.testing.assert_allclose(m, m_true, atol=1e-9)


def test_inverse_direction_maps_frame_keypoints_onto_the_template():
    # What align() needs: frame keypoints (template scaled by 2, turned -20 deg, moved) back to the template.
    m_true = similarity(2.0, -20.0, 300.0, 120.0)
    m = similarity_transform(apply(m_true, TEMPLATE), TEMPLATE)
    np.testing.assert_allclose(apply(m, apply(m_true, TEMPLATE)), TEMPLATE, atol=1e-9)
    np.testing.assert_allclose(m[:, :2], similarity(0.5, 20.0, 0, 0)[:, :2], atol=1e-12)


def test_identity():
    np.testing.assert_allclose(similarity_transform(TEMPLATE, TEMPLATE), [[1, 0, 0], [0, 1, 0]], atol=1e-12)


def test_two_points_are_enough():
    # (0,0)->(1,1) and (1,0)->(1,3): scale 2, rotation 90 deg, translation (1,1).
    m = similarity_transform([[0, 0], [1, 0]], [[1, 1], [1, 3]])
    np.testing.assert_allclose(m, [[0, -2, 1], [2, 0, 1]], atol=1e-12)


@pytest.mark.parametrize("src,dst", [
    ([[5.0, 5.0]] * 5, TEMPLATE),  # all points the same
    (TEMPLATE, TEMPLATE[:4]),  # different counts
    (TEMPLATE[:1], TEMPLATE[:1]),  # one point
    (np.zeros((5, 3)), np.zeros((5, 3))),  # not 2-D points
])
def test_degenerate_or_mismatched_points_raise(src, dst):
    with pytest.raises(ValueError):
        similarity_transform(src, dst)


def test_mirrored_points_are_not_aligned_by_a_reflection():
    mirrored = TEMPLATE * [-1.0, 1.0] + [112.0, 0.0]
    m = similarity_transform(mirrored, TEMPLATE)
    a = m[:, :2]
    assert np.linalg.det(a) > 0
    # Still a rotation times a scale: [[c, -s], [s, c]].
    assert a[0, 0] == pytest.approx(a[1, 1], abs=1e-12)
    assert a[0, 1] == pytest.approx(-a[1, 0], abs=1e-12)
    # A reflection would fit perfectly; the rotation cannot, so the mirror is visible as residual error.
    assert np.abs(apply(m, mirrored) - TEMPLATE).max() > 5.0


@pytest.mark.parametrize("size", [(112, 112), (96, 112)])
def test_align_output_has_the_cards_size_and_puts_the_nose_on_the_template(size):
    template = TEMPLATE * [size[0] / 112.0, 1.0]
    m_true = similarity(2.0, 10.0, 40.0, 30.0)
    kps = apply(m_true, template)
    image = np.zeros((400, 400, 3), np.uint8)
    nx, ny = np.round(kps[2]).astype(int)
    image[ny - 3:ny + 4, nx - 3:nx + 4] = 255  # a 7x7 blob on the nose: ~3.5 px after halving
    det = Detection(box=(0.0, 0.0, 300.0, 300.0), keypoints=kps.astype(np.float32), score=0.9)
    out = align(image, det, template, size)
    assert out.image.shape == (size[1], size[0], 3)
    assert out.detection is det
    ys, xs = np.nonzero(out.image[..., 0] > 64)
    assert abs(xs.mean() - template[2, 0]) < 1.0
    assert abs(ys.mean() - template[2, 1]) < 1.0
