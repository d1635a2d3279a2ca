"""Passive PAD model: NUAA data with the gate's own face boxes, a MiniFASNet-class CNN (ReLU, so it
quantizes to INT8 cleanly), hard augmentation done in torch (so it runs batched on a GPU or on the
CPU alike), an ensemble of seeds, export to ONNX -> INT8 with its model card.

`python -m train liveness` runs it end to end. NUAA's train lists (the first two capture sessions
of subjects 0001-0009) train; the operating threshold comes from leave-one-session-out scores on
the train split (train on the first capture session, score the second and back: the test split is
another session, so a session is the shift that matters). The test lists are for `python -m evaluation liveness` only. The recipe's
hyperparameters were chosen by `train/liveness_gpu.py` on the same leave-one-session-out scores.

This module imports edge/ (and pydantic through it) only where it needs it (detection, crops,
export), so that the GPU sweep can import the model and the training loop on a bare machine."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from evaluation.nuaa import ATTACK, LIVE, NuaaItem, detect_all, nuaa_items, sequences, threshold_at_bpcer, window_means

log = logging.getLogger("facegate.train")

CANVAS = 1.25  # training crops are cut at CANVAS x the card's scale, so zoom/shift/rotation have real pixels
MEAN, STD = (127.5, 127.5, 127.5), (128.0, 128.0, 128.0)


def crops_for(root: Path, items: list[NuaaItem], faces: dict, scale: float, size: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N x size x size x 3 crops exactly as the gate cuts them, N x S x S x 3 training canvases at
    CANVAS x the scale and S = CANVAS x size pixels, N bool: face found); uint8 BGR, zeros without a face."""
    from edge.pad import pad_crop

    from .data import read_image

    big = round(size * CANVAS)
    crops = np.zeros((len(items), size, size, 3), np.uint8)
    canvas = np.zeros((len(items), big, big, 3), np.uint8)
    found = np.zeros(len(items), bool)
    for i, it in enumerate(items):
        f = faces.get(it.path)
        if f is None:
            continue
        img = read_image(root / it.path)
        crops[i] = pad_crop(img, f["box"], scale, (size, size))
        canvas[i] = pad_crop(img, f["box"], scale * CANVAS, (big, big))
        found[i] = True
    return crops, canvas, found


# ---------------------------------------------------------------- augmentation (torch, batched)

_JPEG_Y = torch.tensor([16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
                        14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
                        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99], dtype=torch.float32).view(8, 8)
_JPEG_C = torch.full((8, 8), 99.0)
_JPEG_C[:4, :4] = torch.tensor([[17, 18, 24, 47], [18, 21, 26, 66], [24, 26, 56, 99], [47, 66, 99, 99]], dtype=torch.float32)


def _dct_matrix(device) -> torch.Tensor:
    k = torch.arange(8, dtype=torch.float32, device=device)
    d = torch.cos((2 * k[None, :] + 1) * k[:, None] * math.pi / 16) * math.sqrt(2 / 8)
    d[0] /= math.sqrt(2)
    return d


def jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """JPEG round trip of N x 3 x H x W BGR 0..255 (H, W multiples of 16) at per-image quality:
    YCbCr, 4:2:0 chroma, 8x8 DCT, the standard tables scaled by quality, rounding. Baseline JPEG's
    loss without its entropy coding (which is lossless)."""
    n, _, h, w = x.shape
    b, g, r = x[:, 0], x[:, 1], x[:, 2]
    ycc = torch.stack([0.299 * r + 0.587 * g + 0.114 * b, 128 - 0.168736 * r - 0.331264 * g + 0.5 * b,
                       128 + 0.5 * r - 0.418688 * g - 0.081312 * b], 1)
    ycc[:, 1:] = F.interpolate(F.avg_pool2d(ycc[:, 1:], 2), scale_factor=2, mode="nearest")
    q = quality.float().clamp(1, 100)
    s = torch.where(q < 50, 5000 / q, 200 - 2 * q).view(n, 1, 1, 1, 1, 1)
    tables = torch.stack([_JPEG_Y, _JPEG_C, _JPEG_C]).to(x.device).view(1, 3, 1, 1, 8, 8)
    t = ((tables * s + 50) / 100).floor().clamp(1, 255)
    d = _dct_matrix(x.device)
    blocks = (ycc - 128).view(n, 3, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5)
    coef = d @ blocks @ d.T
    coef = torch.round(coef / t) * t
    back = (d.T @ coef @ d).permute(0, 1, 2, 4, 3, 5).reshape(n, 3, h, w) + 128
    yy, cb, cr = back[:, 0], back[:, 1] - 128, back[:, 2] - 128
    return torch.stack([yy + 1.772 * cb, yy - 0.344136 * cb - 0.714136 * cr, yy + 1.402 * cr], 1).clamp(0, 255)


def _gauss_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    r = max(1, int(math.ceil(2.5 * sigma)))
    k = torch.exp(-torch.arange(-r, r + 1, dtype=torch.float32, device=x.device) ** 2 / (2 * sigma * sigma))
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=x.shape[1])


def augment(canvas: torch.Tensor, size: int, gen: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """Hard geometric and photometric jitter of N x S x S x 3 uint8 BGR canvases (on any device) ->
    N x 3 x size x size float 0..255: the crop the gate would cut, zoomed, shifted, turned and
    flipped, then exposure, contrast, white balance, gamma, saturation, blur, sensor noise and JPEG.
    The test session's light, camera and distance differ from training; the model must not lean on
    any of them. `strength` widens every range (1 = the ranges below)."""
    dev = canvas.device
    n = canvas.shape[0]
    u = lambda lo, hi, *shape: lo + (hi - lo) * torch.rand(*(shape or (n,)), generator=gen, device=dev)
    p = lambda prob: torch.rand(n, generator=gen, device=dev) < prob
    st = strength
    x = canvas.permute(0, 3, 1, 2).float()
    # geometry: output pixel -> canvas; the gate's crop is the central 1/CANVAS of the canvas
    ang = torch.deg2rad(u(-12 * st, 12 * st))
    zoom = torch.exp(u(-0.12 * st, 0.12 * st)) / CANVAS
    flip = torch.where(p(0.5), -1.0, 1.0)
    shift = u(-0.06 * st, 0.06 * st, n, 2) / CANVAS
    cos, sin = torch.cos(ang) * zoom, torch.sin(ang) * zoom
    theta = torch.stack([torch.stack([cos * flip, -sin, shift[:, 0]], 1), torch.stack([sin * flip, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, (n, 3, size, size), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
    # photometric
    on = p(0.9).float().view(n, 1, 1, 1)
    gain = u(1 - 0.4 * st, 1 + 0.4 * st).clamp(0.2).view(n, 1, 1, 1)
    offset = u(-30 * st, 30 * st).view(n, 1, 1, 1)
    mean = x.mean((1, 2, 3), keepdim=True)
    contrast = u(1 - 0.3 * st, 1 + 0.3 * st).clamp(0.3).view(n, 1, 1, 1)
    wb = u(1 - 0.15 * st, 1 + 0.15 * st, n, 3).clamp(0.5).view(n, 3, 1, 1)
    y = ((x * gain + offset - mean) * contrast + mean) * wb
    gamma = torch.exp(u(-0.35 * st, 0.35 * st)).view(n, 1, 1, 1)
    y = 255.0 * (y.clamp(0, 255) / 255.0) ** gamma
    x = on * y + (1 - on) * x
    grey = x.mean(1, keepdim=True)
    sat = torch.where(p(0.3), u(1 - 0.5 * st, 1 + 0.4 * st).clamp(0), torch.ones(n, device=dev))
    sat = torch.where(p(0.05), torch.zeros(n, device=dev), sat).view(n, 1, 1, 1)
    x = (grey + (x - grey) * sat).clamp(0, 255)
    # blur: a few sigmas, each applied to its share of the batch
    which = torch.randint(0, 8, (n,), generator=gen, device=dev)
    for k, sigma in enumerate((0.5, 0.9, 1.4)):
        m = which == k
        if m.any():
            x[m] = _gauss_blur(x[m], sigma * max(st, 0.5))
    noisy = p(0.3).float().view(n, 1, 1, 1)
    x = x + noisy * torch.randn(x.shape, generator=gen, device=dev) * u(2, 8 * st).view(n, 1, 1, 1)
    x = x.clamp(0, 255)
    jp = p(0.5)
    if jp.any() and size % 16 == 0:
        x[jp] = jpeg(x[jp], u(30, 95)[jp].round())
    return x.round()


def centre(canvas: np.ndarray, size: int) -> np.ndarray:
    """The gate's crop as the canvas's central part (exact unless the crop was capped at the frame)."""
    m = (canvas.shape[1] - size) // 2
    return canvas[:, m:m + size, m:m + size]


# ---------------------------------------------------------------- network

class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(
            nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, mid, 3, stride, 1, groups=mid, bias=False), nn.BatchNorm2d(mid), nn.ReLU(inplace=True),
            nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class Texture(nn.Module):
    """Fixed input filters inside the network (so the card's plain BGR input still applies):
    per-image standardisation (takes the exposure and contrast of the session away), and optionally
    difference-of-Gaussians bands of the grey image, the classic NUAA print cue (Tan et al. 2010:
    a print loses the face's fine high-frequency detail)."""

    def __init__(self, standardise: bool, dog: bool):
        super().__init__()
        self.standardise, self.dog = standardise, dog
        if dog:
            ks = []
            for s in (0.5, 1.0, 2.0):
                r = torch.arange(-4, 5, dtype=torch.float32)
                g = torch.exp(-r ** 2 / (2 * s * s))
                g = g / g.sum()
                ks.append(g[:, None] * g[None, :])
            self.register_buffer("kernels", torch.stack([ks[0] - ks[1], ks[1] - ks[2]])[:, None])

    @property
    def extra(self) -> int:
        return 2 if self.dog else 0

    def forward(self, x):
        if self.standardise:
            m = x.mean((1, 2, 3), keepdim=True)
            x = (x - m) / (x.std((1, 2, 3), keepdim=True) + 0.05)
        if self.dog:
            grey = x.mean(1, keepdim=True)
            d = F.conv2d(F.pad(grey, (4, 4, 4, 4), mode="reflect"), self.kernels)
            x = torch.cat([x, d / (d.std((2, 3), keepdim=True) + 0.02)], 1)
        return x


class PadNet(nn.Module):
    """MiniFASNet-class: size x size -> size/16 in four stride-2 steps, a global depthwise conv (as
    in MobileFaceNet / MiniFASNet) instead of average pooling, so where the cue sits (paper edge,
    fingers, background) still counts. ReLU throughout: PReLU quantizes badly to INT8."""

    STAGES = ((48, 48, 1, 2), (48, 48, 1, 2), (48, 96, 2, 2), (96, 96, 1, 2), (96, 96, 1, 2),
              (96, 128, 2, 2), (128, 128, 1, 2), (128, 128, 1, 2))

    def __init__(self, classes: int = 2, width: int = 256, emb: int = 128, dropout: float = 0.2, size: int = 80,
                 mult: float = 1.0, standardise: bool = False, dog: bool = False):
        super().__init__()
        if size % 16:
            raise ValueError(f"input size {size} is not a multiple of 16")
        c = lambda ch: max(8, int(round(ch * mult / 8)) * 8)
        self.texture = Texture(standardise, dog)
        # Two cheap stride-2 steps first: at size/4 only 16 channels, which keeps CPU training fast.
        layers = [nn.Conv2d(3 + self.texture.extra, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                  nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                  nn.Conv2d(16, c(48), 1, bias=False), nn.BatchNorm2d(c(48)), nn.ReLU(inplace=True)]
        layers += [InvertedResidual(c(a), c(b), s, e) for a, b, s, e in self.STAGES]
        w = c(width)
        layers += [nn.Conv2d(c(128), w, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                   nn.Conv2d(w, w, size // 16, groups=w, bias=False), nn.BatchNorm2d(w)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(w, emb, bias=False), nn.BatchNorm1d(emb),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(emb, classes))

    def forward(self, x):
        return self.head(self.features(self.texture(x)))


class Ensemble(nn.Module):
    """Members' mean live probability, output as log-probabilities (valid logits for the card's softmax)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        p = torch.stack([torch.softmax(m(x), 1) for m in self.members]).mean(0)
        return torch.log(p.clamp_min(1e-6))


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- training

@dataclass
class FitConfig:
    """One recipe. The defaults are the configuration `train/liveness_gpu.py` chose on
    leave-one-session-out train scores (train/README-liveness.md)."""
    scale: float = 1.4        # crop around the face box (the card's crop_scale)
    size: int = 112           # input pixels
    mult: float = 1.0         # channel width multiplier
    standardise: bool = False
    dog: bool = True          # difference-of-Gaussians input bands
    strength: float = 1.5     # augmentation ranges
    epochs: int = 60
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seeds: int = 3            # ensemble members
    seed: int = 0

    @classmethod
    def from_dict(cls, d: dict) -> FitConfig:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def net(self) -> PadNet:
        return PadNet(size=self.size, mult=self.mult, standardise=self.standardise, dog=self.dog)


def to_tensor(x: torch.Tensor | np.ndarray) -> torch.Tensor:
    """N x H x W x 3 BGR uint8 (array) or N x 3 x H x W float 0..255 (tensor) -> normalised as the card says."""
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).float()
    return (x - MEAN[0]) / STD[0]


def fit(canvas: np.ndarray, labels: np.ndarray, cfg: FitConfig, seed: int, device: str = "cpu",
        progress: bool = False) -> PadNet:
    """Train one net on N canvases (crops at CANVAS x the scale) with hard augmentation; eval-mode net."""
    torch.manual_seed(seed)
    gen = torch.Generator(device=device)
    gen.manual_seed(seed)
    model = cfg.net().to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(canvas)
    steps_per_epoch = max(1, math.ceil(n / cfg.batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch,
                                                pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    data = torch.from_numpy(np.ascontiguousarray(canvas)).to(device)
    y_all = torch.from_numpy(labels.astype(np.int64)).to(device)
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(n, generator=gen, device=device)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch:(b + 1) * cfg.batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                sched.step()
                continue
            x = to_tensor(augment(data[idx], cfg.size, gen, cfg.strength))
            loss = loss_fn(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if progress and (epoch + 1) % 10 == 0:
            log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, cfg.epochs, np.mean(losses), time.time() - t0)
    return model.eval()


def fit_ensemble(canvas: np.ndarray, labels: np.ndarray, cfg: FitConfig, device: str = "cpu",
                 progress: bool = False) -> Ensemble:
    return Ensemble([fit(canvas, labels, cfg, cfg.seed + k, device, progress) for k in range(cfg.seeds)]).eval()


@torch.no_grad()
def live_scores(model: nn.Module, crops: np.ndarray, device: str = "cpu", batch: int = 256) -> np.ndarray:
    """Live probability of N x size x size x 3 uint8 BGR crops."""
    model.eval()
    out = [torch.softmax(model(to_tensor(crops[i:i + batch]).to(device)), 1)[:, LIVE].cpu().numpy()
           for i in range(0, len(crops), batch)]
    return np.concatenate(out).astype(np.float64) if out else np.zeros(0)


def session_oof(crops: np.ndarray, canvas: np.ndarray, labels: np.ndarray, sessions: np.ndarray, cfg: FitConfig,
                device: str = "cpu", progress: bool = False) -> np.ndarray:
    """Leave-one-session-out scores of every training frame (an ensemble of cfg.seeds per fold)."""
    scores = np.full(len(labels), np.nan)
    for s in sorted(set(sessions.tolist())):
        held = sessions == s
        log.info("session fold: training without session %s (%d frames)", s, int(held.sum()))
        m = fit_ensemble(canvas[~held], labels[~held], cfg, device, progress)
        scores[held] = live_scores(m, crops[held], device)
    return scores


def cv_figures(scores: np.ndarray, labels: np.ndarray, seq_ids: np.ndarray, frames: int = 3,
               bpcer: float = 0.05) -> dict:
    """Figures of out-of-fold scores: the threshold at `bpcer` of the live window means (the gate
    judges the mean of the last `frames` frames), the per-frame and per-sequence APCER / BPCER there
    (a sequence passes when any of its windows does), and the a-posteriori APCER at BPCER 5%."""
    win = np.empty_like(scores)
    seq_max = {}
    for sid in np.unique(seq_ids):
        idx = np.nonzero(seq_ids == sid)[0]  # callers keep each sequence in frame order
        win[idx] = window_means(scores[idx], frames)
        seq_max[sid] = (win[idx].max(), labels[idx[0]])
    live, att = win[labels == LIVE], win[labels == ATTACK]
    t = threshold_at_bpcer(live, bpcer)
    sl = np.array([v for v, lab in seq_max.values() if lab == LIVE])
    sa = np.array([v for v, lab in seq_max.values() if lab == ATTACK])
    t_post = threshold_at_bpcer(live, 0.05)
    order = np.sort(att)
    auc = float(np.mean(np.searchsorted(order, live, side="left")) / max(len(att), 1))
    return {"threshold": round(t, 4), "frame_apcer": round(float(np.mean(att >= t)), 4),
            "frame_bpcer": round(float(np.mean(live < t)), 4), "seq_apcer": round(float(np.mean(sa >= t)), 4),
            "seq_bpcer": round(float(np.mean(sl < t)), 4), "apcer_at_bpcer5": round(float(np.mean(att >= t_post)), 4),
            "auc": round(auc, 4), "n_seq": [int(len(sl)), int(len(sa))]}


# ---------------------------------------------------------------- export

def export_pad(model: nn.Module, out_dir: Path, name: str, threshold: float, calib: np.ndarray, cfg: FitConfig,
               accuracy: dict, notes: str = "") -> tuple[Path, Path]:
    """torch -> fp32 ONNX (dynamo, opset 18) -> INT8 QDQ (calibrated on training crops), with cards.
    Returns the two card paths (fp32, int8)."""
    from edge.modelcard import Card, InputSpec, LivenessSpec, SourceSpec, sha256_file, write_card
    from export.quantize import ArrayReader, quantize

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / f"{name}_fp32.onnx"
    int8 = out_dir / f"{name}_int8.onnx"
    x = torch.zeros(2, 3, cfg.size, cfg.size)
    torch.onnx.export(model.eval().cpu(), (x,), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=18,
                      external_data=False, dynamo=True)
    # 21 batches: export.quantize flushes ranges every 4 batches, and onnxruntime's MinMax
    # calibrator then finds "no data" when the count is a multiple of 4 (or a batch is empty).
    calib = calib[np.random.default_rng(0).permutation(len(calib))]
    batches = [to_tensor(b).numpy() for b in np.array_split(calib, 21) if len(b)]
    if len(batches) % 4 == 0:
        batches = batches[:-1]
    quantize(fp32, int8, "minmax", ArrayReader("input", batches))
    cards = []
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        card = Card(name=path.stem, task="liveness", file=path.name, sha256=sha256_file(path),
                    size_bytes=path.stat().st_size, runtime="onnxruntime", precision=precision,
                    input=InputSpec(width=cfg.size, height=cfg.size, color="BGR", layout="NCHW", mean=MEAN, std=STD,
                                    dynamic_batch=True),
                    liveness=LivenessSpec(crop_scale=cfg.scale, live_class=LIVE, threshold=round(threshold, 6)),
                    source=SourceSpec(package="facegate-train", version="", file=path.name,
                                      license="trained by facegate on NUAA Photograph Imposter Database (research "
                                              "data, terms unverified: see ../shared/data/nuaa/SOURCE.txt)",
                                      notes=notes),
                    accuracy=accuracy)
        cards.append(write_card(card, path))
    return cards[0], cards[1]


def train_data(nuaa: str | Path, detector_card: str, out: Path, cfg: FitConfig) -> dict:
    """The train split's frames with a face, in sequence and frame order: crops, canvases, labels,
    sessions and sequence ids (arrays), as `run` and the GPU sweep's data file use them."""
    root = Path(nuaa)
    all_items = nuaa_items(root)
    faces = detect_all(root, all_items, detector_card, out / "faces.json")
    items = [it for it in all_items if it.split == "train"]
    items = [items[i] for idx in sequences(items).values() for i in idx]
    crops, canvas, found = crops_for(root, items, faces, cfg.scale, cfg.size)
    keep = np.nonzero(found)[0]
    items = [items[i] for i in keep]
    log.info("train: %d live + %d print frames with a face (%d without)", sum(it.label == LIVE for it in items),
             sum(it.label == ATTACK for it in items), int((~found).sum()))
    return {"crops": crops[keep], "canvas": canvas[keep], "labels": np.array([it.label for it in items]),
            "sessions": np.array([it.session for it in items]), "seq": np.array([it.sequence for it in items]),
            "paths": np.array([it.path for it in items])}


def run(nuaa: str | Path, detector_card: str, out: str | Path, cfg: FitConfig, bpcer: float = 0.05, frames: int = 3,
        device: str = "cpu", progress: bool = True, state: str | Path | None = None,
        threshold: float | None = None, loso: dict | None = None) -> dict:
    """`python -m train liveness`: boxes, crops, leave-one-session-out threshold, final ensemble,
    ONNX + INT8 + cards. With `state` (a state_dict of the Ensemble, e.g. from the GPU sweep),
    `threshold` and its `loso` figures, it exports those instead of fitting."""
    if device == "cpu":
        torch.set_num_threads(1)  # the training box is shared: one core, and no oversubscription stalls
    from edge.atomic import atomic_write_bytes

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    d = train_data(nuaa, detector_card, out, cfg)
    t0 = time.time()
    acc: dict = {}
    if state is None:
        oof = session_oof(d["crops"], d["canvas"], d["labels"], d["sessions"], cfg, device, progress)
        cv = cv_figures(oof, d["labels"], d["seq"], frames, bpcer)
        threshold = cv["threshold"]
        log.info("leave-one-session-out: %s", cv)
        model = fit_ensemble(d["canvas"], d["labels"], cfg, device, progress).cpu()
        torch.save(model.state_dict(), out / "pad.pt")
    else:
        if threshold is None:
            raise ValueError("a given state needs its threshold (from its leave-one-session-out scores)")
        model = Ensemble([cfg.net() for _ in range(cfg.seeds)])
        model.load_state_dict(torch.load(state, map_location="cpu", weights_only=True))
        model.eval()
        cv = loso  # the figures that came with the state (liveness_gpu's final.json), if any
    origin = (f"leave-one-session-out scores on the NUAA train split (the first two capture sessions), "
              f"mean of {frames} frames, BPCER {bpcer:g}")
    acc["threshold_from"] = origin
    if cv is not None:
        acc.update({f"loso_{k}": v for k, v in cv.items() if k not in ("threshold", "n_seq")})
    fp32_card, int8_card = export_pad(
        model, out, "pad", threshold, d["crops"], cfg, acc,
        notes=f"PadNet ensemble of {cfg.seeds}, {param_count(model)} params, {cfg.size}x{cfg.size} at {cfg.scale}x the "
              f"YuNet box; recipe {json.dumps(asdict(cfg))}; threshold from {origin}")
    report = {"threshold": threshold, "accuracy": acc, "params": param_count(model), "train_s": round(time.time() - t0),
              "fit": asdict(cfg), "cards": [str(fp32_card), str(int8_card)], "loso": cv}
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    return report
