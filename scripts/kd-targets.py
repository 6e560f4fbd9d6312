#!/usr/bin/env python3
"""What the contrastive loss and the KD loss ask of a student, pair by pair, on a noisy caption set.

    python scripts/kd-targets.py --teacher builtin:world-vit --data world-noisy --batches 20

For batches of B (image, caption) pairs drawn as training draws them, the contrastive loss's target for image
i is one-hot on caption i, whether or not caption i describes image i; KD's target is the teacher's softmax
over the batch's captions. The script reports, separately for pairs whose caption is right and wrong (the
world keeps the ground truth), the mass each target puts on caption i, and the mass KD puts on *other*
captions that describe an image with the same objects (colour and shape) — pairs that contrastive-only
training pushes apart as negatives.
"""

from __future__ import annotations

import argparse
import json

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="builtin:world-vit")
    parser.add_argument("--data", default="world-noisy")
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from dmclip.data import build_dataset, image_batch
    from dmclip.distill import load_teacher, teacher_features

    teacher = load_teacher(args.teacher)
    dataset = build_dataset(args.data, image_size=teacher.image_size)
    generator = torch.Generator().manual_seed(args.seed)
    order = torch.randperm(len(dataset), generator=generator)
    sums = {"right": [0.0, 0.0, 0], "wrong": [0.0, 0.0, 0]}  # KD mass on own caption, on same-object captions, n
    equivalent_pairs = 0
    for b in range(args.batches):
        indices = order[b * args.batch_size:(b + 1) * args.batch_size].tolist()
        samples = [dataset[i] for i in indices]
        captions = [s["captions"][0] for s in samples]
        with torch.no_grad():
            features = teacher_features(teacher, image_batch(samples), captions)
        logits = features["logit_scale"] * features["image_features"] @ features["text_features"].T
        probs = logits.softmax(dim=1)  # KD's image->text target rows
        objects = [frozenset((o["colour"], o["shape"]) for o in dataset.scene(i)["objects"]) for i in indices]
        noisy = [bool(dataset.extras(i)["caption_is_noisy"][0]) for i in indices]
        for row in range(len(indices)):
            same = [j for j in range(len(indices)) if j != row and objects[j] == objects[row] and not noisy[j]]
            equivalent_pairs += len(same)
            kind = "wrong" if noisy[row] else "right"
            sums[kind][0] += float(probs[row, row])
            sums[kind][1] += float(probs[row, same].sum()) if same else 0.0
            sums[kind][2] += 1
    report = {"teacher": args.teacher, "data": args.data, "pairs": sum(v[2] for v in sums.values()),
              "batch_size": args.batch_size, "same_object_negatives_per_image":
              equivalent_pairs / max(1, sum(v[2] for v in sums.values()))}
    for kind, (own, same, n) in sums.items():
        report[f"{kind} captions"] = {"pairs": n, "contrastive target on own caption": 1.0,
                                      "KD target on own caption": own / max(n, 1),
                                      "KD target on same-object captions": same / max(n, 1)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
