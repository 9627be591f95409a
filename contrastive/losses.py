"""Contrastive losses over the global batch; each takes features, logit scale (and bias) and the process group.

Letters in names: B local batch (per rank), G global batch (world_size * B), D embedding dim,
R and C the rows and columns of one tile of the logits matrix.

Every loss returns this rank's local loss; the mean over ranks is the loss of a single process on the
concatenated batch, and the gradients each rank gets (after DDP/DeepSpeed average them over ranks) are
that single process's gradients.
"""
from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from contrastive.distributed import (all_gather_no_grad, all_gather_with_grad, all_reduce_softmax_stats_,
                                     neighbour_shift_with_grad, rank_and_world_size)
from contrastive.errors import UserError


def _rank(group) -> int:
    return rank_and_world_size(group)[0]


@functools.lru_cache(maxsize=8)
def _caption_key_weights(length: int) -> torch.Tensor:
    return torch.randint(-2**62, 2**62, (length,), generator=torch.Generator().manual_seed(0))


def caption_keys(tokens_BL: torch.Tensor) -> torch.Tensor:
    """One int64 key per caption: equal token rows give equal keys (a fixed random polynomial hash, wrapping in
    int64; two different captions of a batch collide with probability ~B^2 / 2^64). Computed on the CPU: pass
    the loader's CPU tokens where possible, so no device-to-host copy is needed."""
    return (tokens_BL.long().cpu() * _caption_key_weights(tokens_BL.shape[-1])).sum(-1).to(tokens_BL.device)


def class_keys(tokens_BL: torch.Tensor, classes_B: torch.Tensor) -> torch.Tensor:
    """Keys for loss.positives=class: a sample's class id where it has one (>= 0), its caption's key elsewhere."""
    classes_B = classes_B.to(tokens_BL.device)
    return torch.where(classes_B >= 0, classes_B, caption_keys(tokens_BL))


def infonce(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: torch.Tensor,
            logit_bias: torch.Tensor | None = None, *, group=None, label_smoothing: float = 0.0,
            positive_keys_B: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric CLIP InfoNCE with all-gathered negatives, local-loss form.

    Each rank scores its own B images against all G texts (and its B texts against all G images);
    the mean of the per-rank losses equals the single-process loss on the concatenated batch.
    `logit_scale` is exp()'d already (the temperature's inverse), shape () or (1,); `logit_bias` is unused
    (InfoNCE is invariant to it) and accepted so every loss has the same signature.

    With `positive_keys_B` (loss.positives=caption or class), pairs with equal keys are positives of each other:
    each row's target is spread evenly over every column with its key, instead of asking the model to tell
    apart texts that are the same string (whose logits are equal, a loss floor of log(copies) and gradients
    that pull each image away from its own caption's duplicates) or captions of the same class (UniCL).
    """
    image_GD = all_gather_with_grad(image_BD, group)
    text_GD = all_gather_with_grad(text_BD, group)
    scale = logit_scale.reshape(())
    logits_img_BG = scale * image_BD @ text_GD.T
    logits_txt_BG = scale * text_BD @ image_GD.T
    if positive_keys_B is not None:
        positives_BG = (positive_keys_B[:, None] == all_gather_no_grad(positive_keys_B, group)[None, :]).float()
        targets_BG = positives_BG / positives_BG.sum(1, keepdim=True)
        return 0.5 * (F.cross_entropy(logits_img_BG, targets_BG, label_smoothing=label_smoothing)
                      + F.cross_entropy(logits_txt_BG, targets_BG, label_smoothing=label_smoothing))
    offset = _rank(group) * image_BD.shape[0]
    labels_B = torch.arange(offset, offset + image_BD.shape[0], device=image_BD.device)
    return 0.5 * (F.cross_entropy(logits_img_BG, labels_B, label_smoothing=label_smoothing)
                  + F.cross_entropy(logits_txt_BG, labels_B, label_smoothing=label_smoothing))


def infonce_tiled(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: torch.Tensor,
                  logit_bias: torch.Tensor | None = None, *, group=None, label_smoothing: float = 0.0,
                  tile_size: int = 2048) -> torch.Tensor:
    """The same loss and gradients as `infonce`, without ever holding a B x G logits matrix.

    Each rank owns the rows of the global logits matrix that belong to its images (B x G): it computes
    them tile by tile (R x C, R = C = `tile_size`) with an online log-sum-exp for both the rows
    (image->text) and the columns (text->image); the per-rank column statistics are combined with two
    all-reduces of G numbers, and backward recomputes the tiles instead of storing them. Only the texts
    are all-gathered. Memory: O((B + G) * D + G + tile_size**2) per rank. Shapes as in `infonce`.
    """
    rank, _ = rank_and_world_size(group)
    text_GD = all_gather_with_grad(text_BD, group)
    loss_img_B, loss_txt_B = _TiledInfoNCE.apply(image_BD, text_GD, logit_scale.reshape(()), group,
                                                 rank * image_BD.shape[0], float(label_smoothing), int(tile_size))
    return 0.5 * (loss_img_B.mean() + loss_txt_B.mean())


def _spans(n: int, size: int):
    return [(start, min(start + size, n)) for start in range(0, n, size)]


def _positives_in_tile(logits_RC: torch.Tensor, *, row0: int, col0: int, offset: int):
    """The entries of a tile (rows from local row `row0`, columns from global column `col0`) that pair
    local image i with global text offset + i, and the local rows they belong to (a range)."""
    diag = logits_RC.diagonal(offset + row0 - col0)
    first_row = row0 + max(0, col0 - offset - row0)
    return diag, first_row, first_row + diag.shape[0]


def _accumulate_softmax_stats_(logits_RC: torch.Tensor, peak: torch.Tensor, total: torch.Tensor, dim: int) -> None:
    """Online softmax statistics along `dim`: `peak` (running max) and `total` (running sum of
    exp(logit - peak)), updated in place with one more tile. Keeping the max apart from the log of the sum
    keeps logit - max exact near the max, as torch's own log_softmax does."""
    new_peak = torch.maximum(peak, logits_RC.amax(dim))
    total.mul_((peak - new_peak).exp_()).add_((logits_RC - new_peak.unsqueeze(dim)).exp_().sum(dim))
    peak.copy_(new_peak)


class _TiledInfoNCE(torch.autograd.Function):
    """Per-sample cross-entropies of this rank's images (against all G texts) and of its texts (against
    all G images), from its B local images and the G gathered texts.

    The global logits matrix is scale * images_GD @ texts_GD.T; this rank holds its rows
    [offset, offset + B). Row terms need only those rows. A column term (text j against all images)
    needs a log-sum-exp over every rank's rows, so each rank reduces its rows per column and the ranks
    combine these. In backward each rank again differentiates only its own rows, but for every column:
    the upstream gradients of all ranks' text terms are all-gathered (G numbers), the text gradient flows
    back through the all-gather to the rank that owns each text, and the per-rank logit-scale gradients
    sum, over ranks, to the full one (as DDP's average then gives the single-process gradient).
    """

    @staticmethod
    def forward(ctx, image_BD, text_GD, scale, group, offset, label_smoothing, tile_size):
        num_local, num_global = image_BD.shape[0], text_GD.shape[0]
        dtype = torch.promote_types(image_BD.dtype, torch.float32)  # fp32 at least, fp64 kept for gradcheck
        images, texts, s = image_BD.to(dtype), text_GD.to(dtype), scale.to(dtype)
        new = dict(dtype=dtype, device=images.device)
        peak_img_B, total_img_B = torch.full((num_local,), -math.inf, **new), torch.zeros(num_local, **new)
        peak_txt_G, total_txt_G = torch.full((num_global,), -math.inf, **new), torch.zeros(num_global, **new)
        positive_B = torch.empty(num_local, **new)
        for r0, r1 in _spans(num_local, tile_size):
            rows_RD = images[r0:r1] * s
            for c0, c1 in _spans(num_global, tile_size):
                logits_RC = rows_RD @ texts[c0:c1].T
                _accumulate_softmax_stats_(logits_RC, peak_img_B[r0:r1], total_img_B[r0:r1], 1)
                _accumulate_softmax_stats_(logits_RC, peak_txt_G[c0:c1], total_txt_G[c0:c1], 0)
                diag, p0, p1 = _positives_in_tile(logits_RC, row0=r0, col0=c0, offset=offset)
                positive_B[p0:p1] = diag
        all_reduce_softmax_stats_(peak_txt_G, total_txt_G, group)
        own = slice(offset, offset + num_local)
        # lse - positive, with the max taken off the positive first (they nearly cancel when confident).
        loss_img_B = (peak_img_B - positive_B) + total_img_B.log() + label_smoothing * positive_B
        loss_txt_B = (peak_txt_G[own] - positive_B) + total_txt_G[own].log() + label_smoothing * positive_B
        if label_smoothing:
            # Smoothing adds -eps * (mean logit of the row/column); both means are linear in the features.
            image_sum_D = images.sum(0)
            if rank_and_world_size(group)[1] > 1:
                import torch.distributed as dist

                dist.all_reduce(image_sum_D, group=group)
            loss_img_B -= label_smoothing * s * (images @ texts.mean(0))
            loss_txt_B -= label_smoothing * s * (texts[own] @ (image_sum_D / num_global))
        ctx.save_for_backward(image_BD, text_GD, scale, peak_img_B, total_img_B, peak_txt_G, total_txt_G)
        ctx.group, ctx.offset, ctx.label_smoothing, ctx.tile_size = group, offset, label_smoothing, tile_size
        return loss_img_B, loss_txt_B  # fp32 even for half-precision features, as autocast's cross_entropy

    @staticmethod
    def backward(ctx, grad_img_B, grad_txt_B):
        image_BD, text_GD, scale, peak_img_B, total_img_B, peak_txt_G, total_txt_G = ctx.saved_tensors
        offset, eps, tile_size = ctx.offset, ctx.label_smoothing, ctx.tile_size
        dtype = peak_img_B.dtype
        images, texts, s = image_BD.to(dtype), text_GD.to(dtype), scale.to(dtype)
        num_local, num_global = images.shape[0], texts.shape[0]
        g_img_B = grad_img_B.to(dtype)
        # Upstream gradients of every rank's text terms: this rank's rows appear in all of them.
        g_txt_G = all_gather_no_grad(grad_txt_B.to(dtype).contiguous(), ctx.group)
        # d loss / d logit_ij = g_img_i * softmax_row_ij + g_txt_j * softmax_col_ij (+ the terms below), where
        # softmax_row_ij = exp(logit_ij - peak_i) / total_i: fold g / total into one factor per row/column.
        weight_img_B, weight_txt_G = g_img_B / total_img_B, g_txt_G / total_txt_G

        if eps:
            text_sum_D, weighted_text_sum_D = texts.sum(0), (eps / num_global) * (g_txt_G @ texts)
        grad_images_BD = torch.empty_like(images)
        grad_texts_GD = torch.zeros_like(texts)
        grad_scale = torch.zeros((), dtype=dtype, device=images.device)
        for r0, r1 in _spans(num_local, tile_size):
            rows_RD = images[r0:r1] * s
            acc_RD = torch.zeros_like(rows_RD)  # sum_j dlogits_ij * text_j
            for c0, c1 in _spans(num_global, tile_size):
                cols_CD = texts[c0:c1]
                logits_RC = rows_RD @ cols_CD.T
                from_txt_RC = (logits_RC - peak_txt_G[c0:c1]).exp_().mul_(weight_txt_G[c0:c1])
                dlogits_RC = logits_RC.sub_(peak_img_B[r0:r1, None]).exp_().mul_(weight_img_B[r0:r1, None])
                dlogits_RC.add_(from_txt_RC)
                del from_txt_RC
                # Positives (row i of this rank is column offset + i) subtracted here, elementwise, so that
                # softmax - 1 cancels as exactly as in the plain loss.
                diag, p0, p1 = _positives_in_tile(dlogits_RC, row0=r0, col0=c0, offset=offset)
                diag.sub_((1 - eps) * (g_img_B[p0:p1] + g_txt_G[offset + p0:offset + p1]))
                acc_RD.addmm_(dlogits_RC, cols_CD)
                grad_texts_GD[c0:c1].addmm_(dlogits_RC.T, rows_RD)
            if eps:  # the smoothing terms add -eps / G * (g_img_i + g_txt_j) to every logit's gradient
                acc_RD.addr_(g_img_B[r0:r1], text_sum_D, alpha=-eps / num_global).sub_(weighted_text_sum_D)
            grad_scale += (acc_RD * images[r0:r1]).sum()
            grad_images_BD[r0:r1] = acc_RD * s
        if eps:  # in place: no further G x D buffer
            grad_texts_GD.addr_(g_txt_G, images.sum(0) * s, alpha=-eps / num_global)
            grad_texts_GD.sub_((eps * s / num_global) * (g_img_B @ images))
        return (grad_images_BD.to(image_BD.dtype), grad_texts_GD.to(text_GD.dtype), grad_scale.to(scale.dtype),
                None, None, None, None)


def siglip(image_BD: torch.Tensor, text_BD: torch.Tensor, logit_scale: torch.Tensor,
           logit_bias: torch.Tensor | None = None, *, group=None) -> torch.Tensor:
    """SigLIP's sigmoid loss (Zhai et al., 2023): every image-text pair is a binary problem, positive on
    the diagonal, with logits scale * image . text + bias; the sum over this rank's B images and all G
    texts, divided by B.

    Texts travel round the ring of ranks (both directions at once, as open_clip's 'bidir'), so a rank never
    holds more than its own B x B block of logits. `logit_bias` (shape () or (1,)) is required.
    """
    if logit_bias is None:
        raise UserError("loss.name=siglip needs a learnable logit bias: set model.init_logit_bias "
                        "(SigLIP uses -10)")
    _, world_size = rank_and_world_size(group)
    scale, bias = logit_scale.reshape(()), logit_bias.reshape(())
    loss = _sigmoid_block(image_BD, text_BD, scale, bias, positives=True)
    to_left = to_right = text_BD
    for _ in range((world_size - 1) // 2):
        from_left, from_right = neighbour_shift_with_grad([to_right, to_left], [1, -1], group)
        loss = loss + _sigmoid_block(image_BD, from_left, scale, bias) + _sigmoid_block(image_BD, from_right, scale, bias)
        to_left, to_right = from_right, from_left
    if (world_size - 1) % 2:
        (from_left,) = neighbour_shift_with_grad([to_right], [1], group)
        loss = loss + _sigmoid_block(image_BD, from_left, scale, bias)
    return loss


def _sigmoid_block(image_BD, text_BD, scale, bias, *, positives: bool = False) -> torch.Tensor:
    # -log sigmoid(-x) = softplus(x) for negatives; a positive's -log sigmoid(x) = softplus(x) - x.
    logits_BB = scale * image_BD @ text_BD.T + bias
    loss = F.softplus(logits_BB).sum()
    if positives:
        loss = loss - logits_BB.diagonal().sum()
    return loss / image_BD.shape[0]


def mean_over_captions(loss_fn, image_BD: torch.Tensor, text_XD: torch.Tensor, logit_scale: torch.Tensor,
                       logit_bias: torch.Tensor | None = None, *, group=None, **kwargs) -> torch.Tensor:
    """`loss_fn` between B images and X = B * K texts, sample-major (image i's captions are rows i*K .. i*K+K-1,
    data.captions_per_sample): the mean over k of `loss_fn(images, the B k-th captions)`. Each term is an
    ordinary global-batch loss (its own all-gathers), so every loss above keeps its distributed form; K = 1
    is `loss_fn` itself."""
    num_images = image_BD.shape[0]
    k, rest = divmod(text_XD.shape[0], num_images)
    if rest or not k:
        raise ValueError(f"{text_XD.shape[0]} texts for {num_images} images: expected a multiple")
    if k == 1:
        return loss_fn(image_BD, text_XD, logit_scale, logit_bias, group=group, **kwargs)
    text_BKD = text_XD.reshape(num_images, k, -1)
    return sum(loss_fn(image_BD, text_BKD[:, i].contiguous(), logit_scale, logit_bias, group=group, **kwargs)
               for i in range(k)) / k


def build_loss(cfg):
    """The loss function selected by `loss.name`, with its own options bound."""
    from functools import partial

    if cfg.name == "infonce":
        loss_fn = partial(infonce, label_smoothing=cfg.label_smoothing)
        loss_fn.positives = cfg.positives  # caption or class: the training loop passes positive_keys_B
        return loss_fn
    if cfg.name == "infonce_tiled":
        return partial(infonce_tiled, label_smoothing=cfg.label_smoothing, tile_size=cfg.tile_size)
    if cfg.name == "siglip":
        return siglip
    raise ValueError(f"unknown loss {cfg.name!r}")
