"""edge.config.load_config: defaults, every refusal names the file, YAML is loaded safely."""
import json
from pathlib import Path

import pytest

from edge.config import MAX_TARGET_FPIR, MODELS, Config, OsdpConfig, describe, load_config
from edge.errors import ConfigError, FacegateError
from edge.modelcard import load_card


def write(tmp_path, text, name="gate.yaml"):
    p = tmp_path / name
    p.write_text(text, encoding="utf-8")
    return p


def refused(path, *words):
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert str(path) in msg and e.value.path == str(path)
    for w in words:
        assert w in msg, msg
    return msg


def test_no_file_gives_defaults():
    cfg = load_config(None)
    assert cfg == Config()
    assert (cfg.decision.k, cfg.decision.n, cfg.camera.source, cfg.match.threshold) == (2, 3, "replay", None)


def test_empty_file_gives_defaults(tmp_path):
    assert load_config(write(tmp_path, "")) == Config()
    assert load_config(write(tmp_path, "# only a comment\n")) == Config()


def test_a_file_overrides_only_what_it_names(tmp_path):
    cfg = load_config(write(tmp_path, "decision:\n  k: 3\n  n: 5\nrelay:\n  pin_factory: mock\n"))
    assert (cfg.decision.k, cfg.decision.n, cfg.relay.pin_factory) == (3, 5, "mock")
    assert cfg.decision.cooldown_s == Config().decision.cooldown_s
    assert cfg.camera == Config().camera


def test_config_errors_are_facegate_errors(tmp_path):
    with pytest.raises(FacegateError):
        load_config(write(tmp_path, "camra: {}\n"))


def test_unknown_section_is_refused(tmp_path):
    refused(write(tmp_path, "camra:\n  fps: 10\n"), "camra", "Extra inputs")


def test_unknown_key_in_a_section_is_refused(tmp_path):
    refused(write(tmp_path, "decision:\n  cooldown: 3\n"), "decision.cooldown", "Extra inputs")


def test_wrong_type_is_refused(tmp_path):
    refused(write(tmp_path, "decision:\n  k: two\n"), "decision.k")
    refused(write(tmp_path, "camera: 15\n"), "camera")


@pytest.mark.parametrize("text,where", [
    ("decision:\n  k: 0\n", "decision.k"),
    ("decision:\n  backoff_s: 5\n", "decision.backoff_s"),  # a back-off shorter than 30 s is no back-off
    ("match:\n  target_fpir: 1.0\n", "match.target_fpir"),
    ("camera:\n  fps: 0\n", "camera.fps"),
    ("camera:\n  source: webcam\n", "camera.source"),
])
def test_out_of_range_value_is_refused(tmp_path, text, where):
    refused(write(tmp_path, text), where)


def test_k_above_n_is_refused(tmp_path):
    refused(write(tmp_path, "decision:\n  k: 4\n  n: 3\n"), "decision.k must not exceed decision.n")
    assert load_config(write(tmp_path, "decision:\n  k: 3\n  n: 3\n")).decision.k == 3


def test_pulse_longer_than_max_hold_is_refused(tmp_path):
    refused(write(tmp_path, "relay:\n  pulse_s: 6\n  max_hold_s: 5\n"), "relay.pulse_s must not exceed")


@pytest.mark.parametrize("text", ["- camera\n- relay\n", "just words\n", "42\n"])
def test_non_mapping_yaml_is_refused(tmp_path, text):
    refused(write(tmp_path, text), "mapping")


def test_python_object_tags_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    text = f"!!python/object/apply:os.system ['touch {marker}']\n"
    refused(write(tmp_path, text), "not valid YAML")
    assert not marker.exists()
    refused(write(tmp_path, "decision: !!python/object:edge.config.DecisionConfig {k: 1}\n"), "not valid YAML")


def test_broken_yaml_missing_file_and_bad_encoding_are_refused(tmp_path):
    refused(write(tmp_path, "decision: {k: 2\n"), "not valid YAML")
    refused(tmp_path / "absent.yaml", "not found")
    p = tmp_path / "latin1.yaml"
    p.write_bytes(b"camera:\n  path: caf\xe9\n")
    refused(p, "not valid YAML")


def test_describe_lists_every_field():
    lines = describe().splitlines()
    expected = []
    for sname, sfield in Config.model_fields.items():
        expected.append(f"{sname}:")
        for fname in sfield.annotation.model_fields:  # door.osdp is a section of door: its fields one level in
            inner = fname == "osdp" and sname == "door"
            expected.append("  osdp:" if inner else f"  {fname}: default ")
            expected += [f"    {n}: default " for n in OsdpConfig.model_fields] if inner else []
    assert len(lines) == len(expected)
    for line, start in zip(lines, expected):
        assert line.startswith(start), (line, start)
    assert "  k: default 2 (Ge(ge=1), Le(le=30)) - frames that must agree on one identity" in lines
    assert "    baud: default 9600 - the line's speed, as the panel is set (OSDP's default 9600)" in lines


# ---------------------------------------------------------------- operating point: no config opens the door for anyone

@pytest.mark.parametrize("fpir", ["0.999", "0.5", "0.0501"])
def test_a_target_fpir_above_the_bound_is_refused_naming_field_and_bound(tmp_path, fpir):
    refused(write(tmp_path, f"match:\n  target_fpir: {fpir}\n"), "match.target_fpir", str(MAX_TARGET_FPIR))


def test_the_bound_itself_is_accepted(tmp_path):
    assert load_config(write(tmp_path, f"match:\n  target_fpir: {MAX_TARGET_FPIR}\n")).match.target_fpir == MAX_TARGET_FPIR


def encoder_range(card: Path) -> tuple[float, float]:
    if not card.exists():
        pytest.skip(f"{card} missing: run `python -m export setup`")
    table = load_card(card, verify_file=False)[0].calibration.threshold
    return min(table), max(table)


@pytest.mark.parametrize("threshold", ["0", "-1", "0.5", "1"])  # the default fusion card is calibrated 0.60..0.85
def test_a_fixed_threshold_outside_the_cards_calibrated_range_is_refused(tmp_path, threshold):
    lo, hi = encoder_range(Path(Config().models.encoder))
    msg = refused(write(tmp_path, f"match:\n  threshold: {threshold}\n"), "match.threshold", "calibrated range",
                  f"{lo:.4f}..{hi:.4f}", Config().models.encoder)
    assert "calibration.threshold" in msg


def test_a_fixed_threshold_is_checked_against_the_encoder_the_config_names(tmp_path):
    sface = MODELS / "sface_int8.card.json"
    lo, hi = encoder_range(sface)
    assert lo < 0.363 < hi  # SFace's published threshold lies inside its table
    cfg = load_config(write(tmp_path, f"models:\n  encoder: {sface}\nmatch:\n  threshold: 0.363\n"))
    assert cfg.match.threshold == 0.363
    refused(write(tmp_path, f"models:\n  encoder: {sface}\nmatch:\n  threshold: {hi + 0.01:.4f}\n"), "match.threshold")
    refused(write(tmp_path, f"models:\n  encoder: {sface}\nmatch:\n  threshold: {lo - 0.01:.4f}\n"), "match.threshold")


def test_a_fixed_threshold_with_a_missing_card_is_refused_naming_the_card(tmp_path):
    card = tmp_path / "gone.card.json"
    refused(write(tmp_path, f"models:\n  encoder: {card}\nmatch:\n  threshold: 0.4\n"), "models.encoder", str(card), "not found")
    refused(write(tmp_path, f"models:\n  encoder: {tmp_path}\nmatch:\n  threshold: 0.4\n"), "models.encoder", str(tmp_path))


def test_a_fixed_threshold_with_an_uncalibrated_card_is_refused(tmp_path):
    card = MODELS / "sface_int8.card.json"
    encoder_range(card)
    raw = json.loads(card.read_text())
    del raw["calibration"]
    (tmp_path / "nocal.card.json").write_text(json.dumps({**raw, "file": "nocal.onnx"}))
    refused(write(tmp_path, f"models:\n  encoder: {tmp_path / 'nocal.card.json'}\nmatch:\n  threshold: 0.4\n"),
            "match.threshold", "no calibration.threshold table")


# ---------------------------------------------------------------- check-config: models, bounds, duplicate keys

@pytest.mark.parametrize("field", ["detector", "encoder", "enroll_encoder", "liveness"])
def test_check_config_refuses_a_missing_model_card_naming_the_field(tmp_path, field, capsys):
    from edge.__main__ import main
    from edge.config import check_model_cards

    missing = tmp_path / "gone.card.json"
    p = write(tmp_path, f"models:\n  {field}: {missing}\n")
    cfg = load_config(p)
    with pytest.raises(ConfigError) as e:
        check_model_cards(cfg, p)
    assert e.value.path == str(p) and f"models.{field}" in str(e.value) and str(missing) in str(e.value)
    assert "model card not found" in str(e.value)
    assert main(["check-config", str(p)]) == 2
    assert f"models.{field}" in capsys.readouterr().err


def test_check_config_passes_the_shipped_models(tmp_path):
    from edge.config import check_model_cards

    cfg = Config()
    if not Path(cfg.models.encoder).is_file() or not Path(cfg.models.detector).is_file():
        pytest.skip("default model cards not built: run `python -m export setup`")
    check_model_cards(cfg, "defaults")


@pytest.mark.parametrize("text, words", [
    ("camera:\n  reconnect_backoff_s: 60\n  reconnect_backoff_max_s: 10\n",
     ["camera.reconnect_backoff_s 60.0 exceeds camera.reconnect_backoff_max_s 10.0"]),
    ("decision:\n  backoff_s: 900\n  backoff_max_s: 600\n", ["decision.backoff_s 900.0 exceeds decision.backoff_max_s 600.0"]),
])
def test_a_first_back_off_longer_than_its_ceiling_is_refused(tmp_path, text, words):
    refused(write(tmp_path, text), *words)


@pytest.mark.parametrize("text, key, line", [
    ("match:\n  threshold: 0.7\n  threshold: 0.61\n", "'threshold'", "line 3"),
    ("match:\n  target_fpir: 0.001\nrelay: {}\nmatch:\n  target_fpir: 0.05\n", "'match'", "line 4"),
])
def test_a_duplicate_yaml_key_is_refused_naming_the_key_and_its_line(tmp_path, text, key, line):
    refused(write(tmp_path, text), "not valid YAML", "duplicate key " + key, line)


def test_yaml_merge_keys_are_not_mistaken_for_duplicates(tmp_path):
    cfg = load_config(write(tmp_path, "relay:\n  <<: {pulse_s: 2.0}\n  max_hold_s: 4.0\n"))
    assert (cfg.relay.pulse_s, cfg.relay.max_hold_s) == (2.0, 4.0)


def test_describe_prints_each_sections_own_defaults():
    sections, current = {}, None
    for line in describe().splitlines():
        if not line.startswith(" "):
            current = sections.setdefault(line.rstrip(":"), [])
        else:
            current.append(line)
    assert any(line.startswith("  max_yaw: default 0.45 ") for line in sections["enroll_quality"])
    assert any(line.startswith("  patience_frames: default 0 ") for line in sections["enroll_quality"])
    assert any(line.startswith("  max_yaw: default 1.0 ") for line in sections["quality"])
