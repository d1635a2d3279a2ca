"""Enrollment: one photo per person -> one embedding in the gallery. Photos are not kept."""
from __future__ import annotations

import os
import stat
import time
import unicodedata
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import FacegateError
from .gallery import Gallery, Person
from .imageio import load_image
from .quality import assess_face

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}


@dataclass(frozen=True)
class EnrollResult:
    name: str
    source: str
    ok: bool
    reason: str  # "enrolled" or why the photo was refused
    embedding: np.ndarray | None = None


def embed_photo(stack, quality_cfg, image: np.ndarray, name: str, source: str, probe: bool = False) -> EnrollResult:
    """Exactly one face, passing the quality gate; else a refusal with its reason. An enrollment
    photo is embedded with its mirror image when the stack says so (`stack.enroll_flip`): the
    gallery side can afford the second pass, the door cannot; `probe` photos are embedded as the
    door embeds a frame. Enrollment photos go through `stack.enroller()`: the door encoder's
    full-precision twin where one is installed."""
    dets = stack.detector.detect(image)
    if not dets:
        return EnrollResult(name, source, False, "no face found")
    if len(dets) > 1:
        return EnrollResult(name, source, False, f"{len(dets)} faces found; an enrollment photo must show one")
    encoder = stack.encoder if probe else stack.enroller()
    aligned = encoder.align(image, dets[0])
    a = encoder.card.alignment
    q = assess_face(image, dets[0], aligned.image, a.template, a.size, quality_cfg)
    if not q.ok:
        return EnrollResult(name, source, False, f"low quality: {q.reason} (face {q.face_px:.0f}px, "
                                                 f"detail {q.detail:.3f}, yaw {q.yaw:.2f}, roll {q.roll:.0f} deg, "
                                                 f"highlights {q.exposure.highlight:.0f}, contrast {q.exposure.contrast:.1f} stops, "
                                                 f"backlight {q.exposure.backlight:.2f})")
    mirror = True if stack.enroll_flip and not probe else None
    return EnrollResult(name, source, True, "enrolled", encoder.embed(aligned, mirror).vector)


# Characters that change how a label reads without being seen: controls (newlines, escapes), format
# characters (bidi overrides that reverse the text after them, zero-width joiners and spaces) and
# line or paragraph separators. A name in an audit row, a log line or on a screen must read as
# what is stored, and two people must not differ only by an invisible character.
_HIDDEN_CATEGORIES = {"Cc", "Cf", "Zl", "Zp"}


def label_problem(value: str) -> str | None:
    """Why a person's name or id cannot be enrolled, or None when it can."""
    if not value.strip():
        return "is empty"
    hidden = next((c for c in value if unicodedata.category(c) in _HIDDEN_CATEGORIES), None)
    if hidden is not None:
        return (f"has the invisible or control character U+{ord(hidden):04X} "
                f"({unicodedata.name(hidden, unicodedata.category(hidden))})")
    return None


def entries_in(folder: Path) -> list[Path]:
    """Everything in the folder, each to be enrolled or reported: nothing is skipped unseen."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FacegateError(folder, "enrollment folder not found")
    entries = sorted(folder.iterdir())
    if not entries:
        raise FacegateError(folder, "enrollment folder is empty")
    return entries


def _not_a_photo(p: Path) -> str | None:
    """Why the folder entry `p` is not read as a photo, judged on the entry itself (lstat), or None."""
    if p.name.startswith("."):
        return "hidden file (the name starts with '.'), not read"
    try:
        mode = os.lstat(p).st_mode
    except OSError as e:
        return f"cannot read: {e.strerror}"
    if stat.S_ISLNK(mode):
        return "is a symbolic link, not followed: copy the photo itself into the folder"
    if stat.S_ISDIR(mode):
        return "is a folder; sub-folders are not searched: put each photo directly in the enrollment folder"
    return None  # a FIFO or device is refused by load_image, without waiting on it


def enroll_folder(stack, cfg, folder: Path) -> list[EnrollResult]:
    """File name (without extension) = person's name. Non-images are refused by content, not name;
    every entry of the folder gets a result, so the operator sees each one not enrolled and why."""
    out = []
    for p in entries_in(folder):
        why = _not_a_photo(p)
        if why:
            out.append(EnrollResult(p.stem, str(p), False, why))
            continue
        problem = label_problem(p.stem)
        if problem:
            out.append(EnrollResult(p.stem, str(p), False, f"the file name gives the person's name, which {problem}"))
            continue
        try:
            img = load_image(p)
        except FacegateError as e:
            out.append(EnrollResult(p.stem, str(p), False, e.problem))
            continue
        out.append(embed_photo(stack, cfg.enroll_quality, img, p.stem, str(p)))
    return out


def apply(g: Gallery, results: list[EnrollResult], retention_days: int, now: float | None = None) -> int:
    """Enrols each accepted face for `retention_days` from `now`; the number enrolled. A new photo of
    someone already enrolled is not a new person: they keep their id and badge card (so badge + face
    still opens for them), and an end their signed bundle set is never pushed back (re-photographing
    renews the picture, not the authorisation)."""
    now = time.time() if now is None else now
    n = 0
    for r in results:
        if r.ok:
            end = now + retention_days * 86400.0
            was = next((p for p in g.people if p.name == r.name), None)
            if was is None:
                g.add(Person(r.name, r.embedding, "", now, end))
            else:
                end = end if was.expires_at is None else min(end, was.expires_at)
                g.add(Person(r.name, r.embedding, was.person_id, now, end, card=was.card))
            n += 1
    return n


@dataclass(frozen=True)
class Duplicate:
    """A person being enrolled whom the gate would take for another enrolled person."""
    name: str
    other: str  # already in the gallery, or enrolled in the same run
    score: float  # as the gate scores the pair (AS-norm with a cohort, else cosine)
    threshold: float  # the gate's 1:N threshold for the gallery with them in it

    def problem(self) -> str:
        return (f"the same face as {self.other!r} (score {self.score:.3f}, at or above the gate's threshold "
                f"{self.threshold:.3f}): the gate could open for one as the other")


def duplicate_faces(stack, match_cfg, g: Gallery, names: list[str]) -> list[Duplicate]:
    """Those of `names` (people of g) whose gallery embedding the gate, searching g as it would
    after a reload, scores at or above its threshold against another person of g."""
    from .pipeline import Matcher

    if not names:
        return []
    matcher = Matcher(match_cfg, stack, g)
    embedding = {p.name: p.embedding for p in g.people}
    out = []
    for name in names:
        best = matcher.match(embedding[name])
        # the person themself is normally the best: the nearest other is whichever of the two is not
        other = next((n for n in (best.identity, best.runner_up) if n not in (None, name)), None)
        if other is None:
            continue
        score = matcher.match(embedding[name], claim=other).score
        if score >= matcher.threshold_1n:
            out.append(Duplicate(name, other, score, matcher.threshold_1n))
    return out


def screen_duplicates(stack, match_cfg, g: Gallery, results: list[EnrollResult], retention_days: int,
                      now: float) -> list[Duplicate]:
    """duplicate_faces for the people `results` would enroll into g, judged on a copy of g with
    them in it (g itself is unchanged): against everyone already enrolled and still valid at
    `now`, and against each other. A photo replacing a person's own entry is no duplicate."""
    trial = Gallery(g.encoder_sha256, g.dim, list(g.people))
    apply(trial, results, retention_days, now=now)
    trial.expire(now)
    return duplicate_faces(stack, match_cfg, trial, [r.name for r in results if r.ok])


def refuse_duplicates(results: list[EnrollResult], duplicates: list[Duplicate]) -> list[EnrollResult]:
    """`results` with each duplicate refused, naming the person it duplicates."""
    why = {d.name: d for d in duplicates}
    return [replace(r, ok=False, embedding=None,
                    reason=f"{why[r.name].problem()}; if it is one person, keep one name (python -m edge forget "
                           f"NAME); if not (twins), enroll with --allow-duplicate")
            if r.ok and r.name in why else r for r in results]
