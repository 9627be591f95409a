"""open_clip ViT dual encoders as transformers' CLIPModel + CLIPProcessor: the exactness check and the mapping.

CLIPModel computes exactly what an open_clip `CLIP` with its built-in VisionTransformer and TextTransformer
computes when: the image tower pools the class token after ln_post and projects without bias; the text
tower is causal, pools the first end-of-text token (open_clip's argmax over CLIP BPE ids finds the same
position, as 49407 is the largest id) and projects without bias; blocks are plain pre-LN attention + MLP
with GELU or QuickGELU. Anything else is refused with the reason, never exported approximately.
"""
from __future__ import annotations

import copy
import functools
import json
import re
from pathlib import Path

import torch

from contrastive.errors import UserError

BOS_ID, EOS_ID, CLIP_VOCAB_SIZE = 49406, 49407, 49408
HF_BOS, HF_EOS = "<|startoftext|>", "<|endoftext|>"
_CUSTOM_BLOCK_FLAGS = ("qk_norm", "scaled_cosine_attn", "scale_heads", "scale_attn_inner", "scale_attn", "scale_fc")
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
        why.append(f"the image tower is the timm model {vision.timm_model_name!r}, not open_clip's ViT")
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


def clip_config(model_cfg: dict, *, logit_scale: float, dtype: torch.dtype = torch.float32):
    """The transformers CLIPConfig of an open_clip architecture (call check_representable first)."""
    from transformers import CLIPConfig

    vision, text = _resolved(model_cfg)
    act = "quick_gelu" if model_cfg.get("quick_gelu", False) else "gelu"
    embed_dim = int(model_cfg["embed_dim"])
    text_config = dict(
        vocab_size=text.vocab_size, hidden_size=text.width, intermediate_size=int(text.width * text.mlp_ratio),
        projection_dim=embed_dim, num_hidden_layers=text.layers, num_attention_heads=text.heads,
        max_position_embeddings=text.context_length, hidden_act=act,
        layer_norm_eps=_layer_norm_eps(text.norm_kwargs, "text"),
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=EOS_ID)
    vision_config = dict(
        hidden_size=vision.width, intermediate_size=int(vision.width * vision.mlp_ratio), projection_dim=embed_dim,
        num_hidden_layers=vision.layers, num_attention_heads=vision.width // vision.head_width,
        image_size=_square(vision.image_size, "image size"), patch_size=_square(vision.patch_size, "patch size"),
        hidden_act=act, layer_norm_eps=_layer_norm_eps(vision.norm_kwargs, "image"))
    config = CLIPConfig(text_config=text_config, vision_config=vision_config, projection_dim=embed_dim,
                        logit_scale_init_value=float(logit_scale))
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


def to_hf_state_dict(sd: dict[str, torch.Tensor], model_cfg: dict) -> dict[str, torch.Tensor]:
    """open_clip CLIP / CustomTextCLIP tensor names -> CLIPModel names. Every source tensor must be used."""
    text_prefix = "text." if any(k.startswith("text.") for k in sd) else ""
    out: dict[str, torch.Tensor] = {}
    used = _tower(sd, "visual.", "vision_model.", _VISION, out)
    text_sd = {k: v for k, v in sd.items() if k.startswith(text_prefix) and not k.startswith("visual.")}
    used |= _tower(text_sd, text_prefix, "text_model.", _TEXT, out)
    out["visual_projection.weight"] = sd["visual.proj"].t()
    out["text_projection.weight"] = sd[text_prefix + "text_projection"].t()
    out["logit_scale"] = sd["logit_scale"].reshape(())
    used |= {"visual.proj", text_prefix + "text_projection", "logit_scale"}
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
    config = clip_config(model_cfg, logit_scale=float(hf_sd["logit_scale"]), dtype=dtype)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # CLIPModel's random init warnings are noise: every weight is replaced
    try:
        model = CLIPModel(copy.deepcopy(config)).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    if missing or unexpected:
        raise NotRepresentable(f"cannot export to transformers' CLIPModel: weights do not line up "
                               f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.to(dtype).save_pretrained(str(out), safe_serialization=True)
    text_ctx = int(model_cfg.get("text_cfg", {}).get("context_length", 77))
    processor = CLIPProcessor(image_processor=image_processor(preprocess_cfg), tokenizer=build_tokenizer(text_ctx))
    processor.save_pretrained(str(out))
    _write_bpe_files(out)
