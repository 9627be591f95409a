"""Zero-shot accuracy split into classes seen in training and classes never captioned (generalised zero-shot).

Every image is classified over ALL classes (e.g. the ten CIFAR-10 classes); accuracy is then reported
separately on images of seen and of unseen classes, with their harmonic mean (the usual generalised
zero-shot summary), plus the accuracy on unseen images when only the unseen classes compete.

    python -m contrastive.eval.unseen --data /tmp/contrastive-cifar10-unseen/split/val --unseen cat,truck --templates cifar \
        --model pretrained=runs/cifar10_lit --model random=runs/cifar10_lit_random --output runs/cifar10_unseen.json

Letters in names: N images, C classes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

import torch

from contrastive.errors import UserError


def seen_unseen_metrics(logits_NC: torch.Tensor, labels_N: torch.Tensor, classes: Sequence[str],
                        unseen: Sequence[str]) -> dict:
    """Accuracies of argmax predictions over all classes, on seen and on unseen images, and per class."""
    missing = [c for c in unseen if c not in classes]
    if missing:
        raise UserError(f"--unseen classes {missing} are not among the classes {list(classes)}")
    unseen_idx = torch.tensor([classes.index(c) for c in unseen])
    is_unseen_C = torch.zeros(len(classes), dtype=torch.bool)
    is_unseen_C[unseen_idx] = True
    pred_N = logits_NC.argmax(dim=1)
    correct_N = pred_N == labels_N
    unseen_N = is_unseen_C[labels_N]
    if unseen_N.all() or not unseen_N.any():
        raise UserError("the evaluation set needs images of both seen and unseen classes")
    per_class = {c: correct_N[labels_N == i].float().mean().item() for i, c in enumerate(classes)
                 if (labels_N == i).any()}
    seen_acc = correct_N[~unseen_N].float().mean().item()
    unseen_acc = correct_N[unseen_N].float().mean().item()
    # Conventional zero-shot: unseen images, only the unseen classes compete.
    among_unseen = unseen_idx[logits_NC[unseen_N][:, unseen_idx].argmax(dim=1)]
    confused_with = {}
    for i in unseen_idx.tolist():
        wrong = pred_N[(labels_N == i) & ~correct_N]
        if len(wrong):
            confused_with[classes[i]] = classes[int(wrong.mode().values)]
    return {
        "seen_acc": seen_acc,
        "unseen_acc": unseen_acc,
        "harmonic_mean": 2 * seen_acc * unseen_acc / (seen_acc + unseen_acc) if seen_acc + unseen_acc else 0.0,
        "unseen_acc_among_unseen": (among_unseen == labels_N[unseen_N]).float().mean().item(),
        "unseen_predicted_as_seen": (~is_unseen_C[pred_N[unseen_N]]).float().mean().item(),
        "acc1": correct_N.float().mean().item(),
        "per_class_acc": per_class,
        "unseen_most_confused_with": confused_with,
        "num_seen_images": int((~unseen_N).sum()), "num_unseen_images": int(unseen_N.sum()),
    }


def evaluate_models(models: list[tuple[str, str]], *, data: str, unseen: Sequence[str], templates=None,
                    classes: Sequence[str] | None = None, label_field: str = "", batch_size: int = 256,
                    max_samples: int = 0) -> dict:
    """{"models": {name: metrics}} for each (name, run/checkpoint path), all on the same images and prompts."""
    from contrastive.loading import load_for_inference
    from contrastive.eval.zeroshot import LabelledImages, evaluate, load_templates

    images = LabelledImages(data, label_field=label_field, classes=classes, max_samples=max_samples)
    missing = [c for c in unseen if c not in images.classes]
    if missing:
        raise UserError(f"--unseen classes {missing} are not among the classes of {data}: {images.classes}")
    prompts = load_templates(templates, classes=images.classes)
    results = {}
    for name, path in models:
        bundle, info = load_for_inference(path)
        out = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, images, prompts,
                       batch_size=batch_size, progress=True)
        results[name] = {"model": str(path), "step": info.get("step"),
                         **seen_unseen_metrics(out["logits"], out["labels"], images.classes, unseen)}
    return {"task": "zeroshot_seen_unseen", "dataset": data, "classes": images.classes, "unseen": list(unseen),
            "seen": [c for c in images.classes if c not in unseen], "num_images": out["num_images"],
            "models": results}


def table(result: dict) -> str:
    header = f"{'model':<14} {'seen':>7} {'unseen':>7} {'H':>7} {'unseen/unseen':>14} {'all':>7}"
    rows = [header] + [f"{name:<14} {m['seen_acc']:>7.3f} {m['unseen_acc']:>7.3f} {m['harmonic_mean']:>7.3f} "
                       f"{m['unseen_acc_among_unseen']:>14.3f} {m['acc1']:>7.3f}" for name, m in result["models"].items()]
    return "\n".join(rows)


def _model_arg(value: str) -> tuple[str, str]:
    name, sep, path = value.partition("=")
    return (name, path) if sep and name else (Path(value).name, value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m contrastive.eval.unseen", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", required=True, type=_model_arg, metavar="[NAME=]PATH",
                        help="run directory, checkpoint or export; repeat to compare models on the same images")
    parser.add_argument("--data", required=True, help="labelled images of ALL classes: ImageFolder or shard spec")
    parser.add_argument("--unseen", required=True, help="comma-separated classes left out of training, e.g. cat,truck")
    parser.add_argument("--classes", default=None, help="comma-separated class names in label order "
                                                        "(default: folder names or the shards' classnames.txt)")
    parser.add_argument("--templates", default=None, help="prompt templates: cifar, imagenet, a file (default: 3 generic)")
    parser.add_argument("--label-field", default="", help="JSON field holding the label (default: the .cls file)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    parser.add_argument("--max-samples", type=int, default=0, help="evaluate at most this many images (0: all)")
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    try:
        unseen = [c.strip() for c in args.unseen.split(",") if c.strip()]
        if not unseen:
            raise UserError("--unseen names no class")
        classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
        result = evaluate_models(args.model, data=args.data, unseen=unseen, templates=args.templates, classes=classes,
                                 label_field=args.label_field, batch_size=args.batch_size, max_samples=args.max_samples)
    except UserError as e:
        print(f"contrastive.eval.unseen: error: {e}", file=sys.stderr)
        return 2
    print(f"zero-shot over all {len(result['classes'])} classes; unseen in training: {', '.join(result['unseen'])}")
    print(table(result))
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=2))
        print(f"results: {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
