"""Dual encoders built from open_clip model configs, with their transforms and tokenizer."""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from contrastive.config import ModelConfig
from contrastive.errors import UserError

# Our own model configs, in open_clip's JSON schema; registered with open_clip on first use.
MODEL_CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "models"
_registered = False


def register_model_configs() -> None:
    global _registered
    if _registered:
        return
    import open_clip

    if MODEL_CONFIG_DIR.is_dir():
        open_clip.add_model_config(MODEL_CONFIG_DIR)
    _registered = True


@dataclass
class ModelBundle:
    """What training and evaluation need for one architecture."""

    model: nn.Module
    preprocess_train: Callable
    preprocess_val: Callable
    tokenizer: Callable
    # The open_clip model config (architecture) and preprocess config, as exported.
    model_cfg: dict
    preprocess_cfg: dict


def get_open_clip_config(name: str) -> dict:
    """The open_clip architecture config for `name`, or a UserError listing close matches."""
    import open_clip

    register_model_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        names = open_clip.list_models()
        close = [n for n in names if name.lower().split("-")[0] in n.lower()][:8] or names[:8]
        raise UserError(f"model.name {name!r} is not an open_clip model config; e.g. {', '.join(close)} "
                        f"(ours are in {MODEL_CONFIG_DIR})")
    return copy.deepcopy(cfg)


def build_model(cfg: ModelConfig, *, model_cfg: dict | None = None, preprocess_cfg: dict | None = None,
                pretrained: tuple[dict, dict] | None = None) -> ModelBundle:
    """Build a dual encoder for `cfg.name`, or for an explicit architecture dict (`model_cfg`, as saved beside
    checkpoints) with its saved `preprocess_cfg`. Towers are randomly initialised unless `cfg` names local
    pretrained weights (model.text_pretrained, model.image_pretrained; model.pretrained for both towers, read by
    contrastive.loading.read_pretrained and passed as `pretrained`: (state dict, preprocess config)); `cfg`'s
    lock_* keys lock them (LiT)."""
    import open_clip
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    arch = copy.deepcopy(model_cfg) if model_cfg is not None else get_open_clip_config(cfg.name)
    if cfg.force_quick_gelu:
        arch["quick_gelu"] = True
    if cfg.patch_dropout is not None:
        arch["vision_cfg"]["patch_dropout"] = cfg.patch_dropout
    # DeepSpeed cannot flatten 0-dim parameters (ZeRO views them as bytes), so keep logit scale/bias 1-D.
    arch["nonscalar_logit_scale"] = True
    if cfg.init_logit_bias is not None:
        arch["init_logit_bias"] = cfg.init_logit_bias
    if cfg.init_logit_scale is not None:
        arch["init_logit_scale"] = cfg.init_logit_scale
    if cfg.text_pretrained:
        from contrastive.pretrained import text_cfg_for

        arch["text_cfg"] = text_cfg_for(
            text_pretrained=cfg.text_pretrained, text_tokenizer=cfg.text_tokenizer, pooler=cfg.text_pooler,
            proj=cfg.text_proj, embed_dim=int(arch["embed_dim"]),
            context_length=cfg.text_context_length or int(arch.get("text_cfg", {}).get("context_length", 77)))
    elif cfg.text_context_length:
        arch["text_cfg"]["context_length"] = cfg.text_context_length
    if arch.get("text_cfg", {}).get("hf_model_name"):
        from contrastive.pretrained import check_hf_text_cfg

        check_hf_text_cfg(arch["text_cfg"])  # a hub name becomes its local cache directory, recorded in model_cfg
    model = _instantiate(arch)
    source_preprocess = {}
    if cfg.pretrained:  # before locking: frozen BatchNorm and cached text features start from these weights
        from contrastive.pretrained import load_pretrained

        assert pretrained is not None, "model.pretrained: build with contrastive.loading.build_initialised"
        state, source_preprocess = pretrained
        load_pretrained(model, state, spec=cfg.pretrained, arch_name=cfg.name)
    elif cfg.text_pretrained and not cfg.text_random_init:
        from contrastive.pretrained import load_hf_weights

        load_hf_weights(model.text, arch["text_cfg"]["hf_model_name"])
    if cfg.image_pretrained:
        from contrastive.pretrained import load_timm_weights

        load_timm_weights(model.visual, cfg.image_pretrained)
    lock_towers(model, cfg)
    if cfg.lock_text_cache_size:
        cache_text_features(model, max_entries=cfg.lock_text_cache_size)

    pp_dict = merge_preprocess_dict(PreprocessCfg(), {"size": arch["vision_cfg"].get("image_size", 224)})
    pp_dict = merge_preprocess_dict(pp_dict, getattr(model.visual, "preprocess_cfg", {}))
    for recorded in (source_preprocess, preprocess_cfg):  # the weights were trained with these (mean, std, ...)
        if recorded:
            pp_dict = merge_preprocess_dict(pp_dict, recorded)
    pp = PreprocessCfg(**pp_dict)
    aug = dict(cfg.aug)
    hflip = aug.pop("hflip", 0.0)
    try:
        preprocess_train = image_transform_v2(pp, is_train=True, aug_cfg=aug or None)
    except TypeError as e:
        raise UserError(f"model.aug has an unknown key: {e}") from None
    if hflip:
        preprocess_train = with_hflip(preprocess_train, hflip)
    preprocess_val = image_transform_v2(pp, is_train=False)
    if model_cfg is None and not arch["text_cfg"].get("hf_tokenizer_name"):
        tokenizer = open_clip.get_tokenizer(cfg.name, context_length=arch["text_cfg"].get("context_length"))
    else:
        tokenizer = _tokenizer_for(arch)
    return ModelBundle(model=model, preprocess_train=preprocess_train, preprocess_val=preprocess_val,
                       tokenizer=tokenizer, model_cfg=arch, preprocess_cfg=pp_dict)


def _instantiate(arch: dict) -> nn.Module:
    """Build the open_clip model class for an architecture dict, as open_clip's factory does."""
    from open_clip.model import CLIP, CustomTextCLIP

    arch = copy.deepcopy(arch)
    hf_text = "hf_model_name" in arch.get("text_cfg", {})
    custom_text = arch.pop("custom_text", False) or hf_text
    if hf_text:
        from contrastive.pretrained import check_hf_text_cfg, offline

        offline()
        check_hf_text_cfg(arch["text_cfg"])
        # Weights never come from a hub: load_hf_weights fills them in from the local directory.
        arch["text_cfg"]["hf_model_pretrained"] = False
    if "timm_model_name" in arch.get("vision_cfg", {}):
        import contrastive.towers  # noqa: F401  (registers our small trunks with timm)

        arch["vision_cfg"].setdefault("timm_model_pretrained", False)
    if "multimodal_cfg" in arch:
        raise UserError("CoCa models (multimodal_cfg) are not supported for contrastive training")
    model_class = CustomTextCLIP if custom_text else CLIP
    try:
        model = model_class(**arch, output_dict=True)
    except (OSError, ValueError, TypeError) as e:
        if not hf_text:
            raise
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UserError(f"cannot build the text tower from {arch['text_cfg']['hf_model_name']}: {first}") from None
    batch_norm_in_fp32(model)
    return model


def with_hflip(preprocess: Callable, p: float) -> Callable:
    """`preprocess` (a torchvision Compose) with a horizontal flip of probability `p` after its crop, before
    ToTensor. open_clip never flips (a caption may say left or right); model.aug.hflip turns it on for data
    whose captions do not, such as class templates."""
    from torchvision import transforms as T

    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise UserError(f"model.aug.hflip is a probability between 0 and 1, got {p!r}")
    steps = list(getattr(preprocess, "transforms", []))
    at = next((i for i, t in enumerate(steps) if type(t).__name__ in ("ToTensor", "MaybeToTensor")), None)
    if not isinstance(preprocess, T.Compose) or at is None:
        raise UserError("model.aug.hflip needs a train transform that ends in ToTensor (+ Normalize)")
    return T.Compose(steps[:at] + [T.RandomHorizontalFlip(float(p))] + steps[at:])


def _tokenizer_for(arch: dict) -> Callable:
    import open_clip

    text_cfg = arch.get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        from open_clip.tokenizer import HFTokenizer

        from contrastive.pretrained import offline

        offline()
        name = text_cfg["hf_tokenizer_name"]
        try:
            return HFTokenizer(name, context_length=text_cfg.get("context_length", 77),
                                         local_files_only=True, **(text_cfg.get("tokenizer_kwargs") or {}))
        except (OSError, ValueError, TypeError) as e:
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise UserError(f"cannot load the tokenizer in {name}: {first}") from None
    return open_clip.SimpleTokenizer(context_length=text_cfg.get("context_length", 77))


# ---------------------------------------------------------------- BatchNorm under half precision

class _AffineInStatsDtype:
    """BatchNorm that computes in the dtype of its running statistics when its weight has another one.

    DeepSpeed's bf16/fp16 modes cast parameters to half precision but leave buffers in fp32, and torch's
    batch_norm takes one dtype throughout, or bf16/fp16 activations with fp32 weight, bias and statistics (its
    mixed kernels compute in fp32; amp_bf16's autocast hands it exactly that). So the affine parameters join in
    fp32, as apex's keep_batchnorm_fp32 has it: statistics are accumulated and kept in fp32, activations keep
    their dtype, and the half-precision parameters get their gradients through the cast. With one dtype
    throughout (fp32, amp_bf16, a model cast whole for export) it is torch's forward, bit for bit.
    CUDA's batch_norm (cuDNN and native) takes the same mixed dtypes; tests/test_precision.py runs it on CPU
    only, and no GPU check trains a conv tower yet.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.running_mean.dtype if self.running_mean is not None else torch.float32
        if self.weight is None or self.weight.dtype == dtype:
            return super().forward(x)
        # torch's _BatchNorm.forward, with the weight and bias cast.
        self._check_input_dim(x)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average
                momentum = 1.0 / float(self.num_batches_tracked)
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        pass_stats = not self.training or self.track_running_stats
        return nn.functional.batch_norm(
            x, self.running_mean if pass_stats else None, self.running_var if pass_stats else None,
            self.weight.to(dtype), None if self.bias is None else self.bias.to(dtype), use_batch_stats, momentum,
            self.eps)


class BatchNorm1d(_AffineInStatsDtype, nn.BatchNorm1d):
    pass


class BatchNorm2d(_AffineInStatsDtype, nn.BatchNorm2d):
    pass


class BatchNorm3d(_AffineInStatsDtype, nn.BatchNorm3d):
    pass


_BATCH_NORM_IN_FP32 = {nn.BatchNorm1d: BatchNorm1d, nn.BatchNorm2d: BatchNorm2d, nn.BatchNorm3d: BatchNorm3d}


def batch_norm_in_fp32(model: nn.Module) -> None:
    """Make torch's BatchNorm layers of `model` (ours, timm's, open_clip's ResNets) compute in fp32 when the
    engine casts their parameters to bf16/fp16 (see _AffineInStatsDtype); state dicts are unchanged."""
    for module in model.modules():
        if type(module) in _BATCH_NORM_IN_FP32:
            module.__class__ = _BATCH_NORM_IN_FP32[type(module)]


# ---------------------------------------------------------------- locking (LiT)

@functools.cache
def frozen_batch_norm_class() -> type:
    """open_clip's frozen BatchNorm (running statistics and affine fixed, also in train mode), keeping
    BatchNorm2d's state-dict keys so that a checkpoint trained with frozen BN statistics loads into the plain
    model, which computes the same in eval mode. (Built lazily: torchvision is slow to import.)"""
    from torchvision.ops.misc import FrozenBatchNorm2d

    class FrozenBatchNorm2dWithCount(FrozenBatchNorm2d):
        def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
            nn.Module._load_from_state_dict(self, state_dict, prefix, *args, **kwargs)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # Its statistics and affine are buffers, which DeepSpeed's bf16/fp16 modes leave in fp32: computed
            # in fp32, the result goes on in the activations' dtype (the next convolution's weight dtype).
            return super().forward(x).to(x.dtype)

    return FrozenBatchNorm2dWithCount


def lock_towers(model: nn.Module, cfg: ModelConfig) -> None:
    """Lock towers as open_clip's --lock-image / --lock-text do: the image tower (all but the last N layer
    groups, optionally freezing BatchNorm statistics) and the text tower (all but the last N layers; LayerNorm
    affine parameters frozen too when lock_text_freeze_layer_norm, as LayerNorm keeps no running statistics)."""
    if cfg.lock_image:
        counts = {n: m.num_batches_tracked.clone() for n, m in model.visual.named_modules()
                  if isinstance(m, nn.BatchNorm2d) and m.num_batches_tracked is not None}
        try:
            model.lock_image_tower(unlocked_groups=cfg.lock_image_unlocked_groups,
                                   freeze_bn_stats=cfg.lock_image_freeze_bn_stats)
        except (IndexError, KeyError, RuntimeError) as e:
            raise UserError(f"model.lock_image_unlocked_groups={cfg.lock_image_unlocked_groups} does not fit the "
                            f"image tower ({type(model.visual).__name__}): {e}") from None
        frozen = frozen_batch_norm_class()
        for name, module in model.visual.named_modules():
            if type(module) is frozen.__bases__[0]:
                module.__class__ = frozen
                module.register_buffer("num_batches_tracked", counts.get(name, torch.tensor(0, dtype=torch.long)))
    if cfg.lock_text:
        text = getattr(model, "text", None)
        layers = cfg.lock_text_unlocked_layers
        if text is not None and hasattr(text, "transformer") and hasattr(text, "config"):  # HF text tower
            num_layers = getattr(text.config, "num_hidden_layers", None)
            if num_layers is not None and layers > num_layers + 1:
                raise UserError(f"model.lock_text_unlocked_layers={layers} exceeds the text tower's "
                                f"{num_layers} layers + embeddings")
            text.lock(unlocked_layers=layers, freeze_layer_norm=cfg.lock_text_freeze_layer_norm)
        else:
            from open_clip.transformer import lock_text_tower

            lock_text_tower(model, layers)
            if not cfg.lock_text_freeze_layer_norm:
                for module in _text_modules(model):
                    for sub in module.modules():
                        if isinstance(sub, nn.LayerNorm):
                            sub.requires_grad_(True)


class TextFeatureCache:
    """Pooled features of a fully locked HF text tower per distinct token sequence, computed once in eval mode
    (no dropout), as LiT precomputes a locked tower's outputs; the oldest entries go beyond `max_entries`."""

    def __init__(self, tower: nn.Module, max_entries: int):
        self.tower, self.max_entries = tower, max_entries
        self.features: dict[bytes, torch.Tensor] = {}
        self.hits = self.misses = 0

    def pooled(self, ids_BL: torch.Tensor) -> torch.Tensor:
        """(B, width) pooled features of token ids (B, L), before the trainable projection."""
        uniq_UL, inverse_B = torch.unique(ids_BL, dim=0, return_inverse=True)
        keys = [row.tobytes() for row in uniq_UL.cpu().numpy()]
        new = [i for i, k in enumerate(keys) if k not in self.features]
        self.hits += len(keys) - len(new)
        self.misses += len(new)
        fresh = {}
        if new:
            transformer = self.tower.transformer
            if any(hasattr(p, "ds_id") for p in transformer.parameters()):
                raise UserError("model.lock_text_cache_size does not work under ZeRO-3 (ranks would gather the text "
                                "tower's weights at different steps); use deepspeed.zero_stage 0-2 or turn it off")
            was_training = transformer.training
            transformer.eval()
            try:
                with torch.no_grad():
                    ids = uniq_UL[new]
                    mask = (ids != self.tower.config.pad_token_id).long()
                    rows = self.tower.pooler(transformer(input_ids=ids, attention_mask=mask), mask)
            finally:
                transformer.train(was_training)
            fresh = {keys[i]: row for i, row in zip(new, rows)}
        pooled_UD = torch.stack([fresh[k] if k in fresh else self.features[k] for k in keys])
        if fresh:
            self.features.update(fresh)
            for key in list(self.features)[:max(0, len(self.features) - self.max_entries)]:
                del self.features[key]
        return pooled_UD[inverse_B]


def cache_text_features(model: nn.Module, *, max_entries: int) -> TextFeatureCache:
    """Make a fully locked HF text tower (see lock_towers) serve pooled features from a TextFeatureCache; only
    its projection runs per step. The state dict is unchanged."""
    text = getattr(model, "text", None)
    if text is None or not hasattr(text, "transformer") or not hasattr(text, "config"):
        raise UserError("model.lock_text_cache_size needs a Hugging Face text tower (model.text_pretrained)")
    if any(p.requires_grad for p in text.transformer.parameters()):
        raise UserError("model.lock_text_cache_size needs the whole text transformer locked")
    if text.output_tokens:
        raise UserError("model.lock_text_cache_size cannot serve token outputs (text_cfg.output_tokens)")
    cache = TextFeatureCache(text, max_entries)
    text.feature_cache = cache
    text.forward = lambda x: text.proj(cache.pooled(x))
    return cache


def _text_modules(model: nn.Module) -> list[nn.Module]:
    """The modules of open_clip's own text tower, nested (CustomTextCLIP) or unpacked onto CLIP."""
    if hasattr(model, "text"):
        return [model.text]
    return [m for m in (getattr(model, n, None) for n in ("token_embedding", "transformer", "ln_final"))
            if isinstance(m, nn.Module)]


def embed_dim(model: nn.Module) -> int:
    return int(model.text_projection.shape[-1] if hasattr(model, "text_projection") and model.text_projection is not None
               else model.visual.output_dim)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no weight decay on gains, biases, embeddings of positions and the logit scale/bias."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name or "logit_scale" in name \
                or "positional_embedding" in name or "class_embedding" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
