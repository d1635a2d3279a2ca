"""edge.quality: pose from keypoints, Laplacian sharpness, and the reason code of each failing check."""
import numpy as np
import pytest

from edge.config import QualityConfig
from edge.quality import assess, pose, sharpness
from edge.records import Detection

EYE_L, EYE_R, NOSE = (40.0, 50.0), (80.0, 50.0), (60.0, 70.0)  # eye distance 40


def kps(le=EYE_L, re=EYE_R, nose=NOSE):
    return np.array([le, re, nose, (45.0, 90.0), (75.0, 90.0)], np.float32)


def rotate(p, deg, about=EYE_L):
    a = np.radians(deg)
    r = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    return tuple(r @ (np.asarray(p) - about) + about)


def test_frontal_face_has_no_yaw_or_roll():
    yaw, roll = pose(kps())
    assert yaw == pytest.approx(0.0, abs=1e-9) and roll == pytest.approx(0.0, abs=1e-9)


@pytest.mark.parametrize("dx,expected", [(20.0, 0.5), (-20.0, -0.5), (10.0, 0.25)])
def test_nose_offset_as_share_of_eye_distance(dx, expected):
    yaw, roll = pose(kps(nose=(60.0 + dx, 70.0)))
    assert yaw == pytest.approx(expected, abs=1e-6) and roll == pytest.approx(0.0, abs=1e-9)


def test_eyes_rotated_30_degrees_give_roll_30_and_no_yaw():
    yaw, roll = pose(kps(re=rotate(EYE_R, 30), nose=rotate(NOSE, 30)))
    assert roll == pytest.approx(30.0, abs=1e-4)
    assert yaw == pytest.approx(0.0, abs=1e-6)


def test_yaw_is_measured_along_the_eye_line_whatever_the_roll():
    # the frontal face turned by half an eye distance, then the whole face rolled 30 degrees
    yaw, roll = pose(kps(re=rotate(EYE_R, 30), nose=rotate((80.0, 70.0), 30)))
    assert (yaw, roll) == (pytest.approx(0.5, abs=1e-6), pytest.approx(30.0, abs=1e-4))


def test_coincident_eyes_count_as_the_worst_pose():
    assert pose(kps(re=EYE_L)) == (1.0, 90.0)


def checkerboard(lo, hi, size=112):
    y, x = np.indices((size, size))
    return np.where((x + y) % 2 == 0, lo, hi).astype(np.uint8)


def test_sharpness_of_flat_and_checkerboard_images():
    assert sharpness(np.full((32, 32), 128, np.uint8)) == 0.0
    # every pixel's 4 neighbours are the other colour: Laplacian +-4 * 10, variance 16 * 100
    assert sharpness(checkerboard(0, 10, 32)) == pytest.approx(1600.0)


# ---------------------------------------------------------------- assess

CFG = QualityConfig(min_face_px=60, min_sharpness=15, max_yaw=0.45, max_roll_deg=25,
                    min_brightness=40, max_brightness=220)
GOOD_BOX = (0.0, 0.0, 100.0, 120.0)


def face(box=GOOD_BOX, keypoints=None):
    return Detection(box=box, keypoints=kps() if keypoints is None else keypoints, score=0.9)


def bgr(gray):
    return np.repeat(gray[..., None], 3, axis=2)


def test_a_good_face_passes_with_its_measurements():
    q = assess(face(), bgr(checkerboard(60, 180)), CFG)
    assert (q.ok, q.reason) == (True, "ok")
    assert q.face_px == 100.0  # the shorter side of the box
    assert q.brightness == pytest.approx(120.0)
    assert q.sharpness == pytest.approx(16 * 120 ** 2)
    assert (q.yaw, q.roll) == (pytest.approx(0.0, abs=1e-9), pytest.approx(0.0, abs=1e-9))


@pytest.mark.parametrize("box,keypoints,image,reason", [
    ((0.0, 0.0, 59.0, 200.0), None, checkerboard(60, 180), "too_small"),
    (GOOD_BOX, kps(nose=(80.0, 70.0)), checkerboard(60, 180), "pose"),  # yaw 0.5
    (GOOD_BOX, kps(re=rotate(EYE_R, 30), nose=rotate(NOSE, 30)), checkerboard(60, 180), "pose"),  # roll 30
    (GOOD_BOX, None, checkerboard(0, 40), "dark"),  # mean 20
    (GOOD_BOX, None, checkerboard(215, 255), "bright"),  # mean 235
    (GOOD_BOX, None, np.full((112, 112), 120, np.uint8), "blurry"),  # sharpness 0
])
def test_each_failing_check_has_its_reason(box, keypoints, image, reason):
    q = assess(face(box, keypoints), bgr(image), CFG)
    assert (q.ok, q.reason) == (False, reason)


def test_brightness_and_sharpness_ignore_the_warp_border():
    # A black 1/8 border (what the warp leaves outside the face) does not make a good face dark or sharp.
    img = np.zeros((112, 112), np.uint8)
    img[14:98, 14:98] = 120
    q = assess(face(), bgr(img), CFG)
    assert q.brightness == pytest.approx(120.0) and q.sharpness == 0.0


def test_checks_report_in_order_size_first():
    q = assess(face((0.0, 0.0, 30.0, 30.0), kps(nose=(80.0, 70.0))), bgr(np.zeros((112, 112), np.uint8)), CFG)
    assert q.reason == "too_small"


def test_enrollment_is_held_to_the_stricter_gate(stack, samples, tmp_path):
    """The same photo can pass the gate's frame check and still be refused as an enrollment
    photo: enrollment uses `enroll_quality` (here a face-size limit the photo misses)."""
    import shutil

    from edge.config import Config
    from edge.enroll import enroll_folder
    from edge.imageio import load_image
    from edge.quality import assess

    cfg = Config()
    cfg.enroll_quality = QualityConfig(min_face_px=1500)
    shutil.copy(samples / "obama.jpg", tmp_path / "obama.jpg")
    img = load_image(tmp_path / "obama.jpg")
    det = max(stack.detector.detect(img), key=lambda d: d.size)
    assert assess(det, stack.encoder.align(img, det).image, cfg.quality).ok
    [r] = enroll_folder(stack, cfg, tmp_path)
    assert not r.ok and "too_small" in r.reason
    assert Config().enroll_quality.max_yaw < Config().quality.max_yaw


def test_quality_is_judged_on_the_arcface_crop_whatever_the_encoders_template(stack, samples):
    """The limits are set on the ArcFace 112 crop: a dlib-template chip is not judged as it is
    (its wider view reads blurrier) but re-aligned to that crop first."""
    from edge.align import ARCFACE_112, DLIB_TEMPLATE_150, align
    from edge.imageio import load_image
    from edge.quality import assess_face

    img = load_image(samples / "obama.jpg")
    det = max(stack.detector.detect(img), key=lambda d: d.size)
    arc = align(img, det, ARCFACE_112, (112, 112)).image
    chip = align(img, det, DLIB_TEMPLATE_150, (150, 150)).image
    q = assess(det, arc, CFG)
    assert assess_face(img, det, chip, DLIB_TEMPLATE_150, (150, 150), CFG) == q
    assert assess_face(img, det, arc, ARCFACE_112, (112, 112), CFG) == q
    assert assess(det, chip, CFG).sharpness < q.sharpness
