"""Embedding: runs any face encoder through its model card (ONNX Runtime or LiteRT)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .align import align
from .modelcard import Card, load_card
from .records import AlignedFace, Detection, Embedding
from .runtime import open_model


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Encoder:
    def __init__(self, card: Card, model_path: Path, threads: int = 1, flip: bool = False):
        if card.task != "face_embedding":
            raise ValueError(f"{model_path}: card is for {card.task}, not face_embedding")
        self.card = card
        self.model = open_model(card, model_path, threads)
        self.flip = flip  # test-time flip: mean of the face's and its mirror's embeddings
        self.output = card.embedding.output

    @property
    def sha256(self) -> str:
        return self.card.sha256

    def align(self, image: np.ndarray, det: Detection) -> AlignedFace:
        return align(image, det, self.card.alignment.template, self.card.alignment.size)

    def embed_images(self, faces: list[np.ndarray]) -> np.ndarray:
        """Aligned BGR crops (card size) -> N x dim L2-normalised float32."""
        batch = faces + [f[:, ::-1] for f in faces] if self.flip else faces
        out = self.model(self.card.preprocess(batch))
        y = out[self.output] if self.output else next(iter(out.values()))
        y = l2_normalize(y.reshape(len(batch), -1).astype(np.float32))
        if self.flip:
            y = l2_normalize(y[:len(faces)] + y[len(faces):])
        return y

    def embed(self, face: AlignedFace) -> Embedding:
        return Embedding(vector=self.embed_images([face.image])[0], encoder_sha256=self.sha256)


def load_encoder(card_path: str | Path, threads: int = 1, flip: bool = False) -> Encoder:
    card, path = load_card(card_path)
    return Encoder(card, path, threads, flip)
