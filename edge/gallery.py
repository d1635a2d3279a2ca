"""The gallery: one precomputed embedding per enrolled person, encrypted and authenticated at rest.

File layout: MAGIC, then a 12-byte nonce, then AES-256-GCM(JSON payload) with MAGIC as associated
data. The payload is plain JSON (embeddings as base64 float32), so loading never runs code: no
pickle anywhere. A flipped byte or a wrong key fails authentication and the gallery is refused.
Saving is atomic (temp file, fsync, rename, folder fsync): a crash leaves the old or the new file.
A killed save also leaves its temp file, encrypted but holding whoever the save was about to
remove; the next save, and each load no writer is in the middle of, deletes such leftovers.

A person's badge card number (`card`, from the signed bundle) is stored beside their embedding, at
rest only inside the encrypted payload; no two people hold one card. Outside the gallery a card is
named by card_tag only. The payload's version stays 1: a gallery saved before cards existed reads
as people without one (as `id` and `bundle_sequence`, the key is optional).
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import logging
import os
import re
import stat
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from .atomic import atomic_write_bytes
from .errors import GalleryError
from .secretfile import credential_path

MAGIC = b"FACEGATE-GALLERY\x01"
FORMAT = "facegate-gallery"
VERSION = 1
KEY_BYTES = 32
# A card number as a USB HID reader types it (edge.badge): digits and capital letters, so a hex
# card number reads the same whether the reader sends Shift or not.
CARD = r"^[0-9A-Z]{1,32}$"
CARD_TAG_DOMAIN = b"facegate-card-tag-v1\0"  # the tag key is never the gallery key itself

log = logging.getLogger(__name__)


@dataclass
class Person:
    name: str
    embedding: np.ndarray  # float32, L2-normalised
    person_id: str = ""
    enrolled_at: float = 0.0
    expires_at: float | None = None
    card: str = ""  # badge card number (CARD), "" = none; never logged, audited as card_tag only

    def expired(self, now: float) -> bool:
        return self.expires_at is not None and self.expires_at <= now


@dataclass
class Gallery:
    encoder_sha256: str
    dim: int
    people: list[Person] = field(default_factory=list)
    revision: int = 0
    bundle_sequence: int = 0
    _matrix: np.ndarray | None = field(default=None, repr=False, compare=False)

    @property
    def names(self) -> list[str]:
        return [p.name for p in self.people]

    @property
    def matrix(self) -> np.ndarray:
        """K x dim float32, rows L2-normalised; cached until the gallery changes."""
        if self._matrix is None:
            self._matrix = (np.stack([p.embedding for p in self.people]).astype(np.float32)
                            if self.people else np.zeros((0, self.dim), np.float32))
        return self._matrix

    def __len__(self) -> int:
        return len(self.people)

    def card_holder(self, card: str) -> Person | None:
        """The person whose badge is `card`, None when no one's is (or `card` is empty)."""
        return next((p for p in self.people if p.card == card), None) if card else None

    def add(self, person: Person) -> None:
        v = np.asarray(person.embedding, np.float32).reshape(-1)
        if v.shape[0] != self.dim or not np.all(np.isfinite(v)):
            raise GalleryError(None, f"embedding for {person.name!r} has size {v.shape[0]} or non-finite values (gallery dim {self.dim})")
        if person.card and not re.fullmatch(CARD, person.card):
            raise GalleryError(None, f"card of {person.name!r}: digits and capital letters expected, at most 32")
        holder = self.card_holder(person.card)
        if holder is not None and holder.name != person.name:
            # one card opening for two faces would verify whichever stands at the door
            raise GalleryError(None, f"{person.name!r} is given the card {holder.name!r} holds; one card, one person")
        person.embedding = v / max(float(np.linalg.norm(v)), 1e-12)
        self.people = [p for p in self.people if p.name != person.name] + [person]
        self._matrix = None

    def remove(self, name: str) -> bool:
        before = len(self.people)
        self.people = [p for p in self.people if p.name != name]
        self._matrix = None
        return len(self.people) != before

    def expire(self, now: float | None = None) -> list[str]:
        now = time.time() if now is None else now
        gone = [p.name for p in self.people if p.expired(now)]
        for n in gone:
            self.remove(n)
        return gone


def load_key(path: str | Path | None) -> bytes:
    """The 32-byte key: from `path`, or from systemd's credential directory (LoadCredential=)."""
    path = credential_path(path, "gallery.key", "gallery key", "storage.key_file", GalleryError)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise GalleryError(path, f"cannot read gallery key: {e.strerror}") from None
    text = raw.strip()
    if len(text) == 2 * KEY_BYTES:
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) == KEY_BYTES:
        return raw
    raise GalleryError(path, f"gallery key must be {KEY_BYTES} raw bytes or {2 * KEY_BYTES} hex digits")


def card_tag(key: bytes, card: str) -> str:
    """What the audit keeps of a card number: 8 hex digits of an HMAC keyed from the gallery key.
    Enough to tell one site's cards apart (2000 cards share a tag with odds of about 1 in 2000),
    useless without the key: a 26-bit card number has so few values that a plain hash, or its last
    digits beside the site's facility code, would give the number back."""
    tag_key = hmac.new(key, CARD_TAG_DOMAIN, hashlib.sha256).digest()
    return hmac.new(tag_key, card.encode("ascii"), hashlib.sha256).hexdigest()[:8]


def new_key_file(path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, AESGCM.generate_key(bit_length=256).hex().encode() + b"\n", mode=0o600)


def to_bytes(g: Gallery, key: bytes) -> bytes:
    payload = {
        "format": FORMAT, "version": VERSION, "encoder_sha256": g.encoder_sha256, "dim": g.dim,
        "revision": g.revision, "bundle_sequence": g.bundle_sequence,
        "people": [{"name": p.name, "id": p.person_id, "enrolled_at": p.enrolled_at, "expires_at": p.expires_at,
                    "card": p.card, "embedding": base64.b64encode(np.asarray(p.embedding, "<f4").tobytes()).decode()}
                   for p in g.people],
    }
    nonce = os.urandom(12)
    return MAGIC + nonce + AESGCM(key).encrypt(nonce, json.dumps(payload).encode(), MAGIC)


def from_bytes(data: bytes, key: bytes, path: str | Path | None = None, encoder_sha256: str | None = None) -> Gallery:
    if not data.startswith(MAGIC):
        raise GalleryError(path, "not a facegate gallery (bad magic); refusing it")
    body = data[len(MAGIC):]
    if len(body) < 12 + 16:
        raise GalleryError(path, "gallery file is truncated")
    try:
        plain = AESGCM(key).decrypt(body[:12], body[12:], MAGIC)
    except InvalidTag:
        raise GalleryError(path, "gallery failed authentication: wrong key, or the file was modified or truncated") from None
    try:
        p = json.loads(plain)
        if not isinstance(p, dict):
            raise ValueError("payload is not a JSON object")
        if p.get("format") != FORMAT or p.get("version") != VERSION:
            raise ValueError(f"unsupported format {p.get('format')!r} version {p.get('version')!r}")
        dim = int(p["dim"])
        g = Gallery(encoder_sha256=str(p["encoder_sha256"]), dim=dim, revision=int(p["revision"]),
                    bundle_sequence=int(p.get("bundle_sequence", 0)))
        for rec in p["people"]:
            emb = np.frombuffer(base64.b64decode(rec["embedding"], validate=True), "<f4").astype(np.float32)
            g.add(Person(name=str(rec["name"]), embedding=emb, person_id=str(rec.get("id", "")),
                         enrolled_at=float(rec.get("enrolled_at", 0.0)),
                         expires_at=None if rec.get("expires_at") is None else float(rec["expires_at"]),
                         card=str(rec.get("card", ""))))
    except GalleryError as e:
        raise GalleryError(path, e.problem) from None
    except (ValueError, KeyError, TypeError) as e:
        raise GalleryError(path, f"gallery content is malformed: {e}") from None
    if encoder_sha256 is not None and g.encoder_sha256 != encoder_sha256:
        raise GalleryError(path, f"gallery was built with encoder {g.encoder_sha256[:12]}..., but the gate runs "
                                 f"{encoder_sha256[:12]}...; re-enroll with this encoder")
    return g


def _temp_files(path: Path) -> list[Path]:
    """The gallery's own temp files in its folder: edge.atomic.atomic_write_bytes names them
    .<name>.<random>.tmp (tests/unit/test_gallery.py checks the two agree)."""
    pattern = re.compile(re.escape(f".{path.name}.") + r"[A-Za-z0-9_]+\.tmp")
    try:
        names = os.listdir(path.parent)
    except OSError:
        return []
    return [path.parent / n for n in names if pattern.fullmatch(n)]


def remove_temp_files(path: str | Path) -> list[Path]:
    """Delete the temp files killed saves of the gallery at `path` left (regular files and links,
    never a folder); returns those deleted. Only while no save of this gallery is running: writers
    hold edge.bundle.gallery_lock, and save() calls this under it. One that cannot be deleted is
    logged and left: a save, a revocation above all, must not fail for it."""
    gone = []
    for p in _temp_files(Path(path)):
        try:
            if stat.S_ISDIR(os.lstat(p).st_mode):
                continue
            os.unlink(p)
            gone.append(p)
        except FileNotFoundError:
            pass
        except OSError as e:
            log.warning("%s: cannot delete this temp file a killed gallery save left: %s", p, e.strerror)
    return gone


def _remove_temp_files_if_no_writer(path: Path) -> None:
    """remove_temp_files, when the writers' lock (edge.bundle.gallery_lock's <gallery>.lock) is
    free: a held lock means a save may be writing its temp file right now. A missing or unreadable
    lock file is left alone (no lock is created here: a root-owned one would shut the gate user out)."""
    try:
        fd = os.open(path.with_name(path.name + ".lock"), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return  # held by a writer, which cleans up at its own save
    try:
        remove_temp_files(path)
    finally:
        os.close(fd)


def save(g: Gallery, path: str | Path, key: bytes, _hook=None) -> None:
    g.revision += 1
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_temp_files(path)
    atomic_write_bytes(path, to_bytes(g, key), mode=0o600, _hook=_hook)


def load(path: str | Path, key: bytes, encoder_sha256: str | None = None) -> Gallery:
    path = Path(path)
    _remove_temp_files_if_no_writer(path)  # the gate's start and each reload come through here
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise GalleryError(path, "gallery file not found (enroll someone first)") from None
    except OSError as e:
        raise GalleryError(path, f"cannot read gallery: {e.strerror}") from None
    return from_bytes(data, key, path, encoder_sha256)
