"""`python -m export build`: registry models -> clean fp32 ONNX -> INT8 ONNX, each with its card.

INT8 uses the activation ranges committed in export/calibration/ (made by `export calibrate`), so
the setup step needs no calibration images and gives the same model everywhere."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from edge.atomic import atomic_write_bytes
from edge.errors import FacegateError
from edge.modelcard import Card, CalibrationSpec, load_card, sha256_file, write_card

from .cards import BLAZEFACE, blazeface_card, sface_card, yunet_card
from .fetch import RAW_DIR
from .onnx_import import import_onnx
from .prelu import int8_friendly
from .quantize import quantize

MODELS_DIR = RAW_DIR.parent
CALIB_DIR = Path(__file__).with_name("calibration")


def method(model: str) -> str:
    """The calibration method `export calibrate` chose for this model (best parity on held-out faces)."""
    return json.loads((CALIB_DIR / "methods.json").read_text())[model]


def ranges_cache(model: str) -> Path:
    return CALIB_DIR / f"{model}.ranges.json"


def thresholds_for(name: str) -> CalibrationSpec | None:
    p = CALIB_DIR / f"{name}.thresholds.json"
    return CalibrationSpec.model_validate(json.loads(p.read_text())) if p.is_file() else None


def _fresh(card_path: Path, sources: list[Path]) -> bool:
    """Skip a rebuild when the card is valid and newer than what it was made from."""
    try:
        load_card(card_path)
    except Exception:
        return False
    return all(card_path.stat().st_mtime >= s.stat().st_mtime for s in sources if s.exists())


def build(out_dir: Path = MODELS_DIR, force: bool = False, quiet: bool = False) -> list[Path]:
    made = []
    say = (lambda *a: None) if quiet else (lambda *a: print("build:", *a))
    sf32, yn32 = out_dir / "sface_fp32.onnx", out_dir / "yunet_fp32.onnx"
    sf8, yn8 = out_dir / "sface_int8.onnx", out_dir / "yunet_int8.onnx"
    if force or not _fresh(out_dir / "sface_fp32.card.json", [RAW_DIR / "sface_2021dec_int8bq.onnx", CALIB_DIR / "sface_fp32.thresholds.json"]):
        say("SFace fp32 (dequantize, fold, free batch)")
        import_onnx(RAW_DIR / "sface_2021dec_int8bq.onnx", sf32)
        made.append(write_card(sface_card("sface_fp32", sf32, "fp32", calibration=thresholds_for("sface_fp32")), sf32))
    if force or not _fresh(out_dir / "yunet_fp32.card.json", [RAW_DIR / "yunet_2023mar_int8bq.onnx"]):
        say("YuNet fp32 (dequantize, fold, free input size)")
        import_onnx(RAW_DIR / "yunet_2023mar_int8bq.onnx", yn32, spatial=True, batch=False)
        made.append(write_card(yunet_card("yunet_fp32", yn32, "fp32"), yn32))
    if force or not _fresh(out_dir / "sface_int8.card.json", [sf32, ranges_cache("sface"), CALIB_DIR / "sface_int8.thresholds.json"]):
        say("SFace INT8 (PReLU rewrite, static QDQ from committed ranges)")
        with tempfile.TemporaryDirectory() as tmp:
            ready = Path(tmp) / "sface_int8ready.onnx"
            int8_friendly(str(sf32), str(ready))
            quantize(ready, sf8, method("sface"), None, ranges_cache("sface"))
        made.append(write_card(sface_card("sface_int8", sf8, "int8", calibration=thresholds_for("sface_int8")), sf8))
    if force or not _fresh(out_dir / "yunet_int8.card.json", [yn32, ranges_cache("yunet")]):
        say("YuNet INT8 (static QDQ from committed ranges)")
        quantize(yn32, yn8, method("yunet"), None, ranges_cache("yunet"))
        made.append(write_card(yunet_card("yunet_int8", yn8, "int8"), yn8))
    for variant, v in BLAZEFACE.items():
        # A card's model file lives in the card's folder, so the raw model is copied beside it.
        raw, tfl = RAW_DIR / v["raw"], out_dir / f"blazeface_{variant}.tflite"
        if raw.is_file() and (force or not _fresh(out_dir / f"blazeface_{variant}.card.json", [raw])):
            say(f"BlazeFace {variant}-range (copy, card)")
            atomic_write_bytes(tfl, raw.read_bytes())
            made.append(write_card(blazeface_card(f"blazeface_{variant}", tfl, variant), tfl))
    return made


def derived_card(base: Card, name: str, model_file: Path, precision: str, **extra) -> Card:
    """`base`'s card (input, alignment, embedding, source) re-pointed at another file of the same
    encoder: its INT8 twin, or a probe built while comparing calibration methods."""
    d = base.model_dump()
    d.update({"name": name, "file": model_file.name, "precision": precision, "sha256": sha256_file(model_file),
              "size_bytes": model_file.stat().st_size, "calibration": None, "accuracy": {}, "speed": {}, **extra})
    return Card.model_validate(d)


def build_dlib(out_dir: Path = MODELS_DIR, force: bool = False, quiet: bool = False) -> list[Path]:
    """dlib's .dat -> fp32 ONNX (export.dlib_onnx, no torch) -> INT8 from the committed ranges,
    with cards, and the fusion recipes whose members are now all built. Needs `python -m export
    fetch --group dlib`."""
    from .dlib_onnx import DAT_NAME
    from .dlib_onnx import build as build_fp32

    made = []
    say = (lambda *a: None) if quiet else (lambda *a: print("build:", *a))
    dat, d32, d8 = RAW_DIR / DAT_NAME, out_dir / "dlib_fp32.onnx", out_dir / "dlib_int8.onnx"
    if not dat.is_file():
        raise FacegateError(dat, "dlib's model is not fetched: run python -m export fetch --group dlib")
    card32_path = out_dir / "dlib_fp32.card.json"
    if force or not _fresh(card32_path, [dat, CALIB_DIR / "dlib_fp32.thresholds.json"]):
        say("dlib fp32 (.dat -> ONNX)")
        build_fp32(RAW_DIR, out_dir)
        card32, _ = load_card(card32_path)
        made.append(write_card(derived_card(card32, "dlib_fp32", d32, "fp32", calibration=thresholds_for("dlib_fp32")), d32))
    if force or not _fresh(out_dir / "dlib_int8.card.json", [d32, ranges_cache("dlib"), CALIB_DIR / "dlib_int8.thresholds.json"]):
        say("dlib INT8 (static QDQ from committed ranges)")
        quantize(d32, d8, method("dlib"), None, ranges_cache("dlib"))
        card32, _ = load_card(card32_path)
        made.append(write_card(derived_card(card32, "dlib_int8", d8, "int8", calibration=thresholds_for("dlib_int8")), d8))
    return made + install_fusions(out_dir, say)


def install_fusions(out_dir: Path = MODELS_DIR, say=print) -> list[Path]:
    """Copy the committed fusion recipes (export/calibration/*.fusion.json, made by `export fuse`)
    and their cards beside their member models, where all members are present. The recipe names
    each member model's sha256, so a member built differently is refused when the gate loads it."""
    from edge.embed import FusionRecipe

    made = []
    for recipe in sorted(CALIB_DIR.glob("*.fusion.json")):
        card = recipe.with_name(recipe.name[: -len(".json")] + ".card.json")
        members = FusionRecipe.model_validate_json(recipe.read_text()).members
        if not card.is_file() or not all((out_dir / m.card).is_file() for m in members):
            continue
        written = []
        for src in (recipe, card):
            dst = out_dir / src.name
            if not dst.is_file() or dst.read_bytes() != src.read_bytes():
                atomic_write_bytes(dst, src.read_bytes())
                written.append(dst)
        if written:
            say(f"fusion {recipe.name} installed")
        made += written + _fp32_twin(out_dir / recipe.name, out_dir)
    return made


def _fp32_twin(recipe_path: Path, out_dir: Path) -> list[Path]:
    """An INT8 fusion's fp32 twin (same scales and flips on the members' fp32 models): what
    `python -m evaluation bench` runs as the fusion's fp32 baseline. Its card keeps the INT8 fusion's table."""
    from edge.embed import FusionRecipe

    name = recipe_path.name.replace("_int8", "_fp32")
    recipe = FusionRecipe.model_validate_json(recipe_path.read_text())
    cards = [out_dir / m.card.replace("_int8", "_fp32") for m in recipe.members]
    if name == recipe_path.name or not all(c.is_file() and c != out_dir / m.card for c, m in zip(cards, recipe.members)):
        return []
    twin = recipe.model_copy(update={
        "members": [m.model_copy(update={"card": c.name, "sha256": load_card(c)[0].sha256}) for m, c in zip(recipe.members, cards)],
        "notes": f"fp32 twin of {recipe_path.name} (its scales and flips), the speed baseline of evaluation bench"})
    path = out_dir / name
    data = (json.dumps(twin.model_dump(), indent=1) + "\n").encode()
    if path.is_file() and path.read_bytes() == data:
        return []
    atomic_write_bytes(path, data)
    int8_card, _ = load_card(recipe_path.with_name(recipe_path.name[: -len(".json")] + ".card.json"), verify_file=False)
    return [path, write_card(derived_card(int8_card, name[: -len(".fusion.json")], path, "fp32", runtime="fusion",
                                          embedding=int8_card.embedding, calibration=int8_card.calibration,
                                          source=int8_card.source), path)]
