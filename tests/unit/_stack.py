"""Shared by the deploy tests: the models that exist (int8 from `python -m export setup`, else the
fp32 exports), sample faces, and a gate config on mock pins with everything under tmp_path."""
from pathlib import Path

import pytest

from edge.config import MODELS, Config
from edge.demo import SAMPLES

# SFace's published cosine threshold: the fp32 cards carry no calibration to derive one from.
SFACE_THRESHOLD = 0.363


def model_cards() -> tuple[str, str]:
    for precision in ("int8", "fp32"):
        det, enc = MODELS / f"yunet_{precision}.card.json", MODELS / f"sface_{precision}.card.json"
        if det.exists() and enc.exists():
            return str(det), str(enc)
    pytest.skip(f"no yunet/sface model cards in {MODELS}: run `python -m export setup`")


def sample(name: str) -> Path:
    p = SAMPLES / name
    if not p.exists():
        pytest.skip(f"{p} missing: run `python -m export fetch`")
    return p


def gate_config(tmp_path: Path) -> Config:
    det, enc = model_cards()
    cfg = Config()
    cfg.models.detector, cfg.models.encoder = det, enc
    cfg.match.threshold = SFACE_THRESHOLD
    cfg.relay.pin_factory = "mock"
    cfg.storage.gallery = str(tmp_path / "gallery.fgg")
    cfg.storage.key_file = str(tmp_path / "gallery.key")
    cfg.storage.audit = str(tmp_path / "audit.sqlite3")
    return cfg
