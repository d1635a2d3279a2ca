"""dlib's ResNet face encoder (`dlib_face_recognition_resnet_model_v1.dat`) as a torch module: the
reference the shipped ONNX graph (export.dlib_onnx, built without torch) is tested against, and
the source of the TFLite export and of distillation.

dlib's network (dnn_face_recognition_ex.cpp) is a 29-conv ResNet on a 150x150 RGB chip:
stem conv 7x7/2 + affine + relu + max pool 3x3/2, then residual units of two 3x3 convs (each
followed by an affine, i.e. batch norm folded at training end), average global pooling and a
128-d fc without bias. Two dlib rules differ from the usual torch conventions and both change
the output completely if missed: dlib pads a window by size/2 only when its stride is 1 (stem,
max pool, stride-2 convs and pools are unpadded; the file records the padding and we use it),
and `add_prev` of two tensors of different shapes yields the larger shape with the smaller one
zero-filled at the end (extra channels, bottom rows, right columns), which happens at every
widening down-sampling unit and where the skip path's 2x2 pool keeps one more row/col than
the stride-2 conv (8 -> 3 vs 4, 4 -> 1 vs 2).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from edge.errors import ModelError

from .dlib_dat import DlibNet, read_dat
from .dlib_onnx import (CHIP_SIZE, DAT_NAME, DLIB_TEMPLATE_150, Conv,  # noqa: F401
                        architecture, fold_affine, template_from_mean_face)


def add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's add_prev: the sum has the larger size in each dim; the smaller tensor is zero-filled
    at the end (extra channels, bottom rows, right columns)."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))
    return _grow(a, c, h, w) + _grow(b, c, h, w)


def _grow(t: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    if tuple(t.shape[1:]) == (c, h, w):
        return t
    return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))


class _Unit(nn.Module):
    """One dlib residual unit: relu(add_prev(affine(conv(relu(affine(conv(x))))), skip(x)))."""

    def __init__(self, conv1: nn.Conv2d, conv2: nn.Conv2d, pool: tuple[int, int] | None):
        super().__init__()
        self.conv1, self.conv2, self.pool = conv1, conv2, pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv2(F.relu(self.conv1(x)))
        skip = F.avg_pool2d(x, self.pool[0], self.pool[1]) if self.pool else x
        return F.relu(add_prev(y, skip))


class DlibResNet(nn.Module):
    """Input: N x 3 x 150 x 150 planar RGB, (pixel - input_mean) / 256. Output: N x 128, not
    normalised (dlib compares Euclidean distances with 0.6)."""

    def __init__(self, stem: nn.Conv2d, pool: tuple[int, int, int], units: list[_Unit], fc: nn.Linear,
                 input_mean: tuple[float, float, float], input_size: tuple[int, int]):
        super().__init__()
        self.stem, self.pool, self.units, self.fc = stem, pool, nn.ModuleList(units), fc
        self.input_mean, self.input_size = input_mean, input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.stem(x)), self.pool[0], self.pool[1], self.pool[2])
        for unit in self.units:
            x = unit(x)
        return self.fc(x.mean(dim=(2, 3)))


class L2Normalized(nn.Module):
    """The gate scores cosine on unit vectors, so the exported graph ends in an L2 normalisation."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.net(x), p=2.0, dim=1, eps=1e-12)


def _conv(c: Conv) -> nn.Conv2d:
    m = nn.Conv2d(c.weight.shape[1], c.weight.shape[0], c.weight.shape[2:], c.stride, c.padding, bias=True)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(c.weight))
        m.bias.copy_(torch.from_numpy(c.bias))
    return m


def from_dlib(net: DlibNet, path: str | Path = "<dlib net>") -> DlibResNet:
    arch = architecture(net, path)  # the layer walk and its checks, shared with the torch-free builder
    size, stride, pad = arch.pool
    units = [_Unit(_conv(u.conv1), _conv(u.conv2), u.pool) for u in arch.units]
    fc = nn.Linear(arch.fc.shape[1], arch.fc.shape[0], bias=False)
    with torch.no_grad():
        fc.weight.copy_(torch.from_numpy(arch.fc))
    return DlibResNet(_conv(arch.stem), (size, stride, pad), units, fc, net.input_mean, net.input_size).eval()


def load_dat(path: str | Path) -> DlibResNet:
    return from_dlib(read_dat(path), path)


def chips_to_input(chips_rgb: np.ndarray, mean: tuple[float, float, float]) -> torch.Tensor:
    """N x 150 x 150 x 3 RGB uint8 chips -> the network input, as dlib's input_rgb_image_sized."""
    x = (np.asarray(chips_rgb, np.float32) - np.asarray(mean, np.float32)) / np.float32(256.0)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
