"""`python -m evaluation fairness`: does the quality gate judge the picture or the skin?

Skin tone is estimated per face by the individual typology angle (ITA, Chardon et al. 1991):
ITA = atan((L* - 50) / b*) in degrees, from the median CIELAB L* and b* of three skin patches of
the aligned face (both cheeks and the forehead above the nose bridge), binned into the six usual
bands. ITA of web photos reflects the light as much as the skin: the bands are a proxy, reported
with their counts and 95% intervals, and a band of fewer than MIN_BAND faces is called too small
to judge. A photo's band reads its light too (a light-skinned face in shade or warm light reads
brown or dark), so each person is also given a band of their own (`person_bands`: the band of the
median ITA of all their photos, under many lights, where they have MIN_PERSON_PHOTOS or more):
the photo's band asks whether a check follows the picture's light, the person's whether it
follows the skin.

Reported:
- a graded synthetic exposure set: well-exposed faces of every band darkened, brightened,
  back-lit and blown out step by step (in linear light), and the first step at which the quality
  gate refuses each face, with the reason; drawn by photo band (CelebA) and again by person band
  (CelebA and LFW: CelebA's 259 people hold one dark-skinned person by that measure, LFW more).
  "Well-exposed" is made, not assumed: web photos of the
  darker bands are also darker pictures (ITA reads the light too), so each photo is first exposed
  as a camera's metering would, its whole picture's highlights (99th percentile grey) brought to
  WELL_EXPOSED_P99 (`expose`; `--as-shot` keeps the photos as they are). The face box and
  keypoints are the ones found on the untouched photo, so the table is about the quality checks,
  not the detector;
- the same photos with another skin (`--reskin N`, `reskinned`): the first N graded CelebA faces
  of each band, each given every band's skin by `evaluation.reskin` (the skin's melanin changed,
  the rest of the picture kept) and graded again, the refusal point compared with the same
  photo's: a band's photos differ from another's in their light as well as in their skin, the
  same photo with another skin only in the skin;
- with `--matcher`, what the default matcher makes of the back-lit graded faces step by step
  (`matcher_under`): whether the quality gate refuses where matching suffers, or sooner;
- per band on CelebA and LFW: the share of faces refused at enrollment (`enroll_quality`) and at
  the door (`quality`, before patience), by photo band and by person band;
- per band on LFW's 1:N protocol: FNIR of the mated probes and FPIR of the non-mated probes in the
  band, at the gate's own threshold for the protocol's gallery (evaluation only: nothing is tuned
  on LFW)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.align import align
from edge.errors import FacegateError
from edge.quality import QUALITY_SIZE, QUALITY_TEMPLATE, assess
from edge.quality import linear_light as to_linear
from edge.records import Quality

from .embeddings import subject_face
from .metrics import wilson

BANDS = (("very light", 55.0, 90.0), ("light", 41.0, 55.0), ("intermediate", 28.0, 41.0),
         ("tan", 10.0, 28.0), ("brown", -30.0, 10.0), ("dark", -90.0, -30.0))
MIN_BAND = 100  # fewer faces than this: too small to judge
MIN_PERSON_PHOTOS = 3  # a person's band is the median of at least this many photos' ITA
# Skin patches on the 112x112 ArcFace crop (x0, y0, x1, y1): the cheeks below the eyes and the
# forehead above the nose bridge; clear of eyes, brows, nostrils, lips and, mostly, hair.
SKIN_PATCHES = ((22, 58, 42, 76), (70, 58, 90, 76), (44, 20, 68, 34))


def skin_pixels(crop: np.ndarray) -> np.ndarray:
    """The skin patches' pixels of an aligned face (any per-pixel values: grey, Lab, linear BGR),
    one row each."""
    return np.concatenate([crop[y0:y1, x0:x1].reshape(-1, *crop.shape[2:]) for x0, y0, x1, y1 in SKIN_PATCHES])


def ita(aligned_bgr: np.ndarray) -> float:
    """Individual typology angle of the face's skin patches, degrees (higher = lighter)."""
    lab = cv2.cvtColor(aligned_bgr, cv2.COLOR_BGR2LAB).astype(np.float64)
    skin = skin_pixels(lab)
    ls = skin[:, 0] * (100.0 / 255.0)  # OpenCV's 8-bit L* is scaled to 0..255
    bs = skin[:, 2] - 128.0
    return float(np.degrees(np.arctan2(np.median(ls) - 50.0, np.median(bs))))


def band_of(angle: float) -> str:
    for name, lo, hi in BANDS:
        if lo <= angle < hi:
            return name
    return BANDS[0][0] if angle >= BANDS[0][2] else BANDS[-1][0]


def person_of(key: str) -> str:
    """The person of a photo key 'person/photo' (the datasets' folder per person)."""
    return key.split("/")[0]


def person_bands(rows: list[dict]) -> dict[str, str]:
    """Each person's band (rows keyed 'person/photo', with their photo's "ita"): the band of the
    median ITA over the person's photos, for people with MIN_PERSON_PHOTOS or more. One photo's
    light moves its ITA a band or two; the median of several photos taken under different lights
    is left with the skin and with how the person is usually photographed (an athlete always in
    hard sun), which it cannot tell apart."""
    angles: dict[str, list[float]] = {}
    for r in rows:
        if r.get("ita") is not None:
            angles.setdefault(person_of(r["key"]), []).append(r["ita"])
    return {p: band_of(float(np.median(a))) for p, a in angles.items() if len(a) >= MIN_PERSON_PHOTOS}


# ---------------------------------------------------------------- graded exposure (linear light)

def to_srgb(lin: np.ndarray) -> np.ndarray:
    x = np.clip(lin, 0.0, 1.0)
    y = np.where(x <= 0.0031308, 12.92 * x, 1.055 * x ** (1 / 2.4) - 0.055)
    return np.round(y * 255.0).astype(np.uint8)


# Highlights of a well-exposed picture: near the top of the range, short of clipping (a
# photographer's "expose to the right").
WELL_EXPOSED_P99 = 235.0


def expose(image: np.ndarray, p99: float = WELL_EXPOSED_P99) -> np.ndarray:
    """`image` with its light scaled (in linear light, one gain for the whole picture) so that the
    99th percentile of its grey levels is `p99`: every photo exposed alike for its scene, whatever
    the skin of the person in it."""
    grey = cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    now, want = float(to_linear(np.percentile(grey, 99))), float(to_linear(p99))
    return to_srgb(to_linear(image) * (want / max(now, 1e-6)))


def head_mask(shape, box, feather: float = 0.2) -> np.ndarray:
    """A soft ellipse over the head (a little larger than the face box): 1 inside, 0 outside,
    feathered over `feather` of its radius."""
    h, w = shape[:2]
    x, y, bw, bh = box
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    r = np.sqrt(((xx - (x + bw / 2)) / (bw * 0.8)) ** 2 + ((yy - (y + bh / 2)) / (bh * 0.8)) ** 2)
    return np.clip((1.0 + feather - r) / feather, 0.0, 1.0)


def in_scene(image: np.ndarray, det):
    """The photo with a mirrored margin of one face box on every side, as a door camera sees a
    face inside a larger scene (web crops are often cut close to the head), and the detection
    moved with it."""
    from edge.records import Detection

    x, y, bw, bh = det.box
    mx, my = int(bw), int(bh)
    out = cv2.copyMakeBorder(image, my, my, mx, mx, cv2.BORDER_REFLECT_101)
    moved = Detection((x + mx, y + my, bw, bh), det.keypoints + np.float32([mx, my]), det.score)
    return out, moved


@dataclass(frozen=True)
class Treatment:
    name: str
    steps: tuple[float, ...]
    unit: str
    stops: bool = True  # steps are stops of light: the refusal is also bisected to 1/32 stop


TREATMENTS = (
    Treatment("darkened", (0, 1, 2, 3, 4, 5, 6, 7, 8), "stops less light on the whole picture"),
    Treatment("brightened", (0, 0.5, 1, 1.5, 2, 2.5, 3, 3.5, 4, 4.5, 5, 5.5, 6), "stops more light on the whole picture"),
    Treatment("back-lit", (0, 1, 2, 3, 4, 5, 6), "stops: the surroundings brightened and the face darkened by this much each"),
    Treatment("blown out", (0, 0.5, 1, 2, 4, 8), "peak gain of a light spot on the upper face (linear light, clipped)",
              stops=False),
)


def treat(image: np.ndarray, box, kind: str, step: float) -> np.ndarray:
    lin = to_linear(image)
    if kind == "darkened":
        lin = lin * 2.0 ** -step
    elif kind == "brightened":
        lin = lin * 2.0 ** step
    elif kind == "back-lit":
        m = head_mask(image.shape, box)[..., None]
        lin = lin * (m * 2.0 ** -step + (1 - m) * 2.0 ** step)
    elif kind == "blown out":
        x, y, bw, bh = box
        yy, xx = np.mgrid[:image.shape[0], :image.shape[1]].astype(np.float64)
        spot = np.exp(-(((xx - (x + bw / 2)) / (0.35 * bw)) ** 2 + ((yy - (y + 0.35 * bh)) / (0.3 * bh)) ** 2))
        lin = lin * (1.0 + step * spot[..., None])
    else:
        raise ValueError(kind)
    return to_srgb(lin)


def judge(image: np.ndarray, det, cfg) -> Quality:
    """The door's quality verdict (limits `cfg`) on the face `det` in `image`."""
    return assess(image, det, align(image, det, QUALITY_TEMPLATE, QUALITY_SIZE).image, cfg)


def first_refusal(image: np.ndarray, det, cfg, kind: str, steps) -> tuple[float | None, str]:
    """The first step of `kind` at which the quality gate refuses the face, and why (None: never)."""
    for s in steps:
        img = treat(image, det.box, kind, s)
        q = judge(img, det, cfg)
        if not q.ok:
            return s, q.reason
    return None, "never"


def skin_headroom(image: np.ndarray, det) -> float:
    """Stops of light until the face's own skin (the median of the ITA skin patches, linear
    luminance) reaches white: where brightening starts to blow out this face. A lighter skin
    reflects more light, so it has less headroom in any scene; counting from here puts faces of
    every band on one scale of over-exposure."""
    lin = to_linear(align(image, det, QUALITY_TEMPLATE, QUALITY_SIZE).image)
    lum = lin @ np.array([0.0722, 0.7152, 0.2126])  # BGR -> linear luminance (Rec. 709)
    skin = skin_pixels(lum)
    return float(-np.log2(max(float(np.median(skin)), 1e-6)))


def refusal_point(image: np.ndarray, det, cfg, kind: str, steps, tol: float = 1 / 32) -> tuple[float | None, str]:
    """first_refusal, then bisected between the last passing and the first refusing step to `tol`."""
    s, reason = first_refusal(image, det, cfg, kind, steps)
    if s is None or s == steps[0]:
        return s, reason
    lo, hi = steps[list(steps).index(s) - 1], s
    while hi - lo > tol:
        mid = (lo + hi) / 2
        img = treat(image, det.box, kind, mid)
        if judge(img, det, cfg).ok:
            lo = mid
        else:
            hi = mid
    return hi, reason


def percentile(x: np.ndarray, q, axis=None) -> np.ndarray:
    """np.percentile of refusal points among which inf (never refused) may be. numpy interpolates
    inf - inf to nan, so a percentile between two nevers, or one that lands next to a never, came
    out nan (and a bootstrap interval that skipped the nans was pulled towards the refusals). Here
    a percentile past the last refusal is inf, and one that lands on a refusal is that refusal."""
    x = np.asarray(x, np.float64)
    finite = x[np.isfinite(x)]
    last = float(finite.max()) if finite.size else 0.0
    p = np.percentile(np.where(np.isposinf(x), last + 1e6, x), q, axis=axis)
    return np.where(p > last, np.inf, p)


def _spread(x: np.ndarray, resamples: int = 2000) -> dict:
    """Median and 10th / 90th percentiles, with 95% bootstrap intervals for the median and the
    10th percentile: a tail estimated from a few dozen faces moves a lot between draws."""
    boot = np.random.default_rng(0).choice(x, (resamples, len(x)))
    ci = lambda q: [float(v) for v in percentile(percentile(boot, q, axis=1), [2.5, 97.5])]  # noqa: E731
    return {"median": float(percentile(x, 50)), "p10": float(percentile(x, 10)), "p90": float(percentile(x, 90)),
            "median_ci95": ci(50), "p10_ci95": ci(10)}


def graded(images: list[tuple[np.ndarray, object, str, str]], cfg, shown: int = 5) -> dict:
    """First refusing step and reason per treatment and band, and for treatments in stops the
    refusal bisected to 1/32 stop (`refused_at`: the steps alone round a half-stop gap between
    bands away). `images`: (photo in its scene, its detection, its band, its key), each passing
    the gate untouched; the `shown` faces refused soonest are listed by key, to look at. Brightening is also counted from each face's own skin headroom (skin_headroom):
    stops of light on the picture say as much about the skin as about the exposure, stops past the
    skin's own white point say how blown out the face is."""
    out: dict = {}
    for t in TREATMENTS:
        per_band: dict = {}
        for name, _, _ in BANDS:
            faces = [(img, det) for img, det, b, _ in images if b == name]
            keys = [k for _, _, b, k in images if b == name]
            if not faces:
                continue
            res = [first_refusal(img, det, cfg, t.name, t.steps) for img, det in faces]
            steps = np.array([np.inf if s is None else s for s, _ in res])
            reasons: dict[str, int] = {}
            for _, r in res:
                reasons[r] = reasons.get(r, 0) + 1
            per_band[name] = {"faces": len(res), "median_step": float(np.median(steps)),
                              "p10_step": float(np.percentile(steps, 10)), "p90_step": float(np.percentile(steps, 90)),
                              "reasons": reasons}
            if t.stops:
                fine = np.array([np.inf if s is None else s
                                 for s, _ in (refusal_point(img, det, cfg, t.name, t.steps) for img, det in faces)])
                per_band[name]["refused_at"] = _spread(fine)
                per_band[name]["soonest"] = [[keys[i], float(fine[i])] for i in np.argsort(fine, kind="stable")[:shown]]
            if t.name == "brightened":
                per_band[name]["past_skin_white"] = _spread(np.array([s - skin_headroom(img, det)
                                                                      for s, (img, det) in zip(fine, faces)]))
        out[t.name] = {"unit": t.unit, "steps": list(t.steps), "bands": per_band}
    return out


def matcher_under(kind: str, faces: list[tuple[np.ndarray, object, str, str]], root: Path, keys: list[str], stack,
                  enroll_cfg, steps=(0, 1, 2, 3, 4, 5, 6, 7)) -> dict:
    """What the default matcher makes of the graded faces as `kind` grows, per band: each face's
    score against another photo of its own person, enrolled as the gate enrolls (drop from step 0),
    and its best score against one enrolled photo of every other person (does a darker picture
    look like someone else?). `faces`: (photo in its scene, detection, band, key 'person/photo').
    Tells whether the quality gate refuses where matching suffers, or sooner."""
    from edge.enroll import embed_photo

    def enrolled_from(photos) -> np.ndarray | None:
        """The first of `photos` that enrolls, as the gate enrolls it."""
        for k in photos:
            r = embed_photo(stack, enroll_cfg, cv2.imread(str(root / k)), person_of(k), k)
            if r.ok:
                return r.embedding
        return None

    people = sorted({person_of(k) for k in keys})
    enrolled = {p: v for p in people if (v := enrolled_from(k for k in keys if k.startswith(p + "/"))) is not None}
    enc = stack.encoder
    rows: dict[str, list] = {}
    for img, det, band, key in faces:
        person = person_of(key)
        # the person's next photo, never the probe itself; a face whose next photo does not enroll is left out
        mine = enrolled_from([k for k in keys if k.startswith(person + "/") and k != key][:1])
        if mine is None:
            continue
        others = np.array([v for p, v in enrolled.items() if p != person])
        door = [enc.embed(enc.align(treat(img, det.box, kind, s), det)).vector for s in steps]
        rows.setdefault(band, []).append(([float(mine @ v) for v in door], [float((others @ v).max()) for v in door]))
    out: dict = {"steps": list(steps), "bands": {}}
    for name, _, _ in BANDS:
        if name not in rows:
            continue
        genuine = np.array([g for g, _ in rows[name]])
        stranger = np.array([i for _, i in rows[name]])
        drop = genuine[:, :1] - genuine
        out["bands"][name] = {"faces": len(genuine), "own_score_median": float(np.median(genuine[:, 0])),
                              "genuine_drop_median": np.median(drop, 0).round(4).tolist(),
                              "genuine_drop_p90": np.percentile(drop, 90, axis=0).round(4).tolist(),
                              "stranger_best_median": np.median(stranger, 0).round(4).tolist(),
                              "stranger_best_p90": np.percentile(stranger, 90, axis=0).round(4).tolist()}
    return out


def survey(root: Path, keys: list[str], detector, cfg) -> list[dict]:
    """Each photo's band and its verdicts at enrollment and at the door (nearest-centre face)."""
    rows = []
    for k in keys:
        img = cv2.imread(str(root / k))
        det = subject_face(detector, img) if img is not None else None
        if det is None:
            rows.append({"key": k, "band": None})
            continue
        crop = align(img, det, QUALITY_TEMPLATE, QUALITY_SIZE).image
        enroll, door = assess(img, det, crop, cfg.enroll_quality), assess(img, det, crop, cfg.quality)
        angle = ita(crop)
        rows.append({"key": k, "ita": round(angle, 2), "band": band_of(angle),
                     "enroll": enroll.reason, "door": door.reason})
    people = person_bands(rows)
    for r in rows:
        r["person_band"] = people.get(person_of(r["key"])) if r["band"] is not None else None
    return rows


def refusal_table(rows: list[dict], by: str = "band") -> dict:
    """Per band (the row's `by`: "band" of the photo or "person_band"): faces, refusals at
    enrollment and at the door, with 95% Wilson intervals. A face without a detection is in no band."""
    out = {}
    for name, _, _ in BANDS:
        r = [x for x in rows if x.get(by) == name]
        entry = {"faces": len(r), "people": len({person_of(x["key"]) for x in r}), "judged": len(r) >= MIN_BAND}
        for side in ("enroll", "door"):
            k = sum(x[side] != "ok" for x in r)
            reasons: dict[str, int] = {}
            for x in r:
                if x[side] != "ok":
                    reasons[x[side]] = reasons.get(x[side], 0) + 1
            lo, hi = wilson(k, len(r))
            entry[side] = {"refused": k, "rate": k / len(r) if r else None, "ci95": [lo, hi], "reasons": reasons}
        out[name] = entry
    judged = [n for n, _, _ in BANDS if out[n]["judged"]]
    if len(judged) >= 2:
        light, dark = judged[0], judged[-1]
        out["lightest_vs_darkest_judged"] = {
            "bands": [light, dark],
            **{f"{side}_difference_pp": round(100 * (out[dark][side]["rate"] - out[light][side]["rate"]), 2)
               for side in ("enroll", "door")}}
    return out


def one_to_n_by_band(probes: dict, bands: dict[str, str], threshold: float) -> dict:
    """FNIR of the mated probes and FPIR of the non-mated probes in each band, at `threshold`.
    A probe without a score (not acquired) is a miss / a non-match."""
    out = {}
    for name, _, _ in BANDS:
        mated = [p for p in probes if p["true"] is not None and bands.get(p["key"]) == name]
        nonmated = [p for p in probes if p["true"] is None and bands.get(p["key"]) == name]
        miss = sum(not (p["score"] is not None and p["best"] == p["true"] and p["score"] >= threshold) for p in mated)
        fp = sum(p["score"] is not None and p["score"] >= threshold for p in nonmated)
        out[name] = {"mated": len(mated), "fnir": miss / len(mated) if mated else None, "fnir_ci95": list(wilson(miss, len(mated))),
                     "nonmated": len(nonmated), "fpir": fp / len(nonmated) if nonmated else None,
                     "fpir_ci95": list(wilson(fp, len(nonmated))), "false_positives": fp,
                     "judged": len(mated) >= MIN_BAND and len(nonmated) >= MIN_BAND}
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n, _, _ in BANDS]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    x = np.arange(len(names))
    for ax, (ds, tbl) in zip(axes[:2], report["refusals"].items()):
        for j, side in enumerate(("enroll", "door")):
            rates = np.array([100 * (tbl[n][side]["rate"] or 0) for n in names])
            lo = np.array([100 * tbl[n][side]["ci95"][0] for n in names])
            hi = np.array([100 * tbl[n][side]["ci95"][1] for n in names])
            ax.errorbar(x + (j - 0.5) * 0.2, rates, yerr=[rates - lo, hi - rates], fmt="o", capsize=3,
                        label=f"{'enrollment' if side == 'enroll' else 'door'}")
        ax.set_xticks(x, [f"{n}\n(n={tbl[n]['faces']})" for n in names], fontsize=8)
        ax.set_ylabel("refused (%) with 95% interval")
        ax.set_title(f"{ds}: quality refusals per ITA band")
        ax.legend()
    ax = axes[2]
    for t, r in report["graded"].items():
        med = [r["bands"].get(n, {}).get("refused_at", {}).get("median", np.nan) for n in names]
        if np.isfinite(med).any():
            ax.plot(x, [np.nan if not np.isfinite(m) else m for m in med], "o-", label=t)
    ax.set_xticks(x, names, fontsize=8)
    ax.set_ylabel("stops at which refused (median, 1/32 stop)")
    ax.set_title(f"graded synthetic exposure (CelebA, {'as shot' if report['graded_exposure'] == 'as shot' else 'exposed alike'})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


SKIN_TREATMENTS = ("darkened", "brightened", "back-lit")
# The reading each of these treatments is refused on (edge.quality.Exposure): a skin change that
# leaves it as it was in the photo leaves nothing to tell the skins apart by.
SKIN_READINGS = {"darkened": "highlight", "back-lit": "backlight"}


def reskinned(images: list[tuple[np.ndarray, object, str, str]], cfg, per_band: int) -> dict:
    """The graded set's first `per_band` faces of each band, each given every band's skin
    (evaluation.reskin.as_band: the skin's melanin changed, the picture otherwise as it was), and
    each treatment in stops refused again: by the band of the skin given, the refusal point, and its
    difference from the same photo's with its own skin (`minus_photo`, paired: the photography is
    the same, only the skin differs). Also counted: skins out of reach (a skin blown out in the photo
    cannot be darkened) and renders the gate refuses untouched, with the reason. `by_reading` splits
    the faces by whether the skin given moved the reading the treatment is refused on
    (SKIN_READINGS, read untreated, by more than half a percent): where it did not, the face's
    brightest light is something other than its skin (a catchlight, an eye white, the room), and
    where it did, the skin itself set the reading."""
    from .reskin import CENTRES, as_band

    taken: dict[str, int] = {}
    sources = []
    for img, det, b, key in images:
        if taken.get(b, 0) < per_band:
            sources.append((img, det, key))
            taken[b] = taken.get(b, 0) + 1
    steps = {t.name: t.steps for t in TREATMENTS}
    own = [{k: refusal_point(img, det, cfg, k, steps[k])[0] for k in SKIN_TREATMENTS} for img, det, _ in sources]
    read = [judge(img, det, cfg).exposure for img, det, _ in sources]
    out: dict = {"sources": len(sources), "bands": {}}
    for band in CENTRES:
        found: dict = {"unreachable": 0, "refused_untouched": {}, "ita": [], "at": {k: [] for k in SKIN_TREATMENTS},
                       "minus_photo": {k: [] for k in SKIN_TREATMENTS}, "past_skin_white": [],
                       "moved": {k: [] for k in SKIN_READINGS}}
        for (img, det, _), photo, reading in zip(sources, own, read):
            given = as_band(img, det, band)
            if given is None:
                found["unreachable"] += 1
                continue
            q = judge(given, det, cfg)
            if not q.ok:
                found["refused_untouched"][q.reason] = found["refused_untouched"].get(q.reason, 0) + 1
                continue
            found["ita"].append(ita(align(given, det, QUALITY_TEMPLATE, QUALITY_SIZE).image))
            for k, field in SKIN_READINGS.items():
                found["moved"][k].append(not np.isclose(getattr(q.exposure, field), getattr(reading, field), rtol=0.005, atol=0))
            for k in SKIN_TREATMENTS:
                s = refusal_point(given, det, cfg, k, steps[k])[0]
                s = np.inf if s is None else s
                found["at"][k].append(s)
                found["minus_photo"][k].append(s - (np.inf if photo[k] is None else photo[k]))
                if k == "brightened":
                    found["past_skin_white"].append(s - skin_headroom(given, det))
        faces = len(found["ita"])
        entry = {"faces": faces, "unreachable": found["unreachable"], "refused_untouched": found["refused_untouched"]}
        if faces:
            entry["ita_median"] = float(np.median(found["ita"]))
            entry["refused_at"] = {k: _spread(np.array(v)) for k, v in found["at"].items()}
            # never refused, either side: no difference; on one side only: 8 stops, past every step
            diffs = {k: np.nan_to_num(np.array(v), nan=0.0, posinf=8.0, neginf=-8.0) for k, v in found["minus_photo"].items()}
            entry["minus_photo"] = {k: _spread(d) for k, d in diffs.items()}
            entry["past_skin_white"] = _spread(np.array(found["past_skin_white"]))
            entry["by_reading"] = {}
            for k, moved in found["moved"].items():
                moved = np.array(moved, bool)
                split = {"kept": diffs[k][~moved], "moved": diffs[k][moved]}
                entry["by_reading"][k] = {side: {"faces": len(d), **(_spread(d) if len(d) else {})} for side, d in split.items()}
        out["bands"][band] = entry
    return out


def reskinned_lines(rs: dict) -> list[str]:
    lines = [f"the same photos with another skin ({rs['sources']} CelebA photos of the graded set, each given every "
             "band's skin, the picture otherwise unchanged): refusal point in stops, and minus the same photo's "
             "with its own skin (median [95%]; 10th percentile [95%])"]
    for band, e in rs["bands"].items():
        head = (f"  {band:<13} n={e['faces']:3d} (out of reach {e['unreachable']}, refused untouched "
                f"{e['refused_untouched'] or 0}){'' if e['faces'] >= MIN_BAND else ' (too small to judge)'}")
        if not e["faces"]:
            lines.append(head)
            continue
        lines.append(head + f", ITA median {e['ita_median']:.1f}")
        for k in SKIN_TREATMENTS:
            a, d = e["refused_at"][k], e["minus_photo"][k]
            lines.append(f"    {k:<11} at {a['median']:.2f} [{a['median_ci95'][0]:.2f}, {a['median_ci95'][1]:.2f}]; "
                         f"{a['p10']:.2f} [{a['p10_ci95'][0]:.2f}, {a['p10_ci95'][1]:.2f}]   minus photo "
                         f"{d['median']:+.2f} [{d['median_ci95'][0]:+.2f}, {d['median_ci95'][1]:+.2f}]; "
                         f"{d['p10']:+.2f} [{d['p10_ci95'][0]:+.2f}, {d['p10_ci95'][1]:+.2f}]"
                         + (f"   past the skin's white point {e['past_skin_white']['median']:+.2f}" if k == "brightened" else ""))
            if k in SKIN_READINGS:
                lines.append(f"      {SKIN_READINGS[k]} reading " + "; ".join(
                    f"{'as in the photo' if side == 'kept' else 'moved by the skin'}: {v['faces']} faces"
                    + (f", minus photo {v['median']:+.2f}; {v['p10']:+.2f} [{v['p10_ci95'][0]:+.2f}, {v['p10_ci95'][1]:+.2f}]"
                       if v["faces"] else "") for side, v in e["by_reading"][k].items()))
    return lines


def crosstab(rows: list[dict]) -> dict:
    """Faces per photo band and person band: how far one photo's light moves its band."""
    out = {name: {p: 0 for p, _, _ in BANDS + (("none", 0, 0),)} for name, _, _ in BANDS}
    for r in rows:
        if r["band"] is not None:
            out[r["band"]][r["person_band"] or "none"] += 1
    return out


def graded_set(rows: list[dict], root: Path, detector, cfg, per_band: int, by: str, as_shot: bool) -> list:
    """The graded set: faces of `rows` that pass the door untouched, exposed alike (unless
    `as_shot`) and passing so, up to `per_band` per band (the row's `by`), drawn in a fixed random
    order: (photo in its scene, detection, band, key)."""
    rng = np.random.default_rng(0)
    picked: list = []
    counts: dict[str, int] = {}
    for row in [rows[i] for i in rng.permutation(len(rows))]:
        b = row.get(by)
        if b is None or row["door"] != "ok" or counts.get(b, 0) >= per_band:
            continue
        img = cv2.imread(str(root / row["key"]))
        d = subject_face(detector, img)
        scene, moved = in_scene(img if as_shot else expose(img), d)
        if not judge(scene, moved, cfg).ok:
            continue  # exposing the picture can put its face past a limit
        picked.append((scene, moved, b, row["key"]))
        counts[b] = counts.get(b, 0) + 1
    return picked


def evaluate(celeba: Path, lfw: Path, detector_card: str, out: Path, per_band: int, probes_json: Path | None,
             target_fpirs=(0.003, 0.01), as_shot: bool = False, matcher: bool = False, reskin_per_band: int = 0) -> dict:
    from edge.config import Config
    from edge.detect import load_detector
    cfg = Config()
    det = load_detector(detector_card, 1)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"limits": cfg.quality.model_dump(), "enroll_limits": cfg.enroll_quality.model_dump(), "refusals": {},
                    "refusals_by_person": {}, "photo_vs_person": {},
                    "graded_exposure": "as shot" if as_shot else f"photo's 99th percentile grey at {WELL_EXPOSED_P99:g}"}
    sets = {"CelebA": (celeba, sorted(str(p.relative_to(celeba)) for p in celeba.glob("*/*.jpg"))),
            "LFW": (lfw / "images", sorted(str(p.relative_to(lfw / "images")) for p in (lfw / "images").glob("*/*.jpg")))}
    surveys = {}
    for name, (root, keys) in sets.items():
        surveys[name] = survey(root, keys, det, cfg)
        report["refusals"][name] = refusal_table(surveys[name])
        report["refusals_by_person"][name] = refusal_table(surveys[name], by="person_band")
        report["photo_vs_person"][name] = crosstab(surveys[name])
    pick = lambda ds, by: graded_set(surveys[ds], sets[ds][0], det, cfg.quality, per_band, by, as_shot)  # noqa: E731
    picked = pick("CelebA", "band")
    root = sets["CelebA"][0]
    report["graded"] = graded(picked, cfg.quality)
    if reskin_per_band:
        report["reskinned"] = reskinned(picked, cfg.quality, reskin_per_band)
    report["graded_by_person"] = {ds: graded(pick(ds, "person_band"), cfg.quality) for ds in sets}
    if matcher:
        from edge.pipeline import Stack
        report["matcher_back_lit"] = matcher_under("back-lit", picked, root, sets["CelebA"][1], Stack.from_config(cfg),
                                                   cfg.enroll_quality)
    if probes_json is not None and probes_json.is_file():
        probes = json.loads(probes_json.read_text())
        bands = {r["key"]: r["band"] for r in surveys["LFW"]}
        k = len(probes["gallery"])
        if not all(str(t) in probes.get("gate_thresholds", {}) for t in target_fpirs):
            raise FacegateError(probes_json, "has no gate thresholds for FPIR " + ", ".join(map(str, target_fpirs))
                                + ": write it again with python -m evaluation one-to-n --probes-json")
        report["one_to_n"] = {"row": probes["row"], "gallery": k, "by_target": {}}
        for t in target_fpirs:
            thr = probes["gate_thresholds"][str(t)]  # the gate's own, picked from the enrolled photos
            report["one_to_n"]["by_target"][str(t)] = {"threshold": round(thr, 4),
                                                      "bands": one_to_n_by_band(probes["probes"], bands, thr)}
    plot(report, out / "fairness.png")
    report["png"] = str(out / "fairness.png")
    (out / "fairness.json").write_text(json.dumps(report, indent=1))
    return report


def graded_lines(gr: dict) -> list[str]:
    lines = []
    for t, g in gr.items():
        lines.append(f"  {t} ({g['unit']}):")
        for n, b in g["bands"].items():
            past, fine = b.get("past_skin_white"), b.get("refused_at")
            lines.append(f"    {n:<13} n={b['faces']:3d} median {b['median_step']:g} (10-90%: {b['p10_step']:g}-{b['p90_step']:g}) {b['reasons']}"
                         + (f"; refused at {fine['median']:.2f} stops [{fine['median_ci95'][0]:.2f}, {fine['median_ci95'][1]:.2f}]"
                            f" (10%: {fine['p10']:.2f} [{fine['p10_ci95'][0]:.2f}, {fine['p10_ci95'][1]:.2f}], 90%: {fine['p90']:.2f})"
                            if fine else "")
                         + (f"; stops past the skin's own white point: median {past['median']:+.2f} "
                            f"(10-90%: {past['p10']:+.2f} to {past['p90']:+.2f})" if past else "")
                         + ("" if b["faces"] >= MIN_BAND else " (too small to judge)"))
            if t == "back-lit" and b.get("soonest"):
                lines.append(f"    {'':<13} refused soonest: " + ", ".join(f"{k} {v:.2f}" for k, v in b["soonest"]))
    return lines


def summary(r: dict) -> str:
    lines = []
    for ds, tbl, by in [(ds, t, "photo") for ds, t in r["refusals"].items()] + \
                       [(ds, t, "person") for ds, t in r.get("refusals_by_person", {}).items()]:
        lines.append(f"{ds}: quality refusals per ITA band of the {by} (enrollment / door, 95% interval)")
        for n, _, _ in BANDS:
            e = tbl[n]
            if not e["faces"]:
                lines.append(f"  {n:<13} no faces")
                continue
            f = lambda s: f"{100 * e[s]['rate']:.2f}% [{100 * e[s]['ci95'][0]:.2f}, {100 * e[s]['ci95'][1]:.2f}]"  # noqa: E731
            lines.append(f"  {n:<13} n={e['faces']:5d} ({e['people']:4d} people)  enrollment {f('enroll'):<24} door {f('door'):<24}"
                         f"{'' if e['judged'] else ' (too small to judge)'}")
        if "lightest_vs_darkest_judged" in tbl:
            c = tbl["lightest_vs_darkest_judged"]
            lines.append(f"  {c['bands'][1]} minus {c['bands'][0]}: enrollment {c['enroll_difference_pp']:+.2f} pp, "
                         f"door {c['door_difference_pp']:+.2f} pp")
    for ds, tab in r.get("photo_vs_person", {}).items():
        lines.append(f"{ds}: faces per photo band (rows) by the person's band (columns; none: fewer than "
                     f"{MIN_PERSON_PHOTOS} photos)")
        lines.append(f"  {'':<13} " + " ".join(f"{p:>12}" for p in next(iter(tab.values()))))
        lines += [f"  {n:<13} " + " ".join(f"{v:12d}" for v in row.values()) for n, row in tab.items()]
    for title, gr in [("CelebA, by photo band", r["graded"])] + \
                     [(f"{ds}, by person band", g) for ds, g in r.get("graded_by_person", {}).items()]:
        lines.append(f"graded synthetic exposure, {title}, photos {r['graded_exposure']} "
                     "(median first refusing step per band; reasons):")
        lines += graded_lines(gr)
    if "reskinned" in r:
        lines += reskinned_lines(r["reskinned"])
    if "matcher_back_lit" in r:
        m = r["matcher_back_lit"]
        lines.append("the default matcher on the back-lit graded faces, by stops of back-light "
                     + " ".join(f"{s:g}" for s in m["steps"]) + ":")
        for n, b in m["bands"].items():
            f = lambda v: " ".join(f"{x:.3f}" for x in v)  # noqa: E731
            lines.append(f"    {n:<13} n={b['faces']:3d} own-person score drop, median {f(b['genuine_drop_median'])}; "
                         f"90%: {f(b['genuine_drop_p90'])}")
            lines.append(f"    {'':<13}       best stranger, median {f(b['stranger_best_median'])}; 90%: {f(b['stranger_best_p90'])}")
    if "one_to_n" in r:
        o = r["one_to_n"]
        lines.append(f"LFW 1:N per band at the gate's own threshold (K = {o['gallery']}, {o['row']}):")
        for t, v in o["by_target"].items():
            lines.append(f"  target FPIR {t}: threshold {v['threshold']}")
            for n, b in v["bands"].items():
                if not b["mated"] and not b["nonmated"]:
                    continue
                fn = f"{100 * b['fnir']:.1f}% [{100 * b['fnir_ci95'][0]:.1f}, {100 * b['fnir_ci95'][1]:.1f}]" if b["mated"] else "-"
                fp = f"{b['fpir']:.4f} [{b['fpir_ci95'][0]:.4f}, {b['fpir_ci95'][1]:.4f}]" if b["nonmated"] else "-"
                lines.append(f"    {n:<13} mated {b['mated']:5d} FNIR {fn:<22} non-mated {b['nonmated']:5d} FPIR {fp}"
                             f"{'' if b['judged'] else ' (too small to judge)'}")
    lines.append(f"plot: {r['png']}")
    return "\n".join(lines)


def main(args) -> int:
    r = evaluate(Path(args.celeba), Path(args.lfw), args.detector, Path(args.out), args.per_band,
                 Path(args.probes) if args.probes else None, as_shot=args.as_shot, matcher=args.matcher,
                 reskin_per_band=args.reskin)
    print(summary(r))
    return 0
