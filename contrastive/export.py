"""`contrastive export`: a trained model as open_clip, transformers or ONNX files, or as precomputed embeddings.

Every export is written into a staging folder beside --out and moved into place only when complete (an
existing --out is replaced only with overwrite=True, and only after the new export is finished), and gets a
README.md model card. Weights are read from safetensors or by DeepSpeed's ZeRO-to-fp32 consolidation with
weights-only loading (contrastive.checkpoint.load_full_state_dict), and written as safetensors.
"""
from __future__ import annotations

import copy
import errno
import json
import os
import shutil
import socket
import time
from pathlib import Path
from typing import Any

import torch

from contrastive.errors import UserError
from contrastive.hf_export import TOWERS_FILE, is_conv_tower
from contrastive.loading import (OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS, SUMMARY, Source, build_bundle, load_source,
                                 open_clip_layout)

FORMATS = ("open_clip", "hf", "embeddings", "onnx")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ONNX_IMAGE, ONNX_TEXT, ONNX_CONFIG = "image_encoder.onnx", "text_encoder.onnx", "onnx_config.json"
CARD = "README.md"
# Max abs difference between an export and our model (fp32, on random inputs) above which export fails.
CHECK_TOL = 1e-4
# A staging folder of another host (or of no recorded host) in which nothing changed for this long is taken as
# abandoned and removed: generous, as an export on another node cannot be asked whether it is alive.
STALE_STAGE_S = 2 * 24 * 3600
# Failures while writing that a user can fix: full disk or quota, read-only or forbidden destination.
_USER_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def open_clip_model_cfg(model_cfg: dict) -> dict:
    """open_clip's standard architecture dict: 0-dim logit scale/bias, as every open_clip tool expects."""
    cfg = copy.deepcopy(model_cfg)
    cfg.pop("nonscalar_logit_scale", None)
    return cfg


# ---------------------------------------------------------------- output directory

def _check_out(out: Path, source_path: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"--out {out} exists and is not empty; choose a new directory or pass --overwrite")
        src, dst = source_path.resolve(), out.resolve()
        if src == dst or dst in src.parents:
            raise UserError(f"--out {out} holds the model being exported; --overwrite would delete it")


def _stage_dir(out: Path) -> Path:
    """This export's staging folder beside `out`, named after the host and pid that own it."""
    return out.parent / f".{out.name}.incoming-{socket.gethostname()}-{os.getpid()}"


def _newest_mtime(path: Path) -> float:
    times = [path.stat().st_mtime]
    for dirpath, _, filenames in os.walk(path):
        for name in filenames:
            try:
                times.append(os.stat(os.path.join(dirpath, name)).st_mtime)
            except FileNotFoundError:
                pass
    return max(times)


def _remove_stale_stages(out: Path) -> None:
    """Staging folders of exports that died (killed, or crashed in a native library).

    On a shared filesystem a staging folder may belong to a live export on another node, where its pid means
    nothing here: a folder is stale only when it names this host and its pid is not running, or when nothing
    in it changed for STALE_STAGE_S (an export writes its files as it goes; none sits still that long)."""
    host = socket.gethostname()
    for stage in out.parent.glob(f".{out.name}.incoming-*"):
        owner, _, pid_text = stage.name[len(f".{out.name}.incoming-"):].rpartition("-")
        if owner == host and pid_text.isdigit():
            try:
                os.kill(int(pid_text), 0)
                continue
            except ProcessLookupError:
                shutil.rmtree(stage, ignore_errors=True)
                continue
            except PermissionError:  # alive, another user's
                continue
        try:
            if time.time() - _newest_mtime(stage) > STALE_STAGE_S:
                shutil.rmtree(stage, ignore_errors=True)
        except FileNotFoundError:  # its export just finished or cleaned up
            pass


def _publish(stage: Path, out: Path) -> None:
    """Move the finished staging folder to `out`; a previous `out` is removed only after that succeeded."""
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.replaced-{os.getpid()}"
        os.replace(out, old)
    os.replace(stage, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------- formats

def _cast(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    return {k: v.to(dtype).contiguous() if v.is_floating_point() else v.contiguous() for k, v in sd.items()}


def write_open_clip(source: Source, bundle, out: Path, *, dtype: torch.dtype) -> dict:
    """open_clip_config.json + open_clip_model.safetensors: `local-dir:OUT` loads with nothing else."""
    from safetensors.torch import save_file

    save_file(_cast(open_clip_layout(source.state_dict), dtype), str(out / OPEN_CLIP_WEIGHTS), metadata={"format": "pt"})
    preprocess = {k: list(v) if isinstance(v, tuple) else v for k, v in bundle.preprocess_cfg.items()}
    (out / OPEN_CLIP_CONFIG).write_text(json.dumps(
        {"model_cfg": open_clip_model_cfg(source.model_cfg), "preprocess_cfg": preprocess}, indent=2))
    if hasattr(bundle.tokenizer, "save_pretrained"):  # a Hugging Face tokenizer: local-dir: reads it from OUT
        bundle.tokenizer.save_pretrained(str(out))
    files = [OPEN_CLIP_CONFIG, OPEN_CLIP_WEIGHTS]
    if is_conv_tower(source.model_cfg):
        # open_clip builds timm towers by registered name only and neither it nor timm imports code from a model
        # folder, so our trunk's definition (torch + timm) travels with the weights: importing it registers it.
        import contrastive.towers

        shutil.copyfile(contrastive.towers.__file__, out / TOWERS_FILE)
        files.append(TOWERS_FILE)
    return {"files": files}


def _probe_inputs(bundle, *, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """Fixed random images and a few real captions, to compare an export with our model."""
    gen = torch.Generator().manual_seed(0)
    side = bundle.preprocess_cfg.get("size", 224)
    h, w = (side, side) if isinstance(side, int) else tuple(side)
    images = torch.randn(batch, 3, h, w, generator=gen)
    texts = bundle.tokenizer(["a photo of a red circle", "two small blue squares on a white background",
                              "a dog"][:batch])
    return images, texts


@torch.no_grad()
def _reference(bundle, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    model = bundle.model
    return model.encode_image(images, normalize=True), model.encode_text(texts, normalize=True)


@torch.no_grad()
def check_open_clip(out: Path, bundle) -> float:
    """Max abs difference of normalised embeddings, open_clip `local-dir:` load vs our model."""
    import open_clip

    model, _, _ = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    images, texts = _probe_inputs(bundle)
    ref_img, ref_txt = _reference(bundle, images, texts)
    model.eval()
    img = model.encode_image(images, normalize=True)
    txt = model.encode_text(tokenizer(["a photo of a red circle", "two small blue squares on a white background",
                                       "a dog"]), normalize=True)
    return max((img - ref_img).abs().max().item(), (txt - ref_txt).abs().max().item())


@torch.no_grad()
def check_hf(out: Path, bundle) -> float:
    """Max abs difference of normalised embeddings, AutoModel (CLIPModel, or the remote-code model of a conv
    tower) + CLIPTokenizer load vs our model."""
    from transformers import AutoModel, CLIPTokenizer

    model = AutoModel.from_pretrained(str(out), dtype=torch.float32, trust_remote_code=True).eval()
    tokenizer = CLIPTokenizer.from_pretrained(str(out))
    images, texts = _probe_inputs(bundle)
    ref_img, ref_txt = _reference(bundle, images, texts)
    captions = ["a photo of a red circle", "two small blue squares on a white background", "a dog"]
    enc = tokenizer(captions, padding="max_length", truncation=True, return_tensors="pt")
    img = model.get_image_features(pixel_values=images)
    txt = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    img, txt = (getattr(x, "pooler_output", x) for x in (img, txt))
    img, txt = torch.nn.functional.normalize(img, dim=-1), torch.nn.functional.normalize(txt, dim=-1)
    return max((img - ref_img).abs().max().item(), (txt - ref_txt).abs().max().item())


class _ImageEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model.encode_image(pixel_values, normalize=True)


class _TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model.encode_text(input_ids, normalize=True)


def write_onnx(source: Source, bundle, out: Path, *, dtype: torch.dtype) -> dict:
    """image_encoder.onnx (pixel_values -> image_embeds) and text_encoder.onnx (input_ids -> text_embeds),
    both L2-normalised, batch dimension dynamic; onnx_config.json says how to feed them."""
    import warnings

    from contrastive.hf_export import uses_clip_bpe, write_tokenizer_files

    if dtype == torch.bfloat16:
        raise UserError("--format onnx takes --dtype fp32 or fp16 (ONNX runtimes rarely run bf16)")
    try:
        import onnx  # noqa: F401  (torch.onnx.export writes the graph through it)
    except ImportError:
        raise UserError("--format onnx needs the onnx package: pip install onnx (onnxruntime too, for the check)") from None
    model = copy.deepcopy(bundle.model).to(dtype).eval()
    images, texts = _probe_inputs(bundle, batch=2)
    specs = ((_ImageEncoder(model), images.to(dtype), ONNX_IMAGE, "pixel_values", "image_embeds"),
             (_TextEncoder(model), texts, ONNX_TEXT, "input_ids", "text_embeds"))
    for module, example, name, input_name, output_name in specs:
        with warnings.catch_warnings():
            # The TorchScript-based exporter needs no onnxscript and gives a dynamic batch axis directly.
            warnings.simplefilter("ignore")
            torch.onnx.export(module, (example,), str(out / name), dynamo=False, opset_version=17,
                              input_names=[input_name], output_names=[output_name],
                              dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}})
    text_cfg = source.model_cfg.get("text_cfg", {})
    if uses_clip_bpe(text_cfg):  # tokenizer.json: the same ids from the tokenizers library, in any language
        write_tokenizer_files(out, int(text_cfg.get("context_length", 77)))
        tokenizer_note = "CLIP BPE: tokenizer.json here (pad to the context length; ids after <|endoftext|> are ignored)"
    else:
        tokenizer_note = f"open_clip.get_tokenizer for this architecture (text_cfg: {json.dumps(text_cfg)})"
    pp = bundle.preprocess_cfg
    config = {
        "image_encoder": {"file": ONNX_IMAGE, "input": "pixel_values", "output": "image_embeds",
                          "input_shape": ["batch", 3, pp["size"], pp["size"]] if isinstance(pp["size"], int)
                          else ["batch", 3, *pp["size"]], "dtype": str(dtype).replace("torch.", "")},
        "text_encoder": {"file": ONNX_TEXT, "input": "input_ids", "output": "text_embeds",
                         "input_shape": ["batch", int(text_cfg.get("context_length", 77))], "dtype": "int64"},
        "embeddings": "L2-normalised", "logit_scale": float(source.state_dict["logit_scale"].exp().reshape(())),
        "preprocess": {k: list(v) if isinstance(v, tuple) else v for k, v in pp.items()},
        "tokenizer": tokenizer_note, "opset": 17,
    }
    if dtype == torch.float16:
        config["note"] = ("fp16 graph, meant for GPU execution providers; on CPU set onnxruntime's "
                          "graph_optimization_level to ORT_ENABLE_BASIC (its extended CPU fusions crash on fp16)")
    (out / ONNX_CONFIG).write_text(json.dumps(config, indent=2))
    return {"files": [ONNX_IMAGE, ONNX_TEXT, ONNX_CONFIG]}


def check_onnx(out: Path, bundle, *, dtype: torch.dtype) -> float | None:
    """Max abs difference, onnxruntime vs our PyTorch model, at a batch size other than the traced one."""
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    images, texts = _probe_inputs(bundle, batch=3)
    model = copy.deepcopy(bundle.model).to(dtype).eval()
    with torch.no_grad():
        ref_img = model.encode_image(images.to(dtype), normalize=True).float()
        ref_txt = model.encode_text(texts, normalize=True).float()
    options = ort.SessionOptions()
    if dtype == torch.float16:  # onnxruntime's extended CPU fusions crash (SIGSEGV) on fp16 graphs; basic ones do not
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    img = ort.InferenceSession(str(out / ONNX_IMAGE), options, providers=["CPUExecutionProvider"]).run(
        None, {"pixel_values": images.to(dtype).numpy()})[0]
    txt = ort.InferenceSession(str(out / ONNX_TEXT), options, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": texts.numpy()})[0]
    return max(float((torch.from_numpy(img).float() - ref_img).abs().max()),
               float((torch.from_numpy(txt).float() - ref_txt).abs().max()))


def write_embeddings(source: Source, bundle, out: Path, *, data: str | None, batch_size: int,
                     rows_per_file: int, progress: bool) -> dict:
    import importlib

    if not data:
        raise UserError("--format embeddings needs --data SHARDS (e.g. data/val/{00000..00003}.tar)")
    # eval/ builds on contrastive, not the other way round: reach the writer by name, as evaluators do.
    embed = importlib.import_module("contrastive.eval.embed")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    bundle.model.to(device)
    try:
        summary = embed.write_embeddings(bundle, data, out, batch_size=batch_size, rows_per_file=rows_per_file,
                                         progress=progress)
    finally:
        bundle.model.to("cpu")
    return {**summary, "data": data}


# ---------------------------------------------------------------- entry point

def export(model: str | Path, fmt: str, out: str | Path, *, dtype: str = "fp32", overwrite: bool = False,
           data: str | None = None, batch_size: int = 256, rows_per_file: int = 1_000_000, check: bool = True,
           progress: bool = True) -> dict:
    """Export `model` (run dir, checkpoint dir or open_clip export) as `fmt` into `out`; returns the summary
    that is also written to OUT/export.json."""
    from contrastive.model_card import write_model_card

    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if dtype not in DTYPES:
        raise UserError(f"unknown --dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if fmt == "embeddings" and dtype != "fp32":
        raise UserError("--format embeddings is always written as float16 vectors (clip-retrieval's layout); "
                        "leave --dtype at fp32")
    if fmt == "embeddings" and not data:
        raise UserError("--format embeddings needs --data SHARDS (e.g. data/val/{00000..00003}.tar)")
    out = Path(out)
    source = load_source(model)
    _check_out(out, source.path, overwrite)
    if fmt == "hf":  # refuse before any work, with the reason
        from contrastive.hf_export import check_representable

        check_representable(source.model_cfg, source.preprocess_cfg)
    bundle = build_bundle(source)
    torch_dtype = DTYPES[dtype]
    stage = _stage_dir(out)
    try:
        _remove_stale_stages(out)
        shutil.rmtree(stage, ignore_errors=True)
        stage.mkdir(parents=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror}: {e.filename})") from None
    try:
        summary: dict[str, Any] = {"format": fmt, "source": str(source.path), "dtype": dtype, "out": str(out)}
        if fmt == "open_clip":
            summary.update(write_open_clip(source, bundle, stage, dtype=torch_dtype))
            if check:
                summary["check_max_abs_diff"] = check_open_clip(stage, bundle)
        elif fmt == "hf":
            from contrastive.hf_export import write_hf

            write_hf(open_clip_layout(source.state_dict), source.model_cfg, bundle.preprocess_cfg, stage,
                     dtype=torch_dtype)
            summary["files"] = sorted(p.name for p in stage.iterdir())
            if check:
                summary["check_max_abs_diff"] = check_hf(stage, bundle)
        elif fmt == "onnx":
            summary.update(write_onnx(source, bundle, stage, dtype=torch_dtype))
            if check:
                summary["check_max_abs_diff"] = check_onnx(stage, bundle, dtype=torch_dtype)
        else:
            summary.update(write_embeddings(source, bundle, stage, data=data, batch_size=batch_size,
                                            rows_per_file=rows_per_file, progress=progress))
        diff = summary.get("check_max_abs_diff")
        tol = CHECK_TOL if torch_dtype == torch.float32 else 5e-2
        if diff is not None and diff > tol:
            raise RuntimeError(f"the {fmt} export differs from the model by {diff:.2e} (> {tol:g}); nothing was written")
        summary["training_state"] = {k: v for k, v in source.state.items() if isinstance(v, (int, float, str))}
        summary["training_config"] = source.config_yaml
        (stage / SUMMARY).write_text(json.dumps(summary, indent=2))
        write_model_card(stage / CARD, source=source, bundle=bundle, summary=summary)
        _publish(stage, out)
    except BaseException as e:
        shutil.rmtree(stage, ignore_errors=True)
        if isinstance(e, OSError) and e.errno in _USER_ERRNOS:
            raise UserError(f"export to {out} failed: {e.strerror} ({e.filename or stage}); nothing was written") from None
        raise
    return summary
