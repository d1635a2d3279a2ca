"""Embedding: runs any face encoder through its model card (ONNX Runtime or LiteRT), or a score
fusion of several (a card whose runtime is "fusion")."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .align import align
from .errors import ModelError
from .modelcard import Card, load_card, load_member
from .records import AlignedFace, Detection, Embedding
from .runtime import Providers, open_model


def l2_normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


class Encoder:
    def __init__(self, card: Card, model_path: Path, threads: int = 1, flip: bool = False,
                 providers: Providers | None = None):
        if card.task != "face_embedding":
            raise ValueError(f"{model_path}: card is for {card.task}, not face_embedding")
        self.card = card
        self.model = open_model(card, model_path, threads, providers)
        self.flip = flip  # test-time flip: mean of the face's and its mirror's embeddings
        self.output = card.embedding.output

    @property
    def sha256(self) -> str:
        return self.card.sha256

    def align(self, image: np.ndarray, det: Detection) -> AlignedFace:
        return align(image, det, self.card.alignment.template, self.card.alignment.size)

    def embed_images(self, faces: list[np.ndarray], flip: bool | None = None) -> np.ndarray:
        """Aligned BGR crops (card size) -> N x dim L2-normalised float32. `flip` None: the
        encoder's own setting; True: also the mirror images (enrollment mirrors every photo)."""
        flip = self.flip if flip is None else flip
        batch = faces + [f[:, ::-1] for f in faces] if flip else faces
        out = self.model(self.card.preprocess(batch))
        y = out[self.output] if self.output else next(iter(out.values()))
        y = l2_normalize(y.reshape(len(batch), -1).astype(np.float32))
        if flip:
            y = l2_normalize(y[:len(faces)] + y[len(faces):])
        return y

    def embed(self, face: AlignedFace, flip: bool | None = None) -> Embedding:
        return Embedding(vector=self.embed_images([face.image], flip)[0], encoder_sha256=self.sha256)


class FusionMember(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    card: str = Field(pattern=r"^[^/\\]+\.card\.json$")  # a card in the recipe's own folder
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")  # the member model's, as its card says
    scale: float = Field(gt=0, le=1000)
    # Mirror this member at the door too (test-time flip) whatever match.flip says: worth it for
    # a cheap member, not for an expensive one.
    flip: bool = False


class FusionRecipe(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    members: list[FusionMember] = Field(min_length=2, max_length=4)
    notes: str = ""


def fuse_vectors(vectors: list[np.ndarray], scales: list[float]) -> np.ndarray:
    """Unit member embeddings (N x d_i each) -> the fused unit embedding, N x sum(d_i).

    Concatenating s_i * v_i makes the dot product of two fused vectors sum_i s_i^2 cos_i over the
    members, and the fused norm is constant, so the fused cosine is an affine function of the
    z-score fusion sum_i w_i (cos_i - mu_i) / sd_i when s_i^2 = w_i / sd_i: gallery, matcher and
    thresholds work on fused vectors unchanged."""
    return l2_normalize(np.concatenate([v * s for v, s in zip(vectors, scales)], axis=-1).astype(np.float32))


class FusedEncoder:
    """Score fusion of member encoders as one encoder: each member aligns the face with its own
    template (`AlignedFace.views`), embeds it, and the scaled embeddings are concatenated."""

    def __init__(self, card: Card, recipe_path: Path, threads: int = 1, flip: bool = False,
                 providers: Providers | None = None):
        if card.task != "face_embedding":
            raise ValueError(f"{recipe_path}: card is for {card.task}, not face_embedding")
        try:
            recipe = FusionRecipe.model_validate(json.loads(recipe_path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, json.JSONDecodeError, ValidationError) as e:
            raise ModelError(recipe_path, f"invalid fusion recipe: {e}") from None
        self.card, self.flip = card, flip
        self.members = [Encoder(*load_member(recipe_path, m.card, m.sha256, "encoders"), threads, flip or m.flip,
                                providers) for m in recipe.members]
        self.scales = [m.scale for m in recipe.members]
        if sum(e.card.embedding.dim for e in self.members) != card.embedding.dim:
            raise ModelError(recipe_path, "the card's embedding size is not the sum of its members'")

    @property
    def sha256(self) -> str:
        return self.card.sha256

    def align(self, image: np.ndarray, det: Detection) -> AlignedFace:
        views = tuple(m.align(image, det).image for m in self.members)
        return AlignedFace(image=views[0], detection=det, views=views)

    def embed(self, face: AlignedFace, flip: bool | None = None) -> Embedding:
        if len(face.views) != len(self.members):
            raise ValueError("a fused encoder needs the face aligned by its own align()")
        vecs = [m.embed_images([v], True if flip else None) for m, v in zip(self.members, face.views)]
        return Embedding(vector=fuse_vectors(vecs, self.scales)[0], encoder_sha256=self.sha256)


def enrollment_card(door_card: str | Path, configured: str | Path | None = None) -> Path:
    """The card enrollment embeds with: the configured one, else the door encoder's fp32 twin
    beside it (`*_int8*` -> `*_fp32*`) when present, else the door encoder's own card."""
    if configured:
        return Path(configured)
    door = Path(door_card)
    twin = door.with_name(door.name.replace("_int8", "_fp32"))
    return twin if twin != door and twin.is_file() else door


def enrollment_twin(door_card: str | Path, configured: str | Path | None = None) -> Path | None:
    """enrollment_card() when it is another card than the door's, else None (the door encoder
    enrolls)."""
    card = enrollment_card(door_card, configured)
    return None if card.resolve() == Path(door_card).resolve() else card


def _network(enc) -> list[tuple]:
    """What makes two encoders' embeddings comparable: per member, the source network, how it
    is fed and aligned, its embedding size, scale and door flip (precision may differ)."""
    parts = list(zip(enc.members, enc.scales)) if isinstance(enc, FusedEncoder) else [(enc, 1.0)]
    return [(e.card.source.package, e.card.source.file, e.card.input.model_dump_json(exclude={"dtype"}),
             e.card.alignment.model_dump_json(), e.card.embedding.dim, round(s, 9), e.flip) for e, s in parts]


def check_twin(door, enroll, enroll_card: str | Path) -> None:
    """Refuses an enrollment encoder that is not the door encoder's network (a gallery made with
    it would be compared against embeddings of another space)."""
    if enroll is not door and _network(enroll) != _network(door):
        raise ModelError(enroll_card, f"enrollment encoder {enroll.card.name} is not the door encoder "
                                      f"{door.card.name}'s network (source, input, alignment, scales or flips differ)")


def load_encoder(card_path: str | Path, threads: int = 1, flip: bool = False,
                 providers: Providers | None = None) -> Encoder | FusedEncoder:
    """The encoder a card describes, routed by what the card says it is (InsightFace-style)."""
    card, path = load_card(card_path)
    if card.runtime == "fusion":
        return FusedEncoder(card, path, threads, flip, providers)
    return Encoder(card, path, threads, flip, providers)
