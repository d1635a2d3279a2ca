"""evaluation verify / encoders: artifact discovery, the clear skip without ../shared, bench rows and
fp32/INT8 ratios (timings themselves are not asserted: speed is measured by the command)."""
import argparse
import json
import shutil

from evaluation import encoders as B
from evaluation import verify as V
from evaluation.timing import median_ms, timed_runs
from tests.unit._stack import model_cards


def _models_dir(tmp_path):
    _, enc = model_cards()
    d = tmp_path / "m"
    d.mkdir()
    card = json.loads(open(enc).read())
    shutil.copy(enc.replace(".card.json", ".onnx"), d / card["file"])
    shutil.copy(enc, d / f"{card['file'].rsplit('.', 1)[0]}.card.json")
    return d, card


def test_encoder_cards_skips_broken_and_non_encoder_cards(tmp_path, capsys):
    d, card = _models_dir(tmp_path)
    det, _ = model_cards()
    shutil.copy(det, d / "det.card.json")  # a detector card (its model is missing: skipped by name)
    (d / "bad.card.json").write_text("{not json")
    found = V.encoder_cards(d)
    assert [p.name for p in found] == [f"{card['file'].rsplit('.', 1)[0]}.card.json"]
    out = capsys.readouterr().out
    assert "skipping bad.card.json" in out and "skipping det.card.json" in out


def test_verify_skips_with_a_clear_message_without_lfw(tmp_path, capsys):
    ns = argparse.Namespace(lfw=str(tmp_path / "nowhere"))
    assert V.main(ns) == 0
    assert "skipped: LFW not found" in capsys.readouterr().out


def test_bench_rows_and_int8_ratios(tmp_path):
    from edge.modelcard import load_card, write_card

    d, card = _models_dir(tmp_path)
    det, _ = model_cards()
    src, model = load_card(next(d.glob("*.card.json")))
    # The same file under an fp32 and an int8 card: the pairing by name gives ratios of exactly 1.
    for prec in ("fp32", "int8"):
        m = d / f"x_{prec}.onnx"
        shutil.copy(model, m)
        write_card(src.model_copy(update={"name": f"x_{prec}", "file": m.name, "precision": prec}), m)
    rows = {r["artifact"]: r for r in B.bench(d, det, runs=3, threads=(1,), sample=None)}
    assert set(rows) >= {"x_fp32", "x_int8"} and rows["x_fp32"]["ms_1t"] > 0
    assert rows["x_int8"]["size_ratio_vs_fp32"] == 1.0 and rows["x_int8"]["speedup_vs_fp32_1t"] > 0
    assert "size_ratio_vs_fp32" not in rows["x_fp32"]


def test_median_ms_calls_warmup_plus_runs():
    n = []
    median_ms(lambda: n.append(1), runs=5, warmup=2)
    assert len(n) == 7


def test_timed_runs_times_each_run_after_the_warmup_on_the_clock_given():
    ticks = iter(range(100))
    calls = []
    runs = timed_runs(lambda: calls.append(1) or len(calls), runs=3, warmup=2, clock=lambda: next(ticks) ** 2)
    # runs 3..5 read the clock at (0, 1), (2, 3), (4, 5): squares differ by 1, 5, 9
    assert runs == [(1, 3), (5, 4), (9, 5)] and len(calls) == 5
