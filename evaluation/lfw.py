"""LFW evaluation protocols (../shared/README.md): View 2 pairs and the one-shot 1:N split.

File layout: ``<root>/pairs.txt`` and ``<root>/images/<Name>/<Name>_NNNN.jpg``.
LFW is for evaluation only: nothing here may feed training, tuning or calibration.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edge.errors import FacegateError

_IMAGE = re.compile(r"^(?P<name>.+)_(?P<n>\d{4})\.jpg$")


@dataclass(frozen=True)
class Pair:
    fold: int
    same: bool
    name1: str
    n1: int
    name2: str
    n2: int


def image_path(root: str | Path, name: str, n: int) -> Path:
    return Path(root) / "images" / name / f"{name}_{n:04d}.jpg"


def lfw_pairs(path: str | Path) -> list[Pair]:
    """Parse View 2 ``pairs.txt``: a header ``folds per_fold``, then per fold `per_fold` matched
    lines ``name n1 n2`` followed by `per_fold` mismatched lines ``name1 n1 name2 n2``."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise FacegateError(path, "LFW pairs file not found") from None
    except UnicodeDecodeError as e:
        raise FacegateError(path, f"not a text file: {e}") from None
    lines = [ln for ln in lines if ln.strip()]
    if not lines:
        raise FacegateError(path, "empty pairs file")
    try:
        folds, per_fold = (int(x) for x in lines[0].split())
    except ValueError:
        raise FacegateError(path, f"line 1: expected '<folds> <pairs per fold>', got {lines[0]!r}") from None
    expected = 1 + folds * 2 * per_fold
    if len(lines) != expected:
        raise FacegateError(path, f"{len(lines)} lines, header promises {expected}")
    pairs = []
    for i, line in enumerate(lines[1:]):
        lineno = i + 2
        fold, pos = divmod(i, 2 * per_fold)
        same = pos < per_fold
        f = line.split()
        try:
            if same and len(f) == 3:
                pairs.append(Pair(fold, True, f[0], int(f[1]), f[0], int(f[2])))
            elif not same and len(f) == 4:
                pairs.append(Pair(fold, False, f[0], int(f[1]), f[2], int(f[3])))
            else:
                kind = "matched 'name n1 n2'" if same else "mismatched 'name1 n1 name2 n2'"
                raise FacegateError(path, f"line {lineno}: expected a {kind} line, got {line!r}")
        except ValueError:
            raise FacegateError(path, f"line {lineno}: image numbers must be integers: {line!r}") from None
    return pairs


def first_pairs_per_fold(pairs: list[Pair], n: int) -> list[Pair]:
    """A quick-look subset, never the protocol's figures: the first n pairs of each kind per fold."""
    seen: dict = {}
    out = []
    for p in pairs:
        k = (p.fold, p.same)
        if seen.get(k, 0) < n:
            out.append(p)
            seen[k] = seen.get(k, 0) + 1
    return out


@dataclass(frozen=True)
class OneToNSplit:
    gallery: dict[str, Path]  # identity -> its _0001 image (one enrollment photo per person)
    mated: list[tuple[str, Path]]  # (true identity, image): the other images of gallery people
    nonmated: list[tuple[str, Path]]  # (identity, image): people with exactly one image


def one_to_n_split(root: str | Path) -> OneToNSplit:
    """The one-shot open-set 1:N protocol: gallery = ``_0001`` of each person with two or more
    images, mated probes = their other images, non-mated probes = the people with one image."""
    images = Path(root) / "images"
    if not images.is_dir():
        raise FacegateError(images, "LFW images folder not found")
    gallery, mated, nonmated = {}, [], []
    for person in sorted(p for p in images.iterdir() if p.is_dir()):
        files = sorted(f for f in person.iterdir() if _is_image_of(f, person.name))
        if not files:
            continue
        first = person / f"{person.name}_0001.jpg"
        if first not in files:
            raise FacegateError(person, f"no {first.name}: cannot choose the enrollment image")
        if len(files) == 1:
            nonmated.append((person.name, first))
        else:
            gallery[person.name] = first
            mated.extend((person.name, f) for f in files if f != first)
    if not gallery or not nonmated:
        raise FacegateError(images, "no LFW people found (need people with one and with several images)")
    return OneToNSplit(gallery, mated, nonmated)


def _is_image_of(f: Path, name: str) -> bool:
    m = _IMAGE.match(f.name)
    return bool(m) and m.group("name") == name and f.is_file()


def rel(name: str, n: int) -> str:
    """The key of an LFW image in embedding tables: "Name/Name_NNNN.jpg"."""
    return f"{name}/{name}_{n:04d}.jpg"


def pair_scores(pairs: list[Pair], vectors: dict[str, np.ndarray | None]):
    """Cosine scores, same-person labels and fold ids of View 2 pairs, for `evaluation.metrics`.

    `vectors` maps `rel(...)` keys to unit embeddings, None where the face was not acquired:
    such a pair gets a NaN score (an error in the 10-fold accuracy)."""
    s = np.full(len(pairs), np.nan)
    for k, p in enumerate(pairs):
        a, b = vectors[rel(p.name1, p.n1)], vectors[rel(p.name2, p.n2)]
        if a is not None and b is not None:
            s[k] = float(np.dot(a, b))
    return s, np.array([p.same for p in pairs]), np.array([p.fold for p in pairs])


def identify(split: OneToNSplit, vectors: dict[str, np.ndarray | None]):
    """Best enrolled identity and cosine score for every probe, for `evaluation.metrics.open_set_1n`.

    A gallery image whose face was not acquired leaves that person unenrolled (their mated probes
    can then only miss); a probe not acquired gets identity None and a NaN score.
    Returns (mated_best_ids, mated_best_scores, mated_true_ids, nonmated_best_scores)."""
    key = lambda path: f"{path.parent.name}/{path.name}"  # noqa: E731
    enrolled = [(n, vectors[key(p)]) for n, p in split.gallery.items()]
    enrolled = [(n, v) for n, v in enrolled if v is not None]
    if not enrolled:
        raise ValueError("no gallery face was acquired")
    names = [n for n, _ in enrolled]
    g = np.stack([v for _, v in enrolled])

    def search(probes):
        ids, scores = [], np.full(len(probes), np.nan)
        for k, (_, path) in enumerate(probes):
            v = vectors[key(path)]
            if v is None:
                ids.append(None)
                continue
            sims = g @ v
            best = int(np.argmax(sims))
            ids.append(names[best])
            scores[k] = float(sims[best])
        return ids, scores

    m_ids, m_scores = search(split.mated)
    _, n_scores = search(split.nonmated)
    return m_ids, m_scores, [n for n, _ in split.mated], n_scores
