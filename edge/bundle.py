"""Signed enrollment bundles: staff photos + a manifest, made on an admin's workstation, applied on
the gate from a USB stick.

A bundle is a folder holding `manifest.json`, `manifest.sig` and the photos it lists, flat (no
sub-folders). `manifest.json` is canonical JSON (sorted keys, no spaces) with the sequence number,
the creation time, the audience (the gate or site it is for) and not_after (when it expires), each
person (name, id, validity, photo file name, its sha256 and size) and the removals (names or ids).
`manifest.sig` is the base64 Ed25519 signature of SIGNING_DOMAIN + sha256(manifest.json bytes);
since the manifest lists every photo's sha256, the one signature covers every byte of the bundle.

On the gate the signature is checked over the raw manifest bytes before they are parsed, so an
unsigned or forged manifest never reaches the JSON parser. Then: strict schema (unknown keys,
duplicate keys, bad names refused), version (1, which names no audience and never expires, only
with enrollment.accept_v1_bundles), audience (one of enrollment.audience), expiry (not_after judged
at the gate's trusted time, edge.clock, so a clock set back revives no stick); all of these before
the gate loads its gallery or a model. Then replay (sequence must exceed the highest applied), size
limits, each photo read once through O_NOFOLLOW (no symlinks, no path separators, no '..') and its
sha256 compared with the signed one. The replay check takes the higher of the gallery's sequence
and the one kept in storage.sequence_file (root's, beside the gallery key), so a lost or
copied-back gallery does not let an old bundle apply again; the gate itself refuses to load a
gallery that records a lower sequence than that store (check_gallery_current). Any of these
failing rejects the whole bundle and nothing changes.
Photos that are intact but fail the quality gate (one face, size, blur, pose) refuse that person
only, as does a face the gate would take for another person, enrolled or in the same bundle
(edge.enroll.screen_duplicates, as `edge enroll` screens). Ids are the stable key: two people under one id refuse the bundle, a person whose id
changes under the same name is refused (the old id goes in the bundle's removals), a removal that
matches more than one enrolled person refuses the bundle. A person's optional `card` (their badge's
number) is part of their record: a reissued badge is the same id with a new card; a card another
person would still hold refuses that person, and two people of one bundle with one card refuse
the bundle. Messages and audit rows name people and card_tag, never a card number. The gallery
is then saved atomically, with bundle_sequence set, and the photos, held in memory only, are
dropped: nothing from the stick is written to the gate or executed.
"""
from __future__ import annotations

import base64
import fcntl
import hashlib
import json
import os
import re
import shutil
import stat
import time
from collections import Counter
from contextlib import contextmanager
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from pathlib import Path

import yaml
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from .atomic import atomic_write_bytes
from .config import AUDIENCE_NAME, EnrollmentConfig
from .enroll import label_problem
from .errors import AuditError, BundleError, FacegateError, GalleryError, StorageError
from .gallery import CARD, card_tag
from .imageio import read_refusal, read_regular_file

MANIFEST = "manifest.json"
SIGNATURE = "manifest.sig"
FORMAT = "facegate-bundle"
VERSION = 2  # 2 added audience and not_after; the gate takes 1 only with enrollment.accept_v1_bundles
SIGNING_DOMAIN = b"facegate-bundle-v1\0"  # a signature over a bundle can never pass for anything else
MAX_MANIFEST_BYTES = 1 << 20
MAX_SIGNATURE_BYTES = 1024
MAX_PHOTO_BYTES = 20 << 20
MAX_BUNDLE_BYTES = 512 << 20
MAX_PEOPLE = 2000
# A stick lost or kept back is a key to the door until it expires: days, not years.
DEFAULT_VALID_DAYS = 7.0
MAX_VALID_DAYS = 90.0
# A photo is one plain file name: no separators, no leading dot (so no '.', '..' or hidden files).
_PHOTO_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def _check_photo_name(name: str) -> str:
    if "\0" in name:
        raise ValueError("photo name contains NUL")
    if "/" in name or "\\" in name or os.path.isabs(name):
        raise ValueError(f"photo {name!r} is a path; a bundle holds plain file names only")
    if ".." in name:
        raise ValueError(f"photo {name!r} contains '..'")
    if not _PHOTO_NAME.match(name):
        raise ValueError(f"photo {name!r}: use letters, digits, '.', '_' and '-' (max 128, not starting with '.')")
    return name


def _check_label(value: str, what: str) -> str:
    problem = label_problem(value)
    if problem:
        raise ValueError(f"{what} {value!r} {problem}")
    return value


def to_epoch(value, what: str) -> float:
    """A YAML date / datetime or an ISO 8601 string as UTC epoch seconds (naive = UTC)."""
    if isinstance(value, datetime):
        dt = value
    elif isinstance(value, date):
        dt = datetime(value.year, value.month, value.day)
    elif isinstance(value, str):
        try:
            dt = datetime.fromisoformat(value.replace("Z", "+00:00"))
        except ValueError:
            raise ValueError(f"{what}: {value!r} is not an ISO 8601 date") from None
    else:
        raise ValueError(f"{what}: date expected, got {type(value).__name__}")
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return dt.timestamp()


def iso(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class BundlePerson(_Strict):
    name: str = Field(min_length=1, max_length=100)
    id: str = Field("", max_length=100)
    photo: str
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    size: int = Field(ge=1, le=MAX_PHOTO_BYTES)
    valid_from: str | None = None
    valid_until: str | None = None
    card: str | None = Field(None, pattern=CARD)

    @field_validator("photo")
    @classmethod
    def _photo(cls, v: str) -> str:
        return _check_photo_name(v)

    @field_validator("name", "id")
    @classmethod
    def _label(cls, v: str, info) -> str:
        return v if info.field_name == "id" and v == "" else _check_label(v, info.field_name)

    @field_validator("valid_from", "valid_until")
    @classmethod
    def _date(cls, v: str | None, info) -> str | None:
        if v is not None:
            to_epoch(v, info.field_name)
        return v


class Manifest(_Strict):
    format: str = Field(pattern=f"^{FORMAT}$")
    version: int = Field(ge=1, le=VERSION)
    sequence: int = Field(ge=1, lt=2**53)
    created: str
    audience: str | None = Field(None, pattern=AUDIENCE_NAME)
    not_after: str | None = None
    people: list[BundlePerson] = Field(default_factory=list, max_length=MAX_PEOPLE)
    removals: list[str] = Field(default_factory=list, max_length=MAX_PEOPLE)

    @field_validator("created", "not_after")
    @classmethod
    def _time(cls, v: str | None, info) -> str | None:
        if v is not None:
            to_epoch(v, info.field_name)
        return v

    @model_validator(mode="after")
    def _fields_of_version(self):
        given = [k for k in ("audience", "not_after") if getattr(self, k) is not None]
        if self.version >= 2 and len(given) < 2:
            raise ValueError(f"version {self.version} needs audience and not_after")
        if self.version == 1 and given:
            raise ValueError(f"version 1 has no {' or '.join(given)}")
        return self

    @field_validator("removals")
    @classmethod
    def _removals(cls, v: list[str]) -> list[str]:
        return [_check_label(r, "removal") for r in v]

    def check_consistent(self) -> None:
        """Cross-field rules: unique names and photos, no one both added and removed, totals bounded."""
        names = [p.name for p in self.people]
        photos = [p.photo for p in self.people]
        ids = [p.id for p in self.people if p.id]  # the stable key: two people under one id would be one
        for what, items in (("name", names), ("photo", photos), ("id", ids)):
            dup = sorted(x for x, n in Counter(items).items() if n > 1)
            if dup:
                raise ValueError(f"duplicate {what}(s): {', '.join(dup)}")
        cards = Counter(p.card for p in self.people if p.card)
        shared = [p.name for p in self.people if cards[p.card] > 1]  # by name: a card number is never shown
        if shared:
            raise ValueError(f"one card given to more than one person: {', '.join(shared)}")
        both = (set(names) | {p.id for p in self.people if p.id}) & set(self.removals)
        if both:
            raise ValueError(f"both enrolled and removed: {', '.join(sorted(both))}")
        total = sum(p.size for p in self.people)
        if total > MAX_BUNDLE_BYTES:
            raise ValueError(f"photos total {total} bytes (max {MAX_BUNDLE_BYTES})")
        for p in self.people:
            if p.valid_from and p.valid_until and to_epoch(p.valid_until, "") <= to_epoch(p.valid_from, ""):
                raise ValueError(f"{p.name}: valid_until is not after valid_from")
        if self.not_after and to_epoch(self.not_after, "") <= to_epoch(self.created, ""):
            raise ValueError("not_after is not after created")


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def signed_message(manifest_bytes: bytes) -> bytes:
    return SIGNING_DOMAIN + hashlib.sha256(manifest_bytes).digest()


def _no_duplicate_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


# ------------------------------------------------------------------ keys
def generate_signing_key(out: str | Path) -> tuple[Path, Path]:
    """Ed25519 private key (PEM, 0600) at `out`, public key at `out` with suffix .pub. Refuses to
    overwrite: losing a signing key means re-keying every gate."""
    out = Path(out)
    pub = out.with_suffix(".pub")
    if pub == out:  # the public key would be written over the private one just made
        raise BundleError(out, "the private key's name must not end in .pub (its public key goes beside it with that suffix)")
    for p in (out, pub):
        if p.exists():
            raise BundleError(p, "already exists; refusing to overwrite a key")
    out.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    atomic_write_bytes(out, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()), mode=0o600)
    atomic_write_bytes(pub, key.public_key().public_bytes(serialization.Encoding.PEM,
                                                          serialization.PublicFormat.SubjectPublicKeyInfo), mode=0o644)
    return out, pub


def _read_small(path: Path, limit: int, what: str) -> bytes:
    """A file of the bundle (or a key, or the sequence store): a regular file, never a symlink, read
    whole up to `limit`. A FIFO or a device is refused before any read, so a hostile stick cannot
    hold `bundle apply`, and the gallery lock it holds, waiting on one."""
    try:
        return read_regular_file(path, limit, follow_symlinks=False)
    except OSError as e:  # a failing stick (EIO and the like) included
        raise BundleError(path, read_refusal(e, what, limit, links_refused=True)) from None


def load_private_key(path: str | Path) -> Ed25519PrivateKey:
    path = Path(path)
    try:
        key = serialization.load_pem_private_key(_read_small(path, 16384, "signing key"), password=None)
    except (ValueError, TypeError) as e:
        raise BundleError(path, f"not an unencrypted PEM private key: {e}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise BundleError(path, "signing key is not Ed25519")
    return key


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    path = Path(path)
    try:
        key = serialization.load_pem_public_key(_read_small(path, 16384, "public key"))
    except (ValueError, TypeError) as e:
        raise BundleError(path, f"not a PEM public key: {e}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise BundleError(path, "public key is not Ed25519")
    return key


# ------------------------------------------------------------------ workstation side
def _admin_manifest(path: Path) -> dict:
    try:
        raw = yaml.safe_load(_read_small(path, MAX_MANIFEST_BYTES, "manifest").decode("utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError) as e:
        raise BundleError(path, f"not valid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise BundleError(path, "top level must be a mapping (sequence, created, people, removals)")
    unknown = set(raw) - {"sequence", "created", "people", "removals"}
    if unknown:
        raise BundleError(path, f"unknown key(s): {', '.join(sorted(map(str, unknown)))}")
    return raw


def create_bundle(photos_dir: str | Path, manifest_yaml: str | Path, private_key: Ed25519PrivateKey,
                  out: str | Path, audience: str, valid_days: float = DEFAULT_VALID_DAYS,
                  now: float | None = None) -> Manifest:
    """Admin side: the YAML manifest + photos -> a signed bundle folder `out` (must not exist), for
    the gates whose enrollment.audience holds `audience`, applicable for `valid_days` from now."""
    photos_dir, manifest_yaml, out = Path(photos_dir), Path(manifest_yaml), Path(out)
    if not 0 < valid_days <= MAX_VALID_DAYS:
        raise BundleError(None, f"validity of {valid_days:g} days: give more than 0 and at most {MAX_VALID_DAYS:g}")
    raw = _admin_manifest(manifest_yaml)
    if out.exists():
        raise BundleError(out, "output folder already exists")
    listed = raw.get("people") or []
    if not isinstance(listed, list):
        raise BundleError(manifest_yaml, "people: a list of people expected")
    if len(listed) > MAX_PEOPLE:  # before any photo is read: the cap bounds the work as well as the bundle
        raise BundleError(manifest_yaml, f"people: {len(listed)} listed, at most {MAX_PEOPLE} in one bundle; "
                                         f"split them over several bundles")
    people, blobs = [], {}
    for i, p in enumerate(listed):
        if not isinstance(p, dict) or set(p) - {"name", "id", "photo", "valid_from", "valid_until", "card"}:
            raise BundleError(manifest_yaml, f"people[{i}]: a mapping with name, id, photo, valid_from, valid_until, card")
        try:
            photo = _check_photo_name(str(p.get("photo", "")))
            rec = {"name": str(p.get("name", "")), "id": str(p.get("id") or ""), "photo": photo}
            if p.get("card") is not None:
                rec["card"] = _admin_card(p["card"], f"people[{i}].card")
            for k in ("valid_from", "valid_until"):
                if p.get(k) is not None:
                    rec[k] = iso(to_epoch(p[k], f"people[{i}].{k}"))
        except ValueError as e:
            raise BundleError(manifest_yaml, f"people[{i}]: {e}") from None
        data = _read_small(photos_dir / photo, MAX_PHOTO_BYTES, "photo")
        blobs[photo] = data
        people.append({**rec, "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)})
    now = time.time() if now is None else now
    try:
        created = iso(to_epoch(raw["created"], "created")) if raw.get("created") is not None else iso(now)
        m = Manifest.model_validate({
            "format": FORMAT, "version": VERSION, "sequence": raw.get("sequence"), "created": created,
            "audience": audience, "not_after": iso(now + valid_days * 86400.0),
            "people": people, "removals": [str(r) for r in raw.get("removals") or []]})
        m.check_consistent()
    except (ValidationError, ValueError) as e:
        raise BundleError(manifest_yaml, _problem(e)) from None
    body = canonical_json(m.model_dump(exclude_none=True))
    sig = private_key.sign(signed_message(body))
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, data in blobs.items():
        (tmp / name).write_bytes(data)
    (tmp / MANIFEST).write_bytes(body)
    (tmp / SIGNATURE).write_bytes(base64.b64encode(sig) + b"\n")
    tmp.rename(out)  # a half-written bundle never carries the final name
    return m


def _admin_card(value, what: str) -> str:
    """The card number of the admin's YAML as the gate's reader types it. YAML reads an unquoted
    number as a number (0012345 as octal 5349, 00123 as 123), so only text is taken: a card number
    changed on its way into the bundle would be someone else's, or no one's."""
    if not isinstance(value, str):
        raise ValueError(f"{what}: write the card number in quotes, as the reader types it (card: \"0012345\"): "
                         f"unquoted, YAML reads it as a number and drops or changes its digits")
    card = value.strip().upper()  # a hex card number reads the same either case: the reader's keymap is capitals
    if not re.fullmatch(CARD, card):
        raise ValueError(f"{what}: digits and letters only, at most 32, as the reader types it")
    return card


def _problem(e: Exception) -> str:
    if isinstance(e, ValidationError):
        return "; ".join(f"{'.'.join(map(str, er['loc']))}: {er['msg']}" for er in e.errors()[:8])
    return str(e)


# ------------------------------------------------------------------ gate side
@dataclass
class VerifiedBundle:
    path: Path
    manifest: Manifest
    photos: dict[str, bytes] = field(repr=False)


@dataclass(frozen=True)
class AdmittedBundle:
    """A bundle whose signed manifest passed every check that needs neither the gallery nor a model."""
    path: Path
    manifest: Manifest
    now: float  # the gate's trusted time it was judged at; the enrolments it makes start then


def verify_bundle(bundle_dir: str | Path, public_key: Ed25519PublicKey, min_sequence: int = 0) -> VerifiedBundle:
    """Signature, schema, replay (sequence must exceed `min_sequence`), names, sizes and photo hashes.
    Raises BundleError naming the first problem; returns the manifest and the photo bytes."""
    d = Path(bundle_dir)
    return _read_photos(d, _signed_manifest(d, public_key), min_sequence)


def admit_bundle(bundle_dir: str | Path, public_key: Ed25519PublicKey, enrollment: EnrollmentConfig,
                 trusted_now: Callable[[], float]) -> AdmittedBundle:
    """The gate's checks that need neither its gallery nor a model: signature, schema, version,
    audience and expiry, in that order. `trusted_now` gives the gate's trusted time (on a gate:
    AuditLog.clock.enrolment_time, never below the time floor, refusing a clock far ahead); it is
    asked only once the signature holds. Raises BundleError (or the clock's FacegateError)."""
    d = Path(bundle_dir)
    m = _signed_manifest(d, public_key)
    where = d / MANIFEST
    if m.version == 1 and not enrollment.accept_v1_bundles:
        raise BundleError(where, "version 1 bundle, which names no audience and never expires: refused; make it "
                                 "again with `bundle create`, or set enrollment.accept_v1_bundles: true while old "
                                 "sticks are still in use")
    if m.version >= 2 and m.audience not in enrollment.audience:
        gate = ", ".join(enrollment.audience) if enrollment.audience else "no name (set enrollment.audience)"
        raise BundleError(where, f"bundle is for audience {m.audience!r}; this gate answers to {gate} "
                                 f"(enrollment.audience): refused")
    now = trusted_now()
    if m.not_after is not None and to_epoch(m.not_after, "not_after") <= now:
        raise BundleError(where, f"bundle expired at {m.not_after} (not_after); the gate's trusted time is {iso(now)}, "
                                 f"never below the newest time it has audited: refused; make a new bundle")
    return AdmittedBundle(d, m, now)


def _signed_manifest(d: Path, public_key: Ed25519PublicKey) -> Manifest:
    """The manifest of the bundle folder `d`, its signature checked over the raw bytes before
    they are parsed, then parsed strictly."""
    try:
        st = os.lstat(d)
    except OSError:
        raise BundleError(d, "bundle folder not found") from None
    if not stat.S_ISDIR(st.st_mode):
        raise BundleError(d, "bundle is not a folder (symlinks are refused)")
    if not (d / SIGNATURE).exists() and not (d / SIGNATURE).is_symlink():
        raise BundleError(d, f"unsigned bundle: {SIGNATURE} is missing")
    body = _read_small(d / MANIFEST, MAX_MANIFEST_BYTES, "manifest")
    sig_text = _read_small(d / SIGNATURE, MAX_SIGNATURE_BYTES, "signature")
    try:
        sig = base64.b64decode(sig_text.strip(), validate=True)
        public_key.verify(sig, signed_message(body))
    except (ValueError, InvalidSignature):
        raise BundleError(d / SIGNATURE, "signature does not verify: the manifest was changed or "
                                         "signed with another key; bundle refused") from None
    try:
        m = Manifest.model_validate(json.loads(body, object_pairs_hook=_no_duplicate_keys))
        m.check_consistent()
    except (ValidationError, ValueError) as e:  # signed but malformed: a bug in the tool that made it
        raise BundleError(d / MANIFEST, f"malformed manifest: {_problem(e)}") from None
    return m


def _read_photos(d: Path, m: Manifest, min_sequence: int) -> VerifiedBundle:
    """Replay (the sequence must exceed `min_sequence`), then every photo, read once and checked
    against its signed size and sha256."""
    if m.sequence <= min_sequence:
        raise BundleError(d, f"replayed or old bundle: sequence {m.sequence}, this gate has applied "
                             f"{min_sequence}; make a new bundle with a higher sequence")
    photos = {}
    for p in m.people:
        data = _read_small(d / p.photo, MAX_PHOTO_BYTES, "photo")
        if len(data) != p.size or hashlib.sha256(data).hexdigest() != p.sha256:
            raise BundleError(d / p.photo, "photo does not match its signed sha256: bundle tampered with")
        photos[p.photo] = data
    return VerifiedBundle(d, m, photos)


@dataclass
class BundleReport:
    sequence: int
    enrolled: list[str] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)  # name -> reason
    removed: list[str] = field(default_factory=list)


def sequence_path(storage) -> Path:
    """Where the highest applied bundle sequence is kept (storage.sequence_file): by default beside
    the gallery key, which only root can write, never beside the gallery."""
    if storage.sequence_file:
        return Path(storage.sequence_file)
    return Path(storage.key_file).with_name("bundle.seq") if storage.key_file else Path("/etc/facegate/bundle.seq")


def read_sequence(path: Path) -> int:
    """The sequence recorded at `path`, 0 when none was ever recorded; a file that does not hold
    one refuses every bundle (BundleError) rather than letting replays through."""
    try:
        text = _read_small(path, 64, "bundle sequence file")
    except BundleError as e:
        if e.problem == "bundle sequence file not found":
            return 0
        raise
    try:
        value = int(text.decode("ascii").strip())
    except (UnicodeDecodeError, ValueError):
        value = -1
    if value < 0:
        raise BundleError(path, "does not hold a bundle sequence number: bundles are refused until it does "
                                "(write the highest sequence ever applied here, or see README-deploy.md)")
    return value


def write_sequence(path: Path, sequence: int) -> None:
    # 0644: the gate user reads it at every apply; only root (the file's owner) may write it
    atomic_write_bytes(path, f"{sequence}\n".encode(), mode=0o644)


def check_gallery_current(gallery, storage, path: str | Path) -> None:
    """Refuse (GalleryError) a gallery that records a lower bundle sequence than the store: an
    old copy put back (a backup, a cloned card) would let in everyone revoked since it was saved.
    A gallery `edge enroll` made records 0, which any store above 0 refuses likewise. A store that
    holds no number refuses every gallery (BundleError, naming it): which is current cannot be told."""
    applied = read_sequence(sequence_path(storage))
    if gallery.bundle_sequence < applied:
        raise GalleryError(path, f"gallery older than applied bundle {applied}: it records bundle "
                                 f"{gallery.bundle_sequence or 'none'} as its last ({sequence_path(storage)} "
                                 f"holds {applied}), so it is an old copy that would let in people revoked "
                                 f"since; refused. Apply a new signed bundle with a sequence above {applied} "
                                 f"(README-deploy.md)")


def advance_sequence(storage, gallery_sequence: int) -> tuple[int, int]:
    """Raise the recorded sequence to `gallery_sequence` (the one the saved gallery has applied);
    never lowers it, so an old gallery copied back cannot reopen old sequences. Returns (before, after)."""
    path = sequence_path(storage)
    before = read_sequence(path)
    if gallery_sequence > before:
        try:
            write_sequence(path, gallery_sequence)
        except OSError as e:
            raise StorageError(path, f"cannot write the bundle sequence file ({e.strerror}); run this as root") from None
    return before, max(before, gallery_sequence)


@contextmanager
def gallery_lock(gallery_path: str | Path):
    """Serialises writers of one gallery (bundle apply, enroll, forget); the service only reads."""
    p = Path(gallery_path)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(p.with_name(p.name + ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(p.parent, f"cannot take the gallery's lock in this folder ({e.strerror}): the "
                                     f"gallery cannot be changed here; it is unchanged") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def save_audited(gallery, path: str | Path, key: bytes, audit, events: list) -> None:
    """Audit first, then save: `events` (AuditLog.record_events tuples saying what changes) are
    durable in one transaction before the gallery file changes, so no change is ever unaudited. An
    audit that cannot be written (AuditError) leaves the gallery as it was; a gallery that cannot
    be written raises StorageError, which the caller audits as the change's failure."""
    from . import gallery as G

    audit.record_events(events)
    try:
        G.save(gallery, path, key)
    except OSError as e:
        raise StorageError(path, f"cannot write the gallery ({e.strerror}); the change recorded in the "
                                 f"audit log just before did not take effect") from None


def record_refusal(audit, bundle_dir: str | Path, error: FacegateError) -> None:
    audit.record_event("enroll", "bundle_refused", details={"bundle": str(bundle_dir), "error": str(error)[:900]})


def apply_bundle(bundle: AdmittedBundle, gallery, stack, cfg, audit=None, key: bytes | None = None) -> BundleReport:
    """Check a bundle admit_bundle let through for replay, read and check its photos, quality-gate
    them, update `gallery` in place and save it atomically to cfg.storage.gallery. Every outcome, a
    refused bundle included, is written to `audit` (an edge.audit.AuditLog; default: the one at
    cfg.storage.audit); a refusal by admit_bundle is its caller's to audit (record_refusal)."""
    from .audit import AuditLog

    own_audit = audit is None
    audit = AuditLog(cfg.storage.audit) if own_audit else audit
    try:
        return _apply(bundle, gallery, stack, cfg, audit, key)
    except AuditError:
        raise  # the audit log itself refuses rows: nothing changed, and no row can say so
    except FacegateError as e:
        record_refusal(audit, bundle.path, e)
        raise
    finally:
        if own_audit:
            audit.close()


def _removal_victims(gallery, removals: list[str], manifest: Path) -> list[str]:
    """The names the removals take out of the gallery. A removal that matches more than one
    person (one's name and another's id, or an id two entries share) is refused with the whole
    bundle: which of them was meant cannot be known, and removing both revokes someone by mistake."""
    victims = []
    for r in removals:
        hits = [x for x in gallery.people if r in (x.name, x.person_id)]
        if len(hits) > 1:
            who = ", ".join(f"{x.name} (id {x.person_id or 'none'})" for x in hits)
            raise BundleError(manifest, f"removal {r!r} is ambiguous: it matches {who}; remove by an id only one "
                                        f"of them holds; bundle refused")
        victims += [x.name for x in hits if x.name not in victims]
    return victims


def _without_taken_cards(staying: list, people: list, report: BundleReport) -> list:
    """`people` (the bundle's, about to enter the gallery) less those given a card that someone
    staying in the gallery would still hold, each refused naming the holder. A person refused keeps
    their old entry and its card, which another of `people` may have been given: hence the rounds."""
    while True:
        replaced = {x.name for x in staying for p in people
                    if x.name == p.name or (p.person_id and x.person_id == p.person_id)}
        holders = {x.card: x for x in staying if x.card and x.name not in replaced}
        taken = {p.name: holders[p.card] for p in people if p.card in holders}
        if not taken:
            return people
        for name, holder in taken.items():
            report.refused[name] = (f"the card given is the one {holder.name} (id {holder.person_id or 'none'}) holds: "
                                    f"a card opens for one person; give {holder.name} their new card in this bundle, "
                                    f"or list them under removals")
        people = [p for p in people if p.name not in taken]


def _card_audit(key: bytes, card: str, before: str) -> dict:
    """What an enrolment's audit row says of the person's card: its card_tag, and the one replaced."""
    out = {"card": card_tag(key, card)} if card else {}
    if before and before != card:
        out["previous_card"] = card_tag(key, before)
    return out


def _apply(bundle: AdmittedBundle, gallery, stack, cfg, audit, key) -> BundleReport:
    from . import gallery as G
    from .enroll import embed_photo, screen_duplicates
    from .gallery import Gallery, Person
    from .imageio import load_image

    key = key if key is not None else G.load_key(cfg.storage.key_file)  # before anything changes
    seq_file = sequence_path(cfg.storage)
    # The gallery's own record alone would let a lost or copied-back gallery reopen old sequences.
    applied = read_sequence(seq_file)
    vb = _read_photos(bundle.path, bundle.manifest, max(gallery.bundle_sequence, applied))
    # An old copy of the gallery, refused at the gate's start, is brought forward by a newer bundle:
    # on record, since whoever the copy holds and the bundle does not remove is let in again.
    stale = {"stale_gallery_sequence": gallery.bundle_sequence} if gallery.bundle_sequence < applied else {}
    now = bundle.now
    m = vb.manifest
    report = BundleReport(m.sequence)
    victims = _removal_victims(gallery, m.removals, vb.path / MANIFEST)
    staying = [x for x in gallery.people if x.name not in victims]
    embedded = []  # (person, embedding result, end of validity) of those the photo and dates let in
    for p in m.people:
        holder = next((x for x in staying if x.name == p.name and x.person_id != p.id), None)
        if holder is not None:
            # Ids are the stable key: the same name under another id is another person (or an
            # entry made without an id), and replacing them silently would hand over their access.
            report.refused[p.name] = (f"the name is enrolled under id {holder.person_id or '(none)'}, this bundle "
                                      f"gives id {p.id or '(none)'}: give a second person another name, or list "
                                      f"the old id (or name) under removals in this bundle")
            continue
        valid_from = to_epoch(p.valid_from, "") if p.valid_from else None
        until = min(now + cfg.storage.retention_days * 86400.0,
                    to_epoch(p.valid_until, "") if p.valid_until else float("inf"))
        if valid_from is not None and valid_from > now:
            # The gallery has no "not yet valid" state: enrolling early would open the door early.
            report.refused[p.name] = f"not valid before {p.valid_from}; apply a bundle on or after that date"
            continue
        if until <= now:
            report.refused[p.name] = f"validity ended {p.valid_until}"
            continue
        try:
            r = embed_photo(stack, cfg.enroll_quality, load_image(vb.photos.pop(p.photo), name=p.photo), p.name, p.photo)
        except FacegateError as e:
            report.refused[p.name] = e.problem
            continue
        if not r.ok:
            report.refused[p.name] = r.reason
            continue
        embedded.append((p, r, until))
    vb.photos.clear()  # the photos live in memory only and go now
    # Screened as `edge enroll` screens, against the gallery as it stands once the removals are made
    # and each renamed id has left its old entry: a face the gate would take for someone else lets
    # either in as the other, whoever signed it. There is no override: twins are enrolled at the gate.
    ids = {p.id for p, _, _ in embedded if p.id}
    base = Gallery(gallery.encoder_sha256, gallery.dim, [x for x in staying if x.person_id not in ids])
    duplicates = {d.name: d for d in screen_duplicates(stack, cfg.match, base, [r for _, r, _ in embedded],
                                                       cfg.storage.retention_days, now)}
    people = []
    for p, r, until in embedded:
        if p.name in duplicates:
            report.refused[p.name] = (f"{duplicates[p.name].problem()}; if it is one person, keep one name (list the "
                                      f"other under removals); if not (twins), enroll them at the gate with "
                                      f"python -m edge enroll --allow-duplicate")
            continue
        people.append(Person(p.name, r.embedding, p.id, now, until, card=p.card or ""))
    people = _without_taken_cards(staying, people, report)
    for victim in victims:
        gallery.remove(victim)
        report.removed.append(victim)
    previous = {}  # name -> the card their entry held until now
    for person in people:
        # The id is the stable key: a renamed person replaces their old entry instead of doubling it.
        # Every old entry goes before any new one comes in, so two people may swap cards in one bundle.
        for old in [x for x in gallery.people if x.name == person.name
                    or (person.person_id and x.person_id == person.person_id)]:
            previous[person.name] = old.card
            gallery.remove(old.name)
    for person in people:
        gallery.add(person)
        report.enrolled.append(person.name)
    gallery.bundle_sequence = m.sequence
    seq = {"bundle_sequence": m.sequence}
    events = [("enroll", "enrolled", {**seq, **_card_audit(key, p.card, previous.get(p.name, ""))}, {"identity": p.name})
              for p in people]
    events += [("enroll", "refused", {**seq, "why": why[:900]}, {"identity": name}) for name, why in report.refused.items()]
    events += [("enroll", "revoked", seq, {"identity": name}) for name in report.removed]
    events.append(("enroll", "bundle_applied", {
        **seq, "version": m.version, "enrolled": len(report.enrolled), "refused": len(report.refused),
        "removed": len(report.removed), "people": len(gallery), **stale}, {}))
    save_audited(gallery, cfg.storage.gallery, key, audit, events)
    # Recorded once the gallery holds the change, so a gallery that cannot be written leaves the
    # sequence free for the same stick; until this write the saved gallery refuses the replay. On a
    # gate the store is root's and this runs as the gate user, so the write is refused and
    # deploy/enroll-usb records the sequence as root (`bundle advance-sequence`) right after.
    try:
        write_sequence(seq_file, m.sequence)
    except OSError as e:
        audit.record_event("enroll", "sequence_not_saved", details={
            "bundle_sequence": m.sequence, "file": str(seq_file), "error": str(e.strerror),
            "next": "python -m edge bundle advance-sequence, as root"})
    return report
