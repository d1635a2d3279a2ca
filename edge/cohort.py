"""Score-normalisation cohort: embeddings of faces that are not enrolled (built by `python -m export
cohort` from a face folder, never LFW) shipped beside the encoder as ``<model>.cohort.npz``.

AS-norm (adaptive symmetric normalisation, top-k cohort) turns a raw cosine s between a probe p
and an enrollee e into
    0.5 * ((s - mu_p) / sd_p + (s - mu_e) / sd_e)
where (mu, sd) are the mean and std of that face's top_k cosine scores against the cohort. A face
that resembles many strangers (a "wolf" or a crowded demographic region of the embedding space)
has a high mu and must beat it; this is what flattens the open-set tail. The file also holds the
impostor table of normalised scores (FMR at each threshold) measured on calibration identities
disjoint from the cohort, so a normalised threshold can be read for a target FPIR and K exactly
as for raw cosine (edge/match.threshold_for_gallery).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import ModelError
from .match import cohort_stats

COHORT_SUFFIX = ".cohort.npz"


@dataclass(frozen=True)
class Cohort:
    vectors: np.ndarray  # C x d, L2-normalised
    encoder_sha256: str
    top_k: int
    fmr: list[float]  # normalised-score impostor table, ascending threshold
    threshold: list[float]
    impostor_mean: float  # raw cosine impostor statistics (for score fusion of several encoders)
    impostor_std: float
    dataset: str
    flip: bool  # the vectors are mirror-averaged (test-time flip): use with embeddings made the same way
    raw_fmr: tuple = ()  # raw-cosine impostor table of the calibration half, for this flip mode
    raw_threshold: tuple = ()

    def stats(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mu, sd) of each row's top_k cosine scores against the cohort."""
        return cohort_stats(np.asarray(vectors, np.float32) @ self.vectors.T, self.top_k)


def as_norm_matrix(raw: np.ndarray, probe_stats, enrollee_stats) -> np.ndarray:
    """AS-norm of a P x G raw score matrix; element (i, j) equals edge.match.as_norm for probe i
    and enrollee j (same top-k statistics)."""
    mu_p, sd_p = (np.asarray(a, np.float64)[:, None] for a in probe_stats)
    mu_e, sd_e = (np.asarray(a, np.float64)[None, :] for a in enrollee_stats)
    raw = np.asarray(raw, np.float64)
    return 0.5 * ((raw - mu_p) / np.maximum(sd_p, 1e-6) + (raw - mu_e) / np.maximum(sd_e, 1e-6))


def cohort_path_for(model_path: str | Path) -> Path:
    p = Path(model_path)
    return p.with_name(p.name.rsplit(".", 1)[0] + COHORT_SUFFIX)


MODES = {False: "plain", True: "flip"}


def load_cohort(path: str | Path, encoder_sha256: str | None = None, flip: bool = False) -> Cohort:
    """Load a cohort file (no pickle) for embeddings made with or without test-time flip (the file
    holds both); refuse one made for another encoder."""
    path = Path(path)
    m = MODES[bool(flip)]
    try:
        z = np.load(path, allow_pickle=False)
        c = Cohort(vectors=np.asarray(z[f"{m}_vectors"], np.float32), encoder_sha256=str(z["encoder_sha256"]),
                   top_k=int(z[f"{m}_top_k"]), fmr=[float(x) for x in z[f"{m}_fmr"]],
                   threshold=[float(x) for x in z[f"{m}_threshold"]],
                   impostor_mean=float(z[f"{m}_impostor_mean"]), impostor_std=float(z[f"{m}_impostor_std"]),
                   dataset=str(z["dataset"]), flip=bool(flip),
                   raw_fmr=tuple(float(x) for x in z[f"{m}_raw_fmr"]),
                   raw_threshold=tuple(float(x) for x in z[f"{m}_raw_threshold"]))
    except FileNotFoundError:
        raise ModelError(path, "cohort file not found (build it with `python -m export cohort`)") from None
    except (KeyError, ValueError, OSError) as e:
        raise ModelError(path, f"not a valid cohort file: {e}") from None
    if c.vectors.ndim != 2 or not 1 <= c.top_k <= len(c.vectors):
        raise ModelError(path, f"cohort of shape {c.vectors.shape} cannot give top_k={c.top_k}")
    if encoder_sha256 is not None and c.encoder_sha256 != encoder_sha256:
        raise ModelError(path, "cohort was built with another encoder; rebuild it with `python -m export cohort`")
    return c
