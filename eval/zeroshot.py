"""Zero-shot classification: class embeddings from prompt templates, scored against image embeddings.

Letters in names: N images, C classes, D embedding dim.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Sequence

import torch

from contrastive.config import EvaluatorConfig
from contrastive.distributed import rank_and_world_size
from contrastive.errors import UserError
from contrastive.evaluators import FeatureEncoder, encode_sharded, sum_over_ranks

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
DEFAULT_TEMPLATES = ("a photo of a {c}.", "a {c}.", "an image of a {c}.")
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


# ---------------------------------------------------------------- classes and templates

def read_lines(path: str | Path, what: str) -> list[str]:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def _json_entry(path: Path, data, dataset: str | None, what: str):
    """The entry of a CLIP_benchmark-style JSON file ({dataset: [...]}) for `dataset`, or its only entry."""
    if dataset and dataset in data:
        return data[dataset]
    if len(data) == 1:
        return next(iter(data.values()))
    hint = f"--dataset-name {dataset!r} is not one of them" if dataset else "pick one with --dataset-name"
    raise UserError(f"{what} file {path} holds several datasets ({', '.join(sorted(data)[:8])}...); {hint}")


def read_json(path: str | Path, what: str):
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{what} file {path} is not valid JSON ({e})") from None


def load_classnames(path: str | Path, *, dataset: str | None = None) -> list[str]:
    """One class per line, a JSON list, or CLIP_benchmark's JSON ({dataset: [class, ...]})."""
    path = Path(path)
    if path.suffix.lower() != ".json":
        return check_classes(read_lines(path, "classnames"))
    data = read_json(path, "classnames")
    if isinstance(data, dict):
        data = _json_entry(path, data, dataset, "classnames")
    if not isinstance(data, list) or not all(isinstance(c, str) for c in data):
        raise UserError(f"classnames file {path} must hold a list of class names (or {{dataset: [names]}})")
    return check_classes(data)


def load_templates(spec: str | Sequence[str] | None, *, dataset: str | None = None,
                   classes: Sequence[str] | None = None) -> list[str] | dict[str, list[str]]:
    """Prompt templates, each with a {c} placeholder: a built-in set (cifar, imagenet), a text file (one per line),
    a JSON list, or CLIP_benchmark's JSON ({dataset: [templates]}). Or per-class prompt lists: a JSON
    {class name: [prompt, ...]} (CuPL's format, which CLIP_benchmark also reads), returned as a dict."""
    if not isinstance(spec, str) and spec is not None and len(spec) == 1 and "{c}" not in spec[0]:
        spec = spec[0]  # a config's `templates: cifar` arrives as a one-item list: a set name or a file
    if not spec:
        templates = list(DEFAULT_TEMPLATES)
    elif isinstance(spec, str) and spec.lower().endswith(".json"):
        data = read_json(spec, "templates")
        if isinstance(data, dict) and classes is not None and not (dataset and dataset in data) \
                and set(classes) & set(data):
            return per_class_prompts(Path(spec), data, classes)
        if isinstance(data, dict):
            data = _json_entry(Path(spec), data, dataset, "templates")
        if not isinstance(data, list) or not all(isinstance(t, str) for t in data):
            raise UserError(f"templates file {spec} must hold a list of templates, {{dataset: [templates]}} or "
                            f"{{class: [prompts]}}")
        templates = [t.strip() for t in data if t.strip()]
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


def per_class_prompts(path: Path, data: dict, classes: Sequence[str]) -> dict[str, list[str]]:
    missing = [c for c in classes if not data.get(c)]
    if missing:
        raise UserError(f"per-class prompts file {path} has no prompts for classes {missing[:5]}")
    prompts = {c: [p.strip() for p in data[c] if isinstance(p, str) and p.strip()] for c in classes}
    empty = [c for c, ps in prompts.items() if not ps]
    if empty:
        raise UserError(f"per-class prompts file {path} has only empty prompts for classes {empty[:5]}")
    return prompts


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
        for _, image, label, key in self.shard(rank=0, world_size=1):
            yield image, label, key

    def shard(self, *, rank: int, world_size: int) -> Iterator[tuple]:
        """(sample index, PIL image, class index, key) of the samples whose index is `rank` mod `world_size`;
        only those are decoded. Unreadable images are skipped and counted in `self.skipped`."""
        from PIL import Image

        from contrastive.data import decode_image

        self.skipped = 0
        index = {c: i for i, c in enumerate(self.classes)}
        if self.folder:
            for n, (file, cls) in enumerate(self.items):
                if self.max_samples and n >= self.max_samples:
                    return
                if n % world_size != rank:
                    continue
                try:
                    with Image.open(file) as img:
                        image = img.convert("RGB")
                except Exception:
                    self.skipped += 1
                    continue
                yield n, image, index[cls], str(file)
            return
        for n, sample in enumerate(self._raw()):
            if n % world_size != rank:
                continue
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
            yield n, image, label, sample.get("__key__", "")


# ---------------------------------------------------------------- scoring

def class_embeddings(model, tokenizer, classes: Sequence[str], templates, *, batch_size: int = 256) -> torch.Tensor:
    """(C, D) normalised class embeddings: each class's prompt embeddings averaged, as CLIP does. `templates`: a
    list with a {c} placeholder, or per-class prompt lists ({class: [prompt, ...]}). On several ranks each
    encodes a share of the prompts (see contrastive.evaluators.encode_sharded); every rank gets all classes."""
    if isinstance(templates, dict):
        prompts = [(p, c) for c, cls in enumerate(classes) for p in templates[cls]]
    else:
        prompts = [(t.format(c=cls), c) for c, cls in enumerate(classes) for t in templates]
    rank, world_size = rank_and_world_size()
    encoder = FeatureEncoder(model)
    feats_PD, owner_P = encode_sharded(
        ((n, text, c) for n, (text, c) in enumerate(prompts) if n % world_size == rank),
        lambda texts: encoder.encode_text(tokenizer(texts)), dummy="", batch_size=batch_size)
    # The mean's direction: normalising makes dividing by each class's prompt count moot.
    sums_CD = feats_PD.new_zeros((len(classes), feats_PD.shape[1])).index_add_(0, torch.tensor(owner_P), feats_PD)
    return torch.nn.functional.normalize(sums_CD, dim=-1)


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
    """Zero-shot classify every image; returns metrics plus the raw logits (N, C) and labels (N,).

    On several ranks (inside training) each rank decodes and encodes its share of the images and every rank
    returns the whole set's result, in sample order: that of one rank."""
    from PIL import Image

    from contrastive.progress import progress_bar

    was_training = model.training
    model.eval()
    rank, world_size = rank_and_world_size()
    encoder = FeatureEncoder(model)
    try:
        weights_CD = class_embeddings(model, tokenizer, images.classes, templates, batch_size=batch_size)
        rows = ((n, preprocess(image), label) for n, image, label, _ in
                progress_bar(images.shard(rank=rank, world_size=world_size), desc="zeroshot", unit="img",
                             disable=not progress))
        feats_ND, labels = encode_sharded(rows, lambda batch: encoder.encode_image(torch.stack(batch)),
                                          dummy=preprocess(Image.new("RGB", (8, 8))), batch_size=batch_size)
    finally:
        model.train(was_training)
    num_skipped = sum_over_ranks(images.skipped)
    if not labels:
        raise UserError(f"no readable labelled images in {images.data}")
    logits_NC = (feats_ND.to(encoder.device) @ weights_CD.to(encoder.device).T).cpu()
    labels_N = torch.tensor(labels)
    metrics = classification_metrics(logits_NC, labels_N)
    return {"metrics": metrics, "logits": logits_NC, "labels": labels_N, "num_images": len(labels),
            "num_skipped": num_skipped}


def benchmark_json(*, dataset: str, model: str, metrics: dict, **extra) -> dict:
    """CLIP_benchmark's result shape."""
    return {"dataset": dataset, "model": model, "task": "zeroshot_classification", "metrics": metrics, **extra}


class ZeroShotEvaluator:
    """Plug-in for the training loop: zero-shot accuracy on a labelled set."""

    def __init__(self, cfg: EvaluatorConfig, *, batch_size: int = 256):
        self.cfg, self.batch_size = cfg, batch_size
        self.tag = cfg.tag or f"zeroshot_{cfg.label_field or 'cls'}"
        data, found = resolve_data(cfg.data)  # a CLIP_benchmark folder brings its own classes and templates
        self.images = LabelledImages(data, label_field=cfg.label_field,
                                     classes=cfg.classes or found["classnames"] or None, max_samples=cfg.max_samples)
        self.templates = load_templates(cfg.templates or found["templates"] or None, classes=self.images.classes)

    def __call__(self, bundle) -> dict:
        out = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, self.images, self.templates,
                       batch_size=self.batch_size)
        return out["metrics"]


# ---------------------------------------------------------------- command line

CLIP_BENCHMARK_CLASSNAMES = "classnames.txt"
CLIP_BENCHMARK_TEMPLATES = "zeroshot_classification_templates.txt"


def resolve_data(data: str, *, split: str = "test") -> tuple[str, dict]:
    """--data as given, or a shard spec for a folder: a CLIP_benchmark WebDataset folder (SPLIT/nshards.txt,
    SPLIT/0.tar.., classnames.txt, zeroshot_classification_templates.txt) or a folder of .tar shards.

    Returns (data, {"classnames": [...] or None, "templates": [...] or None}) from the folder's own files.
    """
    found: dict = {"classnames": None, "templates": None}
    path = Path(data)
    if not path.is_dir():
        return data, found
    if (path / "nshards.txt").is_file():  # the split folder itself was given
        path, split = path.parent, path.name
    nshards = path / split / "nshards.txt"
    splits = sorted(p.parent.name for p in path.glob("*/nshards.txt"))
    if splits and not nshards.is_file():
        raise UserError(f"{path} has no split {split!r} (it has {', '.join(splits)}); pass --split")
    if nshards.is_file():
        kind = path / "dataset_type.txt"
        if kind.is_file() and kind.read_text().strip().lower() == "retrieval":
            raise UserError(f"{path} is a CLIP_benchmark retrieval set, not a classification set")
        try:
            count = int(nshards.read_text().strip())
        except ValueError:
            raise UserError(f"{nshards} does not hold a shard count") from None
        if count <= 0:
            raise UserError(f"{nshards} says {count} shards")
        if (path / CLIP_BENCHMARK_CLASSNAMES).is_file():
            found["classnames"] = read_lines(path / CLIP_BENCHMARK_CLASSNAMES, "classnames")
        if (path / CLIP_BENCHMARK_TEMPLATES).is_file():
            found["templates"] = read_lines(path / CLIP_BENCHMARK_TEMPLATES, "templates")
        return str(path / split / f"{{0..{count - 1}}}.tar") if count > 1 else str(path / split / "0.tar"), found
    if (path / split).is_dir() and not any(path.glob("*.tar")) and any((path / split).glob("*.tar")):
        path = path / split
    if any(path.glob("*.tar")):
        return str(path), found  # contrastive.sharding.expand_sources reads a folder's shards
    return data, found


@torch.no_grad()
def predict(bundle, paths: Sequence[str], classes: Sequence[str], templates, *, top_k: int = 5) -> list[dict]:
    """Top-k labels with probabilities (softmax of the model's own logit scale times cosine) per image file."""
    from contrastive.eval.search import read_image

    images = [read_image(p) for p in paths]  # every file is checked before any work
    model = bundle.model
    weights_CD = class_embeddings(model, bundle.tokenizer, classes, templates)
    feats = FeatureEncoder(model).encode_image(torch.stack([bundle.preprocess_val(im) for im in images])).cpu()
    probs_NC = (model.logit_scale.exp().reshape(()).float().cpu() * feats @ weights_CD.T).softmax(dim=-1)
    top = probs_NC.topk(min(top_k, len(classes)), dim=-1)
    return [{"image": str(path), "predictions": [{"label": classes[int(i)], "prob": float(p)}
                                                  for p, i in zip(top.values[n], top.indices[n])]}
            for n, path in enumerate(paths)]


def run_cli(args) -> dict:
    """`contrastive zeroshot`: evaluate a saved model on a labelled set (CLIP_benchmark-shaped JSON), or predict
    labels of single images with --predict."""
    from contrastive.loading import load_for_inference
    from contrastive.eval.gpu import move_to_gpu

    if args.top_k <= 0:
        raise UserError(f"--top-k must be > 0, got {args.top_k}")
    if not Path(args.model).exists():  # before reading any data
        raise UserError(f"--model {args.model} does not exist")
    data, found = (resolve_data(args.data, split=args.split) if args.data else (None, {"classnames": None,
                                                                                        "templates": None}))
    classes = None
    if args.classes is not None:
        classes = check_classes(args.classes.split(","))
    elif args.classnames:
        classes = load_classnames(args.classnames, dataset=args.dataset_name)
    elif found["classnames"]:
        classes = check_classes(found["classnames"])
    if args.predict:
        if classes is None:
            raise UserError("--predict needs the labels: give --classes a,b,c or --classnames FILE")
        templates = load_templates(args.templates or found["templates"], dataset=args.dataset_name, classes=classes)
        bundle, _ = load_for_inference(args.model)
        move_to_gpu(bundle)
        predictions = predict(bundle, args.predict, classes, templates, top_k=args.top_k)
        result = {"model": str(args.model), "task": "zeroshot_prediction", "classes": classes,
                  "predictions": predictions}
    else:
        if not data or not args.output:
            raise UserError("evaluation needs --data (labelled images) and --output (a JSON file); "
                            "or give --predict IMAGE...")
        images = LabelledImages(data, label_field=args.label_field, classes=classes, max_samples=args.max_samples)
        templates = load_templates(args.templates or found["templates"], dataset=args.dataset_name,
                                   classes=images.classes)
        bundle, info = load_for_inference(args.model)
        move_to_gpu(bundle)
        out = evaluate(bundle.model, bundle.preprocess_val, bundle.tokenizer, images, templates,
                       batch_size=args.batch_size, progress=True)
        result = benchmark_json(dataset=args.data, model=str(args.model), metrics=out["metrics"],
                                num_images=out["num_images"], num_skipped=out["num_skipped"],
                                classes=images.classes, label_field=args.label_field or "cls")
        if args.confusion_matrix:
            from contrastive.eval.plots import confusion_matrix, plot_confusion

            matrix = confusion_matrix(out["labels"].numpy(), out["logits"].argmax(dim=1).numpy(),
                                      len(images.classes))
            plot_confusion(args.confusion_matrix, matrix, images.classes,
                           title=f"zero-shot {result['label_field']}: acc1 {out['metrics']['acc1']:.3f}")
            result["confusion_matrix"] = matrix.tolist()
    if args.output:
        output = Path(args.output)
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(result, indent=2))
    return result
