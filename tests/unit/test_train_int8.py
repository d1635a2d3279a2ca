"""train/int8.py: a trained encoder's fp32 ONNX -> INT8 card through export/, on real face crops
(the same five crops as test_train_smoke: three Obama photos, Biden and his mirror image)."""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="torch is a training requirement (.venv-train)")

from edge.embed import load_encoder  # noqa: E402
from edge.modelcard import load_card  # noqa: E402
from tests.conftest import DETECTOR_CARD, needs_samples_and_detector, sample_identities  # noqa: E402
from train import backbones  # noqa: E402
from train.data import load_faces, prepare  # noqa: E402
from train.fit import recalibrate_bn  # noqa: E402
from train.int8 import export_int8  # noqa: E402
from train.onnx import export_onnx  # noqa: E402

pytestmark = needs_samples_and_detector


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    raw = sample_identities(tmp_path_factory.mktemp("raw"))
    out = tmp_path_factory.mktemp("prepared")
    prepare(raw, out, DETECTOR_CARD, progress=False)
    return load_faces(out)


def test_int8_card_keeps_source_and_gets_holdout_table(faces, tmp_path):
    torch.manual_seed(0)
    model = backbones.build("mobilefacenet_relu")
    recalibrate_bn(model, torch.from_numpy(faces.images), torch.device("cpu"))
    card32 = export_onnx(model, tmp_path / "s_fp32.onnx", "s_fp32", "5 obama/biden crops", "test licence")
    r = export_int8(card32, tmp_path / "s_int8.onnx", faces, "minmax", holdout=faces)
    card, path = load_card(r["card"])  # checks the file's size and sha256 against the card
    assert (card.name, card.precision, path.name) == ("s_int8", "int8", "s_int8.onnx")
    assert card.source.license == "test licence" and "5 obama/biden crops" in card.source.notes
    assert "static QDQ, minmax ranges from 5 training crops" in card.source.notes
    assert card.input == load_card(card32)[0].input  # fed exactly as the fp32 model it came from
    # impostor pairs are the different-identity pairs only: 3 Obama x 2 Biden
    assert card.calibration.impostor_pairs == 6
    by_threshold = sorted(zip(card.calibration.threshold, card.calibration.fmr))
    assert [f for _, f in by_threshold] == sorted((f for _, f in by_threshold), reverse=True)  # stricter, rarer
    e = load_encoder(r["card"]).embed_images(list(faces.images))
    np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
    # No parity bound here: an untrained network's INT8 copy is far from it (0.6); the trained
    # student's parity is measured by the command and quoted in train/README-student.md.


def test_calibration_crops_of_another_size_are_refused(faces, tmp_path):
    from dataclasses import replace

    from edge.errors import FacegateError

    model = backbones.build("mobilefacenet_relu").eval()
    card32 = export_onnx(model, tmp_path / "s_fp32.onnx", "s_fp32", "x", "x")
    small = replace(faces, images=faces.images[:, :96, :96])
    with pytest.raises(FacegateError, match="96x96"):
        export_int8(card32, tmp_path / "s_int8.onnx", small)
