"""Training: config, loop, checkpoints, resume, final report."""
from __future__ import annotations

import io
import json
import logging
import math
import time
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from torch import nn
from torch.nn import functional as F

from edge.atomic import atomic_write_bytes
from edge.errors import ConfigError, FacegateError

from . import backbones, losses
from .data import (FaceSet, apply_flips, apply_jitter, load_faces, m_per_class_sampler, random_flips, random_jitter,
                   to_input)
from .teacher import load_teacher

log = logging.getLogger("facegate.train")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Objectives(_Strict):
    """Weight of each objective in the total loss; 0 switches it off."""

    triplet: float = Field(1.0, ge=0)
    binary: float = Field(0.0, ge=0)
    distill_cosine: float = Field(0.0, ge=0)
    distill_l2: float = Field(0.0, ge=0)
    distill_pairwise: float = Field(0.0, ge=0)

    def active(self) -> dict[str, float]:
        return {k: v for k, v in self.model_dump().items() if v > 0}


class TrainConfig(_Strict):
    data: str = Field(description="prepared identity-folder dataset (output of `prepare`)")
    teacher: str | None = Field(None, description="teacher embeddings .npz from `embed-teacher` (for distill_*)")
    backbone: str = "mobilefacenet_relu"
    embedding_dim: int = Field(128, ge=2, le=4096)
    objectives: Objectives = Objectives()
    margin: float = Field(0.2, gt=0, description="triplet margin alpha on squared distances")
    mining: Literal["all", "hard", "semihard", "batch_hard"] = "batch_hard"
    binary_features: Literal["abs", "chi2"] = "abs"
    p: int = Field(16, ge=2, description="identities per batch")
    m: int = Field(4, ge=2, description="images per identity in a batch")
    epochs: int = Field(10, ge=1)
    steps_per_epoch: int | None = Field(None, ge=1, description="None = images // (p * m)")
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_steps: int = Field(100, ge=0)
    flip: bool = Field(True, description="mirror half of the faces of each batch")
    jitter: bool = Field(False, description="light rotate/scale/shift and brightness/contrast jitter (data.JITTER)")
    bn_images: int = Field(20000, ge=0, description="training images for the final BatchNorm recalibration; 0 = keep running stats")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = 0

    @model_validator(mode="after")
    def _consistent(self):
        act = self.objectives.active()
        if not act:
            raise ValueError("every objective weight is 0: nothing to train")
        if any(k.startswith("distill") for k in act) and not self.teacher:
            raise ValueError("a distill_* objective needs `teacher` (embeddings from `python -m train embed-teacher`)")
        if self.backbone not in backbones.names():
            raise ValueError(f"unknown backbone {self.backbone!r}; known: {', '.join(backbones.names())}")
        return self

    @property
    def pair_objectives(self) -> bool:
        return self.objectives.triplet > 0 or self.objectives.binary > 0


def load_config(path: str | Path | None, overrides: list[str] = ()) -> TrainConfig:
    """YAML file (or none) plus `key=value` overrides; dotted keys reach nested fields
    (objectives.binary=0.5); values are parsed as YAML scalars."""
    raw = {}
    if path:
        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(path, "training config not found") from None
        except yaml.YAMLError as e:
            raise ConfigError(path, f"not valid YAML: {e}") from None
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(None, f"override {item!r} is not key=value")
        node = raw
        *parents, leaf = key.split(".")
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = yaml.safe_load(value)
    try:
        return TrainConfig.model_validate(raw)
    except ValidationError as e:
        msg = "; ".join(f"{'.'.join(map(str, x['loc'])) or '<root>'}: {x['msg']}" for x in e.errors()[:5])
        raise ConfigError(path, f"invalid training config: {msg}") from None


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise FacegateError(None, "device cuda asked for, but torch sees no CUDA GPU")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


class Trainer:
    """The encoder with whatever heads its objectives need, and the step that trains them."""

    def __init__(self, cfg: TrainConfig, faces: FaceSet, device: torch.device):
        self.cfg, self.faces, self.device = cfg, faces, device
        torch.manual_seed(cfg.seed)
        self.model = backbones.build(cfg.backbone, cfg.embedding_dim).to(device)
        self.heads = nn.ModuleDict()
        obj = cfg.objectives
        if obj.binary > 0:
            self.heads["binary"] = losses.BinaryHead(cfg.embedding_dim, cfg.binary_features)
        self.teacher = None
        if cfg.teacher and any(k.startswith("distill") for k in obj.active()):
            emb, emb_f, names = load_teacher(cfg.teacher, faces)
            self.teacher = (torch.from_numpy(emb).to(device), torch.from_numpy(emb_f).to(device))
            self.teacher_names = names
            tdim = emb.shape[1]
            if tdim != cfg.embedding_dim and (obj.distill_cosine > 0 or obj.distill_l2 > 0):
                # A wider teacher (an ensemble) is matched through a linear map that export drops.
                self.heads["project"] = nn.Linear(cfg.embedding_dim, tdim, bias=False)
        self.heads.to(device)
        params = list(self.model.parameters()) + list(self.heads.parameters())
        self.opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.steps_per_epoch = cfg.steps_per_epoch or max(1, len(faces) // (cfg.p * cfg.m))
        total = self.steps_per_epoch * cfg.epochs
        warm = min(cfg.warmup_steps, total // 2)
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda s: _warm_cosine(s, warm, total))
        self.images = torch.from_numpy(faces.images)  # stays on the CPU; batches move
        self.labels = torch.from_numpy(faces.labels)

    def losses(self, idx: torch.Tensor, flips: torch.Tensor, jitter: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """With `jitter`, the student sees jittered pixels while the teacher's target stays that of
        the clean crop (or its mirror): it learns to give the clean face's embedding."""
        cfg, obj = self.cfg, self.cfg.objectives
        x = apply_flips(to_input(self.images[idx].to(self.device)), flips)
        if jitter is not None:
            x = apply_jitter(x, jitter)
        emb = self.model(x)
        y = self.labels[idx].to(self.device)
        out: dict[str, torch.Tensor] = {}
        if obj.triplet > 0:
            out["triplet"], _ = losses.triplet_loss(emb, y, cfg.margin, cfg.mining)
        if obj.binary > 0:
            out["binary"] = losses.binary_loss(self.heads["binary"], emb, y)
        if self.teacher is not None:
            f = flips.to(self.device).view(-1, 1)
            t = torch.where(f, self.teacher[1][idx.to(self.device)], self.teacher[0][idx.to(self.device)])
            s = F.normalize(self.heads["project"](emb), dim=1) if "project" in self.heads else emb
            if obj.distill_cosine > 0:
                out["distill_cosine"] = losses.distill_cosine(s, t)
            if obj.distill_l2 > 0:
                out["distill_l2"] = losses.distill_l2(s, t)
            if obj.distill_pairwise > 0:
                out["distill_pairwise"] = losses.distill_pairwise(emb, t)
        return out

    def step(self, idx: torch.Tensor, flips: torch.Tensor, jitter: torch.Tensor | None = None) -> dict[str, float]:
        self.model.train()
        self.heads.train()
        parts = self.losses(idx, flips, jitter)
        weights = self.cfg.objectives.active()
        total = sum(weights[k] * v for k, v in parts.items())
        self.opt.zero_grad(set_to_none=True)
        total.backward()
        self.opt.step()
        self.sched.step()
        return {"loss": float(total.detach()), **{k: float(v.detach()) for k, v in parts.items()}}

    def batches(self, epoch: int):
        """This epoch's batches; seeded by (seed, epoch) so a resumed run draws the same ones."""
        cfg = self.cfg
        np.random.seed(cfg.seed * 1000 + epoch)  # MPerClassSampler draws from numpy's global RNG
        g = torch.Generator().manual_seed(cfg.seed * 1000 + epoch)
        if cfg.pair_objectives:
            order = torch.tensor(list(iter(m_per_class_sampler(self.faces.labels, cfg.p, cfg.m, self.steps_per_epoch))))
        else:
            n = self.steps_per_epoch * cfg.p * cfg.m
            order = torch.randint(len(self.faces), (n,), generator=g)
        for idx in order.view(self.steps_per_epoch, cfg.p * cfg.m):
            flips = random_flips(len(idx), g) if cfg.flip else torch.zeros(len(idx), dtype=torch.bool)
            yield idx, flips, random_jitter(len(idx), g) if cfg.jitter else None

    # ---- checkpoints: plain tensors and numbers only, loaded with weights_only=True (no pickle code)
    def state(self, epoch: int, history: list) -> dict:
        return {"model": self.model.state_dict(), "heads": self.heads.state_dict(), "opt": self.opt.state_dict(),
                "sched": self.sched.state_dict(), "epoch": epoch, "config": self.cfg.model_dump_json(),
                "history": json.dumps(history)}

    def load_state(self, ck: dict) -> tuple[int, list]:
        self.model.load_state_dict(ck["model"])
        self.heads.load_state_dict(ck["heads"])
        self.opt.load_state_dict(ck["opt"])
        self.sched.load_state_dict(ck["sched"])
        return int(ck["epoch"]), json.loads(ck["history"])


@torch.no_grad()
def recalibrate_bn(model: nn.Module, images: torch.Tensor, device: torch.device, batch: int = 128,
                   max_images: int = 20000, seed: int = 0) -> None:
    """Replace the BatchNorm running statistics by exact averages over (up to `max_images` of) the
    training images. The running averages of a short or small run are far from the data's
    statistics, and the eval-mode network (the one exported) can then map every face to nearly
    one embedding while the train-mode network looks fine."""
    bns = [mod for mod in model.modules() if isinstance(mod, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    momenta = [bn.momentum for bn in bns]
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # cumulative average over the batches below
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))[:max_images]
    model.train()
    for i in range(0, len(order), batch):
        model(to_input(images[order[i:i + batch]].to(device)))
    for bn, mom in zip(bns, momenta):
        bn.momentum = mom
    model.eval()


def _warm_cosine(step: int, warm: int, total: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def save_checkpoint(state: dict, path: Path) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_checkpoint(path: str | Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FacegateError(path, "checkpoint not found") from None
    except Exception as e:  # a truncated or foreign file: name it rather than dump a torch trace
        raise FacegateError(path, f"not a readable training checkpoint: {e}") from None


def fit(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train; write out_dir/last.pt after every epoch, out_dir/encoder.pt (the encoder's weights
    only, for export) and out_dir/report.json at the end. With `resume`, continue from last.pt
    (its config must equal this one, except that `epochs` may grow)."""
    from tqdm import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = pick_device(cfg.device)
    faces = load_faces(cfg.data, min_per_identity=2 if cfg.pair_objectives else 1)
    tr = Trainer(cfg, faces, device)
    start, history = 0, []
    if resume and (out / "last.pt").exists():
        ck = load_checkpoint(out / "last.pt")
        old, new = json.loads(ck["config"]), json.loads(cfg.model_dump_json())
        old.pop("epochs"), new.pop("epochs")  # more epochs may be asked for; anything else is another run
        if old != new:
            raise FacegateError(out / "last.pt", "checkpoint was trained with another config; use a new out dir")
        start, history = tr.load_state(ck)
        log.info("resumed after epoch %d", start)
    t0 = time.monotonic()
    for epoch in range(start, cfg.epochs):
        sums: dict[str, float] = {}
        bar = tqdm(tr.batches(epoch), total=tr.steps_per_epoch, desc=f"epoch {epoch + 1}/{cfg.epochs}",
                   disable=not progress, unit="step")
        for idx, flips, jitter in bar:
            vals = tr.step(idx, flips, jitter)
            for k, v in vals.items():
                sums[k] = sums.get(k, 0.0) + v
            bar.set_postfix(loss=f"{vals['loss']:.4f}")
        history.append({"epoch": epoch + 1, **{k: v / tr.steps_per_epoch for k, v in sums.items()},
                        "lr": tr.sched.get_last_lr()[0], "seconds": time.monotonic() - t0})
        save_checkpoint(tr.state(epoch + 1, history), out / "last.pt")
    if cfg.bn_images:
        recalibrate_bn(tr.model, tr.images, device, max_images=cfg.bn_images, seed=cfg.seed)
    save_checkpoint({"model": tr.model.state_dict(), "backbone": cfg.backbone, "embedding_dim": cfg.embedding_dim},
                    out / "encoder.pt")
    report = {"config": json.loads(cfg.model_dump_json()), "device": str(device),
              "parameters": backbones.n_params(tr.model), "images": len(faces), "identities": len(faces.classes),
              "unreadable": len(faces.unreadable), "skipped_identities": len(faces.skipped_identities),
              "steps_per_epoch": tr.steps_per_epoch, "history": history,
              "teachers": getattr(tr, "teacher_names", []), "train_seconds_this_run": time.monotonic() - t0}
    atomic_write_bytes(out / "report.json", (json.dumps(report, indent=1) + "\n").encode())
    return report


def load_encoder_weights(path: str | Path) -> nn.Module:
    """The trained encoder from encoder.pt (or from a last.pt), in eval mode on the CPU."""
    ck = load_checkpoint(path)
    if "backbone" in ck:
        name, dim = ck["backbone"], int(ck["embedding_dim"])
    else:
        c = json.loads(ck["config"])
        name, dim = c["backbone"], c["embedding_dim"]
    model = backbones.build(name, dim)
    model.load_state_dict(ck["model"])
    return model.eval()
