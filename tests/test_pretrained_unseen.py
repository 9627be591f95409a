"""eval.unseen: zero-shot accuracy over all classes, split into classes seen in training and never captioned."""
from __future__ import annotations

import json

import pytest
import torch

from contrastive.eval.unseen import main, seen_unseen_metrics


def test_metrics_on_hand_made_logits():
    classes = ["a", "b", "c", "d"]
    labels = torch.tensor([0, 0, 1, 2, 2, 3])
    logits = torch.tensor([[9., 0, 0, 0],   # a -> a  right
                           [0., 9, 0, 0],   # a -> b  wrong
                           [0., 9, 0, 0],   # b -> b  right
                           [0., 0, 9, 1],   # c -> c  right (and among c, d: c)
                           [9., 0, 1, 2],   # c -> a  wrong (among c, d: d, wrong)
                           [0., 0, 9, 1]])  # d -> c  wrong (among c, d: c, wrong)
    m = seen_unseen_metrics(logits, labels, classes, ["c", "d"])
    assert m["seen_acc"] == pytest.approx(2 / 3) and m["unseen_acc"] == pytest.approx(1 / 3)
    assert m["harmonic_mean"] == pytest.approx(2 * (2 / 3) * (1 / 3) / 1.0)
    assert m["unseen_acc_among_unseen"] == pytest.approx(1 / 3)
    assert m["unseen_predicted_as_seen"] == pytest.approx(1 / 3)
    assert m["acc1"] == pytest.approx(3 / 6)
    assert m["per_class_acc"] == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.5, "d": 0.0})
    assert m["unseen_most_confused_with"] == {"c": "a", "d": "c"}
    assert (m["num_seen_images"], m["num_unseen_images"]) == (3, 3)


def test_cli_agrees_with_the_zero_shot_evaluator(tmp_path, tiny_overrides, synthetic_data, capsys):
    from contrastive.loading import load_for_inference
    from contrastive.config import load_config
    from contrastive.train import train
    from contrastive.eval.zeroshot import LabelledImages, evaluate, load_templates

    run = tmp_path / "run"
    train(load_config(None, tiny_overrides), run, progress=False)
    out = tmp_path / "unseen.json"
    args = ["--data", synthetic_data["val"], "--label-field", "shape", "--model", f"tiny={run}", "--output", str(out),
            "--templates", "cifar"]
    images = LabelledImages(synthetic_data["val"], label_field="shape")
    unseen = images.classes[:2]
    assert main(args + ["--unseen", ",".join(unseen)]) == 0
    printed = capsys.readouterr().out
    assert "tiny" in printed and str(out) in printed
    result = json.loads(out.read_text())
    m = result["models"]["tiny"]
    assert result["unseen"] == unseen and result["seen"] == images.classes[2:]
    # The same images through eval.zeroshot directly: the same overall accuracy, and the seen/unseen accuracies
    # are the image-weighted means of its per-class recalls.
    bundle, _ = load_for_inference(run)
    ref = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, images, load_templates("cifar"))
    assert m["acc1"] == pytest.approx(ref["metrics"]["acc1"])
    counts = {c: int((ref["labels"] == i).sum()) for i, c in enumerate(images.classes)}
    pred = ref["logits"].argmax(dim=1)
    recall = {c: (pred[ref["labels"] == i] == i).float().mean().item() for i, c in enumerate(images.classes)}
    for key, names in (("seen_acc", result["seen"]), ("unseen_acc", unseen)):
        expected = sum(recall[c] * counts[c] for c in names) / sum(counts[c] for c in names)
        assert m[key] == pytest.approx(expected), key

    assert main(args + ["--unseen", "dodecahedron"]) == 2
    err = capsys.readouterr().err.strip()
    assert "not among the classes" in err and len(err.splitlines()) == 1
