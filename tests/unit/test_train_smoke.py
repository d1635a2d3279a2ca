"""Smoke test of the training machinery on real face photos: prepare (the gate's YuNet + alignment),
a few optimiser steps, checkpoint / resume, ONNX hand-off through the edge embedder.

Data, honestly named: identity "obama" = the three distinct Obama photos; identity "biden" = the
one Biden photo and its mirror image (a second photo of him is not in the repo). Five crops
cannot teach face recognition; they show the loss falls and the plumbing holds."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a training requirement (.venv-train)")

from tests.conftest import DETECTOR_CARD, MODELS, needs_samples_and_detector, sample_identities  # noqa: E402
from train import backbones  # noqa: E402
from train.data import load_faces, prepare, to_input  # noqa: E402
from train.fit import Trainer, fit, load_config, load_encoder_weights  # noqa: E402

SFACE = MODELS / "sface_fp32.card.json"

pytestmark = needs_samples_and_detector


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    raw = sample_identities(tmp_path_factory.mktemp("raw"))
    (raw / "biden" / "unreadable.jpg").write_bytes(b"not a jpeg")
    out = tmp_path_factory.mktemp("prepared")
    report = prepare(raw, out, DETECTOR_CARD, progress=False)
    assert (report["written"], report["no_face"], report["unreadable"]) == (5, [], ["biden/unreadable.jpg"])
    return out


def config(data, **kw):
    sets = [f"data={data}", "p=2", "m=2", "warmup_steps=0", "lr=0.002", "flip=false", "device=cpu",
            "mining=batch_hard", "objectives.binary=0.5"] + [f"{k}={v}" for k, v in kw.items()]
    return load_config(None, sets)


def test_fresh_network_is_not_collapsed(crops):
    faces = load_faces(crops)
    torch.manual_seed(0)
    model = backbones.build("mobilefacenet_relu").eval()
    assert 0.9e6 < backbones.n_params(model) < 1.1e6
    with torch.no_grad():
        e = model(to_input(torch.from_numpy(faces.images))).numpy()
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    off = (e @ e.T)[~np.eye(len(e), dtype=bool)]
    assert off.min() < 0.95, f"every face maps to nearly one embedding: cosines {off.min():.3f}..{off.max():.3f}"


def test_loss_goes_down(crops):
    faces = load_faces(crops, min_per_identity=2)
    tr = Trainer(config(crops), faces, torch.device("cpu"))
    idx, flips = torch.arange(len(faces)), torch.zeros(len(faces), dtype=torch.bool)

    def total():
        tr.model.train()
        with torch.no_grad():
            parts = tr.losses(idx, flips)
        return sum(tr.cfg.objectives.active()[k] * v.item() for k, v in parts.items())

    before = total()
    for _ in range(6):
        tr.step(idx, flips)
    after = total()
    assert after < 0.7 * before, (before, after)


@pytest.mark.skipif(not SFACE.exists(), reason="needs models/sface_fp32.card.json as the teacher")
def test_distillation_loss_goes_down(crops, tmp_path):
    from train.teacher import embed_teachers

    faces = load_faces(crops)
    teacher = embed_teachers(faces, [SFACE], tmp_path / "t.npz", progress=False)
    cfg = config(crops, teacher=teacher, **{"objectives.triplet": 0, "objectives.binary": 0,
                                            "objectives.distill_cosine": 1, "objectives.distill_pairwise": 1})
    tr = Trainer(cfg, faces, torch.device("cpu"))
    idx, flips = torch.arange(len(faces)), torch.zeros(len(faces), dtype=torch.bool)
    first = tr.step(idx, flips)["loss"]
    for _ in range(5):
        last = tr.step(idx, flips)["loss"]
    assert last < 0.7 * first, (first, last)


def test_fit_resume_and_onnx_handoff(crops, tmp_path):
    from train.onnx import export_onnx, parity

    out = tmp_path / "run"
    r = fit(config(crops, epochs=1, steps_per_epoch=2), out, progress=False)
    assert r["identities"] == 2 and r["images"] == 5 and r["unreadable"] == 0
    with pytest.raises(Exception, match="another config"):
        fit(config(crops, epochs=2, steps_per_epoch=2, lr=0.01), out, resume=True, progress=False)
    r = fit(config(crops, epochs=2, steps_per_epoch=2), out, resume=True, progress=False)
    assert [h["epoch"] for h in r["history"]] == [1, 2]  # epoch 1 from the checkpoint, epoch 2 run now
    model = load_encoder_weights(out / "encoder.pt")
    card = export_onnx(model, tmp_path / "student_fp32.onnx", "smoke", "5 obama/biden crops", "test only")
    p = parity(model, card, load_faces(crops).images)
    assert not p["collapsed"], p
    assert p["parity_min"] > 0.999, p
