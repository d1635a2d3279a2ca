"""Passive PAD model: NUAA data with the gate's own face boxes, a MiniFASNet-class CNN (ReLU, so it
quantizes to INT8 cleanly), hard augmentation, export to ONNX -> INT8 with its model card.

`python -m train liveness` runs it end to end. NUAA's train lists (sessions 1-2 of subjects
0001-0009) train; the operating threshold comes from subject-wise out-of-fold scores on the train
split (never from the test lists, which are for `liveness-eval` only)."""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from edge.atomic import atomic_write_bytes
from edge.detect import load_detector
from edge.errors import FacegateError
from edge.metrics import share_at_least
from edge.modelcard import Card, InputSpec, LivenessSpec, SourceSpec, sha256_file, write_card
from edge.pad import pad_crop

from .data import read_image

log = logging.getLogger("facegate.train")

SIZE = 80
CROP_SCALE = 2.7
TRAIN_SCALES = (2.4, 2.7, 3.0)  # scale jitter: crops precomputed once at each
LIVE, ATTACK = 1, 0  # class index = label; the card's live_class
MEAN, STD = (127.5, 127.5, 127.5), (128.0, 128.0, 128.0)
LISTS = {("train", LIVE): "client_train_raw.txt", ("train", ATTACK): "imposter_train_raw.txt",
         ("test", LIVE): "client_test_raw.txt", ("test", ATTACK): "imposter_test_raw.txt"}


# ---------------------------------------------------------------- NUAA

@dataclass(frozen=True)
class NuaaItem:
    path: str  # relative to the NUAA folder
    split: str
    label: int

    @property
    def parts(self) -> tuple[str, str, str, str, int]:
        """subject, glasses, position, session, frame number (from <subject>_<glasses>_<pos>_<session>_<frame>.jpg)."""
        s, g, p, sess, f = Path(self.path).stem.split("_")
        return s, g, p, sess, int(f)

    @property
    def subject(self) -> str:
        return self.parts[0]

    @property
    def sequence(self) -> str:
        """One subject, glasses, position and session of one class (live or attack), per ../shared/README.md."""
        s, g, p, sess, _ = self.parts
        return f"{'live' if self.label == LIVE else 'print'}/{s}_{g}_{p}_{sess}"


def nuaa_items(root: str | Path) -> list[NuaaItem]:
    root = Path(root)
    items = []
    for (split, label), name in LISTS.items():
        f = root / name
        if not f.is_file():
            raise FacegateError(f, "NUAA split list not found (expected ../shared/data/nuaa)")
        items += [NuaaItem(line.strip(), split, label) for line in f.read_text().splitlines() if line.strip()]
    return items


def sequences(items: list[NuaaItem]) -> dict[str, list[int]]:
    """Sequence name -> indices into `items`, in frame order."""
    out: dict[str, list[int]] = {}
    for i, it in enumerate(items):
        out.setdefault(it.sequence, []).append(i)
    return {k: sorted(v, key=lambda i: items[i].parts[4]) for k, v in sorted(out.items())}


def detect_all(root: Path, items: list[NuaaItem], detector_card: str, cache: Path, threads: int = 2) -> dict:
    """The gate's detector on every frame: path -> {"box", "kps"} of the largest face, or None.
    Cached as JSON (keyed by the detector's sha256) so training and evaluation see the same boxes."""
    det = load_detector(detector_card, threads)
    sha = det.card.sha256
    if cache.is_file():
        data = json.loads(cache.read_text())
        if data.get("detector_sha256") == sha and all(it.path in data["faces"] for it in items):
            return data["faces"]
    faces = {}
    for it in items:
        img = read_image(root / it.path)
        dets = det.detect(img) if img is not None else []
        if dets:
            d = max(dets, key=lambda d: d.size)
            faces[it.path] = {"box": [round(v, 2) for v in d.box], "kps": np.round(d.keypoints, 2).tolist(),
                              "score": round(d.score, 4)}
        else:
            faces[it.path] = None
    atomic_write_bytes(cache, json.dumps({"detector_sha256": sha, "faces": faces}).encode())
    return faces


def crops_for(root: Path, items: list[NuaaItem], faces: dict, scales=TRAIN_SCALES) -> tuple[np.ndarray, np.ndarray]:
    """(S x N x 80 x 80 x 3 uint8 crops, N bool: face found). Frames without a face get zeros."""
    out = np.zeros((len(scales), len(items), SIZE, SIZE, 3), np.uint8)
    found = np.zeros(len(items), bool)
    for i, it in enumerate(items):
        f = faces.get(it.path)
        if f is None:
            continue
        img = read_image(root / it.path)
        for s, scale in enumerate(scales):
            out[s, i] = pad_crop(img, f["box"], scale, (SIZE, SIZE))
        found[i] = True
    return out, found


# ---------------------------------------------------------------- augmentation

def augment(crop: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Hard photometric and geometric jitter of one BGR uint8 crop: the test session's light,
    camera and distance differ from training, and the model must not lean on any one of them."""
    img = crop
    if rng.random() < 0.8:  # small rotation, zoom and shift
        ang, zoom = rng.uniform(-12, 12), rng.uniform(0.92, 1.12)
        m = cv2.getRotationMatrix2D((SIZE / 2 + rng.uniform(-3, 3), SIZE / 2 + rng.uniform(-3, 3)), ang, zoom)
        img = cv2.warpAffine(img, m, (SIZE, SIZE), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT101)
    if rng.random() < 0.5:
        img = img[:, ::-1]
    x = img.astype(np.float32)
    if rng.random() < 0.9:  # exposure, contrast, white balance, gamma
        x = x * rng.uniform(0.6, 1.4) + rng.uniform(-30, 30)
        x = (x - x.mean()) * rng.uniform(0.7, 1.3) + x.mean()
        x = x * rng.uniform(0.85, 1.15, size=3)
        x = 255.0 * (np.clip(x, 0, 255) / 255.0) ** rng.uniform(0.7, 1.4)
    if rng.random() < 0.3:  # saturation
        g = x.mean(axis=2, keepdims=True)
        x = g + (x - g) * rng.uniform(0.5, 1.4)
    if rng.random() < 0.05:
        x = np.repeat(x.mean(axis=2, keepdims=True), 3, axis=2)
    img = np.clip(x, 0, 255).astype(np.uint8)
    r = rng.random()
    if r < 0.25:
        img = cv2.GaussianBlur(img, (0, 0), rng.uniform(0.4, 1.5))
    elif r < 0.35:
        k = int(rng.integers(3, 6))
        kern = np.zeros((k, k), np.float32)
        kern[k // 2] = 1.0 / k
        kern = cv2.warpAffine(kern, cv2.getRotationMatrix2D((k / 2 - 0.5, k / 2 - 0.5), rng.uniform(0, 180), 1), (k, k))
        img = cv2.filter2D(img, -1, kern / max(kern.sum(), 1e-6))
    if rng.random() < 0.3:
        img = np.clip(img + rng.normal(0, rng.uniform(2, 8), img.shape), 0, 255).astype(np.uint8)
    if rng.random() < 0.5:
        ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 95))])
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR)
    return np.ascontiguousarray(img)


def to_tensor(crops_bgr: np.ndarray) -> torch.Tensor:
    """N x H x W x 3 BGR uint8 -> N x 3 x H x W float, normalised as the card says."""
    x = torch.from_numpy(np.ascontiguousarray(crops_bgr)).float()
    x = (x - torch.tensor(MEAN)) / torch.tensor(STD)
    return x.permute(0, 3, 1, 2).contiguous()


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


class PadNet(nn.Module):
    """MiniFASNet-class: 80x80 -> 5x5 in four stride-2 steps, a global depthwise conv (as in
    MobileFaceNet / MiniFASNet) instead of average pooling, so where the cue sits (paper edge,
    fingers, background) still counts. ReLU throughout: PReLU quantizes badly to INT8."""

    STAGES = ((48, 48, 1, 2), (48, 48, 1, 2), (48, 96, 2, 2), (96, 96, 1, 2), (96, 96, 1, 2),
              (96, 128, 2, 2), (128, 128, 1, 2), (128, 128, 1, 2))

    def __init__(self, classes: int = 2, width: int = 256, emb: int = 128, dropout: float = 0.2):
        super().__init__()
        # Two cheap stride-2 steps first: at 40x40 only 16 channels, which keeps CPU training fast.
        layers = [nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                  nn.Conv2d(16, 16, 3, 2, 1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(inplace=True),
                  nn.Conv2d(16, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True)]
        layers += [InvertedResidual(*s) for s in self.STAGES]
        layers += [nn.Conv2d(128, width, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU(inplace=True),
                   nn.Conv2d(width, width, 5, groups=width, bias=False), nn.BatchNorm2d(width)]
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(width, emb, bias=False), nn.BatchNorm1d(emb),
                                  nn.ReLU(inplace=True), nn.Dropout(dropout), nn.Linear(emb, classes))

    def forward(self, x):
        return self.head(self.features(x))


def param_count(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


# ---------------------------------------------------------------- training

@dataclass
class FitConfig:
    epochs: int = 30
    batch: int = 64
    lr: float = 3e-3
    weight_decay: float = 5e-4
    label_smoothing: float = 0.1
    seed: int = 0


def fit(crops: np.ndarray, labels: np.ndarray, cfg: FitConfig, progress: bool = False) -> PadNet:
    """Train on S x N crops (a random scale per sample) with hard augmentation; returns eval-mode net."""
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    model = PadNet()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = crops.shape[1]
    steps_per_epoch = max(1, math.ceil(n / cfg.batch))
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=0.1)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    y_all = torch.from_numpy(labels.astype(np.int64))
    t0 = time.time()
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(n)
        losses = []
        for b in range(steps_per_epoch):
            idx = order[b * cfg.batch:(b + 1) * cfg.batch]
            if len(idx) < 2:  # BatchNorm needs two samples
                continue
            scale = rng.integers(0, crops.shape[0], size=len(idx))
            x = to_tensor(np.stack([augment(crops[s, i], rng) for s, i in zip(scale, idx)]))
            loss = loss_fn(model(x), y_all[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            losses.append(loss.item())
        if progress:
            log.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, cfg.epochs, np.mean(losses), time.time() - t0)
    return model.eval()


@torch.no_grad()
def live_scores(model: nn.Module, crops: np.ndarray, batch: int = 256) -> np.ndarray:
    model.eval()
    out = [torch.softmax(model(to_tensor(crops[i:i + batch])), 1)[:, LIVE].numpy() for i in range(0, len(crops), batch)]
    return np.concatenate(out) if out else np.zeros(0)


def augmented_scores(model: nn.Module, crops: np.ndarray, seed: int, copies: int = 8) -> np.ndarray:
    """Scores of training crops under the training augmentation: an in-sample model is sure of its
    own training frames, and the augmented copies show how far its scores fall on harder views."""
    rng = np.random.default_rng(seed + 1)
    n = crops.shape[1]
    views = np.stack([augment(crops[rng.integers(0, crops.shape[0]), i], rng) for _ in range(copies) for i in range(n)])
    return live_scores(model, views)


def threshold_at_bpcer(live: np.ndarray, bpcer: float) -> float:
    """The highest threshold that rejects at most `bpcer` of the live scores (live if score >= t)."""
    s = np.sort(np.asarray(live, np.float64))
    if s.size == 0:
        raise ValueError("no live scores")
    return float(s[min(int(np.floor(bpcer * s.size + 1e-9)), s.size - 1)])


def subject_folds(subjects: list[str], k: int) -> list[set[str]]:
    names = sorted(set(subjects))
    return [set(names[i::k]) for i in range(k)]


def out_of_fold(crops: np.ndarray, labels: np.ndarray, subjects: list[str], k: int, cfg: FitConfig,
                progress: bool) -> np.ndarray:
    """Scores of each training frame from a model that never saw its subject (at the card's scale)."""
    scores = np.full(len(labels), np.nan)
    subj = np.asarray(subjects)
    centre = TRAIN_SCALES.index(CROP_SCALE)
    for f, held in enumerate(subject_folds(subjects, k)):
        test = np.isin(subj, sorted(held))
        log.info("fold %d/%d: holding out subjects %s", f + 1, k, ",".join(sorted(held)))
        m = fit(crops[:, ~test], labels[~test], cfg, progress)
        scores[test] = live_scores(m, crops[centre, test])
    return scores


# ---------------------------------------------------------------- export

def export_pad(model: nn.Module, out_dir: Path, name: str, threshold: float, calib: np.ndarray,
               accuracy: dict, notes: str = "") -> tuple[Path, Path]:
    """torch -> fp32 ONNX (dynamo, opset 18) -> INT8 QDQ (calibrated on training crops), with cards.
    Returns the two card paths (fp32, int8)."""
    from export.quantize import ArrayReader, quantize

    out_dir.mkdir(parents=True, exist_ok=True)
    fp32 = out_dir / f"{name}_fp32.onnx"
    int8 = out_dir / f"{name}_int8.onnx"
    x = torch.zeros(2, 3, SIZE, SIZE)
    torch.onnx.export(model.eval().cpu(), (x,), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, opset_version=18,
                      external_data=False, dynamo=True)
    # 21 batches: export.quantize flushes ranges every 4 batches, and onnxruntime's MinMax
    # calibrator then finds "no data" when the count is a multiple of 4.
    step = max(1, len(calib) // 21)
    batches = [to_tensor(calib[i * step:(i + 1) * step]).numpy() for i in range(21)]
    quantize(fp32, int8, "minmax", ArrayReader("input", batches))
    cards = []
    for path, precision in ((fp32, "fp32"), (int8, "int8")):
        card = Card(name=path.stem, task="liveness", file=path.name, sha256=sha256_file(path),
                    size_bytes=path.stat().st_size, runtime="onnxruntime", precision=precision,
                    input=InputSpec(width=SIZE, height=SIZE, color="BGR", layout="NCHW", mean=MEAN, std=STD,
                                    dynamic_batch=True),
                    liveness=LivenessSpec(crop_scale=CROP_SCALE, live_class=LIVE, threshold=round(threshold, 6)),
                    source=SourceSpec(package="facegate-train", version="", file=path.name,
                                      license="trained by facegate on NUAA Photograph Imposter Database (research "
                                              "data, terms unverified: see ../shared/data/nuaa/SOURCE.txt)",
                                      notes=notes),
                    accuracy=accuracy)
        cards.append(write_card(card, path))
    return cards[0], cards[1]


def run(nuaa: str | Path, detector_card: str, out: str | Path, cfg: FitConfig, folds: int = 3, bpcer: float = 0.05,
        progress: bool = True, reuse: bool = False) -> dict:
    """`python -m train liveness`: boxes, crops, out-of-fold threshold, final model, ONNX + INT8 + cards."""
    torch.set_num_threads(1)  # the training box is shared: one core, and no oversubscription stalls
    root, out = Path(nuaa), Path(out)
    out.mkdir(parents=True, exist_ok=True)
    items = [it for it in nuaa_items(root) if it.split == "train"]
    faces = detect_all(root, nuaa_items(root), detector_card, out / "faces.json")
    crops, found = crops_for(root, items, faces)
    keep = np.nonzero(found)[0]
    items = [items[i] for i in keep]
    crops, labels = crops[:, keep], np.array([it.label for it in items])
    subjects = [it.subject for it in items]
    log.info("train: %d live + %d print frames with a face (%d without)", int((labels == LIVE).sum()),
             int((labels == ATTACK).sum()), int((~found).sum()))
    t0 = time.time()
    oof = out_of_fold(crops, labels, subjects, folds, cfg, progress) if folds > 1 else None
    if oof is not None:
        threshold = threshold_at_bpcer(oof[labels == LIVE], bpcer)
        origin = f"{folds}-fold subject-wise out-of-fold scores on the NUAA train split, BPCER {bpcer:g}"
        log.info("out-of-fold threshold %.4f", threshold)
    if reuse and (out / "pad.pt").is_file():
        model = PadNet()
        model.load_state_dict(torch.load(out / "pad.pt", weights_only=True))
        model.eval()
    else:
        model = fit(crops, labels, cfg, progress)
        torch.save(model.state_dict(), out / "pad.pt")
    if oof is None:
        threshold = threshold_at_bpcer(augmented_scores(model, crops[:, labels == LIVE], cfg.seed), bpcer)
        origin = f"in-sample scores of augmented NUAA train live crops (8 per frame), BPCER {bpcer:g}"
    acc = {"threshold_from": origin}
    if oof is not None:
        acc["oof_apcer_print"] = round(float(share_at_least(oof[labels == ATTACK], [threshold])[0]), 4)
        acc["oof_bpcer"] = round(float(1 - share_at_least(oof[labels == LIVE], [threshold])[0]), 4)
    calib = crops[TRAIN_SCALES.index(CROP_SCALE)]
    fp32_card, int8_card = export_pad(model, out, "pad", threshold, calib, acc,
                                      notes=f"PadNet {param_count(model)} params, 80x80 at {CROP_SCALE}x the YuNet box; "
                                            f"{cfg.epochs} epochs; threshold from {origin}")
    report = {"threshold": threshold, "accuracy": acc, "params": param_count(model), "train_s": round(time.time() - t0),
              "fit": cfg.__dict__, "cards": [str(fp32_card), str(int8_card)],
              "oof": None if oof is None else {"live": oof[labels == LIVE].round(4).tolist(),
                                               "print": oof[labels == ATTACK].round(4).tolist()}}
    atomic_write_bytes(out / "report.json", json.dumps(report, indent=1).encode())
    return report
