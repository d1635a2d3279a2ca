"""The PAD recipe sweep, made for one short GPU run (and runnable on the CPU with tiny settings).

    # here (needs ../shared and edge/): the train split's crops for every input in INPUTS
    .venv-train/bin/python -m train.liveness_gpu prepare --out .gpu/nuaa_train.npz
    # on the GPU machine (torch + numpy only; no edge/, no ../shared): sweep, choose, fit the final ensemble
    python3 -m train.liveness_gpu sweep --data .gpu/nuaa_train.npz --out $OUT --budget 240 --workers 8
    # here: export the chosen ensemble through the project's path (INT8 ONNX + card)
    .venv-train/bin/python -m train liveness --config $OUT/final.json --state $OUT/final.pt

Every configuration is scored by leave-one-session-out on the NUAA train lists only (train on
the first capture session, score the second, and back), an ensemble of two seeds per fold; the
choice is the lowest per-frame APCER at BPCER 5% of the pooled out-of-fold window means (the gate
judges the mean of the last 3 frames), ties broken by per-sequence ACER at the threshold. The test lists are never read.
The final ensemble's threshold is taken at BPCER 5% of its own out-of-fold scores."""
from __future__ import annotations

import argparse
import itertools
import json
import logging
import os
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, replace
from multiprocessing import get_context

import numpy as np
import torch

from .liveness import Ensemble, FitConfig, cv_figures, fit, live_scores, param_count

log = logging.getLogger("facegate.train")
INPUTS = ((2.7, 80), (1.4, 112), (2.0, 96))  # (crop scale, pixels)
SWEEP_SEEDS = 2
FINAL_SEEDS = 3


def key(scale: float, size: int) -> str:
    return f"{scale:g}_{size}"


def prepare(nuaa: str, detector: str, out: str, work: str) -> None:
    from pathlib import Path

    from .liveness import train_data

    arrays = {}
    for scale, size in INPUTS:
        d = train_data(nuaa, detector, Path(work), FitConfig(scale=scale, size=size))
        arrays[f"crops_{key(scale, size)}"] = d["crops"]
        arrays[f"canvas_{key(scale, size)}"] = d["canvas"]
        for k in ("labels", "sessions", "seq", "paths"):
            arrays[k] = d[k]
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out, **arrays)


def configs(quick: bool) -> list[FitConfig]:
    """The sweep, in priority order (the budget may stop it early): the inputs and input filters
    first, then training length, augmentation strength, weight decay and width around them."""
    base = FitConfig(epochs=4 if quick else 60)
    out = []
    for (scale, size), std, dog in itertools.product(INPUTS, (False, True), (False, True)):
        out.append(replace(base, scale=scale, size=size, standardise=std, dog=dog))
    more = []
    for c in out:
        more.append(replace(c, strength=1.5))
        more.append(replace(c, epochs=2 * c.epochs))
        more.append(replace(c, weight_decay=5e-2))
    more += [replace(c, mult=0.5) for c in out[:4]] + [replace(c, label_smoothing=0.0) for c in out[:4]]
    return out + more


_DATA: dict = {}
_DEVICE = "cpu"


def _init(path: str, device: str) -> None:
    global _DATA, _DEVICE
    torch.set_num_threads(1)
    torch.backends.cudnn.benchmark = True
    _DATA = dict(np.load(path, allow_pickle=False))
    _DEVICE = device


def _task(cfg_d: dict, held: str | None, seed: int):
    """Fit one net without session `held` (None: on all) and score the held-out frames (or return the weights)."""
    cfg = FitConfig(**cfg_d)
    k = key(cfg.scale, cfg.size)
    train = _DATA["sessions"] != held if held is not None else np.ones(len(_DATA["labels"]), bool)
    t0 = time.time()
    m = fit(_DATA[f"canvas_{k}"][train], _DATA["labels"][train], cfg, seed, _DEVICE)
    if held is None:
        return {k2: v.cpu() for k2, v in m.state_dict().items()}, time.time() - t0
    return live_scores(m, _DATA[f"crops_{k}"][~train], _DEVICE), time.time() - t0


def sweep(data: str, out: str, budget: float, workers: int, device: str, quick: bool) -> None:
    os.makedirs(out, exist_ok=True)
    t_start = time.time()
    d = dict(np.load(data, allow_pickle=False))
    labels, sessions, seq = d["labels"], d["sessions"], d["seq"]
    folds = sorted(set(sessions.tolist()))
    cfgs = configs(quick)
    log.info("%d configs, %d frames, folds %s, device %s", len(cfgs), len(labels), folds, device)
    ctx = get_context("spawn")
    results: dict[int, dict] = {}
    times = []
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init, initargs=(data, device)) as pool:
        tasks = [(ci, s, seed) for ci in range(len(cfgs)) for s in folds for seed in range(SWEEP_SEEDS)]
        pending, it = {}, iter(tasks)

        def submit():
            ci, s, seed = next(it)
            pending[pool.submit(_task, asdict(cfgs[ci]), s, seed)] = (ci, s, seed)

        for _ in range(min(2 * workers, len(tasks))):
            submit()
        left = len(tasks) - len(pending)
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                ci, s, seed = pending.pop(f)
                scores, dt = f.result()
                times.append(dt)
                r = results.setdefault(ci, {"scores": {}, "n": 0})
                r["scores"].setdefault(s, []).append(scores)
                r["n"] += 1
                if left and time.time() - t_start < budget:
                    submit()
                    left -= 1
        table = []
        for ci, r in sorted(results.items()):
            if r["n"] < len(folds) * SWEEP_SEEDS:
                continue
            oof = np.full(len(labels), np.nan)
            for s, lst in r["scores"].items():
                oof[sessions == s] = np.mean(lst, 0)
            fig = cv_figures(oof, labels, seq)
            table.append({"config": asdict(cfgs[ci]), **fig,
                          "rank_key": [fig["apcer_at_bpcer5"], (fig["seq_apcer"] + fig["seq_bpcer"]) / 2, -fig["auc"]]})
        table.sort(key=lambda t: t["rank_key"])
        log.info("sweep: %d of %d configs complete in %.0f s (median fit %.1f s)", len(table), len(cfgs),
                 time.time() - t_start, float(np.median(times)) if times else 0)
        for t in table[:10]:
            log.info("%s", json.dumps({k: t[k] for k in ("apcer_at_bpcer5", "auc", "seq_apcer", "seq_bpcer",
                                                         "frame_bpcer", "threshold")} | {"cfg": t["config"]}))
        with open(os.path.join(out, "sweep.json"), "w") as f:
            json.dump(table, f, indent=1)
        best = replace(FitConfig(**table[0]["config"]), seeds=FINAL_SEEDS)
        # final: the chosen recipe's out-of-fold scores with FINAL_SEEDS seeds and the ensemble on all frames
        jobs = {pool.submit(_task, asdict(best), s, seed): ("oof", s, seed) for s in folds for seed in range(FINAL_SEEDS)}
        jobs.update({pool.submit(_task, asdict(best), None, seed): ("all", None, seed) for seed in range(FINAL_SEEDS)})
        oof_parts, states = {}, {}
        for f, (kind, s, seed) in jobs.items():
            res, _ = f.result()
            if kind == "oof":
                oof_parts.setdefault(s, []).append(res)
            else:
                states[seed] = res
    oof = np.full(len(labels), np.nan)
    for s, lst in oof_parts.items():
        oof[sessions == s] = np.mean(lst, 0)
    fig = cv_figures(oof, labels, seq)
    ens = Ensemble([best.net() for _ in range(FINAL_SEEDS)])
    for k in range(FINAL_SEEDS):
        ens.members[k].load_state_dict(states[k])
    torch.save(ens.state_dict(), os.path.join(out, "final.pt"))
    final = {"config": asdict(best), "threshold": fig["threshold"], "loso": fig, "params": param_count(ens),
             "oof": {"live": oof[labels == 1].round(4).tolist(), "print": oof[labels == 0].round(4).tolist()},
             "device": device, "torch": torch.__version__, "wall_s": round(time.time() - t_start)}
    with open(os.path.join(out, "final.json"), "w") as f:
        json.dump(final, f, indent=1)
    log.info("final %s: leave-one-session-out %s (%.0f s in all)", json.dumps(asdict(best)), fig, time.time() - t_start)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m train.liveness_gpu", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--nuaa", default="../shared/data/nuaa")
    p.add_argument("--detector", default="models/yunet_fp32.card.json")
    p.add_argument("--work", default="out/liveness", help="folder of the cached face boxes (faces.json)")
    p.add_argument("--out", default=".gpu/nuaa_train.npz")
    p = sub.add_parser("sweep")
    p.add_argument("--data", default=".gpu/nuaa_train.npz")
    p.add_argument("--out", required=True)
    p.add_argument("--budget", type=float, default=240, help="seconds after which no new sweep fit starts")
    p.add_argument("--workers", type=int, default=8)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--quick", action="store_true", help="4 epochs: a smoke test of the whole path")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stdout)
    if args.cmd == "prepare":
        prepare(args.nuaa, args.detector, args.out, args.work)
    else:
        sweep(args.data, args.out, args.budget, args.workers, args.device, args.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
