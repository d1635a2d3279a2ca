"""evaluation.fairness: the person's band (the median of their photos' ITA) and refusals counted by it."""
from evaluation.fairness import MIN_PERSON_PHOTOS, crosstab, person_bands, refusal_table


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
