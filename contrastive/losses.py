"""Contrastive losses over the global batch; each takes features, logit scale and the process group.

Letters in names: B local batch, G global batch (world_size * B), D embedding dim.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from contrastive.distributed import all_gather_with_grad


def _rank(group) -> int:
    if group is None and not (dist.is_available() and dist.is_initialized()):
        return 0
    return dist.get_rank(group)


def infonce(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: torch.Tensor,
            logit_bias: torch.Tensor | None = None, *, group=None, label_smoothing: float = 0.0) -> torch.Tensor:
    """Symmetric CLIP InfoNCE with all-gathered negatives, local-loss form.

    Each rank scores its own B images against all G texts (and its B texts against all G images);
    the mean of the per-rank losses equals the single-process loss on the concatenated batch.
    `logit_scale` is exp()'d already (the temperature's inverse), shape () or (1,); `logit_bias` is unused
    (InfoNCE is invariant to it) and accepted so every loss has the same signature.
    """
    image_GD = all_gather_with_grad(image_BD, group)
    text_GD = all_gather_with_grad(text_BD, group)
    scale = logit_scale.reshape(())
    logits_img_BG = scale * image_BD @ text_GD.T
    logits_txt_BG = scale * text_BD @ image_GD.T
    offset = _rank(group) * image_BD.shape[0]
    labels_B = torch.arange(offset, offset + image_BD.shape[0], device=image_BD.device)
    return 0.5 * (F.cross_entropy(logits_img_BG, labels_B, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_txt_BG, labels_B, label_smoothing=label_smoothing))


def build_loss(cfg):
    """The loss function selected by `loss.name`, with its own options bound."""
    from functools import partial

    if cfg.name == "infonce":
        return partial(infonce, label_smoothing=cfg.label_smoothing)
    raise ValueError(f"unknown loss {cfg.name!r}")
