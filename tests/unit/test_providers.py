"""ONNX Runtime execution providers: the choice (asked, available -> order and reasons), the fallback
down the list through a session factory that records what it was given and fails where told, the
card's list and models.providers over it, and the names config and cards accept."""
import json
import logging

import numpy as np
import pytest

from edge.config import Config, load_config
from edge.errors import ConfigError, ModelError
from edge.modelcard import CPU_PROVIDER, Card, load_card, providers_problem
from edge.runtime import OnnxModel, Providers, choose_providers, open_model, open_session

from _stack import model_cards

TRT, CUDA, CPU = "TensorrtExecutionProvider", "CUDAExecutionProvider", CPU_PROVIDER
KNOWN = (TRT, CUDA, "OpenVINOExecutionProvider", CPU)


class FakeSession:
    def __init__(self, providers, leave_out=()):
        self.providers = [p for p in providers if p not in leave_out]

    def get_providers(self):
        return self.providers


class FakeFactory:
    """onnxruntime.InferenceSession's call: records each providers list, raises while the first of
    them is in `fail`, and can leave providers out of the session it opens, as onnxruntime does
    with one whose libraries do not load."""

    def __init__(self, fail=(), leave_out=()):
        self.fail, self.leave_out, self.calls = set(fail), set(leave_out), []

    def __call__(self, model, options, providers):
        self.calls.append(list(providers))
        if providers[0] in self.fail:
            raise RuntimeError(f"{providers[0]}: cannot create the provider\nsecond line")
        return FakeSession(providers, self.leave_out)


# ------------------------------------------------------------------ the choice, by hand
@pytest.mark.parametrize("asked, available, order, dropped", [
    ([CPU], [CPU], (CPU,), ()),
    ([], [CPU], (CPU,), ()),
    ([TRT, CUDA, CPU], [TRT, CUDA, CPU], (TRT, CUDA, CPU), ()),
    ([TRT, CUDA], [TRT, CUDA, CPU], (TRT, CUDA, CPU), ()),  # the CPU's comes last unasked
    ([CUDA, TRT], [TRT, CUDA, CPU], (CUDA, TRT, CPU), ()),  # the order asked, not the build's
    ([TRT, CUDA, CPU], [CUDA, CPU], (CUDA, CPU), (TRT,)),
    ([TRT, CUDA], ["AzureExecutionProvider", CPU], (CPU,), (TRT, CUDA)),
])
def test_choice_keeps_the_order_asked_drops_what_the_build_lacks_and_ends_on_the_cpu(asked, available, order,
                                                                                      dropped):
    choice = choose_providers(asked, available)
    assert choice.providers == order
    assert tuple(p for p, _ in choice.dropped) == dropped
    assert all(why.startswith("not in this onnxruntime build") and CPU in why for _, why in choice.dropped)


@pytest.mark.parametrize("names, problem", [
    ([TRT, CUDA, CPU], None),
    ([CUDA], None),
    ([], None),
    (["CUDAExecutionProvidr"], "'CUDAExecutionProvidr' is not an onnxruntime execution provider"),
    ([CUDA, CUDA], "CUDAExecutionProvider is named twice"),
    ([CPU, CUDA], "CPUExecutionProvider must be last"),
])
def test_provider_lists_refused_for_a_typo_a_repeat_or_the_cpu_before_another(names, problem):
    got = providers_problem(names, KNOWN)
    assert got == problem if problem is None else got.startswith(problem)


# ------------------------------------------------------------------ the fallback, through the factory seam
def test_session_gets_every_chosen_provider_in_order():
    factory = FakeFactory()
    session, dropped = open_session(b"m", None, [TRT, CUDA], [TRT, CUDA, CPU], factory)
    assert factory.calls == [[TRT, CUDA, CPU]] and session.get_providers() == [TRT, CUDA, CPU] and dropped == ()


def test_a_provider_that_cannot_open_the_model_is_dropped_for_the_next():
    factory = FakeFactory(fail={TRT})
    session, dropped = open_session(b"m", None, [TRT, CUDA, CPU], [TRT, CUDA, CPU], factory)
    assert factory.calls == [[TRT, CUDA, CPU], [CUDA, CPU]]
    assert session.get_providers() == [CUDA, CPU]
    assert dropped == ((TRT, f"cannot open the model: {TRT}: cannot create the provider"),)


def test_every_gpu_provider_failing_ends_on_the_cpu_with_each_reason_in_order():
    factory = FakeFactory(fail={TRT, CUDA})
    session, dropped = open_session(b"m", None, [TRT, CUDA, "OpenVINOExecutionProvider"], [TRT, CUDA, CPU], factory)
    assert factory.calls == [[TRT, CUDA, CPU], [CUDA, CPU], [CPU]]
    assert session.get_providers() == [CPU]
    assert [p for p, _ in dropped] == ["OpenVINOExecutionProvider", TRT, CUDA]  # the build's lack first


def test_the_cpus_own_failure_is_raised_not_hidden():
    with pytest.raises(RuntimeError, match="CPUExecutionProvider: cannot create"):
        open_session(b"m", None, [CUDA], [CUDA, CPU], FakeFactory(fail={CUDA, CPU}))


def test_a_provider_onnxruntime_leaves_out_by_itself_is_reported_dropped():
    factory = FakeFactory(leave_out={CUDA})
    session, dropped = open_session(b"m", None, [TRT, CUDA], [TRT, CUDA, CPU], factory)
    assert factory.calls == [[TRT, CUDA, CPU]]
    assert dropped == ((CUDA, "onnxruntime opened the model without it"),)


# ------------------------------------------------------------------ a real model: the card's list, the config's over it
@pytest.fixture(scope="module")
def detector():
    return load_card(model_cards()[0])


class RealFactory(FakeFactory):
    """Records and fails like FakeFactory, then opens the model with onnxruntime on the CPU alone
    (the only provider this machine has), so the model is really run."""

    def __call__(self, model, options, providers):
        import onnxruntime as ort

        super().__call__(model, options, providers)
        return ort.InferenceSession(model, options, providers=[CPU])


def run_once(model):
    x = np.zeros((1, 3, 64, 64), np.float32)
    return model(x)


def test_the_cards_providers_are_asked_for_and_a_failing_one_falls_back_logged(detector, caplog):
    card, path = detector
    card = Card.model_validate({**card.model_dump(), "providers": [TRT, CUDA, CPU]})
    factory = RealFactory(fail={TRT})
    providers = Providers(available=[TRT, CUDA, CPU], factory=factory)
    with caplog.at_level(logging.WARNING, logger="edge.runtime"):
        model = open_model(card, path, 1, providers)
    assert factory.calls == [[TRT, CUDA, CPU], [CUDA, CPU]]
    assert run_once(model)
    [fallback] = providers.fallbacks
    assert fallback.model == card.name and fallback.asked == (TRT, CUDA, CPU)
    # the real session has only the CPU's, so CUDA, handed on, is reported left out too
    assert fallback.details()["dropped"] == {TRT: f"cannot open the model: {TRT}: cannot create the provider",
                                             CUDA: "onnxruntime opened the model without it"}
    assert fallback.using == (CPU,)
    assert f"{TRT} dropped" in caplog.text and path.name in caplog.text


def test_config_providers_override_the_cards(detector):
    card, path = detector
    card = Card.model_validate({**card.model_dump(), "providers": [TRT, CPU]})
    factory = RealFactory()
    open_model(card, path, 1, Providers([CUDA], available=[TRT, CUDA, CPU], factory=factory))
    assert factory.calls == [[CUDA, CPU]]


def test_a_card_without_providers_runs_on_the_cpu_alone(detector):
    card, path = detector
    assert card.providers is None
    factory = RealFactory()
    providers = Providers(available=[TRT, CUDA, CPU], factory=factory)
    open_model(card, path, 1, providers)
    assert factory.calls == [[CPU]] and providers.fallbacks == []


def test_a_provider_missing_from_the_real_build_falls_back_to_the_cpu(detector):
    import onnxruntime as ort

    if CUDA in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    card, path = detector
    model = OnnxModel(path, 1, [CUDA])
    assert model.providers == (CPU,) and model.dropped[0][0] == CUDA
    assert "not in this onnxruntime build" in model.dropped[0][1]
    assert run_once(model)


def test_a_model_the_cpu_cannot_open_is_a_model_error(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"")
    with pytest.raises(ModelError, match="onnxruntime cannot load it"):
        OnnxModel(bad, 1, [CUDA], available=[CUDA, CPU], factory=FakeFactory(fail={CUDA, CPU}))


# ------------------------------------------------------------------ cards and config
@pytest.mark.parametrize("change, message", [
    ({"providers": ["CUDA"]}, "invalid model card: providers: .*'CUDA' is not an onnxruntime execution provider"),
    ({"providers": [CPU, TRT]}, f"invalid model card: providers: .*{CPU} must be last"),
    ({"runtime": "litert", "providers": [CPU]}, "providers are onnxruntime's: a litert card has none"),
])
def test_a_card_naming_bad_providers_is_refused_naming_the_field(detector, tmp_path, change, message):
    card, _ = detector
    path = tmp_path / "m.card.json"
    path.write_text(json.dumps({**card.model_dump(mode="json"), **change}))
    with pytest.raises(ModelError, match=message):
        load_card(path, verify_file=False)


def test_config_providers_default_to_none_and_accept_an_ordered_list(tmp_path):
    assert Config().models.providers is None
    path = tmp_path / "gate.yaml"
    path.write_text(f"models:\n  providers: [{TRT}, {CUDA}, {CPU}]\n")
    assert load_config(path).models.providers == [TRT, CUDA, CPU]


@pytest.mark.parametrize("listed, message", [
    ("[CUDAExecutionProvidr]", "models.providers: .*'CUDAExecutionProvidr' is not an onnxruntime execution provider"),
    (f"[{CPU}, {CUDA}]", f"models.providers: .*{CPU} must be last"),
    (f"[{CUDA}, {CUDA}]", f"models.providers: .*{CUDA} is named twice"),
])
def test_config_refuses_a_bad_provider_list_naming_the_field(tmp_path, listed, message):
    path = tmp_path / "gate.yaml"
    path.write_text(f"models:\n  providers: {listed}\n")
    with pytest.raises(ConfigError, match=message):
        load_config(path)
