"""README.md model cards for exports: architecture, training data, samples seen, config, eval results, usage."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

_LIBRARY = {"open_clip": "open_clip", "hf": "transformers", "onnx": "onnx", "embeddings": None}

_USAGE = {
    "open_clip": """```python
import open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
model.eval()  # open_clip returns it in training mode (dropout; BatchNorm would update its statistics)
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
image_features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
text_features = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)
```""",
    "hf": """```python
from transformers import CLIPModel, CLIPProcessor
model = CLIPModel.from_pretrained("{out}")
processor = CLIPProcessor.from_pretrained("{out}")
inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt", padding="max_length")
logits_per_image = model(**inputs).logits_per_image
```
The tokenizer gives open_clip's token ids on clean text; open_clip also applies `ftfy.fix_text` and
`html.unescape` to raw text first, so do that for scraped captions. The image processor's default
(torchvision) backend resizes slightly differently from open_clip's PIL resize for images of another
size; images already at the model's size give identical pixel values.""",
    # Models with one of our conv image towers (contrastive/towers.py): the export carries the tower's code.
    "open_clip_conv": """```python
import sys
import open_clip
sys.path.insert(0, "{out}")
import contrastive_towers  # this export's image trunk (torch + timm only): registers it with timm for open_clip
model, _, preprocess = open_clip.create_model_and_transforms("local-dir:{out}")
model.eval()  # open_clip returns it in training mode (dropout; BatchNorm would update its statistics)
tokenizer = open_clip.get_tokenizer("local-dir:{out}")
image_features = model.encode_image(preprocess(image).unsqueeze(0), normalize=True)
text_features = model.encode_text(tokenizer(["a photo of a cat"]), normalize=True)
```
open_clip builds timm image towers by registered name only, and neither it nor timm imports code from a model
folder: importing `contrastive_towers.py` from this folder first is what lets any open_clip tool (CLIP_benchmark's
Python API among them) load the model; `contrastive` itself is not needed.""",
    "hf_conv": """```python
from transformers import AutoModel, CLIPProcessor
model = AutoModel.from_pretrained("{out}", trust_remote_code=True)
processor = CLIPProcessor.from_pretrained("{out}", trust_remote_code=True)
inputs = processor(text=["a photo of a cat"], images=image, return_tensors="pt", padding="max_length")
logits_per_image = model(**inputs).logits_per_image
image_features = model.get_image_features(pixel_values=inputs["pixel_values"])
```
CLIPModel takes ViT image towers only; this model's conv tower is defined by `modeling_contrastive_clip.py` and
`contrastive_towers.py` in this folder (torch + transformers, no timm, no `contrastive`), which
`trust_remote_code=True` lets transformers import: read them first, as with any remote code. The text tower is
transformers' CLIPTextModel. Tokenizer and image processor notes as for CLIPModel exports: clean raw web text
(`ftfy.fix_text`, `html.unescape`) as open_clip does before tokenizing.""",
    "onnx": """```python
import onnxruntime as ort
image_encoder = ort.InferenceSession("{out}/image_encoder.onnx")   # pixel_values (B,3,H,W) -> image_embeds
text_encoder = ort.InferenceSession("{out}/text_encoder.onnx")     # input_ids (B,L) int64 -> text_embeds
```
Both return L2-normalised embeddings; `onnx_config.json` gives the preprocessing and the logit scale.""",
    "embeddings": """Files in clip-retrieval's layout: `img_emb/img_emb_N.npy` and `text_emb/text_emb_N.npy` (float16,
L2-normalised), `metadata/metadata_N.parquet` (row i describes row i of both arrays). Index them with
`contrastive index`, clip-retrieval's `clip index` or autofaiss.""",
}


def _params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def architecture_rows(model_cfg: dict, model) -> list[tuple[str, Any]]:
    vision, text = model_cfg.get("vision_cfg", {}), model_cfg.get("text_cfg", {})
    if vision.get("timm_model_name"):
        image_tower = f"timm {vision['timm_model_name']}"
    elif isinstance(vision.get("layers"), (list, tuple)):
        image_tower = f"ModifiedResNet {vision['layers']}, width {vision.get('width')}"
    else:
        image_tower = (f"ViT: {vision.get('layers', 12)} layers, width {vision.get('width', 768)}, "
                       f"head width {vision.get('head_width', 64)}, patch {vision.get('patch_size', 16)}")
    if text.get("hf_model_name"):
        text_tower = f"Hugging Face {text['hf_model_name']}"
    else:
        text_tower = (f"Transformer: {text.get('layers', 12)} layers, width {text.get('width', 512)}, "
                      f"{text.get('heads', 8)} heads, vocabulary {text.get('vocab_size', 49408)}")
    logit_scale = float(model.logit_scale.detach().exp().reshape(-1)[0])
    rows = [("embedding dim", model_cfg.get("embed_dim")), ("image tower", image_tower),
            ("image size", vision.get("image_size", 224)), ("text tower", text_tower),
            ("context length", text.get("context_length", 77)),
            ("activation", "QuickGELU" if model_cfg.get("quick_gelu") else "GELU"),
            ("parameters (image / text / total)",
             f"{_params(getattr(model, 'visual', None)):,} / "
             f"{_params(model) - _params(getattr(model, 'visual', None)):,} / {_params(model):,}"),
            ("logit scale (exp)", f"{logit_scale:.3f}")]
    if getattr(model, "logit_bias", None) is not None:
        rows.append(("logit bias", f"{float(model.logit_bias.detach().reshape(-1)[0]):.3f}"))
    return rows


def eval_results(run_dir: Path | None) -> list[tuple[str, str, Any, Any]]:
    """(source, metric, value, step) rows: the last value of every evaluator metric in metrics.jsonl, and
    the metrics of result JSON files (CLIP_benchmark's shape) anywhere in the run directory."""
    if run_dir is None or not run_dir.is_dir():
        return []
    rows: list[tuple[str, str, Any, Any]] = []
    metrics_file = run_dir / "metrics.jsonl"
    if metrics_file.is_file():
        latest: dict[str, tuple[Any, Any]] = {}
        for line in metrics_file.read_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            for key, value in record.items():
                if "/" in key and isinstance(value, (int, float)):  # evaluator results are "<tag>/<metric>"
                    latest[key] = (value, record.get("step"))
        rows += [("metrics.jsonl", key, value, step) for key, (value, step) in sorted(latest.items())]
    for path in sorted(run_dir.rglob("*.json")):
        rel = path.relative_to(run_dir)
        if rel.parts[0] in ("checkpoints", "tensorboard", "exports") or path.stat().st_size > 5_000_000:
            continue
        try:
            result = json.loads(path.read_text())
        except (ValueError, UnicodeDecodeError):
            continue
        if isinstance(result, dict) and isinstance(result.get("metrics"), dict):
            name = f"{rel} ({result.get('dataset', '')})" if result.get("dataset") else str(rel)
            rows += [(name, k, v, result.get("step")) for k, v in result["metrics"].items()
                     if isinstance(v, (int, float))]
    return rows


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _usage_key(fmt: str, model_cfg: dict) -> str:
    from contrastive.hf_export import is_conv_tower

    return f"{fmt}_conv" if fmt in ("open_clip", "hf") and is_conv_tower(model_cfg) else fmt


def write_model_card(path: Path, *, source, bundle, summary: dict) -> None:
    fmt = summary["format"]
    config = yaml.safe_load(source.config_yaml) if source.config_yaml else None
    config = config if isinstance(config, dict) else {}
    data, train = config.get("data", {}), config.get("train", {})
    step = source.step
    samples_seen = step * train["batch_size"] if step is not None and train.get("batch_size") else None
    lines = ["---"]
    if _LIBRARY[fmt]:
        lines.append(f"library_name: {_LIBRARY[fmt]}")
    lines += ["pipeline_tag: zero-shot-image-classification", "tags:", "- clip", "- contrastive", f"- {fmt}", "---", ""]
    out = summary.get("out") or str(path.parent)
    lines += [f"# {Path(out).resolve().name}", "",
              f"A CLIP-style dual encoder trained with `contrastive`, exported with `contrastive export --format {fmt}` "
              f"from `{source.path}`" + (f" (step {step})." if step is not None else "."), "",
              "## How to use", "", _USAGE[_usage_key(fmt, source.model_cfg)].format(out=out), ""]
    lines += ["## Architecture", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in architecture_rows(source.model_cfg, bundle.model)]
    lines += ["", "open_clip model config:", "", "```json",
              json.dumps({k: v for k, v in source.model_cfg.items() if k != "nonscalar_logit_scale"}, indent=2), "```",
              "", "Preprocessing (evaluation): " + json.dumps(
                  {k: list(v) if isinstance(v, tuple) else v for k, v in bundle.preprocess_cfg.items()}), ""]
    lines += ["## Training data", ""]
    if data:
        lines.append(f"- shards: `{data.get('train') or 'not recorded'}`")
        if data.get("train_weights"):
            lines.append(f"- source weights: {data['train_weights']}")
        lines.append(f"- sampling: {'resampled with replacement' if data.get('resampled', True) else 'epoch passes'}")
        if data.get("val"):
            lines.append(f"- validation shards: `{data['val']}`")
    else:
        lines.append("Not recorded (no resolved training config beside the weights).")
    lines += ["", "## Training", ""]
    lines.append(f"- steps: {step if step is not None else 'unknown'}")
    if train.get("batch_size"):
        lines.append(f"- global batch size: {train['batch_size']}")
    lines.append(f"- samples seen: {samples_seen:,}" if samples_seen is not None else "- samples seen: unknown")
    for key in ("zero_stage", "world_size", "time_s"):
        if key in source.state:
            lines.append(f"- {key.replace('_', ' ')}: {_fmt(source.state[key])}")
    lines += ["", "## Evaluation", ""]
    results = eval_results(source.run_dir)
    if results:
        lines += ["| source | metric | value | step |", "|---|---|---|---|"]
        lines += [f"| {src} | {k} | {_fmt(v)} | {s if s is not None else ''} |" for src, k, v, s in results]
    else:
        lines.append("No evaluation results were found in the run directory.")
    lines += ["", "## This export", "", f"- format: {fmt}, weights dtype: {summary.get('dtype')}"]
    if summary.get("check_max_abs_diff") is not None:
        lines.append(f"- checked: max abs difference of normalised embeddings vs the trained model "
                     f"{summary['check_max_abs_diff']:.2e}")
    if fmt == "embeddings":
        lines.append(f"- {summary['num_samples']:,} samples of `{summary['data']}`, dim {summary['dim']}, "
                     f"{len(summary['parts'])} part(s); skipped {summary['num_skipped']} unreadable samples")
    lines += ["", "## Resolved training config", ""]
    lines += ["```yaml", source.config_yaml.rstrip(), "```"] if source.config_yaml else ["Not recorded."]
    path.write_text("\n".join(lines) + "\n")
