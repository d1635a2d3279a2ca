"""What the full-count scripts and the reliability tests share: which model cards to run."""
from __future__ import annotations

from pathlib import Path

from edge.config import Config
from edge.modelcard import load_card

REPO = Path(__file__).resolve().parent.parent
SAMPLES = REPO / "models" / "raw" / "images"
SFACE_COSINE_THRESHOLD = 0.363  # OpenCV Zoo's published SFace cosine threshold


def find_cards() -> dict | None:
    """The device default (INT8) detector and encoder cards, else the fp32 ones, else None."""
    models = REPO / "models"
    for precision in ("int8", "fp32"):
        cards = {"detector": models / f"yunet_{precision}.card.json", "encoder": models / f"sface_{precision}.card.json"}
        if all(p.exists() for p in cards.values()):
            return cards
    return None


def default_cards() -> dict:
    cards = find_cards()
    if cards is None:
        raise SystemExit("no yunet/sface model cards in models/: run `python -m export setup`")
    return cards


def models_config(cards: dict, cfg: Config | None = None) -> Config:
    """`cfg` (default: defaults) running these cards; an uncalibrated encoder gets a fixed threshold."""
    cfg = cfg or Config()
    cfg.models.detector, cfg.models.encoder = str(cards["detector"]), str(cards["encoder"])
    if load_card(cards["encoder"], verify_file=False)[0].calibration is None:
        cfg.match.threshold = SFACE_COSINE_THRESHOLD
    return cfg
