"""`python -m export fuse`: two face encoders as one fused encoder for the gate.

Both members embed a face folder (../shared/data/celeba in development, never LFW); on half of
its identities the fusion weight w is chosen (TAR at FAR 1e-4 of w z_a + (1 - w) z_b, z = cosine
standardised by each encoder's impostor mean and std), then the fused embeddings of every face
give the card's impostor-score table, from which the gate reads its threshold for a gallery of K.
Written: `<name>.fusion.json` (the recipe: member cards, their model sha256, scales) beside the
member cards, and its card (runtime "fusion"). The gate runs it as one encoder (edge/embed.py)."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from edge.atomic import atomic_write_bytes
from edge.config import QualityConfig
from edge.detect import load_detector
from edge.embed import Encoder, FusionMember, FusionRecipe, enrollment_card, fuse_vectors, load_encoder
from edge.errors import FacegateError
from evaluation.embeddings import combine, embed_folder
from edge.modelcard import CalibrationSpec, EmbeddingSpec, SourceSpec, write_card

from .build import CALIB_DIR, derived_card
from .calibrate import impostor_table, stranger_tail
from .cohort import best_fusion_weight, identity_keys, split_identities


def build_fusion(member_cards: list[Path], detector_card: Path, faces: Path, name: str, cache_dir: Path | None = None,
                 progress: bool = True, say=print, flips: tuple[bool, ...] = (False, False), enroll_flip: bool = True,
                 enroll_twins: bool = True) -> Path:
    """`flips`: which members the door mirrors too (the recipe's member flip); `enroll_flip`: the
    gallery embeds each enrollment photo with its mirror (match.enroll_flip); `enroll_twins`:
    enrollment runs each member's fp32 twin where one is beside it (models.enroll_encoder). Weight
    and impostor table come from the scores the gate will compute: door faces against enrolled."""
    if len(member_cards) != 2:
        raise FacegateError(None, f"fuse takes two encoder cards, got {len(member_cards)}")
    folder = member_cards[0].resolve().parent
    if member_cards[1].resolve().parent != folder:
        raise FacegateError(member_cards[1], "the two member cards must be in one folder (the recipe lives beside them)")
    if "lfw" in faces.resolve().parts:
        raise FacegateError(faces, "LFW is for evaluation only: fuse on another face folder")
    encs = [load_encoder(c, 2) for c in member_cards]
    if not all(isinstance(e, Encoder) for e in encs):
        raise FacegateError(None, "members must be plain encoders, not fusions")
    det = load_detector(detector_card, 2)
    keys = identity_keys(faces)
    tabs = [embed_folder(faces, keys, det, e, QualityConfig(), cache_dir=cache_dir, progress=progress) for e in encs]
    twins = [enrollment_card(c) if enroll_twins else c for c in member_cards]
    gal = [t if w == c else embed_folder(faces, keys, det, load_encoder(w, 2), QualityConfig(), cache_dir=cache_dir,
                                         progress=progress) for t, w, c in zip(tabs, twins, member_cards)]
    ids = np.asarray([k.split("/")[0] for k in keys])
    ok = tabs[0].ok & tabs[1].ok
    _, dev_ids = split_identities(ids[ok].tolist())
    dev = ok & np.isin(ids, list(dev_ids))
    door = [combine(t.vec, t.vec_flip, f) for t, f in zip(tabs, flips)]
    enrolled = [combine(t.vec, t.vec_flip, enroll_flip or f) for t, f in zip(gal, flips)]
    w, tar, stats = best_fusion_weight(door[0][dev], door[1][dev], ids[dev], enrolled[0][dev], enrolled[1][dev])
    weights = (w, 1.0 - w)
    # s_i^2 = w_i / sd_i makes the fused cosine an affine function of the z-score fusion
    scales = [math.sqrt(max(wi, 1e-6) / sd) for wi, (_, sd) in zip(weights, stats)]
    say(f"fuse: weight {weights[0]:.1f} / {weights[1]:.1f} (dev TAR@FAR1e-4 {100 * tar:.2f}%), "
        f"impostor std {stats[0][1]:.4f} / {stats[1][1]:.4f}, scales {scales[0]:.3f} / {scales[1]:.3f}")
    fused = fuse_vectors([v[ok] for v in door], scales)
    refs = fuse_vectors([v[ok] for v in enrolled], scales)
    table = impostor_table(fused, ids[ok].tolist(), refs=refs)
    tail = stranger_tail(fused, refs, ids[ok].tolist(), (table["fmr"], table["threshold"]), say=say)
    cal = CalibrationSpec(dataset=f"{faces.parent.name} ({faces.name}), {int(ok.sum())} faces"
                                  f"{', enrolled with their mirror' if enroll_flip else ''}",
                          gallery_shift=tail["gallery_shift"], tail_shape=tail["tail_shape"], **table)
    mirrored = [c.name for c, f in zip(member_cards, flips) if f]
    recipe = FusionRecipe(members=[FusionMember(card=c.name, sha256=e.sha256, scale=s, flip=f)
                                   for c, e, s, f in zip(member_cards, encs, scales, flips)],
                          notes=f"z-score fusion weights {weights[0]:.2f} / {weights[1]:.2f} chosen on {faces.parent.name}/{faces.name}"
                                f"{'; mirrored at the door: ' + ', '.join(mirrored) if mirrored else ''}"
                                f"{'; enrollment photos embedded with their mirror' if enroll_flip else ''}"
                                f"{'; enrolled by ' + ', '.join(w.name for w in twins) if twins != member_cards else ''}")
    path = folder / f"{name}.fusion.json"
    atomic_write_bytes(path, (json.dumps(recipe.model_dump(), indent=1) + "\n").encode())
    first = encs[0].card
    precision = "int8" if all(e.card.precision == "int8" for e in encs) else "fp32"
    card = derived_card(first, name, path, precision, runtime="fusion", calibration=cal,
                        embedding=EmbeddingSpec(dim=sum(e.card.embedding.dim for e in encs)),
                        source=SourceSpec(package="facegate", version="-", file=path.name,
                                          license="; ".join(f"{e.card.name}: {e.card.source.license}" for e in encs),
                                          notes="score fusion of " + " + ".join(e.card.name for e in encs)))
    out = write_card(card, path)
    say(f"fuse: wrote {path.name} and {out.name}")
    return out


def main(args) -> int:
    members = [Path(c) for c in args.members.split(",")]
    flips = tuple(i + 1 in args.mirror for i in range(len(members)))
    card = build_fusion(members, Path(args.detector), Path(args.faces), args.name, Path(args.cache_dir), flips=flips,
                        enroll_flip=args.enroll_flip, enroll_twins=args.enroll_twins)
    # The committed copy, which `export build --dlib` installs beside the members on other machines.
    recipe = card.with_name(card.name.replace(".card.json", ".json"))
    for f in (recipe, card):
        atomic_write_bytes(CALIB_DIR / f.name, f.read_bytes())
    print(f"fuse: committed copy in {CALIB_DIR}")
    return 0
