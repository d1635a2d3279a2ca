"""Fixtures for the reliability suite: the model cards (INT8, else fp32, else skip) and one stack."""
from __future__ import annotations

import pytest

from reliability.common import find_cards, models_config


@pytest.fixture(scope="session")
def cards() -> dict:
    found = find_cards()
    if found is None:
        pytest.skip("no yunet/sface INT8 or fp32 model cards in models/: run `python -m export setup`")
    return found


@pytest.fixture(scope="session")
def real_stack(cards):
    from edge.pipeline import Stack

    return Stack.from_config(models_config(cards))
