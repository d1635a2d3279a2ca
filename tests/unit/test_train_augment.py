"""train/data.py jitter against hand-computed pixels on tiny images."""
import math

import pytest

torch = pytest.importorskip("torch", reason="torch is a training requirement (.venv-train)")

from train.data import JITTER, apply_jitter, random_jitter  # noqa: E402

IDENTITY = [0.0, 1.0, 0.0, 0.0, 0.0, 1.0]  # angle, scale, shift x, shift y, brightness, contrast


def ramp(h=6, w=8):
    """Pixel value = 10 * column + row, the same in every channel."""
    r = torch.arange(h, dtype=torch.float64).view(h, 1) + 10 * torch.arange(w, dtype=torch.float64).view(1, w)
    return r.expand(1, 3, h, w).clone()


def params(**kw):
    p = dict(zip(("angle", "scale", "dx", "dy", "brightness", "contrast"), IDENTITY))
    p.update(kw)
    return torch.tensor([[p["angle"], p["scale"], p["dx"], p["dy"], p["brightness"], p["contrast"]]], dtype=torch.float64)


def test_identity_parameters_change_nothing():
    x = ramp()
    torch.testing.assert_close(apply_jitter(x, params()), x)


def test_shift_moves_content_by_whole_pixels():
    y = apply_jitter(ramp(), params(dx=2.0, dy=1.0))
    # content moves 2 right, 1 down: pixel (row 3, col 5) now holds the old (row 2, col 3) = 32
    assert y[0, 0, 3, 5].item() == pytest.approx(32.0)
    # the uncovered left edge repeats the old first column (border padding), rows shifted by one
    assert y[0, 0, 3, 0].item() == pytest.approx(2.0)


def test_half_turn_about_the_centre():
    x = ramp()
    y = apply_jitter(x, params(angle=math.pi))
    torch.testing.assert_close(y, x.flip(-1).flip(-2))


def test_brightness_and_contrast():
    x = torch.full((1, 3, 4, 4), 0.5, dtype=torch.float64)
    y = apply_jitter(x, params(brightness=0.1, contrast=1.2))
    torch.testing.assert_close(y, torch.full_like(x, 0.5 * 1.2 + 0.1))


def test_random_parameters_stay_within_limits_and_follow_the_seed():
    a = random_jitter(2000, torch.Generator().manual_seed(3))
    assert a[:, 0].abs().max().item() <= JITTER["rotate_deg"] * math.pi / 180 + 1e-6
    assert (a[:, 1] - 1).abs().max().item() <= JITTER["scale"] + 1e-6
    assert a[:, 2:4].abs().max().item() <= JITTER["shift_px"] + 1e-6
    assert a[:, 2].std().item() > 0.4 * JITTER["shift_px"]  # spread over the range, not stuck at 0
    torch.testing.assert_close(a, random_jitter(2000, torch.Generator().manual_seed(3)))
