"""Face photos -> embeddings through the device pipeline, cached: the one way every evaluation,
calibration and training script here turns a folder of photos into vectors.

The pipeline is the gate's: its detector (the subject of a photo is the detected face nearest the
image centre, `subject_face`), the encoder card's similarity alignment, the gate's quality gate
(its rejections are failures to acquire, counted per reason), the encoder. Every image is
embedded as is and mirrored, so test-time flip is a scoring choice, not a second run.

Cache: one npz per (encoder card, detector card, alignment setting), loaded with
allow_pickle=False, written atomically and every few hundred images, so an interrupted run loses
little.
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
from edge.embed import l2_normalize
from edge.errors import FacegateError
from edge.imageio import load_image
from edge.quality import QUALITY_SIZE, QUALITY_TEMPLATE, assess_face
from edge.records import Detection

FLUSH_EVERY = 500


def nearest_centre(dets, shape) -> int | None:
    """Index of the detected face nearest the image centre, None without one."""
    if not dets:
        return None
    cy, cx = shape[0] / 2.0, shape[1] / 2.0
    return int(np.argmin([(d.centre[0] - cx) ** 2 + (d.centre[1] - cy) ** 2 for d in dets]))


def subject_face(detector, image: np.ndarray) -> Detection | None:
    """The face a photo is of: the detected face nearest the image centre (the protocol's rule,
    ../shared/README.md; a photographer centres the person, while the largest face may be someone
    nearer the lens). Every folder of photos is read with this rule, so an identity means the same
    face in training, calibration and evaluation."""
    dets = detector.detect(image)
    i = nearest_centre(dets, image.shape)
    return None if i is None else dets[i]


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
        det = subject_face(detector, img) if img is not None else None
        if det is None:
            rec[k] = {"ok": False, "quality": "no_face"}
        else:
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
