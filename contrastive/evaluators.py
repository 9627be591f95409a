"""Evaluator plug-ins: named in config (eval.evaluators), run by the training loop at their own frequency.

The library never imports `eval/` directly: plug-ins are found by "module:Class" paths, so `eval/` can
depend on `contrastive` and not the other way round. A config may name a registered plug-in or give a
full "package.module:Class" path of its own.
"""
from __future__ import annotations

import importlib

from contrastive.config import EvalConfig, EvaluatorConfig
from contrastive.errors import UserError

REGISTRY = {
    "zeroshot": "eval.zeroshot:ZeroShotEvaluator",
    "retrieval": "eval.retrieval:RetrievalEvaluator",
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


__all__ = ["EvaluatorConfig", "build_evaluators", "run_evaluators", "resolve"]
