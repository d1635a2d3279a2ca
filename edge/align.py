"""Alignment: a similarity transform (rotation, uniform scale, translation) that maps the
detector's 5 keypoints onto the encoder's template from its model card. Pure maths plus one warp."""
from __future__ import annotations

import cv2
import numpy as np

from .records import AlignedFace, Detection

# ArcFace / InsightFace 5-point template for 112x112 crops (what SFace and MobileFaceNets are trained on),
# in the detector's keypoint order: image-left eye, image-right eye, nose tip, image-left and image-right mouth corner.
ARCFACE_112 = [(38.2946, 51.6963), (73.5318, 51.5014), (56.0252, 71.7366), (41.5493, 92.3655), (70.7299, 92.2041)]
# dlib's 5-point chip (150x150, padding 0.25) as the same kind of template: eye centroids, nose
# tip (68-point 30) and mouth corners (48, 54) of dlib's mean face, placed as dlib's
# get_face_chip_details places them (export/dlib_onnx.py template_from_mean_face derives it).
DLIB_TEMPLATE_150 = [(47.5492, 46.5990), (100.4761, 46.5990), (74.0127, 76.5625), (50.4149, 103.0233),
                     (97.6104, 103.0233)]


def similarity_transform(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (Umeyama 1991) mapping src points onto dst; returns 2x3.

    Without reflection: a mirrored face must not be "aligned" by flipping it."""
    src = np.asarray(src, np.float64)
    dst = np.asarray(dst, np.float64)
    if src.shape != dst.shape or src.ndim != 2 or src.shape[1] != 2 or len(src) < 2:
        raise ValueError(f"need two equal Nx2 point sets, got {src.shape} and {dst.shape}")
    mu_s, mu_d = src.mean(0), dst.mean(0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s ** 2).sum() / len(src)
    if var_s < 1e-12:
        raise ValueError("source points are degenerate (all the same)")
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    scale = (sig * np.diag(e)).sum() / var_s
    t = mu_d - scale * r @ mu_s
    return np.hstack([scale * r, t[:, None]])


def warp(image: np.ndarray, m: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    return cv2.warpAffine(image, m, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT)


def align(image: np.ndarray, det: Detection, template, size: tuple[int, int]) -> AlignedFace:
    m = similarity_transform(det.keypoints, np.asarray(template, np.float64))
    return AlignedFace(image=warp(image, m, size), detection=det)
