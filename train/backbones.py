"""Face encoders registered by name. Every backbone maps 112x112 RGB to an L2-normalised embedding
and says how it is fed (`INPUT`), so `export/` can write its model card without guessing."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from torch.nn import functional as F

# How every backbone here is fed: RGB, NCHW, (pixel - 127.5) / 128, the MobileFaceNet convention.
INPUT = {"width": 112, "height": 112, "color": "RGB", "layout": "NCHW",
         "mean": (127.5, 127.5, 127.5), "std": (128.0, 128.0, 128.0)}

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}


def register(name: str):
    def deco(fn):
        if name in _REGISTRY:
            raise ValueError(f"backbone {name!r} registered twice")
        _REGISTRY[name] = fn
        return fn
    return deco


def names() -> list[str]:
    return sorted(_REGISTRY)


def build(name: str, embedding_dim: int = 128) -> nn.Module:
    if name not in _REGISTRY:
        raise ValueError(f"unknown backbone {name!r}; known: {', '.join(names())}")
    return _REGISTRY[name](embedding_dim=embedding_dim)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ConvBN(nn.Sequential):
    def __init__(self, cin, cout, k=1, s=1, groups=1, act=True, pad=None):
        pad = k // 2 if pad is None else pad
        layers = [nn.Conv2d(cin, cout, k, s, pad, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act:
            layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)


class Bottleneck(nn.Module):
    """MobileNetV2 inverted residual: 1x1 expand, 3x3 depthwise, 1x1 linear projection."""

    def __init__(self, cin, cout, stride, expansion):
        super().__init__()
        mid = cin * expansion
        self.residual = stride == 1 and cin == cout
        self.body = nn.Sequential(ConvBN(cin, mid), ConvBN(mid, mid, 3, stride, groups=mid),
                                  ConvBN(mid, cout, act=False))

    def forward(self, x):
        y = self.body(x)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """MobileFaceNet (Chen et al. 2018) with ReLU where the paper has PReLU: onnxruntime has no
    INT8 PReLU kernel, so PReLU splits every quantized block with float fallbacks and the INT8
    model ran slower than fp32; ReLU folds into the quantized convolutions.

    Body: 3x3/2 conv 64, depthwise 3x3 64, bottlenecks (t, c, n, s) = (2,64,5,2) (4,128,1,2)
    (2,128,6,1) (4,128,1,2) (2,128,2,1), 1x1 conv 512, global depthwise conv 7x7 (GDC), linear 1x1
    to the embedding, BatchNorm; output L2-normalised."""

    SETTING = ((2, 64, 5, 2), (4, 128, 1, 2), (2, 128, 6, 1), (4, 128, 1, 2), (2, 128, 2, 1))

    def __init__(self, embedding_dim: int = 128):
        super().__init__()
        layers: list[nn.Module] = [ConvBN(3, 64, 3, 2), ConvBN(64, 64, 3, 1, groups=64)]
        cin = 64
        for t, c, n, s in self.SETTING:
            for i in range(n):
                layers.append(Bottleneck(cin, c, s if i == 0 else 1, t))
                cin = c
        layers += [ConvBN(cin, 512), ConvBN(512, 512, 7, 1, groups=512, act=False, pad=0)]
        self.features = nn.Sequential(*layers)
        self.embed = nn.Sequential(nn.Conv2d(512, embedding_dim, 1, bias=False), nn.BatchNorm2d(embedding_dim))
        self.embedding_dim = embedding_dim
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.embed(self.features(x)).flatten(1), dim=1)


@register("mobilefacenet_relu")
def mobilefacenet_relu(embedding_dim: int = 128) -> nn.Module:
    return MobileFaceNet(embedding_dim)
