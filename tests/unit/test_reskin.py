"""evaluation.reskin: the same photo with another skin, everything else in the picture kept."""
import numpy as np
import pytest

from test_quality import EYES, made_face, scene

MID_SKIN = (110, 140, 190)  # BGR: ITA about 28, with room to go either way


@pytest.mark.parametrize("band", ["very light", "light", "intermediate", "tan", "brown", "dark"])
def test_a_face_is_given_a_bands_skin_and_nothing_else_changes(band):
    from edge.align import align
    from edge.quality import QUALITY_SIZE, QUALITY_TEMPLATE
    from evaluation.fairness import band_of, head_mask, ita
    from evaluation.reskin import CENTRES, as_band

    frame, det = scene(made_face(MID_SKIN, np.random.default_rng(2)))
    given = as_band(frame, det, band)
    assert given is not None
    angle = ita(align(given, det, QUALITY_TEMPLATE, QUALITY_SIZE).image)
    assert band_of(angle) == band and abs(angle - CENTRES[band]) < 4, angle
    outside = head_mask(frame.shape, det.box) == 0
    assert np.array_equal(given[outside], frame[outside])  # the room, the shirt
    x, y = (int(v) for v in np.asarray(EYES[0]) + np.asarray(det.box[:2]))
    white = (slice(y - 2, y + 3), slice(x + 5, x + 8))  # an eye white, beside the iris
    change = np.abs(given[white].astype(int) - frame[white]).max()
    assert change <= 15, change  # white with a little of the skin's colour in it: nearly kept


def test_the_skins_own_light_is_told_from_shine_and_from_other_colours():
    """Per pixel, the part of the light along the skin's colour (fitted on the skin's colour and
    white) is the skin's own; white light reflected off the surface is not, nor a colour the two
    do not explain (an orange wall, with no blue in it)."""
    from evaluation.reskin import NEUTRAL, dichromatic

    skin = np.array([0.2, 0.3, 0.6])
    along = skin / np.linalg.norm(skin)
    pixels = np.array([[2.0 * along + 0.5 * NEUTRAL, 0.8 * NEUTRAL, (0.0, 0.3, 0.8)]])
    own, direction = dichromatic(pixels, skin)
    assert np.allclose(direction, along)
    assert own[0, 0] == pytest.approx(2.0)  # skin with shine on it: its skin part
    assert own[0, 1] == pytest.approx(0.0, abs=1e-9)  # white: all surface
    assert own[0, 2] < 1e-3  # orange: not skin
    assert dichromatic(pixels, skin, np.inf)[0][0, 2] > 1.0  # ... though mostly along the skin's colour


def test_a_skin_blown_out_to_white_cannot_be_darkened():
    from evaluation.reskin import as_band

    frame, det = scene(made_face((255, 255, 255), np.random.default_rng(2)))
    assert as_band(frame, det, "dark") is None


def test_a_face_whose_brightest_pixel_is_a_catchlight_is_refused_at_the_same_back_light_whatever_skin_it_is_given():
    """The graded set with another skin: a matte face whose brightest pixel is the light source
    reflected in its eyes, given every band's skin, is refused at the same back-light as the photo
    itself (the catchlight is not skin), and every rendered face is counted."""
    from edge.config import Config
    from evaluation.fairness import SKIN_TREATMENTS, reskinned
    from test_quality import matte_face

    frame, det = scene(matte_face(MID_SKIN, np.random.default_rng(0)))
    r = reskinned([(frame, det, "tan", "made/1"), (frame, det, "tan", "made/2")], Config().quality, 1)
    assert r["sources"] == 1  # one per band asked for
    assert set(r["bands"]) == {"very light", "light", "intermediate", "tan", "brown", "dark"}
    for band, e in r["bands"].items():
        assert (e["faces"], e["unreachable"], e["refused_untouched"]) == (1, 0, {}), band
        assert set(e["refused_at"]) == set(SKIN_TREATMENTS)
        assert e["minus_photo"]["back-lit"]["median"] == pytest.approx(0.0, abs=1 / 16), (band, e["refused_at"])
        assert (e["by_reading"]["back-lit"]["kept"]["faces"], e["by_reading"]["back-lit"]["moved"]["faces"]) == (1, 0), band


def test_a_face_whose_brightest_pixel_is_its_skin_is_counted_apart_where_a_darker_skin_moves_its_reading():
    """The same matte face without its catchlights: its brightest pixel is the skin's own light,
    so a darker skin lowers the back-light reading and is refused sooner; the report counts such
    faces apart from those whose reading the skin leaves as it was."""
    from edge.config import Config
    from evaluation.fairness import reskinned, reskinned_lines
    from test_quality import matte_face

    face = matte_face(MID_SKIN, np.random.default_rng(0))
    for cx, cy in EYES:
        face[int(cy) - 2:int(cy), int(cx) + 1:int(cx) + 3] = (6, 6, 8)  # the catchlight gone: a pupil
    frame, det = scene(face)
    r = reskinned([(frame, det, "tan", "made/1")], Config().quality, 1)
    dark = r["bands"]["dark"]["by_reading"]["back-lit"]
    assert (dark["kept"]["faces"], dark["moved"]["faces"]) == (0, 1)
    assert dark["moved"]["median"] < -0.5  # a dark skin reflects a fraction of the light
    assert any("moved by the skin: 1 faces, minus photo" in line for line in reskinned_lines(r))
