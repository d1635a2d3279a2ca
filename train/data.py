"""Identity-folder face datasets: ``ROOT/<identity>/<image>``, one sub-folder per person.

`prepare` turns raw photos into aligned crops with the device's own detector and alignment, so
the encoder trains on exactly what the gate will feed it. `load_faces` reads prepared crops into
memory (uint8, about 37 KB per face) for fast CPU epochs.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch
from torch.nn import functional as F

from edge.align import ARCFACE_112, align
from edge.atomic import atomic_write_bytes
from edge.detect import load_detector
from edge.errors import FacegateError
from evaluation.embeddings import subject_face

from .backbones import INPUT

log = logging.getLogger("facegate.train")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp"}
SIZE = (INPUT["width"], INPUT["height"])


def identity_folders(root: str | Path) -> list[tuple[str, list[Path]]]:
    """(identity, image files) for each sub-folder, sorted; files at the top level are ignored."""
    root = Path(root)
    if not root.is_dir():
        raise FacegateError(root, "dataset folder not found")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir()):
        files = sorted(f for f in d.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
        if files:
            out.append((d.name, files))
    if not out:
        raise FacegateError(root, "empty dataset: expected one sub-folder of images per identity")
    return out


def read_image(path: Path) -> np.ndarray | None:
    """BGR uint8, or None when the file cannot be decoded (corrupt, truncated, not an image)."""
    data = np.fromfile(str(path), dtype=np.uint8)
    return cv2.imdecode(data, cv2.IMREAD_COLOR) if data.size else None


@dataclass
class FaceSet:
    images: np.ndarray  # N x H x W x 3 uint8 BGR aligned crops
    labels: np.ndarray  # N int64, index into `classes`
    classes: list[str]
    paths: list[str]  # "identity/file", relative to the root: the key for teacher embeddings
    unreadable: list[str] = field(default_factory=list)
    skipped_identities: list[str] = field(default_factory=list)  # fewer images than asked for

    def __len__(self) -> int:
        return len(self.labels)


def load_faces(root: str | Path, min_per_identity: int = 1, size: tuple[int, int] = SIZE) -> FaceSet:
    """Read prepared crops. Unreadable files are skipped and counted; identities with fewer than
    `min_per_identity` readable images are skipped with a warning (a triplet needs a positive,
    so pair objectives ask for 2). Crops of another size are refused: they were not prepared for
    this encoder, and resizing unaligned photos would train on what the gate never sees."""
    root = Path(root)
    images, labels, classes, paths, unreadable, skipped = [], [], [], [], [], []
    for name, files in identity_folders(root):
        mine = []
        for f in files:
            img = read_image(f)
            if img is None:
                unreadable.append(f"{name}/{f.name}")
                continue
            if (img.shape[1], img.shape[0]) != tuple(size):
                raise FacegateError(f, f"{img.shape[1]}x{img.shape[0]} is not an aligned {size[0]}x{size[1]} crop; "
                                       "run `python -m train prepare` on the raw photos first")
            mine.append((f"{name}/{f.name}", img))
        if len(mine) < min_per_identity:
            skipped.append(name)
            continue
        for rel, img in mine:
            images.append(img)
            labels.append(len(classes))
            paths.append(rel)
        classes.append(name)
    if unreadable:
        log.warning("%s: %d unreadable images skipped (first: %s)", root, len(unreadable), unreadable[0])
    if skipped:
        log.warning("%s: %d identities with fewer than %d images skipped (no positive pair possible), e.g. %s",
                    root, len(skipped), min_per_identity, skipped[0])
    if not images:
        raise FacegateError(root, f"no usable images: {len(unreadable)} unreadable, {len(skipped)} identities "
                                  f"with fewer than {min_per_identity} images")
    return FaceSet(np.stack(images), np.asarray(labels, np.int64), classes, paths, unreadable, skipped)


def to_input(images_bgr: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 uint8 BGR -> the backbones' input: N x 3 x H x W float RGB, (x - mean) / std."""
    x = images_bgr.flip(-1).permute(0, 3, 1, 2).float()
    mean = torch.tensor(INPUT["mean"], device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(INPUT["std"], device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def random_flips(n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Which faces of a batch to mirror: a mirrored aligned face is still the same person."""
    return torch.rand(n, generator=generator) < 0.5


def apply_flips(x: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
    """Mirror the NCHW images where `flips` is true."""
    return torch.where(flips.to(x.device).view(-1, 1, 1, 1), x.flip(-1), x)


# Light jitter: the gate's alignment is off by a few pixels and a few degrees on real frames, and
# its light changes; more than this would teach the encoder faces the aligner never produces.
JITTER = {"rotate_deg": 6.0, "scale": 0.05, "shift_px": 4.0, "brightness": 0.12, "contrast": 0.15}


def random_jitter(n: int, generator: torch.Generator | None = None, limits: dict = JITTER) -> torch.Tensor:
    """Per-image jitter parameters, N x 6: angle (rad), scale, shift x, shift y (pixels),
    brightness (added, in normalised input units), contrast (factor); each uniform in +- its limit."""
    u = torch.rand(n, 6, generator=generator) * 2 - 1
    return torch.stack([u[:, 0] * limits["rotate_deg"] * torch.pi / 180, 1 + u[:, 1] * limits["scale"],
                        u[:, 2] * limits["shift_px"], u[:, 3] * limits["shift_px"],
                        u[:, 4] * limits["brightness"], 1 + u[:, 5] * limits["contrast"]], 1)


def apply_jitter(x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Rotate / scale / shift (about the centre, edges repeated) then brightness and contrast, on
    normalised NCHW inputs. Shifts are in pixels: +1 moves the content 1 px right or down; a scale
    above 1 enlarges the face."""
    n, _, h, w = x.shape
    p = params.to(x.device, x.dtype)
    a, s = p[:, 0], p[:, 1]
    cos, sin = torch.cos(a) / s, torch.sin(a) / s
    # affine_grid maps output to input coordinates in [-1, 1], hence the inverse transform.
    theta = torch.stack([torch.stack([cos, -sin, -2 * p[:, 2] / w], 1),
                         torch.stack([sin, cos, -2 * p[:, 3] / h], 1)], 1)
    grid = F.affine_grid(theta, [n, 3, h, w], align_corners=False)
    y = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return y * p[:, 5].view(-1, 1, 1, 1) + p[:, 4].view(-1, 1, 1, 1)


def m_per_class_sampler(labels: np.ndarray, p: int, m: int, steps: int):
    """Index stream in batches of p identities x m images (pytorch-metric-learning's
    MPerClassSampler; identities with fewer than m images are drawn with repetition)."""
    from pytorch_metric_learning.samplers import MPerClassSampler

    n_ids = len(np.unique(labels))
    if n_ids < p:
        raise FacegateError(None, f"a batch asks for {p} identities but the dataset has {n_ids}; lower p")
    return MPerClassSampler(labels, m=m, batch_size=p * m, length_before_new_iter=steps * p * m)


def prepare(src: str | Path, dst: str | Path, detector_card: str | Path, threads: int = 1,
            template=ARCFACE_112, size: tuple[int, int] = SIZE, progress: bool = True) -> dict:
    """Detect and align every photo of an identity-folder dataset with the gate's own detector and
    alignment; write PNG crops (lossless) to the same layout under `dst`. Existing crops are kept,
    so an interrupted run continues. Returns (and writes to dst/prepare_report.json) the counts and
    the files where no face was found or that could not be read."""
    from tqdm import tqdm

    detector = load_detector(detector_card, threads)
    dst = Path(dst)
    folders = identity_folders(src)
    report = {"source": str(src), "detector": str(detector_card), "identities": len(folders),
              "images": 0, "written": 0, "kept": 0, "no_face": [], "unreadable": []}
    total = sum(len(f) for _, f in folders)
    bar = tqdm(total=total, desc="prepare", unit="img", disable=not progress)
    for name, files in folders:
        (dst / name).mkdir(parents=True, exist_ok=True)
        for f in files:
            bar.update(1)
            report["images"] += 1
            out = dst / name / (f.stem + ".png")
            if out.exists():
                report["kept"] += 1
                continue
            img = read_image(f)
            if img is None:
                report["unreadable"].append(f"{name}/{f.name}")
                continue
            det = subject_face(detector, img)
            if det is None:
                report["no_face"].append(f"{name}/{f.name}")
                continue
            crop = align(img, det, template, size).image
            png = cv2.imencode(".png", crop)[1]
            atomic_write_bytes(out, png.tobytes())
            report["written"] += 1
    bar.close()
    atomic_write_bytes(dst / "prepare_report.json", (json.dumps(report, indent=1) + "\n").encode())
    return report
