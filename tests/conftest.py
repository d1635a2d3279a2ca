"""Shared fixtures: the built models, the fetched sample faces, ../shared when present."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
SAMPLES = MODELS / "raw" / "images"
SHARED = REPO.parent / "shared"

os.environ.setdefault("GPIOZERO_PIN_FACTORY", "mock")


def _need(path: Path, how: str):
    if not path.exists():
        pytest.skip(f"{path} is missing: {how}")
    return path


@pytest.fixture(scope="session")
def samples() -> Path:
    return _need(SAMPLES / "obama.jpg", "run `python -m export fetch`").parent


@pytest.fixture(scope="session")
def model_cards() -> dict:
    """The device default models (config defaults), as `python -m export setup` builds them."""
    from edge.config import ModelsConfig

    m = ModelsConfig()
    cards = {"detector": Path(m.detector), "encoder": Path(m.encoder)}
    for p in cards.values():
        _need(p, "run `python -m export setup`")
    return cards


@pytest.fixture(scope="session")
def stack(model_cards):
    from edge.config import Config
    from edge.pipeline import Stack

    cfg = Config()
    cfg.models.detector, cfg.models.encoder = str(model_cards["detector"]), str(model_cards["encoder"])
    return Stack.from_config(cfg)


@pytest.fixture
def mock_factory():
    """gpiozero's mock pins, a fresh set per test, handed to each relay as its pin factory (a
    relay's pin stays reserved until it closes, so tests never share one)."""
    from gpiozero.pins.mock import MockFactory

    return MockFactory()


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "data").is_dir():
        pytest.skip("../shared (evaluation data) is absent beside the repo")
    return SHARED


DETECTOR_CARD = MODELS / "yunet_fp32.card.json"
# Training tests prepare crops from the sample photos (sample_identities) with the gate's detector.
needs_samples_and_detector = pytest.mark.skipif(
    not (SAMPLES / "obama3.jpg").exists() or not DETECTOR_CARD.exists(),
    reason="needs models/raw/images and models/yunet_fp32.card.json (python -m export fetch/build)")


def sample_identities(root: Path) -> Path:
    """An identity-folder dataset of real faces, honestly named: "obama" is his three photos,
    "biden" is his one photo and its mirror image (the samples hold no second photo of him)."""
    import cv2

    from edge.imageio import load_image

    for person, names in (("obama", ("obama.jpg", "obama2.jpg", "obama3.jpg")), ("biden", ("biden.jpg",))):
        (root / person).mkdir(parents=True, exist_ok=True)
        for name in names:
            (root / person / name).write_bytes((SAMPLES / name).read_bytes())
    cv2.imwrite(str(root / "biden" / "biden_mirror.png"), load_image(SAMPLES / "biden.jpg")[:, ::-1])
    return root
