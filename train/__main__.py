"""python -m train: prepare data, fit encoders, evaluate them on LFW, hand them to export/."""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from edge.config import MODELS
from edge.errors import FacegateError

DEFAULT_DETECTOR = str(MODELS / "yunet_fp32.card.json")

EPILOG = """\
typical run:
  python -m train prepare ../shared/data/celeba/images data/celeba112
  python -m train embed-teacher data/celeba112 teacher.npz --encoder models/sface_fp32.card.json
  python -m train fit --config student.yaml --out runs/student
  python -m train export-onnx runs/student/encoder.pt models/student_fp32.onnx --data "CelebA subset" \\
      --license "CelebA: non-commercial research only"
  python -m train export-int8 models/student_fp32.card.json models/student_int8.onnx --calibrate data/celeba112
  python -m train evaluate --encoder models/student_fp32.card.json --json runs/student/lfw.json

Run `python -m train COMMAND --help` for each command's options.
"""

FIT_HELP = """\
Config: a YAML file (--config) and/or --set key=value overrides (dotted keys for nested fields).
Fields (defaults):
  data              prepared dataset folder (required)
  teacher           teacher embeddings .npz from embed-teacher (needed by distill_*)
  backbone          mobilefacenet_relu (registered names: see --list-backbones)
  embedding_dim     128
  objectives        weights, 0 = off, combinable: triplet 1.0, binary 0.0, distill_cosine 0.0,
                    distill_l2 0.0, distill_pairwise 0.0
  margin            0.2   triplet alpha on squared distances
  mining            batch_hard | semihard | hard | all
  binary_features   abs | chi2
  p, m              16, 4  identities per batch, images per identity
  epochs            10
  steps_per_epoch   images // (p*m)
  lr, weight_decay, warmup_steps   2e-3, 5e-4, 100 (AdamW, cosine decay)
  flip              true   mirror half the faces of each batch
  jitter            false  light rotate / scale / shift and brightness / contrast jitter (student
                           sees the jittered face, distillation targets stay the clean crop's)
  bn_images         20000  images for the final BatchNorm recalibration (0 = keep running stats)
  device            auto | cpu | cuda
  seed              0
Writes OUT/last.pt after every epoch (--resume continues from it), OUT/encoder.pt and
OUT/report.json (config, per-epoch losses, time) at the end."""


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train", description=__doc__, epilog=EPILOG,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("prepare", parents=[common], help="detect + align raw identity folders into 112x112 crops",
                       description="Run the gate's own detector and 5-point alignment over SRC (one sub-folder per "
                                   "identity) and write aligned PNG crops to DST in the same layout. Faces not found "
                                   "and unreadable files are listed in DST/prepare_report.json. Re-running continues.")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help="detector model card (default: %(default)s)")
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("embed-teacher", parents=[common], help="teacher embeddings of a prepared dataset, for distillation",
                       description="Embed every crop of DATA (and its mirror image) with each --encoder card, via the "
                                   "edge's embedder; several encoders form an ensemble (concatenated, scaled). Writes OUT .npz.")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--encoder", action="append", required=True, help="teacher encoder model card (repeatable)")
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("fit", parents=[common], help="train an encoder", description=FIT_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="training config YAML")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    p.add_argument("--out", required=False, help="checkpoint / report folder")
    p.add_argument("--resume", action="store_true", help="continue from OUT/last.pt")
    p.add_argument("--list-backbones", action="store_true", help="print the registered backbones and exit")

    p = sub.add_parser("export-onnx", parents=[common], help="trained encoder -> fp32 ONNX + model card (input to export/)",
                       description="Write the encoder of CHECKPOINT (encoder.pt or last.pt) as fp32 ONNX with its "
                                   "model card, and check that the edge embedder reproduces the torch embeddings.")
    p.add_argument("checkpoint")
    p.add_argument("out", help="model file, e.g. models/student_fp32.onnx (card written beside it)")
    p.add_argument("--name", help="card name (default: file stem)")
    p.add_argument("--data", required=True, help="training data, for the card (e.g. 'CelebA identity subset')")
    p.add_argument("--license", required=True, help="licence terms the model inherits from its data")
    p.add_argument("--check", help="folder of prepared crops for the torch/ONNX parity check")

    p = sub.add_parser("export-int8", parents=[common], help="fp32 encoder card -> INT8 ONNX + card through export/",
                       description="Quantize an fp32 encoder (from export-onnx) with export/'s static QDQ, activation "
                                   "ranges from prepared crops (never LFW). The INT8 card keeps the fp32 card's source "
                                   "(training data, licence); with --holdout it gets the impostor-score table of "
                                   "identities the encoder was not trained on, which the gate's thresholds come from.")
    p.add_argument("card", help="fp32 encoder card, e.g. models/student_fp32.card.json")
    p.add_argument("out", help="INT8 model file, e.g. models/student_int8.onnx (card written beside it)")
    p.add_argument("--calibrate", required=True, help="prepared crops for the activation ranges (training data, never LFW)")
    p.add_argument("--holdout", help="prepared crops of identities held out of training, for the impostor table")
    p.add_argument("--method", choices=["minmax", "percentile", "entropy"], default="percentile")
    p.add_argument("--limit", type=int, default=300, help="calibration crops (default: %(default)s)")

    p = sub.add_parser("evaluate", parents=[common], help="LFW 10-fold verification + one-shot 1:N for an encoder card",
                       description="Run an encoder (by its model card, through the edge's detector, alignment and "
                                   "embedder) on LFW: View 2 10-fold accuracy (threshold from the other 9 folds), "
                                   "TAR@FAR=1e-3, EER, and the open-set 1:N protocol (FNIR at FPIR 0.003 / 0.01, "
                                   "rank-1). Failures to acquire count as errors / misses. LFW is evaluation only.")
    p.add_argument("--encoder", required=True, help="encoder model card")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help="detector model card (default: %(default)s)")
    p.add_argument("--lfw", default="../shared/data/lfw", help="LFW folder with pairs.txt and images/")
    p.add_argument("--protocol", choices=["verification", "1n", "both"], default="both")
    p.add_argument("--pairs-per-fold", type=int, help="quick look: first N matched + N mismatched pairs per fold")
    p.add_argument("--cache-dir", help="embedding cache folder, the evaluations' format (out/eval_cache: shared with "
                                      "python -m evaluation one-to-n)")
    p.add_argument("--plots", help="folder for DET curve PNGs (needs matplotlib)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--threads", type=int, default=2)

    p = sub.add_parser("liveness", parents=[common], help="train the passive PAD model on NUAA, export ONNX + INT8 + cards",
                       description="Crop NUAA frames around the gate's own face boxes, fit the PAD ensemble with hard "
                                   "augmentation, pick the threshold at --bpcer on leave-one-session-out train "
                                   "scores, and write OUT/pad_fp32.onnx and OUT/pad_int8.onnx with their cards. "
                                   "The recipe's defaults are the ones train/liveness_gpu.py chose.")
    p.add_argument("--nuaa", default="../shared/data/nuaa")
    p.add_argument("--detector", default=DEFAULT_DETECTOR, help="detector model card (default: %(default)s)")
    p.add_argument("--out", default="out/liveness")
    p.add_argument("--config", help="a recipe as JSON (FitConfig fields, or a liveness_gpu final.json with its threshold)")
    p.add_argument("--epochs", type=int, help="override the recipe's epochs")
    p.add_argument("--seeds", type=int, help="override the recipe's ensemble size")
    p.add_argument("--bpcer", type=float, default=0.05)
    p.add_argument("--frames", type=int, default=3, help="policy window the threshold is set for (liveness.frames)")
    p.add_argument("--device", default="cpu", help="torch device (cpu, cuda)")
    p.add_argument("--state", help="export this Ensemble state_dict (e.g. liveness_gpu's final.pt) instead of fitting")
    p.add_argument("--threshold", type=float, help="threshold for --state (default: the --config file's)")


    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    progress = not args.quiet
    try:
        return _run(args, progress)
    except FacegateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args, progress: bool) -> int:
    if args.cmd == "prepare":
        from .data import prepare

        r = prepare(args.src, args.dst, args.detector, args.threads, progress=progress)
        print(f"{r['images']} images of {r['identities']} identities: {r['written']} written, {r['kept']} already "
              f"there, {len(r['no_face'])} without a face, {len(r['unreadable'])} unreadable "
              f"(list: {args.dst}/prepare_report.json)")
    elif args.cmd == "embed-teacher":
        from .data import load_faces
        from .teacher import embed_teachers

        out = embed_teachers(load_faces(args.data), args.encoder, args.out, args.threads, progress=progress)
        print(f"wrote {out}")
    elif args.cmd == "fit":
        from . import backbones
        from .fit import fit, load_config

        if args.list_backbones:
            print("\n".join(backbones.names()))
            return 0
        if not args.out:
            raise FacegateError(None, "fit needs --out (checkpoint folder)")
        r = fit(load_config(args.config, args.set), args.out, args.resume, progress)
        last = r["history"][-1] if r["history"] else {}
        print(json.dumps({"out": args.out, "last_epoch": last, "device": r["device"]}, indent=1))
    elif args.cmd == "export-onnx":
        from .data import load_faces
        from .fit import load_encoder_weights
        from .onnx import export_onnx, parity

        model = load_encoder_weights(args.checkpoint)
        card = export_onnx(model, args.out, args.name or Path(args.out).stem, args.data, args.license)
        print(f"wrote {args.out} and {card}")
        if args.check:
            r = parity(model, card, load_faces(args.check).images[:64])
            print(f"torch vs edge embedder cosine: min {r['parity_min']:.6f}; cosine between different crops: "
                  f"mean {r['spread_mean']:.3f}, max {r['spread_max']:.3f}")
            if r["collapsed"]:
                raise FacegateError(args.out, "collapsed: the network gives (nearly) one embedding for every face")
    elif args.cmd == "export-int8":
        from .data import load_faces
        from .int8 import export_int8

        for folder in (args.calibrate, args.holdout):
            if folder and "lfw" in Path(folder).resolve().parts:
                raise FacegateError(folder, "LFW is for evaluation only: calibrate on training crops")
        r = export_int8(args.card, args.out, load_faces(args.calibrate), args.method, args.limit,
                        load_faces(args.holdout) if args.holdout else None)
        print(f"wrote {args.out} and {r['card']} ({r['method']}, {r['calibration_crops']} crops); INT8 vs fp32 "
              f"cosine: mean {r['parity_cos_mean']:.4f}, min {r['parity_cos_min']:.4f}")
    elif args.cmd == "evaluate":
        from .evaluate import evaluate, summary, write_json

        protocols = ("verification", "1n") if args.protocol == "both" else (args.protocol,)
        r = evaluate(args.lfw, args.encoder, args.detector, protocols, args.pairs_per_fold, args.threads,
                     args.cache_dir, args.plots, progress)
        print(summary(r))
        if args.json:
            write_json(r, args.json)
    elif args.cmd == "liveness":
        from .liveness import FitConfig, run

        spec = json.loads(Path(args.config).read_text()) if args.config else {}
        cfg = FitConfig.from_dict(spec.get("config", spec))
        cfg.epochs = args.epochs or cfg.epochs
        cfg.seeds = args.seeds or cfg.seeds
        threshold = args.threshold if args.threshold is not None else spec.get("threshold")
        r = run(args.nuaa, args.detector, args.out, cfg, args.bpcer, args.frames, args.device, progress,
                args.state, threshold, spec.get("loso"))
        print(json.dumps({k: r[k] for k in ("threshold", "accuracy", "params", "train_s", "cards")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
