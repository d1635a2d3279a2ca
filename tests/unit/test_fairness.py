"""evaluation.fairness: the person's band (the median of their photos' ITA), refusals counted by it,
and percentiles of refusal points when some faces are never refused."""
import numpy as np
import pytest

from evaluation.fairness import MIN_PERSON_PHOTOS, _spread, crosstab, percentile, person_bands, refusal_table


def photo(key: str, angle: float | None, door: str = "ok", enroll: str = "ok") -> dict:
    if angle is None:  # no face found
        return {"key": key, "band": None}
    return {"key": key, "ita": angle, "band": "-", "enroll": enroll, "door": door}


def test_a_persons_band_is_the_band_of_the_median_of_their_photos_ita():
    rows = [photo("ann/1", 60.0), photo("ann/2", -35.0), photo("ann/3", 45.0),  # median 45: light
            photo("bo/1", -40.0), photo("bo/2", 5.0), photo("bo/3", -31.0), photo("bo/4", None),  # median -31: dark
            photo("cy/1", 30.0), photo("cy/2", 30.0)]  # two photos: no band of their own
    assert MIN_PERSON_PHOTOS == 3
    assert person_bands(rows) == {"ann": "light", "bo": "dark"}


def test_refusals_are_counted_by_the_band_asked_for():
    rows = [{"key": f"p{i}/1", "band": "light", "person_band": "brown" if i < 2 else None, "enroll": "ok",
             "door": "backlit" if i == 0 else "ok"} for i in range(4)]
    by_photo, by_person = refusal_table(rows), refusal_table(rows, by="person_band")
    assert by_photo["light"]["faces"] == 4 and by_photo["light"]["door"]["refused"] == 1
    assert by_person["brown"]["faces"] == 2 and by_person["brown"]["door"]["rate"] == 0.5
    assert by_person["light"]["faces"] == 0 and not by_person["brown"]["judged"]


def test_the_crosstab_counts_each_face_by_its_photos_band_and_its_persons():
    rows = [{"key": "a/1", "band": "dark", "person_band": "light"}, {"key": "a/2", "band": "light", "person_band": "light"},
            {"key": "b/1", "band": "dark", "person_band": None}, {"key": "c/1", "band": None}]
    tab = crosstab(rows)
    assert tab["dark"]["light"] == 1 and tab["dark"]["none"] == 1 and tab["light"]["light"] == 1
    assert sum(sum(row.values()) for row in tab.values()) == 3  # the face not found is in no band


def test_a_percentile_among_faces_never_refused_is_never_not_nan():
    never = np.inf
    # refused at 1, 2 and 3 stops, one face never: the 90th percentile lies past the last refusal
    assert percentile(np.array([1.0, 2.0, 3.0, never]), 90) == never
    assert percentile(np.array([1.0, 2.0, 3.0, never]), 50) == 2.5
    assert percentile(np.array([never, never]), 50) == never
    assert percentile(np.array([1.0, never]), 0) == 1.0  # lands on the refusal itself
    spread = _spread(np.array([1.0, 2.0] + [never] * 8))
    assert spread["median"] == never and spread["p10"] == pytest.approx(1.9)
    assert not np.isnan(spread["median_ci95"] + spread["p10_ci95"]).any()


def test_percentiles_of_refusals_alone_are_numpys():
    x = np.random.default_rng(1).uniform(0.0, 6.0, 50)
    assert percentile(x, [10, 50, 90]).tolist() == np.percentile(x, [10, 50, 90]).tolist()
