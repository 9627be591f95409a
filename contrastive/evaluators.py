"""Evaluator plug-ins: named in config (eval.evaluators), run by the training loop at their own frequency;
and the sharded, dtype- and ZeRO-3-safe encoding they share.

The library never imports `eval/` directly: plug-ins are found by "module:Class" paths, so `eval/` can
depend on `contrastive` and not the other way round. A config may name a registered plug-in or give a
full "package.module:Class" path of its own.

Evaluation on W ranks: each rank decodes and encodes its own share of the samples (sample i goes to rank
i mod W), then the features are gathered and put back in sample order, so W ranks give a 1-rank evaluation's
result for 1/W of the work each. One process without a process group is the same code with W = 1.

Letters in names: B batch, D embedding dim, N items encoded.
"""
from __future__ import annotations

import importlib
import itertools
from typing import Any, Callable, Iterable

import torch

from contrastive.config import EvalConfig, EvaluatorConfig
from contrastive.distributed import host_all_gather, host_all_gather_object
from contrastive.errors import UserError

REGISTRY = {
    "zeroshot": "contrastive.eval.zeroshot:ZeroShotEvaluator",
    "retrieval": "contrastive.eval.retrieval:RetrievalEvaluator",
}


def resolve(name: str):
    target = REGISTRY.get(name, name)
    if ":" not in target:
        raise UserError(f"unknown evaluator {name!r}; known: {', '.join(REGISTRY)} (or give module:Class)")
    module, cls = target.split(":", 1)
    try:
        return getattr(importlib.import_module(module), cls)
    except (ImportError, AttributeError) as e:
        raise UserError(f"evaluator {name!r} ({target}) cannot be loaded: {e}") from None


def build_evaluators(cfg: EvalConfig) -> list:
    """Instantiate each configured evaluator with its own sub-config (checks paths before training starts)."""
    return [resolve(ev.name)(ev, batch_size=cfg.batch_size) for ev in cfg.evaluators]


def run_evaluators(evaluators: list, bundle, *, batch_size: int) -> dict:
    """Run every evaluator on the bundle's model; returns {"<tag>/<metric>": value}."""
    results = {}
    for evaluator in evaluators:
        for key, value in evaluator(bundle).items():
            results[f"{evaluator.tag}/{key}"] = value
    return results


class FeatureEncoder:
    """Unit-norm float32 features of a dual encoder (open_clip's CLIP or CustomTextCLIP), through its forward.

    Under ZeRO-3 each module's forward hook gathers that module's own parameters, so the parameters the top
    module holds itself (text_projection, positional_embedding, logit_scale) are whole only inside the top
    module's forward: calling encode_image/encode_text directly meets them partitioned. forward(image=x) and
    forward(text=t) return the normalised features of whichever is given. Images go in in the dtype of the
    model's weights (half precision under deepspeed.precision bf16/fp16; amp_bf16 keeps fp32 weights).
    Under ZeRO-3 every call is a collective: all ranks must make the same calls in the same order
    (encode_sharded sees to that).
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        first = next(model.parameters())
        self.device, self.dtype = first.device, first.dtype

    @torch.no_grad()
    def encode_image(self, images_BCHW: torch.Tensor) -> torch.Tensor:
        return self._features(self.model(image=images_BCHW.to(self.device, self.dtype)), "image_features", 0)

    @torch.no_grad()
    def encode_text(self, ids_BL: torch.Tensor) -> torch.Tensor:
        return self._features(self.model(text=ids_BL.to(self.device)), "text_features", 1)

    @staticmethod
    def _features(out, key: str, position: int) -> torch.Tensor:
        return (out[key] if isinstance(out, dict) else out[position]).float()


def encode_sharded(rows: Iterable[tuple[int, Any, Any]], encode: Callable[[list], torch.Tensor], *, dummy: Any,
                   batch_size: int) -> tuple[torch.Tensor, list]:
    """Encode this rank's rows and gather every rank's, in index order: (feats_ND on the host, extras).

    rows: this rank's share as (index, item, extra) triples, indices unique over all ranks; `encode` turns a
    list of items into (B, D) features; `extra` is anything picklable that travels with its row (a label, a
    caption). Ranks encode `batch_size` items at a time in lockstep, one host all-gather of batch sizes per
    round deciding whether any rank has rows left: a rank that has run out encodes [dummy] and drops the
    result, as ZeRO-3 gathers parameters in every forward and each gather needs every rank.
    """
    rows = iter(rows)
    indices: list[int] = []
    extras: list = []
    feats: list[torch.Tensor] = []
    empty_0D = None
    while True:
        batch = list(itertools.islice(rows, batch_size))
        if not host_all_gather(torch.tensor([len(batch)])).any():
            break
        # Reading features to the host each batch is on purpose: evaluation ends in host-side metrics anyway.
        out_BD = encode([item for _, item, _ in batch] or [dummy]).cpu()
        empty_0D = out_BD[:0]
        if batch:
            feats.append(out_BD)
            indices.extend(index for index, _, _ in batch)
            extras.extend(extra for _, _, extra in batch)
    if empty_0D is None:  # no rank had a single row
        return torch.empty(0, 0), []
    feats_ND = host_all_gather(torch.cat(feats) if feats else empty_0D)
    gathered = [pair for part in host_all_gather_object(list(zip(indices, extras))) for pair in part]
    order = sorted(range(len(gathered)), key=lambda n: gathered[n][0])
    return feats_ND[order], [gathered[n][1] for n in order]


def sum_over_ranks(count: int) -> int:
    return sum(host_all_gather_object(count))


__all__ = ["EvaluatorConfig", "FeatureEncoder", "build_evaluators", "encode_sharded", "resolve", "run_evaluators",
           "sum_over_ranks"]
