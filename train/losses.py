"""Training objectives for a Siamese face encoder f (one network, tied weights for every input).

- Triplet loss, exactly L(A, P, N) = max(||f(A) - f(P)||^2 - ||f(A) - f(N)||^2 + alpha, 0), with
  online triplet selection inside the batch (`select_triplets`).
- The binary-classification head: a logistic unit on per-dimension pair features.
- Distillation from a teacher's embeddings: cosine, L2, pairwise similarity structure.

Written out rather than taken from pytorch-metric-learning because its distances are not squared
by default and its reducers average only the non-zero terms; the spec's formula is squared and
averaged over the selected triplets. tests/unit/test_losses.py checks each against hand values
(and the batch-hard selection against pytorch-metric-learning's BatchHardMiner).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

MINING = ("all", "hard", "semihard", "batch_hard")


def squared_distances(x: torch.Tensor) -> torch.Tensor:
    """B x B matrix of ||x_i - x_j||^2. Built from dot products (not cdist) so its gradient is
    defined where two embeddings coincide (the same image twice in a batch)."""
    sq = (x * x).sum(1)
    return (sq[:, None] + sq[None, :] - 2.0 * x @ x.T).clamp_min(0.0)


def _valid_masks(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    same = labels[:, None] == labels[None, :]
    eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
    return same & ~eye, ~same  # positive (a, p), negative (a, n)


def select_triplets(d: torch.Tensor, labels: torch.Tensor, mining: str, margin: float):
    """Indices (a, p, n) of the triplets chosen from a batch with squared distances `d`.

    all        every (a, p, n) with label(a) = label(p), a != p, label(n) != label(a)
    hard       those whose negative is no farther than the positive: d(a,n) <= d(a,p)
    semihard   FaceNet: the negative is farther than the positive but within the margin,
               d(a,p) < d(a,n) < d(a,p) + margin
    batch_hard for each anchor with a positive and a negative: its farthest positive and its
               nearest negative (Hermans et al. 2017), one triplet per anchor
    Selection reads distances only; no gradient flows through it."""
    if mining not in MINING:
        raise ValueError(f"unknown mining {mining!r}; choose from {', '.join(MINING)}")
    d = d.detach()
    pos, neg = _valid_masks(labels)
    if mining == "batch_hard":
        anchors = torch.nonzero(pos.any(1) & neg.any(1)).flatten()
        far_pos = d.masked_fill(~pos, float("-inf")).argmax(1)
        near_neg = d.masked_fill(~neg, float("inf")).argmin(1)
        return anchors, far_pos[anchors], near_neg[anchors]
    valid = pos[:, :, None] & neg[:, None, :]
    gap = d[:, None, :] - d[:, :, None]  # [a, p, n] = d(a, n) - d(a, p)
    if mining == "hard":
        valid &= gap <= 0
    elif mining == "semihard":
        valid &= (gap > 0) & (gap < margin)
    a, p, n = torch.nonzero(valid, as_tuple=True)
    return a, p, n


def triplet_loss(emb: torch.Tensor, labels: torch.Tensor, margin: float = 0.2, mining: str = "batch_hard") -> tuple[torch.Tensor, int]:
    """Mean of max(d(a,p) - d(a,n) + margin, 0) over the selected triplets, and how many there
    were. No triplet selected: a zero that still belongs to the graph (the step does nothing)."""
    d = squared_distances(emb)
    a, p, n = select_triplets(d, labels, mining, margin)
    if a.numel() == 0:
        return emb.sum() * 0.0, 0
    return F.relu(d[a, p] - d[a, n] + margin).mean(), int(a.numel())


def pair_indices(n: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    i, j = torch.triu_indices(n, n, offset=1, device=device)
    return i, j


class BinaryHead(nn.Module):
    """Logistic unit on per-dimension features of a pair: P(same) = sigmoid(w . phi(fi, fj) + b).

    phi "abs":  |fi_k - fj_k|
    phi "chi2": (fi_k - fj_k)^2 / (|fi_k| + |fj_k| + eps). For non-negative embeddings (DeepFace's,
                which follow a ReLU) this is exactly (fi_k - fj_k)^2 / (fi_k + fj_k); ours are signed
                (L2-normalised), where fi_k + fj_k can be 0 or negative, so the denominator uses
                magnitudes: the feature is then bounded by |fi_k - fj_k| and eps only settles 0/0.
    The encoder is shared by both inputs (tied weights): the head sees two rows of one batch."""

    FEATURES = ("abs", "chi2")

    def __init__(self, dim: int, features: str = "abs", eps: float = 1e-6):
        super().__init__()
        if features not in self.FEATURES:
            raise ValueError(f"unknown pair features {features!r}; choose from {', '.join(self.FEATURES)}")
        self.features = features
        self.eps = eps
        self.linear = nn.Linear(dim, 1)

    def pair_features(self, fi: torch.Tensor, fj: torch.Tensor) -> torch.Tensor:
        if self.features == "abs":
            return (fi - fj).abs()
        return (fi - fj) ** 2 / (fi.abs() + fj.abs() + self.eps)

    def forward(self, fi: torch.Tensor, fj: torch.Tensor) -> torch.Tensor:
        """Logits (before the sigmoid) that fi and fj are the same person."""
        return self.linear(self.pair_features(fi, fj)).squeeze(-1)


def binary_loss(head: BinaryHead, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logistic loss over every pair in the batch, same and different pairs weighted equally
    (a p x m batch has far more different pairs; unweighted, "different" would always win).
    A batch without same pairs (or without different ones) uses the pairs it has."""
    i, j = pair_indices(len(labels), emb.device)
    same = (labels[i] == labels[j]).float()
    bce = F.binary_cross_entropy_with_logits(head(emb[i], emb[j]), same, reduction="none")
    parts = [bce[same == v].mean() for v in (1.0, 0.0) if (same == v).any()]
    return torch.stack(parts).mean()


def distill_cosine(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of 1 - cos(s_i, t_i)."""
    return (1.0 - F.cosine_similarity(student, teacher, dim=1)).mean()


def distill_l2(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Mean of ||s_i - t_i||^2 (on unit vectors this is 2x the cosine loss; kept for unnormalised
    teachers and projections)."""
    return ((student - teacher) ** 2).sum(1).mean()


def distill_pairwise(student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
    """Similarity structure: mean over pairs i < j of (cos(s_i, s_j) - cos(t_i, t_j))^2. Needs no
    common dimension, so a 128-d student can learn from a wider teacher ensemble."""
    s, t = F.normalize(student, dim=1), F.normalize(teacher, dim=1)
    i, j = pair_indices(len(s), s.device)
    return (((s @ s.T) - (t @ t.T))[i, j] ** 2).mean()
