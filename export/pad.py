"""`python -m export pad`: the cards of the shipped PAD models in edge/assets/pad/.

The two MiniFASNet ONNX files are committed there (Apache-2.0, see PROVENANCE.md beside them);
this writes a card for each (how Silent-Face's code feeds them: BGR, 0..255, no mean or std, a
crop of 2.7x / 4.0x the face box resized to 80x80, class 1 live), the fusion recipe (their live
probabilities averaged, as Silent-Face fuses them) and the fusion's card, whose threshold is set
on the NUAA train split by `evaluation.liveness.train_threshold` (never the test split)."""
from __future__ import annotations

import json
from pathlib import Path

from edge.atomic import atomic_write_bytes
from edge.modelcard import Card, InputSpec, LivenessSpec, SourceSpec, sha256_file, write_card
from edge.pad import SHIPPED_PAD, PadFusion, PadMember, PadRecipe

ASSETS = SHIPPED_PAD.parent
RECIPE = ASSETS / "minifasnet.pad.json"
# name -> (file, crop scale, sha256 pinned from ../shared/models/MODELS.txt)
MEMBERS = {
    "MiniFASNetV2": ("MiniFASNetV2.onnx", 2.7, "4eed38f0bde33c9b805942a5f25e42ce1161e2bda545254be622be957727794e"),
    "MiniFASNetV1SE": ("MiniFASNetV1SE.onnx", 4.0, "d819a69bac6b9ade2a0f4d9b60b618e1260f7bf3ba1fddff6c5d82131cb1083f"),
}
SOURCE_NOTES = ("Silent-Face-Anti-Spoofing weights (github.com/minivision-ai/Silent-Face-Anti-Spoofing, commit "
                "b6d5f04, Apache-2.0), ONNX conversion from github.com/yakhyo/face-anti-spoofing tag 'weights' "
                "(commit c175efe, Apache-2.0). Training data undisclosed: NUAA figures prove no generalisation. "
                "See PROVENANCE.md.")


def member_card(name: str) -> Card:
    file, scale, sha = MEMBERS[name]
    path = ASSETS / file
    digest = sha256_file(path)
    if digest != sha:
        raise ValueError(f"{path}: sha256 {digest[:12]}... is not the pinned {sha[:12]}...")
    return Card(name=name, task="liveness", file=file, sha256=sha, size_bytes=path.stat().st_size,
                runtime="onnxruntime", precision="fp32",
                input=InputSpec(width=80, height=80, color="BGR", layout="NCHW"),
                liveness=LivenessSpec(crop_scale=scale, live_class=1, threshold=0.5,
                                      threshold_rule="Silent-Face's own: live when the live class wins the softmax"),
                source=SourceSpec(package="Silent-Face-Anti-Spoofing", version="b6d5f04", file=file,
                                  license="Apache-2.0", notes=SOURCE_NOTES))


def fusion_card(threshold: float, rule: str) -> Card:
    return Card(name="minifasnet_fusion", task="liveness", file=RECIPE.name, sha256=sha256_file(RECIPE),
                size_bytes=RECIPE.stat().st_size, runtime="fusion", precision="fp32",
                input=InputSpec(width=80, height=80, color="BGR", layout="NCHW"),
                liveness=LivenessSpec(live_class=1, threshold=round(threshold, 4), threshold_rule=rule),
                source=SourceSpec(package="facegate", version="1", file=RECIPE.name, license="Apache-2.0",
                                  notes="mean of the MiniFASNetV2 and MiniFASNetV1SE live probabilities. " + SOURCE_NOTES))


def write_cards(nuaa: Path, detector_card: str, frames: int) -> float:
    from evaluation.liveness import OPERATING_BPCER, frame_scores, train_threshold
    from evaluation.nuaa import detect_all, nuaa_items, sequences

    import numpy as np

    members = [member_card(n) for n in MEMBERS]
    for c in members:
        write_card(c, ASSETS / c.file)
    recipe = PadRecipe(members=[PadMember(card=Path(c.file).stem + ".card.json", sha256=c.sha256, weight=1 / len(members))
                                for c in members])
    atomic_write_bytes(RECIPE, (json.dumps(recipe.model_dump(mode="json"), indent=2) + "\n").encode())
    items = [it for it in nuaa_items(nuaa) if it.split == "train"]
    cache = Path("out/liveness")
    cache.mkdir(parents=True, exist_ok=True)
    faces = detect_all(nuaa, items, detector_card, cache / "faces_train.json")
    # The fusion scores without its card's threshold, which is what is being chosen here.
    fusion = PadFusion(fusion_card(0.5, "not yet chosen"), RECIPE)
    scores = frame_scores(nuaa, items, faces, {"pad": fusion})["pad"]
    t = train_threshold(scores, np.array([it.label for it in items]), sequences(items), frames)
    rule = (f"NUAA train split (the first two capture sessions), YuNet fp32 boxes: the highest threshold that "
            f"rejects at most {OPERATING_BPCER:.0%} of the live {frames}-frame windows (`python -m export pad`)")
    # write_card names the card after a model file; the fusion's card is named for the fusion
    write_card(fusion_card(t, rule), SHIPPED_PAD.with_name("minifasnet.onnx"))
    return t


def main(args) -> int:
    t = write_cards(Path(args.nuaa), args.detector, args.frames)
    print(f"wrote the PAD cards in {ASSETS}; fusion threshold {t:.4f} (NUAA train split)")
    return 0
