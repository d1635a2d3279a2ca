"""python -m evaluation COMMAND --help: one-to-n, verify, bench, mqtt-bench, osdp-latency, encoders, detectors, liveness, fairness."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edge.errors import lazy_command, run_cli

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
MODELS = REPO / "models"
CACHE = REPO / "out" / "eval_cache"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m evaluation", description="facegate evaluations and benchmarks")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("one-to-n", help="LFW 10-fold + one-shot open-set 1:N through the gate's pipeline (needs ../shared)")
    s.add_argument("--config", "-c", help="gate config YAML (default: built-in defaults)")
    s.add_argument("--lfw", default=str(SHARED / "data" / "lfw"))
    s.add_argument("--encoder", help="encoder model card (default: the config's)")
    s.add_argument("--detector", help="detector model card (default: the config's)")
    s.add_argument("--flip", action="store_true", help="test-time flip (default: the config's match.flip)")
    s.add_argument("--enroll-flip", action=argparse.BooleanOptionalAction, default=None,
                   help="enrolled photos embedded with their mirror image (default: the config's match.enroll_flip)")
    s.add_argument("--norm", choices=["asnorm"], help="AS-norm against the cohort file beside the encoder")
    s.add_argument("--enroll-encoder", help="enrollment encoder card (default: the config's models.enroll_encoder, else the fp32 twin)")
    s.add_argument("--no-enroll-twin", action="store_true", help="enroll with the door encoder itself")
    s.add_argument("--margin", type=float, default=None, help="best minus runner-up cosine must reach this (default: the config's match.min_margin)")
    s.add_argument("--fusion", metavar="CARD2:W", help="score fusion with a second encoder; W = its weight")
    s.add_argument("--fusion-flip", action="store_true", help="mirror the --fusion encoder at the door (as a recipe member with flip)")
    s.add_argument("--scale", type=float, default=1.0, help="alignment template scale about the crop centre")
    s.add_argument("--frames", type=int, default=1, help="multi-frame EMULATION: jittered alignments averaged")
    s.add_argument("--levers", action="store_true", help="every lever alone and combined")
    s.add_argument("--scales", type=lambda t: [float(x) for x in t.split(",") if x], default=[],
                   help="with --levers: also these template scales (each embeds LFW again)")
    s.add_argument("--no-quality", action="store_true", help="report the quality gate's rejections but keep the faces")
    s.add_argument("--every", type=int, default=1, help="SUBSET for a quick look: every Nth person in 1:N")
    s.add_argument("--pairs-per-fold", type=int, default=0, help="SUBSET: the first N pairs of each kind per fold")
    s.add_argument("--cache-dir", default=str(CACHE))
    s.add_argument("--json", help="write the figures as JSON")
    s.add_argument("--probes-json", help="write the first row's per-probe results (identity, best match, score) as JSON")
    s.add_argument("--det-png", help="write the 1:N DET curves as PNG (needs matplotlib)")
    s.add_argument("--calibration-png", help="write the gate's own threshold, measured FPIR against target, as PNG")
    s.add_argument("--draws", type=int, default=20, help="random galleries per K for the gate's own threshold")
    s.add_argument("--no-gate-threshold", action="store_true", help="skip the gate's own threshold on random galleries")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=lazy_command(__package__, "one_to_n"))
    s = sub.add_parser("verify", help="LFW 10-fold verification of every encoder artifact (needs ../shared)")
    s.add_argument("--lfw", default=str(SHARED / "data" / "lfw"))
    s.add_argument("--models", default=str(MODELS))
    s.add_argument("--detector", default=str(MODELS / "yunet_fp32.card.json"))
    s.add_argument("--cache-dir", default=str(CACHE))
    s.add_argument("--flip", action="store_true")
    s.add_argument("--pairs-per-fold", type=int, default=0, help="SUBSET: first N pairs of each kind per fold")
    s.add_argument("--json")
    s.add_argument("--quiet", action="store_true")
    s.set_defaults(fn=lazy_command(__package__, "verify"))
    s = sub.add_parser("bench", help="per-stage and end-to-end latency per 640x480 frame, gallery search, peak RSS")
    s.add_argument("--config", "-c", help="gate config YAML (default: built-in defaults)")
    s.add_argument("--frames", type=int, default=200)
    s.add_argument("--threads", default="1,2")
    s.add_argument("--gallery-size", type=int, default=100000)
    s.set_defaults(fn=lazy_command(__package__, "bench"))
    s = sub.add_parser("mqtt-bench", help="decision-to-MQTT latency on loopback (a mosquitto started here): median, p99")
    s.add_argument("--decisions", type=int, default=1000)
    s.add_argument("--interval-ms", type=float, default=20.0, help="between decisions")
    s.add_argument("--qos", type=int, choices=(0, 1, 2), default=1)
    s.add_argument("--json")
    s.set_defaults(fn=lazy_command(__package__, "mqtt_bench"))
    s = sub.add_parser("osdp-latency", help="decision to OSDP card read at a libosdp control panel over a pty pair: "
                                            "median, p99, with and without Secure Channel")
    s.add_argument("--decisions", type=int, default=300, help="per panel loop and Secure Channel setting")
    s.add_argument("--seed", type=int, default=0, help="for the moments of the poll cycle the decisions fall on")
    s.set_defaults(fn=lazy_command(__package__, "osdp_bench"))
    s = sub.add_parser("encoders", help="per-face latency (1 and 2 threads) and file size of every encoder artifact")
    s.add_argument("--models", default=str(MODELS))
    s.add_argument("--detector", default=str(MODELS / "yunet_fp32.card.json"))
    s.add_argument("--sample", default=str(MODELS / "raw" / "images" / "obama.jpg"))
    s.add_argument("--runs", type=int, default=100)
    s.add_argument("--threads", default="1,2")
    s.add_argument("--json")
    s.set_defaults(fn=lazy_command(__package__, "encoders"))
    s = sub.add_parser("detectors", help="detector speed per 640x480 frame and faces found on LFW, to pick the default")
    s.add_argument("--models", default=str(MODELS))
    s.add_argument("--detectors", help="card names in --models, comma-separated (default: the YuNet and BlazeFace cards built)")
    s.add_argument("--lfw", default=str(SHARED / "data" / "lfw"))
    s.add_argument("--sample", default=str(MODELS / "raw" / "images" / "obama.jpg"), help="the face put in the 640x480 frame")
    s.add_argument("--runs", type=int, default=200)
    s.add_argument("--threads", default="1")
    s.add_argument("--limit", type=int, default=0, help="SUBSET: first N LFW images (0 = all)")
    s.add_argument("--json")
    s.set_defaults(fn=lazy_command(__package__, "detectors"))
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
    s.set_defaults(fn=lazy_command(__package__, "liveness"))
    s = sub.add_parser("fairness", help="quality refusals per skin-tone (ITA) band on CelebA and LFW, a graded "
                                       "synthetic exposure set, LFW 1:N FNIR / FPIR per band")
    s.add_argument("--celeba", default=str(SHARED / "data" / "celeba" / "images"))
    s.add_argument("--lfw", default=str(SHARED / "data" / "lfw"))
    s.add_argument("--detector", default=str(MODELS / "yunet_fp32.card.json"))
    s.add_argument("--per-band", type=int, default=40, help="faces per band in each graded exposure set (CelebA by photo band; CelebA and LFW by person band)")
    s.add_argument("--as-shot", action="store_true", help="graded set from the photos as they are, not first exposed alike")
    s.add_argument("--matcher", action="store_true", help="also score the back-lit graded faces with the default encoder: "
                                                          "own-person and best-stranger scores by stops of back-light")
    s.add_argument("--reskin", type=int, default=30, metavar="N", help="the first N faces per band of the CelebA graded set, "
                   "each given every band's skin (the picture otherwise unchanged) and graded again; 0: skip")
    s.add_argument("--probes", help="per-probe 1:N results of the default (python -m evaluation one-to-n --probes-json FILE)")
    s.add_argument("--out", default="out/fairness")
    s.set_defaults(fn=lazy_command(__package__, "fairness"))
    args = p.parse_args(argv)
    return run_cli(args.fn, args)


if __name__ == "__main__":
    sys.exit(main())
