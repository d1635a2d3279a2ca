"""Fuzz targets: the parsers that read what a user or attacker can hand the gate raise
their FacegateError subclass, or return a valid object; never any other exception.

Bounded for CI (FACEGATE_FUZZ_EXAMPLES, default 200 per target, no deadline); longer runs:
`python -m reliability.fuzz --examples 20000`."""
from __future__ import annotations

import base64
import json
import os

import cv2
import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import bundle as B
from edge import gallery as G
from edge.config import Config, load_config
from edge.errors import BundleError, ConfigError, GalleryError, ImageError
from edge.imageio import load_image

EXAMPLES = int(os.environ.get("FACEGATE_FUZZ_EXAMPLES", "200"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=False)
KEY = bytes(range(32))
SIGNER = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))

_rng = np.random.default_rng(0)
_img = _rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)
SEEDS = [cv2.imencode(ext, _img)[1].tobytes() for ext in (".jpg", ".png", ".bmp", ".webp")]


@st.composite
def mutated(draw, seeds):
    """A real file with bytes flipped, inserted, deleted, or cut short."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 8))):
        op = draw(st.sampled_from(["flip", "set", "insert", "delete"]))
        i = draw(st.integers(0, max(len(data) - 1, 0)))
        if op == "flip" and data:
            data[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "set" and data:
            data[i] = draw(st.sampled_from([0, 0xFF, 0x7F, 0x80, draw(st.integers(0, 255))]))
        elif op == "insert":
            data[i:i] = draw(st.binary(max_size=16))
        elif op == "delete":
            del data[i:i + draw(st.integers(1, 16))]
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@FUZZ
@given(st.one_of(mutated(SEEDS), st.binary(max_size=256)))
def test_fuzz_image_loader(data):
    try:
        img = load_image(data, name="fuzz")
    except ImageError:
        return
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[2] == 3


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=5),
    max_leaves=20)


def _gallery_payload(draw):
    """A payload near the real format, with any part replaced by any JSON value."""
    emb = base64.b64encode(np.ones(4, "<f4").tobytes()).decode()
    person = {"name": "alice", "id": "A1", "enrolled_at": 1.0, "expires_at": None, "embedding": emb}
    payload = {"format": G.FORMAT, "version": G.VERSION, "encoder_sha256": "e" * 64, "dim": 4, "revision": 1,
               "bundle_sequence": 0, "people": [person]}
    for _ in range(draw(st.integers(0, 3))):
        target = draw(st.sampled_from(["top", "person", "whole"]))
        if target == "whole":
            payload = draw(JSONISH)
            break
        d = payload if target == "top" else person
        d[draw(st.sampled_from(sorted(d)) | st.text(max_size=6))] = draw(JSONISH | st.text(max_size=40))
    return payload


@FUZZ
@given(st.data())
def test_fuzz_gallery_parser(data):
    """Raw bytes, and authenticated payloads (encrypted with the right key, so they reach the parser)."""
    if data.draw(st.booleans()):
        blob = data.draw(st.one_of(st.binary(max_size=200), st.binary(max_size=64).map(lambda b: G.MAGIC + b)))
    else:
        plain = json.dumps(_gallery_payload(data.draw)).encode()
        nonce = bytes(12)
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM

        blob = G.MAGIC + nonce + AESGCM(KEY).encrypt(nonce, plain, G.MAGIC)
    try:
        g = G.from_bytes(blob, KEY, "fuzz.fgg")
    except GalleryError:
        return
    assert g.matrix.shape == (len(g), g.dim)


def _manifest(draw):
    person = {"name": "alice", "id": "A1", "photo": "alice.jpg", "sha256": "0" * 64, "size": 3}
    m = {"format": B.FORMAT, "version": B.VERSION, "sequence": 2, "created": "2026-01-01T00:00:00Z",
         "audience": "gate", "not_after": "2026-01-08T00:00:00Z", "people": [person], "removals": []}
    for _ in range(draw(st.integers(0, 3))):
        d = draw(st.sampled_from([m, person]))
        d[draw(st.sampled_from(sorted(d)) | st.text(max_size=6))] = draw(JSONISH | st.text(max_size=40))
    return m


@FUZZ
@given(data=st.data())
def test_fuzz_bundle_parser(tmp_path_factory, data):
    """Manifests signed with the trusted key (so they pass the signature and reach the parser), raw
    signed bytes, and garbage signatures."""
    d = tmp_path_factory.mktemp("bundle")
    (d / "alice.jpg").write_bytes(b"abc")
    if data.draw(st.booleans()):
        body = json.dumps(_manifest(data.draw)).encode()
    else:
        body = data.draw(st.binary(max_size=200))
    sig = base64.b64encode(SIGNER.sign(B.signed_message(body))) + b"\n"
    if data.draw(st.integers(0, 4)) == 0:
        sig = data.draw(st.binary(max_size=120))
    (d / B.MANIFEST).write_bytes(body)
    (d / B.SIGNATURE).write_bytes(sig)
    try:
        vb = B.verify_bundle(d, SIGNER.public_key())
    except BundleError:
        return
    assert vb.manifest.sequence > 0


YAMLISH = st.one_of(
    st.text(max_size=200),
    st.dictionaries(st.sampled_from(sorted(Config.model_fields)) | st.text(max_size=8),
                    st.dictionaries(st.text(max_size=16), JSONISH, max_size=4) | JSONISH, max_size=4)
    .map(lambda d: json.dumps(d)))  # JSON is YAML


@FUZZ
@given(YAMLISH)
def test_fuzz_config_loader(tmp_path_factory, text):
    p = tmp_path_factory.mktemp("cfg") / "c.yaml"
    p.write_bytes(text.encode("utf-8", "surrogatepass"))  # lone surrogates: bytes that are not UTF-8
    try:
        cfg = load_config(p)
    except ConfigError:
        return
    assert isinstance(cfg, Config)


@pytest.mark.parametrize("payload", [None, [], "people", 3, [{"format": G.FORMAT}]])
def test_authenticated_payload_that_is_not_an_object_is_refused(payload):
    """Regression (found by test_fuzz_gallery_parser): a payload that decrypts but is not a JSON
    object raised AttributeError instead of GalleryError."""
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    nonce = bytes(12)
    blob = G.MAGIC + nonce + AESGCM(KEY).encrypt(nonce, json.dumps(payload).encode(), G.MAGIC)
    with pytest.raises(GalleryError, match="not a JSON object"):
        G.from_bytes(blob, KEY, "g.fgg")
