"""Liveness: is the face in front of the camera a live person, not a photo or a screen?

The decision path asks a `LivenessCheck` once per judged frame of a track. Modes (config
`liveness.mode`): "off" (no check: for doors where a second factor does this job), "passive"
(a presentation-attack-detection model averaged over the track's last frames), "passive+blink"
(also requires a blink or head motion seen on the track)."""
from __future__ import annotations

from typing import Protocol

import numpy as np

from .records import Detection, LivenessResult


class LivenessCheck(Protocol):
    def assess(self, image: np.ndarray, det: Detection, track_id: int, t_mono: float) -> LivenessResult: ...


class NoLiveness:
    def assess(self, image, det, track_id, t_mono) -> LivenessResult:
        return LivenessResult(True, 1.0, "off")


def make_liveness(cfg, threads: int = 1, providers=None) -> LivenessCheck:
    """`providers`: an edge.runtime.Providers, the stack's so that its fallbacks are audited with
    the others; None = one made from cfg.models.providers."""
    if cfg.liveness.mode == "off":
        return NoLiveness()
    from .pad import make_pad_policy  # the PAD model and temporal cues live in their own module
    from .runtime import Providers

    return make_pad_policy(cfg, threads, providers or Providers(cfg.models.providers))
