"""open_clip ViT dual encoders as transformers' CLIPModel + CLIPProcessor: the exactness check and the mapping.

CLIPModel computes exactly what an open_clip `CLIP` with its built-in VisionTransformer and TextTransformer
computes when: the image tower pools the class token after ln_post and projects without bias; the text
tower is causal, pools the first end-of-text token (open_clip's argmax over CLIP BPE ids finds the same
position, as 49407 is the largest id) and projects without bias; blocks are plain pre-LN attention + MLP
with GELU or QuickGELU. Models whose image tower is one of our conv trunks (contrastive/towers.py), which
CLIPModel cannot hold, are written as contrastive/hf_modeling.py's ContrastiveCLIPModel with its code beside the
weights (transformers' remote-code layout). Anything else is refused with the reason, never exported approximately.
"""
from __future__ import annotations

import copy
import functools
import json
import re
import shutil
from pathlib import Path

import torch

from contrastive.errors import UserError

BOS_ID, EOS_ID, CLIP_VOCAB_SIZE = 49406, 49407, 49408
HF_BOS, HF_EOS = "<|startoftext|>", "<|endoftext|>"
_CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
# Written beside the weights of a conv-tower model (contrastive/hf_modeling.py, contrastive/towers.py).
REMOTE_MODELING_FILE, TOWERS_FILE = "modeling_contrastive_clip.py", "contrastive_towers.py"
_RESAMPLE = {"bicubic": 3, "bilinear": 2, "nearest": 0}  # PIL resampling codes, as CLIPImageProcessor stores them


class NotRepresentable(UserError):
    """The architecture has a part that CLIPModel cannot hold exactly."""


def _resolved(model_cfg: dict) -> tuple[object, object]:
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg

    try:
        vision = CLIPVisionCfg(**model_cfg.get("vision_cfg", {}))
        text = CLIPTextCfg(**model_cfg.get("text_cfg", {}))
    except TypeError as e:
        raise NotRepresentable(f"the architecture has a key open_clip does not know: {e}") from None
    return vision, text


def _layer_norm_eps(norm_kwargs: dict | None, tower: str) -> float:
    norm_kwargs = dict(norm_kwargs or {})
    eps = norm_kwargs.pop("eps", 1e-5)
    if norm_kwargs:
        raise NotRepresentable(f"the {tower} tower's LayerNorm has options {sorted(norm_kwargs)} that CLIPModel lacks")
    return float(eps)


def _square(value, what: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise NotRepresentable(f"{what} {tuple(value)} is not square; CLIPModel takes one side length")
        value = value[0]
    return int(value)


def check_representable(model_cfg: dict, preprocess_cfg: dict | None = None) -> None:
    """Raise NotRepresentable (a UserError) saying why CLIPModel/CLIPProcessor cannot reproduce this model."""
    why = _reasons(model_cfg, preprocess_cfg or {})
    if why:
        raise NotRepresentable(f"cannot export to transformers' CLIPModel: {why[0]}"
                               + (f" (and {len(why) - 1} more)" if len(why) > 1 else "")
                               + "; export --format open_clip or onnx instead")


def _reasons(model_cfg: dict, preprocess_cfg: dict) -> list[str]:
    why = []
    if "multimodal_cfg" in model_cfg:
        why.append("it is a CoCa model (captioning decoder)")
    if model_cfg.get("init_logit_bias") is not None:
        why.append("it has a learned logit bias (SigLIP-style) and CLIPModel's logits have none")
    try:
        vision, text = _resolved(model_cfg)
    except NotRepresentable as e:
        return why + [str(e)]
    if vision.timm_model_name:
        why += _conv_tower_reasons(vision)
    elif isinstance(vision.layers, (list, tuple)):
        why.append("the image tower is a ModifiedResNet, not a ViT")
    else:
        if vision.attentional_pool:
            why.append("the image tower pools with attention (attentional_pool)")
        if vision.pool_type != "tok":
            why.append(f"the image tower pools {vision.pool_type!r}; CLIPModel takes the class token")
        if vision.no_ln_pre:
            why.append("the image tower has no ln_pre; CLIPModel always applies pre_layrnorm")
        if vision.ls_init_value is not None:
            why.append("the image tower uses LayerScale (ls_init_value)")
        if vision.pos_embed_type not in ("learnable", "sin_cos_2d"):
            why.append(f"the image tower's position embedding is {vision.pos_embed_type!r}")
        if vision.block_type not in (None, "default") or any(getattr(vision, f) for f in _CUSTOM_BLOCK_FLAGS):
            why.append("the image tower uses custom attention blocks (qk_norm, scaled attention or extra norms)")
        if vision.act_kwargs:
            why.append("the image tower's activation has extra arguments (act_kwargs)")
        if (vision.width * vision.mlp_ratio) % 1:
            why.append(f"the image tower's MLP width {vision.width} x {vision.mlp_ratio} is not an integer")
        if vision.width % vision.head_width:
            why.append(f"the image tower's width {vision.width} is not a multiple of head_width {vision.head_width}")
        for what, value in (("image size", vision.image_size), ("patch size", vision.patch_size)):
            if isinstance(value, (list, tuple)) and len(set(value)) != 1:
                why.append(f"the {what} {tuple(value)} is not square")
        try:
            _layer_norm_eps(vision.norm_kwargs, "image")
        except NotRepresentable as e:
            why.append(str(e))
    if text.hf_model_name:
        why.append(f"the text tower is the Hugging Face model {text.hf_model_name!r}, not open_clip's transformer")
    else:
        if text.hf_tokenizer_name:
            why.append(f"the tokenizer is {text.hf_tokenizer_name!r}, not CLIP's BPE")
        kwargs = dict(text.tokenizer_kwargs or {})
        if kwargs.get("clean", "lower") != "lower" or kwargs.get("reduction_mask"):
            why.append(f"the tokenizer cleans text differently from CLIPTokenizer ({kwargs})")
        if text.vocab_size != CLIP_VOCAB_SIZE:
            why.append(f"the vocabulary has {text.vocab_size} tokens, not CLIP's BPE {CLIP_VOCAB_SIZE}")
        if text.embed_cls:
            why.append("the text tower appends a class token (embed_cls)")
        if text.no_causal_mask:
            why.append("the text tower is not causal; CLIPModel's text encoder always is")
        if not (text.pool_type == "argmax" or (text.pool_type == "eos" and text.eos_id == EOS_ID)):
            why.append(f"the text tower pools {text.pool_type!r}; CLIPModel takes the end-of-text token")
        if text.proj_type != "linear" or text.proj_bias:
            why.append("the text projection is not a bias-free linear map")
        if text.ls_init_value is not None:
            why.append("the text tower uses LayerScale (ls_init_value)")
        if text.block_type not in (None, "default") or any(getattr(text, f) for f in _CUSTOM_BLOCK_FLAGS):
            why.append("the text tower uses custom attention blocks (qk_norm, scaled attention or extra norms)")
        if text.act_kwargs:
            why.append("the text tower's activation has extra arguments (act_kwargs)")
        if (text.width * text.mlp_ratio) % 1 or text.width % text.heads:
            why.append(f"the text tower's width {text.width} does not split into {text.heads} heads and an integer MLP")
        try:
            _layer_norm_eps(text.norm_kwargs, "text")
        except NotRepresentable as e:
            why.append(str(e))
    if preprocess_cfg.get("resize_mode", "shortest") not in ("shortest", "squash"):
        why.append(f"CLIPImageProcessor cannot resize with mode {preprocess_cfg['resize_mode']!r} (letterboxing)")
    if preprocess_cfg.get("interpolation", "bicubic") not in _RESAMPLE:
        why.append(f"CLIPImageProcessor has no {preprocess_cfg['interpolation']!r} interpolation")
    return why


def is_conv_tower(model_cfg: dict) -> bool:
    """Whether the image tower is one of contrastive/towers.py's trunks (exported with contrastive/hf_modeling.py)."""
    from contrastive.towers import TOWER_ARGS

    return model_cfg.get("vision_cfg", {}).get("timm_model_name") in TOWER_ARGS


def _conv_tower_reasons(vision) -> list[str]:
    from contrastive.towers import TOWER_ARGS

    if vision.timm_model_name not in TOWER_ARGS:
        return [f"the image tower is the timm model {vision.timm_model_name!r}, neither open_clip's ViT nor one of "
                f"our conv trunks ({', '.join(TOWER_ARGS)})"]
    why = []
    if vision.timm_pool != "avg":
        why.append(f"the conv image tower pools {vision.timm_pool!r}; the exported model averages")
    if vision.timm_proj != "linear":
        why.append(f"the conv image tower's projection is {vision.timm_proj!r}; the exported model's is linear")
    return why


def _text_config(model_cfg: dict, text) -> dict:
    return dict(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=int(text.width * text.mlp_ratio),
        projection_dim=int(model_cfg["embed_dim"]), num_hidden_layers=text.layers, num_attention_heads=text.heads,
        max_position_embeddings=text.context_length,
        hidden_act="quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu",
        layer_norm_eps=_layer_norm_eps(text.norm_kwargs, "text"),
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)


def clip_config(model_cfg: dict, *, logit_scale: float, dtype: torch.dtype = torch.float32):
    """The transformers CLIPConfig of an open_clip architecture (call check_representable first)."""
    from transformers import CLIPConfig

    vision, text = _resolved(model_cfg)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    text_config = _text_config(model_cfg, text)
    vision_config = dict(
        hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio), projection_dim=embed_dim,
        num_hidden_layers=vision.layers, num_attention_heads=vision.width // vision.head_width,
        image_size=_square(vision.image_size, "image size"), patch_size=_square(vision.patch_size, "patch size"),
        hidden_act=act, layer_norm_eps=_layer_norm_eps(vision.norm_kwargs, "image"))
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                        logit_scale_init_value=float(logit_scale))
    config.dtype = dtype
    return config


def conv_clip_config(model_cfg: dict, *, logit_scale: float, dtype: torch.dtype = torch.float32):
    """The ContrastiveCLIPConfig (contrastive/hf_modeling.py) of an architecture with one of our conv image towers,
    its auto_map pointing at the modeling file written beside the weights."""
    from contrastive.hf_modeling import ContrastiveCLIPConfig
    from contrastive.towers import TOWER_ARGS

    vision, text = _resolved(model_cfg)
    config = ContrastiveCLIPConfig(
        text_config=_text_config(model_cfg, text),
        vision_config={**TOWER_ARGS[vision.timm_model_name], "proj_bias": bool(vision.timm_proj_bias)},
        projection_dim=int(model_cfg["embed_dim"]), logit_scale_init_value=float(logit_scale))
    module = Path(REMOTE_MODELING_FILE).stem
    config.auto_map = {"AutoConfig": f"{module}.ContrastiveCLIPConfig", "AutoModel": f"{module}.ContrastiveCLIPModel"}
    config.architectures = ["ContrastiveCLIPModel"]
    config.dtype = dtype
    return config


# ---------------------------------------------------------------- weights

_BLOCK = {
    "ln_1.weight": "layer_norm1.weight", "ln_1.bias": "layer_norm1.bias",
    "ln_2.weight": "layer_norm2.weight", "ln_2.bias": "layer_norm2.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight", "attn.out_proj.bias": "self_attn.out_proj.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight", "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight", "mlp.c_proj.bias": "mlp.fc2.bias",
}
_VISION = {
    "conv1.weight": "embeddings.patch_embedding.weight", "class_embedding": "embeddings.class_embedding",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_pre.weight": "pre_layrnorm.weight", "ln_pre.bias": "pre_layrnorm.bias",
    "ln_post.weight": "post_layernorm.weight", "ln_post.bias": "post_layernorm.bias",
}
_TEXT = {
    "token_embedding.weight": "embeddings.token_embedding.weight",
    "positional_embedding": "embeddings.position_embedding.weight",
    "ln_final.weight": "final_layer_norm.weight", "ln_final.bias": "final_layer_norm.bias",
}
_RESBLOCK = re.compile(r"transformer\.resblocks\.(\d+)\.(.+)")


def _tower(sd: dict, prefix: str, hf_prefix: str, names: dict, out: dict) -> set:
    """Map one tower's tensors (keys under `prefix`) into `out`; returns the source keys it used."""
    used = set()
    for key, value in sd.items():
        if not key.startswith(prefix):
            continue
        name = key[len(prefix):]
        if name in names:
            out[hf_prefix + names[name]] = value
        elif m := _RESBLOCK.fullmatch(name):
            layer, rest = m.groups()
            base = f"{hf_prefix}encoder.layers.{layer}."
            if rest in ("attn.in_proj_weight", "attn.in_proj_bias"):
                kind = "weight" if rest.endswith("weight") else "bias"
                q, k, v = value.chunk(3, dim=0)
                out.update({f"{base}self_attn.q_proj.{kind}": q, f"{base}self_attn.k_proj.{kind}": k,
                            f"{base}self_attn.v_proj.{kind}": v})
            elif rest in _BLOCK:
                out[base + _BLOCK[rest]] = value
            else:
                continue
        else:
            continue
        used.add(key)
    return used


def _text_and_scale(sd: dict[str, torch.Tensor], out: dict) -> set:
    """The text tower, its projection and the logit scale into CLIPModel's names; returns the keys used."""
    text_prefix = "text." if any(k.startswith("text.") for k in sd) else ""
    text_sd = {k: v for k, v in sd.items() if k.startswith(text_prefix) and not k.startswith("visual.")}
    used = _tower(text_sd, text_prefix, "text_model.", _TEXT, out)
    out["text_projection.weight"] = sd[text_prefix + "text_projection"].t()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    return used | {text_prefix + "text_projection", "logit_scale"}


def to_hf_state_dict(sd: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """open_clip CLIP / CustomTextCLIP tensor names -> CLIPModel names (or, for one of our conv image towers,
    ContrastiveCLIPModel's: the trunk as it is, the head's projection as vision_model.proj). Every source tensor
    must be used."""
    out: dict[str, torch.Tensor] = {}
    used = _text_and_scale(sd, out)
    if is_conv_tower(model_cfg):
        for key, value in sd.items():
            for ours, theirs in (("visual.trunk.", "vision_model.trunk."), ("visual.head.proj.", "vision_model.proj.")):
                if key.startswith(ours):
                    out[theirs + key[len(ours):]] = value
                    used.add(key)
    else:
        used |= _tower(sd, "visual.", "vision_model.", _VISION, out)
        out["visual_projection.weight"] = sd["visual.proj"].t()
        used.add("visual.proj")
    unused = sorted(set(sd) - used)
    if unused:
        raise NotRepresentable(f"cannot export to transformers' CLIPModel: tensors {unused[:4]} have no place in it")
    return {k: v.contiguous() for k, v in out.items()}


# ---------------------------------------------------------------- tokenizer and image processor

def uses_clip_bpe(text_cfg: dict) -> bool:
    """Whether open_clip tokenizes this text tower with CLIP's BPE exactly as CLIPTokenizer does."""
    kwargs = dict(text_cfg.get("tokenizer_kwargs") or {})
    return (not text_cfg.get("hf_model_name") and not text_cfg.get("hf_tokenizer_name")
            and int(text_cfg.get("vocab_size", CLIP_VOCAB_SIZE)) == CLIP_VOCAB_SIZE
            and kwargs.get("clean", "lower") == "lower" and not kwargs.get("reduction_mask"))


@functools.lru_cache(maxsize=1)
def clip_bpe_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's BPE vocabulary and merges, rebuilt from the file open_clip ships (no download)."""
    import gzip

    from open_clip.tokenizer import bytes_to_unicode, default_bpe

    lines = gzip.open(default_bpe()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
    tokens = list(bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges] + [HF_BOS, HF_EOS]
    vocab = {t: i for i, t in enumerate(tokens)}
    assert vocab[HF_EOS] == EOS_ID and len(vocab) == CLIP_VOCAB_SIZE
    return vocab, merges


def build_tokenizer(context_length: int):
    """A CLIPTokenizer giving open_clip SimpleTokenizer's ids (open_clip pads with 0, CLIPTokenizer with
    <|endoftext|>; neither changes the embedding, which is read at the first end-of-text token)."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_bpe_vocab()
    return CLIPTokenizer(vocab=dict(vocab), merges=list(merges), model_max_length=context_length)


def write_tokenizer_files(out: Path, context_length: int) -> None:
    """tokenizer.json etc. (transformers, tokenizers in any language) plus vocab.json/merges.txt (older loaders)."""
    build_tokenizer(context_length).save_pretrained(str(out))
    _write_bpe_files(out)


def _write_bpe_files(out: Path) -> None:
    vocab, merges = clip_bpe_vocab()
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")


def image_processor(preprocess_cfg: dict):
    """The CLIPImageProcessor doing open_clip's evaluation transform (resize, centre crop, normalise)."""
    from transformers import CLIPImageProcessor

    side = _square(preprocess_cfg.get("size", 224), "preprocess size")
    squash = preprocess_cfg.get("resize_mode", "shortest") == "squash"
    return CLIPImageProcessor(
        do_resize=True, size={"height": side, "width": side} if squash else {"shortest_edge": side},
        resample=_RESAMPLE[preprocess_cfg.get("interpolation", "bicubic")],
        do_center_crop=not squash, crop_size={"height": side, "width": side},
        do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
        image_mean=list(preprocess_cfg["mean"]), image_std=list(preprocess_cfg["std"]), do_convert_rgb=True)


def write_hf(sd: dict[str, torch.Tensor], model_cfg: dict, preprocess_cfg: dict, out: Path, *,
             dtype: torch.dtype = torch.float32) -> None:
    """Write a directory that CLIPModel.from_pretrained and CLIPProcessor.from_pretrained load."""
    from transformers import CLIPModel, CLIPProcessor
    from transformers.utils import logging as hf_logging

    check_representable(model_cfg, preprocess_cfg)
    hf_sd = to_hf_state_dict(sd, model_cfg)
    conv = is_conv_tower(model_cfg)
    config = (conv_clip_config if conv else clip_config)(model_cfg, logit_scale=float(hf_sd["logit_scale"]), dtype=dtype)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # CLIPModel's random init warnings are noise: every weight is replaced
    try:
        if conv:
            from contrastive.hf_modeling import ContrastiveCLIPModel

            model = ContrastiveCLIPModel(copy.deepcopy(config)).eval()
        else:
            model = CLIPModel(copy.deepcopy(config)).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    if missing or unexpected:
        raise NotRepresentable(f"cannot export to transformers' CLIPModel: weights do not line up "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    if conv:  # the model's code travels with it: AutoModel(trust_remote_code=True) needs neither us nor timm
        import contrastive.hf_modeling
        import contrastive.towers

        shutil.copyfile(contrastive.hf_modeling.__file__, out / REMOTE_MODELING_FILE)
        shutil.copyfile(contrastive.towers.__file__, out / TOWERS_FILE)
    text_ctx = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    processor = CLIPProcessor(image_processor=image_processor(preprocess_cfg), tokenizer=build_tokenizer(text_ctx))
    processor.save_pretrained(str(out))
    _write_bpe_files(out)
