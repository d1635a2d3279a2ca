"""Teacher embeddings for distillation, computed once by the edge's own embedder from model cards.

File (.npz, loaded with allow_pickle=False): `paths` (the FaceSet keys "identity/file"),
`embeddings` (N x D float32, unit rows) of each crop, `embeddings_flip` of its mirror image (so a
flipped training sample is matched to the teacher's view of the same pixels), `teachers` (card
name and sha256 of each encoder). Several teachers form an ensemble: their unit embeddings are
concatenated and scaled by 1/sqrt(k), so the ensemble's cosine is the mean of theirs.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from edge.align import ARCFACE_112
from edge.atomic import atomic_write_bytes
from edge.embed import load_encoder
from edge.errors import FacegateError
from edge.records import Detection

from .data import SIZE, FaceSet


def embed_teachers(faces: FaceSet, cards: list[str | Path], out: str | Path, threads: int = 1,
                   batch: int = 64, progress: bool = True) -> Path:
    from tqdm import tqdm

    if not cards:
        raise FacegateError(None, "give at least one teacher encoder card")
    # The crops are aligned to ARCFACE_112, so in crop pixels the keypoints are the template itself:
    # a teacher with another template or size is re-aligned from them.
    det = Detection(box=(0.0, 0.0, float(SIZE[0]), float(SIZE[1])), keypoints=np.asarray(ARCFACE_112, np.float32), score=1.0)
    parts, parts_flip, names = [], [], []
    for card in cards:
        enc = load_encoder(card, threads)
        names.append(f"{enc.card.name} {enc.sha256}")
        e, ef = [], []
        for i in tqdm(range(0, len(faces), batch), desc=enc.card.name, unit="batch", disable=not progress):
            crops = [enc.align(img, det).image for img in faces.images[i:i + batch]]
            e.append(enc.embed_images(crops))
            ef.append(enc.embed_images([np.ascontiguousarray(c[:, ::-1]) for c in crops]))
        parts.append(np.concatenate(e))
        parts_flip.append(np.concatenate(ef))
    k = np.sqrt(len(cards))
    buf = io.BytesIO()
    np.savez(buf, paths=np.asarray(faces.paths), teachers=np.asarray(names),
             embeddings=(np.concatenate(parts, 1) / k).astype(np.float32),
             embeddings_flip=(np.concatenate(parts_flip, 1) / k).astype(np.float32))
    atomic_write_bytes(out, buf.getvalue())
    return Path(out)


def load_teacher(path: str | Path, faces: FaceSet) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Teacher embeddings in the FaceSet's order: (embeddings, embeddings_flip, teacher names)."""
    try:
        z = np.load(path, allow_pickle=False)
        paths, emb, emb_f, names = z["paths"], z["embeddings"], z["embeddings_flip"], list(z["teachers"])
    except FileNotFoundError:
        raise FacegateError(path, "teacher embeddings file not found") from None
    except (KeyError, ValueError, OSError) as e:
        raise FacegateError(path, f"not a teacher embeddings file from `python -m train embed-teacher`: {e}") from None
    index = {p: i for i, p in enumerate(paths.tolist())}
    missing = [p for p in faces.paths if p not in index]
    if missing:
        raise FacegateError(path, f"no teacher embedding for {len(missing)} training images (e.g. {missing[0]}); "
                                  "run embed-teacher again on this dataset")
    rows = np.asarray([index[p] for p in faces.paths])
    return emb[rows].astype(np.float32), emb_f[rows].astype(np.float32), names
