"""train/liveness.py: the torch augmentation, the JPEG round trip, the network's input filters and
sizes, the ensemble's output and the leave-one-session-out figures, on tiny hand-made data."""
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a training requirement (.venv-train)")

from train.liveness import (CANVAS, ATTACK, LIVE, Ensemble, FitConfig, PadNet, augment, centre, cv_figures,  # noqa: E402
                            fit, jpeg, live_scores, threshold_at_bpcer, window_means)


def test_jpeg_round_trip_loses_about_what_opencv_loses():
    cv2 = pytest.importorskip("cv2")
    rng = np.random.default_rng(0)
    x = torch.nn.functional.avg_pool2d(torch.from_numpy(rng.uniform(0, 255, (1, 3, 32, 32)).astype(np.float32)), 3, 1, 1)
    img = x[0].permute(1, 2, 0).numpy().round().astype(np.uint8)
    errs = []
    for q in (100, 10):
        ours = float((jpeg(x, torch.tensor([q])) - x).abs().mean())
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, q])
        ref = float(np.abs(cv2.imdecode(buf, cv2.IMREAD_COLOR).astype(np.float32) - img).mean())
        assert ours == pytest.approx(ref, rel=0.25), q
        errs.append(ours)
    assert errs[1] > errs[0] + 5
    flat = torch.full((1, 3, 16, 16), 100.0)
    assert torch.allclose(jpeg(flat, torch.tensor([50])), flat, atol=1.0)


def test_augment_gives_crops_of_the_input_size_in_range():
    size = 32
    canvas = torch.randint(0, 256, (5, round(size * CANVAS), round(size * CANVAS), 3), dtype=torch.uint8)
    g = torch.Generator().manual_seed(0)
    out = augment(canvas, size, g, 1.5)
    assert out.shape == (5, 3, size, size) and out.min() >= 0 and out.max() <= 255
    assert centre(canvas.numpy(), size).shape == (5, size, size, 3)


@pytest.mark.parametrize("size,dog", [(80, False), (112, True)])
def test_padnet_sizes_and_ensemble_log_probabilities(size, dog):
    nets = [PadNet(size=size, dog=dog, standardise=True).eval() for _ in range(2)]
    x = torch.randn(3, 3, size, size)
    logits = Ensemble(nets)(x)
    assert logits.shape == (3, 2)
    assert torch.allclose(torch.exp(logits).sum(1), torch.ones(3), atol=1e-4)


def test_window_means_and_threshold():
    assert window_means(np.array([1.0, 0.0, 0.5, 1.0]), 2).tolist() == [1.0, 0.5, 0.25, 0.75]
    assert threshold_at_bpcer(np.arange(20) / 20, 0.05) == pytest.approx(0.05)


def test_cv_figures_of_separable_scores():
    labels = np.array([LIVE] * 6 + [ATTACK] * 6)
    seq = np.array(["l1"] * 3 + ["l2"] * 3 + ["a1"] * 3 + ["a2"] * 3)
    scores = np.array([0.9, 0.8, 0.95, 0.7, 0.9, 0.85, 0.1, 0.2, 0.1, 0.3, 0.2, 0.1])
    f = cv_figures(scores, labels, seq, frames=1)
    assert f["auc"] == 1.0 and f["seq_apcer"] == 0.0 and f["seq_bpcer"] == 0.0 and f["frame_apcer"] == 0.0


def test_fit_runs_and_scores():
    rng = np.random.default_rng(0)
    cfg = FitConfig(size=32, epochs=1, batch=4)
    canvas = rng.integers(0, 255, (8, 40, 40, 3), dtype=np.uint8)
    m = fit(canvas, np.array([0, 1] * 4), cfg, seed=0)
    s = live_scores(m, centre(canvas, 32))
    assert s.shape == (8,) and np.all((s >= 0) & (s <= 1))
