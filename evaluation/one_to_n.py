"""The shared evaluation runner: face images -> embeddings through the device pipeline, cached,
then the LFW protocols (../shared/README.md) scored in seconds for any matcher setting.

Used by `python -m evaluation one-to-n`, `python -m evaluation verify` and `python -m export cohort`.
The pipeline is the gate's: our detector (the subject of an image is the detected face nearest
its centre, the README's rule), the encoder card's similarity alignment, the gate's quality gate
(its rejections are failures to acquire, counted per reason), the encoder. Every image is
embedded as is and mirrored, so test-time flip is a scoring choice, not a second run.

Cache: one npz per (encoder card, detector card, alignment setting), loaded with
allow_pickle=False, written atomically and every few thousand images, so an interrupted run loses
little. LFW is for evaluation only: nothing here feeds training or calibration.
"""
from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edge.align import align as align_face
from edge.atomic import atomic_write_bytes
from edge.cohort import as_norm_matrix
from edge.embed import l2_normalize
from edge.errors import FacegateError
from edge.imageio import load_image
from edge.quality import QUALITY_SIZE, QUALITY_TEMPLATE, assess_face

from .timing import median_ms

# A probe refused by the margin rule passes no threshold; a finite sentinel (not NaN) keeps it
# out of the failure-to-acquire count, which NaN means in evaluation.metrics.
REFUSED = -1.0e6
FLUSH_EVERY = 500


# ---------------------------------------------------------------- pure helpers

def nearest_centre(dets, shape) -> int | None:
    """Index of the detected face nearest the image centre (the subject of an LFW image)."""
    if not dets:
        return None
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    return int(np.argmin([(d.centre[0] - cx) ** 2 + (d.centre[1] - cy) ** 2 for d in dets]))


def scaled_template(template, size, scale: float) -> np.ndarray:
    """The template shrunk (scale < 1) or grown about the crop centre: scale 0.9 puts the same
    face 10% smaller in the crop, i.e. the encoder sees a crop 1/0.9 = 1.11x wider."""
    c = np.asarray(size, np.float64) / 2.0
    return c + (np.asarray(template, np.float64) - c) * float(scale)


def jitter_keypoints(kps: np.ndarray, sigma: float, rng: np.random.Generator) -> np.ndarray:
    """Keypoints moved by N(0, sigma * eye distance): the landmark noise between video frames."""
    eye = float(np.linalg.norm(kps[1] - kps[0]))
    return (kps + rng.normal(0.0, sigma * eye, kps.shape)).astype(np.float32)


def combine(vec: np.ndarray, vec_flip: np.ndarray, flip: bool, extra: np.ndarray | None = None) -> np.ndarray:
    """Unit embeddings of each face: as is, or the mean with its mirror (test-time flip), and
    with `extra` (J x N x d, the emulated extra frames) averaged in as well."""
    parts = [vec] + ([vec_flip] if flip else [])
    if extra is not None:
        parts += list(extra)
    return l2_normalize(np.sum(parts, axis=0)).astype(np.float32)


def search_1n(norm: np.ndarray, raw: np.ndarray, min_margin: float = 0.0):
    """Best enrolled column of each probe row by (normalised) score, as edge.match.identify picks
    it, and the score a threshold is applied to: REFUSED where the best raw score beats the
    runner-up's by less than min_margin > 0 (the runner-up is the second by normalised score).
    Returns (best column, decision score, margin)."""
    norm = np.asarray(norm, np.float64)
    raw = np.asarray(raw, np.float64)
    rows = np.arange(norm.shape[0])
    if norm.shape[1] < 2:
        best = np.zeros(norm.shape[0], int)
        return best, norm[rows, best], np.full(norm.shape[0], np.inf)
    top2 = np.argpartition(-norm, 1, axis=1)[:, :2]
    first_is_best = norm[rows, top2[:, 0]] >= norm[rows, top2[:, 1]]
    best = np.where(first_is_best, top2[:, 0], top2[:, 1])
    second = np.where(first_is_best, top2[:, 1], top2[:, 0])
    margin = raw[rows, best] - raw[rows, second]
    # No rule at all when min_margin is 0: with normalised scores the raw margin can be negative.
    score = np.where((margin >= min_margin) | (min_margin <= 0), norm[rows, best], REFUSED)
    return best, score, margin


def fuse(scores: list[np.ndarray], weights: list[float], means: list[float], stds: list[float]) -> np.ndarray:
    """Weighted sum of several encoders' scores, each first standardised by its impostor mean and
    std (measured on the calibration set), so the weights compare like with like."""
    return sum(w * (np.asarray(s, np.float64) - m) / sd for s, w, m, sd in zip(scores, weights, means, stds))


# ---------------------------------------------------------------- the embedding table

@dataclass
class Table:
    """Per image: acquired or not, why not, and its unit embeddings (as is, mirrored, jittered)."""

    keys: list[str]
    ok: np.ndarray  # face found (quality not applied)
    vec: np.ndarray
    vec_flip: np.ndarray
    quality: np.ndarray  # "ok", "no_face", or the quality gate's reason code
    jit: np.ndarray | None = None  # J x N x d embeddings of jittered alignments (multi-frame emulation)
    seconds: float = 0.0
    index: dict = field(default_factory=dict)

    def __post_init__(self):
        self.index = {k: i for i, k in enumerate(self.keys)}

    def rows(self, keys: list[str]) -> np.ndarray:
        return np.asarray([self.index[k] for k in keys], int)

    def acquired(self, gate_quality: bool = True) -> np.ndarray:
        return self.quality == "ok" if gate_quality else self.ok

    def vectors(self, flip: bool = False, frames: int = 1) -> np.ndarray:
        extra = None
        if frames > 1:
            if self.jit is None or len(self.jit) < frames - 1:
                raise ValueError(f"multi-frame emulation of {frames} frames needs {frames - 1} jittered embeddings per image")
            extra = self.jit[: frames - 1]
        return combine(self.vec, self.vec_flip, flip, extra)


def _card_tag(card) -> str:
    """What decides an embedding: the weights and how they are fed (not calibration or notes)."""
    keep = {"sha256", "runtime", "input", "alignment", "embedding", "detector"}
    return hashlib.sha256(json.dumps(card.model_dump(mode="json", include=keep), sort_keys=True).encode()).hexdigest()


def cache_file(cache_dir: Path, encoder, detector, template_scale: float, sigma: float) -> tuple[Path, str]:
    """Cache path and tag: the encoder's and detector's sha256 and full cards (input settings
    count, not only weights), and the alignment settings. Jittered views (multi-frame emulation)
    are added to the same file as they are asked for."""
    settings = {"encoder_sha256": encoder.card.sha256, "encoder_card": _card_tag(encoder.card),
                "detector_sha256": detector.card.sha256, "detector_card": _card_tag(detector.card),
                "template_scale": round(float(template_scale), 6), "jitter_sigma": float(sigma), "layout": 2}
    tag = json.dumps(settings, sort_keys=True)
    name = f"emb_{encoder.card.name}_{hashlib.sha256(tag.encode()).hexdigest()[:16]}.npz"
    return Path(cache_dir) / name, tag


def _jit_stack(rec: dict, keys: list[str], n: int, dim: int) -> np.ndarray:
    z = np.zeros(dim, np.float32)
    return np.stack([np.stack([rec[k]["jit"][j] if len(rec[k].get("jit", ())) > j else z for k in keys])
                     for j in range(n)])


def _save(path: Path, tag: str, qtag: str, rec: dict, dim: int) -> None:
    keys = sorted(rec)
    z = np.zeros(dim, np.float32)
    njit = np.asarray([len(rec[k].get("jit", ())) for k in keys])
    arrays = {"tag": np.asarray(tag), "qtag": np.asarray(qtag), "keys": np.asarray(keys),
              "ok": np.asarray([rec[k]["ok"] for k in keys]),
              # "" = not judged under these quality settings (images of another run sharing the
              # cache): a None here would make an object array that allow_pickle=False refuses.
              "quality": np.asarray([rec[k]["quality"] or "" for k in keys]),
              "vec": np.stack([rec[k].get("vec", z) for k in keys]),
              "vec_flip": np.stack([rec[k].get("vec_flip", z) for k in keys]), "njit": njit}
    if njit.max(initial=0):
        arrays["jit"] = _jit_stack(rec, keys, int(njit.max()), dim)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


def _load(path: Path, tag: str, qtag: str) -> dict:
    """Records from a cache file whose tag matches; the quality verdicts only if made with the
    same quality settings (else they are recomputed, which needs no encoder run)."""
    if not path.is_file():
        return {}
    try:
        z = np.load(path, allow_pickle=False)
        if str(z["tag"]) != tag:
            return {}
        same_q = str(z["qtag"]) == qtag
        jit, njit = (z["jit"], z["njit"]) if "jit" in z.files else (None, None)
        # Each z[name] reads and decodes the whole array again: read each once, copy rows out,
        # or a 13,233-image cache costs gigabytes (rows as views pin a full array each).
        ok, quality, vec, vec_flip = z["ok"], z["quality"], z["vec"], z["vec_flip"]
        rec = {}
        for i, k in enumerate(z["keys"].tolist()):
            r = {"ok": bool(ok[i]), "quality": (str(quality[i]) or None) if same_q else None}
            if r["ok"]:
                r["vec"], r["vec_flip"] = vec[i].copy(), vec_flip[i].copy()
                if jit is not None and njit[i]:
                    r["jit"] = [jit[j, i].copy() for j in range(int(njit[i]))]
            rec[k] = r
        return rec
    except (OSError, KeyError, ValueError) as e:
        print(f"evaluate: ignoring unreadable cache {path}: {e}", file=sys.stderr)
        return {}


class _Progress:
    """tqdm where installed, else a line every few hundred items."""

    def __init__(self, total: int, desc: str, enabled: bool):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enabled = enabled and total > 0
        if self.enabled:
            try:
                from tqdm import tqdm

                self.bar = tqdm(total=total, desc=desc, unit="img", file=sys.stderr)
            except ImportError:
                self.t0 = time.time()

    def update(self, k: int = 1) -> None:
        if not self.enabled:
            return
        self.n += k
        if self.bar is not None:
            self.bar.update(k)
        elif self.n % 500 < k or self.n == self.total:
            print(f"{self.desc}: {self.n}/{self.total} ({time.time() - self.t0:.0f} s)", file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _jittered(img, det, tpl, size, key: str, sigma: float, first: int, count: int) -> list[np.ndarray]:
    """Jittered views first..first+count-1 of one image; view j is the same whatever was cached
    before (the generator is seeded by the image key and always drawn from view 0)."""
    rng = np.random.default_rng(int(hashlib.sha256(key.encode()).hexdigest()[:8], 16))
    out = []
    for j in range(first + count):
        kps = jitter_keypoints(det.keypoints, sigma, rng)
        if j >= first:
            out.append(align_face(img, type(det)(det.box, kps, det.score), tpl, size).image)
    return out


def embed_folder(images_root: str | Path, keys: list[str], detector, encoder, quality_cfg, *,
                 template_scale: float = 1.0, jitter: int = 0, sigma: float = 0.03,
                 cache_dir: str | Path | None = None, progress: bool = True, batch: int = 32) -> Table:
    """Embed `keys` (paths relative to `images_root`) through the device pipeline.

    Both views of every face are stored (as is and mirrored) whatever the encoder's flip setting,
    so flip is chosen when scoring; `jitter` extra
    alignments per image with keypoints moved by N(0, sigma eye distances), seeded by the key,
    emulate further frames of one track. Images already in the cache are not run again."""
    if hasattr(encoder, "members"):  # a fused encoder: each member's table (and cache), combined
        return _fused_table([embed_folder(images_root, keys, detector, m, quality_cfg, template_scale=template_scale,
                                          jitter=jitter, sigma=sigma, cache_dir=cache_dir, progress=progress, batch=batch)
                             for m in encoder.members], encoder.scales, [m.flip for m in encoder.members])
    root = Path(images_root)
    dim = encoder.card.embedding.dim
    # The verdicts depend on the limits and on the crop they judge.
    qtag = json.dumps({**quality_cfg.model_dump(), "crop": [QUALITY_TEMPLATE, QUALITY_SIZE]}, sort_keys=True)
    path = tag = None
    rec: dict = {}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        path, tag = cache_file(Path(cache_dir), encoder, detector, template_scale, sigma)
        rec = _load(path, tag, qtag)
    tpl = scaled_template(encoder.card.alignment.template, encoder.card.alignment.size, template_scale)
    size = encoder.card.alignment.size

    def missing(k):
        r = rec.get(k)
        return r is None or r["quality"] is None or (r["ok"] and len(r.get("jit", ())) < jitter)

    todo = [k for k in keys if missing(k)]
    t0 = time.time()
    bar = _Progress(len(todo), f"embed {encoder.card.name} x{template_scale:g}", progress)
    pending: list[tuple[str, bool, list[np.ndarray]]] = []  # key, has base view, crops

    def flush():
        if not pending:
            return
        crops = [c for _, _, cs in pending for c in cs]
        v = encoder.embed_images(crops, flip=False)
        bases = [cs[0] for _, base, cs in pending if base]
        vf = iter(encoder.embed_images([c[:, ::-1] for c in bases], flip=False) if bases else [])
        i = 0
        for k, base, cs in pending:
            if base:
                rec[k]["vec"], rec[k]["vec_flip"] = v[i], next(vf)
            rec[k].setdefault("jit", []).extend(v[i + base: i + len(cs)])
            i += len(cs)
        pending.clear()

    for n, k in enumerate(todo, 1):
        try:
            img = load_image(root / k)
        except FacegateError:
            img = None
        dets = detector.detect(img) if img is not None else []
        i = nearest_centre(dets, img.shape) if dets else None
        if i is None:
            rec[k] = {"ok": False, "quality": "no_face"}
        else:
            det = dets[i]
            crop = align_face(img, det, tpl, size).image
            q = assess_face(img, det, crop, tpl, size, quality_cfg)
            reason = "ok" if q.ok else q.reason
            have = k in rec and rec[k]["ok"] and "vec" in rec[k]
            if have:
                rec[k]["quality"] = reason  # embeddings cached; the quality settings changed or views are missing
            else:
                rec[k] = {"ok": True, "quality": reason}
            got = len(rec[k].get("jit", ()))
            crops = ([] if have else [crop]) + _jittered(img, det, tpl, size, k, sigma, got, max(0, jitter - got))
            if crops:
                pending.append((k, not have, crops))
            if sum(len(c) for _, _, c in pending) >= batch:
                flush()
        bar.update()
        if path is not None and n % FLUSH_EVERY == 0:
            flush()
            _save(path, tag, qtag, rec, dim)
    flush()
    bar.close()
    if path is not None and todo:
        _save(path, tag, qtag, rec, dim)
    z = np.zeros(dim, np.float32)
    return Table(keys=list(keys), ok=np.asarray([rec[k]["ok"] for k in keys]),
                 vec=np.stack([rec[k].get("vec", z) for k in keys]).astype(np.float32),
                 vec_flip=np.stack([rec[k].get("vec_flip", z) for k in keys]).astype(np.float32),
                 quality=np.asarray([rec[k]["quality"] for k in keys]),
                 jit=_jit_stack(rec, keys, jitter, dim) if jitter else None, seconds=time.time() - t0)


def _fused_table(tables: list[Table], scales: list[float], flips: list[bool] | None = None) -> Table:
    """Member tables of one key list -> the fused encoder's: acquired where every member got the
    face, the first member's quality verdict (the gate judges the first member's crop). A member
    the recipe mirrors at the door (`flips`) enters as the mean of its two views. With test-time
    flip the fused vectors of the face and its mirror are averaged; the gate averages per member
    before concatenating, which differs only by the members' norms of those means. Jittered
    views (multi-frame emulation) have no mirror and enter as they are."""
    from edge.embed import fuse_vectors

    flips = flips or [False] * len(tables)
    ok = np.logical_and.reduce([t.ok for t in tables])
    jit = None
    if all(t.jit is not None for t in tables):
        jit = np.stack([fuse_vectors([t.jit[j] for t in tables], scales) for j in range(len(tables[0].jit))])
    door = [combine(t.vec, t.vec_flip, f) for t, f in zip(tables, flips)]
    mirror = [d if f else t.vec_flip for t, d, f in zip(tables, door, flips)]
    return Table(keys=tables[0].keys, ok=ok, vec=fuse_vectors(door, scales), vec_flip=fuse_vectors(mirror, scales),
                 quality=np.where(ok, tables[0].quality, np.where(tables[0].ok, "no_face", tables[0].quality)),
                 jit=jit, seconds=sum(t.seconds for t in tables))


# ---------------------------------------------------------------- scoring one configuration

@dataclass(frozen=True)
class Scoring:
    """One matcher configuration (a lever setting); every field is a pure scoring choice."""

    flip: bool = False
    gallery_flip: bool = False  # enrollment side only: references embedded with their mirror image
    enroll_twin: bool = False  # references from each member's enrollment table (its fp32 twin) where it has one
    norm: str | None = None  # None (raw cosine) or "asnorm"
    margin: float = 0.0
    frames: int = 1  # > 1: multi-frame emulation (needs the jittered embeddings)
    weights: tuple[float, ...] = (1.0,)  # one per encoder: score fusion when several
    gate_quality: bool = True  # quality-gate rejections are failures to acquire


@dataclass
class Member:
    """One encoder's part in a scoring: its embedding table and (optional) cohort."""

    table: Table
    cohort: object | None = None  # edge.cohort.Cohort
    flip: bool = False  # this member mirrored at the door whatever Scoring.flip says (a fusion recipe's member flip)
    ref_table: Table | None = None  # the same faces as enrollment embeds them (the encoder's fp32 twin)


def score_matrices(members: list[Member], s: Scoring, probe_keys: list[str], ref_keys: list[str]):
    """(decision scores, raw scores) of probes x references: the (fused, normalised) score the
    threshold applies to, and the first encoder's raw cosine (what the margin rule looks at).
    References are the enrolled side (gallery_flip applies to them), probes the door's."""
    if len(members) != len(s.weights):
        raise ValueError("one weight per encoder")
    fused, raw0 = [], None
    for m in members:
        door = s.flip or m.flip
        rt = m.ref_table if s.enroll_twin and m.ref_table is not None else m.table
        p = m.table.vectors(door, s.frames)[m.table.rows(probe_keys)]
        r = rt.vectors(door or s.gallery_flip, s.frames)[rt.rows(ref_keys)]
        raw = p @ r.T
        if raw0 is None:
            raw0 = raw
        if s.norm == "asnorm":
            if m.cohort is None:
                raise ValueError("AS-norm needs a cohort for every encoder")
            fused.append(as_norm_matrix(raw, m.cohort.stats(p), m.cohort.stats(r)))
        elif s.norm is None:
            fused.append(raw)
        else:
            raise ValueError(f"unknown normalisation {s.norm!r}")
    if len(members) == 1:
        return np.asarray(fused[0], np.float64), raw0
    if s.norm == "asnorm":  # already on a common (standardised) scale
        means, stds = [0.0] * len(members), [1.0] * len(members)
    else:
        means = [m.cohort.impostor_mean for m in members]
        stds = [m.cohort.impostor_std for m in members]
    return fuse(fused, list(s.weights), means, stds), raw0


def acquired_mask(members: list[Member], s: Scoring) -> np.ndarray:
    """A face is acquired when every encoder of the fusion got it (same detector, so the same
    detection; the quality gate is the first encoder's, on its own aligned crop)."""
    ok = members[0].table.acquired(s.gate_quality)
    for m in members[1:]:
        ok = ok & m.table.ok
    return ok


def pair_scores(members: list[Member], s: Scoring, pairs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """View 2 pair scores (NaN where a face was not acquired), labels, folds."""
    from .lfw import rel

    a = [rel(p.name1, p.n1) for p in pairs]
    b = [rel(p.name2, p.n2) for p in pairs]
    uniq = sorted(set(a) | set(b))
    pos = {k: i for i, k in enumerate(uniq)}
    full, _ = score_matrices(members, s, uniq, uniq)
    sc = full[[pos[k] for k in a], [pos[k] for k in b]]
    tab = members[0].table
    acq = acquired_mask(members, s)
    ok = acq[tab.rows(a)] & acq[tab.rows(b)]
    return np.where(ok, sc, np.nan), np.array([p.same for p in pairs]), np.array([p.fold for p in pairs])


@dataclass
class OneToN:
    gallery: list[str]  # identity per gallery column (acquired gallery images only)
    probe_keys: list[str]
    true_ids: list[str | None]  # None for non-mated probes
    best: list[str | None]
    score: np.ndarray  # decision score (NaN = not acquired, REFUSED = margin rule)
    margin: np.ndarray


def key_of(path: Path) -> str:
    """An LFW image's key: person/file, relative to images/."""
    return f"{path.parent.name}/{path.name}"


def one_to_n(members: list[Member], s: Scoring, split, gallery_names: list[str] | None = None) -> OneToN:
    """Search every probe of the split against the gallery (or the `gallery_names` subset)."""
    key = key_of
    tab = members[0].table
    acq = acquired_mask(members, s)
    names = [n for n in (gallery_names if gallery_names is not None else split.gallery)
             if acq[tab.index[key(split.gallery[n])]]]
    gkeys = [key(split.gallery[n]) for n in names]
    probes = [(n, key(p)) for n, p in split.mated] + [(None, key(p)) for _, p in split.nonmated]
    pkeys = [k for _, k in probes]
    norm, raw = score_matrices(members, s, pkeys, gkeys)
    best, score, margin = search_1n(norm, raw, s.margin)
    p_ok = acq[tab.rows(pkeys)]
    score = np.where(p_ok, score, np.nan)
    return OneToN(names, pkeys, [n for n, _ in probes], [names[b] if ok else None for b, ok in zip(best, p_ok)],
                  score, margin)


def figures_1n(r: OneToN, fpirs=(0.003, 0.01)):
    """evaluation.metrics.open_set_1n on a search result; also returns the mated/non-mated masks."""
    from .metrics import open_set_1n

    mated = np.array([t is not None for t in r.true_ids])
    ids = np.asarray(r.best, dtype=object)
    res = open_set_1n(ids[mated], r.score[mated], np.asarray(r.true_ids, dtype=object)[mated], r.score[~mated], fpirs)
    return res, mated


def false_matches(r: OneToN, threshold: float) -> list[dict]:
    """Every probe accepted as someone it is not at `threshold`: non-mated probes (strangers let
    in) and mated probes returned as another enrolled person."""
    out = []
    for k, t, b, sc in zip(r.probe_keys, r.true_ids, r.best, r.score):
        if np.isfinite(sc) and sc >= threshold and b != t:
            out.append({"probe": k, "kind": "non-mated" if t is None else "mated, wrong identity",
                        "matched": b, "score": round(float(sc), 4)})
    return sorted(out, key=lambda d: -d["score"])


# ---------------------------------------------------------------- one-to-n

def subset(pairs, split, every: int = 1, pairs_per_fold: int = 0):
    """A quick-look subset, never the protocol's figures: every Nth gallery person (with their
    mated probes) and every Nth non-mated person; the first n pairs of each kind per fold."""
    from .lfw import OneToNSplit

    names = sorted(split.gallery)[::max(every, 1)]
    keep = set(names)
    sub = OneToNSplit({n: split.gallery[n] for n in names}, [(n, p) for n, p in split.mated if n in keep],
                      split.nonmated[::max(every, 1)])
    if pairs_per_fold:
        seen: dict = {}
        out = []
        for p in pairs:
            k = (p.fold, p.same)
            if seen.get(k, 0) < pairs_per_fold:
                out.append(p)
                seen[k] = seen.get(k, 0) + 1
        pairs = out
    return pairs, sub


def verification_figures(members: list[Member], s: Scoring, pairs) -> dict:
    from .metrics import eer, kfold_verification, tar_at_far

    sc, y, f = pair_scores(members, s, pairs)
    k = kfold_verification(sc, y, f)
    return {"lfw_mean": k.mean, "lfw_std": k.std, "tar_at_far_1e-3": tar_at_far(sc[y], sc[~y], 1e-3),
            "eer": eer(sc[y], sc[~y]), "pairs_failed": k.failures}


def threshold_from_k(r: OneToN, table: tuple[list, list], targets=(0.003, 0.01), seed: int = 0,
                     members=None, s=None, split=None) -> list[dict]:
    """The gate's rule (edge.match.threshold_for_gallery: FMR = 1 - (1 - FPIR)^(1/K), read off the
    calibration table) checked on the benchmark: measured FPIR of the non-mated probes with the full
    gallery (K) and with a fixed random half of it (K/2), against the target. With half the
    gallery, the probes of people left out are strangers too (non-mated), not misses."""
    from edge.match import threshold_for_gallery

    rng = np.random.default_rng(seed)
    half = sorted(rng.choice(r.gallery, len(r.gallery) // 2, replace=False).tolist())
    runs = [(len(r.gallery), r)] + ([(len(half), one_to_n(members, s, split, half))] if half else [])
    out = []
    for k, res in runs:
        enrolled = set(res.gallery)
        mated = np.array([t is not None and t in enrolled for t in res.true_ids])
        non = res.score[~mated]
        hit = np.array([b == t for b, t in zip(res.best, res.true_ids)])[mated]
        for target in targets:
            t = threshold_for_gallery(table[0], table[1], target, k)
            passed = np.isfinite(non) & (non >= t)
            ms = res.score[mated]
            out.append({"K": k, "target_fpir": target, "threshold": round(t, 4),
                        "measured_fpir": float(passed.mean()), "false_positives": int(passed.sum()),
                        "nonmated": int(len(non)),
                        "fnir": float(1 - np.mean(hit & np.isfinite(ms) & (ms >= t)))})
    return out


def lever_costs(encoder_card, detector, image: np.ndarray, cohort=None, other_card=None, n: int = 30) -> dict:
    """Per-frame latency each lever adds, here, 1 thread: the encoder's own time for the face
    (flip = the mirror in the same batch), AS-norm (probe x cohort scores and top-k), a second
    encoder (its alignment and embedding). Crop scale and the margin rule cost nothing."""
    from edge.embed import load_encoder

    enc, flipped = load_encoder(encoder_card, 1), load_encoder(encoder_card, 1, flip=True)
    dets = detector.detect(image)
    det = dets[nearest_centre(dets, image.shape)]
    face = enc.align(image, det)
    base = median_ms(lambda: enc.embed(face), n, warmup=1)
    costs = {"encoder_ms": base, "flip_ms": median_ms(lambda: flipped.embed(face), n, warmup=1) - base,
             "margin_ms": 0.0, "crop_scale_ms": 0.0}
    if cohort is not None:
        v = enc.embed(face).vector[None]
        costs["asnorm_ms"] = median_ms(lambda: cohort.stats(v), n, warmup=1)
    if other_card is not None:
        other = load_encoder(other_card, 1)
        costs["fusion_ms"] = median_ms(lambda: other.embed_images([other.align(image, det).image]), n, warmup=1)
    return costs


def _row_text(name: str, v: dict, o: dict, fta: int, cost: str) -> str:
    return (f"{name:<38} {100 * v['lfw_mean']:6.2f} +- {100 * v['lfw_std']:4.2f}  {100 * v['tar_at_far_1e-3']:6.2f}"
            f"  {100 * v['eer']:5.2f}  {100 * o['fnir_0.003']:5.1f}%  {100 * o['fnir_0.01']:5.1f}%"
            f"  {100 * o['rank1']:5.1f}%  {fta:4d}  {cost}")


HEADER = (f"{'configuration':<38} {'LFW 10-fold':>14}  {'TAR@1e-3':>6}  {'EER':>5}  {'FNIR.003':>6}  "
          f"{'FNIR.01':>6}  {'rank-1':>6}  {'FTA':>4}  per-frame cost")


def score_row(members, s: Scoring, pairs, split) -> tuple[dict, OneToN, object]:
    v = verification_figures(members, s, pairs)
    r = one_to_n(members, s, split)
    res, _ = figures_1n(r)
    o = {"fnir_0.003": res.fnir[0.003], "fnir_0.01": res.fnir[0.01], "fpir_0.003": res.fpir[0.003],
         "fpir_0.01": res.fpir[0.01], "threshold_0.003": res.thresholds[0.003], "threshold_0.01": res.thresholds[0.01],
         "rank1": res.rank1, "gallery": len(r.gallery), "mated": int(sum(t is not None for t in r.true_ids)),
         "nonmated": int(sum(t is None for t in r.true_ids))}
    return {**v, **o}, r, res


def main(args) -> int:
    """`python -m evaluation one-to-n`: the LFW protocols of ../shared/README.md through the device
    pipeline, for one configuration or (--levers) each lever alone and combined."""
    from edge.cohort import cohort_path_for, load_cohort
    from edge.config import load_config
    from edge.detect import load_detector
    from edge.embed import enrollment_twin, load_encoder
    from .lfw import lfw_pairs, one_to_n_split
    from edge.modelcard import load_card

    cfg = load_config(args.config)
    lfw = Path(args.lfw)
    if not (lfw / "pairs.txt").is_file():
        raise FacegateError(lfw, "LFW not found (pairs.txt and images/); see ../shared/README.md")
    pairs, split = lfw_pairs(lfw / "pairs.txt"), one_to_n_split(lfw)
    if args.every > 1 or args.pairs_per_fold:
        pairs, split = subset(pairs, split, args.every, args.pairs_per_fold)
        print(f"SUBSET (not the protocol's figures): every {args.every}th person for 1:N, "
              f"{args.pairs_per_fold or 300} pairs of each kind per fold")
    from .lfw import rel

    keys = sorted({f"{p.parent.name}/{p.name}" for p in split.gallery.values()}
                  | {f"{p.parent.name}/{p.name}" for _, p in split.mated + split.nonmated}
                  | {rel(p.name1, p.n1) for p in pairs} | {rel(p.name2, p.n2) for p in pairs})
    det = load_detector(args.detector or cfg.models.detector, 2)
    enc_card = args.encoder or cfg.models.encoder
    frames = max(1, args.frames)

    def table(card, scale=1.0, jitter=0):
        return embed_folder(lfw / "images", keys, det, load_encoder(card, 2), cfg.quality, template_scale=scale,
                            jitter=jitter, cache_dir=args.cache_dir, progress=not args.quiet)

    def cohort_for(card, flip, required):
        _, model = load_card(card)
        p = cohort_path_for(model)
        if not p.is_file() and not required:
            return None
        return load_cohort(p, load_card(card)[0].sha256, flip)

    flip = args.flip or cfg.match.flip
    gflip = cfg.match.enroll_flip if args.enroll_flip is None else args.enroll_flip
    margin = cfg.match.min_margin if args.margin is None else args.margin
    main_t = table(enc_card, args.scale, frames - 1)
    other = None
    if args.fusion:
        card2, _, w = args.fusion.rpartition(":")
        other = (card2, float(w), table(card2))
    want_norm = args.norm == "asnorm"
    # A photo is a whole transaction. With quality.patience_frames > 0 the gate matches a face it
    # keeps refusing once the track's patience runs out, so a photo counts as acquired whatever its
    # quality; with 0 a refused photo is a failure to acquire.
    strict = not args.no_quality and cfg.quality.patience_frames == 0
    # The gallery side as the gate's enrollment makes it: each encoder's fp32 twin where one is
    # installed (models.enroll_encoder), else the encoder itself.
    # Not embedded at all when nothing scores with them (--no-enroll-twin without --levers).
    twins = {}
    for card in [enc_card] + ([other[0]] if other else []) if args.levers or not args.no_enroll_twin else []:
        tw = enrollment_twin(card, (args.enroll_encoder or cfg.models.enroll_encoder) if card == enc_card else None)
        if tw is not None:
            twins[card] = (tw, table(tw, args.scale, frames - 1) if card == enc_card else table(tw))
    twin = not args.no_enroll_twin and bool(twins)

    def members_for(flip, norm, fusion, t=main_t):
        need = norm or fusion
        ref = twins.get(enc_card, (None, None))[1] if t is main_t else None
        ms = [Member(t, cohort_for(enc_card, flip, need) if need else None, ref_table=ref)]
        if fusion:
            ms.append(Member(other[2], cohort_for(other[0], flip or args.fusion_flip, True), flip=args.fusion_flip,
                             ref_table=twins.get(other[0], (None, None))[1]))
        return ms

    def scoring(flip=False, gflip=False, norm=False, margin=0.0, fusion=False, fr=1, tw=False):
        w = (1 - other[1], other[1]) if fusion else (1.0,)
        return Scoring(flip=flip, gallery_flip=gflip, enroll_twin=tw, norm="asnorm" if norm else None, margin=margin,
                       frames=fr, weights=w, gate_quality=strict)

    main_s = scoring(flip, gflip, want_norm, margin, bool(other), frames, twin)
    configs = [("selected: " + _describe(args, flip, gflip, margin, twin), members_for(flip, want_norm, bool(other)),
                main_s, args.scale)]
    if args.levers:
        m = margin or 0.05
        fu = f"fusion {Path(other[0]).name.split('.')[0]}{' (mirrored)' if args.fusion_flip else ''}" if other else ""
        ef, tw = "enrollment flip", "fp32 enrollment"
        # name, flip, enrollment flip, AS-norm, margin, fusion, frames, fp32 enrollment
        lv = [("baseline (ArcFace template x1.0)", False, False, False, 0.0, False, 1, False),
              ("+ flip", True, False, False, 0.0, False, 1, False), (f"+ {ef}", False, True, False, 0.0, False, 1, False),
              ("+ AS-norm", False, False, True, 0.0, False, 1, False), (f"+ margin {m:g}", False, False, False, m, False, 1, False)]
        if twins:
            lv.append((f"+ {tw}", False, False, False, 0.0, False, 1, True))
        if other:
            lv.append((f"+ {fu} w={other[1]:g}", False, False, False, 0.0, True, 1, False))
        if frames > 1:
            lv.append((f"+ multi-frame EMULATION k={frames}", False, False, False, 0.0, False, frames, False))
        lv += [(f"flip + margin {m:g}", True, False, False, m, False, 1, False),
               (f"{ef} + margin {m:g}", False, True, False, m, False, 1, False)]
        if twins:
            lv.append((f"{ef} + {tw}", False, True, False, 0.0, False, 1, True))
        if other:
            lv += [(f"{fu} + margin {m:g}", False, False, False, m, True, 1, False),
                   (f"{ef} + {fu}", False, True, False, 0.0, True, 1, False),
                   (f"{ef} + {fu} + margin {m:g}", False, True, False, m, True, 1, False),
                   (f"flip + {fu}", True, False, False, 0.0, True, 1, False),
                   (f"flip + {fu} + margin {m:g}", True, False, False, m, True, 1, False)]
            if twins:
                lv += [(f"{ef} + {tw} + {fu}", False, True, False, 0.0, True, 1, True),
                       (f"{ef} + {tw} + {fu} + margin {m:g}", False, True, False, m, True, 1, True)]
        lv += [(f"all: flip + AS-norm{' + ' + fu if other else ''} + margin {m:g}", True, False, True, m, bool(other), 1, False)]
        configs = [(n, members_for(f, nm, fs), scoring(f, g, nm, mg, fs, fr, t), 1.0) for n, f, g, nm, mg, fs, fr, t in lv]
        if not args.no_quality:
            # The other quality policy for a few rows: without patience the gate refuses some LFW
            # photos for good; with it (or report-only) it keeps them.
            tag = " [no patience: quality refusals final]" if not strict else " [quality report-only]"
            for n, f, g, nm, mg, fs, fr, t in (lv[0], lv[-1]) + tuple(r for r in lv if r[7] and r[5] and not r[4]):
                sc = Scoring(**{**scoring(f, g, nm, mg, fs, fr, t).__dict__, "gate_quality": not strict})
                configs.append((n + tag, members_for(f, nm, fs), sc, 1.0))
        for sc in args.scales:
            configs.insert(1, (f"crop: template x{sc:g}", [Member(table(enc_card, sc))], scoring(), sc))
        shipped = cfg.models.encoder
        if Path(shipped).resolve() != Path(enc_card).resolve():
            # The configured encoder as the gate runs it, in the same run as the levers it is made of.
            shipped_twin = enrollment_twin(shipped, cfg.models.enroll_encoder)
            ref = table(shipped_twin) if shipped_twin is not None else None
            sc = Scoring(flip=cfg.match.flip, gallery_flip=cfg.match.enroll_flip, enroll_twin=ref is not None,
                         margin=cfg.match.min_margin, gate_quality=strict)
            configs.insert(0, (f"shipped default: {Path(shipped).name.split('.card')[0]}",
                               [Member(table(shipped), ref_table=ref)], sc, 1.0))
    from edge.imageio import load_image

    sample = load_image(lfw / "images" / keys[0])
    c0 = cohort_for(enc_card, False, False)
    costs = lever_costs(enc_card, det, sample, c0, other[0] if other else None)
    if args.levers and Path(cfg.models.encoder).resolve() != Path(enc_card).resolve():
        costs["shipped_default_ms"] = lever_costs(cfg.models.encoder, det, sample)["encoder_ms"]
    report = {"subset": {"every": args.every, "pairs_per_fold": args.pairs_per_fold}, "encoder": str(enc_card), "detector": str(args.detector or cfg.models.detector), "lfw": str(lfw),
              "quality_gate": not args.no_quality, "quality_patience_frames": cfg.quality.patience_frames,
              "costs_ms_1thread": costs, "rows": []}
    qual, counts = np.unique(main_t.quality, return_counts=True)
    report["acquisition"] = {str(q): int(c) for q, c in zip(qual, counts)}
    print(f"encoder {enc_card}; detector {report['detector']}; images {len(keys)}; "
          f"acquisition {report['acquisition']}")
    if not args.no_quality and not strict:
        print(f"quality.patience_frames {cfg.quality.patience_frames}: a photo is a track whose patience ran out, so "
              "faces the quality gate refuses are matched (rows marked [no patience] count them as failures)")
    print(f"per-frame costs here (1 thread, ms): " + ", ".join(f"{k} {v:.2f}" for k, v in costs.items()))
    print(HEADER)
    curves = {}
    for i, (name, ms, s, scale) in enumerate(configs):
        fig, r, res = score_row(ms, s, pairs, split)
        acq = acquired_mask(ms, s)
        fta = int((~acq).sum())
        cost = f"{costs['shipped_default_ms']:.1f} ms" if name.startswith("shipped default") else _cost_of(s, costs, ms)
        print(_row_text(name, fig, fig, fta, cost), flush=True)
        row = {"name": name, "scoring": s.__dict__ | {"template_scale": scale}, "failures_to_acquire": fta,
               "cost": cost, **{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in fig.items()}}
        curves[name] = (res.curve_fpir, res.curve_fnir)
        if i == 0 and args.probes_json:
            # Per probe, for evaluations that slice the protocol (evaluation/fairness.py).
            atomic_write_bytes(args.probes_json, json.dumps({
                "row": name, "gallery": r.gallery, "gallery_keys": [key_of(split.gallery[n]) for n in r.gallery],
                "probes": [{"key": k, "true": t, "best": b, "score": None if not np.isfinite(sc) else float(sc)}
                           for k, t, b, sc in zip(r.probe_keys, r.true_ids, r.best, r.score)]}).encode())
        if i == 0 or name.startswith("all: "):
            row["false_matches_at_fpir_0.003"] = false_matches(r, res.thresholds[0.003])
            tbl = _k_table(ms, s, cohort_for, cfg.models.encoder if name.startswith("shipped default") else enc_card)
            if tbl is not None:
                row["threshold_from_k"] = threshold_from_k(r, tbl[:2], members=ms, s=s, split=split)
                row["threshold_from_k_table"] = tbl[2]
        report["rows"].append(row)
    for row in report["rows"]:
        if "threshold_from_k" in row:
            print(f"\nthreshold from K ({row['name']}; table: {row['threshold_from_k_table']}; never LFW):")
            for c in row["threshold_from_k"]:
                print(f"  K={c['K']:5d} target FPIR {c['target_fpir']:.3f}: threshold {c['threshold']:.4f} -> measured FPIR "
                      f"{c['measured_fpir']:.4f} ({c['false_positives']}/{c['nonmated']}), FNIR {100 * c['fnir']:.1f}%")
        if "false_matches_at_fpir_0.003" in row:
            print(f"\nfalse matches at FPIR 0.003 ({row['name']}):")
            for f in row["false_matches_at_fpir_0.003"]:
                print(f"  {f['probe']:<45} -> {f['matched']:<30} {f['score']:.4f}  ({f['kind']})")
    if args.json:
        atomic_write_bytes(args.json, (json.dumps(report, indent=1, default=_jsonable) + "\n").encode())
        print(f"\nwrote {args.json}")
    if args.det_png:
        try:
            from .plots import det_plot

            det_plot(curves, args.det_png, title="LFW one-shot open-set 1:N", xlabel="FPIR", ylabel="FNIR",
                     marks={"FPIR 0.003": 0.003, "FPIR 0.01": 0.01})
            print(f"wrote {args.det_png}")
        except RuntimeError as e:
            print(f"no DET plot: {e}", file=sys.stderr)
    return 0


def _k_table(ms, s: Scoring, cohort_for, enc_card):
    """The calibration table the gate would use for this scoring, with where it comes from; None
    for fusion (no table). Raw cosine: the card's (celeba), else the cohort file's raw table of
    its calibration half (also celeba); AS-norm: the cohort file's normalised table."""
    if len(ms) > 1:
        return None
    if s.norm == "asnorm":
        return ms[0].cohort.fmr, ms[0].cohort.threshold, "cohort file, AS-norm table"
    from edge.modelcard import load_card

    cal = load_card(enc_card)[0].calibration
    if cal is not None and not s.flip:
        return cal.fmr, cal.threshold, f"model card ({cal.dataset})"
    c = cohort_for(enc_card, s.flip, False)
    return (list(c.raw_fmr), list(c.raw_threshold), "cohort file, raw-cosine table") if c is not None else None


def _cost_of(s: Scoring, costs: dict, ms) -> str:
    extra = 0.0
    parts = []
    if s.flip:
        extra += costs["flip_ms"]
        parts.append("flip")
    if s.norm == "asnorm" and "asnorm_ms" in costs:
        extra += costs["asnorm_ms"]
    if len(ms) > 1 and "fusion_ms" in costs:
        extra += costs["fusion_ms"] * (2 if s.flip or ms[1].flip else 1)
    txt = f"{costs['encoder_ms']:.1f} + {extra:.2f} ms"
    if s.frames > 1:
        txt += f" (+{s.frames - 1} frames wait)"
    return txt


def _describe(args, flip: bool, gflip: bool, margin: float, twin: bool) -> str:
    bits = [f"x{args.scale:g}"] + (["flip"] if flip else []) + (["enrollment flip"] if gflip else [])
    bits += ["fp32 enrollment"] if twin else []
    bits += ([args.norm] if args.norm else []) + ([f"margin {margin:g}"] if margin else [])
    bits += [f"fusion {args.fusion}{' (mirrored)' if args.fusion_flip else ''}"] if args.fusion else []
    bits += [f"frames {args.frames}"] if args.frames > 1 else []
    return " ".join(bits)


def _jsonable(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(type(o))

