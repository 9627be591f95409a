"""Train-step time of the CIFAR-10 recipe with and without its two step savers, on this machine's CPU.

    plain    every parameter trained, every caption of the batch encoded
    freeze   optim.freeze=["^token_embedding"]: the text tower's 49,408 x 128 token embedding (6.3M of the
             model's 7M parameters) stays at its random init, so AdamW no longer updates it at every step
    dedupe   train.dedupe_captions: each distinct caption of the batch is encoded once (torch.unique on the
             loader's tokens) and its features indexed back to the samples
    recipe   both (configs/cifar10.yaml as committed)

All four train the recipe's model (configs/cifar10.yaml: cifar-convnet-xs, batch 256, loss.positives=class,
AdamW through DeepSpeed, fp32) on one fixed batch of 32 px images whose captions are the 18 CIFAR templates x
10 classes drawn at random, as a batch of the recipe holds them (~140 distinct captions in 256). The variants
are timed in alternating rounds (plain, freeze, dedupe, recipe, plain, ...) so that load from other jobs hits
them alike; each round times --steps steps after one untimed step, and the median over rounds is reported with
its ratio to `plain` in the same run. Only the step is timed (no data loading).

    flock /tmp/contrastive-heavy.lock .venv/bin/python bench/step_time.py            # ~1.5 min
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

VARIANTS = {"plain": (False, False), "freeze": (True, False), "dedupe": (False, True), "recipe": (True, True)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "cifar10.yaml")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()

    import torch

    from contrastive.config import load_config
    from contrastive.engine import build_engine, freeze, init_distributed
    from contrastive.losses import build_loss
    from contrastive.models import build_model
    from contrastive.train import class_keys, distinct_captions, train_step
    from contrastive.data_prep.cifar10 import CLASSES as classes

    cfg = load_config(args.config, [])
    world = init_distributed()
    loss_fn = build_loss(cfg.loss)
    batch_size = cfg.train.batch_size
    templates = (REPO / "eval" / "templates" / "cifar.txt").read_text().splitlines()  # what prep captions with
    gen = torch.Generator().manual_seed(0)
    labels_B = torch.randint(len(classes), (batch_size,), generator=gen)
    picks_B = torch.randint(len(templates), (batch_size,), generator=gen)
    captions = [templates[t].format(c=classes[c]) for t, c in zip(picks_B.tolist(), labels_B.tolist())]

    engines, batches = {}, {}
    for name, (frozen, dedupe) in VARIANTS.items():
        torch.manual_seed(0)
        bundle = build_model(cfg.model)
        if frozen:
            freeze(bundle.model, cfg.optim.freeze)
        engines[name], _ = build_engine(bundle.model, cfg, world, lambda step: 1.0)
        size = bundle.preprocess_cfg["size"]
        size = size if isinstance(size, int) else size[0]
        images = torch.randn(batch_size, 3, size, size, generator=torch.Generator().manual_seed(1))
        texts = bundle.tokenizer(captions)
        keys_B = class_keys(texts, labels_B)
        if dedupe:
            unique_UL, rows_B = distinct_captions(texts)
            batches[name] = (images, unique_UL, keys_B, rows_B)
        else:
            batches[name] = (images, texts, keys_B)
    distinct = len(set(captions))

    def seconds_per_step(name: str) -> float:
        train_step(engines[name], batches[name], loss_fn=loss_fn)  # untimed: settle after the other variants
        start = time.perf_counter()
        for _ in range(args.steps):
            train_step(engines[name], batches[name], loss_fn=loss_fn)
        return (time.perf_counter() - start) / args.steps

    for name in VARIANTS:  # warm-up round
        seconds_per_step(name)
    times = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name in VARIANTS:
            times[name].append(seconds_per_step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "config": str(args.config), "batch_size": batch_size, "distinct_captions": distinct,
        "torch_threads": torch.get_num_threads(),
        "s_per_step": {k: round(v, 4) for k, v in median.items()},
        "speedup_vs_plain": {k: round(median["plain"] / v, 3) for k, v in median.items()},
        "rounds": {k: [round(x, 4) for x in v] for k, v in times.items()},
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
