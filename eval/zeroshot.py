"""Zero-shot classification: class embeddings from prompt templates, scored against image embeddings.

Letters in names: N images, C classes, D embedding dim.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch

from contrastive.config import EvaluatorConfig
from contrastive.errors import UserError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "an image of a {c}.")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------- classes and templates

def read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def load_templates(spec: str | Sequence[str] | None) -> list[str]:
    """A template file, a built-in set name (cifar, imagenet), or a list; each template must contain {c}."""
    if not spec:
        templates = list(DEFAULT_TEMPLATES)
    elif isinstance(spec, str):
        builtin = TEMPLATE_DIR / f"{spec}.txt"
        templates = read_lines(builtin if builtin.is_file() else spec, "templates")
    else:
        templates = list(spec)
    if not templates:
        raise UserError("the template list is empty")
    for t in templates:
        if "{c}" not in t:
            raise UserError(f"template {t!r} has no {{c}} placeholder for the class name")
    return templates


def check_classes(classes: Sequence[str]) -> list[str]:
    classes = [c.strip() for c in classes if c and c.strip()]
    if not classes:
        raise UserError("the class list is empty: give --classes a,b,c or --classnames FILE")
    if len(set(classes)) != len(classes):
        raise UserError(f"the class list has duplicates: {sorted({c for c in classes if classes.count(c) > 1})}")
    return classes


# ---------------------------------------------------------------- labelled images

def is_image_folder(path: Path) -> bool:
    return path.is_dir() and any(p.is_dir() for p in path.iterdir()) and not list(path.glob("*.tar"))


def image_folder_items(root: Path) -> tuple[list[str], list[tuple[Path, str]]]:
    """ImageFolder layout: one sub-folder per class. Returns (folder class names, [(file, class)])."""
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items = [(f, c) for c in classes for f in sorted((root / c).rglob("*")) if f.suffix.lower() in IMAGE_SUFFIXES]
    return classes, items


def shard_label(sample: dict, label_field: str):
    """The label of a WebDataset sample: `.cls` by default, else a field of its JSON record."""
    if not label_field:
        if "cls" not in sample:
            raise UserError("a sample has no .cls label; name a JSON field with --label-field")
        return int(sample["cls"].decode() if isinstance(sample["cls"], bytes) else sample["cls"])
    record = json.loads(sample["json"]) if "json" in sample else {}
    if label_field not in record:
        raise UserError(f"a sample's JSON has no field {label_field!r}; it has {sorted(record)}")
    return record[label_field]


def shard_classnames(spec: str) -> list[str] | None:
    """classnames.txt beside the shards (written by `prep imagefolder`, as CLIP_benchmark's sets have)."""
    from contrastive.data import expand_sources

    first = Path(expand_sources(spec)[0][0])
    for candidate in (first.parent / "classnames.txt", first.parent.parent / "classnames.txt"):
        if candidate.is_file():
            return read_lines(candidate, "classnames")
    return None


class LabelledImages:
    """Images with labels from an ImageFolder or from shards; labels are class indices once classes are set."""

    def __init__(self, data: str, *, label_field: str = "", classes: Sequence[str] | None = None,
                 max_samples: int = 0):
        from contrastive.data import expand_sources

        self.data, self.label_field, self.max_samples = data, label_field, max_samples
        path = Path(data)
        self.folder = is_image_folder(path)
        if self.folder:
            folder_classes, self.items = image_folder_items(path)
            self.classes = check_classes(classes or folder_classes)
            missing = sorted(set(folder_classes) - set(self.classes))
            if classes and missing:
                raise UserError(f"--classes lacks folder classes {missing[:5]}")
        else:
            expand_sources(data)  # clear error for missing shards
            found = list(classes or []) or shard_classnames(data) or []
            if not found and label_field:
                found = sorted({str(shard_label(s, label_field)) for s in self._raw()})
            self.classes = check_classes(found)

    def _raw(self) -> Iterator[dict]:
        from contrastive.data import eval_samples

        for i, sample in enumerate(eval_samples(self.data)):
            if self.max_samples and i >= self.max_samples:
                return
            yield sample

    def __iter__(self) -> Iterator[tuple]:
        """(PIL image, class index, key) triples; unreadable images are skipped and counted in `self.skipped`."""
        from PIL import Image

        from contrastive.data import decode_image

        self.skipped = 0
        index = {c: i for i, c in enumerate(self.classes)}
        if self.folder:
            for n, (file, cls) in enumerate(self.items):
                if self.max_samples and n >= self.max_samples:
                    return
                try:
                    with Image.open(file) as img:
                        image = img.convert("RGB")
                except Exception:
                    self.skipped += 1
                    continue
                yield image, index[cls], str(file)
            return
        for sample in self._raw():
            label = shard_label(sample, self.label_field)
            if isinstance(label, str):
                if label not in index:
                    raise UserError(f"label {label!r} of sample {sample.get('__key__')} is not among the classes "
                                    f"{self.classes[:10]}")
                label = index[label]
            elif not 0 <= label < len(self.classes):
                raise UserError(f"label {label} of sample {sample.get('__key__')} is outside the "
                                f"{len(self.classes)} classes")
            try:
                image = decode_image(next(sample[k] for k in ("jpg", "jpeg", "png", "webp") if k in sample))
            except Exception:
                self.skipped += 1
                continue
            yield image, label, sample.get("__key__", "")


# ---------------------------------------------------------------- scoring

@torch.no_grad()
def class_embeddings(model, tokenizer, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """(C, D) normalised class embeddings: each class's template embeddings averaged, as CLIP does."""
    from open_clip import build_zero_shot_classifier

    fns = [lambda c, t=t: t.format(c=c) for t in templates]
    weights_DC = build_zero_shot_classifier(model, tokenizer, list(classes), fns, num_classes_per_batch=10,
                                            device=next(model.parameters()).device)
    return weights_DC.T.contiguous()


def classification_metrics(logits_NC: torch.Tensor, labels_N: torch.Tensor) -> dict:
    """acc1, acc5 (with at least 5 classes) and mean per-class recall, as CLIP_benchmark reports them."""
    num_classes = logits_NC.shape[1]
    top = logits_NC.topk(min(5, num_classes), dim=1).indices
    correct = top == labels_N[:, None]
    metrics = {"acc1": correct[:, 0].float().mean().item()}
    if num_classes >= 5:
        metrics["acc5"] = correct.any(dim=1).float().mean().item()
    pred = top[:, 0]
    recalls = [(pred[labels_N == c] == c).float().mean().item() for c in range(num_classes) if (labels_N == c).any()]
    metrics["mean_per_class_recall"] = float(sum(recalls) / len(recalls))
    return metrics


@torch.no_grad()
def evaluate(model, preprocess, tokenizer, images: LabelledImages, templates: Sequence[str], *,
             batch_size: int = 256, progress: bool = False) -> dict:
    """Zero-shot classify every image; returns metrics plus the raw logits and labels."""
    from tqdm import tqdm

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    weights_CD = class_embeddings(model, tokenizer, images.classes, templates)
    logits, labels, batch, batch_labels = [], [], [], []

    def flush():
        feats = model.encode_image(torch.stack(batch).to(device), normalize=True)
        logits.append((feats @ weights_CD.T).float().cpu())
        labels.extend(batch_labels)
        batch.clear()
        batch_labels.clear()

    for image, label, _ in tqdm(images, desc="zeroshot", unit="img", disable=not progress):
        batch.append(preprocess(image))
        batch_labels.append(label)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    model.train(was_training)
    if not labels:
        raise UserError(f"no readable labelled images in {images.data}")
    logits_NC, labels_N = torch.cat(logits), torch.tensor(labels)
    metrics = classification_metrics(logits_NC, labels_N)
    return {"metrics": metrics, "logits": logits_NC, "labels": labels_N, "num_images": len(labels),
            "num_skipped": images.skipped}


def benchmark_json(*, dataset: str, model: str, metrics: dict, **extra) -> dict:
    """CLIP_benchmark's result shape."""
    return {"dataset": dataset, "model": model, "task": "zeroshot_classification", "metrics": metrics, **extra}


class ZeroShotEvaluator:
    """Plug-in for the training loop: zero-shot accuracy on a labelled set."""

    def __init__(self, cfg: EvaluatorConfig, *, batch_size: int = 256):
        self.cfg, self.batch_size = cfg, batch_size
        self.tag = cfg.tag or f"zeroshot_{cfg.label_field or 'cls'}"
        self.templates = load_templates(cfg.templates or None)
        self.images = LabelledImages(cfg.data, label_field=cfg.label_field, classes=cfg.classes or None,
                                     max_samples=cfg.max_samples)

    def __call__(self, bundle) -> dict:
        out = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, self.images, self.templates,
                       batch_size=self.batch_size)
        return out["metrics"]


def run_cli(args) -> dict:
    """`contrastive zeroshot`: evaluate a saved model and write CLIP_benchmark-shaped JSON."""
    from contrastive.checkpoint import load_for_inference

    classes = None
    if args.classes is not None:
        classes = check_classes(args.classes.split(","))
    elif args.classnames:
        classes = check_classes(read_lines(args.classnames, "classnames"))
    templates = load_templates(args.templates)
    images = LabelledImages(args.data, label_field=args.label_field, classes=classes, max_samples=args.max_samples)
    bundle, info = load_for_inference(args.model)
    out = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, images, templates,
                   batch_size=args.batch_size, progress=True)
    result = benchmark_json(dataset=args.data, model=str(args.model), metrics=out["metrics"],
                            num_images=out["num_images"], num_skipped=out["num_skipped"],
                            classes=images.classes, label_field=args.label_field or "cls")
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    return result
