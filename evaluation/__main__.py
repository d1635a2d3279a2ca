"""python -m evaluation COMMAND --help: liveness, fairness."""
from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path

from edge.errors import run_cli

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MODELS = REPO / "models"


def _lazy(module: str):
    """A subcommand whose module (and its heavy imports) loads only when it runs."""
    def run(args) -> int:
        return importlib.import_module(f".{module}", __package__).main(args)

    return run


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation", description="facegate evaluations and benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("liveness", help="APCER / BPCER / ACER on the NUAA test split, simulated print and screen attacks",
                       description="Per-frame and per-sequence APCER (print), BPCER and ACER at the operating point "
                                   "for the shipped PAD model, its members and any other PAD card; the gate's liveness "
                                   "policy over each sequence; simulated attacks on the registry photos; DET PNG.")
    s.add_argument("--nuaa", default=str(SHARED / "data" / "nuaa"))
    s.add_argument("--detector", default=str(MODELS / "yunet_fp32.card.json"), help="detector card (default: %(default)s)")
    s.add_argument("--pad", default=None, help="PAD card (default: the shipped edge/assets/pad/minifasnet.card.json)")
    s.add_argument("--also", action="append", default=[], help="another PAD card to report beside it (repeatable)")
    s.add_argument("--frames", type=int, default=3, help="policy window (liveness.frames)")
    s.add_argument("--no-cues", action="store_true", help="skip the passive+blink policy (the face mesh)")
    s.add_argument("--samples", default=str(MODELS / "raw" / "images"), help="registry photos for the simulated attacks")
    s.add_argument("--out", default="out/liveness", help="folder for det.png and eval.json")
    s.set_defaults(fn=_lazy("liveness"))
    s = sub.add_parser("fairness", help="quality refusals per skin-tone (ITA) band on CelebA and LFW, a graded "
                                       "synthetic exposure set, LFW 1:N FNIR / FPIR per band")
    s.add_argument("--celeba", default=str(SHARED / "data" / "celeba" / "images"))
    s.add_argument("--lfw", default=str(SHARED / "data" / "lfw"))
    s.add_argument("--detector", default=str(MODELS / "yunet_fp32.card.json"))
    s.add_argument("--per-band", type=int, default=40, help="CelebA faces per band in the graded exposure set")
    s.add_argument("--probes", help="per-probe 1:N results of the default (python -m edge evaluate-1n --probes-json FILE)")
    s.add_argument("--out", default="out/fairness")
    s.set_defaults(fn=_lazy("fairness"))
    args = p.parse_args(argv)
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
